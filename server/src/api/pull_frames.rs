//! Pull responses framed here instead of by tonic: each segment's values
//! go to HTTP/2 as the `Bytes` that reference the parameters' memory
//! (`chunk::Values`), so a pull's payload is not copied in user space
//! (h2 writes large frames straight from them). tonic's encoder would copy
//! every message into its buffer first, and a round's pulls would hold
//! those copies while the clients read them. The request of a pull, its
//! handler (`param_server::Service::pull`) and every other call go through
//! tonic as before; the bytes on the wire are the same as tonic's.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body::Frame;
use paramd_proto::v1 as pb;
use paramd_proto::v1::param_server_server::ParamServer;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tonic::codec::{Codec, Streaming};
use tonic::codegen::{BoxFuture, Service as TowerService, http};
use tonic::server::NamedService;
use tonic::{Request, Status};

use super::param_server::{PullStream, Service};

/// The path of the Pull call.
const PULL: &str = "/paramd.v1.ParamServer/Pull";

/// `params` in `PullResponse`, `data` and `dtype` in `Segment`.
const PARAMS_TAG: u32 = 3;
const DATA_TAG: u32 = 3;
const DTYPE_TAG: u32 = 4;

/// The ParamServer service `inner`, with its Pull call's responses framed
/// by `PullBody`.
#[derive(Clone)]
pub struct PullFrames<S> {
    inner: S,
    service: Arc<Service>,
    max_message: usize,
}

impl<S> PullFrames<S> {
    /// `inner` (the generated ParamServer server), whose Pull calls go to
    /// `service` with requests of at most `max_message` bytes.
    pub fn new(inner: S, service: Service, max_message: usize) -> PullFrames<S> {
        PullFrames {
            inner,
            service: Arc::new(service),
            max_message,
        }
    }
}

impl<S: NamedService> NamedService for PullFrames<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> TowerService<http::Request<B>> for PullFrames<S>
where
    S: TowerService<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != PULL {
            return Box::pin(self.inner.call(request));
        }
        let (service, max_message) = (Arc::clone(&self.service), self.max_message);
        Box::pin(async move {
            Ok(pull(&service, request, max_message)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

/// Decodes the request with tonic's codec, runs the handler and frames its
/// stream.
async fn pull<B>(
    service: &Service,
    request: http::Request<B>,
    max_message: usize,
) -> Result<http::Response<tonic::body::Body>, Status>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    let mut codec = tonic_prost::ProstCodec::<pb::PullResponse, pb::PullRequest>::default();
    let mut messages = Streaming::new_request(codec.decoder(), body, None, Some(max_message));
    let message = messages
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("a Pull call without its request message"))?;
    let request = Request::from_http(http::Request::from_parts(parts, message));
    let (metadata, stream, _) = service.pull(request).await?.into_parts();
    let mut response = http::Response::new(tonic::body::Body::new(PullBody::new(stream)));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// A pull's response body: each message as gRPC frames whose values are
/// the segments' own `Bytes`, then the status as trailers.
struct PullBody {
    stream: PullStream,
    queue: VecDeque<Bytes>,
    done: bool,
}

impl PullBody {
    fn new(stream: PullStream) -> PullBody {
        PullBody {
            stream,
            queue: VecDeque::new(),
            done: false,
        }
    }
}

impl http_body::Body for PullBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let status = match ready!(this.stream.poll_next_unpin(cx)) {
                Some(Ok(message)) => {
                    frame(message, &mut this.queue);
                    continue;
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            this.done = true;
            let mut trailers = http::HeaderMap::new();
            status.add_header(&mut trailers)?;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
    }
}

/// Appends `message` as a length-prefixed gRPC message to `out`: prost
/// encodes every field but the segments' values, which follow their field
/// headers as they are. Fields are written in tag order, as prost writes
/// them, so the bytes are the same as `message.encode_to_vec()`'s.
fn frame(message: pb::PullResponse, out: &mut VecDeque<Bytes>) {
    let pb::PullResponse {
        round,
        last,
        params,
    } = message;
    let head = pb::PullResponse {
        round,
        last,
        params: Vec::new(),
    };
    let segment_len = |s: &pb::Segment| s.encoded_len();
    let len = head.encoded_len()
        + params
            .iter()
            .map(|s| {
                let n = segment_len(s);
                key_len(PARAMS_TAG) + encoded_len_varint(n as u64) + n
            })
            .sum::<usize>();
    let mut buf = BytesMut::with_capacity(5 + head.encoded_len() + 64 * params.len());
    buf.put_u8(0);
    // A pull message is at most a few chunks, far below 4 GiB.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    head.encode_raw(&mut buf);
    for s in params {
        encode_key(PARAMS_TAG, WireType::LengthDelimited, &mut buf);
        encode_varint(segment_len(&s) as u64, &mut buf);
        let pb::Segment {
            param,
            offset,
            data,
            dtype,
        } = s;
        pb::Segment {
            param,
            offset,
            data: Bytes::new(),
            dtype: 0,
        }
        .encode_raw(&mut buf);
        if !data.is_empty() {
            encode_key(DATA_TAG, WireType::LengthDelimited, &mut buf);
            encode_varint(data.len() as u64, &mut buf);
            out.push_back(buf.split().freeze());
            out.push_back(data);
        }
        if dtype != 0 {
            encode_key(DTYPE_TAG, WireType::Varint, &mut buf);
            encode_varint(dtype as u64, &mut buf);
        }
    }
    if !buf.is_empty() {
        out.push_back(buf.freeze());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_the_bytes_tonic_would_send() {
        let message = pb::PullResponse {
            round: 7,
            last: Some(pb::RoundOutcome {
                round: 6,
                lr: vec![0.5, 0.25],
                ..Default::default()
            }),
            params: vec![
                pb::Segment {
                    param: "w".into(),
                    offset: 300,
                    data: Bytes::from(vec![7u8; 1000]),
                    dtype: 0,
                },
                pb::Segment {
                    param: "empty".into(),
                    offset: 0,
                    data: Bytes::new(),
                    dtype: 0,
                },
                pb::Segment {
                    param: "b".into(),
                    offset: 0,
                    data: Bytes::from(vec![1u8, 2, 3, 4]),
                    dtype: 0,
                },
                pb::Segment {
                    param: "h".into(),
                    offset: 2,
                    data: Bytes::from(vec![1u8, 2, 3, 4]),
                    dtype: pb::Dtype::Bf16 as i32,
                },
            ],
        };
        let data = message.params[0].data.clone();
        let mut want = vec![0u8];
        want.extend((message.encoded_len() as u32).to_be_bytes());
        want.extend(message.encode_to_vec());
        let mut out = VecDeque::new();
        frame(message, &mut out);
        let got: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(got, want);
        assert!(
            out.iter().any(|b| b.as_ptr() == data.as_ptr()),
            "the values are sent as they are, not copied"
        );
        let mut out = VecDeque::new();
        frame(pb::PullResponse::default(), &mut out);
        assert_eq!(out.iter().map(Bytes::len).sum::<usize>(), 5);
    }
}
