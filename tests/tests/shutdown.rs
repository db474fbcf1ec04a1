//! Shutdown of a real `paramd`: SIGTERM while a client holds an idle push
//! stream and a waiting pull exits 0 within the grace period, after the
//! final checkpoint; a second signal exits at once.

use std::time::{Duration, Instant};

use paramd_client::{Client, v1 as pb};
use paramd_tests::{Daemon, one_param_spec, reserve_ports, signal};

fn spec(workers: u32) -> pb::JobSpec {
    one_param_spec(pb::OptimizerKind::Adamw, &[3], workers, 0.1)
}

const GRACE: f64 = 2.0;

async fn daemon(ckpt: &std::path::Path) -> (Daemon, String) {
    let port = reserve_ports(1)[0];
    let args = [
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--checkpoint-dir".into(),
        ckpt.display().to_string(),
        "--shutdown-grace".into(),
        GRACE.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&args).await.expect("paramd starts");
    (d, format!("http://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_idle_streams_exits_0_within_grace_after_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, url) = daemon(dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    c.init("run", spec(2), &[("w", &[1.0, 2.0, 3.0])])
        .await
        .expect("init");
    for w in 0..2 {
        c.push("run", w, 0, &[("w", &[0.5, -0.5, 1.0])])
            .await
            .expect("push");
    }
    let done = c.pull("run", 1).await.expect("round 0 completes");

    // An idle client stream: worker 0's push of round 1 has sent its first
    // message and never ends. And a pull waiting for a round far ahead.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PushRequest>(1);
    let header = pb::PushRequest {
        lease: 0,
        weight: 0.0,
        job: "run".into(),
        worker: 0,
        round: 1,
        grads: Vec::new(),
        no_grad: Vec::new(),
    };
    tx.send(header.clone()).await.expect("queue");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut raw = pb::param_server_client::ParamServerClient::new(channel);
    let idle_push = tokio::spawn(async move {
        raw.push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // The channel holds one message: this second one is queued once the
    // transport has taken the first, so the push is on the wire.
    tx.send(header.clone()).await.expect("queue");
    let mut waiting = c.clone();
    // Not tried again once the server is gone (the client's default is
    // to retry UNAVAILABLE until its deadline): the cut itself is checked.
    waiting.retries = Some(0);
    let waiting_pull = tokio::spawn(async move { waiting.pull("run", 50).await });
    // The pull shares the status call's connection and was sent first.
    // (Had either call not reached the server yet, it would be refused at
    // shutdown instead of cut: the assertions below hold both ways.)
    tokio::task::yield_now().await;
    c.status(Some("run")).await.expect("status");

    let pid = d.child.id().expect("running");
    let started = Instant::now();
    signal(pid, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs_f64(GRACE + 15.0), d.child.wait())
        .await
        .expect("paramd exits after SIGTERM")
        .expect("exit status");
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    // One deadline covers the final checkpoint and the drain.
    assert!(
        took < Duration::from_secs_f64(GRACE + 1.0),
        "took {took:?} with a grace of {GRACE}s"
    );
    drop(tx);
    // The open calls ended with an error, not a hang.
    let push = tokio::time::timeout(Duration::from_secs(10), idle_push)
        .await
        .expect("the idle push ends")
        .expect("join");
    assert!(push.is_err(), "{push:?}");
    let pull = tokio::time::timeout(Duration::from_secs(10), waiting_pull)
        .await
        .expect("the waiting pull ends")
        .expect("join");
    assert!(pull.is_err(), "{pull:?}");

    // The final checkpoint holds round 1: a restart serves it.
    let (d2, url2) = daemon(dir.path()).await;
    let mut c2 = Client::connect(&url2).await.expect("connect");
    let restored = c2.pull("run", 1).await.expect("restored");
    assert_eq!(restored.round, 1);
    assert_eq!(restored.params["w"], done.params["w"]);
    drop(d2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let port = reserve_ports(1)[0];
    // A long grace, and a pull that would hold the server for all of it.
    let args = [
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--shutdown-grace".into(),
        "120".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start(&args).await.expect("paramd starts");
    let url = format!("http://127.0.0.1:{port}");
    let mut c = Client::connect(&url).await.expect("connect");
    c.init("run", spec(2), &[("w", &[1.0, 2.0, 3.0])])
        .await
        .expect("init");
    let mut waiting = c.clone();
    let _pull = tokio::spawn(async move { waiting.pull("run", 50).await });
    c.status(Some("run")).await.expect("status");

    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch health")
        .into_inner();
    let serving = health.message().await.expect("health").expect("a status");
    assert_eq!(serving.status, 1, "SERVING before the signal");
    let pid = d.child.id().expect("running");
    signal(pid, "-TERM");
    // The first signal has been handled once health turns NOT_SERVING (or
    // the stream is cut as the server stops).
    let next = tokio::time::timeout(Duration::from_secs(10), health.message())
        .await
        .expect("health changes after SIGTERM");
    assert!(
        matches!(&next, Ok(Some(s)) if s.status == 2) || next.is_err() || matches!(next, Ok(None)),
        "{next:?}"
    );
    let started = Instant::now();
    signal(pid, "-INT");
    let status = tokio::time::timeout(Duration::from_secs(10), d.child.wait())
        .await
        .expect("paramd exits at the second signal")
        .expect("exit status");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_ne!(status.code(), Some(0), "a forced exit is not a clean one");
}
