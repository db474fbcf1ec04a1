//! A shard killed mid-run: workers get an error naming it within their
//! deadline, no shard applies the round that could not be decided, and the
//! round completes nowhere once the shard comes back without the job.

use std::time::{Duration, Instant};

use paramd_client::{Client, ClientError, v1 as pb};
use paramd_proto::v1::param_server_client::ParamServerClient;
use paramd_tests::{reserve_ports, start_shard};
use tonic::Code;

/// Every call of the test ends within this, or the test fails.
const BOUND: Duration = Duration::from_secs(30);

fn spec() -> pb::JobSpec {
    pb::JobSpec {
        params: vec![
            pb::ParamSpec {
                name: "w".into(),
                shape: vec![4, 8],
            },
            pb::ParamSpec {
                name: "b".into(),
                shape: vec![8],
            },
        ],
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(0.1),
                momentum: Some(0.9),
                ..Default::default()
            }),
        }),
        workers: 2,
        ..Default::default()
    }
}

fn grads(round: u64, worker: u32) -> Vec<Vec<f32>> {
    let g = |n: usize| {
        (0..n)
            .map(|i| (i as f32 + 1.0) * (round as f32 + 1.0) * (worker as f32 + 0.5))
            .collect()
    };
    vec![g(32), g(8)]
}

async fn push(c: &mut Client, round: u64, worker: u32) -> Result<pb::PushResponse, ClientError> {
    let g = grads(round, worker);
    let named = [("w", g[0].as_slice()), ("b", g[1].as_slice())];
    tokio::time::timeout(BOUND, c.push("run", worker, round, &named))
        .await
        .expect("push ends")
}

/// Short deadlines, so that the test sees them expire.
fn flags() -> Vec<String> {
    [
        "--chunk-bytes",
        "16",
        "--round-timeout",
        "1",
        "--peer-timeout",
        "2",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The parameters shard `port` holds, pulled from it directly.
async fn shard_params(
    port: u16,
    round: u64,
    timeout: Duration,
) -> Result<Vec<pb::Segment>, tonic::Status> {
    let mut c = ParamServerClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let mut req = tonic::Request::new(pb::PullRequest {
        dtype: 0,
        job: "run".into(),
        round,
        params: vec![],
    });
    req.set_timeout(timeout);
    let mut stream = c.pull(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.extend(m.params);
    }
    out.sort_by(|a, b| (&a.param, a.offset).cmp(&(&b.param, b.offset)));
    Ok(out)
}

fn expect_shard_2(err: &ClientError, codes: &[Code]) {
    match err {
        ClientError::Shard { shard, status, .. } => {
            assert_eq!(*shard, 2, "{err}");
            assert!(codes.contains(&status.code()), "{err}");
        }
        other => panic!("expected an error of shard 2, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_shard_fails_calls_fast_and_no_shard_applies_the_undecided_round() {
    let ports = reserve_ports(3);
    let d0 = start_shard(0, &ports, &flags()).await;
    let d1 = start_shard(1, &ports, &flags()).await;
    let d2 = start_shard(2, &ports, &flags()).await;

    let url = format!("http://127.0.0.1:{}", ports[0]);
    let mut c = Client::connect(&url).await.expect("connect");
    c.timeout = Duration::from_secs(5);
    c.init("run", spec(), &[("w", &[0.5; 32]), ("b", &[-0.5; 8])])
        .await
        .expect("init");
    for round in 0..2 {
        push(&mut c, round, 0).await.expect("push 0");
        push(&mut c, round, 1).await.expect("push 1");
        c.pull("run", round + 1).await.expect("round complete");
    }
    let before = [
        shard_params(ports[0], 2, BOUND).await.expect("shard 0"),
        shard_params(ports[1], 2, BOUND).await.expect("shard 1"),
    ];
    assert!(
        !before[0].is_empty() && !before[1].is_empty(),
        "both shards hold chunks"
    );

    let mut d2 = d2;
    d2.child.kill().await.expect("kill -9 shard 2");

    // Both workers' pushes fail within their deadline, naming shard 2.
    for worker in 0..2 {
        let started = Instant::now();
        let err = push(&mut c, 2, worker).await.expect_err("shard 2 is down");
        expect_shard_2(&err, &[Code::Unavailable, Code::DeadlineExceeded]);
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "took {:?}",
            started.elapsed()
        );
    }
    let err = tokio::time::timeout(BOUND, c.pull("run", 3))
        .await
        .expect("pull ends")
        .expect_err("down");
    expect_shard_2(&err, &[Code::Unavailable, Code::DeadlineExceeded]);

    // Shards 0 and 1 have every push of round 2, but the round cannot be
    // decided: a pull of round 3 outlasting the coordinator's round timeout
    // still finds it not applied, and the parameters are as before.
    for port in &ports[..2] {
        let err = shard_params(*port, 3, Duration::from_secs(3))
            .await
            .expect_err("round 3 not applied");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    }
    assert_eq!(
        shard_params(ports[0], 2, BOUND).await.expect("shard 0"),
        before[0]
    );
    assert_eq!(
        shard_params(ports[1], 2, BOUND).await.expect("shard 1"),
        before[1]
    );

    let status = tokio::time::timeout(BOUND, c.status(Some("run")))
        .await
        .expect("status ends")
        .expect("status");
    let shards = &status.jobs[0].shards;
    assert_eq!(shards.len(), 3);
    assert!(shards[0].up && shards[1].up && !shards[2].up, "{shards:?}");
    assert!(shards[2].error.contains("shard 2"), "{:?}", shards[2].error);
    assert_eq!(
        (shards[0].round, shards[1].round),
        (2, 2),
        "nothing applied"
    );
    assert_eq!(
        status.jobs[0].workers_pushed, 2,
        "shard 0 has both pushes of round 2"
    );

    // Shard 2 comes back without the job (no checkpoints yet): its part of
    // round 2 can never arrive, so the round completes nowhere.
    let d2 = start_shard(2, &ports, &flags()).await;
    let err = push(&mut c, 2, 0)
        .await
        .expect_err("the job is gone on shard 2");
    expect_shard_2(&err, &[Code::NotFound]);
    let status = tokio::time::timeout(BOUND, c.status(Some("run")))
        .await
        .expect("status ends")
        .expect("status");
    let shards = &status.jobs[0].shards;
    assert!(
        !shards[2].up && shards[2].error.contains("does not exist"),
        "{shards:?}"
    );
    assert_eq!((shards[0].round, shards[1].round), (2, 2));

    for d in [d0, d1, d2] {
        assert_eq!(d.terminate().await.expect("terminate").code(), Some(0));
    }
}
