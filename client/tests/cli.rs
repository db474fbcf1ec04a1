//! The `paramctl` command line without a server.

use std::process::Command;

fn golden(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name)
}

#[test]
fn compare_accepts_a_trace_against_its_own_expectations_and_rejects_another() {
    // A result file made of the trace's own expectations passes; the result
    // of another trace fails.
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = golden("sgd_momentum.safetensors");
    let (tensors, _) =
        paramd_client::trace::read_tensors(&std::fs::read(&trace).expect("read")).expect("parse");
    let mut blobs = Vec::new();
    for (k, t) in &tensors {
        let (name, dtype) = if let Some(rest) = k.strip_prefix("expect/final/") {
            (format!("final/{rest}"), safetensors::Dtype::F32)
        } else if k.starts_with("lr/") {
            (k.clone(), safetensors::Dtype::F64)
        } else if k.starts_with("grad_norm/") {
            (k.clone(), safetensors::Dtype::F32)
        } else {
            continue;
        };
        let bytes: Vec<u8> = if dtype == safetensors::Dtype::F64 {
            t.values.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            t.values
                .iter()
                .flat_map(|v| (*v as f32).to_le_bytes())
                .collect()
        };
        blobs.push((name, dtype, t.shape.clone(), bytes));
    }
    let views: Vec<_> = blobs
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"),
            )
        })
        .collect();
    let out = dir.path().join("self.safetensors");
    std::fs::write(
        &out,
        safetensors::serialize(views, None).expect("serialize"),
    )
    .expect("write");

    let run = |trace: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_paramctl"))
            .arg("compare")
            .arg(trace)
            .arg(&out)
            .output()
            .expect("run paramctl")
    };
    let ok = run(&trace);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    let bad = run(&golden("adam_l2.safetensors"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("failed"));
}

#[test]
fn status_without_a_server_fails_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_paramctl"))
        .args(["--server", "http://127.0.0.1:1", "status"])
        .output()
        .expect("run paramctl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to http://127.0.0.1:1"));
}
