//! How a job's parameters are cut into chunks.
//!
//! A chunk is a contiguous run of one parameter of at most `chunk_bytes`.
//! Chunks are numbered in canonical order (parameter order, then offset);
//! that order fixes how per-chunk sums of squares are added, so the global
//! norm does not depend on which shard holds which chunk.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;

use crate::spec::ParamInfo;

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// One chunk: elements `offset..offset + len` of parameter `param`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub param: usize,
    pub offset: usize,
    pub len: usize,
}

/// The chunks of every parameter of a job.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Elements per chunk; the last chunk of a parameter may be shorter.
    pub chunk_elems: usize,
    pub chunks: Vec<Chunk>,
    /// Index of each parameter's first chunk; `first[p + 1]` ends it.
    first: Vec<usize>,
}

impl Layout {
    /// Cuts `params` into chunks of at most `chunk_bytes` (at least one
    /// element each). A parameter with no elements has no chunk.
    pub fn new(params: &[ParamInfo], chunk_bytes: usize) -> Layout {
        Layout::with_chunk_elems(params, chunk_bytes / 4)
    }

    /// Cuts `params` into chunks of `chunk_elems` elements (at least one).
    pub fn with_chunk_elems(params: &[ParamInfo], chunk_elems: usize) -> Layout {
        let chunk_elems = chunk_elems.max(1);
        let mut chunks = Vec::new();
        let mut first = Vec::with_capacity(params.len() + 1);
        for (p, info) in params.iter().enumerate() {
            first.push(chunks.len());
            let mut offset = 0;
            while offset < info.numel {
                let len = chunk_elems.min(info.numel - offset);
                chunks.push(Chunk {
                    param: p,
                    offset,
                    len,
                });
                offset += len;
            }
        }
        first.push(chunks.len());
        Layout {
            chunk_elems,
            chunks,
            first,
        }
    }

    /// The chunk ids of parameter `p`.
    pub fn chunks_of(&self, p: usize) -> Range<usize> {
        self.first[p]..self.first[p + 1]
    }

    /// The id of the chunk holding element `e` of parameter `p`.
    pub fn chunk_at(&self, p: usize, e: usize) -> usize {
        self.first[p] + e / self.chunk_elems
    }
}

impl Layout {
    /// Places the chunks on `shards` shards balancing bytes: largest chunk
    /// first, each on the least loaded shard (ties to the lower index). No
    /// shard ends with more than its fair share plus one chunk. Returns the
    /// shard of every chunk; deterministic for a given layout.
    pub fn place(&self, shards: usize) -> Vec<u32> {
        let shards = shards.max(1);
        let mut order: Vec<usize> = (0..self.chunks.len()).collect();
        order.sort_by_key(|&c| (Reverse(self.chunks[c].len), c));
        let mut load: BinaryHeap<Reverse<(usize, u32)>> =
            (0..shards as u32).map(|s| Reverse((0, s))).collect();
        let mut owners = vec![0u32; self.chunks.len()];
        for c in order {
            if let Some(Reverse((bytes, s))) = load.pop() {
                owners[c] = s;
                load.push(Reverse((bytes + self.chunks[c].len * 4, s)));
            }
        }
        owners
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(numel: usize) -> ParamInfo {
        ParamInfo {
            name: format!("p{numel}"),
            shape: vec![numel as u64],
            numel,
            group: 0,
        }
    }

    #[test]
    fn chunks_cover_every_element_once() {
        let params = [param(10), param(1), param(0), param(7)];
        let l = Layout::new(&params, 16);
        assert_eq!(l.chunk_elems, 4);
        for (p, info) in params.iter().enumerate() {
            let mut next = 0;
            for c in l.chunks_of(p) {
                let chunk = &l.chunks[c];
                assert_eq!((chunk.param, chunk.offset), (p, next));
                assert!(chunk.len >= 1 && chunk.len <= 4);
                assert_eq!(l.chunk_at(p, chunk.offset), c);
                next += chunk.len;
            }
            assert_eq!(next, info.numel);
        }
        assert_eq!(l.chunks.len(), 3 + 1 + 2);
    }

    #[test]
    fn tiny_chunk_sizes_still_make_progress() {
        let l = Layout::new(&[param(3)], 1);
        assert_eq!(l.chunks.len(), 3);
    }

    #[test]
    fn placement_covers_every_chunk_and_balances_bytes() {
        // A small deterministic generator: the property must hold for any
        // shapes, chunk sizes and shard counts.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for case in 0..300 {
            let count = 1 + next(40) as usize;
            let params: Vec<ParamInfo> = (0..count)
                .map(|_| match next(4) {
                    0 => param(next(3) as usize),
                    1 => param(1 + next(50) as usize),
                    2 => param(1 + next(5000) as usize),
                    _ => param(1 + next(100_000) as usize),
                })
                .collect();
            let chunk_bytes = 4 + 4 * next(20_000) as usize;
            let shards = 1 + next(7) as usize;
            let layout = Layout::new(&params, chunk_bytes);
            let owners = layout.place(shards);
            assert_eq!(owners.len(), layout.chunks.len());
            let mut seen: Vec<Vec<bool>> = params.iter().map(|p| vec![false; p.numel]).collect();
            let mut bytes = vec![0usize; shards];
            for (c, chunk) in layout.chunks.iter().enumerate() {
                for (e, s) in seen[chunk.param][chunk.offset..chunk.offset + chunk.len]
                    .iter_mut()
                    .enumerate()
                {
                    assert!(
                        !*s,
                        "case {case}: element {} covered twice",
                        chunk.offset + e
                    );
                    *s = true;
                }
                bytes[owners[c] as usize] += chunk.len * 4;
            }
            assert!(
                seen.iter().flatten().all(|&s| s),
                "case {case}: an element is in no chunk"
            );
            let total: usize = bytes.iter().sum();
            let largest = layout.chunks.iter().map(|c| c.len * 4).max().unwrap_or(0);
            let fair = total.div_ceil(shards);
            for (s, b) in bytes.iter().enumerate() {
                assert!(
                    *b <= fair + largest,
                    "case {case}: shard {s} holds {b} bytes, fair share {fair} + chunk {largest}"
                );
            }
            assert_eq!(owners, layout.place(shards), "placement is deterministic");
        }
    }
}
