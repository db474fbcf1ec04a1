//! paramd as users deploy it (`deploy/`).
//!
//! With a Docker engine: the image built through `deploy/build-image.sh`'s
//! offline path, three shard containers on a private network with a volume
//! each; a golden trace replayed from a client container, and another
//! driven from the host through a `docker kill` and restart of one shard
//! (restored from its checkpoint, bit-identical result) and a shard cut off
//! the network mid-round (clear errors in time, completion once it is
//! back); health, non-root user, `docker stop` exiting 0 with a final
//! checkpoint; then the compose file's shards started, replayed through and
//! stopped. Set `PARAMD_SKIP_DOCKER=1` to skip what needs the engine.
//!
//! Without one: every Grafana query names metrics a live paramd exports,
//! and the compose file and Kubernetes manifests hold together and their
//! container arguments are accepted by `paramd --print-config`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use paramd::NodeConfig;
use paramd_client::replay::{ReplayOptions, ReplayResult};
use paramd_client::trace::{Tolerance, Trace, compare, read_tensors};
use paramd_client::{Client, ClientError, Pulled};
use paramd_tests::{Daemon, TestServer, binary, http_get, reserve_ports};
use serde::Deserialize;
use serde_yaml::Value as Yaml;
use tonic::Code;

/// The trace driven from the host through the failures.
const TRACE: &str = "adamw_warmup_cosine_clip.safetensors";
/// The trace replayed by `paramctl` in a client container.
const CLIENT_TRACE: &str = "sgd_momentum.safetensors";
/// Small chunks, so that every shard holds some of every parameter.
const CHUNK_BYTES: usize = 64;
/// Every call of the host's client ends within this.
const CALL: Duration = Duration::from_secs(5);
/// Workers must see a failure within this. A shard whose address stopped
/// answering costs a new connection the client's connect timeout (10 s),
/// which its call deadline does not shorten.
const FAIL_WITHIN: Duration = Duration::from_secs(13);
/// A container becomes healthy within this.
const HEALTHY_WITHIN: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the repository")
        .to_path_buf()
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name)
}

/// One round of the trace: every worker pushes step `t`, then the
/// parameters after it are pulled.
async fn round(c: &mut Client, trace: &Trace, job: &str, t: u64) -> Pulled {
    for w in 0..trace.workers {
        push(c, trace, job, t, w).await.expect("push");
    }
    c.pull(job, t + 1).await.expect("pull")
}

/// Round `t` again after failed pushes, as a worker retries: a push the
/// shards already have is acknowledged once more, and one for a round that
/// meanwhile completed (the pushes that timed out on the client reached
/// the shard once it was back) is refused as stale.
async fn retry_round(c: &mut Client, trace: &Trace, job: &str, t: u64) -> Pulled {
    for w in 0..trace.workers {
        match push(c, trace, job, t, w).await {
            Ok(()) => {}
            Err(e) if e.reason() == Some("stale") => {}
            Err(e) => panic!("retry of worker {w}'s push of round {t}: {e}"),
        }
    }
    c.pull(job, t + 1).await.expect("pull")
}

async fn push(c: &mut Client, trace: &Trace, job: &str, t: u64, w: u32) -> Result<(), ClientError> {
    let grads: Vec<Vec<f32>> = trace
        .grads(t, w)
        .expect("trace gradients")
        .into_iter()
        .map(|g| g.expect("the docker tier replays traces that give every gradient"))
        .collect();
    let named = trace.named(&grads);
    // The client's own deadline bounds the call; this bounds the test.
    tokio::time::timeout(CALL * 3, c.push(job, w, t, &named))
        .await
        .expect("a push ends")
        .map(|_| ())
}

async fn init(c: &mut Client, trace: &Trace, job: &str) {
    let init = trace.init().expect("trace init");
    let values = trace.named(&init);
    c.init(job, trace.spec.clone(), &values)
        .await
        .expect("init");
}

fn bits(p: &Pulled) -> BTreeMap<String, Vec<u32>> {
    p.params
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// What the rounds pulled, in the form `paramctl compare` checks against
/// the trace: the golden tolerance, every lr and grad norm.
fn check_against_trace(trace_path: &Path, trace: &Trace, pulled: &[Pulled]) {
    let last = pulled.last().expect("rounds");
    let result = ReplayResult {
        params: trace
            .params
            .iter()
            .cloned()
            .zip(trace.shapes.iter().cloned())
            .collect(),
        final_params: trace
            .params
            .iter()
            .map(|p| last.params[p].clone())
            .collect(),
        lr: pulled
            .iter()
            .map(|p| p.last.as_ref().expect("outcome").lr.clone())
            .collect(),
        grad_norm: pulled
            .iter()
            .map(|p| p.last.as_ref().expect("outcome").grad_norm)
            .collect(),
        steps: Vec::new(),
        job: String::new(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("result.safetensors");
    result.write(&out).expect("write result");
    let (want, _) = read_tensors(&std::fs::read(trace_path).expect("trace")).expect("trace");
    let (got, _) = read_tensors(&std::fs::read(&out).expect("result")).expect("result");
    let c = compare(&want, &got, Tolerance::default());
    assert!(
        c.failures.is_empty() && c.passed > 0,
        "against torch: {} passed, failures {:?}",
        c.passed,
        c.failures
    );
}

/// The trace run by one in-process shard with the same chunk size: for a
/// fixed chunk size, any number of shards gives these bits.
async fn reference(trace: &Trace) -> Pulled {
    let server = TestServer::with_config(NodeConfig {
        chunk_bytes: CHUNK_BYTES,
        ..NodeConfig::default()
    })
    .await;
    let mut c = server.client().await;
    init(&mut c, trace, "reference").await;
    let mut last = None;
    for t in 0..trace.steps {
        last = Some(round(&mut c, trace, "reference", t).await);
    }
    server.shutdown().await;
    last.expect("rounds")
}

/// An error of shard `shard`, unreachable or past its deadline. The
/// client's own deadline and the server's both surface as DEADLINE_EXCEEDED.
fn expect_unreachable(err: &ClientError, shard: usize) {
    match err {
        ClientError::Shard {
            shard: s, status, ..
        } => {
            assert_eq!(*s, shard, "{err}");
            assert!(
                matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
                "{err}"
            );
        }
        other => panic!("expected an error of shard {shard}, got {other}"),
    }
}

/// Status of the job as the coordinator sees it, bounded.
async fn status(c: &mut Client, job: &str) -> paramd_client::v1::JobStatus {
    let s = tokio::time::timeout(CALL * 3, c.status(Some(job)))
        .await
        .expect("status ends")
        .expect("status");
    s.jobs.into_iter().next().expect("the job")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shard_containers_replay_survive_a_kill_and_a_partition_and_stop_cleanly() {
    if !docker_or_skip() {
        return;
    }
    let trace_path = golden(TRACE);
    let trace = Trace::load(&trace_path).expect("trace");
    let want = reference(&trace).await;

    let dk = Docker::new();
    dk.build_image(&binary("paramd"));
    let ips = dk.create_network(3);
    let cluster: Vec<String> = ips.iter().map(|ip| format!("http://{ip}:50051")).collect();
    let peers: Vec<String> = ips.iter().map(|ip| format!("http://{ip}:50052")).collect();
    let env = [
        ("PARAMD_CLUSTER", cluster.join(",")),
        ("PARAMD_PEER_LISTEN", "0.0.0.0:50052".to_owned()),
        ("PARAMD_PEERS", peers.join(",")),
        ("PARAMD_CHUNK_BYTES", CHUNK_BYTES.to_string()),
        ("PARAMD_PEER_TIMEOUT", "2".to_owned()),
        ("PARAMD_ROUND_TIMEOUT", "2".to_owned()),
    ];
    for (i, ip) in ips.iter().enumerate() {
        dk.run_shard(i, ip, &env);
    }
    for i in 0..3 {
        dk.wait_healthy(&dk.shard(i), HEALTHY_WITHIN);
        // Not root: the daemon (PID 1) runs as the image's user.
        let proc_status = dk.exec(&dk.shard(i), &["cat", "/proc/1/status"]);
        let uid = proc_status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .expect("a Uid line");
        assert_eq!(
            uid.split_whitespace().collect::<Vec<_>>(),
            ["10001"; 4],
            "shard {i} runs as uid 10001"
        );
    }

    // A client container replays a trace through the coordinator, as the
    // README shows, and compares it with torch's.
    dk.replay_in_client_container(&dk.network(), &cluster[0]);

    // The host drives another trace, round by round.
    let job = "docker-run";
    let mut c = Client::connect(&cluster[0]).await.expect("connect");
    c.timeout = CALL;
    init(&mut c, &trace, job).await;
    let mut pulled = Vec::new();
    for t in 0..4 {
        pulled.push(round(&mut c, &trace, job, t).await);
    }
    // A checkpoint of every job (the client container's too: a shard that
    // restarts has only the jobs of its checkpoints).
    let done = c.checkpoint(None).await.expect("checkpoint");
    assert_eq!(done.len(), 2, "{done:?}");
    let ours = done.iter().find(|j| j.job == job).expect("our job");
    assert_eq!(ours.round, 4);

    // Shard 2 dies mid-round (worker 0 of round 4 has pushed).
    push(&mut c, &trace, job, 4, 0).await.expect("push");
    dk.docker(&["kill", &dk.shard(2)], Duration::from_secs(30));
    let started = Instant::now();
    let err = push(&mut c, &trace, job, 4, 1)
        .await
        .expect_err("shard 2 is down");
    expect_unreachable(&err, 2);
    assert!(
        started.elapsed() < FAIL_WITHIN,
        "failed after {:?}",
        started.elapsed()
    );
    // It comes back from its volume at the checkpoint's round.
    dk.docker(&["start", &dk.shard(2)], Duration::from_secs(60));
    dk.wait_healthy(&dk.shard(2), HEALTHY_WITHIN);
    let logs = dk.logs(&dk.shard(2));
    assert!(
        logs.lines()
            .any(|l| l.contains("job restored from its checkpoint")
                && l.contains(&format!("job={job}"))
                && l.contains("round=4")),
        "shard 2 restored round 4:\n{logs}"
    );
    let s = status(&mut c, job).await;
    assert!(
        s.shards.iter().all(|sh| sh.up && sh.round == 4),
        "{:?}",
        s.shards
    );
    // The workers push round 4 again (duplicates are counted once) and
    // training goes on.
    pulled.push(round(&mut c, &trace, job, 4).await);
    for t in 5..8 {
        pulled.push(round(&mut c, &trace, job, t).await);
    }

    // Shard 1 is cut off the network mid-round: every worker's push fails
    // in time naming it, and so does a pull; nothing hangs.
    push(&mut c, &trace, job, 8, 0).await.expect("push");
    dk.docker(
        &["network", "disconnect", &dk.network(), &dk.shard(1)],
        Duration::from_secs(30),
    );
    for w in 1..trace.workers {
        let started = Instant::now();
        let err = push(&mut c, &trace, job, 8, w)
            .await
            .expect_err("shard 1 is cut off");
        expect_unreachable(&err, 1);
        assert!(
            started.elapsed() < FAIL_WITHIN,
            "failed after {:?}",
            started.elapsed()
        );
    }
    let started = Instant::now();
    let err = tokio::time::timeout(CALL * 3, c.pull(job, 9))
        .await
        .expect("pull ends")
        .expect_err("round 8 cannot complete");
    // The pull waits on the first shard it asks, which names the round it
    // is stuck at.
    let st = err.status().expect("a status");
    assert!(
        st.code() == Code::DeadlineExceeded && st.message().contains("round 9 not reached"),
        "{err}"
    );
    assert!(
        started.elapsed() < FAIL_WITHIN,
        "failed after {:?}",
        started.elapsed()
    );
    let s = status(&mut c, job).await;
    assert!(!s.shards[1].up, "shard 1 is reported down: {:?}", s.shards);
    assert!(
        s.shards.iter().all(|sh| sh.round == 8 || !sh.up),
        "no shard applied round 8: {:?}",
        s.shards
    );
    // Back on the network at its address; the workers retry round 8 and
    // the run completes.
    dk.docker(
        &[
            "network",
            "connect",
            "--ip",
            &ips[1],
            &dk.network(),
            &dk.shard(1),
        ],
        Duration::from_secs(30),
    );
    pulled.push(retry_round(&mut c, &trace, job, 8).await);
    for t in 9..trace.steps {
        pulled.push(round(&mut c, &trace, job, t).await);
    }
    let last = pulled.last().expect("rounds");
    assert_eq!(
        bits(last),
        bits(&want),
        "bit-identical to one uninterrupted shard"
    );
    assert_eq!(last.last, want.last, "same norm, coefficient, lr and step");
    check_against_trace(&trace_path, &trace, &pulled);
    drop(c);

    // `docker stop`: the coordinator checkpoints every job and exits 0,
    // then the other shards exit 0.
    for i in 0..3 {
        dk.docker(&["stop", &dk.shard(i)], Duration::from_secs(60));
        let code = dk.docker(
            &["inspect", "-f", "{{.State.ExitCode}}", &dk.shard(i)],
            Duration::from_secs(30),
        );
        assert_eq!(code, "0", "shard {i} exits 0:\n{}", dk.logs(&dk.shard(i)));
    }
    let logs = dk.logs(&dk.shard(0));
    assert!(
        logs.lines()
            .any(|l| l.contains("final checkpoint taken") && l.contains("jobs=2")),
        "the coordinator took a final checkpoint:\n{logs}"
    );
    // Every shard's volume holds the job at the last round.
    for i in 0..3 {
        let rounds = dk.volume_ls(i, job);
        assert!(
            rounds.iter().any(|r| r.parse::<u64>() == Ok(trace.steps)),
            "shard {i}'s volume has round {}: {rounds:?}",
            trace.steps
        );
    }
    // The compose file's shards, as users start them, from the same image
    // on a free /24: healthy, a trace replays through them, and `stop`
    // stops the coordinator first, which exits 0 after its final
    // checkpoint.
    let net = dk.free_net_prefix();
    let network = format!("{}-compose", dk.prefix);
    let env = [
        ("PARAMD_IMAGE", dk.image.as_str()),
        ("PARAMD_NET", net.as_str()),
        ("PARAMD_NETWORK", network.as_str()),
    ];
    let minute = Duration::from_secs(60);
    // shard0 depends on the others: they start with it.
    dk.compose(&env, &["up", "-d", "shard0"], Duration::from_secs(180));
    let ids: Vec<String> = (0..3)
        .map(|i| dk.compose(&env, &["ps", "-q", &format!("shard{i}")], minute))
        .collect();
    for id in &ids {
        assert!(!id.is_empty(), "compose started every shard: {ids:?}");
        dk.wait_healthy(id, HEALTHY_WITHIN);
    }
    dk.replay_in_client_container(&network, &format!("http://{net}.10:50051"));
    dk.compose(&env, &["stop"], Duration::from_secs(180));
    for (i, id) in ids.iter().enumerate() {
        let code = dk.docker(&["inspect", "-f", "{{.State.ExitCode}}", id], minute);
        assert_eq!(code, "0", "compose shard {i} exits 0:\n{}", dk.logs(id));
    }
    let logs = dk.logs(&ids[0]);
    assert!(
        logs.lines()
            .any(|l| l.contains("final checkpoint taken") && l.contains("jobs=1")),
        "the compose coordinator took a final checkpoint:\n{logs}"
    );
}

// ---------------------------------------------------------------------
// The Grafana dashboard against a live paramd.

/// The metric names a PromQL expression selects: identifiers that are not
/// functions, aggregation clauses, keywords, label matchers, ranges or
/// Grafana variables.
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

// ---------------------------------------------------------------------
// The compose file and the Kubernetes manifests.

fn yaml_file(rel: &str) -> Yaml {
    let path = repo().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let mut v: Yaml = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    // `<<: *anchor` merge keys, as compose applies them.
    v.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
    v
}

fn s<'a>(v: &'a Yaml, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {:?}", at(v, path)))
}

/// The value at a dotted path (`spec.template.metadata`; `[n]` indexes).
fn at<'a>(v: &'a Yaml, path: &str) -> &'a Yaml {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
            Some(n) => &cur[n.parse::<usize>().expect("index")],
            None => &cur[part],
        };
        assert!(!cur.is_null(), "{path}: nothing at {part}");
    }
    cur
}

/// `${VAR:-default}` and `${VAR}` as docker-compose reads them with an
/// empty environment.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `paramd --print-config args...` with exactly `env` of the PARAMD_*
/// variables: the effective config, or why paramd refused it.
fn print_config(args: &[String], env: &[(String, String)]) -> Result<String, String> {
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg("30").arg(binary("paramd")).arg("--print-config");
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PARAMD_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().expect("run paramd --print-config");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{:?}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The config paramd prints holds `key = value`.
fn assert_config_has(config: &str, key: &str, value: &str) {
    assert!(
        config.lines().any(|l| l
            .split_once('=')
            .is_some_and(|(k, v)| k.trim() == key && v.trim() == value)),
        "{key} = {value} is not in\n{config}"
    );
}

/// Shard `i`'s arguments and environment as paramd takes them: it
/// accepts them, and they make it shard `i` of `cluster` with its
/// checkpoints on the volume.
fn check_shard_args(
    what: &str,
    i: usize,
    args: &[String],
    env: &[(String, String)],
    cluster: &[&str],
) {
    let config = print_config(args, env)
        .unwrap_or_else(|e| panic!("{what}: paramd refuses shard {i}'s arguments {args:?}: {e}"));
    assert_config_has(&config, "shard_index", &i.to_string());
    let list = |urls: &[String]| {
        let quoted: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    let urls: Vec<String> = cluster.iter().map(|u| (*u).to_owned()).collect();
    assert_config_has(&config, "cluster", &list(&urls));
    // The shards call each other on their peer port, never on the workers'.
    let peers: Vec<String> = urls.iter().map(|u| u.replace(":50051", ":50052")).collect();
    assert_config_has(&config, "peers", &list(&peers));
    assert_config_has(&config, "peer_listen", "\"0.0.0.0:50052\"");
    assert_config_has(&config, "checkpoint_dir", "\"/var/lib/paramd\"");
}

#[test]
fn the_compose_file_is_a_three_shard_cluster_with_prometheus_and_grafana() {
    let compose = yaml_file("deploy/compose.yaml");
    let services = at(&compose, "services");
    let mut ips = Vec::new();
    for i in 0..3 {
        let name = format!("shard{i}");
        let svc = at(services, &name);
        assert_eq!(interpolate(s(svc, "image")), "paramd:latest");
        let volume = format!("checkpoints-{i}:/var/lib/paramd");
        assert_eq!(at(svc, "volumes.[0]").as_str(), Some(volume.as_str()));
        assert!(
            at(&compose, "volumes")
                .as_mapping()
                .expect("volumes")
                .contains_key(format!("checkpoints-{i}")),
            "checkpoints-{i} is declared"
        );
        ips.push(interpolate(s(svc, "networks.paramd.ipv4_address")));
        let args: Vec<String> = at(svc, "command")
            .as_sequence()
            .expect("command is a list")
            .iter()
            .map(|a| a.as_str().expect("string").to_owned())
            .collect();
        assert_eq!(args, ["--shard-index", &i.to_string()]);
        let env: Vec<(String, String)> = at(svc, "environment")
            .as_mapping()
            .expect("environment")
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| v.as_u64().map(|n| n.to_string()))
                    .expect("a value");
                (k.as_str().expect("name").to_owned(), interpolate(&v))
            })
            .collect();
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{name} has no {k}"))
        };
        let cluster: Vec<String> = get("PARAMD_CLUSTER")
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(cluster.len(), 3, "{cluster:?}");
        assert_eq!(cluster[i], format!("http://{}:50051", ips[i]));
        // docker stops it after stop_grace_period: the shutdown grace fits.
        let grace: f64 = get("PARAMD_SHUTDOWN_GRACE").parse().expect("seconds");
        let stop: f64 = s(svc, "stop_grace_period")
            .strip_suffix('s')
            .expect("seconds")
            .parse()
            .expect("seconds");
        assert!(grace + 5.0 <= stop, "grace {grace} s, stop after {stop} s");
        let urls: Vec<&str> = cluster.iter().map(String::as_str).collect();
        check_shard_args("compose", i, &args, &env, &urls);
    }
    // Compose stops the coordinator first: its final checkpoint needs the
    // other shards.
    let deps: Vec<&str> = at(services, "shard0.depends_on")
        .as_sequence()
        .expect("a list")
        .iter()
        .map(|d| d.as_str().expect("a name"))
        .collect();
    assert_eq!(deps, ["shard1", "shard2"]);
    let subnet = interpolate(s(&compose, "networks.paramd.ipam.config.[0].subnet"));
    let net = subnet.strip_suffix(".0/24").expect("a /24");
    assert!(ips.iter().all(|ip| ip.starts_with(&format!("{net}."))));

    // Prometheus scrapes every shard's HTTP port, keeping paramd's `job`.
    let prom_svc = at(services, "prometheus");
    assert!(s(prom_svc, "image").starts_with("prom/prometheus"));
    let prom = yaml_file("deploy/prometheus/prometheus.yml");
    let scrape = at(&prom, "scrape_configs.[0]");
    assert_eq!(at(scrape, "honor_labels").as_bool(), Some(true));
    let targets: Vec<&str> = at(scrape, "static_configs.[0].targets")
        .as_sequence()
        .expect("targets")
        .iter()
        .map(|t| t.as_str().expect("string"))
        .collect();
    assert_eq!(targets, ["shard0:9464", "shard1:9464", "shard2:9464"]);

    install_promtool();
    let prom_path = repo().join("deploy/prometheus/prometheus.yml");
    let prom_path = prom_path.display().to_string();
    if let Err(e) = run_bounded(
        "promtool",
        &["check", "config", &prom_path],
        Duration::from_secs(60),
    ) {
        panic!("promtool refuses deploy/prometheus/prometheus.yml: {e}");
    }

    // Grafana mounts files that exist.
    let grafana = at(services, "grafana");
    assert!(s(grafana, "image").starts_with("grafana/grafana"));
    for v in at(grafana, "volumes").as_sequence().expect("volumes") {
        let src = v.as_str().expect("string").split(':').next().expect("src");
        if let Some(rel) = src.strip_prefix("./") {
            assert!(repo().join("deploy").join(rel).exists(), "{src} is missing");
        }
    }
    // Every published port is on loopback only.
    for (name, svc) in services.as_mapping().expect("services") {
        if let Some(ports) = svc.get("ports").and_then(Yaml::as_sequence) {
            for p in ports {
                assert!(
                    p.as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
                    "{name:?} publishes {p:?} beyond loopback"
                );
            }
        }
    }

    // docker-compose's own validation, when it is installed.
    if docker_or_skip() {
        let file = repo().join("deploy/compose.yaml");
        let file = file.display().to_string();
        match run_bounded(
            "docker-compose",
            &["-f", &file, "config"],
            Duration::from_secs(60),
        ) {
            Ok(out) => assert!(out.contains("shard2"), "{out}"),
            Err(e) if e.contains("cannot run") => {
                eprintln!("docker-compose is not installed: its validation was skipped")
            }
            Err(e) => panic!("docker-compose refuses deploy/compose.yaml: {e}"),
        }
    }
}

/// The Kubernetes objects of `deploy/k8s`, by kind.
fn k8s_objects() -> HashMap<String, Yaml> {
    let kustomization = yaml_file("deploy/k8s/kustomization.yaml");
    let mut objects = HashMap::new();
    for r in at(&kustomization, "resources")
        .as_sequence()
        .expect("resources")
    {
        let rel = format!("deploy/k8s/{}", r.as_str().expect("file name"));
        let text = std::fs::read_to_string(repo().join(&rel)).expect(&rel);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert!(s(&v, "apiVersion").contains('v'), "{rel}");
            let kind = s(&v, "kind").to_owned();
            objects.insert(kind, v);
        }
    }
    objects
}

#[test]
fn the_statefulset_finds_its_shards_through_the_headless_service() {
    let objects = k8s_objects();
    let sts = &objects["StatefulSet"];
    let svc = &objects["Service"];
    let cm = &objects["ConfigMap"];
    let name = s(sts, "metadata.name");
    let service = s(svc, "metadata.name");
    assert_eq!(s(sts, "spec.serviceName"), service);
    assert_eq!(s(svc, "spec.clusterIP"), "None", "headless");
    assert_eq!(
        at(svc, "spec.publishNotReadyAddresses").as_bool(),
        Some(true)
    );
    let labels = at(sts, "spec.template.metadata.labels");
    for (k, v) in at(sts, "spec.selector.matchLabels")
        .as_mapping()
        .expect("matchLabels")
        .iter()
        .chain(at(svc, "spec.selector").as_mapping().expect("selector"))
    {
        assert_eq!(&labels[k], v, "the pods carry {k:?}");
    }

    let pod = at(sts, "spec.template.spec");
    let ctr = at(pod, "containers.[0]");
    let port = |n: &str| {
        at(ctr, "ports")
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(n))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no {n} port"))
    };
    let (grpc, peer, metrics) = (port("grpc"), port("peer"), port("metrics"));
    assert_eq!(
        (grpc, peer, metrics),
        (50051, 50052, 9464),
        "the image's ports"
    );
    // Only the shards reach the peer port.
    let policy = &objects["NetworkPolicy"];
    let rules = at(policy, "spec.ingress").as_sequence().expect("rules");
    for rule in rules {
        let ports: Vec<&str> = rule["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .map(|p| p["port"].as_str().expect("a port name"))
            .collect();
        if ports.contains(&"peer") {
            assert_eq!(ports, ["peer"], "the peer port has a rule of its own");
            assert_eq!(
                &rule["from"][0]["podSelector"]["matchLabels"],
                at(sts, "spec.selector.matchLabels"),
                "only the shards reach the peer port"
            );
        }
    }
    assert!(
        rules
            .iter()
            .any(|r| r["ports"][0]["port"].as_str() == Some("peer")),
        "the NetworkPolicy names the peer port"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            at(ctr, &format!("{probe}.grpc.port")).as_u64(),
            Some(grpc),
            "{probe} asks the gRPC health service"
        );
    }
    let ann = at(sts, "spec.template.metadata.annotations");
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        ann["prometheus.io/port"].as_str(),
        Some(metrics.to_string().as_str())
    );
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"));
    assert!(!at(ctr, "resources.requests.cpu").is_null());
    assert!(!at(ctr, "resources.requests.memory").is_null());
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    assert_eq!(at(pod, "securityContext.runAsUser").as_u64(), Some(10001));

    // Checkpoints on the claim template's volume, config from the ConfigMap.
    let mounts = at(ctr, "volumeMounts").as_sequence().expect("mounts");
    let mount = |n: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(n))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no mount of {n}"))
    };
    let claim = s(sts, "spec.volumeClaimTemplates.[0].metadata.name");
    assert_eq!(mount(claim), "/var/lib/paramd");
    let config_volume = at(pod, "volumes")
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(s(cm, "metadata.name")))
        .expect("a volume of the ConfigMap");
    let config_dir = mount(config_volume["name"].as_str().expect("name"));
    let toml = cm["data"]["paramd.toml"]
        .as_str()
        .expect("the ConfigMap holds paramd.toml");

    // Shard index from the pod's ordinal, cluster from the service's names.
    let env = at(ctr, "env").as_sequence().expect("env");
    let var = |n: &str| {
        env.iter()
            .find(|e| e["name"].as_str() == Some(n))
            .unwrap_or_else(|| panic!("no {n}"))
    };
    assert_eq!(
        var("PARAMD_SHARD_INDEX")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.labels['apps.kubernetes.io/pod-index']")
    );
    assert_eq!(
        var("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.namespace")
    );
    let replicas = at(sts, "spec.replicas").as_u64().expect("replicas") as usize;
    let namespace = "fleet";
    let cluster = var("PARAMD_CLUSTER")["value"]
        .as_str()
        .expect("value")
        .replace("$(POD_NAMESPACE)", namespace);
    let urls: Vec<&str> = cluster.split(',').collect();
    assert_eq!(urls.len(), replicas, "one URL per replica: {urls:?}");
    for (i, u) in urls.iter().enumerate() {
        assert_eq!(
            *u,
            format!("http://{name}-{i}.{service}.{namespace}.svc:{grpc}")
        );
    }

    // The shutdown grace fits in the termination grace period.
    let grace: f64 = toml
        .lines()
        .find_map(|l| l.strip_prefix("shutdown_grace = "))
        .expect("shutdown_grace")
        .parse()
        .expect("seconds");
    let period = at(pod, "terminationGracePeriodSeconds")
        .as_u64()
        .expect("seconds") as f64;
    assert!(
        grace + 5.0 <= period,
        "grace {grace} s, killed after {period} s"
    );

    // Every pod's arguments, environment and config file, as paramd sees
    // them.
    let dir = tempfile::tempdir().expect("tempdir");
    let args: Vec<String> = at(ctr, "args")
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string").to_owned())
        .collect();
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .map(|p| &args[p + 1])
        .expect("--config FILE");
    let key = config_path
        .strip_prefix(&format!("{config_dir}/"))
        .expect("the config file is in the ConfigMap's mount");
    assert!(cm["data"][key].is_string(), "the ConfigMap holds {key}");
    let local = dir.path().join(key);
    std::fs::write(&local, toml).expect("write config");
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a == config_path {
                local.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let namespaced = |n: &str| {
        var(n)["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{n} has a value"))
            .replace("$(POD_NAMESPACE)", namespace)
    };
    for i in 0..replicas {
        let env = vec![
            ("PARAMD_SHARD_INDEX".to_owned(), i.to_string()),
            ("PARAMD_CLUSTER".to_owned(), cluster.clone()),
            (
                "PARAMD_PEER_LISTEN".to_owned(),
                namespaced("PARAMD_PEER_LISTEN"),
            ),
            ("PARAMD_PEERS".to_owned(), namespaced("PARAMD_PEERS")),
        ];
        check_shard_args("k8s", i, &args, &env, &urls);
    }
}

#[test]
fn the_dockerfile_runtime_stage_is_what_the_offline_script_builds() {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("Dockerfile");
    let marker = "FROM debian:bookworm-slim AS runtime";
    assert_eq!(
        text.lines().filter(|l| *l == marker).count(),
        1,
        "build-image.sh cuts the runtime stage at this line"
    );
    let runtime: Vec<&str> = text.lines().skip_while(|l| *l != marker).collect();
    for l in &runtime {
        if l.starts_with("COPY") {
            assert!(
                l.starts_with("COPY --from=build "),
                "the runtime stage copies only from the build stage: {l}"
            );
        }
        assert!(
            !l.starts_with("FROM") || *l == marker,
            "one runtime stage: {l}"
        );
    }
    for needed in [
        "USER 10001:10001",
        "ENTRYPOINT [\"paramd\"]",
        "EXPOSE 50051 50052 9464",
        "VOLUME [\"/var/lib/paramd\"]",
    ] {
        assert!(runtime.contains(&needed), "the runtime stage has {needed}");
    }
    assert!(runtime.iter().any(|l| l.starts_with("HEALTHCHECK")));
    assert!(
        text.lines()
            .any(|l| l.starts_with("FROM rust:") && l.ends_with(" AS build")),
        "a Rust build stage"
    );
}

// ---------------------------------------------------------------------
// Docker: every call bounded, everything a test makes labelled, named
// after it and removed when it ends, also when it fails.

/// Set to 1 to skip what needs a Docker engine.
const SKIP_DOCKER: &str = "PARAMD_SKIP_DOCKER";
/// Label of every container, network and volume a test makes; its value
/// is the test process's pid, so that leftovers of a killed run can be
/// told from a live run's.
const LABEL: &str = "io.paramd.test";

/// `program args...`, killed after `limit`: its stdout when it exits 0.
fn run_bounded(program: &str, args: &[&str], limit: Duration) -> Result<String, String> {
    run_bounded_env(program, args, &[], limit)
}

/// `run_bounded` with variables added to the environment.
fn run_bounded_env(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Result<String, String> {
    let out = std::process::Command::new("timeout")
        .arg("--kill-after=5")
        .arg(limit.as_secs().max(1).to_string())
        .arg(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run timeout {program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    match out.status.code() {
        Some(0) => Ok(stdout),
        // timeout(1): 124 when it stopped the command, 137 when it had to kill it.
        Some(124 | 137) => Err(format!(
            "{program} {} did not finish within {limit:?}",
            args.join(" ")
        )),
        // timeout(1): 127 when the program is not there.
        Some(127) => Err(format!("cannot run {program}: {stderr}")),
        _ => Err(format!(
            "{program} {}: {}\n{stdout}\n{stderr}",
            args.join(" "),
            out.status
        )),
    }
}

fn docker(args: &[&str], limit: Duration) -> Result<String, String> {
    run_bounded("docker", args, limit)
}

/// promtool, from Debian's `prometheus` package, through the project's
/// install script (idempotent; the Prometheus test uses it too).
fn install_promtool() {
    let script = repo().join("tests/scripts/install-prometheus.sh");
    let script = script.display().to_string();
    if let Err(e) = run_bounded("bash", &[&script], Duration::from_secs(900)) {
        panic!("{script} failed: {e}");
    }
}

/// Whether the Docker part runs: a Docker engine answers, or the test
/// fails saying how to skip it; PARAMD_SKIP_DOCKER=1 skips it.
fn docker_or_skip() -> bool {
    if std::env::var(SKIP_DOCKER).is_ok_and(|v| v == "1") {
        eprintln!("{SKIP_DOCKER}=1: the part that needs Docker is skipped");
        return false;
    }
    if let Err(e) = docker(
        &["version", "--format", "{{.Server.Version}}"],
        Duration::from_secs(30),
    ) {
        panic!("this test needs a Docker engine ({e}); set {SKIP_DOCKER}=1 to skip it");
    }
    true
}

/// Removes what earlier test processes that no longer run left behind
/// (killed before their guard ran).
fn sweep_leftovers() {
    let limit = Duration::from_secs(60);
    let dead = |pid: &str| !Path::new("/proc").join(pid).exists();
    let label = format!("{{{{.Label \"{LABEL}\"}}}}");
    let kinds: [(&[&str], &[&str]); 3] = [
        (&["ps", "-a"], &["rm", "-f", "-v"]),
        (&["network", "ls"], &["network", "rm"]),
        (&["volume", "ls"], &["volume", "rm", "-f"]),
    ];
    for (list, remove) in kinds {
        let format = format!("{{{{.Name}}}} {label}");
        let mut args = list.to_vec();
        let filter = format!("label={LABEL}");
        args.extend(["--filter", &filter, "--format", &format]);
        let Ok(out) = docker(&args, limit) else {
            continue;
        };
        for line in out.lines() {
            if let Some((name, pid)) = line.split_once(' ')
                && dead(pid)
            {
                let mut args = remove.to_vec();
                args.push(name);
                let _ = docker(&args, limit);
            }
        }
    }
    if let Ok(out) = docker(
        &[
            "images",
            "paramd-test",
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ],
        limit,
    ) {
        for image in out.lines() {
            let pid = image.rsplit(':').next().and_then(|t| t.split('-').next());
            if pid.is_some_and(dead) {
                let _ = docker(&["rmi", "-f", image], limit);
            }
        }
    }
}

/// One test's image, network, shard containers and volumes.
struct Docker {
    /// Names of everything this test makes start with it.
    prefix: String,
    image: String,
    label: String,
}

impl Docker {
    fn new() -> Docker {
        sweep_leftovers();
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Docker {
            prefix: format!("paramd-test-{pid}-{nanos}"),
            image: format!("paramd-test:{pid}-{nanos}"),
            label: format!("{LABEL}={pid}"),
        }
    }

    fn shard(&self, i: usize) -> String {
        format!("{}-shard{i}", self.prefix)
    }

    fn volume(&self, i: usize) -> String {
        format!("{}-checkpoints{i}", self.prefix)
    }

    fn network(&self) -> String {
        format!("{}-net", self.prefix)
    }

    /// `docker args...` within `limit`, or the test fails saying why.
    /// Blocking, so off the runtime's worker when called in a test.
    fn docker(&self, args: &[&str], limit: Duration) -> String {
        let run = || docker(args, limit);
        let r = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(run)
        } else {
            run()
        };
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The image, through deploy/build-image.sh with the binaries next to
    /// `paramd` (the ones `cargo test` built).
    fn build_image(&self, paramd: &Path) {
        let bin_dir = paramd.parent().expect("the binaries' folder");
        let target = bin_dir.parent().expect("the target folder");
        let script = repo().join("deploy/build-image.sh");
        let run = || {
            std::process::Command::new("timeout")
                .args(["--kill-after=10", "1800", "bash"])
                .arg(&script)
                .arg("--bin-dir")
                .arg(bin_dir)
                .args(["--tag", &self.image])
                .env("CARGO_TARGET_DIR", target)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run deploy/build-image.sh")
        };
        let out = tokio::task::block_in_place(run);
        assert!(
            out.status.success(),
            "deploy/build-image.sh failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A private network with addresses the host reaches, and `n` fixed
    /// addresses on it. Docker picks a free subnet; the network is made
    /// again with that subnet given, which fixed addresses need.
    fn create_network(&self, n: usize) -> Vec<String> {
        let limit = Duration::from_secs(30);
        let net = self.network();
        self.docker(&["network", "create", "--label", &self.label, &net], limit);
        let subnet = self.docker(
            &[
                "network",
                "inspect",
                "-f",
                "{{(index .IPAM.Config 0).Subnet}}",
                &net,
            ],
            limit,
        );
        self.docker(&["network", "rm", &net], limit);
        self.docker(
            &[
                "network",
                "create",
                "--label",
                &self.label,
                "--subnet",
                &subnet,
                &net,
            ],
            limit,
        );
        let base: Vec<u8> = subnet
            .split('/')
            .next()
            .expect("address")
            .split('.')
            .map(|o| o.parse().expect("an IPv4 subnet"))
            .collect();
        assert_eq!(base.len(), 4, "{subnet}");
        (0..n)
            .map(|i| {
                format!(
                    "{}.{}.{}.{}",
                    base[0],
                    base[1],
                    base[2],
                    base[3] + 10 + i as u8
                )
            })
            .collect()
    }

    /// Starts shard `i` at `ip` with its own volume, as compose.yaml does:
    /// settings in the environment, the shard index as an argument.
    fn run_shard(&self, i: usize, ip: &str, env: &[(&str, String)]) {
        let limit = Duration::from_secs(60);
        let volume = self.volume(i);
        self.docker(
            &["volume", "create", "--label", &self.label, &volume],
            limit,
        );
        let name = self.shard(i);
        let mount = format!("{volume}:/var/lib/paramd");
        let network = self.network();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &self.label,
            "--network",
            &network,
            "--ip",
            ip,
            "-v",
            &mount,
        ];
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for e in &env {
            args.extend(["-e", e]);
        }
        let index = i.to_string();
        args.extend([self.image.as_str(), "--shard-index", &index]);
        self.docker(&args, limit);
    }

    /// Waits until the image's health check finds `name` healthy.
    fn wait_healthy(&self, name: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let state = self.docker(
                &[
                    "inspect",
                    "-f",
                    "{{.State.Status}} {{.State.Health.Status}}",
                    name,
                ],
                Duration::from_secs(30),
            );
            match state.as_str() {
                "running healthy" => return,
                "running starting" | "running unhealthy" | "created starting" => {}
                other => panic!("{name} is {other}:\n{}", self.logs(name)),
            }
            assert!(
                Instant::now() < deadline,
                "{name} not healthy within {within:?} ({state}):\n{}",
                self.logs(name)
            );
            // Polling the engine's view; the health check itself runs
            // every few seconds.
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(250)));
        }
    }

    fn exec(&self, name: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.docker(&args, Duration::from_secs(30))
    }

    fn logs(&self, name: &str) -> String {
        // paramd logs to stdout; docker logs keeps both streams apart.
        let run = || {
            std::process::Command::new("timeout")
                .args(["30", "docker", "logs", name])
                .output()
        };
        match tokio::task::block_in_place(run) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(no logs: {e})"),
        }
    }

    /// `sh args...` in a throwaway container of the image on `network`,
    /// with the golden traces at /golden.
    fn client_container(&self, network: &str, args: &[&str]) -> String {
        let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden");
        let mount = format!("{}:/golden:ro", golden.display());
        let name = format!("{}-client", self.prefix);
        let mut a = vec![
            "run",
            "--rm",
            "--name",
            &name,
            "--label",
            &self.label,
            "--network",
            network,
            "-v",
            &mount,
            "--entrypoint",
            "sh",
            &self.image,
        ];
        a.extend_from_slice(args);
        self.docker(&a, Duration::from_secs(180))
    }

    /// `paramctl replay` of the client trace through the coordinator at
    /// `server`, then `paramctl compare` with torch's, in a client
    /// container on `network`, as the README shows.
    fn replay_in_client_container(&self, network: &str, server: &str) {
        let out = self.client_container(
            network,
            &[
                "-c",
                &format!(
                    "paramctl replay /golden/{CLIENT_TRACE} --server {server} \
                     --out /tmp/result.safetensors \
                     && paramctl compare /golden/{CLIENT_TRACE} /tmp/result.safetensors"
                ),
            ],
        );
        assert!(out.contains(" passed, 0 failed"), "{out}");
    }

    /// The first three octets of a /24 no Docker network uses: the start
    /// of a subnet Docker picks for a network made and removed at once.
    fn free_net_prefix(&self) -> String {
        let limit = Duration::from_secs(30);
        let probe = format!("{}-probe", self.prefix);
        self.docker(
            &["network", "create", "--label", &self.label, &probe],
            limit,
        );
        let subnet = self.docker(
            &[
                "network",
                "inspect",
                "-f",
                "{{(index .IPAM.Config 0).Subnet}}",
                &probe,
            ],
            limit,
        );
        self.docker(&["network", "rm", &probe], limit);
        let (prefix, _) = subnet
            .split('/')
            .next()
            .and_then(|a| a.rsplit_once('.'))
            .unwrap_or_else(|| panic!("an IPv4 subnet: {subnet}"));
        prefix.to_owned()
    }

    /// `docker-compose -f deploy/compose.yaml -p <prefix> args...` with
    /// `env`, within `limit`.
    fn compose(&self, env: &[(&str, &str)], args: &[&str], limit: Duration) -> String {
        let file = repo().join("deploy/compose.yaml").display().to_string();
        let mut a = vec!["-f", file.as_str(), "-p", self.prefix.as_str()];
        a.extend_from_slice(args);
        tokio::task::block_in_place(|| run_bounded_env("docker-compose", &a, env, limit))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The checkpoint rounds of `job` in shard `i`'s volume.
    fn volume_ls(&self, i: usize, job: &str) -> Vec<String> {
        let mount = format!("{}:/v:ro", self.volume(i));
        let dir = format!("/v/{job}");
        let out = self.docker(
            &[
                "run",
                "--rm",
                "--label",
                &self.label,
                "-v",
                &mount,
                "--entrypoint",
                "ls",
                &self.image,
                &dir,
            ],
            Duration::from_secs(60),
        );
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let limit = Duration::from_secs(60);
        let filter = format!("name={}", self.prefix);
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter], limit) {
            for id in ids.lines() {
                if let Err(e) = docker(&["rm", "-f", "-v", id], limit) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
        // Networks and volumes, the compose project's included.
        for (list, remove) in [
            (["network", "ls", "-q"], ["network", "rm"]),
            (["volume", "ls", "-q"], ["volume", "rm"]),
        ] {
            let mut args = list.to_vec();
            args.extend(["--filter", &filter]);
            if let Ok(names) = docker(&args, limit) {
                for n in names.lines() {
                    let mut args = remove.to_vec();
                    args.push(n);
                    if let Err(e) = docker(&args, limit) {
                        eprintln!("cleanup: {e}");
                    }
                }
            }
        }
        // Absent when the test failed before making it.
        let _ = docker(&["rmi", "-f", &self.image], limit);
    }
}
