//! Calls and the checks that a refusal changed nothing.

use std::collections::BTreeMap;
use std::fmt::Debug;

use paramd_client::v1 as pb;
use paramd_client::{Client, ClientError};
use paramd_proto::v1::param_server_client::ParamServerClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::fixtures::{bits, grads, initial, refs, sgd_step};
use crate::{Params, Tensors};

/// Asserts that `s` has `code` and a message holding every part.
pub(crate) fn check_status(s: &tonic::Status, code: Code, parts: &[String], what: &str) {
    assert_eq!(
        s.code(),
        code,
        "{what}: wrong code, message {:?}",
        s.message()
    );
    for part in parts {
        assert!(
            s.message().contains(part.as_str()),
            "{what}: message {:?} should contain {part:?}",
            s.message()
        );
    }
    // Stale and early pushes say so in a machine-readable trailer too.
    if let Some(kind) = parts
        .first()
        .filter(|p| ["stale", "early"].contains(&p.as_str()))
    {
        let reason = s
            .metadata()
            .get(paramd_proto::transport::REASON)
            .and_then(|v| v.to_str().ok());
        assert_eq!(reason, Some(kind.as_str()), "{what}: reason");
    }
}

/// Asserts that a client call was refused with `code` and a message holding
/// every part; returns the message.
pub(crate) fn refused<T: Debug>(
    r: Result<T, ClientError>,
    code: Code,
    parts: &[&str],
    what: &str,
) -> String {
    let e = match r {
        Ok(v) => panic!("{what}: accepted, got {v:?}"),
        Err(e) => e,
    };
    let s = e
        .status()
        .unwrap_or_else(|| panic!("{what}: not a gRPC status: {e}"));
    let parts: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
    check_status(s, code, &parts, what);
    s.message().to_owned()
}

pub(crate) async fn job_status(client: &mut Client, job: &str) -> pb::JobStatus {
    let mut r = client.status(Some(job)).await.expect("status");
    assert_eq!(r.jobs.len(), 1, "status of one job");
    let s = r.jobs.remove(0);
    assert_eq!(s.job, job);
    s
}

/// Asserts that job `job` does not exist.
pub(crate) async fn assert_absent(client: &mut Client, job: &str, what: &str) {
    refused(
        client.status(Some(job)).await,
        Code::NotFound,
        &[&format!("'{job}'")],
        &format!("{what}: status of the refused job"),
    );
}

/// Everything a refusal must leave as it was.
#[derive(Debug, PartialEq)]
pub(crate) struct Seen {
    pub(crate) round: u64,
    pub(crate) step: u64,
    pub(crate) workers_pushed: u32,
    pub(crate) rounds_skipped: u64,
    /// `(round, step, skipped)` of the last outcome.
    pub(crate) last: Option<(u64, u64, bool)>,
    /// The pulled parameters, as bits.
    pub(crate) params: BTreeMap<String, Vec<u32>>,
}

pub(crate) async fn seen(client: &mut Client, job: &str) -> Seen {
    let s = job_status(client, job).await;
    let pulled = client.pull(job, s.round).await.expect("pull");
    assert_eq!(pulled.round, s.round, "pull and status agree on the round");
    let params: Params = pulled.params.into_iter().collect();
    Seen {
        round: s.round,
        step: s.step,
        workers_pushed: s.workers_pushed,
        rounds_skipped: s.rounds_skipped,
        last: s.last.map(|l| (l.round, l.step, l.skipped)),
        params: bits(&params),
    }
}

/// Pulls every parameter once `round` rounds have completed.
pub(crate) async fn pull(client: &mut Client, job: &str, round: u64) -> (Params, pb::RoundOutcome) {
    let pulled = client.pull(job, round).await.expect("pull");
    assert_eq!(pulled.round, round, "pulled round");
    let last = pulled.last.expect("an outcome after a round");
    (pulled.params.into_iter().collect(), last)
}

/// Pushes `grads` as worker `worker` for `round`, expecting it counted as the
/// `pushed`-th push of the round.
pub(crate) async fn push_ok(
    client: &mut Client,
    job: &str,
    worker: u32,
    round: u64,
    grads: &Tensors,
    pushed: u32,
) {
    let r = client
        .push(job, worker, round, &refs(grads))
        .await
        .unwrap_or_else(|e| panic!("push of worker {worker} for round {round}: {e}"));
    assert!(
        !r.duplicate,
        "worker {worker}, round {round}: not a duplicate"
    );
    assert_eq!(
        r.pushed, pushed,
        "worker {worker}, round {round}: workers counted"
    );
}

/// Waits for round `round` to complete and checks it applied exactly one
/// SGD step of `mean(grads(0, round), grads(1, round))` to `before`, as
/// optimizer step `step`. Returns the new parameters.
pub(crate) async fn check_applied(
    client: &mut Client,
    job: &str,
    round: u64,
    step: u64,
    before: &Params,
) -> Params {
    let want = sgd_step(before, &grads(0, round), &grads(1, round));
    let (got, last) = pull(client, job, round + 1).await;
    assert_eq!(
        bits(&got),
        bits(&want),
        "round {round}: p - lr * mean(g)\n got {got:?}\nwant {want:?}"
    );
    assert_ne!(
        bits(&got),
        bits(before),
        "round {round} changed the parameters"
    );
    assert_eq!(
        (last.round, last.step, last.skipped),
        (round, step, false),
        "round {round}: outcome"
    );
    let s = job_status(client, job).await;
    assert_eq!(
        (s.round, s.step, s.workers_pushed),
        (round + 1, step, 0),
        "round {round}: status"
    );
    got
}

/// Runs round `round` with both workers' legitimate gradients.
pub(crate) async fn run_round(
    client: &mut Client,
    job: &str,
    round: u64,
    step: u64,
    before: &Params,
) -> Params {
    push_ok(client, job, 0, round, &grads(0, round), 1).await;
    push_ok(client, job, 1, round, &grads(1, round), 2).await;
    check_applied(client, job, round, step, before).await
}

/// Creates job `job` from `spec` with the usual initial values.
pub(crate) async fn create(client: &mut Client, job: &str, spec: pb::JobSpec) {
    let r = client
        .init(job, spec, &refs(&initial()))
        .await
        .expect("init");
    assert!(r.created, "job {job} created");
    assert_eq!(r.round, 0, "a new job starts at round 0");
}

pub(crate) async fn raw_push(
    raw: &mut ParamServerClient<Channel>,
    job: &str,
    worker: u32,
    round: u64,
    grads: Vec<pb::Segment>,
) -> Result<pb::PushResponse, tonic::Status> {
    let req = pb::PushRequest {
        lease: 0,
        weight: 0.0,
        job: job.to_owned(),
        worker,
        round,
        grads,
        no_grad: Vec::new(),
    };
    raw.push(tokio_stream::iter(vec![req]))
        .await
        .map(tonic::Response::into_inner)
}
