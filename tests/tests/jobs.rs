//! Jobs: independent of each other, idempotent Init, deletion, status, and
//! transfers larger than one gRPC message.

use paramd_client::v1 as pb;
use paramd_tests::TestServer;
use tonic::Code;

fn sgd_spec(params: &[(&str, Vec<u64>)], workers: u32, lr: f64) -> pb::JobSpec {
    pb::JobSpec {
        params: params
            .iter()
            .map(|(n, s)| pb::ParamSpec {
                name: (*n).into(),
                shape: s.clone(),
            })
            .collect(),
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(lr),
                ..Default::default()
            }),
        }),
        workers,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_independent_and_init_is_idempotent() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let shape = vec![("w", vec![2])];
    let a = c
        .init("a", sgd_spec(&shape, 1, 1.0), &[("w", &[1.0, 2.0])])
        .await
        .expect("init a");
    assert!(a.created && a.round == 0);
    c.init("b", sgd_spec(&shape, 2, 0.5), &[("w", &[10.0, 20.0])])
        .await
        .expect("init b");

    c.push("a", 0, 0, &[("w", &[1.0, 1.0])])
        .await
        .expect("push a");
    let pa = c.pull("a", 1).await.expect("pull a");
    assert_eq!(pa.params["w"], vec![0.0, 1.0]);
    // Job b saw nothing of job a's round.
    let pb_ = c.pull("b", 0).await.expect("pull b");
    assert_eq!((pb_.round, pb_.params["w"].clone()), (0, vec![10.0, 20.0]));

    // The same job again: its current round, nothing re-initialised.
    let again = c
        .init("a", sgd_spec(&shape, 1, 1.0), &[("w", &[7.0, 7.0])])
        .await
        .expect("re-init");
    assert!(!again.created);
    assert_eq!(again.round, 1);
    assert_eq!(
        c.pull("a", 1).await.expect("pull").params["w"],
        vec![0.0, 1.0]
    );
    // A different job under the same name is refused, naming the difference.
    let err = c
        .init("a", sgd_spec(&shape, 3, 1.0), &[("w", &[1.0, 2.0])])
        .await
        .expect_err("mismatch");
    let status = err.status().expect("status");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("workers is 1 here, 3 in the request"),
        "{}",
        status.message()
    );

    let all = c.status(None).await.expect("status");
    let names: Vec<&str> = all.jobs.iter().map(|j| j.job.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let a = &all.jobs[0];
    assert_eq!(
        (a.round, a.step, a.workers_expected, a.parameters),
        (1, 1, 1, 2)
    );
    assert_eq!(a.last.as_ref().map(|l| l.lr.clone()), Some(vec![1.0]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_frees_the_name_and_ends_waiting_pulls() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let shape = vec![("w", vec![3])];
    c.init("gone", sgd_spec(&shape, 2, 0.1), &[("w", &[1.0; 3])])
        .await
        .expect("init");
    let mut waiter = c.clone();
    let pull = tokio::spawn(async move { waiter.pull("gone", 1).await });
    c.delete_job("gone").await.expect("delete");
    // Whether the pull was parked before the delete arrived or not, it ends
    // with NOT_FOUND at once instead of waiting out its 300 s deadline.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), pull).await;
    let err = ended
        .expect("the pull ended")
        .expect("join")
        .expect_err("deleted");
    assert_eq!(err.status().map(tonic::Status::code), Some(Code::NotFound));
    let err = c.status(Some("gone")).await.expect_err("no such job");
    assert_eq!(err.status().map(tonic::Status::code), Some(Code::NotFound));
    assert_eq!(
        c.delete_job("gone")
            .await
            .expect_err("twice")
            .status()
            .map(tonic::Status::code),
        Some(Code::NotFound)
    );
    // The name can be used again, for a different job.
    let r = c
        .init("gone", sgd_spec(&shape, 1, 0.1), &[("w", &[2.0; 3])])
        .await
        .expect("init again");
    assert!(r.created);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_with_a_deadline_times_out_naming_the_round() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.init(
        "slow",
        sgd_spec(&[("w", vec![1])], 2, 0.1),
        &[("w", &[1.0])],
    )
    .await
    .expect("init");
    c.push("slow", 0, 0, &[("w", &[1.0])]).await.expect("push");
    c.timeout = std::time::Duration::from_millis(300);
    let err = c
        .pull("slow", 1)
        .await
        .expect_err("round 1 never completes");
    let status = err.status().expect("status");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(
        status.message().contains("round 1 not reached"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("1 of 2 workers pushed"),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

/// 17M f32 = 68 MB: more than one 64 MiB message in every direction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_larger_than_one_message_are_split() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let n: usize = 17 << 20;
    let init: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let grad: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    c.init(
        "big",
        sgd_spec(&[("w", vec![n as u64])], 1, 0.5),
        &[("w", &init)],
    )
    .await
    .expect("init");
    c.push("big", 0, 0, &[("w", &grad)]).await.expect("push");
    let pulled = c.pull("big", 1).await.expect("pull");
    let w = &pulled.params["w"];
    assert_eq!(w.len(), n);
    for i in [0, 1, 6, 999, n / 2 + 3, n - 1] {
        assert_eq!(w[i], init[i] - 0.5 * grad[i], "element {i}");
    }
    server.shutdown().await;
}
