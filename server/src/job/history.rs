//! A job's recent rounds, for the status page's charts: a bounded ring of
//! the decisions (lr per group, grad norm, clip coefficient) and the time
//! each round took, dropped with the job.

use std::collections::VecDeque;
use std::time::Instant;

use serde::Serialize;

use crate::coordinator::Decision;

/// One completed round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    pub round: u64,
    /// Optimizer steps applied after this round.
    pub step: u64,
    pub skipped: bool,
    pub grad_norm: f32,
    pub clip_coefficient: f32,
    /// The lr each group used.
    pub lr: Vec<f64>,
    /// Seconds since the previous round completed (since the job was
    /// created or restored, for its first round here).
    pub seconds: f64,
}

/// The newest rounds, at most `capacity`. Stored flat (32 bytes a round
/// plus 8 per param group), not as `Entry`s.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    groups: usize,
    rounds: VecDeque<Row>,
    /// `groups` lrs per row, in row order.
    lrs: VecDeque<f64>,
    last: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Row {
    round: u64,
    step: u64,
    seconds: f32,
    grad_norm: f32,
    clip_coefficient: f32,
    skipped: bool,
}

impl History {
    pub fn new(capacity: usize, groups: usize) -> History {
        History {
            capacity,
            groups,
            // Reserved whole (address space; pages are touched as rounds
            // come), so that growing never holds two copies.
            rounds: VecDeque::with_capacity(capacity),
            lrs: VecDeque::with_capacity(capacity * groups),
            last: Instant::now(),
        }
    }

    /// Records round `d`, completed now; the oldest round goes when full.
    pub fn record(&mut self, d: &Decision) {
        let now = Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f32();
        self.last = now;
        if self.capacity == 0 {
            return;
        }
        if self.rounds.len() == self.capacity {
            self.rounds.pop_front();
            self.lrs.drain(..self.groups);
        }
        self.rounds.push_back(Row {
            round: d.round,
            step: d.step,
            seconds,
            grad_norm: d.grad_norm,
            clip_coefficient: d.clip_coefficient,
            skipped: d.skipped,
        });
        self.lrs
            .extend((0..self.groups).map(|g| d.lr.get(g).copied().unwrap_or(f64::NAN)));
    }

    /// The rounds from `since` on, oldest first; with `every` > 1 only one
    /// in `every` of them (and always the newest), for a chart of a long
    /// history.
    pub fn since(&self, since: u64, every: usize) -> Vec<Entry> {
        let first = self.rounds.partition_point(|r| r.round < since);
        let n = self.rounds.len();
        let every = every.max(1);
        (first..n)
            .filter(|&i| (i - first).is_multiple_of(every) || i + 1 == n)
            .map(|i| {
                let r = self.rounds[i];
                Entry {
                    round: r.round,
                    step: r.step,
                    skipped: r.skipped,
                    grad_norm: r.grad_norm,
                    clip_coefficient: r.clip_coefficient,
                    lr: self
                        .lrs
                        .range(i * self.groups..(i + 1) * self.groups)
                        .copied()
                        .collect(),
                    seconds: f64::from(r.seconds),
                }
            })
            .collect()
    }

    /// Rounds held.
    pub fn len(&self) -> usize {
        self.rounds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rounds.is_empty()
    }

    /// Bytes the history holds at most: what the setting costs per job.
    pub fn bound_bytes(capacity: usize, groups: usize) -> usize {
        capacity * (std::mem::size_of::<Row>() + 8 * groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(round: u64) -> Decision {
        Decision {
            round,
            step: round + 1,
            skipped: round == 2,
            grad_norm: round as f32,
            clip_coefficient: 1.0,
            lr: vec![0.1 * round as f64, 0.5],
            loaded_state: 0,
            participants: 2,
        }
    }

    #[test]
    fn keeps_the_newest_rounds_and_their_lrs() {
        let mut h = History::new(3, 2);
        for r in 0..5 {
            h.record(&decision(r));
        }
        let all = h.since(0, 1);
        assert_eq!(all.iter().map(|e| e.round).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(all[1].lr, vec![0.1 * 3.0, 0.5]);
        assert!(all[0].skipped && !all[1].skipped);
        assert_eq!(h.since(4, 1).len(), 1);
        assert!(h.since(9, 1).is_empty());
    }

    #[test]
    fn a_stride_keeps_the_newest() {
        let mut h = History::new(100, 1);
        for r in 0..10 {
            h.record(&decision(r));
        }
        let rounds: Vec<u64> = h.since(0, 4).iter().map(|e| e.round).collect();
        assert_eq!(rounds, [0, 4, 8, 9]);
        let mut off = History::new(0, 1);
        off.record(&decision(0));
        assert!(off.is_empty());
    }
}
