//! State loads (torch's `load_state_dict`): received whole into buffers of
//! their own, held for the round they were sent for, and applied before
//! that round's step on every shard or on none. The coordinator decides:
//! a load is applied only if every shard reports the same one whole when
//! the round is decided (see `Policy::decide`).

use std::sync::atomic::Ordering;

use paramd_proto::v1 as pb;

use super::{Collect, Job};
use crate::coordinator::LoadTicket;
use crate::error::{Error, Result};
use crate::math::state::OptimState;
use crate::pieces::load::Loading;

/// A load received whole, waiting for its round.
#[derive(Debug)]
pub struct StagedLoad {
    pub ticket: LoadTicket,
    pub round: u64,
    /// Each local chunk's state and step, in local order.
    pub chunks: Vec<(OptimState, u64)>,
}

/// A load being received: one per job at a time.
pub struct LoadReceiver<'a> {
    job: &'a Job,
    ticket: LoadTicket,
    round: u64,
    loading: Loading<'a>,
    _one_at_a_time: tokio::sync::MutexGuard<'a, ()>,
}

impl Job {
    /// Starts receiving a load for round `round` under the client's `id`,
    /// after which the job counts `step` optimizer steps: refused unless
    /// `round` is the open round and this shard has not closed it, or while
    /// another load of the job is being received.
    pub fn begin_load(&self, round: u64, id: u64, step: u64) -> Result<LoadReceiver<'_>> {
        self.check_serving()?;
        if id == 0 {
            return Err(crate::invalid!("id: a state load needs an id other than 0"));
        }
        self.check_open(&self.collect.lock(), round)?;
        let guard = self.loading.try_lock().map_err(|_| {
            Error::Aborted(format!(
                "another state load of job '{}' is being received on shard {}",
                self.name, self.cluster.shard
            ))
        })?;
        Ok(LoadReceiver {
            job: self,
            ticket: LoadTicket { id, step },
            round,
            loading: Loading::new(&self.config, &self.index, &self.layout, &self.own),
            _one_at_a_time: guard,
        })
    }

    /// Refuses a load for any round but the open one, or for the open one
    /// once this shard has closed it (its members are chosen: what it
    /// reports to the coordinator is settled).
    fn check_open(&self, c: &Collect, round: u64) -> Result<()> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Error::Unavailable(format!(
                "shard {} is shutting down: job '{}' takes no state load",
                self.cluster.shard, self.name
            )));
        }
        let why = if c.round != round {
            format!("job '{}' is at round {}", self.name, c.round)
        } else if c.closed {
            format!(
                "round {round} of job '{}' is being completed on shard {}",
                self.name, self.cluster.shard
            )
        } else {
            return Ok(());
        };
        Err(Error::Precondition(format!(
            "round: a state load for round {round} is refused: {why}; load it for the open round, \
             before its pushes complete"
        )))
    }

    /// Takes the load staged for `round`, if any, dropping an older one.
    pub(super) fn take_load(&self, round: u64) -> Option<StagedLoad> {
        self.collect.lock().load.take().filter(|l| l.round == round)
    }
}

impl LoadReceiver<'_> {
    /// Bytes of messages this shard reads at most: the state it holds, and
    /// the names and steps of the segments that carry it.
    pub fn budget(&self) -> usize {
        self.loading
            .expected_bytes()
            .saturating_add(self.job.own.chunks.len() * 4096)
    }

    /// Writes one message's segments into place.
    pub fn feed(&mut self, segments: Vec<pb::StateSegment>) -> Result<()> {
        self.loading.feed(segments)
    }

    /// Checks the load whole and stages it for its round, replacing one
    /// staged before; refused if the round closed meanwhile.
    pub fn finish(self) -> Result<()> {
        let loaded = self.loading.finish()?;
        let job = self.job;
        // Checked again under the lock that closing the round takes.
        let mut c = job.collect.lock();
        job.check_open(&c, self.round)?;
        c.load = Some(StagedLoad {
            ticket: self.ticket,
            round: self.round,
            chunks: loaded.chunks,
        });
        tracing::info!(job = %job.name, round = self.round, id = self.ticket.id, step = self.ticket.step, "state load staged");
        Ok(())
    }
}
