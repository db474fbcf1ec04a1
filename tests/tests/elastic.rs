//! Elastic membership (`membership = MEMBERSHIP_ELASTIC`): workers join
//! (the server gives each a worker id, a lease and the round to push),
//! heartbeat and leave. A round completes when every current member pushed
//! and at least `min_workers` did, or `min_workers` pushed and the grace
//! (`worker_timeout_seconds`) passed since the `min_workers`-th; its
//! participants are averaged in worker-id order. Every round is compared
//! bit for bit with a job of one worker given the mean of the round's
//! participants (paramd's SGD is torch's, as the golden traces check), on
//! 1 and 3 shards: a worker that joins mid-round and pushes before the
//! round closes counts; one whose push comes after the grace closed the
//! round is refused as stale and counts from the next; a member that
//! leaves is not waited for; a lease that runs out ends the membership (a
//! worker killed mid-round); a push, heartbeat or leave with a lease that
//! is not the worker id's membership is refused as `not_member`. Eight
//! members pushing bf16 and f16 average their decoded pushes.
//! Checkpoints keep the membership: after kill -9 of every shard the
//! members go on with their leases, bit-identical to a run that never
//! stopped.

use std::time::Duration;

use paramd_client::{Client, Pulled, PushOptions, v1 as pb};
use paramd_proto::wire;
use paramd_tests::{
    Daemon, TestServer, bits, flat_spec, on_one_and_three_shards, outer_sgd, reserve_ports,
    start_cluster, wait_serving,
};
use tonic::Code;

const SHAPES: [(&str, usize); 2] = [("w", 9), ("b", 4)];

fn spec(max_workers: u32, min_workers: u32, grace: f64, lease: Option<f64>) -> pb::JobSpec {
    pb::JobSpec {
        membership: pb::Membership::Elastic as i32,
        min_workers,
        worker_timeout_seconds: Some(grace),
        lease_seconds: lease,
        ..flat_spec(&SHAPES, outer_sgd(), max_workers)
    }
}

/// What a member who joined as the `who`-th pushes in round `r`.
fn grad(name: &str, n: usize, who: usize, r: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (i as f32 * 0.41 - who as f32 * 0.9 + r as f32 * 0.3)
                * if name == "b" { -0.6 } else { 0.8 }
        })
        .collect()
}

fn init_values() -> Vec<(&'static str, Vec<f32>)> {
    SHAPES
        .iter()
        .map(|&(n, len)| (n, vec![0.25; len]))
        .collect()
}

async fn init(c: &mut Client, job: &str, spec: pb::JobSpec) {
    let values = init_values();
    let refs: Vec<(&str, &[f32])> = values.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    c.init(job, spec, &refs).await.expect("init");
}

/// A member: the `who`-th to join (its data) and its membership.
#[derive(Clone, Debug)]
struct Member {
    who: usize,
    worker: u32,
    lease: u64,
}

async fn join(c: &Client, job: &str, who: usize) -> (Member, u64) {
    let r = c.join(job).await.expect("join");
    let m = Member {
        who,
        worker: r.worker,
        lease: r.lease,
    };
    (m, r.round)
}

async fn push(c: &Client, job: &str, m: &Member, r: u64) -> paramd_client::Result<()> {
    let values: Vec<(&str, Vec<f32>)> = SHAPES
        .iter()
        .map(|&(n, len)| (n, grad(n, len, m.who, r)))
        .collect();
    let grads: Vec<(std::sync::Arc<str>, paramd_client::codec::Payload)> = values
        .iter()
        .map(|(n, v)| {
            (
                std::sync::Arc::from(*n),
                paramd_client::codec::Payload::Owned(paramd_client::to_le_bytes(v)),
            )
        })
        .collect();
    let options = PushOptions {
        lease: m.lease,
        ..Default::default()
    };
    c.push_payloads(job, m.worker, r, &grads, &[], options)
        .await
        .map(|_| ())
}

/// The reference: round `r`'s participants' mean (in worker-id order)
/// pushed to job `{job}-given`, of one worker.
async fn reference(c: &mut Client, job: &str, r: u64, participants: &[&Member]) -> Pulled {
    let mut ordered = participants.to_vec();
    ordered.sort_by_key(|m| m.worker);
    let means: Vec<(&str, Vec<f32>)> = SHAPES
        .iter()
        .map(|&(n, len)| {
            let mut sum = grad(n, len, ordered[0].who, r);
            for m in &ordered[1..] {
                for (s, x) in sum.iter_mut().zip(grad(n, len, m.who, r)) {
                    *s += x;
                }
            }
            (n, sum.iter().map(|s| s / ordered.len() as f32).collect())
        })
        .collect();
    let refs: Vec<(&str, &[f32])> = means.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    let given = format!("{job}-given");
    if r == 0 {
        init(c, &given, flat_spec(&SHAPES, outer_sgd(), 1)).await;
    }
    c.push(&given, 0, r, &refs).await.expect("reference push");
    c.pull(&given, r + 1).await.expect("reference pull")
}

fn reason(e: &paramd_client::ClientError) -> (Code, String) {
    let code = e.status().map_or(Code::Unknown, tonic::Status::code);
    (code, e.reason().unwrap_or_default().to_owned())
}

/// Checks round `r` of `job` against the reference and its participants.
async fn completes(c: &mut Client, job: &str, r: u64, participants: &[&Member]) -> Pulled {
    let got = c.pull(job, r + 1).await.expect("pull");
    let want = reference(c, job, r, participants).await;
    assert_eq!(bits(&got), bits(&want), "round {r} of {job}");
    let outcome = got.last.clone().expect("outcome");
    assert_eq!(
        outcome.participants as usize,
        participants.len(),
        "round {r} of {job}"
    );
    got
}

fn not_member(e: &paramd_client::ClientError) {
    assert_eq!(
        reason(e),
        (Code::FailedPrecondition, "not_member".into()),
        "{e}"
    );
}

async fn members_come_and_go(mut c: Client) -> Vec<(String, Vec<u32>)> {
    // The grace is long: a round completes when its members pushed.
    init(&mut c, "run", spec(4, 2, 600.0, None)).await;
    let (a, ra) = join(&c, "run", 0).await;
    let (b, rb) = join(&c, "run", 1).await;
    assert_eq!((a.worker, b.worker, ra, rb), (0, 1, 0, 0));

    // Round 0: both members.
    push(&c, "run", &a, 0).await.expect("a");
    push(&c, "run", &b, 0).await.expect("b");
    completes(&mut c, "run", 0, &[&a, &b]).await;

    // Round 1: a member joins after the round's first push and pushes
    // before it closes: it counts. The round waits for every member.
    push(&c, "run", &a, 1).await.expect("a");
    let (x, rx) = join(&c, "run", 2).await;
    assert_eq!((x.worker, rx), (2, 1), "the lowest free id, the open round");
    push(&c, "run", &x, 1).await.expect("joiner");
    let s = c.status(Some("run")).await.expect("status").jobs.remove(0);
    assert_eq!(s.round, 1, "still waiting for b");
    assert_eq!(s.waiting_for, vec![1]);
    assert_eq!(
        s.members.iter().map(|m| m.worker).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(s.min_workers, 2);
    push(&c, "run", &b, 1).await.expect("b");
    completes(&mut c, "run", 1, &[&a, &b, &x]).await;

    // Round 2: b leaves before pushing; the round does not wait for it.
    push(&c, "run", &a, 2).await.expect("a");
    c.leave("run", b.worker, b.lease).await.expect("leave");
    c.leave("run", b.worker, b.lease)
        .await
        .expect("leaving again is harmless");
    push(&c, "run", &x, 2).await.expect("x");
    completes(&mut c, "run", 2, &[&a, &x]).await;
    // b's lease is no longer a member.
    not_member(&push(&c, "run", &b, 3).await.expect_err("b left"));
    not_member(
        &c.heartbeat("run", b.worker, b.lease)
            .await
            .expect_err("b left"),
    );

    // Round 3: a new member takes b's id (freed in a closed round); b's
    // old lease cannot push as worker 1.
    let (d, rd) = join(&c, "run", 3).await;
    assert_eq!((d.worker, rd), (1, 3));
    not_member(&push(&c, "run", &b, 3).await.expect_err("not b's"));
    for m in [&d, &a, &x] {
        c.heartbeat("run", m.worker, m.lease).await.expect("alive");
        push(&c, "run", m, 3).await.expect("round 3");
    }
    let last = completes(&mut c, "run", 3, &[&a, &d, &x]).await;

    // A slow member: the round closes the grace (2 s) after its second
    // push without it; its push is stale, and it counts from the next
    // round, whose three pushes come together, well within the grace.
    init(&mut c, "slow", spec(3, 2, 2.0, None)).await;
    let (p, _) = join(&c, "slow", 4).await;
    let (q, _) = join(&c, "slow", 5).await;
    let (slow, _) = join(&c, "slow", 6).await;
    push(&c, "slow", &p, 0).await.expect("p");
    push(&c, "slow", &q, 0).await.expect("q");
    completes(&mut c, "slow", 0, &[&p, &q]).await;
    let e = push(&c, "slow", &slow, 0).await.expect_err("too late");
    assert_eq!(reason(&e), (Code::FailedPrecondition, "stale".into()));
    let pushes = [&slow, &q, &p].map(|m| push(&c, "slow", m, 1));
    for r in futures::future::join_all(pushes).await {
        r.expect("round 1");
    }
    completes(&mut c, "slow", 1, &[&p, &q, &slow]).await;
    bits(&last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_average_the_members_that_pushed() {
    on_one_and_three_shards(members_come_and_go).await;
}

/// Eight members pushing in bf16 and f16 by turns: each round is the step
/// on the mean of their decoded pushes, in worker-id order.
async fn eight_members(mut c: Client) -> Vec<(String, Vec<u32>)> {
    init(&mut c, "eight", spec(8, 8, 600.0, None)).await;
    init(&mut c, "eight-given", flat_spec(&SHAPES, outer_sgd(), 1)).await;
    let mut members = Vec::new();
    for who in 0..8 {
        members.push(join(&c, "eight", who).await.0);
    }
    let dtype = |m: &Member| {
        if m.worker.is_multiple_of(2) {
            pb::Dtype::Bf16
        } else {
            pb::Dtype::F16
        }
    };
    let mut last = None;
    for r in 0..2u64 {
        for m in &members {
            let grads: Vec<(std::sync::Arc<str>, paramd_client::codec::Payload)> = SHAPES
                .iter()
                .map(|&(n, len)| {
                    let bytes = wire::encode(&grad(n, len, m.who, r), dtype(m));
                    (
                        std::sync::Arc::from(n),
                        paramd_client::codec::Payload::Owned(bytes),
                    )
                })
                .collect();
            let options = PushOptions {
                dtype: dtype(m),
                lease: m.lease,
                ..Default::default()
            };
            c.push_payloads("eight", m.worker, r, &grads, &[], options)
                .await
                .expect("push");
        }
        let means: Vec<(&str, Vec<f32>)> = SHAPES
            .iter()
            .map(|&(n, len)| {
                let mut sum = vec![0.0f32; len];
                for (i, m) in members.iter().enumerate() {
                    let mut g = vec![0.0; len];
                    let bytes = wire::encode(&grad(n, len, m.who, r), dtype(m));
                    wire::decode_into(&mut g, &bytes, dtype(m));
                    for (s, x) in sum.iter_mut().zip(g) {
                        *s = if i == 0 { x } else { *s + x };
                    }
                }
                (n, sum.iter().map(|s| s / members.len() as f32).collect())
            })
            .collect();
        let refs: Vec<(&str, &[f32])> = means.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        c.push("eight-given", 0, r, &refs).await.expect("reference");
        let got = c.pull("eight", r + 1).await.expect("pull");
        let want = c.pull("eight-given", r + 1).await.expect("pull");
        assert_eq!(bits(&got), bits(&want), "round {r}");
        assert_eq!(got.last.as_ref().expect("outcome").participants, 8);
        last = Some(got);
    }
    bits(&last.expect("rounds"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_members_pushing_bf16_and_f16() {
    on_one_and_three_shards(eight_members).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_lease_runs_out_is_not_waited_for() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // One member is enough; the grace is long, so only the lease's end
    // lets the round complete without the silent member.
    init(&mut c, "run", spec(3, 1, 600.0, Some(1.5))).await;
    let (a, _) = join(&c, "run", 0).await;
    let (killed, _) = join(&c, "run", 1).await;
    push(&c, "run", &a, 0).await.expect("a");
    // a keeps its lease while the round waits; the other never renews
    // its own (a worker killed mid-round).
    let renew = {
        let c = c.clone();
        let a = a.clone();
        tokio::spawn(async move {
            loop {
                if c.heartbeat("run", a.worker, a.lease).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    completes(&mut c, "run", 0, &[&a]).await;
    renew.abort();
    let s = c.status(Some("run")).await.expect("status").jobs.remove(0);
    assert_eq!(
        s.members.iter().map(|m| m.worker).collect::<Vec<_>>(),
        vec![a.worker]
    );
    not_member(
        &c.heartbeat("run", killed.worker, killed.lease)
            .await
            .expect_err("expired"),
    );
    not_member(&push(&c, "run", &killed, 1).await.expect_err("expired"));
    c.leave("run", a.worker, a.lease).await.expect("leave");
    let (_, body) = paramd_tests::http_get(server.http, "/metrics")
        .await
        .expect("metrics");
    let job = [("job", "run")];
    let value = |name, labels: &[(&str, &str)]| paramd_tests::metric(&body, name, labels);
    assert_eq!(value("paramd_members", &job), Some(0.0));
    assert_eq!(value("paramd_member_joins_total", &job), Some(2.0));
    for (reason, n) in [("expired", 1.0), ("left", 1.0)] {
        let labels = [("job", "run"), ("reason", reason)];
        assert_eq!(
            value("paramd_member_leaves_total", &labels),
            Some(n),
            "{reason}"
        );
    }
    assert_eq!(value("paramd_round_participants", &job), Some(1.0));
    assert_eq!(
        value("paramd_quorum_wait_seconds_count", &job),
        Some(1.0),
        "one round reached its quorum"
    );
    assert_eq!(value("paramd_grace_used_seconds_count", &job), Some(1.0));
    server.shutdown().await;
}

#[tokio::test]
async fn membership_is_refused_where_it_does_not_apply() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let values = init_values();
    let refs: Vec<(&str, &[f32])> = values.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    let fixed = flat_spec(&SHAPES, outer_sgd(), 2);
    for (spec, needle) in [
        (
            spec(2, 0, 1.0, None),
            "min_workers must be between 1 and workers (2)",
        ),
        (spec(2, 3, 1.0, None), "got 3"),
        (
            pb::JobSpec {
                backup_workers: 1,
                ..spec(2, 1, 1.0, None)
            },
            "backup_workers is for fixed workers",
        ),
        (spec(2, 1, 1.0, Some(-1.0)), "lease_seconds must be > 0"),
        (
            pb::JobSpec {
                min_workers: 1,
                ..fixed.clone()
            },
            "min_workers is for elastic membership",
        ),
        (
            pb::JobSpec {
                membership: 7,
                ..fixed.clone()
            },
            "membership 7 is not a known membership",
        ),
    ] {
        let e = c.init("bad", spec, &refs).await.expect_err("refused");
        let status = e.status().expect("status");
        assert_eq!(status.code(), Code::InvalidArgument, "{e}");
        assert!(status.message().contains(needle), "'{needle}' not in {e}");
    }
    c.init("fixed", fixed, &refs).await.expect("init");
    let e = c.join("fixed").await.expect_err("fixed workers");
    assert!(e.to_string().contains("has fixed workers"), "{e}");
    let e = push(
        &c,
        "fixed",
        &Member {
            who: 0,
            worker: 0,
            lease: 5,
        },
        0,
    )
    .await
    .expect_err("a lease in a fixed job");
    assert!(
        e.to_string()
            .contains("lease: job 'fixed' has fixed workers"),
        "{e}"
    );

    c.init("full", spec(2, 1, 1.0, None), &refs)
        .await
        .expect("init");
    let (a, _) = join(&c, "full", 0).await;
    join(&c, "full", 1).await;
    let e = c.join("full").await.expect_err("two at most");
    assert!(e.to_string().contains("job 'full' is full"), "{e}");
    let no_lease = Member { lease: 0, ..a };
    not_member(&push(&c, "full", &no_lease, 0).await.expect_err("no lease"));
    let s = c.status(Some("full")).await.expect("status").jobs.remove(0);
    assert_eq!(s.workers_pushed, 0, "nothing was counted");
    server.shutdown().await;
}

/// Rounds 0..3 by members a and b; x joins in round 3 and pushes from
/// then on.
async fn elastic_round(c: &mut Client, members: &[Member], r: u64) -> Pulled {
    for m in members {
        push(c, "run", m, r).await.expect("push");
    }
    c.pull("run", r + 1).await.expect("pull")
}

const ROUNDS: u64 = 8;

async fn run_members(c: &mut Client, from: u64, members: &mut Vec<Member>) -> Pulled {
    let mut last = None;
    for r in from..ROUNDS {
        if r == 3 && members.len() == 2 {
            members.push(join(c, "run", 2).await.0);
        }
        last = Some(elastic_round(c, members, r).await);
    }
    last.expect("rounds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restore_keeps_the_members() {
    let want = {
        let server = TestServer::start().await;
        let mut c = server.client().await;
        init(&mut c, "run", spec(4, 2, 600.0, None)).await;
        let mut members = vec![join(&c, "run", 0).await.0, join(&c, "run", 1).await.0];
        let got = run_members(&mut c, 0, &mut members).await;
        server.shutdown().await;
        got
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let flags = |i: usize| {
        let ckpt = dir.path().join(format!("shard{i}"));
        [
            "--checkpoint-dir",
            &ckpt.display().to_string(),
            "--checkpoint-every",
            "5",
            "--chunk-bytes",
            "8",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let daemons = start_cluster(&ports, flags).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run", spec(4, 2, 600.0, None)).await;
    let mut members = vec![join(&c, "run", 0).await.0, join(&c, "run", 1).await.0];
    // Checkpoint at round 5 (x joined in round 3); round 6 is applied but
    // not saved.
    for r in 0..6 {
        if r == 3 {
            members.push(join(&c, "run", 2).await.0);
        }
        elastic_round(&mut c, &members, r).await;
    }
    kill(daemons).await;

    let daemons = start_cluster(&ports, flags).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(wait_serving(&mut c, "run").await.round, 5);
    let s = c.status(Some("run")).await.expect("status").jobs.remove(0);
    let restored: Vec<(u32, u64)> = s.members.iter().map(|m| (m.worker, m.lease)).collect();
    let joined: Vec<(u32, u64)> = members.iter().map(|m| (m.worker, m.lease)).collect();
    assert_eq!(restored, joined, "the members and their leases");
    // paramctl shows them.
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            std::process::Command::new(paramd_tests::binary("paramctl"))
                .args(["--server", &url, "status", "--job", "run"])
                .output()
                .expect("paramctl")
        }
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("members          3 (elastic: a round needs 2, at most 4 at once)"),
        "{text}"
    );
    for m in &members {
        let line = format!("worker {:<5} lease {:<8}", m.worker, m.lease);
        assert!(text.contains(&line), "{line:?} not in {text}");
    }
    let got = run_members(&mut c, 5, &mut members).await;
    assert_eq!(
        bits(&got),
        bits(&want),
        "bit-identical to the run that never stopped"
    );
    kill(daemons).await;
}

async fn kill(daemons: Vec<Daemon>) {
    for mut d in daemons {
        d.child.kill().await.expect("kill -9");
    }
}
