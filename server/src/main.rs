//! The paramd daemon.

use std::process::ExitCode;
use std::time::Duration;

/// With the `mimalloc` feature, mimalloc; by default the system's
/// allocator, which peaks lower now that push buffers are kept across
/// rounds and pulls send the parameters' own memory, at the same round
/// time (bench/RESULTS.md, "The daemon's allocator").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use paramd::config::{Args, Config, LogFormat};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Exit code of bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
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
    let print = args.print_config;
    let config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("paramd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Every file the settings name is read here, before any port is bound.
    let (node, grace) = match config.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("paramd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if print {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(dir) = &config.checkpoint_dir
        && let Err(e) = check_writable(dir)
    {
        eprintln!(
            "paramd: checkpoint_dir {:?}: {e}",
            dir.display().to_string()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    init_logs(config.log_format);
    warn_readable_secrets(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("paramd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, node, grace)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "paramd failed");
            ExitCode::FAILURE
        }
    }
}

/// Creates `dir` if needed and checks that files can be written in it, so
/// that a daemon never runs without the checkpoints it was asked to take.
fn check_writable(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".paramd-probe-{}", std::process::id()));
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(b"paramd")?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    written
}

/// Warns about token files that other users of the machine can read.
fn warn_readable_secrets(config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    for (key, path) in [
        ("auth_token_file", &config.auth_token_file),
        ("peer_token_file", &config.peer_token_file),
    ] {
        let Some(path) = path else { continue };
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    key,
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the token file can be read by other users: chmod 600 it"
                );
            }
        }
    }
}

/// Logs to stdout, filtered by `PARAMD_LOG` (default `info`), as plain
/// lines (coloured on a terminal) or one JSON object per line.
fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("PARAMD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Plain => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

async fn run(config: Config, node: paramd::NodeConfig, grace: Duration) -> anyhow::Result<()> {
    let grpc = TcpListener::bind(config.listen).await?;
    let http = TcpListener::bind(config.http_listen).await?;
    let peer = match config.peer_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    if peer.is_some() && node.peer_token.is_none() && node.peer_tls.is_none() {
        tracing::warn!(
            "the shard-to-shard service takes any caller that reaches its address: set \
             peer_token_file (or TLS with a peer CA) unless only the shards can reach it"
        );
    }
    let peer_addr = match &peer {
        Some(p) => p.local_addr()?.to_string(),
        None => "none".to_owned(),
    };
    let signals = Signals::install()?;
    tracing::info!(
        grpc = %grpc.local_addr()?,
        http = %http.local_addr()?,
        peer = %peer_addr,
        shard = config.shard_index,
        shards = config.cluster.len().max(1),
        tls = node.tls.is_some(),
        auth = node.auth_token.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "paramd serving"
    );
    let listeners = paramd::Listeners { grpc, http, peer };
    paramd::serve(listeners, node, grace, shutdown_signal(signals)).await
}

/// SIGTERM and SIGINT, listened for from before the daemon says it is
/// serving: a signal sent as soon as "paramd serving" is logged is kept for
/// the shutdown, not left to the default action that kills the process.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal(mut signals: Signals) {
    signals.next().await;
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    });
}
