//! paramd: a parameter-server daemon whose optimizers reproduce `torch.optim`.
//!
//! `math` (`optim`, `schedule`, `clip`) is pure functions over slices;
//! `layout`, `pieces`, `chunk`, `job` and `coordinator` hold a job's chunks
//! and run its rounds; `api` is the network surface; `server` serves it.
//! ARCHITECTURE.md at the top of the repository is the map.

pub mod api;
pub mod checkpoint;
pub mod chunk;
pub mod cluster;
pub mod compute;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod fuzzing;
pub mod job;
pub mod layout;
pub mod limits;
pub mod math;
pub mod metrics;
pub mod node;
pub mod pieces;
pub mod server;
pub mod spec;
pub mod token;

// The modules' former paths, kept while the layout moves to layers.
pub use api::{auth, http, listen, param_server as service, shard as shard_service};
pub use math::{clip, optim, schedule};

pub use crate::error::{Error, Result};
pub use crate::node::{Node, NodeConfig};
pub use crate::server::{Listeners, MAX_FRAME, serve};
