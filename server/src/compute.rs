//! The compute pool: optimizer passes run on rayon's threads, never on the
//! async runtime's, and the async side awaits their result.

use std::panic::{AssertUnwindSafe, catch_unwind};

use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Runs `f` on the compute pool and waits for its result without blocking
/// the runtime. A panic in `f` becomes an internal error instead of tearing
/// down the process.
pub async fn run<R, F>(f: F) -> Result<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    rayon::spawn(move || {
        // The receiver may be gone if the caller was cancelled; the work is
        // done either way.
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err(Error::Internal("a compute task panicked".into())),
        Err(_) => Err(Error::Internal("a compute task was dropped".into())),
    }
}
