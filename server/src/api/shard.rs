//! The `paramd.v1.Shard` service: the calls shards make to each other.

use std::sync::Arc;

use paramd_proto::v1 as pb;
use paramd_proto::v1::shard_server::Shard;
use tonic::{Request, Response, Status, Streaming};

use crate::checkpoint::{self, Manifest};
use crate::coordinator::Report;
use crate::node::Node;
use crate::service::{PAYLOAD_SLACK, payload, read_messages};
use crate::spec::{JobConfig, validate_job_name};

/// Bytes of a checkpoint file per message sent to another shard.
const FILE_CHUNK_BYTES: usize = 1 << 20;

type FileStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::CheckpointFileChunk, Status>> + Send>>;

/// The shard-to-shard service over a node.
#[derive(Clone, Debug)]
pub struct ShardService {
    node: Arc<Node>,
}

impl ShardService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> ShardService {
        ShardService { node }
    }

    /// Refuses a call about a shard the cluster does not have.
    fn check_shard(&self, call: &str, shard: u32) -> Result<(), Status> {
        let size = self.node.cluster.size();
        if shard as usize >= size {
            return Err(Status::invalid_argument(format!(
                "{call}: shard {shard} is not in this cluster of {size} shards"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Shard for ShardService {
    async fn create_shard(
        &self,
        request: Request<Streaming<pb::CreateShardRequest>>,
    ) -> Result<Response<pb::CreateShardResponse>, Status> {
        self.node.check_ready()?;
        let mut stream = request.into_inner();
        let first = crate::service::next_message(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty CreateShard stream"))?;
        if first.shard as usize != self.node.cluster.shard {
            return Err(Status::failed_precondition(format!(
                "this is shard {}, not shard {}: the cluster lists differ",
                self.node.cluster.shard, first.shard
            )));
        }
        let spec = first
            .spec
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let layout = first
            .layout
            .clone()
            .ok_or_else(|| Status::invalid_argument("layout is required"))?;
        let config = JobConfig::try_from(spec)?;
        // The same limits as Init: a shard's part is never more than that.
        let _admitted = self.node.admit(&config)?;
        let mut values = self.node.begin_create_shard(&first.job, &config, &layout)?;
        let budget = (config.numel() * 4).saturating_add(PAYLOAD_SLACK);
        let what = format!("initial values of job '{}'", first.job);
        let job = first.job.clone();
        let spec = spec.clone();
        let size = |m: &pb::CreateShardRequest| payload(&m.values);
        read_messages(first, &mut stream, budget, &what, size, |m| {
            values.feed(m.values)
        })
        .await?;
        let created = self.node.create_shard(&job, &spec, config, values)?;
        Ok(Response::new(pb::CreateShardResponse {
            round: created.job.round(),
            created: created.created,
        }))
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        self.check_shard("report", r.shard)?;
        let report = Report::from_request(&r)?;
        let job = self.node.job(&r.job)?;
        let decision = job.coordinate(r.round, r.shard as usize, report).await?;
        Ok(Response::new(pb::ReportResponse {
            decision: Some(pb::RoundOutcome::from(&decision)),
        }))
    }

    async fn members(
        &self,
        request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        self.check_shard("members", r.shard)?;
        let job = self.node.job(&r.job)?;
        if !r.leases.is_empty() && r.leases.len() != r.workers.len() {
            return Err(crate::error::Error::Invalid(format!(
                "leases: {} of them for {} workers",
                r.leases.len(),
                r.workers.len()
            ))
            .into());
        }
        let held: Vec<(u32, u64)> = r
            .workers
            .iter()
            .enumerate()
            .map(|(i, &w)| (w, r.leases.get(i).copied().unwrap_or(0)))
            .collect();
        let m = job
            .coordinate_members(r.round, r.shard as usize, &held)
            .await?;
        Ok(Response::new(pb::MembersResponse::from(m)))
    }

    async fn restorable(
        &self,
        request: Request<pb::RestorableRequest>,
    ) -> Result<Response<pb::RestorableResponse>, Status> {
        self.node.check_ready()?;
        let job = self.node.job(&request.into_inner().job)?;
        Ok(Response::new(pb::RestorableResponse {
            rounds: job.restorable(),
            round: job.round(),
            serving: job.check_serving().is_ok(),
        }))
    }

    async fn adopt(
        &self,
        request: Request<pb::AdoptRequest>,
    ) -> Result<Response<pb::AdoptResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        validate_job_name(&r.job)?;
        self.node.adopt_from_cluster(&r.job, r.round).await?;
        Ok(Response::new(pb::AdoptResponse {}))
    }

    type CheckpointFileStream = FileStream;

    async fn checkpoint_file(
        &self,
        request: Request<pb::CheckpointFileRequest>,
    ) -> Result<Response<FileStream>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        validate_job_name(&r.job)?;
        if r.job.starts_with('.') {
            return Err(Status::invalid_argument(format!(
                "job {:?} names no checkpoint directory",
                r.job
            )));
        }
        let root = self
            .node
            .cluster
            .checkpoints
            .as_ref()
            .map(|c| c.dir.clone())
            .ok_or_else(|| Status::failed_precondition("this shard has no --checkpoint-dir"))?;
        let path = checkpoint::file_path(&root, &r.job, r.round, &r.name)?;
        let file = std::fs::File::open(&path)
            .map_err(|e| Status::not_found(format!("{}: {e}", path.display())))?;
        let stream = futures::stream::unfold(Some(file), move |state| {
            let path = path.clone();
            async move {
                let mut file = state?;
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; FILE_CHUNK_BYTES];
                    let n = std::io::Read::read(&mut file, &mut buf)?;
                    buf.truncate(n);
                    Ok::<_, std::io::Error>((file, buf))
                })
                .await;
                match read {
                    Ok(Ok((_, buf))) if buf.is_empty() => None,
                    Ok(Ok((file, buf))) => {
                        Some((Ok(pb::CheckpointFileChunk { data: buf.into() }), Some(file)))
                    }
                    Ok(Err(e)) => Some((
                        Err(Status::internal(format!("{}: {e}", path.display()))),
                        None,
                    )),
                    Err(e) => Some((
                        Err(Status::internal(format!("reading {}: {e}", path.display()))),
                        None,
                    )),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn shard_status(
        &self,
        request: Request<pb::ShardStatusRequest>,
    ) -> Result<Response<pb::ShardStatusResponse>, Status> {
        self.node.check_ready()?;
        let job = self.node.job(&request.into_inner().job)?;
        Ok(Response::new(pb::ShardStatusResponse {
            shard: Some(job.shard_info()),
        }))
    }

    async fn save_shard(
        &self,
        request: Request<pb::SaveShardRequest>,
    ) -> Result<Response<pb::SaveShardResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        let f = self.node.job(&r.job)?.save(r.round).await?;
        Ok(Response::new(pb::SaveShardResponse {
            file: f.name,
            sha256: f.sha256,
            bytes: f.bytes,
        }))
    }

    async fn commit_shard(
        &self,
        request: Request<pb::CommitShardRequest>,
    ) -> Result<Response<pb::CommitShardResponse>, Status> {
        self.node.check_ready()?;
        let r = request.into_inner();
        let manifest = Manifest::try_from(
            r.manifest
                .ok_or_else(|| Status::invalid_argument("manifest is required"))?,
        )?;
        if manifest.round != r.round || manifest.job != r.job {
            return Err(Status::invalid_argument(
                "the manifest is of another checkpoint",
            ));
        }
        manifest.check()?;
        if manifest.shards != self.node.cluster.size() {
            return Err(Status::invalid_argument(format!(
                "the manifest is of a cluster of {} shards, this one has {}",
                manifest.shards,
                self.node.cluster.size()
            )));
        }
        self.node.job(&r.job)?.commit_blocking(manifest).await?;
        Ok(Response::new(pb::CommitShardResponse {}))
    }

    async fn drop_shard(
        &self,
        request: Request<pb::DropShardRequest>,
    ) -> Result<Response<pb::DropShardResponse>, Status> {
        self.node.check_ready()?;
        self.node.drop_shard(&request.into_inner().job)?;
        Ok(Response::new(pb::DropShardResponse {}))
    }
}
