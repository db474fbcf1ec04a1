//! A call its client gives up on leaves nothing behind: a Checkpoint whose
//! deadline passes while a shard is slow to write its file still ends on
//! the server, and the coordinator, frozen for it, decides rounds again.

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
