//! The paramd daemon.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use paramd::NodeConfig;
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
    /// Seconds in-flight calls get to finish after SIGTERM or SIGINT.
    #[arg(long, env = "PARAMD_SHUTDOWN_GRACE", default_value_t = 20.0)]
    shutdown_grace: f64,
}

/// Exit code of bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
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
    let config = NodeConfig {
        chunk_bytes: args.chunk_bytes,
        max_message_bytes: args.max_message_bytes,
        max_pull_wait: Duration::from_secs_f64(args.max_pull_wait.max(0.0)),
    };
    if let Err(e) = config.validate() {
        eprintln!("paramd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
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

async fn run(args: Args, config: NodeConfig) -> anyhow::Result<()> {
    let grpc = TcpListener::bind(args.listen).await?;
    let http = TcpListener::bind(args.http_listen).await?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "paramd serving");
    let grace = Duration::from_secs_f64(args.shutdown_grace.max(0.0));
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
