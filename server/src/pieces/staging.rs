//! A push received into reused buffers: each message checked and written
//! as it arrives (`Staging`), the sets of buffers kept across rounds
//! (`Spare`), the accepted push (`Staged`) folded into the accumulators.

use std::sync::Arc;

use paramd_proto::v1::Segment;
use parking_lot::Mutex;
use rayon::prelude::*;

use super::{Accumulator, Target, add_into, check_segment, fold_into, not_held, runs, write_into};
use crate::error::{Error, Result};
use crate::invalid;
use paramd_proto::wire::element;

impl<'a> Target<'a> {
    /// Starts receiving one push into `buffers`, message by message. With
    /// `summed`, the buffers receive the push added to the accumulators
    /// given to `feed` and `finish` (the next push of a rank-order mean,
    /// summed as it streams), not the push itself.
    /// `scale`: a weighted push's weight, each value multiplied by it as
    /// it is written.
    pub fn stage(self, buffers: Buffers, summed: bool, scale: Option<f32>) -> Staging<'a> {
        let n = self.params.len();
        Staging {
            target: self,
            buffers,
            summed,
            scale,
            absent: vec![false; n],
            sent: vec![false; n],
            got: vec![0; n],
            spans: Vec::new(),
            bytes: [0; 3],
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
    /// Bytes received, by wire dtype (`Dtype as usize`).
    bytes: [usize; 3],
    /// The buffers hold the accumulators plus the push (see `stage`).
    summed: bool,
    /// Each value is multiplied by this as it is written (see `stage`).
    scale: Option<f32>,
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
            let c = check_segment(t.params, t.index, &s).map_err(Error::Invalid)?;
            let (p, offset, n) = (c.p, c.offset, c.n);
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
                .then(|| (0..n).find(|&i| !element(&s.data, i, c.dtype).is_finite()))
                .flatten();
            if let Some(i) = bad {
                return Err(invalid!(
                    "parameter '{}': element {} is {}, and the job refuses non-finite gradients",
                    s.param,
                    offset + i,
                    element(&s.data, i, c.dtype)
                ));
            }
            for (id, start, run) in runs(t.layout, p, offset, n) {
                let chunk = &t.layout.chunks[id];
                let local =
                    t.own.local[id].ok_or_else(|| Error::Invalid(not_held(&t.params[p], chunk)))?;
                let dst = &mut self.buffers.chunks[local][start..][..run.len()];
                let bytes = c.bytes(&s.data, &run);
                match sum {
                    Some(accs) => {
                        let sum = &accs[local].sum[start..][..run.len()];
                        add_into(dst, sum, bytes, c.dtype, self.scale);
                    }
                    None => write_into(dst, bytes, c.dtype, self.scale),
                }
            }
            self.got[p] += n;
            self.spans.push((p, offset, n));
            self.bytes[c.dtype as usize] += s.data.len();
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
            expected[chunk.param] += chunk.len;
        }
        for (p, info) in t.params.iter().enumerate() {
            if self.absent[p] || self.got[p] == expected[p] {
                continue;
            }
            let (expected, got) = (expected[p], self.got[p]);
            return Err(if got == 0 {
                invalid!(
                    "parameter '{}' is missing: expected {expected} elements",
                    info.name
                )
            } else {
                invalid!(
                    "parameter '{}' {:?}: expected {expected} elements, got {got}",
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
    /// Bytes received, by wire dtype (`Dtype as usize`).
    pub bytes: [usize; 3],
    /// The buffers hold the accumulators plus the push, summed as it
    /// streamed (see `Target::stage`).
    summed: bool,
}

impl Staged {
    /// The push's gradient for local chunk `local`; none if it has none.
    pub fn chunk(&self, local: usize) -> Option<&[f32]> {
        debug_assert!(
            !self.summed,
            "a push summed as it streamed is only traded in"
        );
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
            // Summed onto the sums of lower ranks: never the first push.
            debug_assert!(
                !first,
                "a push summed as it streamed is never a mean's first"
            );
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
