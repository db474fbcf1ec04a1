//! Accepting connections: at most a set number open at once (the rest wait
//! in the kernel's backlog), and accept errors such as running out of file
//! descriptors met with backoff instead of a busy loop.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Longest pause between two accept attempts that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// An accepted connection, holding one of the listener's slots until it
/// is closed.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// The connections of `listener`, at most `max` open at once, with Nagle's
/// algorithm off (a push ends with a small frame that would otherwise wait
/// for a delayed ACK). It never yields an error: failed accepts are
/// retried, paced.
pub fn incoming(
    listener: TcpListener,
    max: usize,
) -> impl tokio_stream::Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        let conn = accept(&listener, &slots).await;
        Some((Ok(conn), (listener, slots)))
    })
}

async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>) -> Conn {
    // A slot first: over the cap, connections wait in the backlog.
    let slot = match Arc::clone(slots).acquire_owned().await {
        Ok(s) => s,
        // The semaphore is never closed.
        Err(_) => unreachable!("the connection slots are never closed"),
    };
    let mut backoff = Duration::ZERO;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                return Conn {
                    stream,
                    _slot: slot,
                };
            }
            // The connection went away before it was accepted: take the
            // next one.
            Err(e) if per_connection(&e) => {}
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                crate::metrics::accept_error();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot accept a connection; trying again after a pause");
                // Pacing retries of a resource that is exhausted (file
                // descriptors, memory): nothing signals when it is back.
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Errors about one connection, not the listener or the process.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
