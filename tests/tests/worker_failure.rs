//! Workers that fail: a round stops waiting for a worker after the job's
//! worker timeout and the worker rejoins; with backup workers no round
//! waits for the slowest, whose late push is stale. On one shard and on a
//! cluster of three real processes, where the coordinator chooses each
//! round's workers for every shard.

use std::time::{Duration, Instant};

use paramd_client::{Client, Pulled, v1 as pb};
use paramd_tests::{TestServer, http_get, metric, one_param_spec, reserve_ports, start_cluster};
use tonic::Code;

fn spec(workers: u32, timeout: Option<f64>, backup: u32) -> pb::JobSpec {
    pb::JobSpec {
        worker_timeout_seconds: timeout,
        backup_workers: backup,
        ..one_param_spec(pb::OptimizerKind::Sgd, &[3], workers, 1.0)
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

/// Flags of a three-shard cluster whose job's 12 elements are cut into
/// three chunks of 4, one on each shard.
fn cluster_flags() -> Vec<String> {
    ["--chunk-bytes", "16"].map(str::to_owned).to_vec()
}

fn spec12(workers: u32, timeout: Option<f64>, backup: u32) -> pb::JobSpec {
    let mut s = spec(workers, timeout, backup);
    s.params[0].shape = vec![12];
    s.optimizer = Some(pb::Optimizer {
        kind: pb::OptimizerKind::Adam as i32,
        hyper: Some(pb::Hyperparameters {
            lr: Some(0.1),
            ..Default::default()
        }),
    });
    s
}

/// Worker w's gradient of round t: values that do not divide evenly, so
/// the order of the sum shows in the bits.
fn grad12(w: u32, t: u64) -> Vec<f32> {
    (0..12)
        .map(|i| ((i * 7 + w as usize * 3 + t as usize * 5) % 11) as f32 * 0.37 - 1.3)
        .collect()
}

async fn push12(
    c: &mut Client,
    job: &str,
    w: u32,
    t: u64,
) -> Result<pb::PushResponse, paramd_client::ClientError> {
    c.push(job, w, t, &[("w", &grad12(w, t))]).await
}

fn bits(p: &Pulled) -> Vec<u32> {
    p.params["w"].iter().map(|x| x.to_bits()).collect()
}

/// Round 0 without worker 3 (silent past the timeout), then rounds 1 and
/// 2 with everyone; returns the parameters after each round.
async fn silent_worker_run(c: &mut Client) -> Vec<Pulled> {
    c.timeout = Duration::from_secs(20);
    c.init("timeout", spec12(4, Some(1.0), 0), &[("w", &[0.5; 12])])
        .await
        .expect("init");
    let started = Instant::now();
    for w in 0..3 {
        push12(c, "timeout", w, 0).await.expect("push");
    }
    let mut after = vec![
        c.pull("timeout", 1)
            .await
            .expect("round 0 completes after the timeout"),
    ];
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "round 0 completed after {:?}, before the worker timeout",
        started.elapsed()
    );
    // Worker 3 comes back: its push of round 0 is stale on every shard;
    // it pulls the current round and goes on with the others.
    let err = push12(c, "timeout", 3, 0)
        .await
        .expect_err("round 0 is over");
    let status = err.status().expect("a status");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("stale"), "{}", status.message());
    let current = c.pull("timeout", 0).await.expect("pull the current round");
    assert_eq!(current.round, 1);
    for t in 1..3 {
        for w in 0..4 {
            push12(c, "timeout", w, t).await.expect("push");
        }
        after.push(c.pull("timeout", t + 1).await.expect("round completes"));
    }
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_shards_a_silent_worker_is_dropped_after_the_timeout_and_rejoins() {
    let ports = reserve_ports(3);
    let daemons = start_cluster(&ports, |_| cluster_flags()).await;
    let mut c = Client::connect(&format!("http://127.0.0.1:{}", ports[0]))
        .await
        .expect("connect");
    let on_three = silent_worker_run(&mut c).await;
    let s = c.status(Some("timeout")).await.expect("status");
    assert!(
        s.jobs[0]
            .shards
            .iter()
            .all(|x| x.chunks == 1 && x.round == 3),
        "every shard holds a chunk and applied every round: {:?}",
        s.jobs[0].shards
    );
    let (_, body) = http_get(daemons[0].http_addr(), "/metrics")
        .await
        .expect("metrics");
    assert_eq!(
        metric(&body, "paramd_workers_dropped_total", &[("job", "timeout")]),
        Some(1.0),
        "the coordinator counts worker 3 dropped once"
    );

    // The same run on one shard: the same members give the same bits.
    let one = TestServer::with_config(paramd::NodeConfig {
        chunk_bytes: 16,
        ..Default::default()
    })
    .await;
    let mut c1 = one.client().await;
    let on_one = silent_worker_run(&mut c1).await;
    for (t, (a, b)) in on_three.iter().zip(&on_one).enumerate() {
        assert_eq!(bits(a), bits(b), "round {t}: 3 shards and 1 bit-identical");
    }
    let mean: Vec<f32> = (0..12)
        .map(|i| (grad12(0, 0)[i] + grad12(1, 0)[i] + grad12(2, 0)[i]) / 3.0)
        .collect();
    // Adam's first step is lr * sign(mean gradient): the mean over
    // workers 0, 1 and 2, not over four.
    for (i, (p, g)) in on_one[0].params["w"].iter().zip(&mean).enumerate() {
        if g.abs() > 1e-3 {
            assert!(
                (0.5 - 0.1 * g.signum() - p).abs() < 1e-5,
                "element {i}: {p} after a mean of {g}"
            );
        }
    }
    one.shutdown().await;
    for d in daemons {
        assert_eq!(d.terminate().await.expect("terminate").code(), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_shards_backup_workers_do_not_wait_for_the_slowest() {
    let ports = reserve_ports(3);
    let daemons = start_cluster(&ports, |_| cluster_flags()).await;
    let mut c = Client::connect(&format!("http://127.0.0.1:{}", ports[0]))
        .await
        .expect("connect");
    c.timeout = Duration::from_secs(20);
    // A worker timeout far beyond the test: only the backup-worker rule
    // can complete a round.
    let mut sgd = spec(4, Some(600.0), 1);
    sgd.params[0].shape = vec![12];
    c.init("backup", sgd, &[("w", &[0.5; 12])])
        .await
        .expect("init");
    let mut want = vec![0.5f32; 12];
    for round in 0..4u64 {
        let slow = (round % 4) as u32;
        for w in (0..4).filter(|&w| w != slow) {
            push12(&mut c, "backup", w, round).await.expect("push");
        }
        let p = tokio::time::timeout(Duration::from_secs(10), c.pull("backup", round + 1))
            .await
            .expect("the round does not wait for the slowest worker")
            .expect("pull");
        // SGD with lr 1: minus the mean over the three who pushed.
        let members: Vec<u32> = (0..4).filter(|&w| w != slow).collect();
        for (i, x) in want.iter_mut().enumerate() {
            *x -= members.iter().map(|&w| grad12(w, round)[i]).sum::<f32>() / 3.0;
        }
        for (i, (&got, &w)) in p.params["w"].iter().zip(&want).enumerate() {
            assert!(
                (got - w).abs() < 1e-4,
                "round {round} element {i}: {got} vs {w}"
            );
        }
        let err = push12(&mut c, "backup", slow, round)
            .await
            .expect_err("late");
        let status = err.status().expect("status");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("stale"), "{}", status.message());
    }
    let (_, body) = http_get(daemons[0].http_addr(), "/metrics")
        .await
        .expect("metrics");
    assert_eq!(
        metric(&body, "paramd_stale_pushes_total", &[("job", "backup")]),
        Some(4.0),
        "shard 0 refused each late push once"
    );
    assert_eq!(
        metric(&body, "paramd_workers_dropped_total", &[("job", "backup")]).unwrap_or(0.0),
        0.0,
        "backup workers are not dropped workers"
    );
    for d in daemons {
        assert_eq!(d.terminate().await.expect("terminate").code(), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_shards_a_push_that_reached_some_shards_only_is_dropped_on_all() {
    use paramd_proto::v1::param_server_client::ParamServerClient;
    let ports = reserve_ports(3);
    let daemons = start_cluster(&ports, |_| cluster_flags()).await;
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let mut c = Client::connect(&url).await.expect("connect");
    c.timeout = Duration::from_secs(20);
    c.init("partial", spec12(4, Some(1.0), 0), &[("w", &[0.5; 12])])
        .await
        .expect("init");
    // Worker 3's push of round 0 reaches shard 0 only, as if its calls to
    // the other shards had failed.
    let mut raw = ParamServerClient::connect(url.clone())
        .await
        .expect("connect");
    let layout = raw
        .layout(pb::LayoutRequest {
            job: "partial".into(),
        })
        .await
        .expect("layout")
        .into_inner();
    assert_eq!(layout.chunk_elems, 4);
    let g3 = grad12(3, 0);
    let part: Vec<pb::Segment> = layout
        .owners
        .iter()
        .enumerate()
        .filter(|&(_, &owner)| owner == 0)
        .map(|(i, _)| pb::Segment {
            dtype: 0,
            param: "w".into(),
            offset: (i * 4) as u64,
            data: paramd_client::to_le_bytes(&g3[i * 4..i * 4 + 4]),
        })
        .collect();
    assert!(!part.is_empty(), "shard 0 holds a chunk: {layout:?}");
    let req = futures::stream::iter(vec![pb::PushRequest {
        lease: 0,
        weight: 0.0,
        job: "partial".into(),
        worker: 3,
        round: 0,
        grads: part,
        no_grad: Vec::new(),
    }]);
    raw.push(req).await.expect("shard 0 takes worker 3's part");
    for w in 0..3 {
        push12(&mut c, "partial", w, 0).await.expect("push");
    }
    // After the timeout the round completes on every shard with workers 0,
    // 1 and 2: worker 3's part on shard 0 is left out of the mean.
    let got = c.pull("partial", 1).await.expect("round 0 completes");
    let err = push12(&mut c, "partial", 3, 0)
        .await
        .expect_err("worker 3 is out of round 0");
    assert_eq!(
        err.status().map(tonic::Status::code),
        Some(Code::FailedPrecondition),
        "{err}"
    );

    // The same round on one shard, where worker 3 never pushed.
    let one = TestServer::with_config(paramd::NodeConfig {
        chunk_bytes: 16,
        ..Default::default()
    })
    .await;
    let mut c1 = one.client().await;
    c1.timeout = Duration::from_secs(20);
    c1.init("partial", spec12(4, Some(1.0), 0), &[("w", &[0.5; 12])])
        .await
        .expect("init");
    for w in 0..3 {
        push12(&mut c1, "partial", w, 0).await.expect("push");
    }
    let want = c1.pull("partial", 1).await.expect("round 0 completes");
    assert_eq!(
        bits(&got),
        bits(&want),
        "every shard averaged over workers 0, 1 and 2 only"
    );
    one.shutdown().await;
    for d in daemons {
        assert_eq!(d.terminate().await.expect("terminate").code(), Some(0));
    }
}
