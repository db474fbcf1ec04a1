//! Validating a set of segments (a push, or a job's initial values) against
//! the chunks a shard holds, and cutting it along chunk boundaries.
//!
//! A set is accepted whole or refused whole: every owned chunk must be
//! covered exactly once, and nothing outside them may be sent. The payload
//! is never copied here: pieces are `Bytes` slices of the received buffers.

use std::collections::HashMap;

use bytes::Bytes;
use paramd_proto::v1::Segment;
pub use paramd_proto::wire::{pack, to_le_bytes};

use crate::error::{Error, Result};
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
    /// Validates `segments` and cuts them along chunk boundaries.
    pub fn split(&self, segments: Vec<Segment>) -> Result<Pieces> {
        let mut by_param: Vec<(usize, u64, Bytes)> = Vec::with_capacity(segments.len());
        for s in segments {
            let &p = self
                .index
                .get(&s.param)
                .ok_or_else(|| invalid!("unknown parameter '{}'", s.param))?;
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

/// Validates a job's initial values against the chunks `own` holds.
pub fn initial_values(
    config: &JobConfig,
    layout: &Layout,
    own: &Ownership,
    values: Vec<Segment>,
) -> Result<Pieces> {
    let index = config.index();
    let target = Target {
        params: &config.params,
        index: &index,
        layout,
        own,
        finite_only: false,
    };
    target.split(values).map_err(|e| match e {
        Error::Invalid(m) => invalid!("initial values: {m}"),
        e => e,
    })
}

/// Sums the pieces of several pushes of one chunk, in the order given, into
/// `acc`, then divides by their number: the mean gradient. The order is the
/// caller's (worker rank), never arrival order, so the result is
/// deterministic.
pub fn mean_into<'a>(pushes: impl ExactSizeIterator<Item = &'a [Piece]>, acc: &mut [f32]) {
    let n = pushes.len();
    for (i, pieces) in pushes.enumerate() {
        fold_into(pieces, acc, i == 0);
    }
    divide(acc, n);
}

/// One step of `mean_into`: copies the pieces of one push of a chunk into
/// `acc` (the first push of the mean) or adds them to it (the next ones,
/// in rank order).
pub fn fold_into(pieces: &[Piece], acc: &mut [f32], first: bool) {
    for piece in pieces {
        let dst = &mut acc[piece.start..piece.start + piece.data.len() / 4];
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

/// The last step of `mean_into`: divides a sum of `n` pushes by `n`.
pub fn divide(acc: &mut [f32], n: usize) {
    if n > 1 {
        let n = n as f32;
        for d in acc.iter_mut() {
            *d /= n;
        }
    }
}

/// Copies a chunk's pieces (initial values) into `dst`.
pub fn copy_into(pieces: &[Piece], dst: &mut [f32]) {
    mean_into(std::iter::once(pieces), dst);
}

impl Pieces {
    /// The pieces as segments of their parameters, grouped by the shard
    /// `owners` gives each chunk (pieces of every chunk, `Ownership::all`).
    pub fn by_shard(
        self,
        layout: &Layout,
        params: &[ParamInfo],
        owners: &[u32],
        shards: usize,
    ) -> Vec<Vec<Segment>> {
        let mut out = vec![Vec::new(); shards];
        for (id, pieces) in self.by_chunk.into_iter().enumerate() {
            let chunk = &layout.chunks[id];
            for piece in pieces {
                out[owners[id] as usize].push(Segment {
                    param: params[chunk.param].name.clone(),
                    offset: (chunk.offset + piece.start) as u64,
                    data: piece.data,
                });
            }
        }
        out
    }
}
