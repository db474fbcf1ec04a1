//! `paramctl` behaves like a Unix tool: it says each cause of an error
//! once, and ends quietly when the reader of its output goes away
//! (`paramctl status --json | head`).

use std::io::Read;
use std::process::{Command, Stdio};

use paramd_client::v1 as pb;
use paramd_tests::{TestServer, binary, one_param_spec, reserve_ports};

#[test]
fn an_error_says_each_cause_once() {
    let port = reserve_ports(1)[0];
    let out = Command::new(binary("paramctl"))
        .args(["--server", &format!("http://127.0.0.1:{port}"), "status"])
        .output()
        .expect("run paramctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
    let parts: Vec<&str> = stderr.trim().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[..i].contains(p), "{p:?} is said twice: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_paramctl_quietly() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // Enough jobs that the status outgrows a pipe's buffer.
    for i in 0..200 {
        let spec = one_param_spec(pb::OptimizerKind::Sgd, &[2], 1, 0.1);
        c.init(&format!("pipe-{i}"), spec, &[("w", &[0.0; 2])])
            .await
            .expect("init");
    }
    let url = server.url();
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(binary("paramctl"))
            .args(["--server", &url, "status", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run paramctl");
        let mut head = [0u8; 16];
        let mut stdout = child.stdout.take().expect("stdout");
        stdout
            .read_exact(&mut head)
            .expect("the start of the output");
        // The reader goes away, as `head` does.
        drop(stdout);
        let out = child.wait_with_output().expect("paramctl ends");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
    server.shutdown().await;
}
