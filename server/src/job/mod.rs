//! One job on one shard: its chunks, the round being collected, and the
//! completion of a round (members chosen by the coordinator, reduce, report
//! to the coordinator, apply).

mod admit;
mod checkpointing;
mod create;
pub mod history;
mod load;
mod members;
mod pull;
mod round;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use paramd_proto::v1 as pb;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

pub use self::admit::{Admission, Admitted, Reading, Receiving};
use self::history::History;
pub use self::load::{LoadReceiver, StagedLoad};
use crate::chunk::ChunkState;
use crate::cluster::Cluster;
use crate::coordinator::{Coordinator, Decision, Lease};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::metrics::JobMetrics;
use crate::pieces::{Accumulator, Ownership, Spare, Staged};
use crate::spec::JobConfig;

/// A round closed with its members: the first `folded` ranks are summed
/// into the accumulator already, `rest` are the other members' pushes in
/// rank order.
#[derive(Debug)]
pub struct Closed {
    folded: usize,
    rest: Vec<Staged>,
    /// What the members' sum is divided by: their number, or the sum of
    /// their weights in rank order.
    divisor: f32,
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
    /// An elastic job's current members (on its coordinator).
    pub members: Vec<(u32, Lease)>,
}

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
    /// A state load received whole for `round` (see `load.rs`).
    load: Option<StagedLoad>,
    /// Each worker's weight in the round's merge (1 for a mean).
    weights: Vec<f32>,
    /// The lease each worker's push of the round came with (elastic jobs).
    leases: Vec<u64>,
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
    /// Held while a state load is received: one at a time.
    loading: tokio::sync::Mutex<()>,
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

    /// This job's coordinator: refused `WrongShard` on any shard but 0.
    pub(super) fn coordinator(&self) -> Result<&Coordinator> {
        self.coordinator.as_ref().ok_or_else(|| {
            Error::WrongShard(format!(
                "shard {} is not the coordinator of job '{}'",
                self.cluster.shard, self.name
            ))
        })
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

    /// Round, step and sizes of the job.
    pub fn status(&self) -> JobStatus {
        let members = self
            .coordinator
            .as_ref()
            .and_then(Coordinator::membership)
            .map(|(m, _)| m)
            .unwrap_or_default();
        let (workers_pushed, waiting_for) = {
            let c = self.collect.lock();
            // An elastic job waits for its members only.
            let expected =
                |w: u32| self.config.elastic.is_none() || members.iter().any(|&(m, _)| m == w);
            let waiting = if c.count > 0 {
                (0..c.pushed.len() as u32)
                    .filter(|&w| !c.pushed[w as usize] && expected(w))
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
            members,
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
