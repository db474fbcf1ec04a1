//! The client's own gRPC codecs for the two calls that carry tensors.
//!
//! A push's payload is written into the HTTP/2 send buffer straight from
//! the gradients' memory, and a pull's payload straight from the receive
//! buffer into the parameters' memory: one copy each way, instead of the
//! generated codec's tensor -> `Bytes` -> message -> buffer. Every other
//! field is encoded and decoded by prost. The wire format is the
//! `paramd.v1` protocol's, byte for byte.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes};
use paramd_proto::v1 as pb;
use paramd_proto::wire;
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::memory::{Dest, Lent, Source};

/// Where a push's values come from.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Wire bytes the client owns.
    Owned(Bytes),
    /// A caller's tensor memory, lent for the call.
    Lent(Lent<Source>),
}

impl Payload {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Owned(b) => b.len(),
            Payload::Lent(l) => l.memory.len(),
        }
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on bytes `start..start + len`; None when the memory is no
    /// longer lent (the call ended) or the range is past the end.
    fn read<R>(&self, start: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        match self {
            Payload::Owned(b) => b.get(start..start.checked_add(len)?).map(f),
            Payload::Lent(l) => l.read(start, len, f),
        }
    }
}

/// One segment of a push: `len` bytes of `payload` from `start`, which
/// are the values of `param` from element `offset`.
#[derive(Debug, Clone)]
pub struct SegmentRef {
    pub param: Arc<str>,
    pub offset: u64,
    pub payload: Payload,
    pub start: usize,
    pub len: usize,
    /// The dtype of the payload's elements.
    pub dtype: pb::Dtype,
}

/// A message of a push: the header-only first one, then the payload.
#[derive(Debug, Clone)]
pub enum PushMessage {
    Header(pb::PushRequest),
    Grads(Vec<SegmentRef>),
}

/// Field numbers of `paramd.v1.PushRequest`, `Segment` and `PullResponse`.
const PUSH_GRADS: u32 = 4;
const SEGMENT_PARAM: u32 = 1;
const SEGMENT_OFFSET: u32 = 2;
const SEGMENT_DATA: u32 = 3;
const SEGMENT_DTYPE: u32 = 4;
const PULL_ROUND: u32 = 1;
const PULL_LAST: u32 = 2;
const PULL_PARAMS: u32 = 3;

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LENGTH_DELIMITED: u32 = 2;
const FIXED32: u32 = 5;

fn put_varint(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn varint_len(v: u64) -> usize {
    // 7 bits a byte; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_key(buf: &mut impl BufMut, field: u32, wire: u32) {
    put_varint(buf, u64::from(field << 3 | wire));
}

impl SegmentRef {
    /// The length of the encoded `Segment`, without its own key and length.
    fn encoded_len(&self) -> usize {
        let mut n = 1 + varint_len(self.param.len() as u64) + self.param.len();
        if self.offset != 0 {
            n += 1 + varint_len(self.offset);
        }
        if self.len != 0 {
            n += 1 + varint_len(self.len as u64) + self.len;
        }
        if self.dtype != pb::Dtype::F32 {
            n += 1 + varint_len(self.dtype as u64);
        }
        n
    }

    /// Writes the segment as field `grads` of a `PushRequest`, its values
    /// copied from the payload's memory.
    fn encode(&self, dst: &mut impl BufMut) -> Result<(), Status> {
        put_key(dst, PUSH_GRADS, LENGTH_DELIMITED);
        put_varint(dst, self.encoded_len() as u64);
        put_key(dst, SEGMENT_PARAM, LENGTH_DELIMITED);
        put_varint(dst, self.param.len() as u64);
        dst.put_slice(self.param.as_bytes());
        if self.offset != 0 {
            put_key(dst, SEGMENT_OFFSET, VARINT);
            put_varint(dst, self.offset);
        }
        if self.len != 0 {
            put_key(dst, SEGMENT_DATA, LENGTH_DELIMITED);
            put_varint(dst, self.len as u64);
            self.payload
                .read(self.start, self.len, |bytes| dst.put_slice(bytes))
                .ok_or_else(|| Status::cancelled("the push ended before its payload was sent"))?;
        }
        if self.dtype != pb::Dtype::F32 {
            put_key(dst, SEGMENT_DTYPE, VARINT);
            put_varint(dst, self.dtype as u64);
        }
        Ok(())
    }
}

/// Encodes pushes (see [`PushMessage`]) and decodes their answer.
#[derive(Debug, Clone, Default)]
pub struct PushCodec;

#[derive(Debug)]
pub struct PushEncoder;

impl Encoder for PushEncoder {
    type Item = PushMessage;
    type Error = Status;

    fn encode(&mut self, item: PushMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            PushMessage::Header(h) => h
                .encode(dst)
                .map_err(|e| Status::internal(format!("cannot encode a push header: {e}"))),
            PushMessage::Grads(segments) => {
                dst.reserve(segments.iter().map(|s| s.encoded_len() + 16).sum());
                segments.iter().try_for_each(|s| s.encode(dst))
            }
        }
    }
}

impl Codec for PushCodec {
    type Encode = PushMessage;
    type Decode = pb::PushResponse;
    type Encoder = PushEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::PushResponse>;

    fn encoder(&mut self) -> PushEncoder {
        PushEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Where a pulled parameter's values go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A caller's tensor memory, lent for the call.
    Lent(Lent<Dest>),
    /// Values the client owns (the Rust API's `Pulled`).
    Owned(Arc<Mutex<Vec<f32>>>),
}

impl Target {
    /// Copies `bytes` (little-endian f32) to element `offset`; false when
    /// the memory is no longer lent or the range is past the end.
    fn write(&self, offset: usize, bytes: &[u8]) -> bool {
        match self {
            Target::Lent(l) => offset
                .checked_mul(4)
                .is_some_and(|start| l.write(start, bytes)),
            Target::Owned(v) => {
                let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
                let n = bytes.len() / 4;
                match offset.checked_add(n).and_then(|end| v.get_mut(offset..end)) {
                    Some(dst) => {
                        for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                        true
                    }
                    None => false,
                }
            }
        }
    }
}

/// The parameters a pull writes, and which chunks each shard may write.
#[derive(Debug)]
pub struct PullTargets {
    /// By name: index, first chunk, element count, where the values go.
    pub params: HashMap<Arc<str>, (usize, usize, usize, Target)>,
    pub chunk_elems: usize,
    pub owners: Arc<Vec<u32>>,
}

/// What one pulled message said, its values already written.
#[derive(Debug, Default)]
pub struct PullMessage {
    pub round: u64,
    pub last: Option<pb::RoundOutcome>,
    /// Elements written, by parameter index.
    pub written: Vec<(usize, usize)>,
}

/// Decodes the pull of one shard, writing its values into the targets.
#[derive(Debug, Clone)]
pub struct PullCodec {
    pub targets: Arc<PullTargets>,
    pub shard: u32,
}

impl Codec for PullCodec {
    type Encode = pb::PullRequest;
    type Decode = PullMessage;
    type Encoder = tonic_prost::ProstEncoder<pb::PullRequest>;
    type Decoder = PullCodec;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> PullCodec {
        self.clone()
    }
}

/// A protobuf reader over one message.
struct Reader<'a>(&'a [u8]);

fn malformed(what: &str) -> Status {
    Status::internal(format!("malformed pull answer: {what}"))
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, Status> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self
                .0
                .split_first()
                .ok_or_else(|| malformed("cut varint"))?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    fn key(&mut self) -> Result<(u32, u32), Status> {
        let k = self.varint()?;
        let field = u32::try_from(k >> 3).map_err(|_| malformed("field number"))?;
        Ok((field, (k & 7) as u32))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Status> {
        if n > self.0.len() {
            return Err(malformed("field longer than the message"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn delimited(&mut self) -> Result<&'a [u8], Status> {
        let n = usize::try_from(self.varint()?).map_err(|_| malformed("length"))?;
        self.take(n)
    }

    fn skip(&mut self, wire: u32) -> Result<(), Status> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LENGTH_DELIMITED => self.delimited().map(drop),
            FIXED32 => self.take(4).map(drop),
            _ => Err(malformed("unknown wire type")),
        }
    }
}

impl PullCodec {
    /// Writes one `Segment` into its target, after checking that it names a
    /// parameter asked for, fits it, and lies in chunks this shard holds.
    fn place(&self, segment: &[u8], out: &mut PullMessage) -> Result<(), Status> {
        let mut r = Reader(segment);
        let (mut param, mut offset, mut data): (&[u8], u64, &[u8]) = (b"", 0, b"");
        let mut dtype = 0;
        while !r.0.is_empty() {
            match r.key()? {
                (SEGMENT_PARAM, LENGTH_DELIMITED) => param = r.delimited()?,
                (SEGMENT_OFFSET, VARINT) => offset = r.varint()?,
                (SEGMENT_DATA, LENGTH_DELIMITED) => data = r.delimited()?,
                (SEGMENT_DTYPE, VARINT) => dtype = r.varint()?,
                (_, wire) => r.skip(wire)?,
            }
        }
        let dtype = i32::try_from(dtype)
            .map_err(|_| malformed("dtype"))
            .and_then(|d| wire::dtype(d).map_err(|e| malformed(&e)))?;
        let name = String::from_utf8_lossy(param);
        let t = &self.targets;
        let Some((index, first, numel, target)) = t.params.get(name.as_ref()) else {
            return Err(Status::internal(format!(
                "shard {} sent values of '{name}', which the pull did not ask for",
                self.shard
            )));
        };
        let e = wire::elem_bytes(dtype);
        if data.len() % e != 0 {
            return Err(Status::internal(format!(
                "shard {} sent {} bytes for '{name}', not a multiple of {e}",
                self.shard,
                data.len()
            )));
        }
        let n = data.len() / e;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(n);
        if end > *numel {
            return Err(Status::internal(format!(
                "shard {} sent elements {start}..{end} of '{name}', which has {numel}",
                self.shard
            )));
        }
        if n > 0 {
            let chunks = first + start / t.chunk_elems..=first + (end - 1) / t.chunk_elems;
            if let Some(c) = chunks.clone().find(|&c| t.owners[c] != self.shard) {
                return Err(Status::internal(format!(
                    "shard {} sent values of chunk {c} of '{name}', which shard {} holds",
                    self.shard, t.owners[c]
                )));
            }
            let written = if dtype == pb::Dtype::F32 {
                target.write(start, data)
            } else {
                // Decoded to f32 on the way: the destination is f32.
                let mut values = vec![0.0f32; n];
                wire::decode_into(&mut values, data, dtype);
                target.write(start, &wire::to_le_bytes(&values))
            };
            if !written {
                return Err(Status::cancelled(
                    "the pull ended before its values arrived",
                ));
            }
        }
        out.written.push((*index, n));
        Ok(())
    }
}

impl Decoder for PullCodec {
    type Item = PullMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<PullMessage>, Status> {
        let len = src.remaining();
        // tonic hands over one whole message in one contiguous buffer.
        if src.chunk().len() < len {
            return Err(Status::internal("a pulled message arrived in pieces"));
        }
        let mut r = Reader(&src.chunk()[..len]);
        let mut out = PullMessage::default();
        while !r.0.is_empty() {
            match r.key()? {
                (PULL_ROUND, VARINT) => out.round = r.varint()?,
                (PULL_LAST, LENGTH_DELIMITED) => {
                    out.last = Some(
                        pb::RoundOutcome::decode(r.delimited()?)
                            .map_err(|e| malformed(&e.to_string()))?,
                    )
                }
                (PULL_PARAMS, LENGTH_DELIMITED) => {
                    let seg = r.delimited()?;
                    self.place(seg, &mut out)?;
                }
                (_, wire) => r.skip(wire)?,
            }
        }
        src.advance(len);
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            assert_eq!(Reader(&buf).varint().expect("varint"), v);
        }
    }

    #[test]
    fn a_segment_encodes_as_prost_encodes_it() {
        let values: Vec<u8> = (0..40).collect();
        let seg = SegmentRef {
            dtype: pb::Dtype::F32,
            param: Arc::from("layer.weight"),
            offset: 300,
            payload: Payload::Owned(Bytes::from(values.clone())),
            start: 8,
            len: 24,
        };
        let expected = pb::PushRequest {
            grads: vec![pb::Segment {
                dtype: 0,
                param: "layer.weight".into(),
                offset: 300,
                data: Bytes::from(values[8..32].to_vec()),
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let mut ours = Vec::new();
        seg.encode(&mut ours).expect("owned payload");
        assert_eq!(ours, expected);
    }
}
