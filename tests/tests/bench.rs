//! `paramctl bench` runs real rounds and reports what it measured.

use paramd_client::bench::{BenchOptions, raw_tcp, run};
use paramd_tests::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_rounds_and_reports_sizes() {
    let server = TestServer::start().await;
    let opts = BenchOptions {
        credentials: Default::default(),
        server: server.url(),
        workers: 2,
        params: 10_000,
        tensors: 7,
        optimizer: "adamw".into(),
        clip: Some(1.0),
        schedule: Some((1, 10)),
        rounds: 3,
    };
    let r = run(&opts).await.expect("bench");
    assert!(r.rounds_per_s > 0.0 && r.round_seconds_p50 > 0.0);
    assert!(r.round_seconds_p99 >= r.round_seconds_p50);
    assert!(r.push_gbps > 0.0 && r.pull_gbps > 0.0);
    // AdamW: parameters, two moments and one gradient buffer.
    assert_eq!(r.model_bytes, 10_000 * 4 * 4);
    assert!(r.server_peak_rss_bytes > r.model_bytes, "{r:?}");
    let mut c = server.client().await;
    assert!(
        c.status(None).await.expect("status").jobs.is_empty(),
        "the bench job is deleted"
    );

    let bad = BenchOptions {
        optimizer: "lion".into(),
        ..opts
    };
    assert!(
        run(&bad)
            .await
            .expect_err("unknown optimizer")
            .to_string()
            .contains("lion")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn raw_tcp_moves_bytes() {
    assert!(raw_tcp(1 << 20, 3).await.expect("tcp") > 0.0);
}
