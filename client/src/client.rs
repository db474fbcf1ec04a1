//! `Client`: a connection to a paramd server or cluster, and its calls
//! (pulls, pushes and state in `pull.rs`, `push_stream.rs`, `state.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use paramd_proto::transport::{AuthChannel, Http2Windows};
use paramd_proto::v1 as pb;
use paramd_proto::v1::param_server_client::ParamServerClient;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Endpoint;

use crate::codec::{Payload, PushCodec, PushMessage};
use crate::error::{ClientError, Result};
use crate::retry::Retry;
use crate::route::{Route, Shard, pack_refs};
use crate::{Credentials, retry, shard_error, to_le_bytes};

/// Largest segment a tensor is cut into, and the payload packed into one
/// message: far below the 64 MiB message limit whatever the model size.
pub(crate) const MESSAGE_BYTES: usize = 4 << 20;

/// Pulls tried before giving up on shards that keep answering from
/// different rounds.
pub(crate) const MAX_PULL_ATTEMPTS: usize = 5;

/// Largest message the client decodes or encodes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A connection to a paramd server or cluster (through its coordinator).
#[derive(Debug, Clone)]
pub struct Client {
    inner: ParamServerClient<AuthChannel>,
    channel: AuthChannel,
    url: String,
    credentials: Credentials,
    routes: Arc<Mutex<HashMap<String, Arc<Route>>>>,
    /// Deadline of every call (a pull's wait and every retry included).
    pub timeout: Duration,
    /// Most UNAVAILABLE answers a call tries again; None (the default):
    /// until its deadline. See [`retry`].
    pub retries: Option<u32>,
    /// Tries made again so far by this client and its clones.
    pub retried: Arc<retry::Retried>,
}

/// The longest a connection attempt takes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An endpoint for `url`, receiving with the HTTP/2 windows the
/// environment sets (`PARAMD_HTTP2_STREAM_WINDOW`,
/// `PARAMD_HTTP2_CONNECTION_WINDOW`; see `Http2Windows`).
fn endpoint(url: &str, credentials: &Credentials, connect_timeout: Duration) -> Result<Endpoint> {
    let windows = Http2Windows::from_env().map_err(ClientError::Invalid)?;
    credentials
        .clone()
        .with_windows(windows)
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

/// A gRPC client for the client's own codecs (see [`codec`]).
pub(crate) async fn raw_grpc(
    channel: &AuthChannel,
) -> Result<tonic::client::Grpc<AuthChannel>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    Ok(grpc)
}

/// How a push travels and counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct PushOptions {
    /// The dtype of its values on the wire (f32 by default).
    pub dtype: pb::Dtype,
    /// Its weight in a job whose merge is weighted (> 0); 0 in a job that
    /// merges by mean.
    pub weight: f32,
    /// The membership it is sent under in an elastic job (`Join`'s lease);
    /// 0 in a job of fixed workers.
    pub lease: u64,
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
        Ok(Client::with_channel(url, credentials, channel))
    }

    /// A client of `url` that connects on its first call (and reconnects
    /// after a restart), so that it can be made before the server is up.
    /// Must be called within a tokio runtime.
    pub fn lazy(url: &str, credentials: Credentials) -> Result<Client> {
        let channel =
            credentials.wrap(endpoint(url, &credentials, CONNECT_TIMEOUT)?.connect_lazy());
        Ok(Client::with_channel(url, credentials, channel))
    }

    fn with_channel(url: &str, credentials: Credentials, channel: AuthChannel) -> Client {
        Client {
            inner: grpc_client(channel.clone()),
            channel,
            url: url.to_owned(),
            credentials,
            routes: Arc::default(),
            timeout: Duration::from_secs(300),
            retries: None,
            retried: Arc::default(),
        }
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

    /// The retry policy of a call starting now (see [`retry`]).
    pub(crate) fn retry(&self, aborted: bool) -> Retry {
        Retry {
            deadline: tokio::time::Instant::now() + self.timeout,
            retries: self.retries,
            aborted,
            counts: Arc::clone(&self.retried),
        }
    }

    /// Runs a unary call on the coordinator under the retry policy.
    pub(crate) async fn unary<Req, Resp, F, Fut>(&self, msg: Req, call: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(ParamServerClient<AuthChannel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let r = self
            .retry(false)
            .run(|left| {
                let mut req = tonic::Request::new(msg.clone());
                req.set_timeout(left);
                call(self.inner.clone(), req)
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The layout of `job`, fetched from the coordinator once.
    pub(crate) async fn route(&self, job: &str) -> Result<Arc<Route>> {
        if let Some(r) = self.routes.lock().ok().and_then(|m| m.get(job).cloned()) {
            return Ok(r);
        }
        let layout = self.layout(job).await?;
        let chunk_elems = usize::try_from(layout.chunk_elems)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "layout of '{job}': chunk_elems is {}",
                    layout.chunk_elems
                ))
            })?;
        let mut order = Vec::new();
        let mut index = HashMap::new();
        let mut next = 0;
        for p in &layout.params {
            let numel = p.shape.iter().product::<u64>() as usize;
            let name: Arc<str> = Arc::from(p.name.as_str());
            index.insert(Arc::clone(&name), order.len());
            order.push((name, p.shape.clone(), next));
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
        let mut shards = vec![Shard {
            url: self.url.clone(),
            channel: self.channel.clone(),
        }];
        for url in layout.shards.iter().skip(1) {
            // A shard that vanished fails within the call's deadline, not
            // after a longer connect timeout.
            let endpoint = endpoint(url, &self.credentials, CONNECT_TIMEOUT.min(self.timeout))?;
            shards.push(Shard {
                url: url.clone(),
                channel: self.credentials.wrap(endpoint.connect_lazy()),
            });
        }
        if let Some(&bad) = layout.owners.iter().find(|&&o| o as usize >= shards.len()) {
            return Err(ClientError::Invalid(format!(
                "layout of '{job}' names shard {bad} of {}",
                shards.len()
            )));
        }
        let route = Arc::new(Route {
            job: job.to_owned(),
            chunk_elems,
            order,
            index,
            owners: Arc::new(layout.owners.clone()),
            shards,
            layout,
        });
        if let Ok(mut m) = self.routes.lock() {
            m.insert(job.to_owned(), Arc::clone(&route));
        }
        Ok(route)
    }

    /// Where the chunks of `job` live, and its parameters' names and shapes.
    pub async fn layout(&self, job: &str) -> Result<pb::LayoutResponse> {
        let msg = pb::LayoutRequest {
            job: job.to_owned(),
        };
        self.unary(msg, |mut c, r| async move { c.layout(r).await })
            .await
    }

    /// The layout of `job` the client routes by (fetched once, then kept).
    pub async fn route_layout(&self, job: &str) -> Result<pb::LayoutResponse> {
        Ok(self.route(job).await?.layout.clone())
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
        self.unary(messages, |mut c, r| async move {
            let (meta, ext, messages) = r.into_parts();
            c.init(tonic::Request::from_parts(
                meta,
                ext,
                futures::stream::iter(messages),
            ))
            .await
        })
        .await
    }

    /// Checks that `tensors` (name, element count) are exactly the
    /// parameters of `job`, as a push must give them; the error names the
    /// first that is unknown, of the wrong size or missing.
    pub async fn check_push(
        &self,
        job: &str,
        what: &str,
        tensors: &[(&str, usize)],
        no_grad: &[&str],
    ) -> Result<()> {
        self.route(job).await?.check(what, tensors, no_grad)
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
        let grads: Vec<(Arc<str>, Payload)> = grads
            .iter()
            .map(|(n, v)| (Arc::from(*n), Payload::Owned(to_le_bytes(v))))
            .collect();
        self.push_payloads(job, worker, round, &grads, &[], PushOptions::default())
            .await
    }

    /// [`Client::push`] of tensors given as wire bytes: owned, or lent by
    /// the caller (see [`memory`]) and encoded straight from its memory.
    /// `no_grad` names the parameters this worker has no gradient for
    /// (torch's `grad is None`), sent instead of values: a parameter no
    /// worker of the round has a gradient for is not stepped. `options`:
    /// the payloads' dtype (little-endian elements; bf16 and f16 halve the
    /// bytes on the wire, and the server decodes them exactly to f32) and
    /// the push's weight.
    pub async fn push_payloads(
        &self,
        job: &str,
        worker: u32,
        round: u64,
        grads: &[(Arc<str>, Payload)],
        no_grad: &[Arc<str>],
        options: PushOptions,
    ) -> Result<pb::PushResponse> {
        let route = self.route(job).await?;
        let n = route.shards.len();
        let policy = &self.retry(true);
        let split = route.split(grads, options.dtype);
        let calls = split.into_iter().enumerate().map(|(i, segs)| {
            // A header-only first message: the server admits or refuses the
            // push (stale, early, duplicate) before any payload is sent.
            let header = PushMessage::Header(pb::PushRequest {
                job: job.to_owned(),
                worker,
                round,
                grads: Vec::new(),
                no_grad: no_grad.iter().map(|n| n.to_string()).collect(),
                weight: options.weight,
                lease: options.lease,
            });
            let messages: Vec<PushMessage> =
                std::iter::once(header).chain(pack_refs(segs)).collect();
            let shard = &route.shards[i];
            async move {
                // ABORTED: another copy of this push is being received (a
                // retry raced the original); sent again, it will be a
                // duplicate.
                policy
                    .run(|left| {
                        let messages = messages.clone();
                        async move {
                            let mut grpc = raw_grpc(&shard.channel).await?;
                            let mut req = tonic::Request::new(futures::stream::iter(messages));
                            req.set_timeout(left);
                            let path = PathAndQuery::from_static("/paramd.v1.ParamServer/Push");
                            grpc.client_streaming(req, path, PushCodec).await
                        }
                    })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| shard_error(i, &shard.url, s, n))
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
            let r = r?;
            out.duplicate &= r.duplicate;
            out.pushed = out.pushed.min(r.pushed);
        }
        Ok(out)
    }

    /// Status of job `job`, or of every job, with every shard's part.
    pub async fn status(&mut self, job: Option<&str>) -> Result<pb::StatusResponse> {
        let msg = pb::StatusRequest {
            job: job.unwrap_or_default().to_owned(),
        };
        self.unary(msg, |mut c, r| async move { c.status(r).await })
            .await
    }

    /// Joins elastic job `job`: the worker id to push as, the lease to push
    /// with and renew (`heartbeat`), and the round to push next, from that
    /// round's parameters. Not retried once it may have reached the
    /// server: a second membership would hold a worker id until its lease
    /// ran out.
    pub async fn join(&self, job: &str) -> Result<pb::JoinResponse> {
        let msg = pb::JoinRequest {
            job: job.to_owned(),
        };
        self.unary(msg, |mut c, r| async move { c.join(r).await })
            .await
    }

    /// Renews a membership's lease; answers the round being collected.
    /// Refused with reason `not_member` once the membership ended (join
    /// again).
    pub async fn heartbeat(
        &self,
        job: &str,
        worker: u32,
        lease: u64,
    ) -> Result<pb::HeartbeatResponse> {
        let msg = pb::HeartbeatRequest {
            job: job.to_owned(),
            worker,
            lease,
        };
        self.unary(msg, |mut c, r| async move { c.heartbeat(r).await })
            .await
    }

    /// Ends a membership (harmless if it ended already): rounds no longer
    /// wait for it.
    pub async fn leave(&self, job: &str, worker: u32, lease: u64) -> Result<()> {
        let msg = pb::LeaveRequest {
            job: job.to_owned(),
            worker,
            lease,
        };
        self.unary(msg, |mut c, r| async move { c.leave(r).await })
            .await?;
        Ok(())
    }

    /// Takes a checkpoint of `job` (every job when `None`) on every shard;
    /// returns the round each job was checkpointed at.
    pub async fn checkpoint(&mut self, job: Option<&str>) -> Result<Vec<pb::CheckpointedJob>> {
        let msg = pb::CheckpointRequest {
            job: job.unwrap_or_default().to_owned(),
        };
        let r = self
            .unary(msg, |mut c, r| async move { c.checkpoint(r).await })
            .await?;
        Ok(r.jobs)
    }

    /// Deletes job `job` on every shard.
    pub async fn delete_job(&mut self, job: &str) -> Result<()> {
        let msg = pb::DeleteJobRequest {
            job: job.to_owned(),
        };
        self.unary(msg, |mut c, r| async move { c.delete_job(r).await })
            .await?;
        if let Ok(mut m) = self.routes.lock() {
            m.remove(job);
        }
        Ok(())
    }
}

/// Cuts a tensor into segments of at most `MESSAGE_BYTES`.
fn segments(name: &str, values: &[f32]) -> Vec<pb::Segment> {
    if values.is_empty() {
        return vec![pb::Segment {
            param: name.to_owned(),
            offset: 0,
            data: Bytes::new(),
            dtype: 0,
        }];
    }
    values
        .chunks(MESSAGE_BYTES / 4)
        .enumerate()
        .map(|(k, part)| pb::Segment {
            param: name.to_owned(),
            offset: (k * (MESSAGE_BYTES / 4)) as u64,
            data: to_le_bytes(part),
            dtype: 0,
        })
        .collect()
}

/// Packs segments into messages of at most `MESSAGE_BYTES` of payload.
fn pack(segments: Vec<pb::Segment>) -> Vec<Vec<pb::Segment>> {
    paramd_proto::wire::pack(segments, MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_splits_large_tensors() {
        let big: Vec<f32> = (0..(MESSAGE_BYTES / 4 * 2 + 3)).map(|i| i as f32).collect();
        let small = [1.5f32, -2.0];
        let all = [segments("big", &big), segments("small", &small)].concat();
        let messages = pack(all);
        assert!(messages.len() >= 3);
        for m in &messages {
            assert!(m.iter().map(|s| s.data.len()).sum::<usize>() <= MESSAGE_BYTES);
        }
        let sent: usize = messages.iter().flatten().map(|s| s.data.len()).sum();
        assert_eq!(sent, (big.len() + small.len()) * 4);
    }
}
