//! How a client reaches a paramd server: TLS and a bearer token, shared by
//! the Rust client, `paramctl` and the shards' calls to one another.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel whose every call carries the credentials' token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// HTTP/2 frames of 1 MiB instead of 16 KiB: 64x fewer frames per tensor.
pub const MAX_FRAME: u32 = 1 << 20;

/// The metadata key of the token.
pub const AUTHORIZATION: &str = "authorization";

/// The metadata key (a trailer of a failed call) of the machine-readable
/// reason of a refusal: `stale`, `early`, `job_mismatch`, `unknown_job`,
/// `invalid`, `too_large`, `timeout`, `unavailable`, `aborted`,
/// `wrong_shard`, `shard`, `internal`, `precondition`, `not_member`. Clients choose their error types from
/// the code and this reason, never from the message's text.
pub const REASON: &str = "paramd-reason";

/// Reads a secret or PEM file, naming it in the error.
pub fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Reads a token file: the token is its content without surrounding
/// whitespace, and must be a non-empty run of visible ASCII.
pub fn read_token(path: &Path) -> Result<String, String> {
    let raw = read_file("token file", path)?;
    let token = String::from_utf8(raw)
        .map_err(|_| format!("token file {} is not UTF-8", path.display()))?;
    check_token(token.trim(), &format!("token file {}", path.display()))
}

/// Checks that `token` can travel as a bearer token; `source` names where it
/// came from. The token itself is never part of the message.
pub fn check_token(token: &str, source: &str) -> Result<String, String> {
    if token.is_empty() {
        return Err(format!("{source} holds an empty token"));
    }
    if let Some(bad) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "{source}: a token is visible ASCII without spaces, found {:?}",
            bad.escape_default().to_string()
        ));
    }
    Ok(token.to_owned())
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.0.is_some() {
            "<redacted>"
        } else {
            "none"
        };
        f.debug_tuple("Bearer").field(&shown).finish()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

/// What a client presents: an optional bearer token, and TLS settings used
/// for `https://` URLs.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    bearer: Bearer,
    tls: Option<ClientTlsConfig>,
    windows: Http2Windows,
}

/// HTTP/2 flow-control windows, in bytes, of the side that receives: a
/// stream (one call) sends at most `stream` bytes, and a connection (all its
/// calls) at most `connection`, before the receiver acknowledges them. One
/// stream's throughput is at most `stream / round-trip time`: the defaults
/// (8 MiB and 32 MiB) carry a 1 Gbit/s link up to 67 ms of round trip; a
/// long link wants `stream >= rate x round trip` (its bandwidth-delay
/// product).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http2Windows {
    pub stream: u32,
    pub connection: u32,
}

impl Default for Http2Windows {
    fn default() -> Self {
        Http2Windows {
            stream: 8 << 20,
            connection: 32 << 20,
        }
    }
}

/// The environment variables of a client's windows.
pub const STREAM_WINDOW_ENV: &str = "PARAMD_HTTP2_STREAM_WINDOW";
pub const CONNECTION_WINDOW_ENV: &str = "PARAMD_HTTP2_CONNECTION_WINDOW";

impl Http2Windows {
    /// Refuses windows HTTP/2 does not allow (64 KiB - 1 to 2 GiB - 1 bytes),
    /// naming the setting (`stream_name`, `connection_name`).
    pub fn check(&self, stream_name: &str, connection_name: &str) -> Result<(), String> {
        const MIN: u32 = 65_535;
        const MAX: u32 = (1 << 31) - 1;
        for (name, v) in [
            (stream_name, self.stream),
            (connection_name, self.connection),
        ] {
            if !(MIN..=MAX).contains(&v) {
                return Err(format!(
                    "{name}: {v} bytes is not an HTTP/2 window ({MIN} to {MAX} bytes)"
                ));
            }
        }
        Ok(())
    }

    /// The defaults, with `PARAMD_HTTP2_STREAM_WINDOW` and
    /// `PARAMD_HTTP2_CONNECTION_WINDOW` (bytes) over them where set: the
    /// windows of what a client receives (pulls).
    pub fn from_env() -> Result<Http2Windows, String> {
        let mut w = Http2Windows::default();
        for (name, slot) in [
            (STREAM_WINDOW_ENV, &mut w.stream),
            (CONNECTION_WINDOW_ENV, &mut w.connection),
        ] {
            if let Ok(v) = std::env::var(name) {
                *slot = v
                    .trim()
                    .parse()
                    .map_err(|e| format!("{name}: {v:?} is not a number of bytes ({e})"))?;
            }
        }
        w.check(STREAM_WINDOW_ENV, CONNECTION_WINDOW_ENV)?;
        Ok(w)
    }
}

impl Credentials {
    /// No token; `https://` URLs are checked against the system's roots
    /// only if a CA is given, so give one for TLS.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// Sends `token` with every call.
    pub fn with_token(mut self, token: &str) -> Result<Credentials, String> {
        let token = check_token(token, "the token")?;
        let value = format!("Bearer {token}")
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        self.bearer = Bearer(Some(value));
        Ok(self)
    }

    /// Verifies servers with the PEM CA at `ca` and, when both are given,
    /// presents the PEM certificate and key (mutual TLS).
    pub fn with_tls(
        mut self,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Credentials, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_file("CA certificate", ca)?));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(
                read_file("certificate", cert)?,
                read_file("key", key)?,
            ));
        }
        self.tls = Some(tls);
        Ok(self)
    }

    /// As [`Credentials::with_tls`], from PEM bytes; without a CA, servers
    /// are checked against the system's roots.
    pub fn with_tls_pem(
        mut self,
        ca: Option<Vec<u8>>,
        identity: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Credentials, String> {
        let mut tls = match ca {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        self.tls = Some(tls);
        Ok(self)
    }

    /// Receives with `windows` (see [`Http2Windows`]).
    pub fn with_windows(mut self, windows: Http2Windows) -> Credentials {
        self.windows = windows;
        self
    }

    /// Whether a token is sent.
    pub fn has_token(&self) -> bool {
        self.bearer.0.is_some()
    }

    /// An endpoint for `url` tuned for tensors: large HTTP/2 windows and
    /// frames, no Nagle, keepalive, `connect_timeout`; TLS for `https://`.
    pub fn endpoint(&self, url: &str, connect_timeout: Duration) -> Result<Endpoint, String> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("bad URL {url:?}: {e}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(self.windows.stream)
            .initial_connection_window_size(self.windows.connection)
            .max_frame_size(MAX_FRAME);
        if url.starts_with("https://") {
            let tls = self.tls.clone().ok_or_else(|| {
                format!("{url} is https: give the CA certificate that signed the server's")
            })?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("bad TLS settings for {url}: {e}"))?;
        }
        Ok(endpoint)
    }

    /// Wraps `channel` so every call carries the token.
    pub fn wrap(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.bearer.clone())
    }
}
