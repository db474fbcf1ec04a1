//! The math layer: pure, torch-ordered functions over slices (optimizer
//! kernels, the global norm, the learning-rate schedule) and the typed
//! optimizer state they step. Nothing here
//! knows about jobs, rounds or the network.

pub mod clip;
pub mod optim;
pub mod schedule;
pub mod state;
