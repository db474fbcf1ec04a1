//! A chunk's parameters and optimizer state, allocated once when the job is
//! created so that a step allocates nothing.

use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;

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

/// The names of a chunk's state buffers, in `ChunkState::buffers` order, as
/// torch names its state (the list is longer than the buffers an optimizer
/// without amsgrad keeps).
pub fn buffer_names(hyper: &Hyper) -> &'static [&'static str] {
    match hyper {
        Hyper::Sgd(_) => &["momentum_buffer"],
        Hyper::Adam(_) => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    }
}

/// The values of one chunk and its optimizer state, named like torch's
/// `state[p]` entries.
#[derive(Debug)]
pub struct ChunkState {
    pub values: Values,
    /// SGD: `[momentum_buffer]` (none without momentum); Adam and AdamW:
    /// `[exp_avg, exp_avg_sq]` and `max_exp_avg_sq` with amsgrad.
    pub buffers: Vec<Vec<f32>>,
    /// torch's `state['step']`: updates applied to this parameter.
    pub step: u64,
}

impl ChunkState {
    /// A chunk holding `values`, with zeroed state for `hyper`.
    pub fn new(values: Vec<f32>, hyper: &Hyper) -> ChunkState {
        let buffers = (0..hyper.state_buffers())
            .map(|_| vec![0.0; values.len()])
            .collect();
        ChunkState {
            values: Values::new(values),
            buffers,
            step: 0,
        }
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        self.buffers.iter().map(|b| b.len() * 4).sum()
    }

    /// Applies one optimizer step with learning rate `lr` to the gradient
    /// `grad` scaled by the clip coefficient `coef`.
    pub fn apply(&mut self, hyper: &Hyper, lr: f64, coef: f32, grad: &[f32]) {
        self.step += 1;
        match hyper {
            Hyper::Sgd(h) => {
                // torch creates the momentum buffer from the first gradient.
                let buf_init = self.step > 1;
                let buf = self.buffers.first_mut().map_or(&mut [][..], |b| &mut b[..]);
                optim::sgd(h, lr, coef, grad, self.values.make_mut(), buf, buf_init);
            }
            Hyper::Adam(h) => {
                let (exp_avg, rest) = self.buffers.split_at_mut(1);
                let (exp_avg_sq, rest) = rest.split_at_mut(1);
                let max_exp_avg_sq = rest.first_mut().map_or(&mut [][..], |b| &mut b[..]);
                let state = AdamState {
                    exp_avg: &mut exp_avg[0],
                    exp_avg_sq: &mut exp_avg_sq[0],
                    max_exp_avg_sq,
                };
                optim::adam(h, lr, self.step, coef, grad, self.values.make_mut(), state);
            }
        }
    }
}
