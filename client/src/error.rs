//! The client's errors: a refusal's status, which shard answered it, and
//! its machine-readable reason.

use crate::retry;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// A shard of a cluster answered with an error, or could not be reached.
    #[error("shard {shard} at {url}: {}: {}", .status.code(), .status.message())]
    Shard {
        shard: usize,
        url: String,
        status: tonic::Status,
    },
    #[error("{0}")]
    Invalid(String),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> ClientError {
        ClientError::Status(retry::normalize(status))
    }
}

impl ClientError {
    /// The gRPC status, when a server answered with an error.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) | ClientError::Shard { status: s, .. } => Some(s),
            _ => None,
        }
    }

    /// The server's machine-readable reason for a refusal (`stale`,
    /// `early`, `job_mismatch`, ...: see `paramd_proto::transport::REASON`),
    /// when it gave one.
    pub fn reason(&self) -> Option<&str> {
        self.status()?
            .metadata()
            .get(paramd_proto::transport::REASON)?
            .to_str()
            .ok()
    }
}

/// The result type of the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An error of shard `i`; a one-shard cluster's errors stay plain.
pub(crate) fn shard_error(
    i: usize,
    url: &str,
    status: tonic::Status,
    shards: usize,
) -> ClientError {
    let status = retry::normalize(status);
    if shards == 1 {
        ClientError::Status(status)
    } else {
        ClientError::Shard {
            shard: i,
            url: url.to_owned(),
            status,
        }
    }
}
