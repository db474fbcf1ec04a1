//! Generated types and service stubs of the `paramd.v1` protocol.

/// The `paramd.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("paramd.v1");

    /// The encoded `FileDescriptorSet` of `paramd.v1`, served by gRPC
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/paramd_descriptor.bin"));
}

pub mod json;
pub mod transport;

/// Helpers of the wire format shared by the server and the client.
pub mod wire {
    use bytes::Bytes;
    use half::{bf16, f16};

    use crate::v1::{Dtype, Segment};

    /// The dtypes by their number, with the names users give them.
    pub const DTYPES: [(Dtype, &str); 3] = [
        (Dtype::F32, "f32"),
        (Dtype::Bf16, "bf16"),
        (Dtype::F16, "f16"),
    ];

    /// The name users give `dtype` ("f32", "bf16", "f16").
    pub fn name(dtype: Dtype) -> &'static str {
        DTYPES[dtype as usize].1
    }

    /// Bytes of one element of `dtype`.
    pub fn elem_bytes(dtype: Dtype) -> usize {
        match dtype {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// The dtype a message's `dtype` field names, or a refusal naming the
    /// number.
    pub fn dtype(value: i32) -> Result<Dtype, String> {
        Dtype::try_from(value)
            .map_err(|_| format!("dtype: {value} is not a dtype (0: f32, 1: bf16, 2: f16)"))
    }

    /// Element `i` of little-endian `bytes` of `dtype`, exactly as f32.
    #[inline]
    pub fn element(bytes: &[u8], i: usize, dtype: Dtype) -> f32 {
        match dtype {
            Dtype::F32 => {
                let b = &bytes[4 * i..4 * i + 4];
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            Dtype::Bf16 => {
                bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            Dtype::F16 => {
                f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
        }
    }

    /// Writes the little-endian elements of `dtype` in `bytes` into `dst` as
    /// f32 (exact: every bf16 and f16 value is an f32 value).
    pub fn decode_into(dst: &mut [f32], bytes: &[u8], dtype: Dtype) {
        match dtype {
            Dtype::F32 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::Bf16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            Dtype::F16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }

    /// Encodes f32 values as little-endian elements of `dtype`, rounded to
    /// nearest, ties to even (as torch's `.to(torch.bfloat16)` and
    /// `.to(torch.float16)`); NaN stays NaN, as torch writes it.
    pub fn encode(values: &[f32], dtype: Dtype) -> Bytes {
        let bytes_of = |halves: &[u16]| {
            let mut out = vec![0u8; 2 * halves.len()];
            for (o, h) in out.chunks_exact_mut(2).zip(halves) {
                o.copy_from_slice(&h.to_le_bytes());
            }
            Bytes::from(out)
        };
        match dtype {
            Dtype::F32 => to_le_bytes(values),
            // Round to nearest even on the bits, as torch does (a loop the
            // compiler vectorizes); torch writes every NaN as 0x7fff.
            Dtype::Bf16 => {
                let halves: Vec<u16> = values
                    .iter()
                    .map(|&v| {
                        let u = v.to_bits();
                        let rounded = (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16;
                        if v.is_nan() { 0x7fff } else { rounded }
                    })
                    .collect();
                bytes_of(&halves)
            }
            // The half crate's slice conversion uses the CPU's conversion
            // instructions where it has them.
            Dtype::F16 => {
                let mut halves = vec![f16::ZERO; values.len()];
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut halves[..], values);
                let bits: Vec<u16> = halves.iter().map(|h| h.to_bits()).collect();
                bytes_of(&bits)
            }
        }
    }

    /// Encodes f32 values as the little-endian bytes tensors travel as:
    /// one `memcpy` on a little-endian host (no zeroing first, no loop).
    pub fn to_le_bytes(values: &[f32]) -> Bytes {
        if cfg!(target_endian = "little") {
            return Bytes::copy_from_slice(bytemuck::cast_slice(values));
        }
        Bytes::from(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    }

    /// Packs segments, in order, into messages of at most `max_bytes` of
    /// payload (a larger segment gets a message of its own).
    pub fn pack(segments: Vec<Segment>, max_bytes: usize) -> Vec<Vec<Segment>> {
        pack_by(segments, max_bytes, |s| s.data.len())
    }

    /// [`pack`] of any kind of segment, `len` giving its payload's bytes.
    pub fn pack_by<S>(
        segments: Vec<S>,
        max_bytes: usize,
        len: impl Fn(&S) -> usize,
    ) -> Vec<Vec<S>> {
        let mut messages: Vec<Vec<S>> = Vec::new();
        let mut current = Vec::new();
        let mut size = 0;
        for seg in segments {
            let n = len(&seg);
            if size + n > max_bytes && !current.is_empty() {
                messages.push(std::mem::take(&mut current));
                size = 0;
            }
            size += n;
            current.push(seg);
        }
        if !current.is_empty() {
            messages.push(current);
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::wire;
    use crate::v1::Dtype;

    #[test]
    fn bf16_and_f16_round_to_nearest_even_and_decode_exactly() {
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0);
        // 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
        let values = [
            1.0f32 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -2.5,
            65520.0,
            1e-8,
        ];
        let mut back = vec![0.0f32; values.len()];
        let b = wire::encode(&values, Dtype::Bf16);
        assert_eq!(b.len(), 2 * values.len());
        wire::decode_into(&mut back, &b, Dtype::Bf16);
        assert_eq!(back[..3], [1.0, 1.0 + 2f32.powi(-6), -2.5]);
        for (i, &v) in back.iter().enumerate() {
            assert_eq!(v, wire::element(&b, i, Dtype::Bf16));
        }
        // The bit trick is the half crate's rounding, value for value.
        let many: Vec<f32> = (0..1u32 << 16)
            .map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9)))
            .collect();
        let enc = wire::encode(&many, Dtype::Bf16);
        for (i, v) in many.iter().enumerate() {
            let got = u16::from_le_bytes([enc[2 * i], enc[2 * i + 1]]);
            let want = if v.is_nan() {
                0x7fff
            } else {
                half::bf16::from_f32(*v).to_bits()
            };
            assert_eq!(got, want, "{v:e}");
        }
        let enc = wire::encode(&many, Dtype::F16);
        for (i, v) in many.iter().enumerate() {
            let got = u16::from_le_bytes([enc[2 * i], enc[2 * i + 1]]);
            let want = half::f16::from_f32(*v);
            assert!(
                got == want.to_bits() || (v.is_nan() && half::f16::from_bits(got).is_nan()),
                "{v:e}"
            );
        }
        let h = wire::encode(&values, Dtype::F16);
        wire::decode_into(&mut back, &h, Dtype::F16);
        // f16: 1 + 2^-8 is exact; 65520 rounds to infinity (past f16's max,
        // 65504, by half an ulp: ties to even go up); 1e-8 underflows to 0.
        assert_eq!(back[0], 1.0 + 2f32.powi(-8));
        assert!(back[3].is_infinite());
        assert_eq!(back[4], 0.0);
        assert!(wire::dtype(3).is_err());
        assert_eq!(wire::elem_bytes(Dtype::F16), 2);
    }

    #[test]
    fn tensors_encode_as_little_endian_f32() {
        let values = [1.5f32, -2.0, f32::MIN_POSITIVE, f32::INFINITY, -0.0];
        let want: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(super::wire::to_le_bytes(&values).as_ref(), want.as_slice());
    }
}
