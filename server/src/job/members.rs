//! The members of a round: the shard reports to the coordinator which
//! workers' pushes it holds whole until the coordinator has chosen the
//! round's workers; the round's driver then completes it with exactly
//! those.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::coordinator::{Lease, Members};
use crate::error::{Error, Result};
use crate::spec::Merge;

use crate::compute;

use super::{Closed, Job};

impl Job {
    /// Reports the workers this shard holds whole pushes of for `round`
    /// until the coordinator has chosen the round's members, reporting
    /// again as more pushes arrive (and summing them meanwhile where it
    /// may, see `fold_ready`); then closes the round with its members. None: the round is no longer this
    /// shard's to complete (the job was deleted or reset). Refusals are
    /// retried with backoff and shown as the job's trouble; only a broken
    /// invariant is an error.
    pub(super) async fn gather(self: Arc<Self>, round: u64) -> Result<Option<Closed>> {
        let mut arrivals = self.arrivals.subscribe();
        let mut backoff = Duration::from_millis(50);
        loop {
            arrivals.borrow_and_update();
            self.fold_ready(round).await?;
            let held: Vec<(u32, u64)> = {
                let c = self.collect.lock();
                if c.round != round || c.closed || self.deleted.load(Ordering::Acquire) {
                    return Ok(None);
                }
                (0..c.pushed.len() as u32)
                    .filter(|&w| c.pushed[w as usize])
                    .map(|w| (w, c.leases[w as usize]))
                    .collect()
            };
            let answer = tokio::select! {
                a = self.ask_members(round, &held) => a,
                more = arrivals.changed() => match more {
                    Ok(()) => continue,
                    Err(_) => return Ok(None),
                },
            };
            match answer {
                Ok(m) => return self.close_round(&m),
                Err(e) if self.deleted.load(Ordering::Acquire) => {
                    tracing::debug!(job = %self.name, round, error = %e, "job deleted while its round was collected");
                    return Ok(None);
                }
                Err(e) if e.timed_out() => {
                    // The call waited as long as it could: ask again now.
                    tracing::debug!(job = %self.name, round, error = %e, "members not chosen yet; reporting again");
                }
                Err(e) => {
                    let doing =
                        format!("learning the workers of round {round} from the coordinator");
                    self.pause_after(&doing, &e, &mut backoff).await;
                }
            }
        }
    }

    async fn ask_members(&self, round: u64, held: &[(u32, u64)]) -> Result<Members> {
        match &self.coordinator {
            Some(c) => {
                c.members(round, self.cluster.shard, held, self.cluster.round_timeout)
                    .await
            }
            None => self.cluster.members(&self.name, round, held).await,
        }
    }

    /// The coordinator's answer to shard `shard`'s report of the workers it
    /// holds for `round`.
    pub async fn coordinate_members(
        &self,
        round: u64,
        shard: usize,
        held: &[(u32, u64)],
    ) -> Result<Members> {
        let c = self.coordinator()?;
        c.members(round, shard, held, self.cluster.round_timeout)
            .await
    }

    /// Makes a new member of this elastic job (on its coordinator): worker
    /// id, lease, and the round it pushes next.
    pub fn join(&self) -> Result<(u32, Lease, u64)> {
        let r = self.coordinator()?.join(&self.name);
        if let Err(e) = &r {
            tracing::debug!(job = %self.name, error = %e, "join refused");
        }
        r
    }

    /// Renews a member's lease; the round being collected.
    pub fn heartbeat(&self, worker: u32, lease: u64) -> Result<u64> {
        self.coordinator()?.heartbeat(&self.name, worker, lease)
    }

    /// Ends the memberships of this elastic job whose lease ran out (on its
    /// coordinator; nothing elsewhere).
    pub fn expire_leases(&self) {
        if let Some(c) = &self.coordinator {
            c.expire_leases();
        }
    }

    /// Ends a membership.
    pub fn leave(&self, worker: u32, lease: u64) -> Result<()> {
        self.coordinator()?.leave(&self.name, worker, lease)
    }

    /// On a one-shard job, sums the pushes of the next ranks into the
    /// accumulator as soon as every lower rank's is in, in rank order, and
    /// drops them: the round then holds one accumulator and the pushes
    /// still out of order, not every worker's push. This is exact because
    /// the coordinator chooses as members every worker the shard holds a
    /// push of, so a summed push is always a member's. On a cluster a
    /// worker held by one shard may miss another's and be dropped, so
    /// pushes are held whole until the members are chosen.
    async fn fold_ready(self: &Arc<Self>, round: u64) -> Result<()> {
        if self.cluster.size() != 1 {
            return Ok(());
        }
        loop {
            let (rank, mut push) = {
                let mut c = self.collect.lock();
                let rank = c.folded as usize;
                if c.round != round || c.closed || rank >= c.pushes.len() {
                    return Ok(());
                }
                match c.pushes[rank].take() {
                    Some(p) => (rank, p),
                    None => return Ok(()),
                }
            };
            let job = Arc::clone(self);
            compute::run(move || push.fold_all(&mut job.grads.lock(), rank == 0)).await?;
            self.collect.lock().folded += 1;
            // The next rank's push may be read now.
            self.spare.notify();
        }
    }

    /// Closes the round with the members the coordinator chose (none if the
    /// round is no longer open). Pushes this shard holds from anyone else
    /// are dropped: a retry of theirs is stale.
    fn close_round(&self, m: &Members) -> Result<Option<Closed>> {
        let mut c = self.collect.lock();
        if c.round != m.round || c.closed {
            return Ok(None);
        }
        let folded = c.folded as usize;
        let mut member = vec![false; c.pushed.len()];
        for &w in &m.workers {
            if let Some(x) = member.get_mut(w as usize) {
                *x = true;
            }
        }
        if let Some(w) = (0..folded).find(|&w| !member[w]) {
            return Err(Error::Internal(format!(
                "the coordinator left out worker {w} of round {}, whose push this shard has summed already",
                m.round
            )));
        }
        if let Some(w) = (folded..member.len()).find(|&w| member[w] && c.pushes[w].is_none()) {
            // A shard reports only the pushes it holds, so this is a
            // coordinator out of step with this shard.
            return Err(Error::Internal(format!(
                "the coordinator chose worker {w} for round {}, whose push this shard does not hold",
                m.round
            )));
        }
        if let Some(opened) = c.opened.take() {
            self.metrics
                .barrier_wait
                .record(opened.elapsed().as_secs_f64());
        }
        // Rank order, whatever the arrival order: the mean is deterministic.
        let mut rest = Vec::with_capacity(m.workers.len());
        for (w, &is_member) in member.iter().enumerate().skip(folded) {
            let push = c.pushes[w].take();
            if is_member {
                rest.extend(push);
            } else {
                c.pushed[w] = false;
            }
        }
        c.closed = true;
        c.count = (folded + rest.len()) as u32;
        let divisor = match self.config.merge {
            Merge::Mean => c.count as f32,
            // Summed in rank order, as the weighted pushes are.
            Merge::Weighted => member
                .iter()
                .zip(&c.weights)
                .filter(|(m, _)| **m)
                .fold(0.0f32, |sum, (_, w)| sum + w),
        };
        // Pushes waiting for their turn are not members: refuse them now.
        self.spare.notify();
        if !m.dropped.is_empty() && self.coordinator.is_some() {
            self.metrics.dropped.increment(m.dropped.len() as u64);
            tracing::warn!(job = %self.name, round = m.round, dropped = ?m.dropped, timeout_secs = self.config.worker_timeout.as_secs_f64(), "workers dropped from the round");
        }
        Ok(Some(Closed {
            folded,
            rest,
            divisor,
        }))
    }
}
