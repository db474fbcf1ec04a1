//! A job's optimizer state (torch's `optimizer.state`: momentum buffers,
//! Adam's moments, each parameter's step), read from every shard at one
//! round.

use std::collections::{BTreeMap, HashMap};

use paramd_proto::v1 as pb;
use paramd_proto::v1::param_server_client::ParamServerClient;

use bytes::Bytes;
use paramd_proto::wire::{pack_by, to_le_bytes};

use crate::{
    Client, ClientError, MAX_MESSAGE_BYTES, MAX_PULL_ATTEMPTS, MESSAGE_BYTES, Result, shard_error,
};

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

impl Client {
    /// Sets the optimizer state of `job` (torch's `load_state_dict`): loaded
    /// when round `round` (the open round) is applied, before its step, on
    /// every shard or on none; the job then counts optimizer steps from
    /// `step`. `params` gives every parameter's step and every buffer its
    /// optimizer keeps (the server refuses any other, or any missing),
    /// each of the parameter's size. Refused whole if any shard refuses
    /// its part. Returns the load's id, new at every call (so that parts of
    /// two calls are never applied together): the round's outcome
    /// (`RoundOutcome::loaded_state`) carries it once it is applied.
    pub async fn load_state(
        &self,
        job: &str,
        round: u64,
        step: u64,
        params: &HashMap<String, ParamState>,
    ) -> Result<u64> {
        let id = load_id();
        let route = self.route(job).await?;
        for name in params.keys() {
            if !route.index.contains_key(name.as_str()) {
                return Err(ClientError::Invalid(format!(
                    "state: job '{job}' has no parameter '{name}'"
                )));
            }
        }
        let mut per_shard: Vec<Vec<pb::StateSegment>> = vec![Vec::new(); route.shards.len()];
        for (i, (name, _, first)) in route.order.iter().enumerate() {
            let numel = route.numel(i);
            let p = params.get(name.as_ref()).ok_or_else(|| {
                ClientError::Invalid(format!("state: parameter '{name}' is missing"))
            })?;
            for (buffer, values) in &p.buffers {
                if values.len() != numel {
                    return Err(ClientError::Invalid(format!(
                        "state: parameter '{name}' buffer '{buffer}' has {} elements, the parameter {numel}",
                        values.len()
                    )));
                }
            }
            let ce = route.chunk_elems;
            for k in 0..numel.div_ceil(ce) {
                let out = &mut per_shard[route.owners[first + k] as usize];
                let (start, end) = (k * ce, ((k + 1) * ce).min(numel));
                let segment = |buffer: &str, from: usize, data: Bytes| pb::StateSegment {
                    param: name.to_string(),
                    buffer: buffer.to_owned(),
                    offset: from as u64,
                    data,
                    step: p.step,
                };
                if p.buffers.is_empty() {
                    out.push(segment("", start, Bytes::new()));
                }
                for (buffer, values) in &p.buffers {
                    for from in (start..end).step_by(MESSAGE_BYTES / 4) {
                        let to = (from + MESSAGE_BYTES / 4).min(end);
                        out.push(segment(buffer, from, to_le_bytes(&values[from..to])));
                    }
                }
            }
        }
        let n = route.shards.len();
        let policy = &self.retry(true);
        let calls = per_shard.into_iter().enumerate().map(|(i, segments)| {
            let header = pb::LoadStateRequest {
                job: job.to_owned(),
                round,
                id,
                step,
                state: Vec::new(),
            };
            let messages: Vec<pb::LoadStateRequest> = std::iter::once(header)
                .chain(
                    pack_by(segments, MESSAGE_BYTES, |s| s.data.len())
                        .into_iter()
                        .map(|state| pb::LoadStateRequest {
                            state,
                            ..Default::default()
                        }),
                )
                .collect();
            let shard = &route.shards[i];
            async move {
                policy
                    .run(|left| {
                        let messages = messages.clone();
                        async move {
                            let mut c = ParamServerClient::new(shard.channel.clone())
                                .max_encoding_message_size(MAX_MESSAGE_BYTES);
                            let mut req = tonic::Request::new(futures::stream::iter(messages));
                            req.set_timeout(left);
                            c.load_state(req).await
                        }
                    })
                    .await
                    .map_err(|s| shard_error(i, &shard.url, s, n))
            }
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        Ok(id)
    }
}

/// A random id other than 0, for one state load.
fn load_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // RandomState's keys are random per process; the count and the time
    // make every call's hash different.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish().max(1)
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
