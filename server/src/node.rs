//! The jobs of one paramd process, and the cluster-wide operations the
//! coordinator runs for them (create, status, delete on every shard).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use paramd_proto::transport::{Credentials, Http2Windows};
use paramd_proto::v1 as pb;
use tonic::transport::ServerTlsConfig;

use crate::checkpoint::{self, CheckpointSettings};
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::invalid;
use crate::job::Job;
use crate::layout::{DEFAULT_CHUNK_BYTES, Layout};
use crate::limits::{Admitted, Limits, Pending, job_bytes};
use crate::pieces::{Filled, Filling, pack};
use crate::spec::{JobConfig, validate_job_name};
use crate::token::AuthToken;

mod restore;

/// Payload bytes per message when the coordinator forwards initial values.
const FORWARD_MESSAGE_BYTES: usize = 4 << 20;

/// Settings of a node that jobs and the service rely on.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Largest chunk of a parameter, in bytes.
    pub chunk_bytes: usize,
    /// Largest gRPC message decoded or encoded, in bytes.
    pub max_message_bytes: usize,
    /// Longest a pull waits for its round when the call has no deadline.
    pub max_pull_wait: Duration,
    /// This shard's index in `cluster`.
    pub shard_index: usize,
    /// Every shard's URL as workers reach it; empty for a one-shard cluster.
    pub cluster: Vec<String>,
    /// Every shard's URL as the other shards reach it (its peer address).
    pub peers: Vec<String>,
    /// The token shards present to each other; none: the peer address
    /// takes any caller that reaches it (or only the peer CA's, with TLS).
    pub peer_token: Option<AuthToken>,
    /// TLS of the peer address: this server's identity, asking for a
    /// certificate of the peer CA; none: plaintext.
    pub peer_tls: Option<ServerTlsConfig>,
    /// Where checkpoints go and how often; none: no checkpoints.
    pub checkpoints: Option<CheckpointSettings>,
    /// Deadline of a call to another shard.
    pub peer_timeout: Duration,
    /// Longest the coordinator waits for every shard's report of a round.
    pub round_timeout: Duration,
    /// What this shard presents to the others: the cluster's token and TLS.
    pub peer_credentials: Credentials,
    /// Calls served at once on one client connection.
    pub max_concurrent_requests: usize,
    /// Connections open at once on each gRPC address.
    pub max_connections: usize,
    /// Rounds of history each job keeps for the status page (0: none).
    pub history_rounds: usize,
    /// The token every call must carry; none: no access control.
    pub auth_token: Option<AuthToken>,
    /// This server's TLS identity and client CA; none: plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// What jobs may declare.
    pub limits: Limits,
    /// The HTTP/2 windows of what this server receives (pushes; a peer's
    /// calls), also those of this shard's calls to the others.
    pub windows: Http2Windows,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_message_bytes: 64 << 20,
            max_pull_wait: Duration::from_secs(300),
            shard_index: 0,
            cluster: Vec::new(),
            peers: Vec::new(),
            peer_token: None,
            peer_tls: None,
            checkpoints: None,
            peer_timeout: Duration::from_secs(10),
            round_timeout: Duration::from_secs(60),
            peer_credentials: Credentials::none(),
            windows: Http2Windows::default(),
            max_concurrent_requests: 256,
            max_connections: 4096,
            history_rounds: 10_000,
            auth_token: None,
            tls: None,
            limits: Limits::default(),
        }
    }
}

impl NodeConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        if self.chunk_bytes < 4 {
            return Err(invalid!(
                "chunk_bytes must be at least 4, got {}",
                self.chunk_bytes
            ));
        }
        if self.max_message_bytes < 1 << 20 {
            return Err(invalid!(
                "max_message_bytes must be at least 1 MiB, got {}",
                self.max_message_bytes
            ));
        }
        // A pull sends at least one chunk per message.
        if self.chunk_bytes > self.max_message_bytes / 2 {
            return Err(invalid!(
                "chunk_bytes ({}) must be at most half of max_message_bytes ({})",
                self.chunk_bytes,
                self.max_message_bytes
            ));
        }
        for (name, d) in [
            ("peer_timeout", self.peer_timeout),
            ("round_timeout", self.round_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid!("{name} must be positive"));
            }
        }
        self.windows
            .check("http2_stream_window", "http2_connection_window")
            .map_err(crate::error::Error::Invalid)?;
        Cluster::check(self.shard_index, &self.cluster, &self.peers)
    }
}

/// Every job of this process, by name.
#[derive(Debug)]
pub struct Node {
    jobs: DashMap<String, Arc<Job>>,
    /// Jobs the coordinator is restoring from per-shard directories of a
    /// cluster of another shape, and why they do not serve yet.
    restoring: DashMap<String, String>,
    /// False while checkpoints are being restored.
    ready: AtomicBool,
    /// Jobs admitted and being created.
    pending: Pending,
    pub config: NodeConfig,
    pub cluster: Arc<Cluster>,
}

/// What Init did.
#[derive(Debug)]
pub struct Created {
    pub job: Arc<Job>,
    pub created: bool,
}

impl Node {
    /// A node with the jobs its checkpoints hold, if it has any.
    pub fn new(config: NodeConfig) -> Result<Node> {
        config.validate()?;
        let mut cluster = Cluster::new(
            config.shard_index,
            config.cluster.clone(),
            &config.peers,
            config.peer_timeout,
            config.round_timeout,
            &config.peer_credentials.clone().with_windows(config.windows),
        )?;
        cluster.checkpoints = config.checkpoints.clone();
        cluster.history_rounds = config.history_rounds;
        let node = Node {
            jobs: DashMap::new(),
            restoring: DashMap::new(),
            ready: AtomicBool::new(cluster.checkpoints.is_none()),
            pending: Pending::default(),
            cluster: Arc::new(cluster),
            config,
        };
        Ok(node)
    }

    /// Checks what a new job declares against the limits and reserves its
    /// place until the returned admission is dropped (once the job is
    /// created, or not), before anything of its size is read or allocated.
    pub fn admit(&self, config: &JobConfig) -> Result<Admitted<'_>> {
        let held = self
            .jobs
            .iter()
            .map(|j| job_bytes(&j.config).unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add);
        self.config
            .limits
            .admit(&self.pending, config, self.jobs.len(), held)
    }

    /// Whether the node serves calls: its checkpoints are restored.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Refuses calls until the checkpoints are restored.
    pub fn check_ready(&self) -> Result<()> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(Error::Unavailable(format!(
                "shard {} is restoring its checkpoints; try again shortly",
                self.cluster.shard
            )))
        }
    }

    /// Checkpoints job `name`, or every job, on every shard now.
    pub async fn checkpoint(&self, name: Option<&str>) -> Result<Vec<(String, u64)>> {
        self.coordinator_only("Checkpoint")?;
        let jobs = match name {
            Some(n) => vec![self.job(n)?],
            None => self.jobs(),
        };
        let mut out = Vec::new();
        for job in jobs {
            // On its own task: a client that cancels the call does not
            // interrupt a checkpoint between its shards' files and its
            // manifests.
            let name = job.name.clone();
            let round = tokio::spawn(async move { job.checkpoint(None).await })
                .await
                .map_err(|e| {
                    Error::Internal(format!("checkpoint of job '{name}' failed: {e}"))
                })??;
            out.push((name, round));
        }
        Ok(out)
    }

    /// At shutdown (SIGTERM), with checkpoints: every job stops taking
    /// pushes; the coordinator checkpoints every job at the last decided
    /// round and decides no more; the other shards keep serving the
    /// coordinator until it has committed a checkpoint of the round they
    /// hold, so that stopping every shard at once loses no applied round.
    /// Bounded by the caller's grace period.
    pub async fn final_checkpoint(&self) -> Result<usize> {
        let jobs = self.jobs();
        for job in &jobs {
            job.drain();
        }
        if self.cluster.shard == 0 {
            // Every job gets its checkpoint even if another's fails.
            let mut failure = None;
            for job in &jobs {
                if let Err(e) = job.final_checkpoint().await {
                    failure = failure.or(Some(e));
                }
            }
            return failure.map_or(Ok(jobs.len()), Err);
        }
        tracing::info!(
            jobs = jobs.len(),
            "waiting for the coordinator's final checkpoint"
        );
        // The caller bounds the whole wait; this deadline only keeps each
        // job's wait finite on its own.
        let deadline =
            tokio::time::Instant::now() + self.cluster.round_timeout + self.cluster.peer_timeout;
        for job in &jobs {
            if !job.wait_committed(deadline).await {
                return Err(Error::Timeout(format!(
                    "the coordinator committed no checkpoint of round {} of job '{}'",
                    job.round(),
                    job.name
                )));
            }
        }
        Ok(jobs.len())
    }

    /// The job named `name`.
    pub fn job(&self, name: &str) -> Result<Arc<Job>> {
        if let Some(j) = self.jobs.get(name) {
            return Ok(Arc::clone(j.value()));
        }
        match self.restoring.get(name) {
            Some(why) => Err(Error::Unavailable(why.clone())),
            None => Err(Error::NotFound(name.to_owned())),
        }
    }

    /// Every job, sorted by name.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let mut jobs: Vec<Arc<Job>> = self.jobs.iter().map(|j| Arc::clone(j.value())).collect();
        jobs.sort_by(|a, b| a.name.cmp(&b.name));
        jobs
    }

    fn coordinator_only(&self, what: &str) -> Result<()> {
        if self.cluster.shard == 0 {
            Ok(())
        } else {
            Err(Error::WrongShard(format!(
                "this is shard {}; {what} goes to the coordinator, shard 0 at {}",
                self.cluster.shard,
                self.cluster.address(0)
            )))
        }
    }

    /// The existing job `name` if its configuration is `config`, an error if
    /// it differs, `None` if there is no such job.
    pub fn existing(&self, name: &str, config: &JobConfig) -> Result<Option<Arc<Job>>> {
        validate_job_name(name)?;
        self.coordinator_only("Init")?;
        if let Some(why) = self.restoring.get(name) {
            return Err(Error::Unavailable(why.clone()));
        }
        match self.jobs.get(name) {
            None => Ok(None),
            Some(j) => {
                same_job(j.value(), config)?;
                j.value().check_serving()?;
                Ok(Some(Arc::clone(j.value())))
            }
        }
    }

    /// Where job `name`'s initial values are written as they arrive: its
    /// chunks placed on the shards, this shard's allocated, the others'
    /// gathered to be forwarded. Fed by the Init call, then given to
    /// `create`.
    pub fn begin_create(&self, name: &str, config: &JobConfig) -> Result<Filling> {
        validate_job_name(name)?;
        self.coordinator_only("Init")?;
        let shards = self.cluster.size();
        let layout = Layout::new(&config.params, self.config.chunk_bytes);
        let owners = layout.place(shards);
        Filling::new(config, layout, owners, 0, shards, true)
    }

    /// Creates job `name` on every shard from its initial values: hands
    /// each shard its chunks' values and creates this shard's part. If a
    /// shard cannot create its part, the parts made are dropped and the
    /// error names the shard.
    pub async fn create(
        &self,
        name: &str,
        spec: &pb::JobSpec,
        config: JobConfig,
        values: Filling,
    ) -> Result<Created> {
        let Filled {
            layout,
            owners,
            chunks,
            forward,
        } = values.finish()?;

        let layout_pb = pb::LayoutResponse {
            shards: self.cluster.urls.clone(),
            chunk_elems: layout.chunk_elems as u64,
            params: spec.params.clone(),
            owners: owners.clone(),
        };
        let calls = forward.into_iter().enumerate().skip(1).map(|(i, values)| {
            let mut messages: Vec<pb::CreateShardRequest> = pack(values, FORWARD_MESSAGE_BYTES)
                .into_iter()
                .map(|values| pb::CreateShardRequest {
                    values,
                    ..Default::default()
                })
                .collect();
            if messages.is_empty() {
                messages.push(pb::CreateShardRequest::default());
            }
            messages[0].job = name.to_owned();
            messages[0].spec = Some(spec.clone());
            messages[0].shard = i as u32;
            messages[0].layout = Some(layout_pb.clone());
            async move { (i, self.cluster.create_shard(i, messages).await) }
        });
        let mut made = Vec::new();
        let mut failure = None;
        for (i, r) in futures::future::join_all(calls).await {
            match r {
                Ok(c) if c.created => made.push(i),
                Ok(_) => {}
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            for i in made {
                if let Err(drop) = self.cluster.drop_shard(i, name).await {
                    tracing::warn!(job = %name, shard = i, error = %drop, "cannot drop a part of a job that failed to start");
                }
            }
            return Err(e);
        }
        let job = Job::create(
            name.to_owned(),
            spec.clone(),
            config,
            layout,
            owners,
            Arc::clone(&self.cluster),
            chunks,
        )?;
        self.insert(job)
    }

    /// Where the values of this shard's part of a job the coordinator
    /// placed are written as they arrive (`create_shard` takes it).
    pub fn begin_create_shard(
        &self,
        name: &str,
        config: &JobConfig,
        layout: &pb::LayoutResponse,
    ) -> Result<Filling> {
        validate_job_name(name)?;
        // A pull sends at least one whole chunk per message.
        let chunk_elems = usize::try_from(layout.chunk_elems)
            .ok()
            .filter(|&e| e >= 1 && e <= self.config.max_message_bytes / 8)
            .ok_or_else(|| {
                invalid!(
                    "layout.chunk_elems must be 1 to {} (half of max_message_bytes in f32), got {}",
                    self.config.max_message_bytes / 8,
                    layout.chunk_elems
                )
            })?;
        let l = Layout::with_chunk_elems(&config.params, chunk_elems);
        Filling::new(
            config,
            l,
            layout.owners.clone(),
            self.cluster.shard as u32,
            self.cluster.size(),
            false,
        )
    }

    /// Creates this shard's part of a job the coordinator placed, from the
    /// values `begin_create_shard`'s filling received.
    pub fn create_shard(
        &self,
        name: &str,
        spec: &pb::JobSpec,
        config: JobConfig,
        values: Filling,
    ) -> Result<Created> {
        if let Some(j) = self.jobs.get(name) {
            same_job(j.value(), &config)?;
            return Ok(Created {
                job: Arc::clone(j.value()),
                created: false,
            });
        }
        let Filled {
            layout,
            owners,
            chunks,
            ..
        } = values.finish()?;
        let job = Job::create(
            name.to_owned(),
            spec.clone(),
            config,
            layout,
            owners,
            Arc::clone(&self.cluster),
            chunks,
        )?;
        self.insert(job)
    }

    fn insert(&self, job: Job) -> Result<Created> {
        let name = job.name.clone();
        match self.jobs.entry(name.clone()) {
            Entry::Vacant(v) => {
                let job = Arc::new(job);
                v.insert(Arc::clone(&job));
                job.publish();
                tracing::info!(job = %name, incarnation = job.metrics.incarnation, shard = self.cluster.shard, params = job.config.params.len(), workers = job.config.workers, optimizer = job.config.optimizer_name(), "job created");
                Ok(Created { job, created: true })
            }
            Entry::Occupied(o) => {
                same_job(o.get(), &job.config)?;
                Ok(Created {
                    job: Arc::clone(o.get()),
                    created: false,
                })
            }
        }
    }

    /// Every shard's part of `job`: this one's, and the others' as they
    /// answer within the peer deadline (down ones say why).
    pub async fn shard_infos(&self, job: &Job) -> Vec<pb::ShardInfo> {
        let mut infos = vec![job.shard_info()];
        if self.cluster.shard != 0 {
            return infos;
        }
        let calls = (1..self.cluster.size()).map(|i| async move {
            self.cluster
                .shard_status(i, &job.name)
                .await
                .unwrap_or_else(|e| pb::ShardInfo {
                    index: i as u32,
                    address: self.cluster.address(i),
                    up: false,
                    error: e.to_string(),
                    ..Default::default()
                })
        });
        infos.extend(futures::future::join_all(calls).await);
        infos
    }

    /// Drops job `name` here and, on the coordinator, on every shard. The
    /// job is gone here even if a shard cannot be reached; the error then
    /// names the shards that still hold their part.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let (_, job) = self
            .jobs
            .remove(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        job.close();
        tracing::info!(job = %name, shard = self.cluster.shard, "job deleted");
        if let Some(settings) = &self.cluster.checkpoints {
            // A restart must not bring the deleted job back.
            match checkpoint::set_aside_deleted(&settings.dir, name, settings.keep) {
                Ok(Some(aside)) => {
                    tracing::info!(job = %name, to = %aside.display(), "checkpoints of the deleted job moved aside")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job = %name, error = %e, "cannot move the deleted job's checkpoints aside")
                }
            }
        }
        if self.cluster.shard != 0 {
            return Ok(());
        }
        let calls =
            (1..self.cluster.size()).map(|i| async move { self.cluster.drop_shard(i, name).await });
        let failed: Vec<Error> = futures::future::join_all(calls)
            .await
            .into_iter()
            .filter_map(|r| {
                r.err().filter(|e| {
                    !matches!(
                        e,
                        Error::Shard {
                            code: tonic::Code::NotFound,
                            ..
                        }
                    )
                })
            })
            .collect();
        match failed.into_iter().next() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Drops this shard's part of `name` (called by the coordinator).
    pub fn drop_shard(&self, name: &str) -> Result<()> {
        let (_, job) = self
            .jobs
            .remove(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        job.close();
        tracing::info!(job = %name, shard = self.cluster.shard, "job part dropped");
        Ok(())
    }
}

fn same_job(job: &Job, config: &JobConfig) -> Result<()> {
    if job.config == *config {
        Ok(())
    } else {
        Err(Error::JobMismatch {
            job: job.name.clone(),
            detail: job.config.first_difference(config),
        })
    }
}
