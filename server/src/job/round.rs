//! The round driver of a job on one shard: from a round's first push to
//! its end (members, reduce, report, decide, apply, record), and what it
//! does when the coordinator cannot be reached or a round cannot go on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::{Closed, Job, StagedLoad, history};
use crate::clip::sum_squares;
use crate::compute;
use crate::coordinator::{Decision, Report};
use crate::error::{Error, Result};
use crate::pieces::{Staged, divide, fold_into};

impl Job {
    /// Runs round `round` on this shard from its first push to its end:
    /// members, reduce, report, decide, apply, record. Failures a retry can
    /// cure (a coordinator that refuses or cannot be reached) are retried
    /// with backoff and shown meanwhile (`trouble`, Status, the pull's
    /// error, `paramd_round_failures_total`). One that cannot be cured (a
    /// broken invariant, a panic) holds the job with its reason, so that
    /// pushes and pulls fail at once naming it instead of timing out.
    pub(super) async fn drive(self: Arc<Self>, round: u64) {
        let job = Arc::clone(&self);
        // Its own task, so that a panic anywhere in it is caught here.
        let why = match tokio::spawn(job.run_round(round)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the task running it panicked: {e}"),
        };
        if self.deleted.load(Ordering::Acquire) {
            return;
        }
        self.metrics.round_failures.increment(1);
        tracing::error!(job = %self.name, round, shard = self.cluster.shard, error = %why, "round failed; the job is held");
        self.hold(format!(
            "job '{}' is held on shard {}: round {round} failed: {why}; restart the shard to \
             restore the job from its last checkpoint",
            self.name, self.cluster.shard
        ));
        // Pulls waiting for the round end now, with the reason.
        self.completed.send_modify(|_| {});
    }

    async fn run_round(self: Arc<Self>, round: u64) -> Result<()> {
        match Arc::clone(&self).gather(round).await? {
            Some(closed) => self.complete(round, closed).await,
            None => Ok(()),
        }
    }

    /// After a call to the coordinator failed while `doing` something for
    /// the round: logs it, shows it as the job's trouble and waits
    /// `backoff` (doubled for the next time, up to 2 s) before the caller
    /// tries again.
    pub(super) async fn pause_after(&self, doing: &str, e: &Error, backoff: &mut Duration) {
        if e.retryable() {
            tracing::warn!(job = %self.name, error = %e, "{doing}: cannot reach the coordinator; trying again");
        } else {
            tracing::error!(job = %self.name, error = %e, "{doing}: the coordinator refused; trying again");
        }
        self.trouble(Some(format!("{doing}: {e}")));
        // Pacing the retries of a peer that is unreachable or refuses, not
        // waiting for an event.
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_secs(2));
    }

    /// Shows (or clears, with `None`) why this shard's round does not
    /// progress; each failure is counted.
    fn trouble(&self, why: Option<String>) {
        if why.is_some() {
            self.metrics.round_failures.increment(1);
        }
        *self.trouble.lock() = why;
    }

    #[tracing::instrument(name = "round", skip_all, fields(job = %self.name, round = round, shard = self.cluster.shard))]
    async fn complete(self: Arc<Self>, round: u64, closed: Closed) -> Result<()> {
        let started = Instant::now();
        let job = Arc::clone(&self);
        let mut report =
            compute::run(move || job.reduce(closed.folded, closed.rest, closed.divisor)).await?;
        // The round is closed: a load staged for it is settled.
        let load = self.take_load(round);
        report.load = load.as_ref().map(|l| l.ticket);
        let Some(decision) = self.decide(round, report).await else {
            // Deleted meanwhile.
            return Ok(());
        };
        self.trouble(None);
        let load = match (decision.loaded_state, load) {
            (0, None) => None,
            (0, Some(l)) => {
                tracing::warn!(job = %self.name, round, id = l.ticket.id, "state load not applied: not every shard held it whole");
                None
            }
            (id, Some(l)) if l.ticket.id == id => Some(l),
            (id, _) => {
                return Err(Error::Internal(format!(
                    "the coordinator applied state load {id} in round {round}, which this shard does not hold"
                )));
            }
        };
        let job = Arc::clone(&self);
        let d = decision.clone();
        compute::run(move || job.apply(d, load)).await?;
        {
            let mut c = self.collect.lock();
            c.round = round + 1;
            c.pushed.iter_mut().for_each(|p| *p = false);
            c.pushes.iter_mut().for_each(|p| *p = None);
            c.count = 0;
            c.closed = false;
            c.folded = 0;
        }
        // Pushes held back for their turn in the round just completed are
        // stale now: refuse them without reading.
        self.spare.notify();
        self.completed.send_replace(round + 1);
        self.record(&decision, started.elapsed());
        let every = self.cluster.checkpoints.as_ref().map_or(0, |c| c.every);
        if self.coordinator.is_some() && every > 0 && (round + 1).is_multiple_of(every) {
            // The coordinator froze after deciding this round; the
            // checkpoint unfreezes it.
            let job = Arc::clone(&self);
            tokio::spawn(async move {
                let _ = job.checkpoint(Some(round + 1)).await;
            });
        }
        Ok(())
    }

    /// Reports a round to the coordinator (in-process on shard 0, over gRPC
    /// elsewhere) until it answers with the decision, or the job is
    /// deleted (none). A coordinator or shard that is down or refuses
    /// delays the round, shown as `trouble`; it never decides without every
    /// shard.
    async fn decide(&self, round: u64, report: Report) -> Option<Decision> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.deleted.load(Ordering::Acquire) {
                return None;
            }
            let answer = match &self.coordinator {
                Some(c) => {
                    c.report(
                        round,
                        self.cluster.shard,
                        report.clone(),
                        self.cluster.round_timeout,
                    )
                    .await
                }
                None => self.cluster.report(&self.name, round, &report).await,
            };
            match answer {
                Ok(d) => return Some(d),
                Err(e) => {
                    let doing = format!("reporting round {round} to the coordinator");
                    self.pause_after(&doing, &e, &mut backoff).await;
                }
            }
        }
    }

    /// The coordinator's answer to shard `shard`'s report of `round`.
    pub async fn coordinate(&self, round: u64, shard: usize, report: Report) -> Result<Decision> {
        let c = self.coordinator()?;
        c.report(round, shard, report, self.cluster.round_timeout)
            .await
    }

    /// Averages every chunk's pushes in rank order and reports the sums of
    /// squares. Runs on the compute pool.
    fn reduce(&self, mut folded: usize, mut rest: Vec<Staged>, divisor: f32) -> Report {
        let mut grads = self.grads.lock();
        // The next push may have been summed as it streamed, and not folded
        // yet when the round closed: its buffers are the accumulators.
        if rest.first().is_some_and(Staged::summed) {
            rest.remove(0).fold_all(&mut grads, false);
            folded += 1;
        }
        let sums: Vec<(usize, f64, bool)> = grads
            .par_iter_mut()
            .enumerate()
            .map(|(local, acc)| {
                // The members' sum in rank order: the first `folded` are in
                // `acc` already, then the rest.
                for (i, push) in rest.iter().enumerate() {
                    fold_into(push.chunk(local), acc, folded + i == 0);
                }
                divide(acc, divisor);
                let (sum, non_finite) = sum_squares(&acc.sum);
                (self.own.chunks[local], sum, non_finite)
            })
            .collect();
        Report {
            non_finite: sums.iter().any(|s| s.2),
            sums: sums.into_iter().map(|(id, s, _)| (id, s)).collect(),
            load: None,
        }
    }

    /// Applies a decision to every chunk, after the state load it applies
    /// if any, and moves the store to the next round, under the store's
    /// write lock. Runs on the compute pool.
    fn apply(&self, d: Decision, load: Option<StagedLoad>) {
        let grads = self.grads.lock();
        let mut store = self.store.write();
        if let Some(load) = load {
            for (chunk, (state, step)) in store.chunks.iter_mut().zip(load.chunks) {
                chunk.state = state;
                chunk.step = step;
            }
            tracing::info!(job = %self.name, round = d.round, id = load.ticket.id, step = load.ticket.step, "state loaded");
        }
        if !d.skipped {
            store
                .chunks
                .par_iter_mut()
                .zip(grads.par_iter())
                .zip(self.own.chunks.par_iter())
                .filter(|((_, grad), _)| grad.has_gradient())
                .for_each(|((chunk, grad), &id)| {
                    let group = self.config.params[self.layout.chunks[id].param].group;
                    chunk.apply(
                        &self.config.groups[group],
                        d.lr[group],
                        d.clip_coefficient,
                        &grad.sum,
                    );
                });
        } else {
            store.skipped += 1;
        }
        store.round = d.round + 1;
        store.last = Some(d);
    }

    /// The rounds of the history from `since` on (one in `every`, and the
    /// newest), oldest first.
    pub fn history(&self, since: u64, every: usize) -> Vec<history::Entry> {
        self.history.lock().since(since, every)
    }

    fn record(&self, d: &Decision, took: Duration) {
        self.history.lock().record(d);
        // A deleted job's series may already be a re-created job's.
        if self.deleted.load(Ordering::Acquire) {
            return;
        }
        let m = &self.metrics;
        m.apply_duration.record(took.as_secs_f64());
        m.round.set((d.round + 1) as f64);
        m.workers_pushed.set(0.0);
        m.participants.set(f64::from(d.participants));
        m.rounds.increment(1);
        m.grad_norm.set(f64::from(d.grad_norm));
        // What the update used: zero for a skipped round.
        let applied = if d.skipped {
            0.0
        } else {
            f64::from(d.grad_norm) * f64::from(d.clip_coefficient)
        };
        m.grad_norm_clipped.set(applied);
        m.clip_coefficient.set(f64::from(d.clip_coefficient));
        m.step.set(d.step as f64);
        for (g, lr) in m.lr.iter().zip(&d.lr) {
            g.set(*lr);
        }
        if d.skipped {
            m.skipped.increment(1);
            tracing::warn!(job = %self.name, round = d.round, grad_norm = d.grad_norm, "round skipped: gradient not finite");
        } else {
            tracing::debug!(job = %self.name, round = d.round, step = d.step, grad_norm = d.grad_norm, coef = d.clip_coefficient, "round applied");
        }
    }
}
