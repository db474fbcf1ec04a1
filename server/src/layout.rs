//! How a job's parameters are cut into chunks.
//!
//! A chunk is a contiguous run of one parameter of at most `chunk_bytes`.
//! Chunks are numbered in canonical order (parameter order, then offset);
//! that order fixes how per-chunk sums of squares are added, so the global
//! norm does not depend on which shard holds which chunk.

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
        let chunk_elems = (chunk_bytes / 4).max(1);
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
}
