//! paramctl: inspect a paramd server and replay PyTorch traces against it.

use std::path::PathBuf;
use std::process::ExitCode;

/// The same allocator as the server: large message buffers are reused
/// instead of mapped afresh for every push.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use paramd_client::bench::BenchOptions;
use paramd_client::replay::{ReplayOptions, replay};
use paramd_client::trace::{Tolerance, compare, read_tensors};
use paramd_client::{Client, Credentials, v1 as pb};
use paramd_proto::transport::read_token;
use serde_json::json;

/// `println!` as a Unix tool needs it: when stdout is closed (`paramctl
/// status --json | head`), the process ends quietly instead of panicking.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("paramctl: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

/// An error and its causes, each said once: a cause whose text its
/// wrapper already holds (tonic's and hyper's errors repeat their
/// sources) is left out.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Inspect a paramd server and replay PyTorch traces against it"
)]
struct Args {
    /// The server (the coordinator of a cluster).
    #[arg(
        long,
        global = true,
        env = "PARAMD_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// File holding the server's bearer token.
    #[arg(
        long,
        global = true,
        env = "PARAMD_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// The server's bearer token (prefer --token-file: arguments are visible
    /// to other users of the machine).
    #[arg(long, global = true, env = "PARAMD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA that signed the server's certificate, for https:// servers.
    #[arg(long, global = true, env = "PARAMD_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS.
    #[arg(long, global = true, env = "PARAMD_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM key of --cert.
    #[arg(long, global = true, env = "PARAMD_KEY", requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    /// The token and TLS settings the flags give.
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let mut credentials = Credentials::none();
        let token = match (&self.token_file, &self.token) {
            (Some(path), _) => Some(read_token(path).map_err(anyhow::Error::msg)?),
            (None, Some(token)) => Some(token.clone()),
            (None, None) => None,
        };
        if let Some(token) = token {
            credentials = credentials.with_token(&token).map_err(anyhow::Error::msg)?;
        }
        if let Some(ca) = &self.ca_cert {
            let identity = self.cert.as_deref().zip(self.key.as_deref());
            credentials = credentials
                .with_tls(ca, identity)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(credentials)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round, step, lr, grad norm and workers of one job or of every job.
    Status {
        #[arg(long)]
        job: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drive the server with a trace's gradients as its workers would, and
    /// write what the server computed.
    Replay {
        trace: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Also record the parameters after every step.
        #[arg(long)]
        every_step: bool,
        /// Job name (a fresh one by default).
        #[arg(long)]
        job: Option<String>,
    },
    /// Check a replay result against a trace with the golden tolerance.
    Compare {
        trace: PathBuf,
        result: PathBuf,
        #[arg(long, default_value_t = Tolerance::default().rtol)]
        rtol: f64,
        #[arg(long, default_value_t = Tolerance::default().atol)]
        atol: f64,
    },
    /// Delete a job and free its memory.
    Delete { job: String },
    /// Ask the standard gRPC health service (no token needed): exit 0 when
    /// SERVING, 1 otherwise. For container health checks and probes.
    Health {
        /// The service to ask about; the whole server by default.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Take a checkpoint of one job (every job by default) on every shard now.
    Checkpoint {
        #[arg(long)]
        job: Option<String>,
    },
    /// Write a job's current parameters as plain safetensors (original names
    /// and shapes), loadable with safetensors.torch.load_file.
    Export {
        /// The job; may be left out when the server has only one.
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run synchronous rounds of a synthetic job and report throughput,
    /// latency and the server's peak memory.
    Bench {
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Parameters in all.
        #[arg(long, default_value_t = 16 << 20)]
        params: usize,
        /// Tensors the parameters are split into.
        #[arg(long, default_value_t = 20)]
        tensors: usize,
        #[arg(long, default_value = "adamw")]
        optimizer: String,
        /// Clip by global norm to this max_norm.
        #[arg(long)]
        clip: Option<f64>,
        /// Warmup steps of a warmup-cosine schedule (with --total-steps).
        #[arg(long, requires = "total_steps")]
        warmup_steps: Option<u64>,
        /// Total steps of a warmup-cosine schedule; without it the lr is constant.
        #[arg(long)]
        total_steps: Option<u64>,
        /// Timed rounds (after one warm-up round).
        #[arg(long, default_value_t = 10)]
        rounds: u64,
        #[arg(long)]
        json: bool,
    },
    /// Raw TCP throughput over loopback: the ceiling a push is measured against.
    BenchTcp {
        #[arg(long, default_value_t = 64 << 20)]
        bytes: usize,
        #[arg(long, default_value_t = 10)]
        repeat: usize,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paramctl: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let credentials = args.credentials()?;
    match args.command {
        Command::Status { job, json } => {
            let mut client = Client::connect_with(&args.server, credentials.clone()).await?;
            let status = client.status(job.as_deref()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&paramd_proto::json::status(&status))?
                );
            } else if status.jobs.is_empty() {
                println!("no jobs");
            } else {
                for j in &status.jobs {
                    print_status(j);
                }
            }
        }
        Command::Replay {
            trace,
            out,
            every_step,
            job,
        } => {
            let opts = ReplayOptions {
                server: args.server,
                credentials: credentials.clone(),
                job,
                every_step,
            };
            let result = replay(&trace, &opts).await?;
            result.write(&out)?;
            println!(
                "replayed {} steps of {} as job '{}' into {}",
                result.lr.len(),
                trace.display(),
                result.job,
                out.display()
            );
        }
        Command::Compare {
            trace,
            result,
            rtol,
            atol,
        } => {
            let (want, _) = read_tensors(&std::fs::read(&trace)?)?;
            let (got, _) = read_tensors(&std::fs::read(&result)?)?;
            let c = compare(&want, &got, Tolerance { atol, rtol });
            for f in &c.failures {
                println!("{f}");
            }
            println!("worst relative deviation {:.3e}", c.worst);
            println!("{} passed, {} failed", c.passed, c.failures.len());
            if !c.failures.is_empty() || c.passed == 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Bench {
            workers,
            params,
            tensors,
            optimizer,
            clip,
            warmup_steps,
            total_steps,
            rounds,
            json,
        } => {
            let opts = BenchOptions {
                server: args.server,
                credentials: credentials.clone(),
                workers,
                params,
                tensors,
                optimizer,
                clip,
                schedule: total_steps.map(|t| (warmup_steps.unwrap_or(0), t)),
                rounds,
            };
            let r = paramd_client::bench::run(&opts).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} workers, {} params in {} tensors, {}{}: {} rounds",
                    r.workers,
                    r.params,
                    r.tensors,
                    r.optimizer,
                    r.clip.map(|c| format!(", clip {c}")).unwrap_or_default(),
                    r.rounds
                );
                println!("  rounds/s         {:.2}", r.rounds_per_s);
                println!(
                    "  round p50 / p99  {:.1} ms / {:.1} ms",
                    r.round_seconds_p50 * 1e3,
                    r.round_seconds_p99 * 1e3
                );
                println!(
                    "  push / pull      {:.2} GB/s / {:.2} GB/s",
                    r.push_gbps, r.pull_gbps
                );
                println!(
                    "  server peak RSS  {:.1} MiB (params + state + one gradient: {:.1} MiB)",
                    r.server_peak_rss_bytes as f64 / 1048576.0,
                    r.model_bytes as f64 / 1048576.0
                );
            }
        }
        Command::BenchTcp {
            bytes,
            repeat,
            json,
        } => {
            let gbps = paramd_client::bench::raw_tcp(bytes, repeat).await?;
            if json {
                println!("{}", json!({ "bytes": bytes, "gbps_median": gbps }));
            } else {
                println!("raw TCP loopback, {bytes} bytes: {gbps:.2} GB/s");
            }
        }
        Command::Export { job, out } => {
            let mut client = Client::connect_with(&args.server, credentials.clone()).await?;
            let e = paramd_client::export::export(&mut client, job.as_deref(), &out).await?;
            println!(
                "exported {} tensors of job '{}' at round {} to {} ({} bytes)",
                e.tensors,
                e.job,
                e.round,
                out.display(),
                e.bytes
            );
        }
        Command::Health { service, timeout } => {
            let timeout = std::time::Duration::try_from_secs_f64(timeout).map_err(|_| {
                anyhow::anyhow!("--timeout must be a non-negative number of seconds, got {timeout}")
            })?;
            let status = Client::health(&args.server, &credentials, &service, timeout).await?;
            println!(
                "{}",
                match status {
                    tonic_health::ServingStatus::Serving => "SERVING",
                    tonic_health::ServingStatus::NotServing => "NOT_SERVING",
                    tonic_health::ServingStatus::Unknown => "UNKNOWN",
                }
            );
            if status != tonic_health::ServingStatus::Serving {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Checkpoint { job } => {
            let mut client = Client::connect_with(&args.server, credentials.clone()).await?;
            for j in client.checkpoint(job.as_deref()).await? {
                println!("checkpointed job '{}' at round {}", j.job, j.round);
            }
        }
        Command::Delete { job } => {
            Client::connect_with(&args.server, credentials.clone())
                .await?
                .delete_job(&job)
                .await?;
            println!("deleted job '{job}'");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(j: &pb::JobStatus) {
    println!("job {}", j.job);
    println!("  optimizer        {}", j.optimizer);
    println!("  round            {}", j.round);
    println!("  optimizer step   {}", j.step);
    if j.min_workers == 0 {
        println!(
            "  workers          {} of {} pushed",
            j.workers_pushed, j.workers_expected
        );
    } else {
        println!(
            "  members          {} (elastic: a round needs {}, at most {} at once); {} pushed",
            j.members.len(),
            j.min_workers,
            j.workers_expected,
            j.workers_pushed
        );
        for m in &j.members {
            println!(
                "    worker {:<5} lease {:<8} expires in {:>6.1} s  joined at round {}",
                m.worker, m.lease, m.expires_in_seconds, m.joined_round
            );
        }
    }
    if !j.waiting_for.is_empty() {
        let late: Vec<String> = j.waiting_for.iter().map(u32::to_string).collect();
        println!("  waiting for      workers {}", late.join(", "));
    }
    println!("  rounds skipped   {}", j.rounds_skipped);
    println!(
        "  parameters       {} ({} bytes, optimizer state {} bytes)",
        j.parameters, j.parameter_bytes, j.optimizer_state_bytes
    );
    if j.shards.len() > 1 {
        println!("  shards");
        for sh in &j.shards {
            if sh.up {
                println!(
                    "    {} {:<24} up    chunks {:<6} parameter bytes {:<12} state bytes {:<12} round {}",
                    sh.index,
                    sh.address,
                    sh.chunks,
                    sh.parameter_bytes,
                    sh.optimizer_state_bytes,
                    sh.round
                );
                if !sh.error.is_empty() {
                    println!("      not progressing: {}", sh.error);
                }
            } else {
                println!("    {} {:<24} DOWN  {}", sh.index, sh.address, sh.error);
            }
        }
    }
    match &j.last {
        None => println!("  last round       none yet"),
        Some(l) => {
            let lrs: Vec<String> = l.lr.iter().map(|lr| format!("{lr:.6e}")).collect();
            println!(
                "  last round       {}{}",
                l.round,
                if l.skipped {
                    " (skipped: gradient not finite)"
                } else {
                    ""
                }
            );
            println!("  lr per group     [{}]", lrs.join(", "));
            println!("  grad norm        {:.6e}", l.grad_norm);
            println!("  clip coefficient {:.6}", l.clip_coefficient);
            println!("  participants     {}", l.participants);
        }
    }
}
