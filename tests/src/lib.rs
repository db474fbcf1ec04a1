//! Shared helpers of the integration tests: in-process servers and real
//! daemons on loopback, reserved ports, fixtures (the golden traces, a
//! one-parameter spec, tool installers) and Prometheus helpers.

mod daemon;
mod fixtures;
mod ports;
mod prometheus;
mod server;

pub use daemon::*;
pub use fixtures::*;
pub use ports::*;
pub use prometheus::*;
pub use server::*;
