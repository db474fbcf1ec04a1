//! Non-finite gradients: the error and skip policies.

use paramd_client::v1 as pb;
use paramd_tests::TestServer;
use tonic::Code;

use crate::Tensors;
use crate::checks::{check_applied, create, job_status, pull, push_ok, refused, run_round, seen};
use crate::fixtures::{as_params, bits, grads, initial, refs, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_policy_refuses_a_non_finite_push() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = "nan-error";
    let spec = pb::JobSpec {
        non_finite: pb::NonFinitePolicy::Error as i32,
        ..spec()
    };
    create(&mut client, job, spec).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;

    let round = 1;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    let before = seen(&mut client, job).await;
    let poisoned = |name: &str, i: usize, v: f32| -> Tensors {
        let mut g = grads(1, round);
        let t = g.iter_mut().find(|(n, _)| *n == name).expect("tensor");
        t.1[i] = v;
        g
    };
    let cases = [
        (
            "NaN in e",
            poisoned("e", 2, f32::NAN),
            vec!["'e'", "element 2", "NaN", "non-finite"],
        ),
        (
            "-inf in the scalar b",
            poisoned("b", 0, f32::NEG_INFINITY),
            vec!["'b'", "element 0", "-inf"],
        ),
        (
            "+inf in w",
            poisoned("w", 5, f32::INFINITY),
            vec!["'w'", "element 5", "inf"],
        ),
    ];
    for (what, g, parts) in cases {
        refused(
            client.push(job, 1, round, &refs(&g)).await,
            Code::InvalidArgument,
            &parts,
            what,
        );
        assert_eq!(
            seen(&mut client, job).await,
            before,
            "{what}: the refused push changed the job"
        );
    }
    push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
    check_applied(&mut client, job, round, 2, &params).await;
    let s = job_status(&mut client, job).await;
    assert_eq!(s.rounds_skipped, 0);
    drop(client);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_skip_policy_skips_a_non_finite_round() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = "nan-skip";
    create(&mut client, job, spec()).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;
    let before = seen(&mut client, job).await;
    assert_eq!(
        (before.round, before.step, before.rounds_skipped),
        (1, 1, 0)
    );

    // Round 1: one NaN element in one worker's w spoils the mean, and the
    // round is skipped everywhere, b and e included.
    let round = 1;
    let mut g1 = grads(1, round);
    g1[0].1[3] = f32::NAN;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    push_ok(&mut client, job, 1, round, &g1, 2).await;
    let (got, last) = pull(&mut client, job, 2).await;
    assert_eq!(
        bits(&got),
        bits(&params),
        "a skipped round changes no parameter"
    );
    assert!(last.skipped, "the round is reported skipped");
    assert_eq!(
        (last.round, last.step),
        (1, 1),
        "a skipped round is not a step"
    );
    let s = job_status(&mut client, job).await;
    assert_eq!(
        (s.round, s.step, s.rounds_skipped, s.workers_pushed),
        (2, 1, 1, 0)
    );
    let l = s.last.expect("last outcome");
    assert!(l.skipped);
    assert_eq!((l.round, l.step), (1, 1));

    // Round 2 is finite: one normal step, the step counter advances by one.
    let round = 2;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
    check_applied(&mut client, job, round, 2, &params).await;
    let s = job_status(&mut client, job).await;
    assert_eq!(s.rounds_skipped, 1, "one skipped round so far");
    assert!(!s.last.expect("last outcome").skipped);
    drop(client);
    server.shutdown().await;
}
