//! The server's layers, as ARCHITECTURE.md states them: a module may use
//! modules of its own layer or lower ones, never higher. Checked from every
//! `crate::` path in `server/src` (use lines and paths written inline),
//! comments left out.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layer of each top-level module of `server/src`, lowest first; the
/// former flat paths `lib.rs` still re-exports count as what they name.
const LAYERS: &[(&str, &[&str])] = &[
    ("math", &["math", "optim", "clip", "schedule"]),
    (
        "shape",
        &[
            "spec", "layout", "pieces", "chunk", "limits", "error", "compute", "metrics", "token",
            "invalid",
        ],
    ),
    ("round", &["coordinator", "cluster", "checkpoint", "job"]),
    ("node", &["node"]),
    (
        "api",
        &["api", "service", "shard_service", "auth", "http", "listen"],
    ),
    ("serve", &["server", "config", "fuzzing", "lib", "main"]),
];

/// Imports against the order, each with the reason it is still there:
/// (from layer, to layer, why).
const KNOWN: &[(&str, &str, &str)] = &[];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read server/src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules named after `crate::` in `line`, `crate::{a, b}` included.
fn crate_paths(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end].split(',').collect()
        } else {
            vec![rest]
        };
        for n in names {
            let n: String = n
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !n.is_empty() {
                out.push(n);
            }
        }
    }
    out
}

#[test]
fn no_module_uses_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/src");
    let mut all = Vec::new();
    files(&src, &mut all);
    assert!(all.len() > 20, "server/src not found at {}", src.display());
    let mut wrong = BTreeSet::new();
    let mut seen_known = BTreeSet::new();
    for path in &all {
        let rel = path.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_owned())
            .expect("a name");
        let own = layer(&top).unwrap_or_else(|| panic!("{top} is in no layer: add it"));
        let text = std::fs::read_to_string(path).expect("read");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for used in crate_paths(code) {
                let Some(theirs) = layer(&used) else {
                    // A re-exported item (`crate::Error`), not a module.
                    continue;
                };
                if theirs <= own {
                    continue;
                }
                let (from, to) = (LAYERS[own].0, LAYERS[theirs].0);
                if KNOWN.iter().any(|k| (k.0, k.1) == (from, to)) {
                    seen_known.insert((from, to));
                    continue;
                }
                wrong.insert(format!(
                    "{}:{}: {from} uses crate::{used} ({to})",
                    rel.display(),
                    n + 1
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
    for (from, to, why) in KNOWN {
        assert!(
            seen_known.contains(&(*from, *to)),
            "the known exception {from} -> {to} ({why}) is gone: remove it from KNOWN"
        );
    }
}

#[test]
fn the_scanner_sees_grouped_and_inline_paths() {
    assert_eq!(
        crate_paths("use crate::{job::Job, metrics};"),
        vec!["job", "metrics"]
    );
    assert_eq!(
        crate_paths("let x = crate::api::auth::check(crate::node::f());"),
        vec!["api", "node"]
    );
    assert_eq!(layer("optim"), Some(0));
    assert!(layer("api") > layer("node"));
}
