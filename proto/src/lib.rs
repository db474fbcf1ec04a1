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

    use crate::v1::Segment;

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
    #[test]
    fn tensors_encode_as_little_endian_f32() {
        let values = [1.5f32, -2.0, f32::MIN_POSITIVE, f32::INFINITY, -0.0];
        let want: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(super::wire::to_le_bytes(&values).as_ref(), want.as_slice());
    }
}
