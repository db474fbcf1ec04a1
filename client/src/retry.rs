//! When a failed call is tried again: one policy for every user of the
//! client (`paramctl`, Rust programs and the Python package).
//!
//! - UNAVAILABLE (a shard down, starting, or waiting for the others to
//!   agree on a restored checkpoint): tried again after a pause doubling
//!   from 50 ms to 1 s, until the call's deadline, or at most `retries`
//!   more times when that is set. A TLS handshake that failed, or an HTTP/2
//!   protocol error (plaintext to a TLS port), fails again and is not
//!   retried.
//! - ABORTED, for pushes and pulls only (another copy of the push is being
//!   received; a round was applied during a read): tried again after a
//!   pause doubling from 5 ms to 200 ms, until the deadline.
//!
//! Retrying is safe: a shard counts a (worker, round) once, Init of an
//! existing job is a no-op, and reads change nothing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tonic::{Code, Status};

const UNAVAILABLE_FIRST: Duration = Duration::from_millis(50);
const UNAVAILABLE_MAX: Duration = Duration::from_secs(1);
const ABORTED_FIRST: Duration = Duration::from_millis(5);
const ABORTED_MAX: Duration = Duration::from_millis(200);

/// Tries made again so far, by a client and its clones: what an operator
/// asks when calls are slow ("is the client retrying?").
#[derive(Debug, Default)]
pub struct Retried {
    /// Tries made again after UNAVAILABLE.
    pub unavailable: AtomicU64,
    /// Tries made again after ABORTED.
    pub aborted: AtomicU64,
}

/// The retry policy of one call.
#[derive(Debug, Clone)]
pub struct Retry {
    /// When the call gives up, every try included.
    pub deadline: Instant,
    /// Most UNAVAILABLE answers tried again; None: until the deadline.
    pub retries: Option<u32>,
    /// Whether ABORTED is tried again (pushes and pulls).
    pub aborted: bool,
    /// Where the tries made again are counted.
    pub counts: Arc<Retried>,
}

/// Whether `status` is a failure that trying again cannot mend: a TLS
/// handshake that failed (the server's certificate not signed by the CA
/// given, a name that does not match), or an HTTP/2 protocol error (a
/// plaintext client of a TLS port).
fn never_succeeds(status: &Status) -> bool {
    let mut text = status.message().to_ascii_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        text.push_str(&e.to_string().to_ascii_lowercase());
        source = e.source();
    }
    [
        "handshake",
        "certificate",
        "unknownissuer",
        "protocol error",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// A status as the caller should see it: tonic reports the client's own
/// deadline as CANCELLED "Timeout expired", which is DEADLINE_EXCEEDED, as
/// the server would say; and a connection that failed under a call (reset,
/// closed by a server that refused the client's TLS certificate) as
/// UNKNOWN, CANCELLED or INTERNAL (an HTTP/2 protocol error: a plaintext
/// client of a TLS port) with the transport's error as its source, which is
/// UNAVAILABLE. Statuses a server sent carry no source and pass unchanged.
pub fn normalize(status: Status) -> Status {
    let from_transport = std::error::Error::source(&status).is_some();
    match status.code() {
        Code::Cancelled if status.message() == "Timeout expired" => {
            Status::deadline_exceeded("the call's deadline passed (client side)")
        }
        Code::Unknown | Code::Cancelled | Code::Internal if from_transport => {
            let mut message = format!("connection failed: {}", status.message());
            let mut source = std::error::Error::source(&status);
            while let Some(e) = source {
                message.push_str(&format!(": {e}"));
                source = e.source();
            }
            Status::unavailable(message)
        }
        _ => status,
    }
}

impl Retry {
    /// What is left of the deadline (at least a millisecond, so that a
    /// call past it fails as DEADLINE_EXCEEDED rather than not at all).
    pub fn left(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Runs `call(timeout)` (one try, given what is left of the deadline)
    /// until it succeeds, fails in a way not retried, or the deadline
    /// would pass during the next pause.
    pub async fn run<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let (mut unavailable, mut busy) = (UNAVAILABLE_FIRST, ABORTED_FIRST);
        let mut retried = 0u32;
        loop {
            let status = match call(self.left()).await {
                Ok(v) => return Ok(v),
                Err(s) => normalize(s),
            };
            let pause = match status.code() {
                Code::Unavailable
                    if self.retries.is_none_or(|n| retried < n) && !never_succeeds(&status) =>
                {
                    retried += 1;
                    self.counts.unavailable.fetch_add(1, Ordering::Relaxed);
                    let pause = unavailable;
                    unavailable = (unavailable * 2).min(UNAVAILABLE_MAX);
                    pause
                }
                Code::Aborted if self.aborted => {
                    self.counts.aborted.fetch_add(1, Ordering::Relaxed);
                    let pause = busy;
                    busy = (busy * 2).min(ABORTED_MAX);
                    pause
                }
                _ => return Err(status),
            };
            if Instant::now() + pause >= self.deadline {
                return Err(status);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retries: Option<u32>, aborted: bool) -> Retry {
        Retry {
            deadline: Instant::now() + Duration::from_secs(30),
            retries,
            aborted,
            counts: Arc::default(),
        }
    }

    async fn count(p: Retry, fail: Vec<Status>) -> (Result<u32, Status>, u32) {
        let mut tries = 0;
        let mut fail = fail.into_iter();
        let r = p
            .run(|_| {
                tries += 1;
                let next = fail.next();
                async move { next.map_or(Ok(7), Err) }
            })
            .await;
        (r, tries)
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_within_the_budget() {
        let down = || Status::unavailable("starting");
        let p = policy(None, false);
        let (r, tries) = count(p.clone(), vec![down(), down(), down()]).await;
        assert_eq!((r.ok(), tries), (Some(7), 4));
        assert_eq!(p.counts.unavailable.load(Ordering::Relaxed), 3);
        let (r, tries) = count(policy(Some(1), false), vec![down(), down()]).await;
        assert_eq!(
            (r.map_err(|s| s.code()), tries),
            (Err(Code::Unavailable), 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn aborted_only_where_asked_and_others_never() {
        let busy = || Status::aborted("being received");
        let (r, tries) = count(policy(None, true), vec![busy(), busy()]).await;
        assert_eq!((r.ok(), tries), (Some(7), 3));
        let (r, tries) = count(policy(None, false), vec![busy()]).await;
        assert_eq!((r.map_err(|s| s.code()), tries), (Err(Code::Aborted), 1));
        let bad = Status::invalid_argument("lr");
        let (r, tries) = count(policy(None, true), vec![bad]).await;
        assert_eq!(
            (r.map_err(|s| s.code()), tries),
            (Err(Code::InvalidArgument), 1)
        );
        let tls = Status::unavailable("tls handshake eof: invalid peer certificate: UnknownIssuer");
        let (r, tries) = count(policy(None, true), vec![tls]).await;
        assert_eq!(
            (r.map_err(|s| s.code()), tries),
            (Err(Code::Unavailable), 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_every_retry() {
        let p = Retry {
            deadline: Instant::now() + Duration::from_millis(120),
            retries: None,
            aborted: true,
            counts: Arc::default(),
        };
        let (r, tries) = count(p, vec![Status::unavailable("down"); 100]).await;
        // 50 ms, then 100 ms would pass the deadline.
        assert_eq!(
            (r.map_err(|s| s.code()), tries),
            (Err(Code::Unavailable), 2)
        );
    }
}
