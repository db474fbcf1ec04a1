//! A chunk's parameters and optimizer state, allocated once when the job is
//! created so that a step allocates nothing.

use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;

use crate::math::state::OptimState;
use crate::optim::{self, AdamState, Hyper};

/// A chunk's values, shared with the pulls that send them: a pull takes a
/// reference instead of a copy, and a step writes in place unless a pull
/// still holds the previous values (then it copies them once, so the pull
/// still sends one round).
#[derive(Clone, Debug, PartialEq)]
pub struct Values(Arc<Vec<f32>>);

impl Values {
    pub fn new(values: Vec<f32>) -> Values {
        Values(Arc::new(values))
    }

    /// The values to write a step into.
    pub fn make_mut(&mut self) -> &mut [f32] {
        Arc::<Vec<f32>>::make_mut(&mut self.0).as_mut_slice()
    }

    /// The values as the little-endian bytes tensors travel as: on a
    /// little-endian host the same memory, not a copy.
    pub fn to_le_bytes(&self) -> Bytes {
        if cfg!(target_endian = "little") {
            return Bytes::from_owner(LittleEndian(Arc::clone(&self.0)));
        }
        paramd_proto::wire::to_le_bytes(&self.0)
    }
}

impl Deref for Values {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.0
    }
}

/// Values seen as bytes, on a little-endian host.
struct LittleEndian(Arc<Vec<f32>>);

impl AsRef<[u8]> for LittleEndian {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The values of one chunk and its optimizer state, named like torch's
/// `state[p]` entries.
#[derive(Debug)]
pub struct ChunkState {
    pub values: Values,
    pub state: OptimState,
    /// torch's `state['step']`: updates applied to this parameter.
    pub step: u64,
}

impl ChunkState {
    /// A chunk holding `values`, with zeroed state for `hyper`.
    pub fn new(values: Vec<f32>, hyper: &Hyper) -> ChunkState {
        ChunkState {
            state: OptimState::zeroed(hyper, values.len()),
            values: Values::new(values),
            step: 0,
        }
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        self.state.bytes()
    }

    /// Applies one optimizer step with learning rate `lr` to the gradient
    /// `grad` scaled by the clip coefficient `coef`.
    pub fn apply(&mut self, hyper: &Hyper, lr: f64, coef: f32, grad: &[f32]) {
        self.step += 1;
        match (hyper, &mut self.state) {
            (Hyper::Sgd(h), OptimState::Sgd { momentum_buffer }) => {
                // torch creates the momentum buffer from the first gradient.
                let buf_init = self.step > 1;
                let buf = momentum_buffer.as_deref_mut().unwrap_or_default();
                optim::sgd(h, lr, coef, grad, self.values.make_mut(), buf, buf_init);
            }
            (
                Hyper::Adam(h),
                OptimState::Adam {
                    exp_avg,
                    exp_avg_sq,
                    max_exp_avg_sq,
                },
            ) => {
                let state = AdamState {
                    exp_avg,
                    exp_avg_sq,
                    max_exp_avg_sq: max_exp_avg_sq.as_deref_mut().unwrap_or_default(),
                };
                optim::adam(h, lr, self.step, coef, grad, self.values.make_mut(), state);
            }
            // The state is made from the group's optimizer (`new`, the
            // checkpoint loader), which a job never changes.
            _ => unreachable!("a chunk's state is of its group's optimizer"),
        }
    }
}
