//! A round a shard cannot complete is never silent: while its coordinator
//! is gone, the shard's status says why, a failure counter grows and a pull
//! that times out names the reason; once the coordinator is back (restored
//! from its checkpoint) the same round completes without restarting the
//! shard.

use std::time::Duration;

use paramd_client::Client;
use paramd_client::v1 as pb;
use paramd_tests::{http_get, metric, one_param_spec, reserve_ports, start_shard};
use tonic::Code;

fn flags(dir: &std::path::Path, i: usize) -> Vec<String> {
    [
        "--chunk-bytes",
        "16",
        "--peer-timeout",
        "1",
        "--max-pull-wait",
        "2",
        "--checkpoint-dir",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([dir.join(format!("shard{i}")).display().to_string()])
    .collect()
}

/// This shard's own account of job `job`.
async fn own_info(c: &mut Client, job: &str) -> pb::ShardInfo {
    let s = c.status(Some(job)).await.expect("status");
    s.jobs[0].shards[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_cannot_complete_says_why_and_completes_once_it_can() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(2);
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut d0 = start_shard(0, &ports, &flags(dir.path(), 0)).await;
    let d1 = start_shard(1, &ports, &flags(dir.path(), 1)).await;
    let mut c = Client::connect(&urls[0]).await.expect("connect");
    c.timeout = Duration::from_secs(10);
    let spec = one_param_spec(pb::OptimizerKind::Sgd, &[8], 1, 0.5);
    c.init("run", spec, &[("w", &[1.0; 8])])
        .await
        .expect("init");
    c.push("run", 0, 0, &[("w", &[1.0; 8])])
        .await
        .expect("push 0");
    c.pull("run", 1).await.expect("pull 1");
    c.checkpoint(Some("run"))
        .await
        .expect("checkpoint of round 1");

    // The coordinator dies; the worker's push of round 1 reaches shard 1
    // only.
    d0.child.kill().await.expect("kill -9 the coordinator");
    let mut once = c.clone();
    once.retries = Some(0);
    once.timeout = Duration::from_secs(2);
    once.push("run", 0, 1, &[("w", &[0.5; 8])])
        .await
        .expect_err("the coordinator is down");

    // Shard 1 says why its round does not complete...
    let mut c1 = Client::connect(&urls[1]).await.expect("connect shard 1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = own_info(&mut c1, "run").await;
        if !info.error.is_empty() {
            break info;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shard 1 never says why round 1 does not complete: {info:?}"
        );
        // Pacing the polls of another process's state.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        info.error.contains("round 1") && info.error.contains("coordinator"),
        "{info:?}"
    );
    // ...counts it...
    let (_, body) = http_get(d1.http_addr(), "/metrics").await.expect("metrics");
    let failures = metric(&body, "paramd_round_failures_total", &[("job", "run")]);
    assert!(failures.is_some_and(|f| f >= 1.0), "{failures:?}");
    // ...and a pull that times out there names the reason.
    let channel = tonic::transport::Endpoint::from_shared(urls[1].clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut raw = pb::param_server_client::ParamServerClient::new(channel);
    let status = raw
        .pull(pb::PullRequest {
            dtype: 0,
            job: "run".into(),
            round: 2,
            params: Vec::new(),
        })
        .await
        .expect_err("round 2 cannot be reached");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("cannot complete it"),
        "{status:?}"
    );

    // The coordinator comes back from its checkpoint; the worker pushes
    // round 1 again and the same shard 1 completes it.
    let _d0 = start_shard(0, &ports, &flags(dir.path(), 0)).await;
    let mut c = Client::connect(&urls[0]).await.expect("connect");
    c.timeout = Duration::from_secs(20);
    assert_eq!(paramd_tests::wait_serving(&mut c, "run").await.round, 1);
    c.push("run", 0, 1, &[("w", &[0.5; 8])])
        .await
        .expect("push 1");
    let pulled = c.pull("run", 2).await.expect("pull 2");
    // SGD, lr 0.5: 1 - 0.5 * 1 - 0.5 * 0.5.
    assert_eq!(pulled.params["w"], vec![0.25; 8]);
    let info = own_info(&mut c1, "run").await;
    assert_eq!((info.round, info.error.as_str()), (2, ""), "{info:?}");
}
