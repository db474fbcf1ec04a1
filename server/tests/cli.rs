//! The `paramd` command line: bad configuration exits 64 with a one-line
//! reason before binding any port.

use std::process::Command;

fn paramd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_paramd"))
        .args(args)
        // Ports nobody else can hold: if the daemon got as far as binding,
        // these would be taken and it would never exit on its own.
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .output()
        .expect("run paramd")
}

#[test]
fn bad_flags_exit_64_with_one_line() {
    for args in [
        &["--chunk-bytes", "0"][..],
        &["--no-such-flag"],
        &["--max-message-bytes", "12"],
    ] {
        let out = paramd(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(err.starts_with("paramd: "), "{err:?}");
    }
}

#[test]
fn the_reason_names_the_setting() {
    let out = paramd(&["--chunk-bytes", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("chunk_bytes must be at least 4, got 2"));
}

#[test]
fn version_prints_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_paramd"))
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}
