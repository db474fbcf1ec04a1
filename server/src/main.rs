//! The paramd daemon.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// glibc's allocator hands large freed buffers back to the kernel and maps
/// them again, so every multi-megabyte message pays for fresh pages; mimalloc
/// reuses them (see bench/RESULTS.md for what it buys).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use paramd::NodeConfig;
use paramd::checkpoint::CheckpointSettings;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// A parameter server whose SGD, Adam and AdamW reproduce torch.optim.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// gRPC address.
    #[arg(long, env = "PARAMD_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// HTTP address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PARAMD_HTTP_LISTEN", default_value = "0.0.0.0:9464")]
    http_listen: SocketAddr,
    /// Largest chunk a parameter is cut into, in bytes.
    #[arg(long, env = "PARAMD_CHUNK_BYTES", default_value_t = NodeConfig::default().chunk_bytes)]
    chunk_bytes: usize,
    /// Largest gRPC message, in bytes.
    #[arg(long, env = "PARAMD_MAX_MESSAGE_BYTES", default_value_t = NodeConfig::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Longest a pull waits for its round without a client deadline, in seconds.
    #[arg(long, env = "PARAMD_MAX_PULL_WAIT", default_value_t = 300.0)]
    max_pull_wait: f64,
    /// This shard's index in --cluster; 0 is the coordinator.
    #[arg(long, env = "PARAMD_SHARD_INDEX", default_value_t = 0)]
    shard_index: usize,
    /// URLs of every shard, comma-separated, in shard order. Without it,
    /// paramd is a one-shard cluster.
    #[arg(long, env = "PARAMD_CLUSTER", value_delimiter = ',')]
    cluster: Vec<String>,
    /// Deadline of a call to another shard, in seconds.
    #[arg(long, env = "PARAMD_PEER_TIMEOUT", default_value_t = 10.0)]
    peer_timeout: f64,
    /// Longest the coordinator waits for every shard's report of a round, in seconds.
    #[arg(long, env = "PARAMD_ROUND_TIMEOUT", default_value_t = 60.0)]
    round_timeout: f64,
    /// Directory of this shard's checkpoints; jobs found there are restored
    /// before serving. Without it no checkpoint is taken.
    #[arg(long, env = "PARAMD_CHECKPOINT_DIR")]
    checkpoint_dir: Option<std::path::PathBuf>,
    /// Take a checkpoint after every this many rounds (0: only on request).
    #[arg(long, env = "PARAMD_CHECKPOINT_EVERY", default_value_t = 0)]
    checkpoint_every: u64,
    /// Checkpoints kept per job.
    #[arg(long, env = "PARAMD_KEEP_CHECKPOINTS", default_value_t = 3)]
    keep_checkpoints: usize,
    /// Seconds in-flight calls get to finish after SIGTERM or SIGINT.
    #[arg(long, env = "PARAMD_SHUTDOWN_GRACE", default_value_t = 20.0)]
    shutdown_grace: f64,
}

/// Exit code of bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_from_env("PARAMD_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            eprintln!(
                "paramd: {}",
                e.to_string().lines().next().unwrap_or("bad arguments")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let config = match node_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("paramd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("paramd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "paramd failed");
            ExitCode::FAILURE
        }
    }
}

/// The node settings the flags describe, checked.
fn node_config(args: &Args) -> Result<NodeConfig, String> {
    let seconds = |name: &str, v: f64| {
        Duration::try_from_secs_f64(v)
            .map_err(|_| format!("{name} must be a non-negative number of seconds, got {v}"))
    };
    let config = NodeConfig {
        chunk_bytes: args.chunk_bytes,
        max_message_bytes: args.max_message_bytes,
        max_pull_wait: seconds("max_pull_wait", args.max_pull_wait)?,
        shard_index: args.shard_index,
        cluster: args.cluster.clone(),
        peer_timeout: seconds("peer_timeout", args.peer_timeout)?,
        round_timeout: seconds("round_timeout", args.round_timeout)?,
        checkpoints: args.checkpoint_dir.clone().map(|dir| CheckpointSettings {
            dir,
            every: args.checkpoint_every,
            keep: args.keep_checkpoints,
        }),
    };
    if args.checkpoint_dir.is_none() && args.checkpoint_every > 0 {
        return Err("checkpoint_every needs checkpoint_dir".into());
    }
    if args.keep_checkpoints == 0 {
        return Err("keep_checkpoints must be at least 1".into());
    }
    config.validate().map_err(|e| e.to_string())?;
    seconds("shutdown_grace", args.shutdown_grace)?;
    Ok(config)
}

async fn run(args: Args, config: NodeConfig) -> anyhow::Result<()> {
    let grpc = TcpListener::bind(args.listen).await?;
    let http = TcpListener::bind(args.http_listen).await?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, shard = args.shard_index, shards = args.cluster.len().max(1), "paramd serving");
    let grace = Duration::try_from_secs_f64(args.shutdown_grace)?;
    paramd::serve(grpc, http, config, grace, shutdown_signal()).await
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
