//! The network surface: the gRPC services (workers' and peers'), bearer
//! tokens, accepting connections, and the HTTP port. It knows tonic and
//! axum, never an optimizer: it checks and converts what arrives and hands
//! it to `node` and `job`.

pub mod auth;
pub mod http;
pub mod listen;
pub mod param_server;
pub mod pull_frames;
pub mod shard;
