//! Push: malformed pushes refused whole, huge offsets, retries.

use bytes::Bytes;
use paramd_client::v1 as pb;
use paramd_proto::v1::param_server_client::ParamServerClient;
use paramd_tests::TestServer;
use tonic::Code;

use crate::checks::{
    assert_absent, check_applied, check_status, create, job_status, push_ok, raw_push, refused,
    run_round, seen,
};
use crate::fixtures::{
    as_params, bits, get, grads, initial, refs, segment, segments, segments_without, spec,
};

/// A push that must be refused whole.
struct BadPush {
    what: &'static str,
    job: String,
    worker: u32,
    round: u64,
    grads: Vec<pb::Segment>,
    code: Code,
    parts: Vec<String>,
}

/// Every refused push, as worker `worker` would send it during `round`
/// (>= 2) of job `job`.
fn bad_pushes(job: &str, round: u64, worker: u32) -> Vec<BadPush> {
    let good = grads(worker, round);
    let w = get(&good, "w").to_vec();
    let e = get(&good, "e").to_vec();
    let with_w = |w: Vec<pb::Segment>| -> Vec<pb::Segment> {
        let mut s = w;
        s.extend(segments_without(&good, "w"));
        s
    };
    let case = |what, grads, code, parts: &[&str]| BadPush {
        what,
        job: job.to_owned(),
        worker,
        round,
        grads,
        code,
        parts: parts.iter().map(|p| (*p).to_owned()).collect(),
    };
    let invalid = Code::InvalidArgument;
    let mut unknown = segments(&good);
    unknown.push(segment("z", 0, &[1.0]));
    let mut e_past_end = segments(&good);
    e_past_end.push(segment("e", 4, &[1.0]));
    let mut b_twice = segments(&good);
    b_twice.push(segment("b", 0, &[1.0]));
    let odd = pb::Segment {
        dtype: 0,
        param: "w".to_owned(),
        offset: 0,
        data: Bytes::from(vec![0u8; 7]),
    };

    let stale = round - 1;
    let early = round + 1;
    vec![
        case(
            "an unknown parameter",
            unknown,
            invalid,
            &["unknown parameter 'z'"],
        ),
        case(
            "5 floats for w [2, 3]",
            with_w(vec![segment("w", 0, &w[..5])]),
            invalid,
            &["'w'", "6 elements", "got 5"],
        ),
        case(
            "7 floats for w [2, 3]",
            with_w(vec![segment("w", 0, &[w.clone(), vec![1.0]].concat())]),
            invalid,
            &["'w'", "6 elements", "got 7"],
        ),
        case(
            "2 floats for the scalar b",
            {
                let mut s = segments_without(&good, "b");
                s.push(segment("b", 0, &[1.0, 2.0]));
                s
            },
            invalid,
            &["'b'", "1 elements", "got 2"],
        ),
        case(
            "w with a hole",
            with_w(vec![segment("w", 0, &w[..2]), segment("w", 3, &w[3..])]),
            invalid,
            &["'w'", "6 elements", "got 5"],
        ),
        case(
            "an element past the end of e",
            e_past_end,
            invalid,
            &["'e'", "4 elements"],
        ),
        case(
            "7 bytes for w",
            with_w(vec![odd]),
            invalid,
            &["'w'", "7 bytes", "multiple of 4"],
        ),
        case(
            "w sent twice",
            with_w(vec![segment("w", 0, &w), segment("w", 0, &w)]),
            invalid,
            &["'w'", "sent twice"],
        ),
        case(
            "overlapping pieces of e",
            {
                let mut s = segments_without(&good, "e");
                s.push(segment("e", 0, &e[..3]));
                s.push(segment("e", 2, &e[2..]));
                s
            },
            invalid,
            &["'e'", "sent twice"],
        ),
        case(
            "the scalar b sent twice",
            b_twice,
            invalid,
            &["'b'", "sent twice"],
        ),
        case(
            "b missing",
            segments_without(&good, "b"),
            invalid,
            &["'b'", "missing"],
        ),
        case(
            "e missing",
            segments_without(&good, "e"),
            invalid,
            &["'e'", "missing", "4 elements"],
        ),
        case("nothing at all", Vec::new(), invalid, &["'w'", "missing"]),
        BadPush {
            worker: 2,
            ..case(
                "worker 2 of 2",
                segments(&good),
                invalid,
                &["worker 2", "2 workers"],
            )
        },
        BadPush {
            worker: u32::MAX,
            ..case(
                "worker u32::MAX",
                segments(&good),
                invalid,
                &["worker 4294967295", "2 workers"],
            )
        },
        BadPush {
            round: stale,
            ..case(
                "the previous round",
                segments(&good),
                Code::FailedPrecondition,
                &[
                    "stale",
                    &format!("round {stale} "),
                    &format!("current round is {round}"),
                ],
            )
        },
        BadPush {
            round: 0,
            ..case(
                "round 0",
                segments(&good),
                Code::FailedPrecondition,
                &["stale", "round 0 ", &format!("current round is {round}")],
            )
        },
        BadPush {
            round: early,
            ..case(
                "the next round",
                segments(&good),
                Code::FailedPrecondition,
                &[
                    "early",
                    &format!("collecting round {round}"),
                    &format!("not round {early}"),
                ],
            )
        },
        BadPush {
            round: u64::MAX,
            ..case(
                "round u64::MAX",
                segments(&good),
                Code::FailedPrecondition,
                &["early", &format!("collecting round {round}")],
            )
        },
        BadPush {
            job: "no-such-job".to_owned(),
            ..case(
                "an unknown job",
                segments(&good),
                Code::NotFound,
                &["'no-such-job'", "does not exist"],
            )
        },
    ]
}

/// Every bad push, once before any worker pushed its round and once after
/// worker 0 did: refused, and counted for nothing, so the round still needs
/// both workers' legitimate pushes and applies exactly their mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_are_refused_whole_and_count_for_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut raw = ParamServerClient::connect(server.url())
        .await
        .expect("connect");
    let job = "pushes";
    create(&mut client, job, spec()).await;

    // Two rounds first, so that parameters and counters are not initial.
    let mut params = as_params(&initial());
    for round in 0..2 {
        params = run_round(&mut client, job, round, round + 1, &params).await;
    }
    assert_ne!(bits(&params), bits(&as_params(&initial())));

    let mut round = 2;
    let cases = bad_pushes(job, round, 0).len();
    for other_first in [false, true] {
        for i in 0..cases {
            // The bad push comes from worker 1 after worker 0's push, or
            // from worker 0 before any.
            let bad_worker = u32::from(other_first);
            if other_first {
                push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
            }
            let before = seen(&mut client, job).await;
            assert_eq!(before.round, round);
            assert_eq!(before.workers_pushed, u32::from(other_first));
            assert_eq!(bits(&params), before.params);

            let bad = bad_pushes(job, round, bad_worker).swap_remove(i);
            let what = format!(
                "{} (round {round}, {})",
                bad.what,
                if other_first {
                    "after worker 0"
                } else {
                    "first"
                }
            );
            match raw_push(&mut raw, &bad.job, bad.worker, bad.round, bad.grads).await {
                Ok(r) => panic!("{what}: accepted: {r:?}"),
                Err(s) => check_status(&s, bad.code, &bad.parts, &what),
            }
            assert_eq!(
                seen(&mut client, job).await,
                before,
                "{what}: the refused push changed the job"
            );

            // Both legitimate pushes are still needed, and counted as new.
            if !other_first {
                push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
                let s = job_status(&mut client, job).await;
                assert_eq!(
                    (s.round, s.workers_pushed),
                    (round, 1),
                    "{what}: one push is not a round"
                );
            }
            push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
            params = check_applied(&mut client, job, round, round + 1, &params).await;
            round += 1;
        }
    }
    assert_eq!(round, 2 + 2 * cases as u64);
    drop((client, raw));
    server.shutdown().await;
}

/// A segment offset near `u64::MAX` must be refused like any element past
/// the end. Today `offset + n` and `(offset + n) * 4` overflow in
/// `Target::split` (server/src/pieces.rs): in a debug build the handler
/// panics, in a release build `u64::MAX` wraps past the bounds check and
/// `cut` panics indexing the layout; the client sees CANCELLED "h2 protocol
/// error" instead of INVALID_ARGUMENT, and with `1 << 62` a release build
/// reports "(up to byte 4)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_segment_offset_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut raw = ParamServerClient::connect(server.url())
        .await
        .expect("connect");
    let job = "huge-offset";
    create(&mut client, job, spec()).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;
    let before = seen(&mut client, job).await;
    for offset in [1 << 62, u64::MAX - 1, u64::MAX] {
        let what = format!("push with e at offset {offset}");
        let mut grads = segments(&grads(0, 1));
        grads.push(segment("e", offset, &[1.0]));
        match raw_push(&mut raw, job, 0, 1, grads).await {
            Ok(r) => panic!("{what}: accepted: {r:?}"),
            Err(s) => check_status(
                &s,
                Code::InvalidArgument,
                &["'e'".to_owned(), "4 elements".to_owned()],
                &what,
            ),
        }
        assert_eq!(
            seen(&mut client, job).await,
            before,
            "{what}: the job changed"
        );

        let what = format!("init with e at offset {offset}");
        let name = format!("huge-offset-init-{offset}");
        let mut values = segments(&initial());
        values.push(segment("e", offset, &[1.0]));
        let req = pb::InitRequest {
            job: name.clone(),
            spec: Some(spec()),
            values,
        };
        match raw.init(tokio_stream::iter(vec![req])).await {
            Ok(r) => panic!("{what}: accepted: {r:?}"),
            Err(s) => check_status(
                &s,
                Code::InvalidArgument,
                &["'e'".to_owned(), "4 elements".to_owned()],
                &what,
            ),
        }
        assert_absent(&mut client, &name, &what).await;
    }
    run_round(&mut client, job, 1, 2, &params).await;
    drop((client, raw));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_push_is_counted_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = "retries";
    create(&mut client, job, spec()).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;

    let round = 1;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    let before = seen(&mut client, job).await;
    // The same push again, then a "retry" with other gradients: both are
    // acknowledged as duplicates, and the first push's gradients are kept.
    for (what, g) in [
        ("same gradients", grads(0, round)),
        ("other gradients", grads(0, 7)),
    ] {
        let r = client.push(job, 0, round, &refs(&g)).await.expect(what);
        assert!(r.duplicate, "{what}: a duplicate");
        assert_eq!(r.pushed, 1, "{what}: still one worker counted");
        assert_eq!(
            seen(&mut client, job).await,
            before,
            "{what}: the retry changed the job"
        );
    }
    push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
    let params = check_applied(&mut client, job, round, 2, &params).await;

    // A retry that arrives once its round is complete is stale.
    refused(
        client.push(job, 0, round, &refs(&grads(0, round))).await,
        Code::FailedPrecondition,
        &["stale", "current round is 2"],
        "a retry after the round completed",
    );
    run_round(&mut client, job, 2, 3, &params).await;
    drop(client);
    server.shutdown().await;
}
