//! The Python client's test suite (`client/python/tests`) against the real
//! `paramd` and `paramctl` binaries: unit tests, the golden traces replayed
//! through the Python client, four PyTorch worker processes training an MLP
//! on one shard and on three, the export loaded by torch, racing copies of
//! a push, a restarted cluster, a token-protected server, and a mutual-TLS
//! two-shard cluster with a token replaying a golden trace.
//!
//! `client/python/ci/venv.sh` makes the virtualenv (torch, grpcio, pytest,
//! the package built from `client/python`) once under the target directory;
//! a warm run installs nothing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use paramd_tests::binary;

/// Installing torch into a cold virtualenv takes a few minutes; the suite
/// itself about two on two cores.
const VENV_TIMEOUT: Duration = Duration::from_secs(1800);
const SUITE_TIMEOUT: Duration = Duration::from_secs(1200);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

/// Runs `cmd` to completion within `limit`, killing it past that.
async fn run(
    mut cmd: tokio::process::Command,
    what: &str,
    limit: Duration,
) -> std::process::Output {
    let child = cmd
        .kill_on_drop(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_suite() {
    let paramd = binary("paramd");
    let paramctl = binary("paramctl");
    // target/debug/paramd -> target
    let target = paramd
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let pkg = repo().join("client").join("python");

    let mut venv = tokio::process::Command::new("bash");
    venv.arg(pkg.join("ci").join("venv.sh"))
        .arg(target.join("python"));
    let out = run(venv, "client/python/ci/venv.sh", VENV_TIMEOUT).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client/python/ci/venv.sh failed ({}):\n{log}",
        out.status
    );
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        Path::new(&python).is_file(),
        "venv.sh printed {python:?}, not a python; its log:\n{log}"
    );

    // From the tests folder, so the package's sources (whose stubs are
    // generated at build time) cannot shadow the installed package.
    let mut pytest = tokio::process::Command::new(&python);
    pytest
        .args([
            "-m",
            "pytest",
            "-q",
            "-rfEs",
            "--durations=8",
            "-p",
            "no:cacheprovider",
        ])
        .current_dir(pkg.join("tests"))
        .env("PARAMD_BIN", &paramd)
        .env("PARAMCTL_BIN", &paramctl)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = run(pytest, "pytest", SUITE_TIMEOUT).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the Python suite failed ({}); pytest's output is above",
        out.status
    );
    assert!(
        stdout.contains(" passed") && !stdout.contains(" skipped"),
        "the Python suite ran no test or skipped some: see its output above"
    );
}
