//! Tests of the layered settings: parsing, the example file, and that
//! every setting agrees in its flag, variable, help and README row.

use super::*;

#[test]
fn unknown_keys_are_named() {
    let e = Config::from_toml("listen = \"127.0.0.1:1\"\nchunk_byte = 4\n").expect_err("refused");
    let e = e.to_string();
    assert!(e.contains("line 2") && e.contains("chunk_byte"), "{e}");
}

#[test]
fn wrong_types_are_named() {
    let e = Config::from_toml("keep_checkpoints = \"three\"")
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("line 1") && e.contains("keep_checkpoints"),
        "{e}"
    );
}

#[test]
fn printed_config_reads_back() {
    let config = Config {
        cluster: vec!["http://a:1".into(), "http://b:1".into()],
        checkpoint_dir: Some("/var/lib/paramd".into()),
        log_format: LogFormat::Json,
        ..Config::default()
    };
    let text = config.to_toml();
    assert!(text.contains("# tls_cert is not set"), "{text}");
    assert_eq!(Config::from_toml(&text).expect("reads back"), config);
}

#[test]
fn defaults_resolve() {
    let (node, grace) = Config::default().resolve().expect("defaults are valid");
    assert_eq!(grace, Duration::from_secs(20));
    assert!(node.checkpoints.is_none() && node.auth_token.is_none() && node.tls.is_none());
}

/// Every key of the configuration file (the optional ones set).
fn every_key() -> toml::Table {
    let full = Config {
        checkpoint_dir: Some("d".into()),
        auth_token_file: Some("t".into()),
        tls_cert: Some("c".into()),
        tls_key: Some("k".into()),
        tls_client_ca: Some("a".into()),
        tls_peer_ca: Some("p".into()),
        peer_listen: Some(SocketAddr::from(([0, 0, 0, 0], 50052))),
        peer_token_file: Some("pt".into()),
        ..Config::default()
    };
    toml::Table::try_from(&full).expect("a table")
}

/// `deploy/paramd.example.toml` parses, matches the defaults, and
/// documents every key.
#[test]
fn the_example_documents_every_key() {
    let example = include_str!("../../../deploy/paramd.example.toml");
    assert_eq!(
        Config::from_toml(example).expect("the example parses"),
        Config::default()
    );
    let keys = every_key();
    for key in keys.keys() {
        let set = format!("\n{key} = ");
        let commented = format!("\n# {key} = ");
        assert!(
            example.contains(&set) || example.contains(&commented),
            "deploy/paramd.example.toml does not document {key}"
        );
    }
}

/// Each refusal says which setting, keeps an I/O error as its source,
/// and names the file a parse error is in.
#[test]
fn errors_name_the_setting_and_keep_their_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let e = Config::from_file(&missing).expect_err("no such file");
    let ConfigError::Read { path, source } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(
        (path, source.kind()),
        (&missing, std::io::ErrorKind::NotFound)
    );
    assert!(std::error::Error::source(&e).is_some());

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:1\"\nchunk_byte = 4\n").expect("write");
    let e = Config::from_file(&bad).expect_err("unknown key");
    assert!(
        matches!(&e, ConfigError::Parse { path: Some(p), line: Some(2), .. } if p == &bad),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("config file "), "{e}");

    let zero = Config {
        keep_checkpoints: 0,
        ..Config::default()
    };
    let e = zero.resolve().expect_err("refused");
    assert!(
        matches!(
            e,
            ConfigError::Setting {
                key: "keep_checkpoints",
                ..
            }
        ),
        "{e:?}"
    );
    let window = Config {
        http2_stream_window: 1000,
        ..Config::default()
    };
    let e = window.resolve().expect_err("refused");
    assert!(
        matches!(
            e,
            ConfigError::Setting {
                key: "http2_stream_window",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("1000 bytes is not an HTTP/2 window"),
        "{e}"
    );
    let token = Config {
        auth_token_file: Some(missing.clone()),
        ..Config::default()
    };
    let e = token.resolve().expect_err("refused");
    assert!(
        matches!(
            e,
            ConfigError::File {
                key: "auth_token_file",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn half_tls_is_refused() {
    let config = Config {
        tls_cert: Some("/x.pem".into()),
        ..Config::default()
    };
    let e = config.resolve().expect_err("refused");
    assert!(
        matches!(
            e,
            ConfigError::Setting {
                key: "tls_cert",
                ..
            }
        ),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("tls_cert") && e.contains("tls_key"), "{e}");
}

/// A default as the help and the README write it, normalized: sizes in
/// bytes, durations without their unit, "none" for an unset setting.
fn normalized(text: &str) -> String {
    let t = text.trim().trim_matches('`').trim_end_matches(" s");
    for (unit, scale) in [(" KiB", 1u64 << 10), (" MiB", 1 << 20), (" GiB", 1 << 30)] {
        if let Some(n) = t.strip_suffix(unit).and_then(|n| n.parse::<u64>().ok()) {
            return (n * scale).to_string();
        }
    }
    match t.parse::<f64>() {
        Ok(x) => x.to_string(),
        Err(_) => t.to_owned(),
    }
}

/// Every key of the configuration file has a flag named after it, an
/// environment variable `PARAMD_<KEY>`, and the same default in the
/// flag's help, in the README's table and in `Config::default()`: the
/// places a setting is spelled cannot drift apart.
#[test]
fn every_setting_agrees_in_flag_environment_help_and_readme() {
    use clap::CommandFactory;
    let command = Args::command();
    let readme = include_str!("../../../README.md");
    let defaults = toml::Table::try_from(Config::default()).expect("a table");
    let keys = every_key();
    for key in keys.keys() {
        let flag = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
            .unwrap_or_else(|| panic!("{key} has no --{flag}"));
        let env = format!("PARAMD_{}", key.to_uppercase());
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(env.as_str()),
            "--{flag}'s environment variable"
        );
        // What Config::default() says, written as the docs write it.
        let want = match defaults.get(key) {
            None => "none".to_owned(),
            Some(toml::Value::Array(a)) if a.is_empty() => "none".to_owned(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(v) => normalized(&v.to_string()),
        };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let said = help
            .split("[default: ")
            .nth(1)
            .and_then(|r| r.split(']').next())
            .unwrap_or_else(|| panic!("--{flag}'s help states no default: {help}"));
        let said = normalized(said);
        let alias = |s: &str| match (key.as_str(), s) {
            ("cluster", "one shard") => "none".to_owned(),
            ("tls_peer_ca", "--tls-client-ca") => "none".to_owned(),
            _ => s.to_owned(),
        };
        assert_eq!(alias(&said), want, "--{flag}'s help says [default: {said}]");
        let row = readme
            .lines()
            .find(|l| {
                l.starts_with('|')
                    && l.split('|')
                        .nth(1)
                        .is_some_and(|first| first.contains(&format!("`--{flag}`")))
            })
            .unwrap_or_else(|| panic!("the README's table has no --{flag}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(
            cells[2].contains(&format!("`{env}`")),
            "README row of --{flag}: {row}"
        );
        assert_eq!(
            alias(&normalized(cells[3])),
            want,
            "the README's default of --{flag}: {row}"
        );
    }
}
