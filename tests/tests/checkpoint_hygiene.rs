//! Checkpoints under hostile or unlucky conditions: concurrent requests of
//! one job share one checkpoint, a manifest that claims an absurd cluster
//! is set aside at start instead of hanging it, and a checkpoint directory
//! that cannot be written stops the daemon at start, naming it.

use paramd_client::Client;
use paramd_client::v1 as pb;
use paramd_tests::{Daemon, binary, one_param_spec, reserve_ports};

fn args(port: u16, dir: &std::path::Path) -> Vec<String> {
    vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--checkpoint-dir".to_owned(),
        dir.display().to_string(),
    ]
}

async fn start(port: u16, dir: &std::path::Path) -> Daemon {
    let args = args(port, dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&args).await.expect("paramd starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkpoints_of_a_job_share_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = reserve_ports(1)[0];
    let _d = start(port, dir.path()).await;
    let mut c = Client::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let spec = one_param_spec(pb::OptimizerKind::Adam, &[1 << 16], 1, 0.1);
    c.init("run", spec, &[("w", &vec![1.0; 1 << 16])])
        .await
        .expect("init");
    c.push("run", 0, 0, &[("w", &vec![0.5; 1 << 16])])
        .await
        .expect("push");
    c.pull("run", 1).await.expect("pull");
    let calls = (0..6).map(|_| {
        let mut c = c.clone();
        async move { c.checkpoint(Some("run")).await }
    });
    for r in futures::future::join_all(calls).await {
        let done = r.expect("every concurrent checkpoint succeeds");
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].round, 1);
    }
    // One checkpoint directory, no temporary file left behind.
    let round_dir = dir.path().join("run").join(format!("{:020}", 1));
    let names: Vec<String> = std::fs::read_dir(&round_dir)
        .expect("the checkpoint")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains(".tmp")),
        "temporary files left: {names:?}"
    );
    // Training goes on.
    c.push("run", 0, 1, &[("w", &vec![0.5; 1 << 16])])
        .await
        .expect("push");
    assert_eq!(c.pull("run", 2).await.expect("pull").round, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_claiming_a_huge_cluster_is_set_aside_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = reserve_ports(1)[0];
    let d = start(port, dir.path()).await;
    let mut c = Client::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let spec = one_param_spec(pb::OptimizerKind::Sgd, &[4], 1, 0.1);
    c.init("run", spec, &[("w", &[1.0; 4])])
        .await
        .expect("init");
    c.checkpoint(Some("run"))
        .await
        .expect("checkpoint of round 0");
    d.terminate().await.expect("stops");

    // A later checkpoint whose manifest claims 10^12 shards.
    let forged = dir.path().join("run").join(format!("{:020}", 7));
    std::fs::create_dir_all(&forged).expect("mkdir");
    std::fs::write(
        forged.join("MANIFEST.json"),
        r#"{"format":"paramd-checkpoint/1","job":"run","round":7,"shards":1000000000000,"files":[]}"#,
    )
    .expect("write");
    let _d = start(port, dir.path()).await;
    let mut c = Client::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let s = c.status(Some("run")).await.expect("the job is back");
    assert_eq!(s.jobs[0].round, 0, "restored from the intact checkpoint");
    assert!(
        !forged.join("MANIFEST.json").exists(),
        "the forged checkpoint is set aside"
    );
}

#[test]
fn a_checkpoint_dir_that_cannot_be_written_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("write");
    for bad in [file.clone(), file.join("below")] {
        let args = args(0, &bad);
        let out = std::process::Command::new("timeout")
            .arg("30")
            .arg(binary("paramd"))
            .args(&args[2..])
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .expect("run paramd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {stderr}");
        assert!(
            stderr.contains("checkpoint_dir") && stderr.contains(&*bad.to_string_lossy()),
            "{stderr}"
        );
    }
}
