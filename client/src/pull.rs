//! Pulls: every chunk from the shard holding it, all from one round,
//! written straight into the caller's memory or into new arrays.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use paramd_proto::v1 as pb;
use tonic::codegen::http::uri::PathAndQuery;

use crate::codec::{PullCodec, PullMessage, PullTargets, Target};
use crate::retry::Retry;
use crate::route::Route;
use crate::{Client, ClientError, MAX_PULL_ATTEMPTS, Result, raw_grpc, shard_error};

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

/// Where the pulled values of one parameter go.
#[derive(Debug, Clone)]
pub struct PullInto {
    pub name: Arc<str>,
    pub target: Target,
}

impl Client {
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
        let route = self.route(job).await?;
        let names: Vec<Arc<str>> = if params.is_empty() {
            route.order.iter().map(|(n, ..)| Arc::clone(n)).collect()
        } else {
            params.iter().map(|n| Arc::from(n.as_str())).collect()
        };
        let mut values = Vec::new();
        let mut targets = Vec::new();
        for name in names {
            let numel = route.index.get(&name).map_or(0, |&i| route.numel(i));
            let v = Arc::new(Mutex::new(vec![0f32; numel]));
            values.push((name.to_string(), Arc::clone(&v)));
            targets.push(PullInto {
                name,
                target: Target::Owned(v),
            });
        }
        let (round, last) = self.pull_into(job, round, &targets).await?;
        drop(targets);
        let params = values
            .into_iter()
            .map(|(name, v)| {
                let v = Arc::try_unwrap(v).map_or_else(
                    |shared| shared.lock().map(|v| v.clone()).unwrap_or_default(),
                    |m| m.into_inner().unwrap_or_else(|e| e.into_inner()),
                );
                (name, v)
            })
            .collect();
        Ok(Pulled {
            round,
            last,
            params,
        })
    }

    /// Pulls the parameters `targets` name from every shard once `round`
    /// rounds have completed there, writing each value straight into its
    /// target; returns the round the values are from and its outcome. The
    /// values all come from one round: if the shards answered from
    /// different rounds (training moved on while they were read), the pull
    /// is repeated at the newest. A pull that fails may have written part
    /// of the targets.
    pub async fn pull_into(
        &self,
        job: &str,
        round: u64,
        targets: &[PullInto],
    ) -> Result<(u64, Option<pb::RoundOutcome>)> {
        self.pull_into_as(job, round, targets, pb::Dtype::F32).await
    }

    /// [`Client::pull_into`] with the values sent as `dtype`: bf16 and f16
    /// are rounded to nearest even by the server, halving the bytes on the
    /// wire, and decoded to f32 into the targets.
    pub async fn pull_into_as(
        &self,
        job: &str,
        round: u64,
        targets: &[PullInto],
        dtype: pb::Dtype,
    ) -> Result<(u64, Option<pb::RoundOutcome>)> {
        let route = self.route(job).await?;
        let mut params = HashMap::new();
        for (k, t) in targets.iter().enumerate() {
            let Some(&i) = route.index.get(&t.name) else {
                return Err(ClientError::Invalid(format!(
                    "pull of job '{job}': unknown parameter '{}'",
                    t.name
                )));
            };
            let numel = route.numel(i);
            let room = match &t.target {
                Target::Lent(l) => l.memory.len() / 4,
                Target::Owned(v) => v.lock().map_or(0, |v| v.len()),
            };
            if room != numel {
                return Err(ClientError::Invalid(format!(
                    "pull of job '{job}': '{}' has {numel} values, its destination holds {room}",
                    t.name
                )));
            }
            params.insert(
                Arc::clone(&t.name),
                (k, route.order[i].2, numel, t.target.clone()),
            );
        }
        let all = params.len() == route.order.len();
        let names: Vec<String> = if all {
            Vec::new()
        } else {
            targets.iter().map(|t| t.name.to_string()).collect()
        };
        let pull = Arc::new(PullTargets {
            params,
            chunk_elems: route.chunk_elems,
            owners: Arc::clone(&route.owners),
        });
        let policy = self.retry(true);
        let mut want = round;
        for _ in 0..MAX_PULL_ATTEMPTS {
            let (got, newest, last) = self
                .pull_once(&route, &pull, want, &names, dtype, &policy)
                .await?;
            if got == newest {
                return Ok((got, last));
            }
            want = newest;
        }
        Err(ClientError::Invalid(format!(
            "job '{job}': the shards kept answering from different rounds over {MAX_PULL_ATTEMPTS} pulls; training moves faster than a pull"
        )))
    }

    /// One pull from every shard, each writing into the targets: the
    /// oldest round any shard answered from, the newest, and the outcome
    /// shard 0 sent.
    async fn pull_once(
        &self,
        route: &Route,
        pull: &Arc<PullTargets>,
        round: u64,
        names: &[String],
        dtype: pb::Dtype,
        policy: &Retry,
    ) -> Result<(u64, u64, Option<pb::RoundOutcome>)> {
        let n = route.shards.len();
        let calls = route.shards.iter().enumerate().map(|(i, shard)| {
            let msg = pb::PullRequest {
                job: route.job.clone(),
                round,
                params: names.to_vec(),
                dtype: dtype as i32,
            };
            let codec = PullCodec {
                targets: Arc::clone(pull),
                shard: i as u32,
            };
            async move {
                policy
                    .run(|left| {
                        let (msg, codec) = (msg.clone(), codec.clone());
                        async move {
                            let mut grpc = raw_grpc(&shard.channel).await?;
                            let mut req = tonic::Request::new(msg);
                            req.set_timeout(left);
                            let path = PathAndQuery::from_static("/paramd.v1.ParamServer/Pull");
                            let mut stream =
                                grpc.server_streaming(req, path, codec).await?.into_inner();
                            let mut first: Option<PullMessage> = None;
                            let mut written = vec![0usize; pull.params.len()];
                            while let Some(m) = stream.message().await? {
                                for &(k, n) in &m.written {
                                    written[k] += n;
                                }
                                first.get_or_insert(m);
                            }
                            Ok((first.unwrap_or_default(), written))
                        }
                    })
                    .await
                    .map_err(|s| shard_error(i, &shard.url, s, n))
            }
        });
        let (mut oldest, mut newest, mut last) = (u64::MAX, 0, None);
        let mut written = vec![0usize; pull.params.len()];
        for (i, (first, w)) in futures::future::try_join_all(calls)
            .await?
            .into_iter()
            .enumerate()
        {
            oldest = oldest.min(first.round);
            newest = newest.max(first.round);
            if i == 0 {
                last = first.last;
            }
            written.iter_mut().zip(w).for_each(|(a, b)| *a += b);
        }
        for (name, &(k, _, numel, _)) in &pull.params {
            if written[k] != numel {
                return Err(ClientError::Invalid(format!(
                    "job '{}': pulled {} of the {numel} values of '{name}'",
                    route.job, written[k]
                )));
            }
        }
        Ok((if oldest == u64::MAX { 0 } else { oldest }, newest, last))
    }
}
