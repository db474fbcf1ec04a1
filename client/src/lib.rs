//! The Rust client of paramd, and the trace replay behind `paramctl`.
//!
//! ```no_run
//! # async fn example() -> Result<(), paramd_client::ClientError> {
//! use paramd_client::Client;
//! let mut client = Client::connect("http://127.0.0.1:50051").await?;
//! let status = client.status(None).await?;
//! println!("{} jobs", status.jobs.len());
//! # Ok(()) }
//! ```

pub mod replay;
pub mod trace;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use paramd_proto::v1 as pb;
use paramd_proto::v1::param_server_client::ParamServerClient;
use tonic::transport::{Channel, Endpoint};

pub use paramd_proto::v1;

/// Largest segment a tensor is cut into, and the payload packed into one
/// message: far below the 64 MiB message limit whatever the model size.
const MESSAGE_BYTES: usize = 4 << 20;

/// Largest message the client decodes or encodes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The gRPC status, when the server answered with an error.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// The result type of the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Parameters pulled from the server.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// Rounds completed when the parameters were read.
    pub round: u64,
    /// The outcome of the last completed round.
    pub last: Option<pb::RoundOutcome>,
    /// Values by parameter name.
    pub params: HashMap<String, Vec<f32>>,
}

/// A connection to one paramd server.
#[derive(Debug, Clone)]
pub struct Client {
    inner: ParamServerClient<Channel>,
    /// Deadline of every call (a pull's wait included).
    pub timeout: Duration,
}

impl Client {
    /// Connects to `url` (`http://host:port`).
    pub async fn connect(url: &str) -> Result<Client> {
        let connect_err = |source| ClientError::Connect {
            url: url.to_owned(),
            source,
        };
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(connect_err)?
            .connect_timeout(Duration::from_secs(10))
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(connect_err)?;
        let inner = ParamServerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Client {
            inner,
            timeout: Duration::from_secs(300),
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// Creates job `job` with `spec` and initial `values`, or finds it.
    pub async fn init(
        &mut self,
        job: &str,
        spec: pb::JobSpec,
        values: &[(&str, &[f32])],
    ) -> Result<pb::InitResponse> {
        let mut messages: Vec<pb::InitRequest> = pack(values)
            .into_iter()
            .map(|values| pb::InitRequest {
                values,
                ..Default::default()
            })
            .collect();
        if messages.is_empty() {
            messages.push(pb::InitRequest::default());
        }
        messages[0].job = job.to_owned();
        messages[0].spec = Some(spec);
        let req = self.request(futures::stream::iter(messages));
        Ok(self.inner.init(req).await?.into_inner())
    }

    /// Pushes worker `worker`'s gradients for `round`. Safe to retry: the
    /// server counts a (worker, round) once.
    pub async fn push(
        &mut self,
        job: &str,
        worker: u32,
        round: u64,
        grads: &[(&str, &[f32])],
    ) -> Result<pb::PushResponse> {
        let mut messages: Vec<pb::PushRequest> = pack(grads)
            .into_iter()
            .map(|grads| pb::PushRequest {
                grads,
                ..Default::default()
            })
            .collect();
        if messages.is_empty() {
            messages.push(pb::PushRequest::default());
        }
        messages[0].job = job.to_owned();
        messages[0].worker = worker;
        messages[0].round = round;
        let req = self.request(futures::stream::iter(messages));
        Ok(self.inner.push(req).await?.into_inner())
    }

    /// Pulls every parameter once `round` rounds have completed.
    pub async fn pull(&mut self, job: &str, round: u64) -> Result<Pulled> {
        self.pull_params(job, round, &[]).await
    }

    /// Pulls the named parameters (all when empty) once `round` rounds have
    /// completed.
    pub async fn pull_params(
        &mut self,
        job: &str,
        round: u64,
        params: &[String],
    ) -> Result<Pulled> {
        let req = self.request(pb::PullRequest {
            job: job.to_owned(),
            round,
            params: params.to_vec(),
        });
        let mut stream = self.inner.pull(req).await?.into_inner();
        let mut pulled = Pulled {
            round: 0,
            last: None,
            params: HashMap::new(),
        };
        let mut first = true;
        while let Some(msg) = stream.message().await? {
            if first {
                pulled.round = msg.round;
                pulled.last = msg.last;
                first = false;
            }
            for seg in msg.params {
                place(&mut pulled.params, seg)?;
            }
        }
        Ok(pulled)
    }

    /// Status of job `job`, or of every job.
    pub async fn status(&mut self, job: Option<&str>) -> Result<pb::StatusResponse> {
        let req = self.request(pb::StatusRequest {
            job: job.unwrap_or_default().to_owned(),
        });
        Ok(self.inner.status(req).await?.into_inner())
    }

    /// Deletes job `job`.
    pub async fn delete_job(&mut self, job: &str) -> Result<()> {
        let req = self.request(pb::DeleteJobRequest {
            job: job.to_owned(),
        });
        self.inner.delete_job(req).await?;
        Ok(())
    }
}

/// Encodes f32 values as little-endian bytes.
pub fn to_le_bytes(values: &[f32]) -> Bytes {
    let mut out = vec![0u8; values.len() * 4];
    for (d, v) in out.chunks_exact_mut(4).zip(values) {
        d.copy_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// Cuts tensors into segments of at most `MESSAGE_BYTES` and packs them
/// into messages of at most that many payload bytes.
fn pack(tensors: &[(&str, &[f32])]) -> Vec<Vec<pb::Segment>> {
    let per = MESSAGE_BYTES / 4;
    let mut messages: Vec<Vec<pb::Segment>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for (name, values) in tensors {
        let mut offset = 0;
        loop {
            let end = (offset + per).min(values.len());
            let n = end - offset;
            if size + 4 * n > MESSAGE_BYTES && !current.is_empty() {
                messages.push(std::mem::take(&mut current));
                size = 0;
            }
            current.push(pb::Segment {
                param: (*name).to_owned(),
                offset: offset as u64,
                data: to_le_bytes(&values[offset..end]),
            });
            size += 4 * n;
            offset = end;
            if offset >= values.len() {
                break;
            }
        }
    }
    if !current.is_empty() {
        messages.push(current);
    }
    messages
}

/// Writes a pulled segment into its parameter's values.
fn place(params: &mut HashMap<String, Vec<f32>>, seg: pb::Segment) -> Result<()> {
    if !seg.data.len().is_multiple_of(4) {
        return Err(ClientError::Invalid(format!(
            "server sent {} bytes for '{}', not a multiple of 4",
            seg.data.len(),
            seg.param
        )));
    }
    let offset = usize::try_from(seg.offset)
        .map_err(|_| ClientError::Invalid(format!("offset {} too large", seg.offset)))?;
    let n = seg.data.len() / 4;
    let values = params.entry(seg.param).or_default();
    if values.len() < offset + n {
        values.resize(offset + n, 0.0);
    }
    for (d, b) in values[offset..offset + n]
        .iter_mut()
        .zip(seg.data.chunks_exact(4))
    {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_splits_large_tensors_and_round_trips() {
        let big: Vec<f32> = (0..(MESSAGE_BYTES / 4 * 2 + 3)).map(|i| i as f32).collect();
        let small = [1.5f32, -2.0];
        let messages = pack(&[("big", &big), ("small", &small)]);
        assert!(messages.len() >= 3);
        for m in &messages {
            assert!(m.iter().map(|s| s.data.len()).sum::<usize>() <= MESSAGE_BYTES);
        }
        let mut params = HashMap::new();
        for seg in messages.into_iter().flatten() {
            place(&mut params, seg).expect("place");
        }
        assert_eq!(params["big"], big);
        assert_eq!(params["small"], small);
    }
}
