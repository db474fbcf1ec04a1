//! Learning-rate schedules, evaluated the way `LambdaLR` and
//! `CosineAnnealingLR` evaluate them: from the optimizer step `k` (0-based:
//! the number of updates applied so far), before the update.

use std::f64::consts::PI;

/// A validated schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// Linear warmup from 0, then cosine down to `min_lr_ratio`, held there
    /// after `total_steps`.
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f64,
    },
    /// torch's `CosineAnnealingLR`: one absolute floor, periodic past `t_max`.
    CosineAnnealing {
        t_max: u64,
        eta_min: f64,
    },
}

impl Schedule {
    /// The learning rate of a group with base lr `base_lr` at step `k`.
    pub fn lr(&self, base_lr: f64, k: u64) -> f64 {
        match *self {
            Schedule::Constant => base_lr,
            Schedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => {
                let factor = if k < warmup_steps {
                    k as f64 / warmup_steps as f64
                } else {
                    let span = total_steps.saturating_sub(warmup_steps).max(1);
                    let p = ((k - warmup_steps) as f64 / span as f64).min(1.0);
                    min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + (PI * p).cos())
                };
                base_lr * factor
            }
            Schedule::CosineAnnealing { t_max, eta_min } => {
                eta_min + (base_lr - eta_min) * (1.0 + (PI * k as f64 / t_max as f64).cos()) / 2.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-12 * b.abs()
    }

    #[test]
    fn warmup_starts_at_zero_and_rises_linearly() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 4,
            total_steps: 12,
            min_lr_ratio: 0.1,
        };
        assert_eq!(s.lr(0.01, 0), 0.0, "the first warmup step runs with lr 0");
        assert!(close(s.lr(0.01, 1), 0.0025));
        assert!(close(s.lr(0.01, 3), 0.0075));
        assert!(close(s.lr(0.01, 4), 0.01), "warmup ends at the base lr");
    }

    #[test]
    fn cosine_decays_to_the_floor_and_holds() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 2,
            total_steps: 10,
            min_lr_ratio: 0.1,
        };
        // Half way through the decay: 0.1 + 0.9 * 0.5 = 0.55.
        assert!(close(s.lr(1.0, 6), 0.55));
        assert!(close(s.lr(1.0, 10), 0.1));
        assert!(close(s.lr(1.0, 1000), 0.1), "held after total_steps");
    }

    #[test]
    fn warmup_equal_to_total_goes_straight_to_the_floor() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 3,
            total_steps: 3,
            min_lr_ratio: 0.0,
        };
        assert!(close(s.lr(1.0, 2), 2.0 / 3.0));
        // p = min(1, 0 / max(1, 0)) = 0: the cosine starts at its top.
        assert!(close(s.lr(1.0, 3), 1.0));
        assert!(close(s.lr(1.0, 4), 0.0));
    }

    #[test]
    fn cosine_annealing_matches_torch_including_past_t_max() {
        let s = Schedule::CosineAnnealing {
            t_max: 4,
            eta_min: 0.001,
        };
        let base = 0.1;
        let want = |t: f64| 0.001 + (base - 0.001) * (1.0 + (PI * t / 4.0).cos()) / 2.0;
        assert!(close(s.lr(base, 0), base));
        assert!(close(s.lr(base, 2), want(2.0)));
        assert!(close(s.lr(base, 4), 0.001), "the floor at t_max");
        // torch's CosineAnnealingLR is periodic: it rises again after t_max.
        assert!(s.lr(base, 6) > s.lr(base, 5));
        assert!(close(s.lr(base, 8), base));
        assert!(close(s.lr(base, 9), want(9.0)));
    }

    #[test]
    fn constant_is_the_base_lr() {
        assert_eq!(Schedule::Constant.lr(0.3, 77), 0.3);
    }
}
