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

/// `paramd` with only the given environment (no inherited `PARAMD_*`).
fn paramd_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paramd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PARAMD_") {
            c.env_remove(k);
        }
    }
    c.args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run paramd")
}

/// The value of `key` in `--print-config` output.
fn printed<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(" = "))
}

#[test]
fn settings_layer_defaults_file_environment_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("paramd.toml");
    std::fs::write(
        &file,
        "chunk_bytes = 1024\nkeep_checkpoints = 7\nround_timeout = 5\n\
         cluster = [\"http://a:1\", \"http://b:1\"]\nshard_index = 1\n\
         peer_listen = \"127.0.0.1:2\"\npeers = [\"http://a:2\", \"http://b:2\"]\n",
    )
    .expect("write");
    let f = file.to_str().expect("utf-8 path");
    let out = paramd_env(
        &["--config", f, "--print-config", "--chunk-bytes", "4096"],
        &[
            ("PARAMD_CHUNK_BYTES", "2048"),
            ("PARAMD_KEEP_CHECKPOINTS", "9"),
            ("PARAMD_LOG_FORMAT", "json"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // Flag over environment over file over default.
    assert_eq!(printed(&text, "chunk_bytes"), Some("4096"), "{text}");
    assert_eq!(printed(&text, "keep_checkpoints"), Some("9"), "{text}");
    assert_eq!(printed(&text, "round_timeout"), Some("5.0"), "{text}");
    assert_eq!(printed(&text, "log_format"), Some("\"json\""), "{text}");
    assert_eq!(printed(&text, "peak_timeout"), None);
    assert_eq!(printed(&text, "peer_timeout"), Some("10.0"), "{text}");
    assert_eq!(
        printed(&text, "cluster"),
        Some("[\"http://a:1\", \"http://b:1\"]"),
        "{text}"
    );
    assert!(text.contains("# checkpoint_dir is not set"), "{text}");

    // The printed configuration is itself a valid file that gives the same.
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, text.as_bytes()).expect("write");
    let out2 = paramd_env(
        &["--config", again.to_str().expect("utf-8"), "--print-config"],
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&out2.stdout), text);

    // The environment names the file too.
    let out3 = paramd_env(&["--print-config"], &[("PARAMD_CONFIG", f)]);
    assert_eq!(
        printed(&String::from_utf8_lossy(&out3.stdout), "chunk_bytes"),
        Some("1024")
    );
}

#[test]
fn an_unknown_key_is_named_and_nothing_is_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("paramd.toml");
    // A port that is free now: if paramd bound it before refusing the file,
    // it would still be serving.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:{port}\"\ncheckpoint_evry = 5\n"),
    )
    .expect("write");
    let out = paramd_env(&["--config", file.to_str().expect("utf-8")], &[]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("line 2") && err.contains("checkpoint_evry"),
        "{err}"
    );
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port was never bound");

    // A missing file, a missing TLS key and an unreadable token file are
    // refused the same way, naming what is wrong.
    for (args, needle) in [
        (
            vec!["--config", "/nonexistent/paramd.toml"],
            "/nonexistent/paramd.toml",
        ),
        (vec!["--tls-cert", "/nonexistent/c.pem"], "tls_key"),
        (
            vec!["--auth-token-file", "/nonexistent/token"],
            "/nonexistent/token",
        ),
        (vec!["--log-format", "xml"], "xml"),
    ] {
        let out = paramd_env(&args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn the_example_config_is_accepted() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/paramd.example.toml");
    let out = paramd_env(&["--config", example, "--print-config"], &[]);
    assert!(out.status.success(), "{out:?}");
}
