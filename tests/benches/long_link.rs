//! A large bf16 push over an emulated long link, with the default HTTP/2
//! windows and with the windows the README's "Long links" arithmetic gives
//! (stream window 1.5 x the bandwidth-delay product, connection window 4x
//! the stream's).
//!
//!     cargo bench -p paramd-tests --bench long_link -- [--mbit 1000] [--delay-ms 50] [--mib 256]
//!
//! This machine's kernel has no `netem` qdisc, so the link is a relay in
//! this process between the client and the server: every byte, in both
//! directions, leaves the relay `--delay-ms` after it was sent at `--mbit`
//! Mbit/s (serialized at the rate, then held for the delay). HTTP/2's window
//! updates travel back through it, so the window limit shows through as on
//! a real link. Prints the push's throughput as a share of the link's rate,
//! and what the window allows (window / round trip), each run in the same
//! process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use paramd::node::NodeConfig;
use paramd_client::codec::Payload;
use paramd_client::v1 as pb;
use paramd_client::{Client, PushOptions};
use paramd_proto::transport::Http2Windows;
use paramd_tests::{TestServer, flat_spec, outer_sgd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The emulated link: its rate in bytes per second and one-way delay.
#[derive(Clone, Copy)]
struct Link {
    bytes_per_sec: f64,
    delay: Duration,
}

/// Forwards `from` to `to` as the link carries it; counts the bytes.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
    carried: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    // When the link is free to serialize the next byte.
    let mut free = tokio::time::Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carried.fetch_add(n as u64, Ordering::Relaxed);
        let start = free.max(tokio::time::Instant::now());
        free = start + Duration::from_secs_f64(n as f64 / link.bytes_per_sec);
        if tx.send((free + link.delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A relay to `target` over `link`; returns its address.
async fn relay(target: std::net::SocketAddr, link: Link, carried: Arc<AtomicU64>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(carry(cr, sw, link, Arc::clone(&carried)));
            tokio::spawn(carry(sr, cw, link, Arc::clone(&carried)));
        }
    });
    format!("http://{addr}")
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// One push of `elems` bf16 values through the link to a fresh server
/// receiving with `windows`: its seconds.
async fn push_through(link: Link, windows: Http2Windows, elems: usize) -> f64 {
    let server = TestServer::with_config(NodeConfig {
        windows,
        ..NodeConfig::default()
    })
    .await;
    const TENSORS: usize = 16;
    let per = elems / TENSORS;
    let names: Vec<String> = (0..TENSORS).map(|i| format!("t{i}")).collect();
    let shapes: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), per)).collect();
    let spec = flat_spec(&shapes, outer_sgd(), 1);
    // The job is made directly; only the push crosses the link.
    let zeros = vec![0.0f32; per];
    let init: Vec<(&str, &[f32])> = names.iter().map(|n| (n.as_str(), &zeros[..])).collect();
    server
        .client()
        .await
        .init("link", spec, &init)
        .await
        .expect("init");
    let carried = Arc::new(AtomicU64::new(0));
    let url = relay(server.grpc, link, Arc::clone(&carried)).await;
    let c = Client::connect(&url)
        .await
        .expect("connect through the link");
    let values: Vec<f32> = (0..per).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let bytes = paramd_proto::wire::encode(&values, pb::Dtype::Bf16);
    let grads: Vec<(Arc<str>, Payload)> = names
        .iter()
        .map(|n| (Arc::from(n.as_str()), Payload::Owned(bytes.clone())))
        .collect();
    let options = PushOptions {
        dtype: pb::Dtype::Bf16,
        ..Default::default()
    };
    // The route (a Layout call) first, so the push is timed alone.
    c.check_push("link", "warm-up", &[], &[]).await.ok();
    let started = Instant::now();
    c.push_payloads("link", 0, 0, &grads, &[], options)
        .await
        .expect("push");
    let took = started.elapsed().as_secs_f64();
    let pushed = (elems * 2) as u64;
    assert!(
        carried.load(Ordering::Relaxed) >= pushed,
        "the push did not cross the link"
    );
    server.shutdown().await;
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mbit = arg("--mbit", 1000.0);
    let delay_ms = arg("--delay-ms", 50.0);
    let mib = arg("--mib", 256.0);
    let link = Link {
        bytes_per_sec: mbit * 1e6 / 8.0,
        delay: Duration::from_secs_f64(delay_ms / 1e3),
    };
    let rtt = 2.0 * delay_ms / 1e3;
    let bdp = link.bytes_per_sec * rtt;
    let elems = (mib * (1 << 20) as f64 / 2.0) as usize;
    let bytes = (elems * 2) as f64;
    println!(
        "link: {mbit} Mbit/s, {delay_ms} ms one way ({:.0} ms round trip), bandwidth-delay product {:.1} MB; push: {mib} MiB of bf16",
        rtt * 1e3,
        bdp / 1e6
    );
    let documented = Http2Windows {
        stream: ((1.5 * bdp) as u32).max(8 << 20),
        connection: ((6.0 * bdp) as u32).max(32 << 20),
    };
    let floor = bytes / link.bytes_per_sec + rtt;
    for (what, windows) in [
        ("default", Http2Windows::default()),
        ("documented", documented),
    ] {
        let took = push_through(link, windows, elems).await;
        let allowed = (windows.stream as f64 / rtt).min(link.bytes_per_sec);
        println!(
            "{what:>10} windows (stream {:.1} MB, connection {:.1} MB): {took:.2} s, {:.1} MB/s = {:.2} of the link's rate \
             (window / round trip allows {:.2}; the floor, bytes at the rate plus one round trip, is {floor:.2} s)",
            windows.stream as f64 / 1e6,
            windows.connection as f64 / 1e6,
            bytes / took / 1e6,
            bytes / took / link.bytes_per_sec,
            allowed / link.bytes_per_sec,
        );
    }
}
