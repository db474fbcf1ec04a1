//! The shards of a cluster and the calls between them. Every call carries a
//! deadline; a shard that is down makes calls fail fast with an error naming
//! it, never wait.

use std::time::Duration;

use paramd_proto::transport::{AuthChannel, Credentials};
use paramd_proto::v1 as pb;
use paramd_proto::v1::shard_client::ShardClient;

use crate::checkpoint::{CheckpointSettings, ManifestFile};
use crate::coordinator::{Decision, Members, Report};
use crate::error::{Error, Result};
use crate::invalid;

/// Where this process stands in its cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// This shard's index; 0 is the coordinator.
    pub shard: usize,
    /// Address of every shard; empty for a one-shard cluster.
    pub urls: Vec<String>,
    peers: Vec<Option<ShardClient<AuthChannel>>>,
    /// Deadline of a call to another shard.
    pub peer_timeout: Duration,
    /// Longest the coordinator waits for every shard's report of a round.
    pub round_timeout: Duration,
    /// Where checkpoints go, when they are taken.
    pub checkpoints: Option<CheckpointSettings>,
    /// Rounds of history each job keeps for the status page.
    pub history_rounds: usize,
}

impl Cluster {
    /// Shard `shard` of the cluster whose workers reach it at `urls` and
    /// whose shards reach each other at `peers` (both empty: a one-shard
    /// cluster). Connections to other shards are made lazily, so shards may
    /// start in any order.
    pub fn new(
        shard: usize,
        urls: Vec<String>,
        peers: &[String],
        peer_timeout: Duration,
        round_timeout: Duration,
        credentials: &Credentials,
    ) -> Result<Cluster> {
        Cluster::check(shard, &urls, peers)?;
        let mut clients = Vec::with_capacity(peers.len());
        for (i, url) in peers.iter().enumerate() {
            if i == shard {
                clients.push(None);
                continue;
            }
            let endpoint = credentials
                .endpoint(url, peer_timeout)
                .map_err(|e| invalid!("peers[{i}]: {e}"))?;
            let client = ShardClient::new(credentials.wrap(endpoint.connect_lazy()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            clients.push(Some(client));
        }
        Ok(Cluster {
            shard,
            urls,
            peers: clients,
            peer_timeout,
            round_timeout,
            checkpoints: None,
            history_rounds: 0,
        })
    }

    /// Checks a shard index, the cluster's URLs and its peer URLs (one per
    /// shard of a cluster of more than one), without connecting.
    pub fn check(shard: usize, urls: &[String], peers: &[String]) -> Result<()> {
        if urls.is_empty() && shard != 0 {
            return Err(invalid!(
                "shard_index is {shard}, but without a cluster there is only shard 0"
            ));
        }
        if !urls.is_empty() && shard >= urls.len() {
            return Err(invalid!(
                "shard_index is {shard}, but the cluster lists {} shards",
                urls.len()
            ));
        }
        let needed = if urls.len() > 1 { urls.len() } else { 0 };
        if peers.len() != needed {
            return Err(invalid!(
                "peers lists {} URLs but a cluster of {} shards needs {needed}",
                peers.len(),
                urls.len().max(1)
            ));
        }
        for (key, list) in [("cluster", urls), ("peers", peers)] {
            for (i, url) in list.iter().enumerate() {
                let uri: tonic::transport::Uri = url
                    .parse()
                    .map_err(|e| invalid!("{key}[{i}] {url:?} is not a URL: {e}"))?;
                if uri.scheme().is_none() || uri.host().is_none() {
                    return Err(invalid!(
                        "{key}[{i}] {url:?} is not a URL like http://host:port"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Number of shards.
    pub fn size(&self) -> usize {
        self.urls.len().max(1)
    }

    /// Address of shard `i` as configured ("local" in a one-shard cluster).
    pub fn address(&self, i: usize) -> String {
        self.urls
            .get(i)
            .cloned()
            .unwrap_or_else(|| "local".to_owned())
    }

    fn peer(&self, i: usize) -> Result<ShardClient<AuthChannel>> {
        self.peers.get(i).and_then(Clone::clone).ok_or_else(|| {
            Error::Internal(format!("shard {i} is not a peer of shard {}", self.shard))
        })
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    fn err(&self, i: usize) -> impl Fn(tonic::Status) -> Error + '_ {
        move |s| Error::from_shard(i, &self.address(i), &s)
    }

    /// Creates a job's part on shard `i`.
    pub async fn create_shard(
        &self,
        i: usize,
        messages: Vec<pb::CreateShardRequest>,
    ) -> Result<pb::CreateShardResponse> {
        let req = self.request(futures::stream::iter(messages), self.peer_timeout);
        Ok(self
            .peer(i)?
            .create_shard(req)
            .await
            .map_err(self.err(i))?
            .into_inner())
    }

    /// Reports a round to the coordinator and returns its decision.
    pub async fn report(&self, job: &str, round: u64, report: &Report) -> Result<Decision> {
        let msg = report.to_request(job, round, self.shard);
        // The coordinator may hold the call for a whole round timeout.
        let req = self.request(msg, self.round_timeout + self.peer_timeout);
        let resp = self
            .peer(0)?
            .report(req)
            .await
            .map_err(self.err(0))?
            .into_inner();
        let d = resp
            .decision
            .ok_or_else(|| Error::Internal("the coordinator sent no decision".into()))?;
        Ok(Decision::from(d))
    }

    /// Tells the coordinator which workers' pushes of `round` this shard
    /// holds whole; returns the round's members once chosen.
    pub async fn members(&self, job: &str, round: u64, workers: &[(u32, u64)]) -> Result<Members> {
        let msg = pb::MembersRequest {
            job: job.to_owned(),
            round,
            shard: self.shard as u32,
            workers: workers.iter().map(|&(w, _)| w).collect(),
            leases: workers.iter().map(|&(_, l)| l).collect(),
        };
        // The coordinator may hold the call for a whole round timeout.
        let req = self.request(msg, self.round_timeout + self.peer_timeout);
        let r = self
            .peer(0)?
            .members(req)
            .await
            .map_err(self.err(0))?
            .into_inner();
        Ok(Members::from(r))
    }

    /// The checkpoint rounds of `job` shard `i` can restore, newest first,
    /// and the round it holds.
    pub async fn restorable(&self, i: usize, job: &str) -> Result<pb::RestorableResponse> {
        let req = self.request(
            pb::RestorableRequest {
                job: job.to_owned(),
            },
            self.peer_timeout,
        );
        Ok(self
            .peer(i)?
            .restorable(req)
            .await
            .map_err(self.err(i))?
            .into_inner())
    }

    /// Has shard `i` hold `job` as of checkpoint `round` and serve it.
    pub async fn adopt(&self, i: usize, job: &str, round: u64) -> Result<()> {
        let req = self.request(
            pb::AdoptRequest {
                job: job.to_owned(),
                round,
            },
            // Loading a checkpoint may take a while for a large model.
            self.round_timeout + self.peer_timeout,
        );
        self.peer(i)?.adopt(req).await.map_err(self.err(i))?;
        Ok(())
    }

    /// The bytes of file `name` of checkpoint `round` of `job` on shard `i`.
    pub async fn checkpoint_file(
        &self,
        i: usize,
        job: &str,
        round: u64,
        name: &str,
    ) -> Result<tonic::Streaming<pb::CheckpointFileChunk>> {
        let req = self.request(
            pb::CheckpointFileRequest {
                job: job.to_owned(),
                round,
                name: name.to_owned(),
            },
            // A whole shard's file: as long as a round may take.
            self.round_timeout + self.peer_timeout,
        );
        Ok(self
            .peer(i)?
            .checkpoint_file(req)
            .await
            .map_err(self.err(i))?
            .into_inner())
    }

    /// A job's part on shard `i`.
    pub async fn shard_status(&self, i: usize, job: &str) -> Result<pb::ShardInfo> {
        let req = self.request(
            pb::ShardStatusRequest {
                job: job.to_owned(),
            },
            self.peer_timeout,
        );
        let resp = self
            .peer(i)?
            .shard_status(req)
            .await
            .map_err(self.err(i))?
            .into_inner();
        resp.shard
            .ok_or_else(|| Error::Internal(format!("shard {i} sent no status")))
    }

    /// Has shard `i` write its part of checkpoint `round`.
    pub async fn save_shard(&self, i: usize, job: &str, round: u64) -> Result<ManifestFile> {
        let req = self.request(
            pb::SaveShardRequest {
                job: job.to_owned(),
                round,
            },
            self.round_timeout + self.peer_timeout,
        );
        let r = self
            .peer(i)?
            .save_shard(req)
            .await
            .map_err(self.err(i))?
            .into_inner();
        Ok(ManifestFile {
            name: r.file,
            sha256: r.sha256,
            bytes: r.bytes,
        })
    }

    /// Makes checkpoint `round` exist on shard `i`.
    pub async fn commit_shard(
        &self,
        i: usize,
        job: &str,
        round: u64,
        manifest: pb::Manifest,
    ) -> Result<()> {
        let req = self.request(
            pb::CommitShardRequest {
                job: job.to_owned(),
                round,
                manifest: Some(manifest),
            },
            self.peer_timeout,
        );
        self.peer(i)?.commit_shard(req).await.map_err(self.err(i))?;
        Ok(())
    }

    /// Drops a job's part on shard `i`.
    pub async fn drop_shard(&self, i: usize, job: &str) -> Result<()> {
        let req = self.request(
            pb::DropShardRequest {
                job: job.to_owned(),
            },
            self.peer_timeout,
        );
        self.peer(i)?.drop_shard(req).await.map_err(self.err(i))?;
        Ok(())
    }
}
