//! The `paramd.v1.ParamServer` gRPC service: thin handlers that read the
//! streams, call the core and map its results.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use paramd_proto::v1 as pb;
use paramd_proto::v1::param_server_server::ParamServer;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::invalid;
use crate::job::{Admission, Admitted, Job};
use crate::metrics;
use crate::node::Node;
use crate::spec::JobConfig;

/// Bytes of segments packed into one Pull message. Well under the message
/// limit, and large enough that framing costs nothing.
const PULL_MESSAGE_BYTES: usize = 4 << 20;

/// How long before a client's deadline a waiting pull gives up.
const DEADLINE_MARGIN: Duration = Duration::from_millis(200);

/// Slack allowed over a payload's expected size before reading stops, so a
/// slightly wrong push still gets a precise error but a flood does not grow
/// memory without bound.
pub(crate) const PAYLOAD_SLACK: usize = 1 << 20;

/// The gRPC service over a node.
#[derive(Clone, Debug)]
pub struct Service {
    node: Arc<Node>,
}

impl Service {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> Service {
        Service { node }
    }
}

/// The next message of a client stream. A message over the size limit is
/// refused from its length prefix, unread, as RESOURCE_EXHAUSTED (tonic
/// says OUT_OF_RANGE).
pub(crate) async fn next_message<M>(stream: &mut Streaming<M>) -> Result<Option<M>, Status> {
    stream.message().await.map_err(|s| {
        if s.code() == tonic::Code::OutOfRange && s.message().contains("too large") {
            Status::resource_exhausted(format!("{}; the server's max_message_bytes", s.message()))
        } else {
            s
        }
    })
}

/// Hands `first` and then each message of the stream to `sink`, refusing
/// once their payloads (`size`) exceed `budget` bytes together.
pub(crate) async fn read_messages<M>(
    first: M,
    stream: &mut Streaming<M>,
    budget: usize,
    what: &str,
    size: impl Fn(&M) -> usize,
    mut sink: impl FnMut(M) -> crate::error::Result<()>,
) -> Result<(), Status> {
    let mut bytes = 0usize;
    let mut next = Some(first);
    while let Some(message) = next {
        bytes = bytes.saturating_add(size(&message));
        if bytes > budget {
            return Err(Error::TooLarge(format!(
                "{what}: more than {budget} bytes sent, more than the job can hold"
            ))
            .into());
        }
        sink(message)?;
        next = next_message(stream).await?;
    }
    Ok(())
}

/// Bytes of values in `segments`.
pub(crate) fn payload(segments: &[pb::Segment]) -> usize {
    segments.iter().map(|s| s.data.len()).sum()
}

/// The deadline a client set with `grpc-timeout`, if any.
fn grpc_timeout(md: &MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The status of job `job` (every job when empty), with its shards as far
/// as they answer: what the Status call and the status page's API serve.
pub(crate) async fn status(node: &Node, job: &str) -> crate::error::Result<pb::StatusResponse> {
    node.check_ready()?;
    let jobs = if job.is_empty() {
        node.jobs()
    } else {
        vec![node.job(job)?]
    };
    let mut out = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let shards = node.shard_infos(job).await;
        let s = job.status();
        // The job's sizes over the whole cluster, as far as it answers.
        let parameter_bytes: u64 = shards.iter().map(|x| x.parameter_bytes).sum();
        let state_bytes: u64 = shards.iter().map(|x| x.optimizer_state_bytes).sum();
        out.push(pb::JobStatus {
            job: job.name.clone(),
            round: s.round,
            step: s.step,
            workers_expected: job.config.workers,
            workers_pushed: s.workers_pushed,
            rounds_skipped: s.rounds_skipped,
            last: s.last.as_ref().map(pb::RoundOutcome::from),
            parameters: job.config.numel() as u64,
            parameter_bytes,
            optimizer_state_bytes: state_bytes,
            optimizer: job.config.optimizer_name().to_owned(),
            shards,
            waiting_for: s.waiting_for,
            members: s
                .members
                .iter()
                .map(|&(worker, lease)| pb::Member {
                    worker,
                    lease: lease.id,
                    expires_in_seconds: lease
                        .expires
                        .saturating_duration_since(Instant::now())
                        .as_secs_f64(),
                    joined_round: lease.joined_round,
                })
                .collect(),
            min_workers: job.config.elastic.map_or(0, |e| e.min_workers),
        });
    }
    let (rss_bytes, peak_rss_bytes) = metrics::process_memory();
    Ok(pb::StatusResponse {
        jobs: out,
        rss_bytes,
        peak_rss_bytes,
    })
}

pub(crate) type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullResponse, Status>> + Send>>;
type StateStream = Pin<Box<dyn Stream<Item = Result<pb::StateResponse, Status>> + Send>>;

impl Service {
    /// Job `job` once `round` rounds have completed on this shard, waiting
    /// at most `wait`; the call's span records both.
    async fn at_round(&self, job: &str, round: u64, wait: Duration) -> Result<Arc<Job>, Status> {
        self.node.check_ready()?;
        let span = tracing::Span::current();
        span.record("job", job);
        span.record("round", round);
        let job = self.node.job(job)?;
        job.wait_round(round, wait).await?;
        Ok(job)
    }

    /// How long a call waiting for a round may wait: until a little before
    /// the client's deadline (to answer DEADLINE_EXCEEDED with the reason
    /// rather than be cancelled), at most `max_pull_wait`.
    fn wait(&self, metadata: &MetadataMap) -> Duration {
        let max = self.node.config.max_pull_wait;
        grpc_timeout(metadata).map_or(max, |t| {
            t.saturating_sub((t / 10).min(DEADLINE_MARGIN)).min(max)
        })
    }
}

#[tonic::async_trait]
impl ParamServer for Service {
    #[tracing::instrument(name = "init", skip_all, fields(shard = self.node.cluster.shard, job))]
    async fn init(
        &self,
        request: Request<Streaming<pb::InitRequest>>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        self.node.check_ready()?;
        let mut stream = request.into_inner();
        let first = next_message(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty Init stream"))?;
        tracing::Span::current().record("job", first.job.as_str());
        let spec = first.spec.clone().ok_or_else(|| {
            Status::invalid_argument("spec is required in the first Init message")
        })?;
        let config = JobConfig::try_from(&spec)?;
        if let Some(job) = self.node.existing(&first.job, &config)? {
            return Ok(Response::new(pb::InitResponse {
                round: job.round(),
                created: false,
            }));
        }
        // Before a byte of the values is read: the limits bound the job's
        // size, and its place is reserved until it is created (or not).
        let _admitted = self.node.admit(&config)?;
        // Written into place as they arrive: never more than the job.
        let name = first.job.clone();
        let mut values = self.node.begin_create(&name, &config)?;
        let budget = (config.numel() * 4).saturating_add(PAYLOAD_SLACK);
        let what = format!("initial values of job '{name}'");
        let size = |m: &pb::InitRequest| payload(&m.values);
        read_messages(first, &mut stream, budget, &what, size, |m| {
            values.feed(m.values)
        })
        .await?;
        let created = self.node.create(&name, &spec, config, values).await?;
        Ok(Response::new(pb::InitResponse {
            round: created.job.round(),
            created: created.created,
        }))
    }

    #[tracing::instrument(name = "push", skip_all, fields(shard = self.node.cluster.shard, job, worker, round))]
    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        self.node.check_ready()?;
        let started = Instant::now();
        let mut stream = request.into_inner();
        let first = next_message(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty Push stream"))?;
        let span = tracing::Span::current();
        span.record("job", first.job.as_str());
        span.record("worker", first.worker);
        span.record("round", first.round);
        let job = self.node.job(&first.job)?;
        let pushed =
            |pushed: u32, duplicate: bool| Response::new(pb::PushResponse { duplicate, pushed });
        // Refused, or answered as a duplicate, before its payload is read.
        let mut receiving = match job
            .receive(first.worker, first.round, first.weight, first.lease)
            .await?
        {
            Admitted::Duplicate(count) => return Ok(pushed(count, true)),
            Admitted::Receiving(r) => *r,
        };
        let budget = job
            .push_bytes()
            .saturating_mul(2)
            .saturating_add(PAYLOAD_SLACK);
        let what = format!("push of worker {} for round {}", first.worker, first.round);
        let size = |m: &pb::PushRequest| {
            payload(&m.grads) + m.no_grad.iter().map(String::len).sum::<usize>()
        };
        // Each message is checked and written into the push's buffers as
        // it arrives, and dropped.
        read_messages(first, &mut stream, budget, &what, size, |m| {
            let bytes = size(&m);
            receiving.feed(m.grads, &m.no_grad, bytes)
        })
        .await?;
        let (admission, count) = receiving.finish()?;
        job.metrics
            .push_duration
            .record(started.elapsed().as_secs_f64());
        Ok(pushed(count, admission == Admission::Duplicate))
    }

    type PullStream = PullStream;

    #[tracing::instrument(name = "pull", skip_all, fields(shard = self.node.cluster.shard, job, round))]
    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let wait = self.wait(request.metadata());
        let req = request.into_inner();
        let dtype = paramd_proto::wire::dtype(req.dtype).map_err(Error::Invalid)?;
        let job = self.at_round(&req.job, req.round, wait).await?;
        let plan = job.pull_plan(&req.params)?;
        // Messages are built as the client reads them: each holds chunks up
        // to PULL_MESSAGE_BYTES, referenced (not copied) under the store's
        // read lock one chunk at a time.
        let first = pb::PullResponse {
            round: plan.round,
            last: plan.last.as_ref().map(pb::RoundOutcome::from),
            params: Vec::new(),
        };
        let state = (job, plan, 0usize, Some(first));
        let stream =
            futures::stream::unfold(state, move |(job, plan, mut next, first)| async move {
                let is_first = first.is_some();
                let mut msg = first.unwrap_or_default();
                let mut size = 0;
                while next < plan.chunks.len()
                    && (size < PULL_MESSAGE_BYTES || msg.params.is_empty())
                {
                    match job.read_chunk(plan.chunks[next], plan.round, dtype) {
                        Ok(seg) => {
                            size += seg.data.len();
                            msg.params.push(seg);
                            next += 1;
                        }
                        Err(e) => {
                            // Ends the stream after the error.
                            next = usize::MAX;
                            return Some((Err(Status::from(e)), (job, plan, next, None)));
                        }
                    }
                }
                if msg.params.is_empty() && !is_first {
                    return None;
                }
                Some((Ok(msg), (job, plan, next, None)))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    type StateStream = StateStream;

    #[tracing::instrument(name = "state", skip_all, fields(shard = self.node.cluster.shard, job, round))]
    async fn state(
        &self,
        request: Request<pb::StateRequest>,
    ) -> Result<Response<StateStream>, Status> {
        let wait = self.wait(request.metadata());
        let req = request.into_inner();
        let job = self.at_round(&req.job, req.round, wait).await?;
        let plan = job.pull_plan(&[])?;
        // One message per chunk's buffer: a chunk is at most half a
        // message, and copied only as the client reads.
        let state = (job, plan, 0usize, Vec::<pb::StateSegment>::new(), true);
        let stream = futures::stream::unfold(
            state,
            |(job, plan, mut next, mut queued, first)| async move {
                if queued.is_empty() && next < plan.chunks.len() {
                    match job.read_state(plan.chunks[next], plan.round) {
                        Ok(segments) => queued = segments,
                        Err(e) => {
                            let done = (job, plan, usize::MAX, Vec::new(), false);
                            return Some((Err(Status::from(e)), done));
                        }
                    }
                    next += 1;
                }
                if queued.is_empty() && !first {
                    return None;
                }
                let msg = pb::StateResponse {
                    round: plan.round,
                    state: queued.pop().into_iter().collect(),
                };
                Some((Ok(msg), (job, plan, next, queued, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(name = "join", skip_all, fields(shard = self.node.cluster.shard, job))]
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        tracing::Span::current().record("job", r.job.as_str());
        let job = self.node.job(&r.job)?;
        let (worker, lease, round) = job.join()?;
        Ok(Response::new(pb::JoinResponse {
            worker,
            lease: lease.id,
            lease_seconds: job.config.elastic.map_or(0.0, |e| e.lease.as_secs_f64()),
            round,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        let job = self.node.job(&r.job)?;
        let round = job.heartbeat(r.worker, r.lease)?;
        Ok(Response::new(pb::HeartbeatResponse {
            round,
            lease_seconds: job.config.elastic.map_or(0.0, |e| e.lease.as_secs_f64()),
        }))
    }

    #[tracing::instrument(name = "leave", skip_all, fields(shard = self.node.cluster.shard, job))]
    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        tracing::Span::current().record("job", r.job.as_str());
        self.node.job(&r.job)?.leave(r.worker, r.lease)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    #[tracing::instrument(name = "load_state", skip_all, fields(shard = self.node.cluster.shard, job, round))]
    async fn load_state(
        &self,
        request: Request<Streaming<pb::LoadStateRequest>>,
    ) -> Result<Response<pb::LoadStateResponse>, Status> {
        self.node.check_ready()?;
        let mut stream = request.into_inner();
        let first = next_message(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty LoadState stream"))?;
        let span = tracing::Span::current();
        span.record("job", first.job.as_str());
        span.record("round", first.round);
        let job = self.node.job(&first.job)?;
        // Refused from the header alone, before any state is read.
        let mut receiving = job.begin_load(first.round, first.id, first.step)?;
        let what = format!("state load for round {}", first.round);
        let size = |m: &pb::LoadStateRequest| {
            m.state
                .iter()
                .map(|s| s.data.len() + s.param.len() + s.buffer.len() + 16)
                .sum::<usize>()
        };
        let budget = receiving.budget().saturating_add(PAYLOAD_SLACK);
        read_messages(first, &mut stream, budget, &what, size, |m| {
            receiving.feed(m.state)
        })
        .await?;
        receiving.finish()?;
        Ok(Response::new(pb::LoadStateResponse {}))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(status(&self.node, &req.job).await?))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        self.node.check_ready()?;
        let job = request.into_inner().job;
        if job.is_empty() {
            return Err(invalid!("job is required").into());
        }
        self.node.delete(&job).await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        self.node.check_ready()?;
        let job = request.into_inner().job;
        let done = self
            .node
            .checkpoint((!job.is_empty()).then_some(job.as_str()))
            .await?;
        Ok(Response::new(pb::CheckpointResponse {
            jobs: done
                .into_iter()
                .map(|(job, round)| pb::CheckpointedJob { job, round })
                .collect(),
        }))
    }

    async fn layout(
        &self,
        request: Request<pb::LayoutRequest>,
    ) -> Result<Response<pb::LayoutResponse>, Status> {
        self.node.check_ready()?;
        let job = self.node.job(&request.into_inner().job)?;
        Ok(Response::new(job.layout()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut md = MetadataMap::new();
        for (v, want) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("7u", Duration::from_micros(7)),
        ] {
            md.insert("grpc-timeout", v.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&md), Some(want), "{v}");
        }
        md.insert("grpc-timeout", "abc".parse().expect("ascii"));
        assert_eq!(grpc_timeout(&md), None);
    }
}
