//! Every golden trace, replayed through a real server over gRPC exactly as
//! `paramctl replay` does, matches PyTorch within the README's tolerance.

use std::path::Path;

use paramd_client::replay::{ReplayOptions, replay};
use paramd_client::trace::{Tolerance, compare, read_tensors};
use paramd_tests::{TestServer, golden_traces};

async fn check(server: &TestServer, trace: &Path, every_step: bool) {
    let opts = ReplayOptions {
        credentials: Default::default(),
        server: server.url(),
        job: None,
        every_step,
    };
    let result = replay(trace, &opts).await.expect("replay");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("result.safetensors");
    result.write(&out).expect("write result");

    let (want, _) = read_tensors(&std::fs::read(trace).expect("trace")).expect("read trace");
    let (got, _) = read_tensors(&std::fs::read(&out).expect("result")).expect("read result");
    let c = compare(&want, &got, Tolerance::default());
    assert!(
        c.failures.is_empty() && c.passed > 0,
        "{}: {} passed, failures: {:#?}",
        trace.display(),
        c.passed,
        c.failures
    );
    if every_step {
        let steps = want
            .keys()
            .filter(|k| k.starts_with("expect/") && !k.starts_with("expect/final/"))
            .count();
        let lrs = want.keys().filter(|k| k.starts_with("lr/")).count();
        let finals = want
            .keys()
            .filter(|k| k.starts_with("expect/final/"))
            .count();
        assert_eq!(
            c.passed,
            steps + finals + 2 * lrs,
            "{}: every expectation checked",
            trace.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_golden_trace_matches_torch() {
    let server = TestServer::start().await;
    for trace in golden_traces() {
        check(&server, &trace, false).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_of_every_golden_trace_matches_torch() {
    let server = TestServer::start().await;
    for trace in golden_traces() {
        check(&server, &trace, true).await;
    }
    server.shutdown().await;
}

/// Tiny chunks split every parameter into many pieces; the numerics must not
/// notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_chunks_change_nothing() {
    let config = paramd::NodeConfig {
        chunk_bytes: 12,
        ..Default::default()
    };
    let server = TestServer::with_config(config).await;
    for trace in golden_traces() {
        check(&server, &trace, false).await;
    }
    server.shutdown().await;
}

#[test]
fn the_compare_tolerance_rejects_a_perturbed_result() {
    let trace = &golden_traces()[0];
    let (want, _) = read_tensors(&std::fs::read(trace).expect("trace")).expect("read");
    let mut got = std::collections::HashMap::new();
    for (k, t) in &want {
        if let Some(rest) = k.strip_prefix("expect/final/") {
            got.insert(format!("final/{rest}"), t.clone());
        } else if k.starts_with("lr/") || k.starts_with("grad_norm/") {
            got.insert(k.clone(), t.clone());
        }
    }
    assert!(
        compare(&want, &got, Tolerance::default())
            .failures
            .is_empty()
    );
    let key = got
        .keys()
        .find(|k| k.starts_with("final/"))
        .cloned()
        .expect("a final param");
    let t = got.get_mut(&key).expect("present");
    t.values[0] = t.values[0] * (1.0 + 1e-3) + 1e-5;
    let c = compare(&want, &got, Tolerance::default());
    assert_eq!(c.failures.len(), 1, "{:?}", c.failures);
    got.remove(&key);
    assert!(compare(&want, &got, Tolerance::default()).failures[0].starts_with("missing"));
}
