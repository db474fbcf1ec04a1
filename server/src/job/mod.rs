//! One job on one shard: its chunks, the round being collected, and the
//! completion of a round (members chosen by the coordinator, reduce, report
//! to the coordinator, apply).

mod checkpointing;
mod create;
pub mod history;
mod members;
mod pull;
mod round;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use paramd_proto::v1 as pb;
use paramd_proto::v1::Segment;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use self::history::History;
use crate::chunk::ChunkState;
use crate::cluster::Cluster;
use crate::coordinator::{Coordinator, Decision};
use crate::error::{Error, Result};
use crate::invalid;
use crate::layout::Layout;
use crate::metrics::JobMetrics;
use crate::pieces::{Accumulator, Ownership, Spare, Staged, Staging, Target};
use crate::spec::{JobConfig, NonFinite};

/// What a push for a round turns out to be before its payload is read.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// A new push for the round being collected.
    Accept,
    /// A retry of a push already counted: acknowledge, count nothing.
    Duplicate,
}

/// A round closed with its members: the first `folded` ranks are summed
/// into the accumulator already, `rest` are the other members' pushes in
/// rank order.
#[derive(Debug)]
pub struct Closed {
    folded: usize,
    rest: Vec<Staged>,
}

/// A snapshot of a job for Status.
#[derive(Debug)]
pub struct JobStatus {
    pub round: u64,
    pub step: u64,
    pub workers_pushed: u32,
    pub rounds_skipped: u64,
    pub last: Option<Decision>,
    pub parameter_bytes: usize,
    pub state_bytes: usize,
    /// Workers without a push of the open round (none before its first
    /// push), at most `WAITING_SHOWN`.
    pub waiting_for: Vec<u32>,
}

/// How long a push waits for the next rank to sum to start: pushes that
/// start within it of each other are read in rank order.
const ARRIVAL_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// The most late workers a status lists.
pub const WAITING_SHOWN: usize = 64;

/// A pull about to be sent.
#[derive(Debug)]
pub struct Snapshot {
    pub round: u64,
    pub last: Option<Decision>,
    /// Local indices of the chunks to send.
    pub chunks: Vec<usize>,
}

/// Values and state of the chunks, with the round they reflect, behind one
/// lock so that a pull never sees a half-applied round.
struct Store {
    chunks: Vec<ChunkState>,
    round: u64,
    last: Option<Decision>,
    skipped: u64,
}

/// The round being collected.
struct Collect {
    round: u64,
    pushed: Vec<bool>,
    count: u32,
    pushes: Vec<Option<Staged>>,
    /// The round has its contributors and is being completed: a push from
    /// anyone else is too late.
    closed: bool,
    /// When the round's first push arrived: the start of its barrier.
    opened: Option<Instant>,
    /// Workers of ranks `0..folded` are already summed into the
    /// accumulator, their pushes dropped (see `Job::fold_ready`).
    folded: u32,
    /// The round each worker's push being received is for, if one is.
    reading: Vec<Option<u64>>,
}

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

/// A job as held by one shard.
pub struct Job {
    pub name: String,
    pub config: JobConfig,
    layout: Layout,
    own: Ownership,
    index: HashMap<String, usize>,
    store: RwLock<Store>,
    /// One accumulation buffer per chunk, touched only while completing.
    grads: Mutex<Vec<Accumulator>>,
    /// Buffers pushes are received into, kept across rounds.
    spare: Arc<Spare>,
    /// Bytes of pushes received so far (see `Job::wait_turn`).
    received: std::sync::atomic::AtomicU64,
    /// How long the last push took to receive once it was its turn.
    read_nanos: std::sync::atomic::AtomicU64,
    collect: Mutex<Collect>,
    completed: watch::Sender<u64>,
    /// Pushes accepted so far, so that the round's gatherer reports anew.
    arrivals: watch::Sender<u64>,
    /// The coordinator's side of the step decision, on shard 0.
    coordinator: Option<Coordinator>,
    /// The spec the job was created with, for checkpoints.
    spec: pb::JobSpec,
    cluster: Arc<Cluster>,
    /// The shard of every chunk.
    owners: Vec<u32>,
    /// Set when the job is deleted, so that waiting pulls end at once.
    deleted: AtomicBool,
    /// One permit per worker: the push of that worker being read.
    push_slots: Vec<tokio::sync::Semaphore>,
    /// Rounds of the intact checkpoints this shard restored the job from
    /// (none for a job created by Init), and of those committed since.
    restorable: Mutex<Vec<u64>>,
    /// Why the job does not serve workers yet: restored on a cluster, it
    /// waits for the shards to agree on a round all of them can restore.
    on_hold: Mutex<Option<String>>,
    /// Why the round being completed is not progressing on this shard (the
    /// last error of its driver, which keeps trying); none once it is.
    trouble: Mutex<Option<String>>,
    /// The newest checkpoint round committed on this shard in this process
    /// (or restored from).
    committed: watch::Sender<Option<u64>>,
    /// Set at shutdown: pushes are refused, the final checkpoint is taken.
    draining: AtomicBool,
    /// Held while a checkpoint of the job is taken: one at a time.
    checkpointing: tokio::sync::Mutex<()>,
    /// The newest rounds, for the status page.
    history: Mutex<History>,
    pub metrics: JobMetrics,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// Bytes of gradient one worker pushes to this shard per round.
    pub fn push_bytes(&self) -> usize {
        self.own
            .chunks
            .iter()
            .map(|&c| self.layout.chunks[c].len * 4)
            .sum()
    }

    /// Refuses workers while the job waits for the shards to agree on the
    /// round they restore.
    pub fn check_serving(&self) -> Result<()> {
        // A push admitted before the job was deleted is refused when it
        // is recorded, not acknowledged into a job that no longer exists.
        if self.deleted.load(Ordering::Acquire) {
            return Err(Error::NotFound(self.name.clone()));
        }
        match self.on_hold.lock().as_ref() {
            None => Ok(()),
            Some(why) => Err(Error::Unavailable(why.clone())),
        }
    }

    /// Why the job does not progress on this shard, if it does not: held,
    /// or its round's driver failing.
    pub fn problem(&self) -> Option<String> {
        self.on_hold
            .lock()
            .clone()
            .or_else(|| self.trouble.lock().clone())
    }

    /// Serves workers (the shards agree on the job's round).
    pub fn serve(&self) {
        *self.on_hold.lock() = None;
    }

    /// Stops serving workers, for `why`.
    pub fn hold(&self, why: String) {
        *self.on_hold.lock() = Some(why);
    }

    /// Refuses pushes from now on: the process is stopping, and the final
    /// checkpoint must hold the rounds every shard has applied.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Rounds of the intact checkpoints this shard holds of the job (restored
    /// from, or committed since), newest first.
    pub fn restorable(&self) -> Vec<u64> {
        let Some(settings) = &self.cluster.checkpoints else {
            return Vec::new();
        };
        let mut rounds = self.restorable.lock().clone();
        // Retention may have deleted some since.
        rounds.retain(|&r| crate::checkpoint::round_dir(&settings.dir, &self.name, r).exists());
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        rounds.dedup();
        rounds
    }

    /// Decides, from the header of a push alone, whether to read its payload.
    pub fn admit(&self, worker: u32, round: u64) -> Result<Admission> {
        self.check_serving()?;
        let c = self.collect.lock();
        self.admit_locked(&c, worker, round)
    }

    fn admit_locked(&self, c: &Collect, worker: u32, round: u64) -> Result<Admission> {
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
        if c.pushed[worker as usize] {
            Ok(Admission::Duplicate)
        } else if c.closed {
            // The round completed without this worker (backup workers or
            // worker timeout): its push is stale.
            Err(Error::Stale {
                job: self.name.clone(),
                round,
                current: c.round + 1,
            })
        } else {
            Ok(Admission::Accept)
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
    pub async fn staging(&self, worker: u32, round: u64) -> (Reading<'_>, Staging<'_>) {
        self.collect.lock().reading[worker as usize] = Some(round);
        let reading = Reading { job: self, worker };
        let in_order = self.cluster.size() == 1 && self.config.backup_workers == 0;
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
        .stage(self.spare.take(), summed);
        (reading, staging)
    }

    /// Checks and writes one message of a push (`Staging::feed`), adding
    /// the accumulators if the push is summed as it streams: nothing else
    /// changes them meanwhile, because the lower ranks are summed and the
    /// higher ones wait; a round that closes without this push (worker
    /// timeout) may, but then the push is refused when it is recorded.
    pub fn feed(
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
    pub fn finish(&self, staging: Staging<'_>) -> Result<Staged> {
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
    pub fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Records how long a push took to receive once it was its turn.
    pub fn read_took(&self, took: std::time::Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.read_nanos.store(nanos, Ordering::Relaxed);
    }

    /// How long a push waits for the next rank to start: `ARRIVAL_GRACE`,
    /// or half the time the last push took to receive if longer (a large
    /// push takes its worker longer to start sending); before any push was
    /// timed (the first round, when workers connect), `turn_patience`.
    fn turn_grace(&self) -> std::time::Duration {
        match self.read_nanos.load(Ordering::Relaxed) {
            0 => self.turn_patience(),
            last => ARRIVAL_GRACE
                .max(std::time::Duration::from_nanos(last) / 2)
                .min(self.turn_patience()),
        }
    }

    /// How long a push waits for its turn without the push before it
    /// progressing: a quarter of the worker timeout, at most a second.
    fn turn_patience(&self) -> std::time::Duration {
        (self.config.worker_timeout / 4).min(std::time::Duration::from_secs(1))
    }

    /// Records worker `worker`'s push for `round`, received whole. The
    /// round's first push starts the task that learns its members and
    /// completes it, so that a client going away cannot abandon it.
    pub fn push(
        self: &Arc<Self>,
        worker: u32,
        round: u64,
        push: Staged,
    ) -> Result<(Admission, u32)> {
        self.check_serving()?;
        let bytes = push.bytes;
        let mut c = self.collect.lock();
        if self.admit_locked(&c, worker, round)? == Admission::Duplicate {
            self.metrics.duplicates.increment(1);
            return Ok((Admission::Duplicate, c.count));
        }
        c.pushed[worker as usize] = true;
        c.pushes[worker as usize] = Some(push);
        c.count += 1;
        c.opened.get_or_insert_with(Instant::now);
        let count = c.count;
        self.metrics.pushes.increment(1);
        self.metrics.push_bytes.increment(bytes as u64);
        self.metrics.workers_pushed.set(f64::from(count));
        drop(c);
        self.arrivals.send_modify(|n| *n += 1);
        // Higher ranks waiting for this push may be read now.
        self.spare.notify();
        if count == 1 {
            // The round's driver: the coordinator chooses the round's
            // members once it may, then the round is completed.
            tokio::spawn(Arc::clone(self).drive(round));
        }
        Ok((Admission::Accept, count))
    }

    /// Where every chunk lives.
    pub fn layout(&self) -> pb::LayoutResponse {
        pb::LayoutResponse {
            shards: self.cluster.urls.clone(),
            chunk_elems: self.layout.chunk_elems as u64,
            params: self
                .config
                .params
                .iter()
                .map(|p| pb::ParamSpec {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                })
                .collect(),
            owners: self.owners.clone(),
        }
    }

    /// This shard's part of the job, for the cluster's status.
    pub fn shard_info(&self) -> pb::ShardInfo {
        let s = self.status();
        pb::ShardInfo {
            index: self.cluster.shard as u32,
            address: self.cluster.address(self.cluster.shard),
            up: true,
            chunks: self.own.chunks.len() as u64,
            parameter_bytes: s.parameter_bytes as u64,
            optimizer_state_bytes: s.state_bytes as u64,
            round: s.round,
            error: self.problem().unwrap_or_default(),
        }
    }

    /// The slot a push of `worker` holds while it is read; `worker` was
    /// admitted, so it is in range.
    pub fn push_slot(&self, worker: u32) -> &tokio::sync::Semaphore {
        &self.push_slots[worker as usize]
    }

    /// Round, step and sizes of the job.
    pub fn status(&self) -> JobStatus {
        let (workers_pushed, waiting_for) = {
            let c = self.collect.lock();
            let waiting = if c.count > 0 {
                (0..c.pushed.len() as u32)
                    .filter(|&w| !c.pushed[w as usize])
                    .take(WAITING_SHOWN)
                    .collect()
            } else {
                Vec::new()
            };
            (c.count, waiting)
        };
        let store = self.store.read();
        JobStatus {
            round: store.round,
            step: store.last.as_ref().map_or(0, |d| d.step),
            workers_pushed,
            rounds_skipped: store.skipped,
            last: store.last.clone(),
            parameter_bytes: store.chunks.iter().map(|c| c.values.len() * 4).sum(),
            state_bytes: store.chunks.iter().map(ChunkState::state_bytes).sum(),
            waiting_for,
        }
    }

    /// Marks the job deleted and wakes every pull waiting on it.
    pub fn close(&self) {
        self.deleted.store(true, Ordering::Release);
        self.completed.send_modify(|_| {});
    }

    /// The round workers push next.
    pub fn round(&self) -> u64 {
        *self.completed.borrow()
    }
}

#[cfg(test)]
mod tests;
