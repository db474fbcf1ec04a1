//! Generated types and service stubs of the `paramd.v1` protocol.

/// The `paramd.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("paramd.v1");
}
