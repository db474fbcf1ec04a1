//! A chunk's optimizer state as a typed record, its buffers named as torch
//! names the entries of `optimizer.state[p]`.

use super::optim::Hyper;

/// The state one optimizer keeps for a chunk, besides its step count.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimState {
    /// SGD: the momentum buffer, kept only with momentum.
    Sgd { momentum_buffer: Option<Vec<f32>> },
    /// Adam and AdamW: the two moments, and `max_exp_avg_sq` with amsgrad.
    Adam {
        exp_avg: Vec<f32>,
        exp_avg_sq: Vec<f32>,
        max_exp_avg_sq: Option<Vec<f32>>,
    },
}

impl OptimState {
    /// Zeroed state of `len` elements for an optimizer of `hyper`.
    pub fn zeroed(hyper: &Hyper, len: usize) -> OptimState {
        OptimState::from_named(hyper, |_| Ok::<_, ()>(vec![0.0; len]))
            .unwrap_or_else(|()| unreachable!("zeroed buffers are always given"))
    }

    /// The state of an optimizer of `hyper`, each buffer it keeps taken
    /// from `get` by its torch name (a checkpoint's tensors).
    pub fn from_named<E>(
        hyper: &Hyper,
        mut get: impl FnMut(&'static str) -> Result<Vec<f32>, E>,
    ) -> Result<OptimState, E> {
        Ok(match hyper {
            Hyper::Sgd(h) => OptimState::Sgd {
                momentum_buffer: if h.momentum != 0.0 {
                    Some(get("momentum_buffer")?)
                } else {
                    None
                },
            },
            Hyper::Adam(h) => OptimState::Adam {
                exp_avg: get("exp_avg")?,
                exp_avg_sq: get("exp_avg_sq")?,
                max_exp_avg_sq: if h.amsgrad {
                    Some(get("max_exp_avg_sq")?)
                } else {
                    None
                },
            },
        })
    }

    /// The buffers kept, with their torch names, in torch's order.
    pub fn named(&self) -> Vec<(&'static str, &[f32])> {
        match self {
            OptimState::Sgd { momentum_buffer } => momentum_buffer
                .iter()
                .map(|b| ("momentum_buffer", &b[..]))
                .collect(),
            OptimState::Adam {
                exp_avg,
                exp_avg_sq,
                max_exp_avg_sq,
            } => [("exp_avg", &exp_avg[..]), ("exp_avg_sq", &exp_avg_sq[..])]
                .into_iter()
                .chain(max_exp_avg_sq.iter().map(|b| ("max_exp_avg_sq", &b[..])))
                .collect(),
        }
    }

    /// Bytes of state.
    pub fn bytes(&self) -> usize {
        let len = |b: &Option<Vec<f32>>| b.as_ref().map_or(0, Vec::len);
        4 * match self {
            OptimState::Sgd { momentum_buffer } => len(momentum_buffer),
            OptimState::Adam {
                exp_avg,
                exp_avg_sq,
                max_exp_avg_sq,
            } => exp_avg.len() + exp_avg_sq.len() + len(max_exp_avg_sq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamHyper, SgdHyper};

    #[test]
    fn the_buffers_kept_are_the_ones_torch_keeps() {
        let sgd = |momentum| {
            Hyper::Sgd(SgdHyper {
                lr: 0.1,
                momentum,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
                maximize: false,
            })
        };
        let adam = |amsgrad| {
            Hyper::Adam(AdamHyper {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                amsgrad,
                decoupled: false,
                maximize: false,
            })
        };
        let names = |h: &Hyper| -> Vec<&str> {
            let s = OptimState::zeroed(h, 3);
            assert_eq!(s.bytes(), s.named().len() * 12);
            s.named().into_iter().map(|(n, _)| n).collect()
        };
        assert!(names(&sgd(0.0)).is_empty());
        assert_eq!(names(&sgd(0.9)), ["momentum_buffer"]);
        assert_eq!(names(&adam(false)), ["exp_avg", "exp_avg_sq"]);
        assert_eq!(
            names(&adam(true)),
            ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        );
    }
}
