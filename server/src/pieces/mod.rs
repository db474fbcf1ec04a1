//! Validating a set of segments (a push, or a job's initial values) against
//! the chunks a shard holds.
//!
//! A set is accepted whole or refused whole: every owned chunk must be
//! covered exactly once, and nothing outside them may be sent. Both are
//! written into place as their messages arrive, so a received message is
//! dropped at once: a push into buffers reused across rounds (`Staging`,
//! `Spare`), a job's initial values into its chunks (`Filling`).

use std::collections::HashMap;

use bytes::Bytes;
use paramd_proto::v1::{Dtype, Segment};
use paramd_proto::wire::{decode_into, dtype, elem_bytes, element};
pub use paramd_proto::wire::{pack, to_le_bytes};

use crate::error::Result;
use crate::invalid;
use crate::layout::Layout;
use crate::spec::{JobConfig, ParamInfo};

/// The chunks a shard holds.
#[derive(Clone, Debug)]
pub struct Ownership {
    /// Local index of each global chunk id held here.
    local: Vec<Option<usize>>,
    /// Global chunk id of each local chunk, in canonical order.
    pub chunks: Vec<usize>,
}

impl Ownership {
    /// Every chunk of the layout: a one-shard cluster.
    pub fn all(layout: &Layout) -> Ownership {
        Ownership::of(&vec![0; layout.chunks.len()], 0)
    }

    /// The chunks `owners` gives to shard `shard`.
    pub fn of(owners: &[u32], shard: u32) -> Ownership {
        let chunks: Vec<usize> = (0..owners.len()).filter(|&c| owners[c] == shard).collect();
        let mut local = vec![None; owners.len()];
        for (i, &c) in chunks.iter().enumerate() {
            local[c] = Some(i);
        }
        Ownership { local, chunks }
    }
}

/// What the checks need to know about a job.
pub struct Target<'a> {
    pub params: &'a [ParamInfo],
    pub index: &'a HashMap<String, usize>,
    pub layout: &'a Layout,
    pub own: &'a Ownership,
    /// Refuse non-finite values (the job's `non_finite = error`).
    pub finite_only: bool,
}

/// A segment checked against the job's parameters: the parameter, its
/// first element, the number of elements and their dtype on the wire.
#[derive(Clone, Copy, Debug)]
struct Checked {
    p: usize,
    offset: usize,
    n: usize,
    dtype: Dtype,
}

impl Checked {
    /// The bytes of elements `run` (counted from `offset`) in the segment.
    fn bytes<'a>(&self, data: &'a [u8], run: &std::ops::Range<usize>) -> &'a [u8] {
        let e = elem_bytes(self.dtype);
        &data[e * run.start..e * run.end]
    }
}

/// Checks one segment against the job's parameters: a known parameter, a
/// known dtype, whole elements, inside the parameter.
fn check_segment(
    params: &[ParamInfo],
    index: &HashMap<String, usize>,
    s: &Segment,
) -> std::result::Result<Checked, String> {
    let &p = index
        .get(&s.param)
        .ok_or_else(|| format!("unknown parameter '{}'", s.param))?;
    let info = &params[p];
    let dtype = dtype(s.dtype).map_err(|e| format!("parameter '{}': {e}", info.name))?;
    let e = elem_bytes(dtype);
    if !s.data.len().is_multiple_of(e) {
        return Err(format!(
            "parameter '{}': {} bytes at element {} is not a multiple of {e} ({})",
            info.name,
            s.data.len(),
            s.offset,
            paramd_proto::wire::name(dtype)
        ));
    }
    let n = s.data.len() / e;
    // Checked: the offset comes from the client and may be anything.
    let offset = usize::try_from(s.offset)
        .ok()
        .filter(|&o| o <= info.numel && n <= info.numel - o)
        .ok_or_else(|| {
            format!(
                "parameter '{}' {:?}: expected {} elements, got {n} at element {}",
                info.name, info.shape, info.numel, s.offset
            )
        })?;
    Ok(Checked {
        p,
        offset,
        n,
        dtype,
    })
}

/// The chunks elements `offset..offset + n` of parameter `p` fall in, in
/// order: each chunk's id, the run's first element in the chunk, and the
/// run's elements counted from `offset`.
fn runs(
    layout: &Layout,
    p: usize,
    offset: usize,
    n: usize,
) -> impl Iterator<Item = (usize, usize, std::ops::Range<usize>)> + '_ {
    let mut done = 0;
    std::iter::from_fn(move || {
        (done < n).then(|| {
            let e = offset + done;
            let id = layout.chunk_at(p, e);
            let chunk = &layout.chunks[id];
            let k = (chunk.offset + chunk.len - e).min(n - done);
            done += k;
            (id, e - chunk.offset, done - k..done)
        })
    })
}

/// Writes the little-endian elements of `dtype` in `bytes` into `dst`,
/// each multiplied by `scale` if there is one (a weighted push's weight;
/// the product rounded to f32).
fn write_into(dst: &mut [f32], bytes: &[u8], dtype: Dtype, scale: Option<f32>) {
    decode_into(dst, bytes, dtype);
    if let Some(w) = scale {
        dst.iter_mut().for_each(|d| *d *= w);
    }
}

/// Writes `sum` plus the little-endian elements of `dtype` in `bytes`
/// (each multiplied by `scale` first, if there is one) into `dst`: the
/// same operations, in the same order, as `write_into` and `fold_into`
/// make later.
fn add_into(dst: &mut [f32], sum: &[f32], bytes: &[u8], dtype: Dtype, scale: Option<f32>) {
    // One loop per dtype and scale, each compiled on its own so that it
    // vectorizes.
    fn add<const N: usize>(
        dst: &mut [f32],
        sum: &[f32],
        bytes: &[u8],
        decode: impl Fn(&[u8]) -> f32,
        scale: Option<f32>,
    ) {
        let values = dst.iter_mut().zip(sum).zip(bytes.chunks_exact(N));
        match scale {
            None => values.for_each(|((d, a), b)| *d = a + decode(b)),
            Some(w) => values.for_each(|((d, a), b)| *d = a + w * decode(b)),
        }
    }
    match dtype {
        Dtype::F32 => add::<4>(
            dst,
            sum,
            bytes,
            |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            scale,
        ),
        Dtype::Bf16 => add::<2>(
            dst,
            sum,
            bytes,
            |b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
            scale,
        ),
        Dtype::F16 => add::<2>(dst, sum, bytes, |b| element(b, 0, Dtype::F16), scale),
    }
}

/// The refusal of elements of a chunk another shard holds.
fn not_held(info: &ParamInfo, chunk: &crate::layout::Chunk) -> String {
    format!(
        "parameter '{}': elements {}..{} are not held by this shard",
        info.name,
        chunk.offset,
        chunk.offset + chunk.len
    )
}

/// Where the initial values of a chunk go while a job is created.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// Kept here, as local chunk `i`.
    Here(usize),
    /// Forwarded to shard `s` (the coordinator creating a job).
    Forward(usize),
    /// Another shard's: sending it here is refused.
    Refused,
}

/// A job's initial values, written into place as they arrive.
///
/// The chunks this shard keeps are allocated once (zeroed pages, touched
/// only when written) and filled message by message; the values of other
/// shards' chunks (on the coordinator) are copied out of the received
/// buffers to be forwarded. So the shard never holds more than the job's
/// size, whatever the messages look like. A bitmap of the elements received
/// (one bit per element) refuses any element sent twice; `finish` refuses a
/// parameter not covered whole. Nothing is kept unless `finish` accepts it.
pub struct Filling {
    params: Vec<ParamInfo>,
    index: HashMap<String, usize>,
    layout: Layout,
    owners: Vec<u32>,
    place: Vec<Place>,
    /// First global element of each parameter, for `seen`.
    base: Vec<usize>,
    seen: Vec<u64>,
    /// Elements received per parameter.
    got: Vec<u64>,
    chunks: Vec<Vec<f32>>,
    forward: Vec<Vec<Segment>>,
}

/// What a `Filling` accepted: the job's layout and the shard of each
/// chunk, the local chunks' values in canonical order, and the segments to
/// forward to each shard.
#[derive(Debug)]
pub struct Filled {
    pub layout: Layout,
    pub owners: Vec<u32>,
    pub chunks: Vec<Vec<f32>>,
    pub forward: Vec<Vec<Segment>>,
}

impl Filling {
    /// Expects the values of the chunks `owners` gives to `shard`, and with
    /// `forward` those of every other shard's chunks too, to forward them.
    pub fn new(
        config: &JobConfig,
        layout: Layout,
        owners: Vec<u32>,
        shard: u32,
        shards: usize,
        forward: bool,
    ) -> Result<Filling> {
        if owners.len() != layout.chunks.len() || owners.iter().any(|&o| o as usize >= shards) {
            return Err(invalid!(
                "layout.owners must name one of {shards} shards for each of {} chunks",
                layout.chunks.len()
            ));
        }
        let mut chunks = Vec::new();
        let place = owners
            .iter()
            .zip(&layout.chunks)
            .map(|(&o, chunk)| {
                if o == shard {
                    chunks.push(vec![0.0; chunk.len]);
                    Place::Here(chunks.len() - 1)
                } else if forward {
                    Place::Forward(o as usize)
                } else {
                    Place::Refused
                }
            })
            .collect();
        let mut base = Vec::with_capacity(config.params.len());
        let mut total = 0usize;
        for p in &config.params {
            base.push(total);
            total += p.numel;
        }
        Ok(Filling {
            params: config.params.clone(),
            index: config.index(),
            layout,
            owners,
            place,
            base,
            seen: vec![0; total.div_ceil(64)],
            got: vec![0; config.params.len()],
            chunks,
            forward: vec![Vec::new(); if forward { shards } else { 0 }],
        })
    }

    /// Writes one message's segments into place.
    pub fn feed(&mut self, segments: Vec<Segment>) -> Result<()> {
        for s in segments {
            self.segment(s)
                .map_err(|m| invalid!("initial values: {m}"))?;
        }
        Ok(())
    }

    fn segment(&mut self, s: Segment) -> std::result::Result<(), String> {
        let c = check_segment(&self.params, &self.index, &s)?;
        let (p, offset, n) = (c.p, c.offset, c.n);
        let info = &self.params[p];
        self.got[p] += n as u64;
        if let Some(e) = claim(
            &mut self.seen,
            self.base[p] + offset,
            self.base[p] + offset + n,
        ) {
            return Err(format!(
                "parameter '{}' is sent twice: elements {}..{} overlap",
                info.name,
                e - self.base[p],
                offset + n
            ));
        }
        for (id, start, run) in runs(&self.layout, p, offset, n) {
            let bytes = c.bytes(&s.data, &run);
            match self.place[id] {
                Place::Here(local) => {
                    decode_into(
                        &mut self.chunks[local][start..][..run.len()],
                        bytes,
                        c.dtype,
                    );
                }
                // Copied: a slice would keep the whole received message.
                Place::Forward(shard) => self.forward[shard].push(Segment {
                    param: info.name.clone(),
                    offset: (offset + run.start) as u64,
                    data: Bytes::copy_from_slice(bytes),
                    dtype: c.dtype as i32,
                }),
                Place::Refused => return Err(not_held(info, &self.layout.chunks[id])),
            }
        }
        Ok(())
    }

    /// Accepts the values if every expected parameter is covered whole.
    pub fn finish(self) -> Result<Filled> {
        for (p, info) in self.params.iter().enumerate() {
            let expected: u64 = self
                .layout
                .chunks_of(p)
                .filter(|&c| !matches!(self.place[c], Place::Refused))
                .map(|c| self.layout.chunks[c].len as u64)
                .sum();
            // No element twice and none outside: the sizes agree only if
            // every element is there.
            if self.got[p] != expected {
                return Err(if self.got[p] == 0 {
                    invalid!(
                        "initial values: parameter '{}' is missing: expected {expected} elements",
                        info.name
                    )
                } else {
                    invalid!(
                        "initial values: parameter '{}' {:?}: expected {expected} elements, got {}",
                        info.name,
                        info.shape,
                        self.got[p]
                    )
                });
            }
        }
        Ok(Filled {
            layout: self.layout,
            owners: self.owners,
            chunks: self.chunks,
            forward: self.forward,
        })
    }
}

/// Sets bits `a..b`; returns the first that was already set (the bits up to
/// it are then set: the caller refuses the whole set).
fn claim(bits: &mut [u64], a: usize, b: usize) -> Option<usize> {
    let mut i = a;
    while i < b {
        let (w, lo) = (i / 64, i % 64);
        let hi = (b - w * 64).min(64);
        let mask = if hi - lo == 64 {
            !0
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        let clash = bits[w] & mask;
        if clash != 0 {
            return Some(w * 64 + clash.trailing_zeros() as usize);
        }
        bits[w] |= mask;
        i = w * 64 + hi;
    }
    None
}

/// A chunk's sum of a round's pushes, in rank order, and how many of them
/// had a gradient for it.
#[derive(Debug)]
pub struct Accumulator {
    pub sum: Vec<f32>,
    pub gradients: u32,
}

impl Accumulator {
    pub fn new(len: usize) -> Accumulator {
        Accumulator {
            sum: vec![0.0; len],
            gradients: 0,
        }
    }

    /// Whether a step may touch the chunk: a parameter no push of the
    /// round has a gradient for is skipped, as torch skips `grad is None`.
    pub fn has_gradient(&self) -> bool {
        self.gradients > 0
    }
}

/// One step of a rank-order mean: copies one push's gradient of a chunk
/// into `acc` (the first push of the mean) or adds it (the next ones, in
/// rank order, never arrival order, so the sum is deterministic). A push
/// without a gradient for the chunk (`None`) counts as zeros.
pub fn fold_into(grad: Option<&[f32]>, acc: &mut Accumulator, first: bool) {
    if first {
        acc.gradients = 0;
    }
    let Some(grad) = grad else {
        if first {
            acc.sum.fill(0.0);
        } else {
            // Adding a zero still turns a sum of -0.0 into +0.0, as the
            // all-reduce of a zero bucket does.
            acc.sum.iter_mut().for_each(|d| *d += 0.0);
        }
        return;
    };
    acc.gradients += 1;
    if first {
        acc.sum.copy_from_slice(grad);
    } else {
        acc.sum.iter_mut().zip(grad).for_each(|(d, x)| *d += x);
    }
}

/// The last step of a rank-order mean: divides a sum of pushes by
/// `divisor` (their number, or their weights' sum; one push of a mean is
/// left as it is).
pub fn divide(acc: &mut Accumulator, divisor: f32) {
    if divisor != 1.0 {
        for d in acc.sum.iter_mut() {
            *d /= divisor;
        }
    }
}

pub mod load;
mod staging;
pub use staging::{Buffers, Spare, Staged, Staging};

#[cfg(test)]
mod tests;
