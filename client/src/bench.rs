//! `paramctl bench`: a load generator. W workers, each on its own
//! connection, run synchronous rounds of a synthetic job against a server
//! and report rounds/s, push and pull throughput, round latency and the
//! server's peak memory. Also a raw TCP loopback probe, the ceiling any
//! push is measured against.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

use crate::{Client, Credentials, v1 as pb};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub server: String,
    /// Token and TLS settings the server needs.
    pub credentials: Credentials,
    pub workers: u32,
    /// Parameters in all, split over `tensors` tensors.
    pub params: usize,
    pub tensors: usize,
    /// `sgd`, `adam` or `adamw`.
    pub optimizer: String,
    pub clip: Option<f64>,
    /// `(warmup_steps, total_steps)` of a warmup-cosine schedule; none:
    /// constant.
    pub schedule: Option<(u64, u64)>,
    /// Timed rounds, after one warm-up round.
    pub rounds: u64,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub workers: u32,
    pub params: usize,
    pub tensors: usize,
    pub optimizer: String,
    pub clip: Option<f64>,
    pub rounds: u64,
    pub rounds_per_s: f64,
    pub round_seconds_p50: f64,
    pub round_seconds_p99: f64,
    /// Gradient bytes pushed by all workers over the time spent pushing.
    pub push_gbps: f64,
    pub pull_gbps: f64,
    pub server_peak_rss_bytes: u64,
    /// Parameters + optimizer state + one gradient buffer.
    pub model_bytes: u64,
}

fn spec(o: &BenchOptions) -> anyhow::Result<pb::JobSpec> {
    let kind = match o.optimizer.as_str() {
        "sgd" => pb::OptimizerKind::Sgd,
        "adam" => pb::OptimizerKind::Adam,
        "adamw" => pb::OptimizerKind::Adamw,
        other => anyhow::bail!("--optimizer {other:?} is not sgd, adam or adamw"),
    };
    let momentum = (kind == pb::OptimizerKind::Sgd).then_some(0.9);
    Ok(pb::JobSpec {
        params: sizes(o)
            .iter()
            .enumerate()
            .map(|(i, &n)| pb::ParamSpec {
                name: format!("layer{i}.weight"),
                shape: vec![n as u64],
            })
            .collect(),
        optimizer: Some(pb::Optimizer {
            kind: kind as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(1e-3),
                momentum,
                ..Default::default()
            }),
        }),
        clip: o.clip.map(|max_norm| pb::Clip { max_norm }),
        schedule: o.schedule.map(|(warmup_steps, total_steps)| pb::Schedule {
            kind: Some(pb::schedule::Kind::WarmupCosine(pb::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio: 0.0,
            })),
        }),
        workers: o.workers,
        ..Default::default()
    })
}

fn sizes(o: &BenchOptions) -> Vec<usize> {
    let k = o.tensors.max(1);
    (0..k)
        .map(|t| o.params / k + usize::from(t < o.params % k))
        .collect()
}

/// Deterministic, varied values without a random-number crate.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) * 1e-4)
        .collect()
}

#[derive(Default)]
struct WorkerTimes {
    rounds: Vec<f64>,
    push: f64,
    pull: f64,
    pushed: usize,
    pulled: usize,
}

/// Runs the benchmark.
pub async fn run(o: &BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        o.workers > 0 && o.params > 0 && o.rounds > 0,
        "workers, params and rounds must be positive"
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let job = format!("bench-{}-{nanos}", std::process::id());
    let spec = spec(o)?;
    let sizes = sizes(o);
    let names: Vec<String> = spec.params.iter().map(|p| p.name.clone()).collect();
    let mut client = Client::connect_with(&o.server, o.credentials.clone()).await?;
    {
        let init: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| values(n, i))
            .collect();
        let named: Vec<(&str, &[f32])> = names
            .iter()
            .map(String::as_str)
            .zip(init.iter().map(Vec::as_slice))
            .collect();
        client.init(&job, spec, &named).await?;
    }
    let barrier = Arc::new(Barrier::new(o.workers as usize));
    let mut tasks = Vec::new();
    for w in 0..o.workers {
        let (server, credentials, job, names, sizes, barrier) = (
            o.server.clone(),
            o.credentials.clone(),
            job.clone(),
            names.clone(),
            sizes.clone(),
            Arc::clone(&barrier),
        );
        let rounds = o.rounds;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect_with(&server, credentials).await?;
            let grads: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, 31 * w as usize + i))
                .collect();
            let named: Vec<(&str, &[f32])> = names
                .iter()
                .map(String::as_str)
                .zip(grads.iter().map(Vec::as_slice))
                .collect();
            let bytes: usize = sizes.iter().sum::<usize>() * 4;
            let mut t = WorkerTimes::default();
            // Round 0 warms connections and first-touch memory; not timed.
            for round in 0..=rounds {
                barrier.wait().await;
                let start = Instant::now();
                c.push(&job, w, round, &named).await?;
                let pushed = start.elapsed().as_secs_f64();
                let p = Instant::now();
                c.pull(&job, round + 1).await?;
                let pulled = p.elapsed().as_secs_f64();
                if round > 0 {
                    t.rounds.push(start.elapsed().as_secs_f64());
                    t.push += pushed;
                    t.pull += pulled;
                    t.pushed += bytes;
                    t.pulled += bytes;
                }
            }
            anyhow::Ok(t)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(
            t.await
                .map_err(|e| anyhow::anyhow!("a worker panicked: {e}"))??,
        );
    }
    let status = client.status(Some(&job)).await?;
    client.delete_job(&job).await?;

    // A round ends when its slowest worker has pulled.
    let mut rounds: Vec<f64> = (0..o.rounds as usize)
        .map(|r| all.iter().map(|t| t.rounds[r]).fold(0.0, f64::max))
        .collect();
    let total: f64 = rounds.iter().sum();
    rounds.sort_by(f64::total_cmp);
    let pct = |p: f64| rounds[((rounds.len() - 1) as f64 * p).round() as usize];
    let (push_s, push_b): (f64, usize) = (
        all.iter().map(|t| t.push).sum(),
        all.iter().map(|t| t.pushed).sum(),
    );
    let (pull_s, pull_b): (f64, usize) = (
        all.iter().map(|t| t.pull).sum(),
        all.iter().map(|t| t.pulled).sum(),
    );
    let job_status = status.jobs.first();
    let model_bytes = job_status.map_or(0, |j| j.parameter_bytes * 2 + j.optimizer_state_bytes);
    Ok(BenchReport {
        workers: o.workers,
        params: o.params,
        tensors: o.tensors,
        optimizer: o.optimizer.clone(),
        clip: o.clip,
        rounds: o.rounds,
        rounds_per_s: o.rounds as f64 / total,
        round_seconds_p50: pct(0.5),
        round_seconds_p99: pct(0.99),
        // Workers push concurrently: bytes over the mean time one spent.
        push_gbps: push_b as f64 / (push_s / f64::from(o.workers)) / 1e9,
        pull_gbps: pull_b as f64 / (pull_s / f64::from(o.workers)) / 1e9,
        server_peak_rss_bytes: status.peak_rss_bytes,
        model_bytes,
    })
}

/// Raw TCP over loopback: `bytes` sent `repeat` times from one task to
/// another through a socket, reusing both buffers. Returns the median GB/s.
pub async fn raw_tcp(bytes: usize, repeat: usize) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..repeat {
            s.read_exact(&mut buf).await?;
            s.write_all(&[1]).await?;
        }
        anyhow::Ok(())
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let payload = vec![7u8; bytes];
    let mut ack = [0u8; 1];
    let mut times = Vec::new();
    for _ in 0..repeat {
        let t = Instant::now();
        s.write_all(&payload).await?;
        s.read_exact(&mut ack).await?;
        times.push(t.elapsed().as_secs_f64());
    }
    tokio::time::timeout(Duration::from_secs(60), receiver).await???;
    times.sort_by(f64::total_cmp);
    Ok(bytes as f64 / times[times.len() / 2] / 1e9)
}
