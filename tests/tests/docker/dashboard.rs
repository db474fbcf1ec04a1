//! The Grafana dashboard against a live paramd: a PromQL tokenizer and
//! the check that every query names metrics paramd exports.

use std::collections::BTreeSet;
use std::time::Duration;

use paramd_client::Client;
use paramd_client::replay::ReplayOptions;
use paramd_tests::{Daemon, http_get, reserve_ports};
use tonic::Code;

use crate::harness::{install_promtool, run_bounded};
use crate::{TRACE, golden, repo};

/// The metric names a PromQL expression selects: identifiers that are not
/// functions, aggregation clauses, keywords, label matchers, ranges or
fn promql_metrics(expr: &str) -> Vec<String> {
    // Operators, modifiers and aggregations (which may stand before a
    // `by (...)` clause rather than their parenthesis).
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let c: Vec<char> = expr.chars().collect();
    let skip_to = |mut i: usize, close: char| {
        while i < c.len() && c[i] != close {
            if c[i] == '"' {
                i += 1;
                while i < c.len() && c[i] != '"' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '$' => {
                i += 1;
                if i < c.len() && c[i] == '{' {
                    i = skip_to(i + 1, '}');
                } else {
                    while i < c.len() && ident(c[i]) {
                        i += 1;
                    }
                }
            }
            ch if ch.is_ascii_digit() || ch == '.' => {
                while i < c.len() && (ident(c[i]) || c[i] == '.') {
                    i += 1;
                }
            }
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let start = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut j = i;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                let call = j < c.len() && c[j] == '(';
                let clause = [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str());
                if call && clause {
                    // A list of label names.
                    i = skip_to(j + 1, ')');
                } else if !call && !KEYWORDS.contains(&word.as_str()) {
                    out.push(word);
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Every PromQL expression of a Grafana dashboard: the panels' targets and
/// the variables' queries (`label_values(expr, label)` gives `expr`).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                out.push(e.to_owned());
            }
            if m.get("type").and_then(|t| t.as_str()) == Some("query") {
                let q = m.get("query").and_then(|q| {
                    q.as_str()
                        .or_else(|| q.get("query").and_then(|x| x.as_str()))
                });
                if let Some(q) = q {
                    let inner = q
                        .strip_prefix("label_values(")
                        .and_then(|r| r.strip_suffix(')'))
                        .and_then(|r| r.rsplit_once(','))
                        .map_or(q, |(e, _)| e);
                    out.push(inner.to_owned());
                }
            }
            for x in m.values() {
                dashboard_queries(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

#[test]
fn promql_metric_names_are_told_from_functions_labels_and_variables() {
    assert_eq!(
        promql_metrics(
            r#"histogram_quantile(0.99, sum by (le, job) (rate(paramd_push_duration_seconds_bucket{job=~"$job", instance="a{b}"}[$__rate_interval])))"#
        ),
        ["paramd_push_duration_seconds_bucket"]
    );
    assert_eq!(
        promql_metrics(
            "time() - max(paramd_a) by (job) > bool 3 unless on (job) up offset 5m * ${x}"
        ),
        ["paramd_a", "up"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_metrics_a_live_paramd_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = reserve_ports(1)[0];
    let url = format!("http://127.0.0.1:{port}");
    let ckpt = dir.path().display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(&[
        "--listen",
        &listen,
        "--http-listen",
        "127.0.0.1:0",
        "--checkpoint-dir",
        &ckpt,
    ])
    .await
    .expect("paramd starts");
    let http = d.http_addr();
    // A replay with clipping and a schedule, and a checkpoint: every series
    // the dashboard plots has values.
    let opts = ReplayOptions {
        credentials: Default::default(),
        server: url.clone(),
        job: Some("dash".into()),
        every_step: false,
    };
    paramd_client::replay::replay(&golden(TRACE), &opts)
        .await
        .expect("replay");
    let mut c = Client::connect(&url).await.expect("connect");
    c.checkpoint(Some("dash")).await.expect("checkpoint");
    // And a push it refuses (a parameter it does not know).
    let err = c
        .push("dash", 0, 12, &[("no.such.param", &[1.0])])
        .await
        .expect_err("an unknown parameter is refused");
    assert_eq!(
        err.status().map(tonic::Status::code),
        Some(Code::InvalidArgument)
    );
    // And an elastic job with a member, whose membership series the
    // Workers panel plots.
    let spec = paramd_client::v1::JobSpec {
        membership: paramd_client::v1::Membership::Elastic as i32,
        min_workers: 1,
        ..paramd_tests::flat_spec(&[("w", 2)], paramd_tests::outer_sgd(), 2)
    };
    c.init("dash-elastic", spec, &[("w", &[0.0, 0.0])])
        .await
        .expect("init");
    c.join("dash-elastic").await.expect("join");
    let (code, body) = http_get(http, "/metrics").await.expect("/metrics");
    assert_eq!(code, 200);
    let exported: BTreeSet<String> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();

    let path = repo().join("deploy/grafana/paramd.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "{queries:?}");
    let mut used = BTreeSet::new();
    for q in &queries {
        let names = promql_metrics(q);
        assert!(!names.is_empty(), "{q:?} names no metric");
        for n in names {
            assert!(
                exported.contains(&n),
                "{q:?} names {n}, which paramd does not export; it exports {exported:?}"
            );
            used.insert(n);
        }
    }
    // Prometheus parses every query, with Grafana's variables as Grafana
    // would fill them in: promtool checks them as recording rules.
    install_promtool();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = q.replace("$__rate_interval", "1m").replace("$job", ".+");
        let quoted = serde_json::to_string(&q).expect("a JSON string is a YAML scalar");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let rules_path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&rules_path, rules).expect("write rules");
    let rules_path = rules_path.display().to_string();
    if let Err(e) = run_bounded(
        "promtool",
        &["check", "rules", &rules_path],
        Duration::from_secs(60),
    ) {
        panic!("Prometheus refuses a query of the dashboard: {e}");
    }
    // What the issue asks the dashboard to show.
    for wanted in [
        "paramd_learning_rate",
        "paramd_grad_norm",
        "paramd_grad_norm_clipped",
        "paramd_grad_clip_coefficient",
        "paramd_rounds_total",
        "paramd_push_duration_seconds_bucket",
        "paramd_workers_expected",
        "paramd_workers_pushed",
        "paramd_workers_dropped_total",
        "paramd_rounds_skipped_total",
        "paramd_checkpoint_last_timestamp_seconds",
    ] {
        assert!(used.contains(wanted), "the dashboard plots no {wanted}");
    }
    d.terminate().await.expect("terminate");
}
