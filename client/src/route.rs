//! Where a job's chunks live, and cutting a push into the segments each
//! shard receives: consecutive chunks of one shard travel as one run, cut
//! into messages of at most `MESSAGE_BYTES`.

use std::collections::HashMap;
use std::sync::Arc;

use paramd_proto::transport::AuthChannel;
use paramd_proto::v1 as pb;
use paramd_proto::v1::Dtype;
use paramd_proto::wire::elem_bytes;

use crate::codec::{Payload, PushMessage, SegmentRef};
use crate::{ClientError, MESSAGE_BYTES, Result};

/// One shard of a job: its address and a connection to it.
#[derive(Debug, Clone)]
pub(crate) struct Shard {
    pub(crate) url: String,
    pub(crate) channel: AuthChannel,
}

/// Where a job's chunks live, and a connection to every shard.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) job: String,
    pub(crate) chunk_elems: usize,
    /// Parameters in the layout's order: name, shape, first chunk id.
    pub(crate) order: Vec<(Arc<str>, Vec<u64>, usize)>,
    /// Index into `order` by name.
    pub(crate) index: HashMap<Arc<str>, usize>,
    pub(crate) owners: Arc<Vec<u32>>,
    pub(crate) shards: Vec<Shard>,
    /// The layout as the coordinator sent it.
    pub(crate) layout: pb::LayoutResponse,
}

impl Route {
    pub(crate) fn numel(&self, i: usize) -> usize {
        self.order[i].1.iter().product::<u64>() as usize
    }

    /// Refuses tensors that do not cover the job's parameters exactly
    /// (unknown names, wrong sizes, missing ones), before anything is sent.
    /// On a cluster each shard only sees its own chunks, so this is where a
    /// malformed push is refused whole, before any shard counts part of it.
    /// `no_grad` names the parameters sent without a gradient instead.
    pub fn check(&self, what: &str, tensors: &[(&str, usize)], no_grad: &[&str]) -> Result<()> {
        for &(name, len) in tensors {
            self.check_tensor(what, name, len)?;
        }
        for &name in no_grad {
            self.check_no_grad(what, name, tensors.iter().map(|(n, _)| *n))?;
        }
        self.check_complete(
            what,
            tensors
                .iter()
                .map(|(n, _)| *n)
                .chain(no_grad.iter().copied()),
        )
    }

    /// Refuses a parameter said to have no gradient that the job does not
    /// have, or that `given` sends.
    pub fn check_no_grad<'a>(
        &self,
        what: &str,
        name: &str,
        mut given: impl Iterator<Item = &'a str>,
    ) -> Result<()> {
        if !self.index.contains_key(name) {
            return Err(ClientError::Invalid(format!(
                "{what}: no_grad names unknown parameter '{name}' of job '{}'",
                self.job
            )));
        }
        if given.any(|n| n == name) {
            return Err(ClientError::Invalid(format!(
                "{what}: '{name}' is given and also said to have no gradient"
            )));
        }
        Ok(())
    }

    /// Refuses one tensor of a push: an unknown name, or a wrong size.
    pub fn check_tensor(&self, what: &str, name: &str, len: usize) -> Result<()> {
        let job = &self.job;
        let Some(&i) = self.index.get(name) else {
            let mut known: Vec<String> = self
                .order
                .iter()
                .take(8)
                .map(|(n, ..)| format!("'{n}'"))
                .collect();
            if self.order.len() > 8 {
                known.push("...".into());
            }
            return Err(ClientError::Invalid(format!(
                "{what}: unknown parameter '{name}' (job '{job}' has {})",
                known.join(", ")
            )));
        };
        if len != self.numel(i) {
            return Err(ClientError::Invalid(format!(
                "{what}: '{name}' has {len} values; its shape {:?} holds {}",
                self.order[i].1,
                self.numel(i)
            )));
        }
        Ok(())
    }

    /// Refuses a push that leaves out a parameter of the job.
    pub fn check_complete<'a>(
        &self,
        what: &str,
        names: impl Iterator<Item = &'a str>,
    ) -> Result<()> {
        let given: std::collections::HashSet<&str> = names.collect();
        let missing: Vec<String> = self
            .order
            .iter()
            .filter(|(n, ..)| !given.contains(n.as_ref()))
            .map(|(n, ..)| format!("'{n}'"))
            .collect();
        if !missing.is_empty() {
            return Err(ClientError::Invalid(format!(
                "{what}: parameter {} missing; a push covers every parameter of job '{}'",
                missing.join(", "),
                self.job
            )));
        }
        Ok(())
    }

    /// Cuts tensors into one list of segments per shard: consecutive chunks
    /// held by one shard travel as one run, cut at `MESSAGE_BYTES`. A
    /// tensor the layout does not describe (unknown, or of the wrong size)
    /// goes whole to every shard: each refuses the whole push, naming what
    /// is wrong, so no shard counts part of it.
    pub(crate) fn split(
        &self,
        tensors: &[(Arc<str>, Payload)],
        dtype: Dtype,
    ) -> Vec<Vec<SegmentRef>> {
        let e = elem_bytes(dtype);
        let mut out = vec![Vec::new(); self.shards.len()];
        for (name, payload) in tensors {
            let known = self
                .index
                .get(name)
                .filter(|&&i| self.numel(i) * e == payload.len());
            let Some(&i) = known else {
                let whole = runs(name, payload, 0, payload.len() / e, dtype);
                for shard in &mut out {
                    shard.extend(whole.iter().cloned());
                }
                continue;
            };
            let (first, numel, ce) = (self.order[i].2, self.numel(i), self.chunk_elems);
            let chunks = numel.div_ceil(ce);
            let mut k = 0;
            while k < chunks {
                let owner = self.owners[first + k];
                let mut j = k + 1;
                while j < chunks && self.owners[first + j] == owner {
                    j += 1;
                }
                out[owner as usize].extend(runs(name, payload, k * ce, (j * ce).min(numel), dtype));
                k = j;
            }
        }
        out
    }
}

/// Elements `start..end` of a tensor as segments of at most
/// `MESSAGE_BYTES`; an empty tensor is one empty segment, so it is still
/// sent.
pub(crate) fn runs(
    name: &Arc<str>,
    payload: &Payload,
    start: usize,
    end: usize,
    dtype: Dtype,
) -> Vec<SegmentRef> {
    let e = elem_bytes(dtype);
    let step = MESSAGE_BYTES / e;
    let segment = |from: usize, to: usize| SegmentRef {
        param: Arc::clone(name),
        offset: from as u64,
        payload: payload.clone(),
        start: from * e,
        len: (to - from) * e,
        dtype,
    };
    if end <= start {
        return vec![segment(start, start)];
    }
    (start..end)
        .step_by(step)
        .map(|from| segment(from, (from + step).min(end)))
        .collect()
}

/// Groups segments, in order, into messages of at most `MESSAGE_BYTES`
/// of payload (a larger segment gets a message of its own).
pub(crate) fn pack_refs(segments: Vec<SegmentRef>) -> Vec<PushMessage> {
    let mut out = Vec::new();
    let (mut current, mut size) = (Vec::new(), 0);
    for seg in segments {
        if size + seg.len > MESSAGE_BYTES && !current.is_empty() {
            out.push(PushMessage::Grads(std::mem::take(&mut current)));
            size = 0;
        }
        size += seg.len;
        current.push(seg);
    }
    if !current.is_empty() {
        out.push(PushMessage::Grads(current));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use paramd_proto::wire::to_le_bytes;

    #[test]
    fn runs_cover_a_tensor_in_message_sized_pieces() {
        let n = MESSAGE_BYTES / 4 * 2 + 3;
        let payload = Payload::Owned(to_le_bytes(&vec![0.5; n]));
        let name: Arc<str> = Arc::from("w");
        let segs = runs(&name, &payload, 0, n, Dtype::F32);
        assert_eq!(segs.len(), 3);
        assert_eq!(segs.iter().map(|s| s.len).sum::<usize>(), n * 4);
        assert!(segs.windows(2).all(|w| w[0].start + w[0].len == w[1].start));
        let messages = pack_refs(segs);
        assert_eq!(messages.len(), 3);
        let empty = runs(&name, &Payload::Owned(Bytes::new()), 0, 0, Dtype::F32);
        let halves = runs(
            &name,
            &Payload::Owned(Bytes::from(vec![0u8; 2 * n])),
            0,
            n,
            Dtype::Bf16,
        );
        assert_eq!(halves.iter().map(|s| s.len).sum::<usize>(), n * 2);
        assert_eq!(halves.len(), 2, "bf16 elements fill messages twice as full");
        assert_eq!(empty.len(), 1, "an empty tensor still travels");
    }
}
