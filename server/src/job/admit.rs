//! Push admission: a push is refused (stale, early, out of range) or
//! answered as a duplicate from its header alone, given its worker's slot
//! and its turn, read message by message into a set of push buffers, and
//! recorded whole.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use paramd_proto::v1::Segment;
use tokio::sync::SemaphorePermit;

use super::{Collect, Job};
use crate::error::{Error, Result};
use crate::invalid;
use crate::pieces::{Staged, Staging, Target};
use crate::spec::{Merge, NonFinite};

/// What a push for a round turns out to be before its payload is read.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// A new push for the round being collected.
    Accept,
    /// A retry of a push already counted: acknowledge, count nothing.
    Duplicate,
}

/// How long a push waits for the next rank to sum to start: pushes that
/// start within it of each other are read in rank order.
pub(super) const ARRIVAL_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// A push being received (see `Job::staging`); dropping it ends that and
/// wakes the pushes waiting for their turn.
pub struct Reading<'a> {
    job: &'a Job,
    worker: u32,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.job.collect.lock().reading[self.worker as usize] = None;
        self.job.spare.notify();
    }
}

/// A push's fate once its header is read (`Job::receive`).
pub enum Admitted<'a> {
    /// A retry of a push already recorded: answered with the pushes the
    /// round holds, its payload not read.
    Duplicate(u32),
    /// Admitted: its messages go to `Receiving::feed`, then `finish`.
    Receiving(Box<Receiving<'a>>),
}

/// A push admitted and being received: it holds its worker's slot, its
/// turn and the set of buffers its messages are written into. Dropped
/// before `finish` (a refused message, a cut stream), the push leaves the
/// round as it was.
pub struct Receiving<'a> {
    job: &'a Arc<Job>,
    worker: u32,
    round: u64,
    /// The membership it was sent under (elastic jobs; 0 otherwise).
    lease: u64,
    /// The push's weight in the merge (1 for a mean).
    weight: f32,
    staging: Staging<'a>,
    /// Names without a gradient listed so far.
    no_grad: usize,
    /// When it was its turn to be read.
    started: Instant,
    _reading: Reading<'a>,
    _slot: SemaphorePermit<'a>,
}

impl Receiving<'_> {
    /// Checks and writes one message of the push: `segments` of values and
    /// the parameters named in `no_grad` as without a gradient; `bytes` is
    /// its payload, counted as progress for the pushes waiting their turn.
    pub fn feed(&mut self, segments: Vec<Segment>, no_grad: &[String], bytes: usize) -> Result<()> {
        let job = self.job;
        job.received(bytes);
        self.no_grad += no_grad.len();
        let params = job.config.params.len();
        let fed = if self.no_grad > params {
            Err(invalid!(
                "push of worker {} for round {}: no_grad lists {} names, the job has {params} \
                 parameters",
                self.worker,
                self.round,
                self.no_grad
            ))
        } else {
            job.feed(&mut self.staging, segments, no_grad)
        };
        fed.inspect_err(|e| job.metrics.refused(e.reason()))
    }

    /// Accepts the push whole and records it: whether it was a duplicate
    /// after all, and the pushes the round holds.
    pub fn finish(self) -> Result<(Admission, u32)> {
        let (job, worker, round) = (self.job, self.worker, self.round);
        let push = job
            .finish(self.staging)
            .inspect_err(|e| job.refused(e, worker, round))?;
        job.read_took(self.started.elapsed());
        job.push(worker, round, push, self.weight, self.lease)
            .inspect_err(|e| job.refused(e, worker, round))
    }
}

impl Job {
    /// Admits worker `worker`'s push for `round` from its header: refused
    /// (stale, early, out of range, shutting down), answered as a
    /// duplicate, or received. One push per worker is read at a time:
    /// another copy arriving meanwhile (a flood of retries) is refused at
    /// once, before its payload is read, since waiting would hold HTTP/2
    /// window that the push being read needs. A received push waits for
    /// its turn (`Job::staging`) and is admitted again, since the round
    /// may have moved meanwhile. Refusals are counted in the metrics.
    /// `weight` is the header's: required (> 0, finite) by a job that
    /// merges by weight, and refused (not 0) by one that merges by mean.
    pub async fn receive(
        self: &Arc<Self>,
        worker: u32,
        round: u64,
        weight: f32,
        lease: u64,
    ) -> Result<Admitted<'_>> {
        let scale = self
            .scale(weight)
            .and_then(|s| self.check_lease(worker, round, lease).map(|()| s))
            .inspect_err(|e| self.refused(e, worker, round))?;
        let admit = || match self.admit(worker, round, lease) {
            Ok(Admission::Duplicate) => {
                self.metrics.duplicates.increment(1);
                Ok(false)
            }
            Ok(Admission::Accept) => Ok(true),
            Err(e) => {
                self.refused(&e, worker, round);
                Err(e)
            }
        };
        let duplicate = || Ok(Admitted::Duplicate(self.status().workers_pushed));
        if !admit()? {
            return duplicate();
        }
        let slot = self.push_slot(worker).try_acquire().map_err(|_| {
            let e = Error::Aborted(format!(
                "worker {worker}'s push for round {round} of job '{}' is already being received; \
                 retry if it fails",
                self.name
            ));
            self.refused(&e, worker, round);
            e
        })?;
        let (reading, staging) = self.staging(worker, round, scale).await;
        let started = Instant::now();
        if !admit()? {
            return duplicate();
        }
        Ok(Admitted::Receiving(Box::new(Receiving {
            job: self,
            worker,
            round,
            lease,
            weight: scale.unwrap_or(1.0),
            staging,
            no_grad: 0,
            started,
            _reading: reading,
            _slot: slot,
        })))
    }

    /// What a push of `weight` multiplies its values by: nothing in a job
    /// that merges by mean (where a weight is refused), its weight in one
    /// that merges by weight (where it is required).
    fn scale(&self, weight: f32) -> Result<Option<f32>> {
        match self.config.merge {
            Merge::Mean if weight == 0.0 => Ok(None),
            Merge::Mean => Err(invalid!(
                "weight: job '{}' merges pushes by mean; weight {weight} is for a job whose merge is weighted",
                self.name
            )),
            Merge::Weighted if weight.is_finite() && weight > 0.0 => Ok(Some(weight)),
            Merge::Weighted => Err(invalid!(
                "weight: job '{}' merges pushes by weight, which must be > 0 and finite, got {weight}",
                self.name
            )),
        }
    }

    /// Checks a push's lease: none in a job of fixed workers; in an elastic
    /// one, a lease, which the coordinator's shard checks is the worker's
    /// current membership and that the round still takes its push (other
    /// shards hold it apart from another lease's push for the same worker
    /// id, and the coordinator counts only the lease that was a member).
    fn check_lease(&self, worker: u32, round: u64, lease: u64) -> Result<()> {
        match (&self.config.elastic, &self.coordinator) {
            (None, _) if lease == 0 => Ok(()),
            (None, _) => Err(invalid!(
                "lease: job '{}' has fixed workers; lease {lease} is for a member of an elastic job",
                self.name
            )),
            (Some(_), _) if lease == 0 => Err(Error::NotMember(format!(
                "worker {worker}'s push for round {round} has no lease: job '{}' is elastic, join it and push with the lease Join gave",
                self.name
            ))),
            (Some(_), Some(c)) => c.admit_push(&self.name, worker, lease, round),
            (Some(_), None) => Ok(()),
        }
    }

    /// Counts and logs a refused push.
    fn refused(&self, e: &Error, worker: u32, round: u64) {
        self.metrics.refused(e.reason());
        if matches!(e, Error::Stale { .. }) {
            self.metrics.stale.increment(1);
        }
        tracing::debug!(job = %self.name, worker, round, error = %e, "push refused");
    }

    /// Decides, from the header of a push alone, whether to read its payload.
    pub(super) fn admit(&self, worker: u32, round: u64, lease: u64) -> Result<Admission> {
        self.check_serving()?;
        let c = self.collect.lock();
        self.admit_locked(&c, worker, round, lease)
    }

    fn admit_locked(&self, c: &Collect, worker: u32, round: u64, lease: u64) -> Result<Admission> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Error::Unavailable(format!(
                "shard {} is shutting down: job '{}' takes no push; push round {round} again once the cluster is back",
                self.cluster.shard, self.name
            )));
        }
        if worker >= self.config.workers {
            return Err(invalid!(
                "worker {worker} is out of range: job '{}' has {} workers (ranks 0..{})",
                self.name,
                self.config.workers,
                self.config.workers - 1
            ));
        }
        if round < c.round {
            return Err(Error::Stale {
                job: self.name.clone(),
                round,
                current: c.round,
            });
        }
        if round > c.round {
            return Err(Error::Early {
                job: self.name.clone(),
                round,
                current: c.round,
            });
        }
        let held = c.pushed[worker as usize].then(|| c.leases[worker as usize]);
        match held {
            Some(l) if l == lease => Ok(Admission::Duplicate),
            // Leases are given out in increasing order and a worker id has
            // one membership at a time: a push from an older lease than the
            // one held is from a worker whose membership ended.
            Some(l) if l > lease => Err(Error::NotMember(format!(
                "worker {worker} with lease {lease}: this shard holds worker {worker}'s push for round {round} of job '{}' from lease {l}, a later membership; a worker whose lease ended joins again",
                self.name
            ))),
            // The round completed without this worker (backup workers,
            // worker timeout, or an elastic job's rule): its push is stale.
            _ if c.closed => Err(Error::Stale {
                job: self.name.clone(),
                round,
                current: c.round + 1,
            }),
            // New, or (on a shard other than the coordinator's, which
            // refuses it from the start) in place of a push from an older
            // lease of the same worker id, whose membership ended: the
            // coordinator counts only the lease that was a member.
            _ => Ok(Admission::Accept),
        }
    }

    /// Receives worker `worker`'s push of `round` into a set of this job's
    /// buffers: its messages are checked and written as they arrive
    /// (`Staging::feed`), and `finish` accepts it whole or refuses it. The
    /// push counts as being received until the `Reading` is dropped.
    ///
    /// On a one-shard job without backup workers, pushes that overlap are
    /// read in rank order: a push waits until every lower rank's push is
    /// summed (its own stream held back meanwhile by HTTP/2 flow control)
    /// as long as the next of them is being received and progressing, and
    /// up to `turn_grace` for it to start; then it is summed onto the
    /// accumulators as it streams, into a spare set of buffers that
    /// becomes the accumulators once it is received whole (a refused or
    /// cut push leaves them untouched). Workers pushing together then
    /// cost one set of push buffers beside the accumulators, not one each,
    /// and no pass of its own to sum each push. A push is read at once, beside the
    /// others, when the next rank has not started within the grace (a
    /// late worker) or no push has progressed for `turn_patience` (a
    /// stalled stream): memory then grows as before, and latency does not. A
    /// cluster reads pushes as they come: a shard sums none before the
    /// coordinator chooses the round's members.
    pub(super) async fn staging(
        &self,
        worker: u32,
        round: u64,
        scale: Option<f32>,
    ) -> (Reading<'_>, Staging<'_>) {
        self.collect.lock().reading[worker as usize] = Some(round);
        let reading = Reading { job: self, worker };
        // An elastic job's worker ids come and go: a push does not wait
        // for a lower id that may not be a member.
        let in_order = self.cluster.size() == 1
            && self.config.backup_workers == 0
            && self.config.elastic.is_none();
        if in_order {
            self.wait_turn(worker, round).await;
        }
        // Every lower rank is summed: this push is summed as it streams,
        // and its buffers become the accumulators when it is folded.
        let summed = in_order && worker > 0 && {
            let c = self.collect.lock();
            c.round == round && !c.closed && c.folded == worker
        };
        let staging = Target {
            params: &self.config.params,
            index: &self.index,
            layout: &self.layout,
            own: &self.own,
            finite_only: self.config.non_finite == NonFinite::Error,
        }
        .stage(self.spare.take(), summed, scale);
        (reading, staging)
    }

    /// Checks and writes one message of a push (`Staging::feed`), adding
    /// the accumulators if the push is summed as it streams: nothing else
    /// changes them meanwhile, because the lower ranks are summed and the
    /// higher ones wait; a round that closes without this push (worker
    /// timeout) may, but then the push is refused when it is recorded.
    pub(super) fn feed(
        &self,
        staging: &mut Staging<'_>,
        segments: Vec<Segment>,
        no_grad: &[String],
    ) -> Result<()> {
        if staging.summed() {
            staging.feed(segments, no_grad, Some(&self.grads.lock()))
        } else {
            staging.feed(segments, no_grad, None)
        }
    }

    /// Accepts a push whole or refuses it (`Staging::finish`).
    pub(super) fn finish(&self, staging: Staging<'_>) -> Result<Staged> {
        if staging.summed() {
            staging.finish(Some(&self.grads.lock()))
        } else {
            staging.finish(None)
        }
    }

    /// Waits while a push of a lower rank than `worker` is being received
    /// for `round` and progressing, or up to `turn_grace` for it to start
    /// (or until the round is no longer collected).
    async fn wait_turn(&self, worker: u32, round: u64) {
        let now = tokio::time::Instant::now;
        let grace = now() + self.turn_grace();
        let (mut deadline, mut seen) = (now(), None);
        loop {
            let changed = self.spare.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wake = {
                let c = self.collect.lock();
                if c.round != round || c.closed {
                    return;
                }
                // The lowest rank not summed yet. Summing a push received
                // whole is a trade of buffers, at once, so a push waits
                // until every lower rank's is summed.
                let next = c.folded as usize;
                if worker as usize <= next {
                    return;
                }
                // Progress: a push summed, or bytes received.
                let progress = (next, self.received.load(Ordering::Relaxed));
                if seen != Some(progress) {
                    (seen, deadline) = (Some(progress), now() + self.turn_patience());
                }
                if c.reading[next] == Some(round) || c.pushed[next] {
                    if now() >= deadline {
                        tracing::debug!(job = %self.name, worker, round, waiting_for = next, "a lower rank's push is not progressing; reading this one beside it");
                        return;
                    }
                    deadline
                } else if now() < grace {
                    // The next rank, pushing at about the same time, may
                    // not have started yet.
                    grace
                } else {
                    tracing::debug!(job = %self.name, worker, round, waiting_for = next, "a lower rank has not pushed; reading this push out of turn");
                    return;
                }
            };
            // Woken by a change, or at `wake` to look again.
            let _ = tokio::time::timeout_at(wake, changed).await;
        }
    }

    /// Counts `bytes` of a push received, the progress a push waiting for
    /// its turn looks for.
    pub(super) fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Records how long a push took to receive once it was its turn.
    pub(super) fn read_took(&self, took: std::time::Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.read_nanos.store(nanos, Ordering::Relaxed);
    }

    /// How long a push waits for the next rank to start: `ARRIVAL_GRACE`,
    /// or half the time the last push took to receive if longer (a large
    /// push takes its worker longer to start sending); before any push was
    /// timed (the first round, when workers connect), `turn_patience`.
    pub(super) fn turn_grace(&self) -> std::time::Duration {
        match self.read_nanos.load(Ordering::Relaxed) {
            0 => self.turn_patience(),
            last => ARRIVAL_GRACE
                .max(std::time::Duration::from_nanos(last) / 2)
                .min(self.turn_patience()),
        }
    }

    /// How long a push waits for its turn without the push before it
    /// progressing: a quarter of the worker timeout, at most a second.
    pub(super) fn turn_patience(&self) -> std::time::Duration {
        (self.config.worker_timeout / 4).min(std::time::Duration::from_secs(1))
    }

    /// Records worker `worker`'s push for `round`, received whole. The
    /// round's first push starts the task that learns its members and
    /// completes it, so that a client going away cannot abandon it.
    pub(super) fn push(
        self: &Arc<Self>,
        worker: u32,
        round: u64,
        push: Staged,
        weight: f32,
        lease: u64,
    ) -> Result<(Admission, u32)> {
        self.check_serving()?;
        let bytes = push.bytes;
        let mut c = self.collect.lock();
        if self.admit_locked(&c, worker, round, lease)? == Admission::Duplicate {
            self.metrics.duplicates.increment(1);
            return Ok((Admission::Duplicate, c.count));
        }
        let new = !c.pushed[worker as usize];
        if new {
            c.count += 1;
        }
        c.pushed[worker as usize] = true;
        c.pushes[worker as usize] = Some(push);
        c.weights[worker as usize] = weight;
        c.leases[worker as usize] = lease;
        c.opened.get_or_insert_with(Instant::now);
        let count = c.count;
        self.metrics.pushes.increment(1);
        for (counter, n) in self.metrics.push_bytes.iter().zip(bytes) {
            counter.increment(n as u64);
        }
        self.metrics.workers_pushed.set(f64::from(count));
        drop(c);
        self.arrivals.send_modify(|n| *n += 1);
        // Higher ranks waiting for this push may be read now.
        self.spare.notify();
        if new && count == 1 {
            // The round's driver: the coordinator chooses the round's
            // members once it may, then the round is completed.
            tokio::spawn(Arc::clone(self).drive(round));
        }
        Ok((Admission::Accept, count))
    }

    /// The slot a push of `worker` holds while it is read; `worker` was
    /// admitted, so it is in range.
    pub(super) fn push_slot(&self, worker: u32) -> &tokio::sync::Semaphore {
        &self.push_slots[worker as usize]
    }
}
