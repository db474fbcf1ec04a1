//! A deleted job is gone: a push admitted before the delete is refused
//! NOT_FOUND rather than acknowledged, and its checkpoints are moved aside
//! so that a restart does not bring it back and a job re-created under its
//! name starts afresh.

use paramd_client::Client;
use paramd_client::v1 as pb;
use paramd_tests::{Daemon, TestServer, one_param_spec, reserve_ports};
use tonic::Code;

fn spec(workers: u32) -> pb::JobSpec {
    one_param_spec(pb::OptimizerKind::Sgd, &[3], workers, 0.5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_admitted_before_the_delete_is_refused_not_acknowledged() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.init("run", spec(2), &[("w", &[1.0; 3])])
        .await
        .expect("init");
    // The header is sent and admitted; the payload follows the delete.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PushRequest>(4);
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut raw = pb::param_server_client::ParamServerClient::new(channel);
    let push = tokio::spawn(async move {
        raw.push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let header = pb::PushRequest {
        lease: 0,
        weight: 0.0,
        job: "run".into(),
        worker: 0,
        round: 0,
        grads: Vec::new(),
        no_grad: Vec::new(),
    };
    tx.send(header).await.expect("header");
    c.delete_job("run").await.expect("delete");
    let payload = pb::PushRequest {
        grads: vec![pb::Segment {
            dtype: 0,
            param: "w".into(),
            offset: 0,
            data: paramd_client::to_le_bytes(&[1.0; 3]),
        }],
        ..Default::default()
    };
    // The server may have refused the stream already: then this send fails.
    let _ = tx.send(payload).await;
    drop(tx);
    let status = push
        .await
        .expect("join")
        .expect_err("a push into a deleted job is not acknowledged");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let e = c.status(Some("run")).await.expect_err("gone");
    assert_eq!(e.status().map(tonic::Status::code), Some(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_job_does_not_come_back_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = reserve_ports(1)[0];
    let url = format!("http://127.0.0.1:{port}");
    let args = [
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--checkpoint-dir".to_owned(),
        dir.path().display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&args).await.expect("paramd starts");
    let mut c = Client::connect(&url).await.expect("connect");
    c.init("run", spec(1), &[("w", &[1.0; 3])])
        .await
        .expect("init");
    c.push("run", 0, 0, &[("w", &[1.0; 3])])
        .await
        .expect("push");
    c.pull("run", 1).await.expect("round 0");
    c.checkpoint(Some("run")).await.expect("checkpoint");
    c.delete_job("run").await.expect("delete");
    d.terminate().await.expect("stops");

    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("checkpoint dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.len() == 1 && names[0].starts_with("run@deleted-"),
        "the deleted job's checkpoints are moved aside: {names:?}"
    );

    let _d = Daemon::start(&args).await.expect("paramd restarts");
    let mut c = Client::connect(&url).await.expect("connect");
    let e = c.status(Some("run")).await.expect_err("not restored");
    assert_eq!(e.status().map(tonic::Status::code), Some(Code::NotFound));
    // Re-created under the same name, it starts from its new values.
    let created = c
        .init("run", spec(1), &[("w", &[7.0; 3])])
        .await
        .expect("init");
    assert!(created.created && created.round == 0);
    assert_eq!(
        c.pull("run", 0).await.expect("pull").params["w"],
        vec![7.0; 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_jobs_series_leave_the_scrape() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let names: Vec<String> = (0..40).map(|i| format!("churn-{i}")).collect();
    for name in &names {
        c.init(name, spec(1), &[("w", &[1.0; 3])])
            .await
            .expect("init");
        c.push(name, 0, 0, &[("w", &[0.5; 3])]).await.expect("push");
        c.pull(name, 1).await.expect("pull");
    }
    let series = |body: &str| {
        body.lines()
            .filter(|l| !l.starts_with('#') && l.contains("job=\"churn-"))
            .count()
    };
    let (_, before) = paramd_tests::http_get(server.http, "/metrics")
        .await
        .expect("metrics");
    assert!(series(&before) >= 40 * 20, "{} series", series(&before));
    for name in &names {
        c.delete_job(name).await.expect("delete");
    }
    let (_, after) = paramd_tests::http_get(server.http, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(series(&after), 0, "a deleted job's series remain");
    // A job re-created under a deleted one's name starts its series afresh.
    c.init("churn-0", spec(1), &[("w", &[1.0; 3])])
        .await
        .expect("init");
    let (_, again) = paramd_tests::http_get(server.http, "/metrics")
        .await
        .expect("metrics");
    let round = paramd_tests::metric(&again, "paramd_round", &[("job", "churn-0")]);
    assert_eq!(round, Some(0.0));
    let pushes = paramd_tests::metric(&again, "paramd_pushes_total", &[("job", "churn-0")]);
    assert!(pushes.is_none_or(|p| p == 0.0), "{pushes:?}");
    server.shutdown().await;
}
