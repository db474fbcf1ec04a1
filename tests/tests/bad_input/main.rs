//! Bad input is refused with the right gRPC code and a message that names
//! the culprit, and a refusal changes nothing: a refused Init creates no
//! job, and a refused push is not counted, keeps no gradient and leaves the
//! parameters, the round and the step as they were.

mod checks;
mod fixtures;
mod init;
mod non_finite;
mod push;

use std::collections::BTreeMap;

/// The learning rate of the SGD jobs.
pub(crate) const LR: f64 = 0.1;

/// The parameters of every job here: a matrix, a scalar and a vector.
pub(crate) const SHAPES: &[(&str, &[u64])] = &[("w", &[2, 3]), ("b", &[]), ("e", &[4])];

/// Tensors by name, in `SHAPES` order.
pub(crate) type Tensors = Vec<(&'static str, Vec<f32>)>;

/// Parameter values by name.
pub(crate) type Params = BTreeMap<String, Vec<f32>>;
