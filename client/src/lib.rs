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

pub mod bench;
pub mod export;
pub mod replay;
pub mod trace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use paramd_proto::transport::AuthChannel;
use paramd_proto::v1 as pb;
use paramd_proto::v1::param_server_client::ParamServerClient;
use tonic::transport::Endpoint;

pub use paramd_proto::transport::Credentials;
pub use paramd_proto::v1;
pub use paramd_proto::wire::to_le_bytes;

/// Largest segment a tensor is cut into, and the payload packed into one
/// message: far below the 64 MiB message limit whatever the model size.
const MESSAGE_BYTES: usize = 4 << 20;

/// Pulls tried before giving up on shards that keep answering from
/// different rounds.
const MAX_PULL_ATTEMPTS: usize = 5;

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
    Status(tonic::Status),
    /// A shard of a cluster answered with an error, or could not be reached.
    #[error("shard {shard} at {url}: {}: {}", .status.code(), .status.message())]
    Shard {
        shard: usize,
        url: String,
        status: tonic::Status,
    },
    #[error("{0}")]
    Invalid(String),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> ClientError {
        ClientError::Status(deadline(status))
    }
}

/// tonic reports the client's own deadline as CANCELLED "Timeout expired";
/// it is DEADLINE_EXCEEDED, as the server would say.
fn deadline(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        tonic::Status::deadline_exceeded("the call's deadline passed (client side)")
    } else {
        status
    }
}

impl ClientError {
    /// The gRPC status, when a server answered with an error.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) | ClientError::Shard { status: s, .. } => Some(s),
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

/// Where a job's chunks live, and a connection to every shard.
#[derive(Debug)]
struct Route {
    chunk_elems: usize,
    /// First chunk id and element count of every parameter.
    params: HashMap<String, (usize, usize)>,
    owners: Vec<u32>,
    shards: Vec<(String, ParamServerClient<AuthChannel>)>,
}

impl Route {
    /// Cuts tensors into one list of segments per shard. A tensor the
    /// layout does not describe (unknown, or of the wrong size) goes whole
    /// to every shard: each refuses the whole push, naming what is wrong,
    /// so no shard counts part of it.
    fn split(&self, tensors: &[(&str, &[f32])]) -> Vec<Vec<pb::Segment>> {
        let mut out = vec![Vec::new(); self.shards.len()];
        for (name, values) in tensors {
            match self.params.get(*name) {
                Some(&(first, numel)) if numel == values.len() => {
                    for (k, part) in values.chunks(self.chunk_elems).enumerate() {
                        out[self.owners[first + k] as usize].push(pb::Segment {
                            param: (*name).to_owned(),
                            offset: (k * self.chunk_elems) as u64,
                            data: to_le_bytes(part),
                        });
                    }
                }
                _ => {
                    let whole = segments(name, values);
                    for shard in &mut out {
                        shard.extend(whole.iter().cloned());
                    }
                }
            }
        }
        out
    }
}

/// A connection to a paramd server or cluster (through its coordinator).
#[derive(Debug, Clone)]
pub struct Client {
    inner: ParamServerClient<AuthChannel>,
    url: String,
    credentials: Credentials,
    routes: Arc<Mutex<HashMap<String, Arc<Route>>>>,
    /// Deadline of every call (a pull's wait included).
    pub timeout: Duration,
}

/// The longest a connection attempt takes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn endpoint(url: &str, credentials: &Credentials, connect_timeout: Duration) -> Result<Endpoint> {
    credentials
        .endpoint(url, connect_timeout)
        .map_err(|e| ClientError::Invalid(format!("cannot connect to {url}: {e}")))
}

/// A connection to `url`, made now, whose calls carry the token.
async fn connect(url: &str, credentials: &Credentials) -> Result<AuthChannel> {
    let channel = endpoint(url, credentials, CONNECT_TIMEOUT)?
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            url: url.to_owned(),
            source,
        })?;
    Ok(credentials.wrap(channel))
}

fn grpc_client(channel: AuthChannel) -> ParamServerClient<AuthChannel> {
    ParamServerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl Client {
    /// Connects to `url` (`http://host:port`), the coordinator of a cluster.
    pub async fn connect(url: &str) -> Result<Client> {
        Client::connect_with(url, Credentials::none()).await
    }

    /// Connects to `url` presenting `credentials`: a bearer token, and the
    /// CA and client certificate used for `https://` URLs. Every shard of
    /// the cluster is reached with the same credentials.
    pub async fn connect_with(url: &str, credentials: Credentials) -> Result<Client> {
        let channel = connect(url, &credentials).await?;
        Ok(Client {
            inner: grpc_client(channel),
            url: url.to_owned(),
            credentials,
            routes: Arc::default(),
            timeout: Duration::from_secs(300),
        })
    }

    /// The standard gRPC health status of `url` for `service` ("" for the
    /// whole server): what probes ask, answered without a token.
    pub async fn health(
        url: &str,
        credentials: &Credentials,
        service: &str,
        timeout: Duration,
    ) -> Result<tonic_health::ServingStatus> {
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus as Pb};
        let mut client =
            tonic_health::pb::health_client::HealthClient::new(connect(url, credentials).await?);
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        });
        req.set_timeout(timeout);
        let status = client.check(req).await?.into_inner().status;
        Ok(match Pb::try_from(status) {
            Ok(Pb::Serving) => tonic_health::ServingStatus::Serving,
            Ok(Pb::NotServing) => tonic_health::ServingStatus::NotServing,
            _ => tonic_health::ServingStatus::Unknown,
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// The layout of `job`, fetched from the coordinator once.
    async fn route(&self, job: &str) -> Result<Arc<Route>> {
        if let Some(r) = self.routes.lock().ok().and_then(|m| m.get(job).cloned()) {
            return Ok(r);
        }
        let req = self.request(pb::LayoutRequest {
            job: job.to_owned(),
        });
        let layout = self.inner.clone().layout(req).await?.into_inner();
        let chunk_elems = usize::try_from(layout.chunk_elems)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "layout of '{job}': chunk_elems is {}",
                    layout.chunk_elems
                ))
            })?;
        let mut params = HashMap::new();
        let mut next = 0;
        for p in &layout.params {
            let numel = p.shape.iter().product::<u64>() as usize;
            params.insert(p.name.clone(), (next, numel));
            next += numel.div_ceil(chunk_elems);
        }
        if next != layout.owners.len() {
            return Err(ClientError::Invalid(format!(
                "layout of '{job}' has {} owners for {next} chunks",
                layout.owners.len()
            )));
        }
        // Shard 0 is reached as the coordinator was; the others at the
        // addresses the cluster was started with.
        let mut shards = vec![(self.url.clone(), self.inner.clone())];
        for url in layout.shards.iter().skip(1) {
            shards.push((
                url.clone(),
                grpc_client(
                    self.credentials.wrap(
                        // A shard that vanished fails within the call's
                        // deadline, not after a longer connect timeout.
                        endpoint(url, &self.credentials, CONNECT_TIMEOUT.min(self.timeout))?
                            .connect_lazy(),
                    ),
                ),
            ));
        }
        if let Some(&bad) = layout.owners.iter().find(|&&o| o as usize >= shards.len()) {
            return Err(ClientError::Invalid(format!(
                "layout of '{job}' names shard {bad} of {}",
                shards.len()
            )));
        }
        let route = Arc::new(Route {
            chunk_elems,
            params,
            owners: layout.owners,
            shards,
        });
        if let Ok(mut m) = self.routes.lock() {
            m.insert(job.to_owned(), Arc::clone(&route));
        }
        Ok(route)
    }

    /// Where the chunks of `job` live, and its parameters' names and shapes.
    pub async fn layout(&self, job: &str) -> Result<pb::LayoutResponse> {
        let req = self.request(pb::LayoutRequest {
            job: job.to_owned(),
        });
        Ok(self.inner.clone().layout(req).await?.into_inner())
    }

    /// Creates job `job` with `spec` and initial `values`, or finds it.
    pub async fn init(
        &mut self,
        job: &str,
        spec: pb::JobSpec,
        values: &[(&str, &[f32])],
    ) -> Result<pb::InitResponse> {
        let all: Vec<pb::Segment> = values.iter().flat_map(|(n, v)| segments(n, v)).collect();
        let mut messages: Vec<pb::InitRequest> = pack(all)
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

    /// Pushes worker `worker`'s gradients for `round`, each chunk straight
    /// to its shard, all shards at once. Safe to retry: a shard counts a
    /// (worker, round) once.
    pub async fn push(
        &mut self,
        job: &str,
        worker: u32,
        round: u64,
        grads: &[(&str, &[f32])],
    ) -> Result<pb::PushResponse> {
        let route = self.route(job).await?;
        let calls = route.split(grads).into_iter().enumerate().map(|(i, segs)| {
            // A header-only first message: the server admits or refuses the
            // push (stale, early, duplicate) before any payload is sent.
            let header = pb::PushRequest {
                job: job.to_owned(),
                worker,
                round,
                grads: Vec::new(),
            };
            let messages: Vec<pb::PushRequest> = std::iter::once(header)
                .chain(pack(segs).into_iter().map(|grads| pb::PushRequest {
                    grads,
                    ..Default::default()
                }))
                .collect();
            let (url, mut client) = route.shards[i].clone();
            let n = route.shards.len();
            let timeout = self.timeout;
            async move {
                // ABORTED: another copy of this push is being received (a
                // retry raced the original). Pushes are idempotent, so send
                // again after a short pause: it will be a duplicate.
                let deadline = std::time::Instant::now() + timeout;
                let mut pause = Duration::from_millis(5);
                loop {
                    let mut req = tonic::Request::new(futures::stream::iter(messages.clone()));
                    req.set_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
                    match client.push(req).await {
                        Err(s)
                            if s.code() == tonic::Code::Aborted
                                && std::time::Instant::now() + pause < deadline =>
                        {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(200));
                        }
                        r => return r.map_err(|s| shard_error(i, &url, s, n)),
                    }
                }
            }
        });
        let mut out = pb::PushResponse {
            duplicate: true,
            pushed: u32::MAX,
        };
        // Every reachable shard gets its part even if another is down, so a
        // retry only has to reach the missing ones; the first error is
        // returned.
        for r in futures::future::join_all(calls).await {
            let r = r?.into_inner();
            out.duplicate &= r.duplicate;
            out.pushed = out.pushed.min(r.pushed);
        }
        Ok(out)
    }

    /// Pulls every parameter once `round` rounds have completed.
    pub async fn pull(&mut self, job: &str, round: u64) -> Result<Pulled> {
        self.pull_params(job, round, &[]).await
    }

    /// Pulls the named parameters (all when empty) from every shard once
    /// `round` rounds have completed there.
    pub async fn pull_params(
        &mut self,
        job: &str,
        round: u64,
        params: &[String],
    ) -> Result<Pulled> {
        // Shards answer as of their own latest round, which may differ if
        // training moved on while they were read: pull again at the newest
        // so that every value comes from one round.
        let mut want = round;
        for _ in 0..MAX_PULL_ATTEMPTS {
            let (pulled, newest) = self.pull_once(job, want, params).await?;
            if pulled.round == newest {
                return Ok(pulled);
            }
            want = newest;
        }
        Err(ClientError::Invalid(format!(
            "job '{job}': the shards kept answering from different rounds over {MAX_PULL_ATTEMPTS} pulls; training moves faster than a pull"
        )))
    }

    /// One pull from every shard: what they sent, with the oldest round any
    /// of them answered from, and the newest.
    async fn pull_once(
        &mut self,
        job: &str,
        round: u64,
        params: &[String],
    ) -> Result<(Pulled, u64)> {
        let route = self.route(job).await?;
        let calls = route.shards.iter().enumerate().map(|(i, (url, client))| {
            let req = self.request(pb::PullRequest {
                job: job.to_owned(),
                round,
                params: params.to_vec(),
            });
            let mut client = client.clone();
            let n = route.shards.len();
            async move {
                let mut stream = client
                    .pull(req)
                    .await
                    .map_err(|s| shard_error(i, url, s, n))?
                    .into_inner();
                let mut messages = Vec::new();
                while let Some(m) = stream
                    .message()
                    .await
                    .map_err(|s| shard_error(i, url, s, n))?
                {
                    messages.push(m);
                }
                Ok::<_, ClientError>(messages)
            }
        });
        let mut pulled = Pulled {
            round: u64::MAX,
            last: None,
            params: HashMap::new(),
        };
        let mut newest = 0;
        for (i, r) in futures::future::try_join_all(calls)
            .await?
            .into_iter()
            .enumerate()
        {
            for (k, msg) in r.into_iter().enumerate() {
                if k == 0 {
                    pulled.round = pulled.round.min(msg.round);
                    newest = newest.max(msg.round);
                    if i == 0 {
                        pulled.last = msg.last;
                    }
                }
                for seg in msg.params {
                    place(&mut pulled.params, seg)?;
                }
            }
        }
        if pulled.round == u64::MAX {
            pulled.round = 0;
        }
        Ok((pulled, newest))
    }

    /// Status of job `job`, or of every job, with every shard's part.
    pub async fn status(&mut self, job: Option<&str>) -> Result<pb::StatusResponse> {
        let req = self.request(pb::StatusRequest {
            job: job.unwrap_or_default().to_owned(),
        });
        Ok(self.inner.status(req).await?.into_inner())
    }

    /// Takes a checkpoint of `job` (every job when `None`) on every shard;
    /// returns the round each job was checkpointed at.
    pub async fn checkpoint(&mut self, job: Option<&str>) -> Result<Vec<pb::CheckpointedJob>> {
        let req = self.request(pb::CheckpointRequest {
            job: job.unwrap_or_default().to_owned(),
        });
        Ok(self.inner.checkpoint(req).await?.into_inner().jobs)
    }

    /// Deletes job `job` on every shard.
    pub async fn delete_job(&mut self, job: &str) -> Result<()> {
        let req = self.request(pb::DeleteJobRequest {
            job: job.to_owned(),
        });
        self.inner.delete_job(req).await?;
        if let Ok(mut m) = self.routes.lock() {
            m.remove(job);
        }
        Ok(())
    }
}

/// An error of shard `i`; a one-shard cluster's errors stay plain.
fn shard_error(i: usize, url: &str, status: tonic::Status, shards: usize) -> ClientError {
    let status = deadline(status);
    if shards == 1 {
        ClientError::Status(status)
    } else {
        ClientError::Shard {
            shard: i,
            url: url.to_owned(),
            status,
        }
    }
}

/// Cuts a tensor into segments of at most `MESSAGE_BYTES`.
fn segments(name: &str, values: &[f32]) -> Vec<pb::Segment> {
    if values.is_empty() {
        return vec![pb::Segment {
            param: name.to_owned(),
            offset: 0,
            data: Bytes::new(),
        }];
    }
    values
        .chunks(MESSAGE_BYTES / 4)
        .enumerate()
        .map(|(k, part)| pb::Segment {
            param: name.to_owned(),
            offset: (k * (MESSAGE_BYTES / 4)) as u64,
            data: to_le_bytes(part),
        })
        .collect()
}

/// Packs segments into messages of at most `MESSAGE_BYTES` of payload.
fn pack(segments: Vec<pb::Segment>) -> Vec<Vec<pb::Segment>> {
    paramd_proto::wire::pack(segments, MESSAGE_BYTES)
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
    let decoded = seg
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if values.len() == offset {
        // Segments of a parameter arrive in order: append, without zeroing
        // memory first.
        values.extend(decoded);
    } else {
        if values.len() < offset + n {
            values.resize(offset + n, 0.0);
        }
        values[offset..offset + n]
            .iter_mut()
            .zip(decoded)
            .for_each(|(d, x)| *d = x);
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
        let all = [segments("big", &big), segments("small", &small)].concat();
        let messages = pack(all);
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
