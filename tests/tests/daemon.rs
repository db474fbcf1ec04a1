//! The real binaries: `paramd` started with no flags serves gRPC on 50051
//! and metrics on 9464; `paramctl replay` drives it; `/metrics` then shows
//! the lr and grad norm of the last round; SIGTERM stops it with exit 0.
//!
//! This is the one test that uses the default ports, as a newcomer would.

use std::process::Command;

use paramd_client::trace::{Tolerance, compare, read_tensors};
use paramd_tests::{Daemon, binary, http_get, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paramd_with_no_flags_serves_grpc_and_metrics() {
    let daemon = Daemon::start(&[])
        .await
        .expect("paramd starts with embedded defaults");
    assert!(
        daemon
            .log
            .iter()
            .any(|l| l.contains("0.0.0.0:50051") && l.contains("0.0.0.0:9464")),
        "{:?}",
        daemon.log
    );

    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/adamw_param_groups.safetensors");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("result.safetensors");
    let replay = tokio::process::Command::new(binary("paramctl"))
        .args(["replay", "--job", "smoke"])
        .arg(&trace)
        .arg("--out")
        .arg(&out)
        .env_remove("PARAMD_SERVER")
        .output()
        .await
        .expect("paramctl replay");
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );

    let (want, _) = read_tensors(&std::fs::read(&trace).expect("trace")).expect("parse");
    let (got, _) = read_tensors(&std::fs::read(&out).expect("result")).expect("parse");
    let c = compare(&want, &got, Tolerance::default());
    assert!(c.failures.is_empty() && c.passed > 0, "{:?}", c.failures);

    let status = Command::new(binary("paramctl"))
        .args(["status", "--job", "smoke", "--json"])
        .env_remove("PARAMD_SERVER")
        .output()
        .expect("paramctl status");
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let steps = want.keys().filter(|k| k.starts_with("lr/")).count() as u64;
    assert_eq!(status["jobs"][0]["round"], steps);

    let (code, body) = http_get("127.0.0.1:9464".parse().expect("addr"), "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(code, 200);
    let last = steps - 1;
    let lrs = &want[&format!("lr/{last}")].values;
    for (g, lr) in lrs.iter().enumerate() {
        let got = metric(
            &body,
            "paramd_learning_rate",
            &[("job", "smoke"), ("group", &g.to_string())],
        )
        .unwrap_or_else(|| panic!("no lr of group {g} in {body}"));
        assert!(
            (got - lr).abs() <= 1e-6 + 1e-4 * lr.abs(),
            "group {g}: {got} vs {lr}"
        );
    }
    let norm = want[&format!("grad_norm/{last}")].values[0];
    let got = metric(&body, "paramd_grad_norm", &[("job", "smoke")]).expect("grad norm");
    assert!((got - norm).abs() <= 1e-3 * norm, "{got} vs {norm}");
    assert_eq!(
        metric(&body, "paramd_optimizer_step", &[("job", "smoke")]),
        Some(steps as f64)
    );

    let exit = daemon.terminate().await.expect("terminate");
    assert_eq!(exit.code(), Some(0), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_fields() {
    let ports = paramd_tests::reserve_ports(1);
    let listen = format!("127.0.0.1:{}", ports[0]);
    let daemon = Daemon::start(&[
        "--listen",
        &listen,
        "--http-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ])
    .await
    .expect("paramd starts with JSON logs");
    assert!(daemon.log.len() >= 2, "{:?}", daemon.log);
    for line in &daemon.log {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
    }
    let serving: serde_json::Value = serde_json::from_str(&daemon.log[0]).expect("json");
    assert_eq!(serving["fields"]["message"], "paramd serving");
    assert_eq!(serving["fields"]["grpc"], listen.as_str());
    let exit = daemon.terminate().await.expect("terminate");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paramctl_health_asks_the_grpc_health_service_without_a_token() {
    let ports = paramd_tests::reserve_ports(1);
    let listen = format!("127.0.0.1:{}", ports[0]);
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken").expect("write");
    let daemon = Daemon::start(&[
        "--listen",
        &listen,
        "--http-listen",
        "127.0.0.1:0",
        "--auth-token-file",
        token.to_str().expect("utf-8"),
    ])
    .await
    .expect("paramd starts");
    let health = |server: String| {
        Command::new(binary("paramctl"))
            .args(["--server", &server, "health"])
            .env_remove("PARAMD_TOKEN")
            .env_remove("PARAMD_TOKEN_FILE")
            .output()
            .expect("paramctl health")
    };
    let up = health(format!("http://{listen}"));
    assert!(up.status.success(), "{up:?}");
    assert_eq!(String::from_utf8_lossy(&up.stdout).trim(), "SERVING");
    // Anything but SERVING, or no answer, is a failure.
    let down = health("http://127.0.0.1:1".into());
    assert!(!down.status.success(), "{down:?}");
    let exit = daemon.terminate().await.expect("terminate");
    assert_eq!(exit.code(), Some(0));
}
