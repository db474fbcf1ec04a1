//! A job's checkpoints: each shard saves its part of a round, the
//! coordinator gathers the parts into a manifest and commits it everywhere.

use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint::{self, ChunkRef, Manifest, ManifestFile, ShardMeta};
use paramd_proto::v1 as pb;

use crate::error::{Error, Result};

use super::Job;
use crate::coordinator::Coordinator;

impl Job {
    /// Writes this shard's part of checkpoint `round` once the shard has
    /// applied it, holding the store still while it writes.
    pub async fn save(self: &Arc<Self>, round: u64) -> Result<ManifestFile> {
        let settings = self
            .cluster
            .checkpoints
            .clone()
            .ok_or_else(|| Error::WrongShard("this shard has no --checkpoint-dir".into()))?;
        self.wait_round(round, self.cluster.round_timeout).await?;
        // The file is written and fsynced on a blocking thread, not on the
        // runtime's. The store is read there; it holds still meanwhile, the
        // coordinator deciding no round until the checkpoint is committed.
        let job = Arc::clone(self);
        tokio::task::spawn_blocking(move || job.write_part(&settings.dir, round))
            .await
            .map_err(|e| Error::Internal(format!("writing a checkpoint panicked: {e}")))?
    }

    /// Writes this shard's part of checkpoint `round` under `root`.
    fn write_part(&self, root: &std::path::Path, round: u64) -> Result<ManifestFile> {
        let store = self.store.read();
        if store.round != round {
            return Err(Error::Internal(format!(
                "checkpoint of round {round} asked, the shard is at round {}",
                store.round
            )));
        }
        let chunks: Vec<ChunkRef<'_>> = self
            .own
            .chunks
            .iter()
            .zip(&store.chunks)
            .map(|(&id, state)| {
                let meta = &self.layout.chunks[id];
                let param = &self.config.params[meta.param];
                ChunkRef {
                    key: format!("{}@{}", param.name, meta.offset),
                    hyper: &self.config.groups[param.group],
                    state,
                }
            })
            .collect();
        let meta = ShardMeta {
            job: self.name.clone(),
            round,
            skipped: store.skipped,
            last: store.last.clone(),
            shard: self.cluster.shard,
            shards: self.cluster.size(),
            membership: self
                .coordinator
                .as_ref()
                .and_then(Coordinator::membership)
                .map(|(_, record)| record),
        };
        Ok(checkpoint::write_shard(
            root,
            &meta,
            &self.spec,
            &self.layout(),
            &chunks,
        )?)
    }

    /// Makes a checkpoint exist on this shard.
    pub fn commit(&self, manifest: &Manifest) -> Result<()> {
        let settings = self
            .cluster
            .checkpoints
            .as_ref()
            .ok_or_else(|| Error::WrongShard("this shard has no --checkpoint-dir".into()))?;
        checkpoint::commit(&settings.dir, manifest, settings.keep)?;
        self.restorable.lock().push(manifest.round);
        self.committed.send_replace(Some(manifest.round));
        Ok(())
    }

    /// `commit`, on a blocking thread: it writes and fsyncs the manifest
    /// and deletes old checkpoints.
    pub async fn commit_blocking(self: &Arc<Self>, manifest: Manifest) -> Result<()> {
        let job = Arc::clone(self);
        tokio::task::spawn_blocking(move || job.commit(&manifest))
            .await
            .map_err(|e| Error::Internal(format!("committing a checkpoint panicked: {e}")))?
    }

    /// Waits, at most until `deadline`, until a checkpoint of the round
    /// this shard holds is committed here; returns whether it was.
    pub async fn wait_committed(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.committed.subscribe();
        let current = |c: &Option<u64>| c.is_some_and(|c| c >= self.round());
        matches!(
            tokio::time::timeout_at(deadline, rx.wait_for(current)).await,
            Ok(Ok(_))
        )
    }

    /// On the coordinator, at shutdown: stops deciding rounds for good and
    /// checkpoints every shard at the last decided round, unless that
    /// round's checkpoint is already committed.
    pub async fn final_checkpoint(self: &Arc<Self>) -> Result<u64> {
        let c = self.coordinator()?;
        let _one = self.checkpointing.lock().await;
        // Never lifted: the process is stopping.
        let round = c.freeze();
        if *self.committed.borrow() == Some(round) {
            tracing::info!(job = %self.name, round, "the last decided round is checkpointed already");
            return Ok(round);
        }
        self.checkpoint_frozen(round).await.map(|()| round)
    }

    /// On the coordinator: checkpoints every shard at the last decided
    /// round, no round being decided meanwhile. `frozen_at` is the round
    /// of a periodic checkpoint, for which the coordinator froze itself.
    pub async fn checkpoint(self: &Arc<Self>, frozen_at: Option<u64>) -> Result<u64> {
        let c = self.coordinator()?;
        // One checkpoint of the job at a time; requests that arrive while
        // one is taken wait for it, and share it if it is of their round.
        let _one = self.checkpointing.lock().await;
        let round = frozen_at.unwrap_or_else(|| c.freeze());
        // Lifted however this ends, a caller that stops waiting included:
        // a freeze left behind would decide no round again.
        let _thaw = Thaw(c);
        if *self.committed.borrow() == Some(round) {
            return Ok(round);
        }
        self.checkpoint_frozen(round).await.map(|()| round)
    }

    /// Checkpoints every shard at `round`, the coordinator being frozen
    /// there.
    async fn checkpoint_frozen(self: &Arc<Self>, round: u64) -> Result<()> {
        let started = Instant::now();
        let result = self.checkpoint_at(round).await;
        match &result {
            Ok(()) => {
                self.metrics
                    .checkpoint_duration
                    .record(started.elapsed().as_secs_f64());
                self.metrics.checkpoint_round.set(round as f64);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.metrics.checkpoint_timestamp.set(now);
                tracing::info!(job = %self.name, round, secs = started.elapsed().as_secs_f64(), "checkpoint taken");
            }
            Err(e) => {
                self.metrics.checkpoint_failures.increment(1);
                tracing::error!(job = %self.name, round, error = %e, "checkpoint failed");
            }
        }
        result
    }

    async fn checkpoint_at(self: &Arc<Self>, round: u64) -> Result<()> {
        let shards = self.cluster.size();
        let mut files = vec![self.save(round).await?];
        let saves = (1..shards).map(|i| self.cluster.save_shard(i, &self.name, round));
        for f in futures::future::join_all(saves).await {
            files.push(f?);
        }
        let manifest = Manifest {
            format: checkpoint::FORMAT.to_owned(),
            job: self.name.clone(),
            round,
            shards,
            files,
        };
        // Every shard's file is durable; now the checkpoint may exist.
        checkpoint::failpoint("checkpoint.before_manifest", round);
        self.commit_blocking(manifest.clone()).await?;
        checkpoint::failpoint("checkpoint.between_manifests", round);
        let wire = pb::Manifest::from(&manifest);
        let commits = (1..shards).map(|i| {
            self.cluster
                .commit_shard(i, &self.name, round, wire.clone())
        });
        for r in futures::future::join_all(commits).await {
            r?;
        }
        Ok(())
    }
}

/// Lifts one freeze of the coordinator when dropped.
struct Thaw<'a>(&'a crate::coordinator::Coordinator);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.unfreeze();
    }
}
