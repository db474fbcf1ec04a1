//! A state load (torch's `load_state_dict`) received into the chunks a
//! shard holds: every buffer the chunk's optimizer keeps, covered exactly
//! once, and each parameter's step. Accepted whole or refused whole, and
//! kept apart from the job's state until a round applies it.

use std::collections::HashMap;

use paramd_proto::v1::{Dtype, Segment, StateSegment};
use paramd_proto::wire::decode_into;

use super::{Ownership, check_segment, claim, runs};
use crate::error::Result;
use crate::invalid;
use crate::layout::Layout;
use crate::math::state::OptimState;
use crate::spec::JobConfig;

/// One buffer of one chunk being received.
struct Buffer {
    name: &'static str,
    values: Vec<f32>,
    /// One bit per element received, so none is taken twice.
    seen: Vec<u64>,
    got: usize,
}

/// A state load being received, message by message.
pub struct Loading<'a> {
    config: &'a JobConfig,
    index: &'a HashMap<String, usize>,
    layout: &'a Layout,
    own: &'a Ownership,
    /// Per local chunk, the buffers its group's optimizer keeps.
    chunks: Vec<Vec<Buffer>>,
    /// Per local chunk, whether its step-only segment (no buffer) came.
    marked: Vec<bool>,
    /// Per parameter, its step as the segments gave it.
    steps: Vec<Option<u64>>,
}

/// A load received whole: each local chunk's state and step, in local order.
#[derive(Debug)]
pub struct Loaded {
    pub chunks: Vec<(OptimState, u64)>,
}

impl<'a> Loading<'a> {
    /// Expects the state of the chunks `own` holds. Allocates their buffers
    /// (the size of this shard's optimizer state) at once, so a load never
    /// holds more than that whatever its messages look like.
    pub fn new(
        config: &'a JobConfig,
        index: &'a HashMap<String, usize>,
        layout: &'a Layout,
        own: &'a Ownership,
    ) -> Loading<'a> {
        let chunks = own
            .chunks
            .iter()
            .map(|&id| {
                let chunk = &layout.chunks[id];
                let hyper = &config.groups[config.params[chunk.param].group];
                OptimState::zeroed(hyper, 0)
                    .named()
                    .into_iter()
                    .map(|(name, _)| Buffer {
                        name,
                        values: vec![0.0; chunk.len],
                        seen: vec![0; chunk.len.div_ceil(64)],
                        got: 0,
                    })
                    .collect()
            })
            .collect();
        Loading {
            config,
            index,
            layout,
            own,
            chunks,
            marked: vec![false; own.chunks.len()],
            steps: vec![None; config.params.len()],
        }
    }

    /// Bytes of state this shard expects.
    pub fn expected_bytes(&self) -> usize {
        self.chunks
            .iter()
            .flatten()
            .map(|b| b.values.len() * 4)
            .sum()
    }

    /// Writes one message's segments into place.
    pub fn feed(&mut self, segments: Vec<StateSegment>) -> Result<()> {
        for s in segments {
            self.segment(s).map_err(|m| invalid!("state: {m}"))?;
        }
        Ok(())
    }

    fn segment(&mut self, s: StateSegment) -> std::result::Result<(), String> {
        let seg = Segment {
            param: s.param,
            offset: s.offset,
            data: s.data,
            dtype: Dtype::F32 as i32,
        };
        let c = check_segment(&self.config.params, self.index, &seg)?;
        let (p, offset, n) = (c.p, c.offset, c.n);
        let info = &self.config.params[p];
        match self.steps[p] {
            Some(step) if step != s.step => {
                return Err(format!(
                    "parameter '{}': step {} and step {step} in one load",
                    info.name, s.step
                ));
            }
            _ => self.steps[p] = Some(s.step),
        }
        if s.buffer.is_empty() {
            // Carries the step of the chunk at `offset`, and nothing else.
            if n != 0 {
                return Err(format!(
                    "parameter '{}': {} bytes at element {offset} without a buffer name",
                    info.name,
                    seg.data.len()
                ));
            }
            let local = self.local_at(p, offset)?;
            if std::mem::replace(&mut self.marked[local], true) {
                return Err(format!(
                    "parameter '{}': the step of elements from {offset} is sent twice",
                    info.name
                ));
            }
            return Ok(());
        }
        if n == 0 {
            return Err(format!(
                "parameter '{}': buffer '{}' at element {offset} holds no elements",
                info.name, s.buffer
            ));
        }
        for (id, start, run) in runs(self.layout, p, offset, n) {
            let local = self.own.local[id].ok_or_else(|| {
                let c = &self.layout.chunks[id];
                format!(
                    "parameter '{}': elements {}..{} are not held by this shard",
                    info.name,
                    c.offset,
                    c.offset + c.len
                )
            })?;
            let group = info.group;
            let buffer = self.chunks[local]
                .iter_mut()
                .find(|b| b.name == s.buffer)
                .ok_or_else(|| {
                    format!(
                        "parameter '{}': buffer '{}' is not kept by the optimizer of param group {group}",
                        info.name, s.buffer
                    )
                })?;
            if let Some(e) = claim(&mut buffer.seen, start, start + run.len()) {
                return Err(format!(
                    "parameter '{}': buffer '{}' element {} is sent twice",
                    info.name,
                    s.buffer,
                    self.layout.chunks[id].offset + e
                ));
            }
            decode_into(
                &mut buffer.values[start..start + run.len()],
                c.bytes(&seg.data, &run),
                c.dtype,
            );
            buffer.got += run.len();
        }
        Ok(())
    }

    /// The local chunk holding element `offset` of parameter `p`.
    fn local_at(&self, p: usize, offset: usize) -> std::result::Result<usize, String> {
        let info = &self.config.params[p];
        if offset >= info.numel {
            return Err(format!(
                "parameter '{}' has {} elements: no chunk starts at {offset}",
                info.name, info.numel
            ));
        }
        let id = self.layout.chunk_at(p, offset);
        self.own.local[id].ok_or_else(|| {
            format!(
                "parameter '{}': element {offset} is not held by this shard",
                info.name
            )
        })
    }

    /// Accepts the load if every buffer of every chunk held here is covered
    /// whole, every parameter held here has a step, a parameter never
    /// stepped (step 0) has zero buffers as torch's fresh state, and every
    /// value is finite (and the second moments not negative).
    pub fn finish(self) -> Result<Loaded> {
        let mut chunks = Vec::with_capacity(self.chunks.len());
        for (local, buffers) in self.chunks.into_iter().enumerate() {
            let meta = &self.layout.chunks[self.own.chunks[local]];
            let info = &self.config.params[meta.param];
            let hyper = &self.config.groups[info.group];
            let Some(step) = self.steps[meta.param] else {
                return Err(invalid!(
                    "state: parameter '{}' is missing (no segment gives its step)",
                    info.name
                ));
            };
            if buffers.is_empty() && !self.marked[local] {
                return Err(invalid!(
                    "state: parameter '{}': elements {}..{} have no segment (one without a buffer \
                     gives the step of a chunk whose optimizer keeps none)",
                    info.name,
                    meta.offset,
                    meta.offset + meta.len
                ));
            }
            for b in &buffers {
                if b.got != b.values.len() {
                    return Err(invalid!(
                        "state: parameter '{}': buffer '{}' of elements {}..{} is incomplete: {} \
                         of {} elements",
                        info.name,
                        b.name,
                        meta.offset,
                        meta.offset + meta.len,
                        b.got,
                        b.values.len()
                    ));
                }
                let nonnegative = b.name != "exp_avg" && b.name != "momentum_buffer";
                if let Some(i) = b.values.iter().position(|&v| {
                    !v.is_finite() || (nonnegative && v < 0.0) || (step == 0 && v != 0.0)
                }) {
                    let why = if step == 0 {
                        "with step 0 (never stepped) every buffer must be zero"
                    } else if nonnegative {
                        "must be finite and not negative"
                    } else {
                        "must be finite"
                    };
                    return Err(invalid!(
                        "state: parameter '{}': buffer '{}' element {} is {}: {why}",
                        info.name,
                        b.name,
                        meta.offset + i,
                        b.values[i]
                    ));
                }
            }
            let mut buffers = buffers;
            let state = OptimState::from_named(hyper, |name| {
                let i = buffers
                    .iter()
                    .position(|b| b.name == name)
                    .unwrap_or_else(|| {
                        unreachable!("the buffers were made from the same optimizer")
                    });
                Ok::<_, ()>(std::mem::take(&mut buffers[i].values))
            })
            .unwrap_or_else(|()| unreachable!("every buffer is given"));
            chunks.push((state, step));
        }
        Ok(Loaded { chunks })
    }
}
