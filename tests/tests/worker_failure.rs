//! Workers that fail: a round stops waiting for a worker after the job's
//! worker timeout and the worker rejoins; with backup workers no round
//! waits for the slowest, whose late push is stale.

use std::time::{Duration, Instant};

use paramd_client::{Client, v1 as pb};
use paramd_tests::{TestCluster, TestServer, http_get, metric};
use tonic::Code;

fn spec(workers: u32, timeout: Option<f64>, backup: u32) -> pb::JobSpec {
    pb::JobSpec {
        params: vec![pb::ParamSpec {
            name: "w".into(),
            shape: vec![3],
        }],
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(1.0),
                ..Default::default()
            }),
        }),
        workers,
        worker_timeout_seconds: timeout,
        backup_workers: backup,
        ..Default::default()
    }
}

/// Worker w's gradient: all elements w + 1.
fn grad(w: u32) -> [f32; 3] {
    [w as f32 + 1.0; 3]
}

async fn push(
    c: &mut Client,
    job: &str,
    w: u32,
    round: u64,
) -> Result<pb::PushResponse, paramd_client::ClientError> {
    c.push(job, w, round, &[("w", &grad(w))]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_dropped_after_the_timeout_and_rejoins() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.init("timeout", spec(4, Some(0.5), 0), &[("w", &[0.0; 3])])
        .await
        .expect("init");
    c.timeout = Duration::from_secs(20);
    let started = Instant::now();
    for w in 0..3 {
        push(&mut c, "timeout", w, 0).await.expect("push");
    }
    // Worker 3 never pushes round 0: the round completes with 0, 1 and 2.
    let p = c
        .pull("timeout", 1)
        .await
        .expect("round 1 after the timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the timeout"
    );
    assert_eq!(
        p.params["w"],
        vec![-2.0; 3],
        "mean of 1, 2, 3 over the three who pushed"
    );
    let (_, body) = http_get(server.http, "/metrics").await.expect("metrics");
    assert_eq!(
        metric(&body, "paramd_workers_dropped_total", &[("job", "timeout")]),
        Some(1.0)
    );

    // Worker 3 comes back: its push for round 0 is stale; it pulls the
    // current round and continues with everyone.
    let err = push(&mut c, "timeout", 3, 0)
        .await
        .expect_err("round 0 is over");
    assert_eq!(
        err.status().map(tonic::Status::code),
        Some(Code::FailedPrecondition)
    );
    for w in 0..4 {
        push(&mut c, "timeout", w, 1).await.expect("push round 1");
    }
    let p = c.pull("timeout", 2).await.expect("round 2");
    assert_eq!(p.params["w"], vec![-4.5; 3], "-2 minus the mean of 1..4");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_workers_do_not_wait_for_the_slowest() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // A long worker timeout: only the backup worker rule can end the round.
    c.init("backup", spec(4, Some(600.0), 1), &[("w", &[0.0; 3])])
        .await
        .expect("init");
    c.timeout = Duration::from_secs(20);
    for round in 0..3u64 {
        // A different worker is the slow one each round.
        let slow = (round % 4) as u32;
        for w in (0..4).filter(|&w| w != slow) {
            push(&mut c, "backup", w, round).await.expect("push");
        }
        c.pull("backup", round + 1)
            .await
            .expect("the round completed without the slowest");
        let err = push(&mut c, "backup", slow, round).await.expect_err("late");
        let status = err.status().expect("status");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("stale"), "{}", status.message());
    }
    let p = c.pull("backup", 3).await.expect("pull");
    // Rounds without worker 0, 1, 2: means 3, 8/3, 7/3.
    let want = -(3.0f32 + 8.0 / 3.0 + 7.0 / 3.0);
    assert!(
        (p.params["w"][0] - want).abs() < 1e-5,
        "{:?} vs {want}",
        p.params["w"]
    );
    let (_, body) = http_get(server.http, "/metrics").await.expect("metrics");
    assert_eq!(
        metric(&body, "paramd_stale_pushes_total", &[("job", "backup")]),
        Some(3.0)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_refuse_partial_rounds_for_now() {
    let cluster = TestCluster::start(2, paramd::NodeConfig::default()).await;
    let mut c = Client::connect(&cluster.url()).await.expect("connect");
    for s in [spec(4, None, 1), spec(4, Some(5.0), 0)] {
        let err = c
            .init("partial", s, &[("w", &[0.0; 3])])
            .await
            .expect_err("refused");
        let status = err.status().expect("status");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("need a one-shard cluster"),
            "{}",
            status.message()
        );
    }
    cluster.shutdown().await;
}
