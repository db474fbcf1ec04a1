//! Validating a set of segments (a push, or a job's initial values) against
//! the chunks a shard holds.
//!
//! A set is accepted whole or refused whole: every owned chunk must be
//! covered exactly once, and nothing outside them may be sent. Both are
//! written into place as their messages arrive, so a received message is
//! dropped at once: a push into buffers reused across rounds (`Staging`,
//! `Spare`), a job's initial values into its chunks (`Filling`).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use paramd_proto::v1::Segment;
pub use paramd_proto::wire::{pack, to_le_bytes};
use parking_lot::Mutex;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::invalid;
use crate::layout::Layout;
use crate::optim::le_f32;
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

impl<'a> Target<'a> {
    /// Starts receiving one push into `buffers`, message by message. With
    /// `summed`, the buffers receive the push added to the accumulators
    /// given to `feed` and `finish` (the next push of a rank-order mean,
    /// summed as it streams), not the push itself.
    pub fn stage(self, buffers: Buffers, summed: bool) -> Staging<'a> {
        let n = self.params.len();
        Staging {
            target: self,
            buffers,
            summed,
            absent: vec![false; n],
            sent: vec![false; n],
            got: vec![0; n],
            spans: Vec::new(),
            bytes: 0,
        }
    }
}

/// Push buffers kept for the next rounds: one set (a buffer per chunk of
/// this shard) for each push that was being received or waiting to be
/// summed at the same time, up to one per worker. A round's pushes then
/// land in memory that is paged in already instead of paying for fresh
/// pages (about 0.4 s per GB on a small VM) every round.
#[derive(Debug)]
pub struct Spare {
    sets: Mutex<Vec<Vec<Vec<f32>>>>,
    lens: Vec<usize>,
    keep: usize,
    /// Told when a set comes back, or by `notify`.
    changed: tokio::sync::Notify,
    /// Sets allocated so far.
    allocated: std::sync::atomic::AtomicUsize,
}

impl Spare {
    /// Sets of buffers of `lens` elements each, at most `keep` kept.
    pub fn new(lens: Vec<usize>, keep: usize) -> Arc<Spare> {
        Arc::new(Spare {
            sets: Mutex::new(Vec::new()),
            lens,
            keep,
            changed: tokio::sync::Notify::new(),
            allocated: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Resolves at the next `notify` or return of a set after it is
    /// enabled (`Notified::enable`), so a check made in between misses
    /// nothing.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Wakes the pushes waiting for their turn to take a set.
    pub fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// A set of buffers: a kept one, or a new one (zeroed pages, touched
    /// only when written).
    pub fn take(self: &Arc<Self>) -> Buffers {
        let kept = self.sets.lock().pop();
        let chunks = kept.unwrap_or_else(|| {
            self.allocated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.lens.iter().map(|&n| vec![0.0; n]).collect()
        });
        Buffers {
            chunks,
            home: Arc::clone(self),
        }
    }

    /// Sets kept now.
    pub fn kept(&self) -> usize {
        self.sets.lock().len()
    }

    /// Sets allocated so far: the most pushes received or waiting to be
    /// summed at once.
    pub fn allocated(&self) -> usize {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A set of push buffers, one per chunk of this shard; it goes back to its
/// `Spare` when dropped, whatever happened to the push.
#[derive(Debug)]
pub struct Buffers {
    chunks: Vec<Vec<f32>>,
    home: Arc<Spare>,
}

impl Drop for Buffers {
    fn drop(&mut self) {
        let chunks = std::mem::take(&mut self.chunks);
        {
            let mut sets = self.home.sets.lock();
            if sets.len() < self.home.keep {
                sets.push(chunks);
            }
        }
        self.home.notify();
    }
}

/// One push being received: each message's segments are checked and
/// written as f32 into the push's buffers as they arrive, so the received
/// messages are dropped at once instead of being held until the round
/// completes. Nothing is accepted unless `finish` accepts the whole push.
pub struct Staging<'a> {
    target: Target<'a>,
    buffers: Buffers,
    /// Parameters listed in `no_grad`.
    absent: Vec<bool>,
    /// Parameters with at least one segment (even an empty one).
    sent: Vec<bool>,
    /// Bytes received per parameter.
    got: Vec<usize>,
    /// `(parameter, first element, elements)` of every segment, to refuse
    /// overlaps at the end.
    spans: Vec<(usize, usize, usize)>,
    bytes: usize,
    /// The buffers hold the accumulators plus the push (see `stage`).
    summed: bool,
}

impl Staging<'_> {
    /// Whether `feed` and `finish` need the accumulators (see `stage`).
    pub fn summed(&self) -> bool {
        self.summed
    }

    /// Checks and writes one message's segments. The parameters named in
    /// `no_grad` have no gradient in this push: they must not be sent.
    /// `sum`: the accumulators, if `summed`.
    pub fn feed(
        &mut self,
        segments: Vec<Segment>,
        no_grad: &[String],
        sum: Option<&[Accumulator]>,
    ) -> Result<()> {
        self.check_sum(sum)?;
        let t = &self.target;
        for name in no_grad {
            let &p = t
                .index
                .get(name)
                .ok_or_else(|| invalid!("no_grad names unknown parameter '{name}'"))?;
            if self.sent[p] {
                return Err(sent_and_absent(name));
            }
            self.absent[p] = true;
        }
        for s in segments {
            let (p, offset, n) = check_segment(t.params, t.index, &s).map_err(Error::Invalid)?;
            if self.absent[p] {
                return Err(sent_and_absent(&s.param));
            }
            self.sent[p] = true;
            if n == 0 {
                continue;
            }
            // Only a job refusing non-finite gradients pays for this scan.
            let bad = t
                .finite_only
                .then(|| (0..n).find(|&i| !le_f32(&s.data, i).is_finite()))
                .flatten();
            if let Some(i) = bad {
                return Err(invalid!(
                    "parameter '{}': element {} is {}, and the job refuses non-finite gradients",
                    s.param,
                    offset + i,
                    le_f32(&s.data, i)
                ));
            }
            for (id, start, run) in runs(t.layout, p, offset, n) {
                let chunk = &t.layout.chunks[id];
                let local =
                    t.own.local[id].ok_or_else(|| Error::Invalid(not_held(&t.params[p], chunk)))?;
                let dst = &mut self.buffers.chunks[local][start..][..run.len()];
                let bytes = &s.data[4 * run.start..4 * run.end];
                match sum {
                    Some(accs) => add_into(dst, &accs[local].sum[start..][..run.len()], bytes),
                    None => decode_into(dst, bytes),
                }
            }
            self.got[p] += s.data.len();
            self.spans.push((p, offset, n));
            self.bytes += s.data.len();
        }
        Ok(())
    }

    fn check_sum(&self, sum: Option<&[Accumulator]>) -> Result<()> {
        if sum.is_some() != self.summed
            || sum.is_some_and(|accs| accs.len() != self.buffers.chunks.len())
        {
            return Err(Error::Internal(
                "a push summed as it streams needs the accumulators, and only it".into(),
            ));
        }
        Ok(())
    }

    /// Accepts the push if no element was sent twice and every parameter
    /// not listed in `no_grad` is covered whole on this shard. `sum`: the
    /// accumulators, if `summed`.
    pub fn finish(mut self, sum: Option<&[Accumulator]>) -> Result<Staged> {
        self.check_sum(sum)?;
        let t = &self.target;
        self.spans.sort_unstable();
        let mut end = vec![0usize; t.params.len()];
        for &(p, offset, n) in &self.spans {
            if offset < end[p] {
                return Err(invalid!(
                    "parameter '{}' is sent twice: elements {}..{} overlap",
                    t.params[p].name,
                    offset,
                    end[p].min(offset + n)
                ));
            }
            end[p] = offset + n;
        }
        // No element twice and every one in a chunk held here: the sizes
        // agree only if every element is there.
        let mut expected = vec![0usize; t.params.len()];
        for &id in &t.own.chunks {
            let chunk = &t.layout.chunks[id];
            expected[chunk.param] += chunk.len * 4;
        }
        for (p, info) in t.params.iter().enumerate() {
            if self.absent[p] || self.got[p] == expected[p] {
                continue;
            }
            let (expected, got) = (expected[p], self.got[p]);
            return Err(if got == 0 {
                invalid!(
                    "parameter '{}' is missing: expected {expected} bytes",
                    info.name
                )
            } else {
                invalid!(
                    "parameter '{}' {:?}: expected {expected} bytes, got {got}",
                    info.name,
                    info.shape
                )
            });
        }
        let has: Vec<bool> = t
            .own
            .chunks
            .iter()
            .map(|&id| !self.absent[t.layout.chunks[id].param])
            .collect();
        if let Some(accs) = sum {
            // A chunk without a gradient adds zeros: -0.0 becomes +0.0, as
            // in `fold_into`.
            for (local, _) in has.iter().enumerate().filter(|(_, h)| !**h) {
                let dst = &mut self.buffers.chunks[local];
                dst.iter_mut()
                    .zip(&accs[local].sum)
                    .for_each(|(d, a)| *d = a + 0.0);
            }
        }
        Ok(Staged {
            buffers: self.buffers,
            has,
            bytes: self.bytes,
            summed: self.summed,
        })
    }
}

fn sent_and_absent(name: &str) -> crate::error::Error {
    invalid!("parameter '{name}' is sent and also listed in no_grad")
}

/// A push accepted whole: its gradient for each chunk of this shard, as
/// f32, in buffers from the job's `Spare`.
#[derive(Debug)]
pub struct Staged {
    buffers: Buffers,
    /// Whether the push has a gradient for each chunk (not when its
    /// parameter is listed in `no_grad`).
    has: Vec<bool>,
    pub bytes: usize,
    /// The buffers hold the accumulators plus the push, summed as it
    /// streamed (see `Target::stage`).
    summed: bool,
}

impl Staged {
    /// The push's gradient for local chunk `local`; none if it has none.
    pub fn chunk(&self, local: usize) -> Option<&[f32]> {
        self.has[local].then(|| &self.buffers.chunks[local][..])
    }

    /// Whether the push was summed as it streamed: `chunk` then holds the
    /// accumulators plus the push, and only `fold_all` may take it.
    pub fn summed(&self) -> bool {
        self.summed
    }

    /// Folds the whole push into `accs`, one accumulator per chunk, as the
    /// next push of a rank-order mean (`fold_into`). The first push of a
    /// mean, and a push summed as it streamed onto these very accumulators,
    /// trade buffers with the accumulators instead of copying or adding.
    pub fn fold_all(&mut self, accs: &mut [Accumulator], first: bool) {
        if self.summed {
            accs.par_iter_mut()
                .zip(self.buffers.chunks.par_iter_mut())
                .zip(self.has.par_iter())
                .for_each(|((acc, buf), &has)| {
                    std::mem::swap(&mut acc.sum, buf);
                    acc.gradients += u32::from(has);
                });
            return;
        }
        accs.par_iter_mut()
            .zip(self.buffers.chunks.par_iter_mut())
            .zip(self.has.par_iter())
            .for_each(|((acc, buf), &has)| {
                if first && has {
                    std::mem::swap(&mut acc.sum, buf);
                    acc.gradients = 1;
                } else {
                    fold_into(has.then_some(&buf[..]), acc, first);
                }
            });
    }
}

/// Checks one segment against the job's parameters: a known parameter,
/// whole f32 values, inside the parameter. Returns the parameter, the first
/// element and the number of elements.
fn check_segment(
    params: &[ParamInfo],
    index: &HashMap<String, usize>,
    s: &Segment,
) -> std::result::Result<(usize, usize, usize), String> {
    let &p = index
        .get(&s.param)
        .ok_or_else(|| format!("unknown parameter '{}'", s.param))?;
    let info = &params[p];
    if !s.data.len().is_multiple_of(4) {
        return Err(format!(
            "parameter '{}': {} bytes at element {} is not a multiple of 4 (f32)",
            info.name,
            s.data.len(),
            s.offset
        ));
    }
    let n = s.data.len() / 4;
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
    Ok((p, offset, n))
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

/// Writes little-endian f32 `bytes` into `dst`.
fn decode_into(dst: &mut [f32], bytes: &[u8]) {
    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Writes `sum` plus the little-endian f32 `bytes` into `dst`: the same
/// addition, in the same order, as `fold_into` makes later.
fn add_into(dst: &mut [f32], sum: &[f32], bytes: &[u8]) {
    for ((d, a), b) in dst.iter_mut().zip(sum).zip(bytes.chunks_exact(4)) {
        *d = a + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
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
        let (p, offset, n) = check_segment(&self.params, &self.index, &s)?;
        let info = &self.params[p];
        self.got[p] += s.data.len() as u64;
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
            let bytes = &s.data[4 * run.start..4 * run.end];
            match self.place[id] {
                Place::Here(local) => {
                    decode_into(&mut self.chunks[local][start..][..run.len()], bytes);
                }
                // Copied: a slice would keep the whole received message.
                Place::Forward(shard) => self.forward[shard].push(Segment {
                    param: info.name.clone(),
                    offset: (offset + run.start) as u64,
                    data: Bytes::copy_from_slice(bytes),
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
