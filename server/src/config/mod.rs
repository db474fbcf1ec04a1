//! The daemon's configuration, in layers: built-in defaults, then a TOML
//! file (`--config`), then `PARAMD_*` environment variables, then flags.
//! Every key of the file is the long flag's name with `_` for `-`, and its
//! environment variable is `PARAMD_` and the key in capitals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use paramd_proto::transport::{self, Credentials, Http2Windows};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

mod args;
mod error;

pub use args::{Args, Overrides};
pub use error::ConfigError;

use crate::checkpoint::CheckpointSettings;
use crate::limits::Limits;
use crate::node::NodeConfig;
use crate::token::AuthToken;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Every setting of the daemon, as the TOML file spells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC address.
    pub listen: SocketAddr,
    /// HTTP address of /metrics, /healthz and /readyz.
    pub http_listen: SocketAddr,
    /// Largest chunk a parameter is cut into, in bytes.
    pub chunk_bytes: usize,
    /// Largest gRPC message, in bytes; larger ones are refused unread.
    pub max_message_bytes: usize,
    /// Calls served at once on one client connection; more wait.
    pub max_concurrent_requests: usize,
    /// Connections open at once on each gRPC address; more wait to be accepted.
    pub max_connections: usize,
    /// Rounds of history each job keeps for the status page (0: none).
    pub history_rounds: usize,
    /// Longest a pull waits for its round without a client deadline, in seconds.
    pub max_pull_wait: f64,
    /// This shard's index in `cluster`; 0 is the coordinator.
    pub shard_index: usize,
    /// Every shard's URL in shard order, as clients reach it; empty: a
    /// one-shard cluster.
    pub cluster: Vec<String>,
    /// Address of the shard-to-shard service; required by a cluster of
    /// more than one shard, refused by a one-shard daemon.
    pub peer_listen: Option<SocketAddr>,
    /// Every shard's `peer_listen` URL in shard order, as the other shards
    /// reach it.
    pub peers: Vec<String>,
    /// File holding the token shards present to each other; required with
    /// `auth_token_file` on a cluster, and never the workers' token.
    pub peer_token_file: Option<PathBuf>,
    /// Deadline of a call to another shard, in seconds.
    pub peer_timeout: f64,
    /// Longest the coordinator waits for every shard's report, in seconds.
    pub round_timeout: f64,
    /// Directory of this shard's checkpoints; none: no checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint after every this many rounds (0: on request and at exit).
    pub checkpoint_every: u64,
    /// Checkpoints kept per job.
    pub keep_checkpoints: usize,
    /// Seconds from SIGTERM or SIGINT to exit (final checkpoint and drain).
    pub shutdown_grace: f64,
    /// `plain` or `json`.
    pub log_format: LogFormat,
    /// File holding the bearer token every call must carry.
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate chain of this server; with `tls_key`, gRPC is TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA that other shards' certificates chain to; default: `tls_client_ca`.
    pub tls_peer_ca: Option<PathBuf>,
    /// Jobs held at once.
    pub max_jobs: usize,
    /// Memory one job may need (parameters, gradient, optimizer state), in bytes.
    pub max_job_bytes: u64,
    /// Memory all jobs together may need, in bytes.
    pub max_total_bytes: u64,
    /// Workers of one job.
    pub max_workers: u32,
    /// Parameter tensors of one job.
    pub max_params: usize,
    /// Length of a parameter name, in bytes.
    pub max_name_bytes: usize,
    /// HTTP/2 window of one call this server receives (a push), in bytes.
    pub http2_stream_window: u32,
    /// HTTP/2 window of all calls on one connection this server receives, in bytes.
    pub http2_connection_window: u32,
}

impl Default for Config {
    fn default() -> Self {
        let node = NodeConfig::default();
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
            chunk_bytes: node.chunk_bytes,
            max_message_bytes: node.max_message_bytes,
            max_concurrent_requests: node.max_concurrent_requests,
            max_connections: node.max_connections,
            history_rounds: node.history_rounds,
            max_pull_wait: node.max_pull_wait.as_secs_f64(),
            shard_index: 0,
            cluster: Vec::new(),
            peer_listen: None,
            peers: Vec::new(),
            peer_token_file: None,
            peer_timeout: node.peer_timeout.as_secs_f64(),
            round_timeout: node.round_timeout.as_secs_f64(),
            checkpoint_dir: None,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            shutdown_grace: 20.0,
            log_format: LogFormat::Plain,
            auth_token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_peer_ca: None,
            max_jobs: node.limits.max_jobs,
            max_job_bytes: node.limits.max_job_bytes,
            max_total_bytes: node.limits.max_total_bytes,
            max_workers: node.limits.max_workers,
            max_params: node.limits.max_params,
            max_name_bytes: node.limits.max_name_bytes,
            http2_stream_window: node.windows.stream,
            http2_connection_window: node.windows.connection,
        }
    }
}

/// Keys that may be left unset; `--print-config` lists them as comments.
const OPTIONAL_KEYS: &[&str] = &[
    "peer_listen",
    "peer_token_file",
    "checkpoint_dir",
    "auth_token_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_peer_ca",
];

impl Config {
    /// Parses a TOML file; an unknown key or a wrong type is named with its
    /// line.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse {
                line, key, message, ..
            } => ConfigError::Parse {
                path: Some(path.to_owned()),
                line,
                key,
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let message = e.message().replace('\n', " ");
            let Some(span) = e.span() else {
                return ConfigError::Parse {
                    path: None,
                    line: None,
                    key: None,
                    message,
                };
            };
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            // The key of the offending line, which the message may not name.
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !message.contains(k))
                .map(str::to_owned);
            ConfigError::Parse {
                path: None,
                line: Some(line),
                key,
                message,
            }
        })
    }

    /// The configuration as TOML, with unset optional keys as comments.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# paramd's effective configuration\n");
        out.push_str(&toml::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}\n")));
        let table = toml::Table::try_from(self).unwrap_or_default();
        for key in OPTIONAL_KEYS {
            if !table.contains_key(*key) {
                out.push_str(&format!("# {key} is not set\n"));
            }
        }
        out
    }

    /// The settings checked, with every file they name read: the node's
    /// settings and the grace period. Nothing is bound yet.
    pub fn resolve(&self) -> Result<(NodeConfig, Duration), ConfigError> {
        let seconds = |name: &'static str, v: f64| {
            Duration::try_from_secs_f64(v).map_err(|_| {
                ConfigError::setting(
                    name,
                    format!("{name} must be a non-negative number of seconds, got {v}"),
                )
            })
        };
        if self.checkpoint_dir.is_none() && self.checkpoint_every > 0 {
            return Err(ConfigError::setting(
                "checkpoint_every",
                format!(
                    "checkpoint_every = {} needs checkpoint_dir",
                    self.checkpoint_every
                ),
            ));
        }
        if self.keep_checkpoints == 0 {
            return Err(ConfigError::setting(
                "keep_checkpoints",
                "keep_checkpoints must be at least 1, got 0",
            ));
        }
        for (key, v) in [
            (
                "max_concurrent_requests",
                self.max_concurrent_requests as u64,
            ),
            ("max_connections", self.max_connections as u64),
            ("max_jobs", self.max_jobs as u64),
            ("max_job_bytes", self.max_job_bytes),
            ("max_total_bytes", self.max_total_bytes),
            ("max_workers", u64::from(self.max_workers)),
            ("max_params", self.max_params as u64),
            ("max_name_bytes", self.max_name_bytes as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::setting(
                    key,
                    format!("{key} must be at least 1, got 0"),
                ));
            }
        }
        for (key, v) in [
            ("http2_stream_window", self.http2_stream_window),
            ("http2_connection_window", self.http2_connection_window),
        ] {
            let one = Http2Windows {
                stream: v,
                connection: v,
            };
            one.check(key, key)
                .map_err(|message| ConfigError::setting(key, message))?;
        }
        self.check_peers()?;
        let read = |key: &'static str, path: &Option<PathBuf>| {
            path.as_deref()
                .map(transport::read_token)
                .transpose()
                .map_err(ConfigError::file(key))
        };
        let token = read("auth_token_file", &self.auth_token_file)?;
        let peer_token = read("peer_token_file", &self.peer_token_file)?;
        if self.cluster.len() > 1 && token.is_some() && peer_token.is_none() {
            return Err(ConfigError::setting(
                "peer_token_file",
                "auth_token_file is set, so a cluster needs peer_token_file as well: the \
                 shard-to-shard service never accepts the workers' token",
            ));
        }
        if peer_token.is_some() && peer_token == token {
            return Err(ConfigError::setting(
                "peer_token_file",
                "peer_token_file must hold another token than auth_token_file: a worker's \
                 token never opens the shard-to-shard service",
            ));
        }
        let mut peer_credentials = Credentials::none();
        if let Some(token) = &peer_token {
            peer_credentials = peer_credentials
                .with_token(token)
                .map_err(ConfigError::file("peer_token_file"))?;
        }
        let (tls, peer_tls, peer_credentials) = self.tls(peer_credentials)?;
        let config = NodeConfig {
            chunk_bytes: self.chunk_bytes,
            max_message_bytes: self.max_message_bytes,
            max_concurrent_requests: self.max_concurrent_requests,
            max_connections: self.max_connections,
            history_rounds: self.history_rounds,
            max_pull_wait: seconds("max_pull_wait", self.max_pull_wait)?,
            shard_index: self.shard_index,
            cluster: self.cluster.clone(),
            peers: self.peers.clone(),
            peer_token: peer_token.as_deref().map(AuthToken::new),
            peer_tls,
            peer_timeout: seconds("peer_timeout", self.peer_timeout)?,
            round_timeout: seconds("round_timeout", self.round_timeout)?,
            checkpoints: self.checkpoint_dir.clone().map(|dir| CheckpointSettings {
                dir,
                every: self.checkpoint_every,
                keep: self.keep_checkpoints,
            }),
            peer_credentials,
            auth_token: token.as_deref().map(AuthToken::new),
            tls,
            limits: Limits {
                max_jobs: self.max_jobs,
                max_job_bytes: self.max_job_bytes,
                max_total_bytes: self.max_total_bytes,
                max_workers: self.max_workers,
                max_params: self.max_params,
                max_name_bytes: self.max_name_bytes,
            },
            windows: Http2Windows {
                stream: self.http2_stream_window,
                connection: self.http2_connection_window,
            },
        };
        config.validate()?;
        let grace = seconds("shutdown_grace", self.shutdown_grace)?;
        Ok((config, grace))
    }

    /// Checks the peer settings against the cluster: a cluster of more
    /// than one shard serves the shard-to-shard service on its own address,
    /// a one-shard daemon does not serve it at all.
    fn check_peers(&self) -> Result<(), ConfigError> {
        let shards = self.cluster.len();
        if shards <= 1 {
            let set = [
                ("peer_listen", self.peer_listen.is_some()),
                ("peers", !self.peers.is_empty()),
                ("peer_token_file", self.peer_token_file.is_some()),
            ];
            return match set.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(ConfigError::setting(
                    key,
                    format!(
                        "{key} is set, but a one-shard daemon has no peers (cluster lists \
                         {shards} shards)"
                    ),
                )),
                None => Ok(()),
            };
        }
        let Some(peer_listen) = self.peer_listen else {
            return Err(ConfigError::setting(
                "peer_listen",
                format!(
                    "a cluster of {shards} shards needs peer_listen: the address the other \
                     shards call this one on, apart from the workers' listen address"
                ),
            ));
        };
        if peer_listen == self.listen {
            return Err(ConfigError::setting(
                "peer_listen",
                format!(
                    "peer_listen = {peer_listen} is the workers' listen address; the \
                     shard-to-shard service needs its own"
                ),
            ));
        }
        if self.peers.len() != shards {
            return Err(ConfigError::setting(
                "peers",
                format!(
                    "peers lists {} URLs but cluster lists {shards} shards",
                    self.peers.len()
                ),
            ));
        }
        if let Some((i, url)) = self
            .peers
            .iter()
            .enumerate()
            .find(|(_, url)| self.cluster.contains(url))
        {
            return Err(ConfigError::setting(
                "peers",
                format!(
                    "peers[{i}] = {url:?} is also in cluster: shards call each other on their \
                     peer_listen address, not on the workers'"
                ),
            ));
        }
        Ok(())
    }

    /// The server's TLS settings on the workers' address and on the peer
    /// address (which asks for a certificate of the peer CA), and `peer`
    /// with the CA and identity this shard uses to call the others, when
    /// TLS is on.
    #[allow(clippy::type_complexity)]
    fn tls(
        &self,
        peer: Credentials,
    ) -> Result<
        (
            Option<ServerTlsConfig>,
            Option<ServerTlsConfig>,
            Credentials,
        ),
        ConfigError,
    > {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) => {
                let needs_identity = [
                    ("tls_client_ca", &self.tls_client_ca),
                    ("tls_peer_ca", &self.tls_peer_ca),
                ];
                if let Some((key, Some(ca))) = needs_identity.iter().find(|(_, v)| v.is_some()) {
                    return Err(ConfigError::setting(
                        key,
                        format!(
                            "{key} = {:?} needs tls_cert and tls_key",
                            ca.display().to_string()
                        ),
                    ));
                }
                return Ok((None, None, peer));
            }
            (Some(c), None) => {
                return Err(ConfigError::setting(
                    "tls_cert",
                    format!("tls_cert = {:?} needs tls_key", c.display().to_string()),
                ));
            }
            (None, Some(k)) => {
                return Err(ConfigError::setting(
                    "tls_key",
                    format!("tls_key = {:?} needs tls_cert", k.display().to_string()),
                ));
            }
        };
        let read = |key: &'static str, path: &Path| {
            transport::read_file(key, path).map_err(ConfigError::file(key))
        };
        let identity = Identity::from_pem(read("tls_cert", cert)?, read("tls_key", key)?);
        let mut server = ServerTlsConfig::new().identity(identity.clone());
        if let Some(ca) = &self.tls_client_ca {
            server = server.client_ca_root(Certificate::from_pem(read("tls_client_ca", ca)?));
        }
        let peer_ca = match (&self.tls_peer_ca, &self.tls_client_ca) {
            (Some(ca), _) => Some(("tls_peer_ca", ca)),
            (None, Some(ca)) => Some(("tls_client_ca", ca)),
            (None, None) => None,
        };
        let (peer_server, peer) = match peer_ca {
            Some((key_name, ca)) => (
                Some(
                    ServerTlsConfig::new()
                        .identity(identity)
                        .client_ca_root(Certificate::from_pem(read(key_name, ca)?)),
                ),
                peer.with_tls(ca, Some((cert, key)))
                    .map_err(ConfigError::file(key_name))?,
            ),
            None if self.cluster.len() > 1 => {
                return Err(ConfigError::setting(
                    "tls_peer_ca",
                    "a TLS cluster needs tls_peer_ca (or tls_client_ca) to check the other \
                         shards",
                ));
            }
            None => (None, peer),
        };
        Ok((Some(server), peer_server, peer))
    }
}

#[cfg(test)]
mod tests;
