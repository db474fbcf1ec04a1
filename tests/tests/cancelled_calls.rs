//! A call its client gives up on leaves nothing behind: a Checkpoint whose
//! deadline passes while a shard is slow to write its file still ends on
//! the server, and the coordinator, frozen for it, decides rounds again; a
//! push, an Init or a pull cut at its await points holds no slot, no
//! admission and no half-made job, and training goes on.

use std::time::Duration;

use paramd_client::Client;
use paramd_client::v1 as pb;
use paramd_tests::{one_param_spec, reserve_ports, signal, start_cluster};

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_checkpoint_does_not_freeze_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(2);
    let shards = start_cluster(&ports, |i| {
        vec![
            "--checkpoint-dir".to_owned(),
            dir.path().join(format!("shard{i}")).display().to_string(),
            "--chunk-bytes".to_owned(),
            "16".to_owned(),
        ]
    })
    .await;
    let mut c = Client::connect(&format!("http://127.0.0.1:{}", ports[0]))
        .await
        .expect("connect");
    c.timeout = Duration::from_secs(30);
    let spec = one_param_spec(pb::OptimizerKind::Sgd, &[8], 1, 0.5);
    c.init("run", spec, &[("w", &[1.0; 8])])
        .await
        .expect("init");
    c.push("run", 0, 0, &[("w", &[1.0; 8])])
        .await
        .expect("push 0");
    c.pull("run", 1).await.expect("round 0 completes");

    // Shard 1 stops answering: a checkpoint waits for its file, and the
    // client stops waiting for the checkpoint.
    let stopped = shards[1].child.id().expect("shard 1 runs");
    signal(stopped, "-STOP");
    let mut impatient = c.clone();
    impatient.timeout = Duration::from_millis(500);
    let err = impatient
        .checkpoint(Some("run"))
        .await
        .expect_err("the checkpoint cannot finish while shard 1 is stopped");
    assert_eq!(
        err.status().map(tonic::Status::code),
        Some(tonic::Code::DeadlineExceeded),
        "{err}"
    );
    signal(stopped, "-CONT");

    // The checkpoint ends on the server and lifts its freeze: round 1 is
    // decided (before the fix, no round was decided again until restart).
    c.push("run", 0, 1, &[("w", &[1.0; 8])])
        .await
        .expect("push 1");
    let pulled = c.pull("run", 2).await.expect("round 1 completes");
    assert_eq!(pulled.round, 2);
    assert_eq!(pulled.params["w"], vec![0.0; 8], "1 - 2 x 0.5 x 1");
}

/// A raw ParamServer client of `url`.
async fn raw(url: &str) -> pb::param_server_client::ParamServerClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    pb::param_server_client::ParamServerClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Starts a client stream of `first` on `call` and cuts it (the client
/// goes away mid-stream) once the transport has taken `first`.
async fn cut_stream<M, R, F, Fut>(first: M, call: F)
where
    M: Clone + Send + 'static,
    R: Send + 'static,
    F: FnOnce(tokio_stream::wrappers::ReceiverStream<M>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<R, tonic::Status>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<M>(1);
    let task = tokio::spawn(call(tokio_stream::wrappers::ReceiverStream::new(rx)));
    tx.send(first.clone()).await.expect("first message");
    // The channel holds one message: this second one is queued once the
    // transport has taken the first, so the call is on the wire. (Had the
    // server not read it yet, it sees the cut first: the checks after hold
    // both ways.)
    tx.send(first).await.expect("second message");
    task.abort();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_pushes_inits_and_pulls_leave_training_going() {
    let server = paramd_tests::TestServer::start().await;
    let url = server.url();
    let mut c = server.client().await;
    c.timeout = Duration::from_secs(30);
    let spec = one_param_spec(pb::OptimizerKind::Adam, &[1024], 2, 0.1);
    c.init("run", spec.clone(), &[("w", &[1.0; 1024])])
        .await
        .expect("init");

    // A push cut after its header: the worker's slot is free again and its
    // push of the same round counts once.
    let header = pb::PushRequest {
        lease: 0,
        weight: 0.0,
        job: "run".into(),
        worker: 0,
        round: 0,
        grads: Vec::new(),
        no_grad: Vec::new(),
    };
    let mut r = raw(&url).await;
    cut_stream(header, move |s| async move { r.push(s).await }).await;
    let pushed = c
        .push("run", 0, 0, &[("w", &[0.5; 1024])])
        .await
        .expect("the same worker pushes again");
    assert_eq!(pushed.pushed, 1, "{pushed:?}");

    // An Init cut after its first message: no half-made job, nothing held
    // of its admission, and the same Init succeeds after.
    let first = pb::InitRequest {
        job: "other".into(),
        spec: Some(one_param_spec(pb::OptimizerKind::Sgd, &[1 << 20], 1, 0.1)),
        values: Vec::new(),
    };
    let mut r = raw(&url).await;
    cut_stream(first, move |s| async move { r.init(s).await }).await;
    let e = c.status(Some("other")).await.expect_err("no job 'other'");
    assert_eq!(e.reason(), Some("unknown_job"), "{e}");
    c.init(
        "other",
        one_param_spec(pb::OptimizerKind::Sgd, &[1 << 20], 1, 0.1),
        &[("w", &vec![0.0; 1 << 20])],
    )
    .await
    .expect("init after a cut one");

    // A pull that gives up waiting for its round, and one dropped mid-way.
    let mut impatient = c.clone();
    impatient.retries = Some(0);
    impatient.timeout = Duration::from_millis(200);
    let e = impatient
        .pull("run", 1)
        .await
        .expect_err("round 1 is not complete");
    assert_eq!(
        e.status().map(tonic::Status::code),
        Some(tonic::Code::DeadlineExceeded),
        "{e}"
    );
    let mut r = raw(&url).await;
    let mut stream = r
        .pull(pb::PullRequest {
            dtype: 0,
            job: "other".into(),
            round: 0,
            params: Vec::new(),
        })
        .await
        .expect("pull")
        .into_inner();
    stream.message().await.expect("a first message");
    drop(stream);

    // The round completes with both workers and both jobs still serve.
    c.push("run", 1, 0, &[("w", &[0.5; 1024])])
        .await
        .expect("push of worker 1");
    let pulled = c.pull("run", 1).await.expect("round 0 completes");
    assert_eq!(pulled.round, 1);
    assert_eq!(c.pull("other", 0).await.expect("pull").round, 0);
    server.shutdown().await;
}
