//! The two decisions of a round. First its members: every shard reports
//! which workers' pushes it holds whole, and the coordinator chooses the
//! workers whose mean is the round's gradient (those whole on every shard,
//! once they are all the workers, or `workers - backup_workers` of them, or
//! at least one after the worker timeout), so that every shard averages
//! over the same set. Then its
//! step: once every shard has reported its per-chunk sums of squares, the
//! coordinator computes the global norm, the clip coefficient and the
//! learning rates (or the skip), and every shard applies that same decision.
//!
//! In a one-shard cluster the shard reports to an in-process coordinator;
//! the code path is the same.

mod membership;
mod wire;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use crate::clip::{clip_coefficient, global_norm};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::spec::Elastic;

pub use membership::{Lease, MemberRecord, Membership, MembershipRecord};

/// A shard's contribution to a round's norm.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `(global chunk id, sum of squares of the mean gradient)`.
    pub sums: Vec<(usize, f64)>,
    /// Whether any value of the mean gradient was not finite.
    pub non_finite: bool,
    /// The state load the shard holds whole for the round, if any.
    pub load: Option<LoadTicket>,
}

/// A state load as a shard reports it: the client's id, and the optimizer
/// steps the job counts from once it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadTicket {
    pub id: u64,
    pub step: u64,
}

/// What every shard does with round `round`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    pub round: u64,
    /// The gradient was not finite: apply nothing.
    #[serde(rename = "skip")]
    pub skipped: bool,
    /// Global L2 norm of the mean gradient, before clipping.
    pub grad_norm: f32,
    /// Multiplier of the gradient (1 without clipping).
    #[serde(rename = "coef")]
    pub clip_coefficient: f32,
    /// The learning rate of each param group for this step.
    #[serde(rename = "lrs")]
    pub lr: Vec<f64>,
    /// Optimizer steps applied once this decision is applied.
    pub step: u64,
    /// The id of the state load applied before this round's step (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub loaded_state: u64,
    /// The workers whose pushes the round averaged.
    #[serde(default)]
    pub participants: u32,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The workers of a round, as the coordinator chose them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    pub round: u64,
    /// The workers whose mean is the round's gradient, in rank order.
    pub workers: Vec<u32>,
    /// Workers dropped because the worker timeout expired (none when the
    /// round completed with every worker or by the backup-worker rule).
    pub dropped: Vec<u32>,
}

/// What the coordinator needs of a job's configuration.
#[derive(Clone, Debug)]
pub struct Policy {
    pub base_lrs: Vec<f64>,
    pub schedule: Schedule,
    pub clip: Option<f64>,
    /// Workers of the job.
    pub workers: u32,
    /// A round may complete once `workers - backup_workers` pushed.
    pub backup_workers: u32,
    /// After this long with at least one push, a round completes with the
    /// workers whose pushes every shard holds. In an elastic job, the grace
    /// after the `min_workers`-th push.
    pub worker_timeout: Duration,
    /// Elastic membership's rules, if the job's workers join and leave.
    pub elastic: Option<Elastic>,
}

impl Policy {
    /// The learning rate of every group at optimizer step `k`.
    pub fn lrs(&self, k: u64) -> Vec<f64> {
        self.base_lrs
            .iter()
            .map(|&lr| self.schedule.lr(lr, k))
            .collect()
    }

    /// Decides round `round` from all shards' reports, `step` updates having
    /// been applied before it. A state load is applied only if every shard
    /// reports the same one whole; the schedule then counts from its step.
    pub fn decide(&self, round: u64, step: u64, reports: &[Report]) -> Decision {
        let load = reports
            .first()
            .and_then(|r| r.load)
            .filter(|l| l.id != 0 && reports.iter().all(|r| r.load == Some(*l)));
        let step = load.map_or(step, |l| l.step);
        let mut sums: Vec<(usize, f64)> = reports
            .iter()
            .flat_map(|r| r.sums.iter().copied())
            .collect();
        // Canonical order: the norm must not depend on where chunks live.
        sums.sort_unstable_by_key(|&(id, _)| id);
        let grad_norm = global_norm(sums.iter().map(|&(_, s)| s));
        // A gradient holding a non-finite value, or whose norm overflows
        // f32 as torch's does, makes a non-finite round: skipped. torch
        // would clip such a norm by zero and still step (decaying weights
        // and moving moments on a meaningless gradient); paramd
        // deliberately treats it as it treats a non-finite gradient.
        let skip = reports.iter().any(|r| r.non_finite) || !grad_norm.is_finite();
        let coef = match self.clip {
            Some(max_norm) if !skip => clip_coefficient(grad_norm, max_norm),
            _ => 1.0,
        };
        Decision {
            round,
            skipped: skip,
            grad_norm,
            clip_coefficient: coef,
            lr: self.lrs(step),
            step: if skip { step } else { step + 1 },
            loaded_state: load.map_or(0, |l| l.id),
            participants: 0,
        }
    }

    /// The members of `round` of a job of fixed workers if the policy lets
    /// it complete now: `whole` are the workers whose pushes every shard
    /// holds whole, in order; `expired` whether the worker timeout has
    /// passed.
    pub fn members(&self, round: u64, whole: Vec<u32>, expired: bool) -> Option<Members> {
        let n = whole.len() as u32;
        let quorum = self.workers - self.backup_workers;
        let dropped = if n >= quorum {
            Vec::new()
        } else if expired && n > 0 {
            (0..self.workers).filter(|w| !whole.contains(w)).collect()
        } else {
            return None;
        };
        Some(Members {
            round,
            workers: whole,
            dropped,
        })
    }

    /// The participants of `round` of an elastic job if it may complete
    /// now: every current member (`current`) pushed whole and at least
    /// `min_workers` did, or at least `min_workers` did and the grace after
    /// the `min_workers`-th is over (`grace_over`). The members not whole
    /// are dropped from it.
    pub fn elastic_members(
        min_workers: u32,
        round: u64,
        whole: Vec<u32>,
        current: &[u32],
        grace_over: bool,
    ) -> Option<Members> {
        if (whole.len() as u64) < u64::from(min_workers) {
            return None;
        }
        let dropped: Vec<u32> = current
            .iter()
            .filter(|w| !whole.contains(w))
            .copied()
            .collect();
        (dropped.is_empty() || grace_over).then_some(Members {
            round,
            workers: whole,
            dropped,
        })
    }
}

/// Per shard, the workers whose pushes of the open round it holds whole,
/// with the lease each pushed with (0 in a job of fixed workers); `None`:
/// the shard has reported none yet.
type Held = Vec<Option<BTreeMap<u32, u64>>>;

/// The workers whose pushes every shard holds whole with the same lease,
/// in order, with that lease.
fn whole_everywhere(held: &Held) -> Vec<(u32, u64)> {
    let Some(Some(first)) = held.first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter(|&(w, lease)| {
            held.iter()
                .all(|h| h.as_ref().is_some_and(|h| h.get(w) == Some(lease)))
        })
        .map(|(&w, &lease)| (w, lease))
        .collect()
}

/// The membership of an elastic job; refuses the calls of elastic jobs in
/// a job of fixed workers.
fn elastic<'g>(g: &'g mut Gather, job: &str) -> Result<&'g mut Membership> {
    g.membership.as_mut().ok_or_else(|| {
        Error::Precondition(format!(
            "job '{job}' has fixed workers: Join, Heartbeat and Leave are for jobs whose membership is elastic"
        ))
    })
}

/// Gathers the reports of a round and hands the decision to every shard.
#[derive(Debug)]
pub struct Coordinator {
    policy: Policy,
    shards: usize,
    state: Mutex<Gather>,
    /// Time from a round's first report to its last.
    shard_wait: crate::metrics::JobHistogram,
    /// Freeze after deciding every round that ends a multiple of this many
    /// rounds (0: never), so its checkpoint is taken at exactly that round.
    checkpoint_every: u64,
    /// The members of the newest round whose members were chosen.
    members: watch::Sender<Option<Members>>,
    /// Bumped when the membership changes (a Leave, an expired lease), so
    /// that waiting rounds look again.
    changes: watch::Sender<u64>,
}

#[derive(Debug)]
struct Gather {
    round: u64,
    step: u64,
    reports: Vec<Option<Report>>,
    waiters: Vec<oneshot::Sender<Decision>>,
    first_report: Option<Instant>,
    /// The decision of the round before `round`, for shards that ask again.
    last: Option<Decision>,
    /// While above zero, no round is decided: a checkpoint is being taken
    /// of the rounds decided so far.
    frozen: u32,
    /// Per shard, the workers whose pushes of `round` it holds whole.
    held: Held,
    /// When the first shard reported a push of `round`: the worker timeout
    /// runs from there.
    first_push: Option<Instant>,
    /// An elastic job's members.
    membership: Option<Membership>,
}

impl Coordinator {
    /// A coordinator for `shards` shards, at round `round` after `step`
    /// applied updates.
    pub fn new(
        policy: Policy,
        shards: usize,
        round: u64,
        step: u64,
        shard_wait: crate::metrics::JobHistogram,
        membership: Option<Membership>,
    ) -> Coordinator {
        Coordinator {
            policy,
            shards,
            state: Mutex::new(Gather {
                round,
                step,
                reports: vec![None; shards],
                waiters: Vec::new(),
                first_report: None,
                last: None,
                frozen: 0,
                held: vec![None; shards],
                first_push: None,
                membership,
            }),
            shard_wait,
            checkpoint_every: 0,
            members: watch::channel(None).0,
            changes: watch::channel(0).0,
        }
    }

    /// Freezes after every `every` rounds (see `unfreeze`).
    pub fn with_checkpoint_every(mut self, every: u64) -> Coordinator {
        self.checkpoint_every = every;
        self
    }

    /// Stops deciding rounds; returns the number of rounds decided so far.
    pub fn freeze(&self) -> u64 {
        let mut g = self.state.lock();
        g.frozen += 1;
        g.round
    }

    /// Lifts one freeze; decides the pending round if it was only waiting
    /// for that.
    pub fn unfreeze(&self) {
        let mut g = self.state.lock();
        g.frozen = g.frozen.saturating_sub(1);
        if g.frozen == 0 && g.reports.iter().all(Option::is_some) {
            self.decide_locked(&mut g);
        }
    }

    fn decide_locked(&self, g: &mut Gather) {
        if let Some(first) = g.first_report {
            self.shard_wait.record(first.elapsed().as_secs_f64());
        }
        let round = g.round;
        let reports: Vec<Report> = g.reports.iter_mut().filter_map(Option::take).collect();
        let mut decision = self.policy.decide(round, g.step, &reports);
        decision.participants = self
            .chosen(round)
            .map_or(0, |m| u32::try_from(m.workers.len()).unwrap_or(u32::MAX));
        g.step = decision.step;
        g.round += 1;
        g.first_report = None;
        g.held.iter_mut().for_each(|h| *h = None);
        g.first_push = None;
        g.last = Some(decision.clone());
        if self.checkpoint_every > 0 && g.round.is_multiple_of(self.checkpoint_every) {
            g.frozen += 1;
        }
        for w in g.waiters.drain(..) {
            // A shard that stopped waiting asks again and gets `last`.
            let _ = w.send(decision.clone());
        }
    }

    /// Chooses the members of `round` if the policy allows it now. Only a
    /// shard's own `members` call chooses, from what it reported last: a
    /// one-shard job sums pushes before the choice, and every push it
    /// summed is in its report.
    fn choose_locked(&self, g: &mut Gather) {
        if g.held.iter().all(Option::is_none) || self.chosen(g.round).is_some() {
            return;
        }
        let now = Instant::now();
        let whole = whole_everywhere(&g.held);
        let round = g.round;
        let first_push = g.first_push;
        let chosen = match (g.membership.as_mut(), self.policy.elastic) {
            (Some(ms), Some(rules)) => {
                ms.expire(now);
                let whole: Vec<u32> = whole
                    .into_iter()
                    .filter(|&(w, lease)| ms.eligible(w, lease))
                    .map(|(w, _)| w)
                    .collect();
                if whole.len() as u64 >= u64::from(rules.min_workers) && ms.quorum_at.is_none() {
                    ms.quorum_at = Some(now);
                    if let Some(first) = first_push {
                        ms.metrics().quorum_wait.record((now - first).as_secs_f64());
                    }
                }
                let grace_over = ms
                    .grace_from(self.policy.worker_timeout)
                    .is_some_and(|end| now >= end);
                let current: Vec<u32> = ms.current().collect();
                let m =
                    Policy::elastic_members(rules.min_workers, round, whole, &current, grace_over);
                if m.is_some() {
                    if let Some(q) = ms.quorum_at {
                        ms.metrics().grace_used.record((now - q).as_secs_f64());
                    }
                    ms.round_closed();
                }
                m
            }
            _ => {
                let whole = whole.into_iter().map(|(w, _)| w).collect();
                let expired = first_push.is_some_and(|t| t.elapsed() >= self.policy.worker_timeout);
                self.policy.members(round, whole, expired)
            }
        };
        if let Some(m) = chosen {
            self.members.send_replace(Some(m));
        }
    }

    /// When a waiting `members` call should look again without news: at the
    /// worker timeout of a job of fixed workers; at the end of the grace
    /// or the next lease's expiry in an elastic one.
    fn next_look(&self, g: &Gather) -> Option<Instant> {
        match &g.membership {
            Some(ms) => {
                let grace = ms.grace_from(self.policy.worker_timeout);
                [grace, ms.next_expiry()].into_iter().flatten().min()
            }
            None => g.first_push.map(|t| t + self.policy.worker_timeout),
        }
    }

    fn chosen(&self, round: u64) -> Option<Members> {
        self.members
            .borrow()
            .as_ref()
            .filter(|m| m.round == round)
            .cloned()
    }

    /// Records that shard `shard` holds whole pushes of `round` from
    /// `workers` (with the lease each pushed with), and waits, at most
    /// `wait`, for the round's members. A shard reports again as more
    /// pushes arrive: what it holds only grows within a round, so reports
    /// are merged, in whatever order they come.
    pub async fn members(
        &self,
        round: u64,
        shard: usize,
        workers: &[(u32, u64)],
        wait: Duration,
    ) -> Result<Members> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = {
            let mut g = self.state.lock();
            if let Some(m) = self.chosen(round) {
                return Ok(m);
            }
            if round != g.round {
                return Err(Error::Internal(format!(
                    "shard {shard} collects round {round}, the coordinator is deciding round {}",
                    g.round
                )));
            }
            let slot = g
                .held
                .get_mut(shard)
                .ok_or_else(|| Error::Internal(format!("shard {shard} is not in this cluster")))?
                .get_or_insert_with(BTreeMap::new);
            for &(w, lease) in workers {
                if w < self.policy.workers {
                    slot.insert(w, lease);
                }
            }
            g.first_push.get_or_insert_with(Instant::now);
            self.choose_locked(&mut g);
            self.members.subscribe()
        };
        let mut changes = self.changes.subscribe();
        loop {
            if let Some(m) = rx.borrow_and_update().as_ref().filter(|m| m.round == round) {
                return Ok(m.clone());
            }
            changes.borrow_and_update();
            // Wake at the next time the rule may change its answer, or at
            // the deadline.
            let look = self.next_look(&self.state.lock());
            let wake = look
                .map(tokio::time::Instant::from_std)
                .filter(|&t| t > tokio::time::Instant::now())
                .map_or(deadline, |t| t.min(deadline));
            // True: members were chosen; false: look again.
            let news = tokio::select! {
                c = rx.changed() => c.map(|()| true),
                c = changes.changed() => c.map(|()| false),
                () = tokio::time::sleep_until(wake) => Ok(false),
            };
            let Ok(chosen) = news else {
                return Err(Error::Internal(format!(
                    "round {round} was abandoned by the coordinator"
                )));
            };
            if !chosen {
                if tokio::time::Instant::now() >= deadline {
                    let g = self.state.lock();
                    let quiet: Vec<usize> = (0..self.shards)
                        .filter(|&s| g.round == round && g.held[s].is_none())
                        .collect();
                    return Err(Error::Timeout(format!(
                        "members of round {round} not chosen after {:.1}s: shards {quiet:?} hold no push",
                        wait.as_secs_f64()
                    )));
                }
                let mut g = self.state.lock();
                if g.round == round {
                    self.choose_locked(&mut g);
                }
            }
        }
    }

    /// Makes a new member of an elastic job: its worker id, lease and the
    /// round it pushes next (the open round, or the next one if the open
    /// round's participants are chosen already).
    pub fn join(&self, job: &str) -> Result<(u32, Lease, u64)> {
        let mut g = self.state.lock();
        let round = if self.chosen(g.round).is_some() {
            g.round + 1
        } else {
            g.round
        };
        let ms = elastic(&mut g, job)?;
        let (worker, lease) = ms.join(round, Instant::now())?;
        Ok((worker, lease, round))
    }

    /// Renews a member's lease; the round being collected.
    pub fn heartbeat(&self, job: &str, worker: u32, lease: u64) -> Result<u64> {
        self.expire_leases();
        let mut g = self.state.lock();
        elastic(&mut g, job)?.heartbeat(worker, lease, Instant::now())?;
        Ok(g.round)
    }

    /// Ends a membership (harmless if it ended already); a round waiting
    /// for that member looks again.
    pub fn leave(&self, job: &str, worker: u32, lease: u64) -> Result<()> {
        let mut g = self.state.lock();
        let ms = elastic(&mut g, job)?;
        if ms.leave(worker, lease) {
            drop(g);
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Ends the memberships whose lease ran out; a round waiting for one of
    /// them looks again.
    pub fn expire_leases(&self) {
        let mut g = self.state.lock();
        if g.membership
            .as_mut()
            .is_some_and(|ms| ms.expire(Instant::now()))
        {
            drop(g);
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Whether an elastic job's push of `round` from `worker` with `lease`
    /// may be read: the lease is the worker's membership and the round's
    /// participants are not chosen yet (then the push is stale). Any push
    /// passes in a job of fixed workers.
    pub fn admit_push(&self, job: &str, worker: u32, lease: u64, round: u64) -> Result<()> {
        self.expire_leases();
        let g = self.state.lock();
        let open = g.round;
        let Some(ms) = g.membership.as_ref() else {
            return Ok(());
        };
        ms.check(worker, lease)?;
        let collecting = if self.chosen(open).is_some() {
            open + 1
        } else {
            open
        };
        if round < collecting {
            return Err(Error::Stale {
                job: job.to_owned(),
                round,
                current: collecting,
            });
        }
        Ok(())
    }

    /// An elastic job's members now (expired leases ended first), and the
    /// record a checkpoint keeps; `None` for fixed workers.
    pub fn membership(&self) -> Option<(Vec<(u32, Lease)>, MembershipRecord)> {
        let mut g = self.state.lock();
        let ms = g.membership.as_mut()?;
        ms.expire(Instant::now());
        Some((ms.members().map(|(w, l)| (w, *l)).collect(), ms.record()))
    }

    /// Records shard `shard`'s report of `round` and waits, at most `wait`,
    /// for the decision. Reporting again is harmless: the report replaces
    /// the previous one, and a shard asking about the round just decided
    /// gets its decision.
    pub async fn report(
        &self,
        round: u64,
        shard: usize,
        report: Report,
        wait: Duration,
    ) -> Result<Decision> {
        let rx = {
            let mut g = self.state.lock();
            if let Some(last) = g.last.as_ref().filter(|d| d.round == round) {
                return Ok(last.clone());
            }
            if round != g.round {
                return Err(Error::Internal(format!(
                    "shard {shard} reported round {round}, the coordinator is deciding round {}",
                    g.round
                )));
            }
            let slot = g
                .reports
                .get_mut(shard)
                .ok_or_else(|| Error::Internal(format!("shard {shard} is not in this cluster")))?;
            *slot = Some(report);
            let (tx, rx) = oneshot::channel();
            g.waiters.push(tx);
            g.first_report.get_or_insert_with(Instant::now);
            if g.frozen == 0 && g.reports.iter().all(Option::is_some) {
                self.decide_locked(&mut g);
            }
            rx
        };
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(_)) => Err(Error::Internal(format!(
                "round {round} was abandoned by the coordinator"
            ))),
            Err(_) => {
                let g = self.state.lock();
                let missing: Vec<usize> = (0..self.shards)
                    .filter(|&s| g.round == round && g.reports[s].is_none())
                    .collect();
                Err(Error::Timeout(format!(
                    "round {round} undecided after {:.1}s: shards {missing:?} have not reported",
                    wait.as_secs_f64()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests;
