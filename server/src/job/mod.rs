//! One job on one shard: its chunks, the round being collected, and the
//! completion of a round (members chosen by the coordinator, reduce, report
//! to the coordinator, apply).

mod checkpointing;
mod create;
pub mod history;
mod members;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use paramd_proto::v1 as pb;
use paramd_proto::v1::Segment;
use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use tokio::sync::watch;

use self::history::History;
use crate::clip::sum_squares;
use crate::cluster::Cluster;
use crate::compute;
use crate::coordinator::{Coordinator, Decision, Report};
use crate::error::{Error, Result};
use crate::invalid;
use crate::layout::Layout;
use crate::metrics::JobMetrics;
use crate::pieces::{Accumulator, Ownership, Pieces, Target, divide, fold_into};
use crate::spec::{JobConfig, NonFinite};
use crate::store::ChunkState;

/// The outcome of a completed round, as Status and Pull report it.
pub type Outcome = Decision;

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
    rest: Vec<Pieces>,
}

/// A snapshot of a job for Status.
#[derive(Debug)]
pub struct JobStatus {
    pub round: u64,
    pub step: u64,
    pub workers_pushed: u32,
    pub rounds_skipped: u64,
    pub last: Option<Outcome>,
    pub parameter_bytes: usize,
    pub state_bytes: usize,
}

/// A pull about to be sent.
#[derive(Debug)]
pub struct Snapshot {
    pub round: u64,
    pub last: Option<Outcome>,
    /// Local indices of the chunks to send.
    pub chunks: Vec<usize>,
}

/// Values and state of the chunks, with the round they reflect, behind one
/// lock so that a pull never sees a half-applied round.
struct Store {
    chunks: Vec<ChunkState>,
    round: u64,
    last: Option<Outcome>,
    skipped: u64,
}

/// The round being collected.
struct Collect {
    round: u64,
    pushed: Vec<bool>,
    count: u32,
    pushes: Vec<Option<Pieces>>,
    /// The round has its contributors and is being completed: a push from
    /// anyone else is too late.
    closed: bool,
    /// When the round's first push arrived: the start of its barrier.
    opened: Option<Instant>,
    /// Workers of ranks `0..folded` are already summed into the
    /// accumulator, their pushes dropped (see `Job::fold_ready`).
    folded: u32,
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
    held: Mutex<Option<String>>,
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
        match self.held.lock().as_ref() {
            None => Ok(()),
            Some(why) => Err(Error::Unavailable(why.clone())),
        }
    }

    /// Why the job does not progress on this shard, if it does not: held,
    /// or its round's driver failing.
    pub fn problem(&self) -> Option<String> {
        self.held
            .lock()
            .clone()
            .or_else(|| self.trouble.lock().clone())
    }

    /// Serves workers (the shards agree on the job's round).
    pub fn serve(&self) {
        *self.held.lock() = None;
    }

    /// Stops serving workers, for `why`.
    pub fn hold(&self, why: String) {
        *self.held.lock() = Some(why);
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

    /// Validates and records worker `worker`'s gradients for `round`. The
    /// round's first push starts the task that learns its members and
    /// completes it, so that a client going away cannot abandon it.
    pub fn push(
        self: &Arc<Self>,
        worker: u32,
        round: u64,
        grads: Vec<Segment>,
        no_grad: &[String],
    ) -> Result<(Admission, u32)> {
        let target = Target {
            params: &self.config.params,
            index: &self.index,
            layout: &self.layout,
            own: &self.own,
            finite_only: self.config.non_finite == NonFinite::Error,
        };
        self.check_serving()?;
        let pieces = target.split(grads, no_grad)?;
        let bytes = pieces.bytes;
        let mut c = self.collect.lock();
        if self.admit_locked(&c, worker, round)? == Admission::Duplicate {
            self.metrics.duplicates.increment(1);
            return Ok((Admission::Duplicate, c.count));
        }
        c.pushed[worker as usize] = true;
        c.pushes[worker as usize] = Some(pieces);
        c.count += 1;
        c.opened.get_or_insert_with(Instant::now);
        let count = c.count;
        self.metrics.pushes.increment(1);
        self.metrics.push_bytes.increment(bytes as u64);
        self.metrics.workers_pushed.set(f64::from(count));
        drop(c);
        self.arrivals.send_modify(|n| *n += 1);
        if count == 1 {
            // The round's driver: the coordinator chooses the round's
            // members once it may, then the round is completed.
            tokio::spawn(Arc::clone(self).drive(round));
        }
        Ok((Admission::Accept, count))
    }

    /// Runs round `round` on this shard from its first push to its end:
    /// members, reduce, report, decide, apply, record. Failures a retry can
    /// cure (a coordinator that refuses or cannot be reached) are retried
    /// with backoff and shown meanwhile (`trouble`, Status, the pull's
    /// error, `paramd_round_failures_total`). One that cannot be cured (a
    /// broken invariant, a panic) holds the job with its reason, so that
    /// pushes and pulls fail at once naming it instead of timing out.
    async fn drive(self: Arc<Self>, round: u64) {
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
    async fn pause_after(&self, doing: &str, e: &Error, backoff: &mut Duration) {
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
        let report = compute::run(move || job.reduce(closed.folded, &closed.rest)).await?;
        let Some(decision) = self.decide(round, report).await else {
            // Deleted meanwhile.
            return Ok(());
        };
        self.trouble(None);
        let job = Arc::clone(&self);
        let d = decision.clone();
        compute::run(move || job.apply(d)).await?;
        {
            let mut c = self.collect.lock();
            c.round = round + 1;
            c.pushed.iter_mut().for_each(|p| *p = false);
            c.pushes.iter_mut().for_each(|p| *p = None);
            c.count = 0;
            c.closed = false;
            c.folded = 0;
        }
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
        let c = self.coordinator.as_ref().ok_or_else(|| {
            Error::WrongShard(format!(
                "shard {} is not the coordinator of job '{}'",
                self.cluster.shard, self.name
            ))
        })?;
        c.report(round, shard, report, self.cluster.round_timeout)
            .await
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

    /// Averages every chunk's pushes in rank order and reports the sums of
    /// squares. Runs on the compute pool.
    fn reduce(&self, folded: usize, rest: &[Pieces]) -> Report {
        let mut grads = self.grads.lock();
        let n = folded + rest.len();
        let sums: Vec<(usize, f64, bool)> = grads
            .par_iter_mut()
            .enumerate()
            .map(|(local, acc)| {
                // The members' sum in rank order: the first `folded` are in
                // `acc` already, then the rest.
                for (i, push) in rest.iter().enumerate() {
                    fold_into(&push.by_chunk[local], acc, folded + i == 0);
                }
                divide(acc, n);
                let (sum, non_finite) = sum_squares(&acc.sum);
                (self.own.chunks[local], sum, non_finite)
            })
            .collect();
        Report {
            non_finite: sums.iter().any(|s| s.2),
            sums: sums.into_iter().map(|(id, s, _)| (id, s)).collect(),
        }
    }

    /// Applies a decision to every chunk and moves the store to the next
    /// round, under the store's write lock. Runs on the compute pool.
    fn apply(&self, d: Decision) {
        let grads = self.grads.lock();
        let mut store = self.store.write();
        if !d.skip {
            store
                .chunks
                .par_iter_mut()
                .zip(grads.par_iter())
                .zip(self.own.chunks.par_iter())
                .filter(|((_, grad), _)| grad.has_gradient())
                .for_each(|((chunk, grad), &id)| {
                    let group = self.config.params[self.layout.chunks[id].param].group;
                    chunk.apply(&self.config.groups[group], d.lrs[group], d.coef, &grad.sum);
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
        m.rounds.increment(1);
        m.grad_norm.set(f64::from(d.grad_norm));
        // What the update used: zero for a skipped round.
        let applied = if d.skip {
            0.0
        } else {
            f64::from(d.grad_norm) * f64::from(d.coef)
        };
        m.grad_norm_clipped.set(applied);
        m.clip_coefficient.set(f64::from(d.coef));
        m.step.set(d.step as f64);
        for (g, lr) in m.lr.iter().zip(&d.lrs) {
            g.set(*lr);
        }
        if d.skip {
            m.skipped.increment(1);
            tracing::warn!(job = %self.name, round = d.round, grad_norm = d.grad_norm, "round skipped: gradient not finite");
        } else {
            tracing::debug!(job = %self.name, round = d.round, step = d.step, grad_norm = d.grad_norm, coef = d.coef, "round applied");
        }
    }

    /// The slot a push of `worker` holds while it is read; `worker` was
    /// admitted, so it is in range.
    pub fn push_slot(&self, worker: u32) -> &tokio::sync::Semaphore {
        &self.push_slots[worker as usize]
    }

    /// Waits until `round` rounds have completed, at most `wait`.
    pub async fn wait_round(&self, round: u64, wait: Duration) -> Result<()> {
        self.check_serving()?;
        let started = Instant::now();
        let mut rx = self.completed.subscribe();
        let ended = || self.deleted.load(Ordering::Acquire) || self.held.lock().is_some();
        let reached = |&r: &u64| r >= round || ended();
        let done = tokio::time::timeout(wait, rx.wait_for(reached)).await;
        if !self.deleted.load(Ordering::Acquire) {
            self.metrics
                .pull_wait
                .record(started.elapsed().as_secs_f64());
        }
        match done {
            Ok(Ok(_)) if !ended() => Ok(()),
            Ok(_) => Err(self.check_serving().err().unwrap_or_else(|| {
                Error::Unavailable(format!(
                    "job '{}' was reset while round {round} was awaited; pull again",
                    self.name
                ))
            })),
            Err(_) => {
                let c = self.collect.lock();
                let trouble = self
                    .trouble
                    .lock()
                    .as_ref()
                    .map(|t| format!("; this shard cannot complete it: {t}"))
                    .unwrap_or_default();
                Err(Error::Timeout(format!(
                    "job '{}': round {round} not reached after {:.1}s: collecting round {} with {} of {} workers pushed{trouble}",
                    self.name,
                    wait.as_secs_f64(),
                    c.round,
                    c.count,
                    self.config.workers
                )))
            }
        }
    }

    /// What a pull of the parameters named (all when empty) will send: the
    /// round they are at, its outcome, and the chunks. The values are read
    /// chunk by chunk with `read_chunk`, so a pull never copies the whole
    /// model at once.
    pub fn pull_plan(&self, names: &[String]) -> Result<Snapshot> {
        self.check_serving()?;
        let wanted: Option<Vec<bool>> = if names.is_empty() {
            None
        } else {
            let mut w = vec![false; self.config.params.len()];
            for n in names {
                let &i = self
                    .index
                    .get(n)
                    .ok_or_else(|| invalid!("unknown parameter '{n}'"))?;
                w[i] = true;
            }
            Some(w)
        };
        let chunks = (0..self.own.chunks.len())
            .filter(|&local| {
                let param = self.layout.chunks[self.own.chunks[local]].param;
                wanted.as_ref().is_none_or(|w| w[param])
            })
            .collect();
        let store = self.store.read();
        Ok(Snapshot {
            round: store.round,
            last: store.last.clone(),
            chunks,
        })
    }

    /// The values of local chunk `local` as of `round`. If a round was
    /// applied since the pull began, the pull is aborted rather than mixing
    /// two rounds.
    pub fn read_chunk(&self, local: usize, round: u64) -> Result<Segment> {
        let store = self.store.read();
        if store.round != round {
            return Err(Error::Aborted(format!(
                "job '{}' moved from round {round} to {} while it was being pulled; pull again",
                self.name, store.round
            )));
        }
        let meta = &self.layout.chunks[self.own.chunks[local]];
        let data = store.chunks[local].values.to_le_bytes();
        drop(store);
        self.metrics.pull_bytes.increment(data.len() as u64);
        Ok(Segment {
            param: self.config.params[meta.param].name.clone(),
            offset: meta.offset as u64,
            data,
        })
    }

    /// Round, step and sizes of the job.
    pub fn status(&self) -> JobStatus {
        let workers_pushed = self.collect.lock().count;
        let store = self.store.read();
        JobStatus {
            round: store.round,
            step: store.last.as_ref().map_or(0, |d| d.step),
            workers_pushed,
            rounds_skipped: store.skipped,
            last: store.last.clone(),
            parameter_bytes: store.chunks.iter().map(|c| c.values.len() * 4).sum(),
            state_bytes: store.chunks.iter().map(ChunkState::state_bytes).sum(),
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
