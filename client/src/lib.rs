//! The Rust client of paramd, and (with the `tools` feature, on by default)
//! the trace reading, replay, bench and export behind `paramctl`.
//!
//! ```no_run
//! # async fn example() -> Result<(), paramd_client::ClientError> {
//! use paramd_client::Client;
//! let mut client = Client::connect("http://127.0.0.1:50051").await?;
//! let status = client.status(None).await?;
//! println!("{} jobs", status.jobs.len());
//! # Ok(()) }
//! ```

#[cfg(feature = "tools")]
pub mod bench;
mod client;
pub mod codec;
mod error;
#[cfg(feature = "tools")]
pub mod export;
pub mod memory;
mod pull;
mod push_stream;
#[cfg(feature = "tools")]
pub mod replay;
pub mod retry;
mod route;
mod state;
#[cfg(feature = "tools")]
pub mod trace;

pub use client::{Client, MAX_MESSAGE_BYTES, PushOptions};
pub(crate) use client::{MAX_PULL_ATTEMPTS, MESSAGE_BYTES, raw_grpc};
pub(crate) use error::shard_error;
pub use error::{ClientError, Result};
pub use paramd_proto::transport::Credentials;
pub use paramd_proto::v1;
pub use paramd_proto::wire;
pub use paramd_proto::wire::to_le_bytes;
pub use pull::{PullInto, Pulled};
pub use push_stream::PushStream;
pub use state::{OptimizerState, ParamState};
