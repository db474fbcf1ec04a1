//! Elastic membership: who the workers of a job are when they join and
//! leave. The coordinator keeps it: members by worker id, each with a lease
//! that Heartbeat renews, and for the open round the leases that were
//! members at some moment of it (whose pushes may count).
//!
//! A worker id freed during a round (a Leave, an expired lease) is not given
//! out again before that round closes, so within a round a worker id names
//! one membership; across rounds the lease tells memberships apart, and
//! every push carries its lease.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::metrics::MemberMetrics;
use crate::spec::Elastic;

/// One membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: u64,
    pub expires: Instant,
    pub joined_round: u64,
}

/// A membership as a checkpoint records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub worker: u32,
    pub lease: u64,
    pub joined_round: u64,
}

/// The membership of a job as a checkpoint records it: the members (their
/// leases run afresh from the restore) and the next lease id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRecord {
    pub members: Vec<MemberRecord>,
    pub next_lease: u64,
}

/// Why a membership ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Left,
    Expired,
}

#[derive(Debug)]
pub struct Membership {
    job: String,
    rules: Elastic,
    /// Worker ids are `0..slots`.
    slots: u32,
    members: BTreeMap<u32, Lease>,
    next_lease: u64,
    /// The open round's eligible memberships: worker id to the lease that
    /// was a member at some moment of the round.
    eligible: BTreeMap<u32, u64>,
    /// Worker ids freed during the open round.
    released: BTreeSet<u32>,
    /// When the open round first held `min_workers` eligible pushes whole.
    pub quorum_at: Option<Instant>,
    metrics: MemberMetrics,
}

impl Membership {
    /// The membership of a job with `slots` worker ids, as `record` left it
    /// (every lease running afresh from now).
    pub fn new(
        job: &str,
        rules: Elastic,
        slots: u32,
        record: &MembershipRecord,
        metrics: MemberMetrics,
    ) -> Membership {
        let now = Instant::now();
        let members: BTreeMap<u32, Lease> = record
            .members
            .iter()
            .filter(|m| m.worker < slots)
            .map(|m| {
                let lease = Lease {
                    id: m.lease,
                    expires: now + rules.lease,
                    joined_round: m.joined_round,
                };
                (m.worker, lease)
            })
            .collect();
        let eligible = members.iter().map(|(&w, l)| (w, l.id)).collect();
        let max_lease = members.values().map(|l| l.id).max().unwrap_or(0);
        let m = Membership {
            job: job.to_owned(),
            rules,
            slots,
            members,
            next_lease: record.next_lease.max(max_lease + 1).max(1),
            eligible,
            released: BTreeSet::new(),
            quorum_at: None,
            metrics,
        };
        m.metrics.members.set(m.members.len() as f64);
        m
    }

    pub fn metrics(&self) -> &MemberMetrics {
        &self.metrics
    }

    pub fn rules(&self) -> Elastic {
        self.rules
    }

    /// The record a checkpoint keeps.
    pub fn record(&self) -> MembershipRecord {
        MembershipRecord {
            members: self
                .members
                .iter()
                .map(|(&worker, l)| MemberRecord {
                    worker,
                    lease: l.id,
                    joined_round: l.joined_round,
                })
                .collect(),
            next_lease: self.next_lease,
        }
    }

    /// Ends the memberships whose lease ran out by `now`; true if any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let gone: Vec<u32> = self
            .members
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(&w, _)| w)
            .collect();
        for &w in &gone {
            self.end(w, Ended::Expired);
        }
        !gone.is_empty()
    }

    fn end(&mut self, worker: u32, why: Ended) {
        if let Some(lease) = self.members.remove(&worker) {
            self.released.insert(worker);
            match why {
                Ended::Left => self.metrics.left.increment(1),
                Ended::Expired => self.metrics.expired.increment(1),
            }
            self.metrics.members.set(self.members.len() as f64);
            tracing::info!(job = %self.job, worker, lease = lease.id, reason = ?why, "member left");
        }
    }

    /// Makes a new member, in round `round`: its worker id (the lowest free
    /// one) and lease.
    pub fn join(&mut self, round: u64, now: Instant) -> Result<(u32, Lease)> {
        self.expire(now);
        let job = &self.job;
        let worker = (0..self.slots)
            .find(|w| !self.members.contains_key(w) && !self.released.contains(w))
            .ok_or_else(|| {
                Error::Precondition(format!(
                    "job '{job}' is full: it has {} members{}, and workers (its most members at once) is {}",
                    self.members.len(),
                    if self.released.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " and {} worker ids freed in round {round} (given out again once it closes)",
                            self.released.len()
                        )
                    },
                    self.slots
                ))
            })?;
        let lease = Lease {
            id: self.next_lease,
            expires: now + self.rules.lease,
            joined_round: round,
        };
        self.next_lease += 1;
        self.members.insert(worker, lease);
        self.eligible.insert(worker, lease.id);
        self.metrics.joins.increment(1);
        self.metrics.members.set(self.members.len() as f64);
        tracing::info!(job, worker, lease = lease.id, round, "member joined");
        Ok((worker, lease))
    }

    /// Checks that `lease` is worker `worker`'s current membership.
    pub fn check(&self, worker: u32, lease: u64) -> Result<()> {
        let job = &self.job;
        match self.members.get(&worker) {
            Some(l) if l.id == lease && lease != 0 => Ok(()),
            Some(_) | None => Err(Error::NotMember(format!(
                "worker {worker} with lease {lease} is not a member of job '{job}'{}: join again",
                match self.members.get(&worker) {
                    Some(l) => format!(" (worker {worker} is lease {})", l.id),
                    None if lease == 0 =>
                        " (an elastic job's pushes carry the lease Join gave)".to_owned(),
                    None => String::new(),
                }
            ))),
        }
    }

    /// Renews a membership's lease.
    pub fn heartbeat(&mut self, worker: u32, lease: u64, now: Instant) -> Result<()> {
        self.expire(now);
        self.check(worker, lease)?;
        if let Some(l) = self.members.get_mut(&worker) {
            l.expires = now + self.rules.lease;
        }
        Ok(())
    }

    /// Ends a membership; true if it was one (leaving again is harmless).
    pub fn leave(&mut self, worker: u32, lease: u64) -> bool {
        let is = self
            .members
            .get(&worker)
            .is_some_and(|l| l.id == lease && lease != 0);
        if is {
            self.end(worker, Ended::Left);
        }
        is
    }

    /// Whether worker `worker`'s push with `lease` may count in the open
    /// round: the lease was a member at some moment of it.
    pub fn eligible(&self, worker: u32, lease: u64) -> bool {
        self.eligible.get(&worker) == Some(&lease)
    }

    /// The current members' worker ids, in order.
    pub fn current(&self) -> impl Iterator<Item = u32> + '_ {
        self.members.keys().copied()
    }

    /// The current members, with their leases.
    pub fn members(&self) -> impl Iterator<Item = (u32, &Lease)> + '_ {
        self.members.iter().map(|(&w, l)| (w, l))
    }

    /// When the next lease runs out, if anyone is a member.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.members.values().map(|l| l.expires).min()
    }

    /// The round closed: the next one starts with the current members
    /// eligible and every worker id not a member free.
    pub fn round_closed(&mut self) {
        self.eligible = self.members.iter().map(|(&w, l)| (w, l.id)).collect();
        self.released.clear();
        self.quorum_at = None;
    }

    /// How long the grace lasts once `min_workers` pushed.
    pub fn grace_from(&self, worker_timeout: Duration) -> Option<Instant> {
        self.quorum_at.map(|t| t + worker_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(slots: u32) -> Membership {
        let rules = Elastic {
            min_workers: 1,
            lease: Duration::from_secs(10),
        };
        Membership::new(
            "j",
            rules,
            slots,
            &MembershipRecord::default(),
            MemberMetrics::new("test", "0"),
        )
    }

    #[test]
    fn worker_ids_freed_in_a_round_wait_for_it_to_close() {
        let mut m = membership(2);
        let now = Instant::now();
        let (a, la) = m.join(0, now).expect("a");
        let (b, _) = m.join(0, now).expect("b");
        assert_eq!((a, b), (0, 1));
        assert!(m.join(0, now).is_err(), "full");
        assert!(m.leave(a, la.id));
        assert!(!m.leave(a, la.id), "leaving again is harmless");
        let full = m
            .join(0, now)
            .expect_err("worker 0 was freed in this round");
        assert!(full.to_string().contains("freed in round 0"), "{full}");
        assert!(m.eligible(a, la.id), "its push this round may still count");
        m.round_closed();
        assert!(!m.eligible(a, la.id));
        let (c, lc) = m.join(1, now).expect("worker 0 again");
        assert_eq!(c, 0);
        assert_ne!(lc.id, la.id, "a new lease");
        assert!(m.check(0, la.id).is_err(), "the old lease is not a member");
        assert!(m.check(0, lc.id).is_ok());
    }

    #[test]
    fn leases_expire_unless_renewed_and_survive_a_record() {
        let mut m = membership(4);
        let t0 = Instant::now();
        let (a, la) = m.join(3, t0).expect("a");
        let (b, lb) = m.join(3, t0).expect("b");
        m.heartbeat(b, lb.id, t0 + Duration::from_secs(6))
            .expect("renewed");
        assert!(m.expire(t0 + Duration::from_secs(11)), "a expired");
        assert_eq!(m.current().collect::<Vec<_>>(), vec![b]);
        assert!(m.heartbeat(a, la.id, t0 + Duration::from_secs(11)).is_err());
        let record = m.record();
        let restored = Membership::new("j", m.rules(), 4, &record, MemberMetrics::new("test", "0"));
        assert_eq!(restored.record(), record);
        assert!(restored.check(b, lb.id).is_ok());
        assert!(restored.eligible(b, lb.id));
    }
}
