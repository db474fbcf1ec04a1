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
/// `wrong_shard`, `shard`, `internal`. Clients choose their error types from
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
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
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
