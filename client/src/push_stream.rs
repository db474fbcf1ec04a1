//! A push whose tensors are handed over one at a time, while the caller is
//! still computing the others (gradients as backward produces them): every
//! shard's call opens with the push's header, each tensor's segments go to
//! their shards as soon as it is given, and `finish` ends the calls. The
//! network then works while the caller computes, as an all-reduce that
//! starts on the first gradient bucket does.

use std::sync::Arc;

use paramd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::codegen::http::uri::PathAndQuery;

use crate::codec::{Payload, PushCodec, PushMessage};
use crate::route::{Route, pack_refs};
use crate::{Client, ClientError, Result, raw_grpc, shard_error};

/// An open push (see the module's documentation).
#[derive(Debug)]
pub struct PushStream {
    client: Client,
    job: String,
    worker: u32,
    round: u64,
    route: Arc<Route>,
    senders: Vec<mpsc::UnboundedSender<PushMessage>>,
    calls: Vec<tokio::task::JoinHandle<Result<pb::PushResponse, tonic::Status>>>,
    /// Every tensor given, kept until the end: a push cut by a failure is
    /// sent again whole from them.
    given: Vec<(Arc<str>, Payload)>,
    /// The parameters said to have no gradient.
    no_grad: Vec<Arc<str>>,
}

impl Client {
    /// Opens the push of `worker` for `round` of `job` on every shard;
    /// tensors follow with [`PushStream::send`]. The calls run on the
    /// current tokio runtime while the caller goes on.
    pub async fn push_stream(&self, job: &str, worker: u32, round: u64) -> Result<PushStream> {
        let route = self.route(job).await?;
        let mut senders = Vec::with_capacity(route.shards.len());
        let mut calls = Vec::with_capacity(route.shards.len());
        for shard in &route.shards {
            let (tx, rx) = mpsc::unbounded_channel();
            // A header-only first message: the server admits or refuses
            // the push before any payload is sent.
            let _ = tx.send(PushMessage::Header(pb::PushRequest {
                job: job.to_owned(),
                worker,
                round,
                grads: Vec::new(),
                no_grad: Vec::new(),
                weight: 0.0,
                lease: 0,
            }));
            let channel = shard.channel.clone();
            let timeout = self.timeout;
            calls.push(tokio::spawn(async move {
                let mut grpc = raw_grpc(&channel).await?;
                let mut req =
                    tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
                req.set_timeout(timeout);
                let path = PathAndQuery::from_static("/paramd.v1.ParamServer/Push");
                grpc.client_streaming(req, path, PushCodec)
                    .await
                    .map(tonic::Response::into_inner)
            }));
            senders.push(tx);
        }
        Ok(PushStream {
            client: self.clone(),
            job: job.to_owned(),
            worker,
            round,
            route,
            senders,
            calls,
            given: Vec::new(),
            no_grad: Vec::new(),
        })
    }
}

impl PushStream {
    /// What the push is, for errors.
    fn what(&self) -> String {
        format!("push of worker {} for round {}", self.worker, self.round)
    }

    /// Sends tensor `name` to the shards holding its chunks. Nothing
    /// waits: the segments are queued for the open calls, which encode
    /// them straight from `payload`'s memory as the network takes them.
    /// An unknown name, a wrong size or a tensor given twice is refused
    /// before anything of it is sent.
    pub fn send(&mut self, name: Arc<str>, payload: Payload) -> Result<()> {
        let what = self.what();
        self.route.check_tensor(&what, &name, payload.len() / 4)?;
        if self.given.iter().any(|(n, _)| *n == name) || self.no_grad.contains(&name) {
            return Err(ClientError::Invalid(format!(
                "{what}: '{name}' is given twice"
            )));
        }
        let tensor = [(name, payload)];
        for (i, segments) in self
            .route
            .split(&tensor, pb::Dtype::F32)
            .into_iter()
            .enumerate()
        {
            if segments.is_empty() {
                continue;
            }
            for message in pack_refs(segments) {
                // A call that already ended (refused or failed) has
                // dropped its receiver; `finish` reports why.
                let _ = self.senders[i].send(message);
            }
        }
        let [given] = tensor;
        self.given.push(given);
        Ok(())
    }

    /// Says that this worker has no gradient for parameter `name` (torch's
    /// `grad is None`): every shard is told, instead of values.
    pub fn no_grad(&mut self, name: Arc<str>) -> Result<()> {
        let what = self.what();
        let given = self.given.iter().map(|(n, _)| n.as_ref());
        self.route.check_no_grad(&what, &name, given)?;
        if self.no_grad.contains(&name) {
            return Err(ClientError::Invalid(format!(
                "{what}: '{name}' is given twice"
            )));
        }
        for sender in &self.senders {
            let _ = sender.send(PushMessage::Header(pb::PushRequest {
                no_grad: vec![name.to_string()],
                ..Default::default()
            }));
        }
        self.no_grad.push(name);
        Ok(())
    }

    /// Ends the push on every shard and returns what they answered, as
    /// [`Client::push_payloads`] does. A call cut for a reason worth a
    /// retry (a shard unreachable, a copy of the push in flight) is made
    /// again whole, with the client's retry policy, from the tensors given.
    pub async fn finish(mut self) -> Result<pb::PushResponse> {
        let named = self.given.iter().map(|(n, _)| n.as_ref());
        let complete = self.route.check_complete(
            &self.what(),
            named.chain(self.no_grad.iter().map(|n| n.as_ref())),
        );
        if let Err(e) = complete {
            // Cut, not ended: no shard counts a push that lacks a tensor.
            for call in &self.calls {
                call.abort();
            }
            return Err(e);
        }
        self.senders.clear();
        let n = self.route.shards.len();
        let mut out = pb::PushResponse {
            duplicate: true,
            pushed: u32::MAX,
        };
        let mut retry = false;
        let mut first_error: Option<ClientError> = None;
        for (i, call) in std::mem::take(&mut self.calls).into_iter().enumerate() {
            let answer = call.await.unwrap_or_else(|e| {
                Err(tonic::Status::internal(format!(
                    "the push's task failed: {e}"
                )))
            });
            match answer {
                Ok(r) => {
                    out.duplicate &= r.duplicate;
                    out.pushed = out.pushed.min(r.pushed);
                }
                Err(s) => {
                    let s = crate::retry::normalize(s);
                    retry |= matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted);
                    let url = &self.route.shards[i].url;
                    first_error.get_or_insert_with(|| shard_error(i, url, s, n));
                }
            }
        }
        match first_error {
            None => Ok(out),
            Some(_) if retry => {
                self.client
                    .push_payloads(
                        &self.job,
                        self.worker,
                        self.round,
                        &self.given,
                        &self.no_grad,
                        crate::PushOptions::default(),
                    )
                    .await
            }
            Some(e) => Err(e),
        }
    }
}

impl Drop for PushStream {
    /// A push given up before `finish` is cut, not ended: no shard counts
    /// part of it.
    fn drop(&mut self) {
        for call in &self.calls {
            call.abort();
        }
    }
}
