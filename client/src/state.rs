//! A job's optimizer state (torch's `optimizer.state`: momentum buffers,
//! Adam's moments, each parameter's step), read from every shard at one
//! round.

use std::collections::{BTreeMap, HashMap};

use paramd_proto::v1 as pb;
use paramd_proto::v1::param_server_client::ParamServerClient;

use crate::{Client, ClientError, MAX_MESSAGE_BYTES, MAX_PULL_ATTEMPTS, Result, shard_error};

/// One parameter's optimizer state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamState {
    /// Updates applied to the parameter (`state['step']`).
    pub step: u64,
    /// State buffers by torch's name, each of the parameter's size; none
    /// for SGD without momentum.
    pub buffers: BTreeMap<String, Vec<f32>>,
}

/// A job's optimizer state as of one round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    /// Rounds completed when the state was read.
    pub round: u64,
    pub params: HashMap<String, ParamState>,
}

impl Client {
    /// The optimizer state of every parameter of `job` once `round` rounds
    /// have completed, from every shard. If the shards answer from
    /// different rounds (training moved on meanwhile), it is read again at
    /// the newest.
    pub async fn state(&self, job: &str, round: u64) -> Result<OptimizerState> {
        let route = self.route(job).await?;
        let n = route.shards.len();
        let mut want = round;
        let mut last = None;
        for _ in 0..MAX_PULL_ATTEMPTS {
            let calls = route
                .shards
                .iter()
                .enumerate()
                .map(|(i, shard)| async move {
                    let fail = |s| shard_error(i, &shard.url, s, n);
                    let mut c = ParamServerClient::new(shard.channel.clone())
                        .max_decoding_message_size(MAX_MESSAGE_BYTES);
                    let mut req = tonic::Request::new(pb::StateRequest {
                        job: job.to_owned(),
                        round: want,
                    });
                    req.set_timeout(self.timeout);
                    let mut stream = c.state(req).await.map_err(fail)?.into_inner();
                    let mut messages = Vec::new();
                    while let Some(m) = stream.message().await.map_err(fail)? {
                        messages.push(m);
                    }
                    Ok::<_, ClientError>(messages)
                });
            let mut answers = Vec::with_capacity(n);
            let mut moved = false;
            for r in futures::future::join_all(calls).await {
                match r {
                    Ok(m) => answers.push(m),
                    // A round applied while a shard was read: read again.
                    Err(e) if e.reason() == Some("aborted") => {
                        moved = true;
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            let rounds: Vec<u64> = answers.iter().flatten().map(|m| m.round).collect();
            let newest = rounds.iter().copied().max().unwrap_or(want);
            if moved || rounds.iter().any(|&r| r != newest) {
                want = newest;
                continue;
            }
            return assemble(&route, newest, answers.into_iter().flatten());
        }
        Err(last.unwrap_or_else(|| {
            ClientError::Invalid(format!(
                "the state of job '{job}' moved on at every one of {MAX_PULL_ATTEMPTS} reads"
            ))
        }))
    }
}

/// The state the shards' messages hold, each buffer checked against its
/// parameter's size.
fn assemble(
    route: &crate::route::Route,
    round: u64,
    messages: impl Iterator<Item = pb::StateResponse>,
) -> Result<OptimizerState> {
    let mut params: HashMap<String, ParamState> = HashMap::new();
    for s in messages.flat_map(|m| m.state) {
        let numel = route
            .index
            .get(s.param.as_str())
            .map(|&i| route.numel(i))
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "a shard sent the state of unknown parameter '{}'",
                    s.param
                ))
            })?;
        let p = params.entry(s.param.clone()).or_default();
        p.step = s.step;
        if s.buffer.is_empty() {
            continue;
        }
        let len = s.data.len() / 4;
        let offset = usize::try_from(s.offset)
            .ok()
            .filter(|&o| s.data.len() % 4 == 0 && o <= numel && len <= numel - o)
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "a shard sent {} bytes of '{}' {} at element {}, outside its {numel} elements",
                    s.data.len(),
                    s.buffer,
                    s.param,
                    s.offset
                ))
            })?;
        let buf = p
            .buffers
            .entry(s.buffer)
            .or_insert_with(|| vec![0.0; numel]);
        for (d, b) in buf[offset..offset + len]
            .iter_mut()
            .zip(s.data.chunks_exact(4))
        {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    Ok(OptimizerState { round, params })
}
