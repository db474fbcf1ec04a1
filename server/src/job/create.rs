//! Making a job's part on a shard: from its initial values, or from the
//! checkpoint that last saved it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use paramd_proto::v1 as pb;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::checkpoint::Loaded;
use crate::chunk::ChunkState;
use crate::cluster::Cluster;
use crate::coordinator::{Coordinator, Membership, MembershipRecord, Policy};
use crate::error::Result;
use crate::invalid;
use crate::layout::Layout;
use crate::metrics::JobMetrics;
use crate::pieces::{Accumulator, Ownership, Spare};
use crate::spec::JobConfig;

use super::history::History;
use super::{Collect, Job, Store};
use crate::coordinator::Decision;

/// Where a job starts: from scratch, or where a checkpoint left it.
#[derive(Debug, Default)]
struct Resume {
    round: u64,
    step: u64,
    skipped: u64,
    last: Option<Decision>,
    restorable: Vec<u64>,
    membership: Option<MembershipRecord>,
}

fn check_owners(layout: &Layout, owners: &[u32], cluster: &Cluster) -> Result<()> {
    if owners.len() != layout.chunks.len() || owners.iter().any(|&o| o as usize >= cluster.size()) {
        return Err(invalid!(
            "layout.owners must name one of {} shards for each of {} chunks",
            cluster.size(),
            layout.chunks.len()
        ));
    }
    Ok(())
}

impl Job {
    /// Creates this shard's part of job `name`: the chunks `owners` gives
    /// it, with their initial `values` (in canonical order, from a
    /// `Filling`).
    pub fn create(
        name: String,
        spec: pb::JobSpec,
        config: JobConfig,
        layout: Layout,
        owners: Vec<u32>,
        cluster: Arc<Cluster>,
        values: Vec<Vec<f32>>,
    ) -> Result<Job> {
        check_owners(&layout, &owners, &cluster)?;
        let own = Ownership::of(&owners, cluster.shard as u32);
        if values.len() != own.chunks.len() {
            return Err(crate::error::Error::Internal(format!(
                "{} chunks of initial values for {} chunks",
                values.len(),
                own.chunks.len()
            )));
        }
        let chunks = own
            .chunks
            .iter()
            .zip(values)
            .map(|(&id, values)| {
                let chunk = &layout.chunks[id];
                ChunkState::new(values, &config.groups[config.params[chunk.param].group])
            })
            .collect();
        Ok(Job::assemble(
            name,
            spec,
            config,
            layout,
            owners,
            cluster,
            chunks,
            Resume::default(),
        ))
    }

    /// This shard's part of a job, as a checkpoint left it. `restorable`
    /// lists the rounds of the intact checkpoints here, newest first. On a
    /// cluster the job serves no worker until the shards agree on a round
    /// (see `Job::serve`).
    pub fn restore(cluster: Arc<Cluster>, loaded: Loaded, restorable: Vec<u64>) -> Result<Job> {
        let config = JobConfig::try_from(&loaded.spec)?;
        let elems = usize::try_from(loaded.layout.chunk_elems)
            .map_err(|_| invalid!("layout.chunk_elems is too large"))?;
        let layout = Layout::with_chunk_elems(&config.params, elems);
        let owners = loaded.layout.owners.clone();
        check_owners(&layout, &owners, &cluster)?;
        let resume = Resume {
            round: loaded.meta.round,
            step: loaded.meta.last.as_ref().map_or(0, |d| d.step),
            skipped: loaded.meta.skipped,
            last: loaded.meta.last,
            restorable,
            membership: loaded.meta.membership,
        };
        Ok(Job::assemble(
            loaded.meta.job,
            loaded.spec,
            config,
            layout,
            owners,
            cluster,
            loaded.chunks,
            resume,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        name: String,
        spec: pb::JobSpec,
        config: JobConfig,
        layout: Layout,
        owners: Vec<u32>,
        cluster: Arc<Cluster>,
        chunks: Vec<ChunkState>,
        resume: Resume,
    ) -> Job {
        let own = Ownership::of(&owners, cluster.shard as u32);
        let index = config.index();
        let lens: Vec<usize> = chunks.iter().map(|c| c.values.len()).collect();
        let grads = lens.iter().map(|&n| Accumulator::new(n)).collect();
        let policy = Policy {
            base_lrs: config.groups.iter().map(|g| g.lr()).collect(),
            schedule: config.schedule.clone(),
            clip: config.clip,
            workers: config.workers,
            backup_workers: config.backup_workers,
            worker_timeout: config.worker_timeout,
            elastic: config.elastic,
        };
        let metrics = JobMetrics::new(&name, config.groups.len(), config.elastic.is_some());
        let workers = config.workers as usize;
        let every = cluster.checkpoints.as_ref().map_or(0, |c| c.every);
        let cluster_size = cluster.size();
        let cluster_history = cluster.history_rounds;
        let membership = config
            .elastic
            .zip(metrics.membership.clone())
            .map(|(rules, m)| {
                let record = resume.membership.clone().unwrap_or_default();
                Membership::new(&name, rules, config.workers, &record, m)
            });
        let coordinator = (cluster.shard == 0).then(|| {
            Coordinator::new(
                policy,
                cluster.size(),
                resume.round,
                resume.step,
                metrics.shard_wait.clone(),
                membership,
            )
            .with_checkpoint_every(every)
        });
        Job {
            coordinator,
            cluster,
            owners,
            spec,
            store: RwLock::new(Store {
                chunks,
                round: resume.round,
                last: resume.last,
                skipped: resume.skipped,
            }),
            grads: Mutex::new(grads),
            spare: Spare::new(lens, config.workers as usize),
            received: 0.into(),
            read_nanos: 0.into(),
            collect: Mutex::new(Collect {
                round: resume.round,
                pushed: vec![false; workers],
                count: 0,
                pushes: (0..workers).map(|_| None).collect(),
                closed: false,
                opened: None,
                folded: 0,
                reading: vec![None; workers],
                load: None,
                weights: vec![1.0; workers],
                leases: vec![0; workers],
            }),
            completed: watch::channel(resume.round).0,
            arrivals: watch::channel(0).0,
            deleted: AtomicBool::new(false),
            push_slots: (0..workers)
                .map(|_| tokio::sync::Semaphore::new(1))
                .collect(),
            on_hold: Mutex::new(
                (!resume.restorable.is_empty() && cluster_size > 1).then(|| {
                    format!(
                        "job '{name}' was restored at round {} and waits until every shard agrees on a round all of them can restore",
                        resume.round
                    )
                }),
            ),
            trouble: Mutex::new(None),
            committed: watch::channel((!resume.restorable.is_empty()).then_some(resume.round)).0,
            draining: AtomicBool::new(false),
            checkpointing: tokio::sync::Mutex::new(()),
            loading: tokio::sync::Mutex::new(()),
            history: Mutex::new(History::new(cluster_history, config.groups.len())),
            restorable: Mutex::new(resume.restorable),
            name,
            config,
            layout,
            own,
            index,
            metrics,
        }
    }

    /// Sets the job's gauges from its state. Called once the job is the
    /// one held under its name.
    pub fn publish(&self) {
        let status = self.status();
        let m = &self.metrics;
        m.workers_expected.set(f64::from(self.config.workers));
        m.parameter_bytes.set(status.parameter_bytes as f64);
        m.state_bytes.set(status.state_bytes as f64);
        m.chunks.set(self.own.chunks.len() as f64);
        m.round.set(status.round as f64);
        m.step.set(status.step as f64);
    }
}
