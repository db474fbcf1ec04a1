//! Validating a set of segments (a push, or a job's initial values) against
//! the chunks a shard holds.
//!
//! A set is accepted whole or refused whole: every owned chunk must be
//! covered exactly once, and nothing outside them may be sent. A push's
//! payload is never copied here: its pieces are `Bytes` slices of the
//! received buffers, cut along chunk boundaries (`Target`). Initial values
//! are written into the chunks as they arrive (`Filling`).

use std::collections::HashMap;

use bytes::Bytes;
use paramd_proto::v1::Segment;
pub use paramd_proto::wire::{pack, to_le_bytes};

use crate::error::Result;
use crate::invalid;
use crate::layout::Layout;
use crate::optim::le_f32;
use crate::spec::{JobConfig, ParamInfo};

/// Elements `start..start + data.len() / 4` of one chunk.
#[derive(Clone, Debug)]
pub struct Piece {
    pub start: usize,
    pub data: Bytes,
}

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

/// What a validated set of segments looks like to the chunks: for each local
/// chunk, its pieces in element order.
#[derive(Debug)]
pub struct Pieces {
    pub by_chunk: Vec<Vec<Piece>>,
    pub bytes: usize,
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

impl Target<'_> {
    /// Validates `segments` and cuts them along chunk boundaries. The
    /// parameters named in `no_grad` have no gradient in this set: they
    /// must not be sent, and their chunks get no pieces.
    pub fn split(&self, segments: Vec<Segment>, no_grad: &[String]) -> Result<Pieces> {
        let mut absent = vec![false; self.params.len()];
        for name in no_grad {
            let &p = self
                .index
                .get(name)
                .ok_or_else(|| invalid!("no_grad names unknown parameter '{name}'"))?;
            absent[p] = true;
        }
        let mut by_param: Vec<(usize, u64, Bytes)> = Vec::with_capacity(segments.len());
        for s in segments {
            let &p = self
                .index
                .get(&s.param)
                .ok_or_else(|| invalid!("unknown parameter '{}'", s.param))?;
            if absent[p] {
                return Err(invalid!(
                    "parameter '{}' is sent and also listed in no_grad",
                    s.param
                ));
            }
            if !s.data.len().is_multiple_of(4) {
                return Err(invalid!(
                    "parameter '{}': {} bytes at element {} is not a multiple of 4 (f32)",
                    s.param,
                    s.data.len(),
                    s.offset
                ));
            }
            if !s.data.is_empty() {
                by_param.push((p, s.offset, s.data));
            }
        }
        by_param.sort_by_key(|&(p, offset, _)| (p, offset));

        let mut got = vec![0usize; self.params.len()];
        for (p, _, data) in &by_param {
            got[*p] += data.len();
        }
        let mut by_chunk: Vec<Vec<Piece>> = vec![Vec::new(); self.own.chunks.len()];
        let mut end = vec![0u64; self.params.len()];
        let mut bytes = 0;
        for (p, offset, data) in by_param {
            let info = &self.params[p];
            let n = (data.len() / 4) as u64;
            let numel = info.numel as u64;
            // Checked: offset comes from the client and may be anything.
            if offset > numel || n > numel - offset {
                return Err(invalid!(
                    "parameter '{}' {:?}: expected {} bytes, got {} ({} bytes at element {offset})",
                    info.name,
                    info.shape,
                    info.numel * 4,
                    got[p],
                    data.len(),
                ));
            }
            if offset < end[p] {
                return Err(invalid!(
                    "parameter '{}' is sent twice: elements {}..{} overlap",
                    info.name,
                    offset,
                    end[p].min(offset + n)
                ));
            }
            end[p] = offset + n;
            // Only a job refusing non-finite gradients pays for this scan.
            let bad = self
                .finite_only
                .then(|| (0..n as usize).find(|&i| !le_f32(&data, i).is_finite()))
                .flatten();
            if let Some(i) = bad {
                return Err(invalid!(
                    "parameter '{}': element {} is {}, and the job refuses non-finite gradients",
                    info.name,
                    offset as usize + i,
                    le_f32(&data, i)
                ));
            }
            bytes += data.len();
            self.cut(p, offset as usize, data, &mut by_chunk)?;
        }

        for (local, pieces) in by_chunk.iter().enumerate() {
            let chunk = &self.layout.chunks[self.own.chunks[local]];
            if absent[chunk.param] {
                continue;
            }
            let covered: usize = pieces.iter().map(|x| x.data.len() / 4).sum();
            if covered != chunk.len {
                let info = &self.params[chunk.param];
                let expected: usize = self
                    .layout
                    .chunks_of(chunk.param)
                    .filter(|&c| self.own.local[c].is_some())
                    .map(|c| self.layout.chunks[c].len * 4)
                    .sum();
                return Err(if got[chunk.param] == 0 {
                    invalid!(
                        "parameter '{}' is missing: expected {expected} bytes",
                        info.name
                    )
                } else {
                    invalid!(
                        "parameter '{}' {:?}: expected {expected} bytes, got {}",
                        info.name,
                        info.shape,
                        got[chunk.param]
                    )
                });
            }
        }
        Ok(Pieces { by_chunk, bytes })
    }

    /// Cuts the segment of parameter `p` starting at element `offset` at
    /// chunk boundaries.
    fn cut(&self, p: usize, offset: usize, data: Bytes, out: &mut [Vec<Piece>]) -> Result<()> {
        let total = data.len() / 4;
        let mut done = 0;
        while done < total {
            let e = offset + done;
            let id = self.layout.chunk_at(p, e);
            let chunk = &self.layout.chunks[id];
            let local = self.own.local[id].ok_or_else(|| {
                invalid!(
                    "parameter '{}': elements {}..{} are not held by this shard",
                    self.params[p].name,
                    chunk.offset,
                    chunk.offset + chunk.len
                )
            })?;
            let n = (chunk.offset + chunk.len - e).min(total - done);
            out[local].push(Piece {
                start: e - chunk.offset,
                data: data.slice(4 * done..4 * (done + n)),
            });
            done += n;
        }
        Ok(())
    }
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
    /// Bytes received per parameter.
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
        let &p = self
            .index
            .get(&s.param)
            .ok_or_else(|| format!("unknown parameter '{}'", s.param))?;
        let info = &self.params[p];
        if !s.data.len().is_multiple_of(4) {
            return Err(format!(
                "parameter '{}': {} bytes at element {} is not a multiple of 4 (f32)",
                info.name,
                s.data.len(),
                s.offset
            ));
        }
        let n = s.data.len() / 4;
        self.got[p] += s.data.len() as u64;
        // Checked: the offset comes from the client and may be anything.
        let offset = usize::try_from(s.offset)
            .ok()
            .filter(|&o| o <= info.numel && n <= info.numel - o)
            .ok_or_else(|| {
                format!(
                    "parameter '{}' {:?}: expected {} bytes, got {} bytes at element {}",
                    info.name,
                    info.shape,
                    info.numel * 4,
                    s.data.len(),
                    s.offset
                )
            })?;
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
        let mut done = 0;
        while done < n {
            let e = offset + done;
            let id = self.layout.chunk_at(p, e);
            let chunk = &self.layout.chunks[id];
            let k = (chunk.offset + chunk.len - e).min(n - done);
            let bytes = &s.data[4 * done..4 * (done + k)];
            match self.place[id] {
                Place::Here(local) => {
                    let dst = &mut self.chunks[local][e - chunk.offset..][..k];
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                // Copied: a slice would keep the whole received message.
                Place::Forward(shard) => self.forward[shard].push(Segment {
                    param: info.name.clone(),
                    offset: e as u64,
                    data: Bytes::copy_from_slice(bytes),
                }),
                Place::Refused => {
                    return Err(format!(
                        "parameter '{}': elements {}..{} are not held by this shard",
                        info.name,
                        chunk.offset,
                        chunk.offset + chunk.len
                    ));
                }
            }
            done += k;
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
                .map(|c| self.layout.chunks[c].len as u64 * 4)
                .sum();
            // No element twice and none outside: the sizes agree only if
            // every element is there.
            if self.got[p] != expected {
                return Err(if self.got[p] == 0 {
                    invalid!(
                        "initial values: parameter '{}' is missing: expected {expected} bytes",
                        info.name
                    )
                } else {
                    invalid!(
                        "initial values: parameter '{}' {:?}: expected {expected} bytes, got {}",
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

/// One step of a rank-order mean: copies the pieces of one push of a chunk
/// into `acc` (the first push of the mean) or adds them to it (the next
/// ones, in rank order, never arrival order, so the sum is deterministic).
/// A push without a gradient for the chunk (no pieces) counts as zeros.
pub fn fold_into(pieces: &[Piece], acc: &mut Accumulator, first: bool) {
    if first {
        acc.gradients = 0;
    }
    if pieces.is_empty() {
        if first {
            acc.sum.fill(0.0);
        } else {
            // Adding a zero still turns a sum of -0.0 into +0.0, as the
            // all-reduce of a zero bucket does.
            acc.sum.iter_mut().for_each(|d| *d += 0.0);
        }
        return;
    }
    acc.gradients += 1;
    for piece in pieces {
        let dst = &mut acc.sum[piece.start..piece.start + piece.data.len() / 4];
        let src = piece
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if first {
            dst.iter_mut().zip(src).for_each(|(d, x)| *d = x);
        } else {
            dst.iter_mut().zip(src).for_each(|(d, x)| *d += x);
        }
    }
}

/// The last step of a rank-order mean: divides a sum of `n` pushes by `n`.
pub fn divide(acc: &mut Accumulator, n: usize) {
    if n > 1 {
        let n = n as f32;
        for d in acc.sum.iter_mut() {
            *d /= n;
        }
    }
}

#[cfg(test)]
mod tests;
