//! The command line and the environment: every setting as an optional
//! flag with its `PARAMD_*` variable, laid over the file and the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Config, ConfigError, LogFormat};

/// The command line. Each setting is optional here: what is not given falls
/// through to the environment, the file and the defaults.
#[derive(Debug, clap::Parser)]
#[command(
    name = "paramd",
    version,
    about = "A parameter server whose SGD, Adam and AdamW reproduce torch.optim",
    after_help = "Settings come from the defaults, then --config FILE, then PARAMD_* \
                  environment variables, then flags; --print-config shows the result."
)]
pub struct Args {
    /// TOML file of settings (keys: the long flags, with _ for -).
    #[arg(long, env = "PARAMD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub overrides: Overrides,
}

/// Settings given on the command line or in the environment.
#[derive(Debug, Default, clap::Args)]
pub struct Overrides {
    /// gRPC address [default: 0.0.0.0:50051].
    #[arg(long, env = "PARAMD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP address of /metrics, /healthz and /readyz [default: 0.0.0.0:9464].
    #[arg(long, env = "PARAMD_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Largest chunk a parameter is cut into, in bytes [default: 4 MiB].
    #[arg(long, env = "PARAMD_CHUNK_BYTES")]
    pub chunk_bytes: Option<usize>,
    /// Largest gRPC message, in bytes [default: 64 MiB].
    #[arg(long, env = "PARAMD_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Calls served at once per client connection [default: 256].
    #[arg(long, env = "PARAMD_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Connections open at once on each gRPC address [default: 4096].
    #[arg(long, env = "PARAMD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Rounds of history each job keeps for the status page, 0 for none [default: 10000].
    #[arg(long, env = "PARAMD_HISTORY_ROUNDS")]
    pub history_rounds: Option<usize>,
    /// Longest a pull waits for its round without a deadline, in seconds [default: 300].
    #[arg(long, env = "PARAMD_MAX_PULL_WAIT")]
    pub max_pull_wait: Option<f64>,
    /// This shard's index in --cluster; 0 is the coordinator [default: 0].
    #[arg(long, env = "PARAMD_SHARD_INDEX")]
    pub shard_index: Option<usize>,
    /// URLs of every shard, comma-separated, in shard order [default: one shard].
    #[arg(long, env = "PARAMD_CLUSTER", value_delimiter = ',')]
    pub cluster: Option<Vec<String>>,
    /// Address of the shard-to-shard service (a cluster needs it) [default: none].
    #[arg(long, env = "PARAMD_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Every shard's --peer-listen URL, comma-separated, in shard order [default: none].
    #[arg(long, env = "PARAMD_PEERS", value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// File holding the token shards present to each other [default: none].
    #[arg(long, env = "PARAMD_PEER_TOKEN_FILE")]
    pub peer_token_file: Option<PathBuf>,
    /// HTTP/2 window of one call this server receives (a push), in bytes [default: 8388608].
    #[arg(long, env = "PARAMD_HTTP2_STREAM_WINDOW")]
    pub http2_stream_window: Option<u32>,
    /// HTTP/2 window of all calls on one connection this server receives, in bytes [default: 33554432].
    #[arg(long, env = "PARAMD_HTTP2_CONNECTION_WINDOW")]
    pub http2_connection_window: Option<u32>,
    /// Deadline of a call to another shard, in seconds [default: 10].
    #[arg(long, env = "PARAMD_PEER_TIMEOUT")]
    pub peer_timeout: Option<f64>,
    /// Longest the coordinator waits for every shard's report, in seconds [default: 60].
    #[arg(long, env = "PARAMD_ROUND_TIMEOUT")]
    pub round_timeout: Option<f64>,
    /// Directory of this shard's checkpoints, restored before serving [default: none].
    #[arg(long, env = "PARAMD_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint after every this many rounds; 0: on request and at exit [default: 0].
    #[arg(long, env = "PARAMD_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept per job [default: 3].
    #[arg(long, env = "PARAMD_KEEP_CHECKPOINTS")]
    pub keep_checkpoints: Option<usize>,
    /// Seconds from SIGTERM or SIGINT to exit, checkpoint and drain [default: 20].
    #[arg(long, env = "PARAMD_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<f64>,
    /// Log format [default: plain].
    #[arg(long, env = "PARAMD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// File holding the bearer token every call must carry [default: none].
    #[arg(long, env = "PARAMD_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate of this server; with --tls-key, gRPC is TLS [default: none].
    #[arg(long, env = "PARAMD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [default: none].
    #[arg(long, env = "PARAMD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA client certificates must chain to: mutual TLS [default: none].
    #[arg(long, env = "PARAMD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA of the other shards' certificates [default: --tls-client-ca].
    #[arg(long, env = "PARAMD_TLS_PEER_CA")]
    pub tls_peer_ca: Option<PathBuf>,
    /// Jobs held at once [default: 1024].
    #[arg(long, env = "PARAMD_MAX_JOBS")]
    pub max_jobs: Option<usize>,
    /// Memory one job may need (parameters, gradient, state), in bytes [default: 16 GiB].
    #[arg(long, env = "PARAMD_MAX_JOB_BYTES")]
    pub max_job_bytes: Option<u64>,
    /// Memory all jobs together may need, in bytes [default: 16 GiB].
    #[arg(long, env = "PARAMD_MAX_TOTAL_BYTES")]
    pub max_total_bytes: Option<u64>,
    /// Workers of one job [default: 4096].
    #[arg(long, env = "PARAMD_MAX_WORKERS")]
    pub max_workers: Option<u32>,
    /// Parameter tensors of one job [default: 100000].
    #[arg(long, env = "PARAMD_MAX_PARAMS")]
    pub max_params: Option<usize>,
    /// Length of a parameter name, in bytes [default: 1024].
    #[arg(long, env = "PARAMD_MAX_NAME_BYTES")]
    pub max_name_bytes: Option<usize>,
}

/// Sets each field of `config` that `overrides` gives.
macro_rules! overlay {
    ($config:ident, $overrides:ident; $($field:ident),* ; optional $($opt:ident),*) => {
        $( if let Some(v) = $overrides.$field { $config.$field = v; } )*
        $( if let Some(v) = $overrides.$opt { $config.$opt = Some(v); } )*
    };
}

impl Config {
    /// The configuration `args` describe: defaults, the file, then the
    /// environment and flags (clap gives flags precedence over variables).
    pub fn load(args: Args) -> Result<Config, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let o = args.overrides;
        overlay!(config, o;
            listen, http_listen, chunk_bytes, max_message_bytes, max_concurrent_requests,
            max_connections, history_rounds,
            max_pull_wait, shard_index, cluster, peers, peer_timeout, round_timeout, checkpoint_every,
            keep_checkpoints, shutdown_grace, log_format, max_jobs, max_job_bytes,
            max_total_bytes, max_workers, max_params, max_name_bytes, http2_stream_window,
            http2_connection_window;
            optional peer_listen, peer_token_file, checkpoint_dir, auth_token_file, tls_cert, tls_key, tls_client_ca, tls_peer_ca);
        Ok(config)
    }
}
