//! Restoring a node's jobs from its checkpoints, and bringing a cluster's
//! shards to one round after a restart: the coordinator has every shard
//! hold the newest round all of them can restore, and, for a checkpoint of
//! another cluster shape kept in per-shard directories, first hands every
//! shard the files it lacks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::checkpoint::{self, Manifest};
use crate::error::{Error, Result};
use crate::invalid;
use crate::job::Job;

use super::Node;

impl Node {
    /// Loads the newest complete checkpoint of every job in the checkpoint
    /// directory, then serves. On a cluster the coordinator then has the
    /// shards agree, job by job, on the newest round every one of them can
    /// restore (see `agree`); until then the jobs serve no worker.
    pub fn restore(self: &Arc<Self>) -> Result<()> {
        let Some(settings) = &self.cluster.checkpoints else {
            self.ready.store(true, Ordering::Release);
            return Ok(());
        };
        let mut restored = Vec::new();
        let mut reshards = Vec::new();
        for name in checkpoint::jobs(&settings.dir) {
            if let Some(round) = self.needs_peer_files(&settings.dir, &name)? {
                if self.cluster.shard == 0 {
                    reshards.push((name, round));
                }
                continue;
            }
            let (loaded, rounds) = checkpoint::restorable(
                &settings.dir,
                &name,
                self.cluster.shard,
                self.cluster.size(),
            )?;
            let Some(loaded) = loaded else {
                continue;
            };
            let round = loaded.meta.round;
            let job = Job::restore(Arc::clone(&self.cluster), loaded, rounds.clone())?;
            let job = Arc::new(job);
            self.jobs.insert(name.clone(), Arc::clone(&job));
            job.publish();
            tracing::info!(job = %name, round, restorable = ?rounds, shard = self.cluster.shard, "job restored from its checkpoint");
            restored.push(name);
        }
        self.ready.store(true, Ordering::Release);
        if self.cluster.shard == 0 && self.cluster.size() > 1 {
            // The other shards may start after this one: agree in the
            // background, while the ports serve.
            let runtime = tokio::runtime::Handle::try_current()
                .map_err(|e| Error::Internal(format!("restore outside the runtime: {e}")))?;
            for name in restored {
                runtime.spawn(Arc::clone(self).agree(name));
            }
            for (name, round) in reshards {
                self.restoring.insert(
                    name.clone(),
                    format!("job '{name}' is being restored from checkpoint {round} of a cluster of another shape, from every shard's directory; try again shortly"),
                );
                runtime.spawn(Arc::clone(self).reshard(name, round));
            }
        } else if self.cluster.shard != 0 {
            let runtime = tokio::runtime::Handle::try_current()
                .map_err(|e| Error::Internal(format!("restore outside the runtime: {e}")))?;
            for name in restored {
                runtime.spawn(Arc::clone(self).rejoin(name));
            }
        }
        Ok(())
    }

    /// On a shard other than the coordinator, restarted alone: if the
    /// coordinator serves the job at the round this shard restored, serve
    /// it too; at another round, say so (only restarting every shard
    /// brings them to one checkpoint). If the coordinator is restoring the
    /// job itself, it will have this shard adopt a round.
    async fn rejoin(self: Arc<Self>, name: String) {
        let mut backoff = Duration::from_millis(20);
        // A coordinator that is down past this restarts too, and then has
        // every shard adopt a round itself.
        let give_up = tokio::time::Instant::now() + self.cluster.round_timeout;
        loop {
            let Ok(job) = self.job(&name) else {
                return;
            };
            match self.cluster.restorable(0, &name).await {
                Ok(r) if !r.serving => return,
                Ok(r) if r.round == job.round() => {
                    job.serve();
                    tracing::info!(job = %name, round = r.round, "the coordinator serves the round this shard restored");
                    return;
                }
                Ok(r) => {
                    let why = format!(
                        "job '{name}': this shard restored round {}, the coordinator is at round {}; restart every shard so that they agree on a checkpoint",
                        job.round(),
                        r.round
                    );
                    tracing::error!(job = %name, round = job.round(), coordinator_round = r.round, "restarted alone at another round than the coordinator's");
                    job.hold(why);
                    return;
                }
                Err(Error::Shard {
                    code: tonic::Code::NotFound,
                    ..
                }) => {
                    job.hold(format!(
                        "job '{name}' was restored here, but the coordinator has no such job"
                    ));
                    return;
                }
                Err(e) if e.retryable() && tokio::time::Instant::now() < give_up => {
                    // Pacing the calls to a coordinator still starting.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                // The coordinator is restoring, or cannot answer: it has
                // every shard adopt a round once it can.
                Err(e) => {
                    tracing::info!(job = %name, error = %e, "the coordinator will set this shard's round");
                    return;
                }
            }
        }
    }

    /// Whether the newest checkpoint of job `name` was taken on another
    /// number of shards and this directory lacks some of its files: then
    /// its round, and the job is not loaded from here alone. On the
    /// coordinator they must be on shards of this cluster (old shard `i`'s
    /// file on shard `i`), or the start stops; another shard waits for the
    /// coordinator to hand it the files.
    fn needs_peer_files(&self, root: &Path, name: &str) -> Result<Option<u64>> {
        let Some(round) = checkpoint::newest_round(root, name) else {
            return Ok(None);
        };
        let shards = self.cluster.size();
        let missing = match checkpoint::missing_files(root, name, round, shards) {
            Ok(m) => m,
            Err(e @ checkpoint::CheckpointError::Unusable(_)) => return Err(e.into()),
            // Damage: the loader reports it and sets the checkpoint aside.
            Err(_) => return Ok(None),
        };
        if missing.is_empty() || shards == 1 {
            // One shard has no peer to ask: the loader says what is missing.
            return Ok(None);
        }
        if self.cluster.shard != 0 {
            tracing::info!(job = %name, round, "checkpoint of a cluster of another shape; the coordinator hands this shard the files it lacks");
            return Ok(Some(round));
        }
        let manifest = checkpoint::read_manifest(root, name, round)?;
        if let Some(&i) = missing.iter().find(|&&i| i >= shards) {
            return Err(invalid!(
                "{}: checkpoint {round} of job '{name}' was taken on {} shards; this cluster has {shards}, and {} is neither in this directory nor on a shard of this cluster: copy it here",
                checkpoint::round_dir(root, name, round).display(),
                manifest.shards,
                checkpoint::shard_file(i, manifest.shards)
            ));
        }
        Ok(Some(round))
    }

    /// On the coordinator: restores job `name` from checkpoint `round`,
    /// taken on another number of shards whose files are spread over the
    /// shards' directories. Shards still starting are asked again, paced.
    async fn reshard(self: Arc<Self>, name: String, round: u64) {
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        loop {
            match self.reshard_once(&name, round).await {
                Ok(()) => {
                    self.restoring.remove(&name);
                    tracing::info!(job = %name, round, shards = self.cluster.size(), "job restored onto a cluster of another shape");
                    return;
                }
                Err(e) if e.retryable() => {
                    // Once at info level, then quietly while shards start.
                    if attempts == 0 {
                        tracing::info!(job = %name, error = %e, "waiting for the shards to hand over their checkpoint files");
                    } else {
                        tracing::debug!(job = %name, error = %e, "waiting for the shards to hand over their checkpoint files");
                    }
                    attempts += 1;
                    // Pacing the calls to shards still starting, not
                    // waiting for an event.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    tracing::error!(job = %name, round, error = %e, "cannot restore the job onto this cluster");
                    self.restoring.insert(
                        name.clone(),
                        format!("job '{name}' cannot be restored on this cluster: {e}"),
                    );
                    return;
                }
            }
        }
    }

    async fn reshard_once(self: &Arc<Self>, name: &str, round: u64) -> Result<()> {
        let root = self.checkpoint_dir()?;
        let manifest = checkpoint::read_manifest(&root, name, round)?;
        for i in checkpoint::missing_files(&root, name, round, self.cluster.size())? {
            let file = checkpoint::shard_file(i, manifest.shards);
            self.fetch(i, name, round, &file, &manifest).await?;
        }
        // The other shards copy what they lack from here, then this shard
        // loads its part: until then Init and Layout answer UNAVAILABLE.
        for i in 1..self.cluster.size() {
            self.cluster.adopt(i, name, round).await?;
        }
        let node = Arc::clone(self);
        let job = name.to_owned();
        tokio::task::spawn_blocking(move || node.adopt(&job, round))
            .await
            .map_err(|e| Error::Internal(format!("restoring a checkpoint panicked: {e}")))?
    }

    fn checkpoint_dir(&self) -> Result<PathBuf> {
        self.cluster
            .checkpoints
            .as_ref()
            .map(|c| c.dir.clone())
            .ok_or_else(|| Error::WrongShard("this shard has no --checkpoint-dir".into()))
    }

    /// Copies file `file` of checkpoint `round` of job `name` from shard
    /// `from` into this shard's directory, checked against `manifest`.
    async fn fetch(
        &self,
        from: usize,
        name: &str,
        round: u64,
        file: &str,
        manifest: &Manifest,
    ) -> Result<()> {
        let expect = manifest
            .files
            .iter()
            .find(|f| f.name == file)
            .ok_or_else(|| {
                Error::Internal(format!("the manifest of round {round} lists no {file}"))
            })?;
        let data = self
            .cluster
            .checkpoint_file(from, name, round, file)
            .await?;
        let mut out = checkpoint::Receiving::new(&self.checkpoint_dir()?, name, round, file)?;
        let mut stream = data;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| Error::from_shard(from, &self.cluster.address(from), &s))?
        {
            out.write(&chunk.data)?;
        }
        let entry = expect.clone();
        // fsync and rename off the async runtime.
        tokio::task::spawn_blocking(move || out.finish(Some(&entry)))
            .await
            .map_err(|e| Error::Internal(format!("storing a checkpoint file panicked: {e}")))??;
        tracing::info!(job = %name, round, file, from, bytes = expect.bytes, "checkpoint file received");
        Ok(())
    }

    /// On a shard that lacks job `name`: copies checkpoint `round` from the
    /// coordinator (every file missing here, then the manifest).
    async fn fetch_from_coordinator(&self, name: &str, round: u64) -> Result<()> {
        let mut stream = self
            .cluster
            .checkpoint_file(0, name, round, checkpoint::MANIFEST)
            .await?;
        let mut json = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| Error::from_shard(0, &self.cluster.address(0), &s))?
        {
            json.extend_from_slice(&chunk.data);
        }
        let manifest: Manifest = serde_json::from_slice(&json).map_err(|e| {
            Error::Internal(format!("the coordinator's manifest of round {round}: {e}"))
        })?;
        let root = self.checkpoint_dir()?;
        let dir = checkpoint::round_dir(&root, name, round);
        for f in &manifest.files {
            if !dir.join(&f.name).exists() {
                self.fetch(0, name, round, &f.name, &manifest).await?;
            }
        }
        // Last: the manifest makes the checkpoint exist here.
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = checkpoint::Receiving::new(&root, &name, round, checkpoint::MANIFEST)?;
            out.write(&json)?;
            out.finish(None)
        })
        .await
        .map_err(|e| Error::Internal(format!("storing a manifest panicked: {e}")))?
    }

    /// Has this shard hold job `name` as of checkpoint `round` and serve
    /// it, first copying the checkpoint from the coordinator if this shard
    /// does not hold the job at all.
    pub async fn adopt_from_cluster(self: &Arc<Self>, name: &str, round: u64) -> Result<()> {
        if !self.jobs.contains_key(name) {
            self.fetch_from_coordinator(name, round).await?;
        }
        let node = Arc::clone(self);
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || node.adopt(&name, round))
            .await
            .map_err(|e| Error::Internal(format!("adopting a checkpoint panicked: {e}")))?
    }

    /// On the coordinator, after a restart: learns which checkpoint rounds
    /// of job `name` every shard can restore, and has every shard hold the
    /// newest round common to all (a shard whose newest checkpoint was
    /// corrupt makes the whole cluster go back to an older one). Shards
    /// that are not up yet are asked again, paced, until they answer.
    async fn agree(self: Arc<Self>, name: String) {
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        loop {
            let Ok(job) = self.job(&name) else {
                return;
            };
            match self.agree_once(&job).await {
                Ok(round) => {
                    tracing::info!(job = %name, round, shards = self.cluster.size(), "every shard holds the same restored round");
                    return;
                }
                Err(e) if e.retryable() => {
                    // Once at info level, then quietly while shards start.
                    if attempts == 0 {
                        tracing::info!(job = %name, error = %e, "waiting for the shards to report their checkpoints");
                    } else {
                        tracing::debug!(job = %name, error = %e, "waiting for the shards to report their checkpoints");
                    }
                    attempts += 1;
                    // Pacing the calls to shards still starting, not
                    // waiting for an event.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    tracing::error!(job = %name, error = %e, "the shards cannot agree on a checkpoint round");
                    job.hold(format!(
                        "job '{name}' cannot be restored on this cluster: {e}"
                    ));
                    return;
                }
            }
        }
    }

    async fn agree_once(self: &Arc<Self>, job: &Job) -> Result<u64> {
        let mut common = job.restorable();
        let mut ahead = vec![job.round()];
        for i in 1..self.cluster.size() {
            let r = match self.cluster.restorable(i, &job.name).await {
                Err(Error::Shard {
                    code: tonic::Code::NotFound,
                    ..
                }) => {
                    return Err(Error::Internal(format!(
                        "shard {i} at {} has no checkpoint of it",
                        self.cluster.address(i)
                    )));
                }
                r => r?,
            };
            common.retain(|c| r.rounds.contains(c));
            ahead.push(r.round);
        }
        let round = common.iter().copied().max().ok_or_else(|| {
            Error::Internal(format!(
                "no checkpoint round is intact on every shard (shard 0 has {:?})",
                job.restorable()
            ))
        })?;
        if ahead.iter().any(|&r| r != round) {
            tracing::warn!(job = %job.name, round, held = ?ahead, "shards restored different rounds; every shard goes back to the newest one all can restore");
        }
        for i in 1..self.cluster.size() {
            self.cluster.adopt(i, &job.name, round).await?;
        }
        let node = Arc::clone(self);
        let name = job.name.clone();
        tokio::task::spawn_blocking(move || node.adopt(&name, round))
            .await
            .map_err(|e| Error::Internal(format!("adopting a checkpoint panicked: {e}")))??;
        Ok(round)
    }

    /// Holds job `name` as of its checkpoint `round` (loading it if this
    /// shard holds another round, or none) and serves it; checkpoints newer
    /// than `round` are set aside. Blocking: it may read a checkpoint.
    pub fn adopt(&self, name: &str, round: u64) -> Result<()> {
        self.install(name, round)?.serve();
        Ok(())
    }

    /// Holds job `name` as of its checkpoint `round`, loading it if this
    /// shard holds another round or none; checkpoints newer than `round`
    /// are set aside. The job does not serve yet on a cluster.
    fn install(&self, name: &str, round: u64) -> Result<Arc<Job>> {
        let root = self.checkpoint_dir()?;
        let current = self.jobs.get(name).map(|j| Arc::clone(j.value()));
        let job = match current {
            Some(job) if job.round() == round => job,
            current => {
                let loaded = checkpoint::load_round(
                    &root,
                    name,
                    round,
                    self.cluster.shard,
                    self.cluster.size(),
                )?;
                let rounds = current.as_ref().map_or_else(
                    || vec![round],
                    |j| j.restorable().into_iter().filter(|&r| r <= round).collect(),
                );
                let job = Arc::new(Job::restore(Arc::clone(&self.cluster), loaded, rounds)?);
                self.jobs.insert(name.to_owned(), Arc::clone(&job));
                job.publish();
                if let Some(older) = current {
                    older.close();
                    tracing::warn!(job = %name, from = older.round(), round, shard = self.cluster.shard, "job went back to an older checkpoint the other shards also hold");
                } else {
                    tracing::info!(job = %name, round, shard = self.cluster.shard, "job restored from a checkpoint of a cluster of another shape");
                }
                job
            }
        };
        checkpoint::set_aside_newer(&root, name, round);
        Ok(job)
    }
}
