//! The one error type of paramd's core, and its mapping onto gRPC codes.

use tonic::{Code, Status};

/// Everything the core refuses or fails at. Messages name the field or the
/// parameter and the value that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration or a malformed push: nothing of it was kept.
    #[error("{0}")]
    Invalid(String),
    #[error("job '{0}' does not exist")]
    NotFound(String),
    #[error("job '{job}' already exists with a different configuration: {detail}")]
    JobMismatch { job: String, detail: String },
    #[error("stale push: round {round} of job '{job}' is complete; the current round is {current}")]
    Stale {
        job: String,
        round: u64,
        current: u64,
    },
    #[error("early push: job '{job}' is collecting round {current}, not round {round}")]
    Early {
        job: String,
        round: u64,
        current: u64,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Internal(String),
    /// A call to another shard failed; its code is kept.
    #[error("shard {shard} at {address}: {message}")]
    Shard {
        shard: usize,
        address: String,
        code: Code,
        message: String,
    },
    /// Not ready yet (restoring checkpoints) or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The state moved under a long read; the caller should try again.
    #[error("{0}")]
    Aborted(String),
    /// The request belongs on another shard.
    #[error("{0}")]
    WrongShard(String),
    /// The job is not in the state the request needs (a state load for a
    /// round that is not open).
    #[error("{0}")]
    Precondition(String),
    /// An elastic job's call from a worker id and lease that are not a
    /// current membership (never joined, left, or its lease expired).
    #[error("{0}")]
    NotMember(String),
}

/// Shorthand for an `Error::Invalid` with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::error::Error::Invalid(format!($($arg)*)) };
}

impl Error {
    /// A short, bounded label for the `reason` of refusal metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::NotFound(_) => "unknown_job",
            Error::JobMismatch { .. } => "job_mismatch",
            Error::Stale { .. } => "stale",
            Error::Early { .. } => "early",
            Error::Timeout(_) => "timeout",
            Error::TooLarge(_) => "too_large",
            Error::Internal(_) => "internal",
            Error::Shard { .. } => "shard",
            Error::WrongShard(_) => "wrong_shard",
            Error::Aborted(_) => "aborted",
            Error::Unavailable(_) => "unavailable",
            Error::Precondition(_) => "precondition",
            Error::NotMember(_) => "not_member",
        }
    }

    /// Whether trying again later may succeed: another shard was down or
    /// slow.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Timeout(_) => true,
            Error::Shard { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::ResourceExhausted
            ),
            _ => false,
        }
    }

    /// Whether a wait ran out (here or on the shard called), as opposed to
    /// a failure.
    pub fn timed_out(&self) -> bool {
        matches!(
            self,
            Error::Timeout(_)
                | Error::Shard {
                    code: Code::DeadlineExceeded,
                    ..
                }
        )
    }

    /// The error of a call to shard `shard` that answered `status`.
    pub fn from_shard(shard: usize, address: &str, status: &Status) -> Error {
        // tonic reports a client-side deadline as CANCELLED.
        let code = match status.code() {
            Code::Cancelled => Code::DeadlineExceeded,
            c => c,
        };
        Error::Shard {
            shard,
            address: address.to_owned(),
            code,
            message: status.message().to_owned(),
        }
    }
}

/// The result type of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code this error is refused with.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::JobMismatch { .. } | Error::Stale { .. } | Error::Early { .. } => {
                Code::FailedPrecondition
            }
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::TooLarge(_) => Code::ResourceExhausted,
            Error::Internal(_) => Code::Internal,
            Error::Shard { code, .. } => peer_code(*code),
            Error::WrongShard(_) | Error::Precondition(_) | Error::NotMember(_) => {
                Code::FailedPrecondition
            }
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let mut status = Status::new(e.code(), bounded(e.to_string()));
        status.metadata_mut().insert(
            paramd_proto::transport::REASON,
            tonic::metadata::MetadataValue::from_static(e.reason()),
        );
        status
    }
}

/// The longest message a refusal carries: messages quote what clients
/// sent (names, values), and a status travels in a header, which must stay
/// well under the peer's header limit.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// `message` cut to `MAX_MESSAGE_BYTES` (on a character boundary), saying
/// how much was cut.
fn bounded(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let total = message.len();
    let mut end = MAX_MESSAGE_BYTES - 64;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(&format!("... ({} more bytes cut)", total - end));
    message
}

/// The code a client gets for a peer's refusal. What describes the request
/// or asks for a retry passes through; the peer's own authentication and
/// internal failures are this cluster's fault, not the caller's, and a
/// call cut off is UNAVAILABLE (CANCELLED is the caller's own).
fn peer_code(code: Code) -> Code {
    match code {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::DeadlineExceeded
        | Code::Unavailable => code,
        Code::Cancelled => Code::Unavailable,
        Code::Ok
        | Code::Unknown
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let name = "é".repeat(1 << 19);
        let status = Status::from(Error::Invalid(format!("job name {name:?} is too long")));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            status.message().len()
        );
        assert!(status.message().starts_with("job name \"éé"));
        assert!(status.message().ends_with("more bytes cut)"));
        let short = Status::from(Error::Invalid("lr must be positive".into()));
        assert_eq!(short.message(), "lr must be positive");
        assert_eq!(
            short.metadata().get(paramd_proto::transport::REASON),
            Some(&tonic::metadata::MetadataValue::from_static("invalid"))
        );
    }

    #[test]
    fn a_peers_code_is_mapped_not_forwarded() {
        let from =
            |code| Status::from(Error::from_shard(1, "http://b:2", &Status::new(code, "x"))).code();
        assert_eq!(from(Code::InvalidArgument), Code::InvalidArgument);
        assert_eq!(from(Code::Unavailable), Code::Unavailable);
        assert_eq!(from(Code::Unauthenticated), Code::Internal);
        assert_eq!(from(Code::PermissionDenied), Code::Internal);
        assert_eq!(from(Code::Unknown), Code::Internal);
        // tonic's client-side deadline.
        assert_eq!(from(Code::Cancelled), Code::DeadlineExceeded);
    }
}
