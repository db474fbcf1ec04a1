//! Reading a job for pulls: waiting for a round, and each chunk's values
//! of one round, never two.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use paramd_proto::v1 as pb;
use paramd_proto::v1::{Dtype, Segment};
use paramd_proto::wire::to_le_bytes;

use super::{Job, Snapshot};
use crate::error::{Error, Result};
use crate::invalid;

impl Job {
    /// Waits until `round` rounds have completed, at most `wait`.
    pub async fn wait_round(&self, round: u64, wait: Duration) -> Result<()> {
        self.check_serving()?;
        let started = Instant::now();
        let mut rx = self.completed.subscribe();
        let ended = || self.deleted.load(Ordering::Acquire) || self.on_hold.lock().is_some();
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

    /// The values of local chunk `local` as of `round`, as `dtype` (f32:
    /// the chunk's own memory, not a copy). If a round was applied since
    /// the pull began, the pull is aborted rather than mixing two rounds.
    pub fn read_chunk(&self, local: usize, round: u64, dtype: Dtype) -> Result<Segment> {
        let store = self.store.read();
        if store.round != round {
            return Err(Error::Aborted(format!(
                "job '{}' moved from round {round} to {} while it was being pulled; pull again",
                self.name, store.round
            )));
        }
        let meta = &self.layout.chunks[self.own.chunks[local]];
        let data = if dtype == Dtype::F32 {
            store.chunks[local].values.to_le_bytes()
        } else {
            // Converted outside the lock, from the round's values.
            let values = store.chunks[local].values.clone();
            drop(store);
            paramd_proto::wire::encode(&values, dtype)
        };
        self.metrics.pull_bytes[dtype as usize].increment(data.len() as u64);
        Ok(Segment {
            param: self.config.params[meta.param].name.clone(),
            offset: meta.offset as u64,
            data,
            dtype: dtype as i32,
        })
    }

    /// The optimizer state of local chunk `local` as of `round`: one
    /// segment per state buffer (one without data when the optimizer keeps
    /// none), each carrying the chunk's step. Copied under the read lock;
    /// aborted, as a pull is, if a round was applied since the read began.
    pub fn read_state(&self, local: usize, round: u64) -> Result<Vec<pb::StateSegment>> {
        let store = self.store.read();
        if store.round != round {
            return Err(Error::Aborted(format!(
                "job '{}' moved from round {round} to {} while its state was being read; read again",
                self.name, store.round
            )));
        }
        let meta = &self.layout.chunks[self.own.chunks[local]];
        let param = &self.config.params[meta.param];
        let chunk = &store.chunks[local];
        let segment = |buffer: &str, data: Bytes| pb::StateSegment {
            param: param.name.clone(),
            buffer: buffer.to_owned(),
            offset: meta.offset as u64,
            data,
            step: chunk.step,
        };
        let named = chunk.state.named();
        if named.is_empty() {
            return Ok(vec![segment("", Bytes::new())]);
        }
        Ok(named
            .into_iter()
            .map(|(name, b)| segment(name, to_le_bytes(b)))
            .collect())
    }
}
