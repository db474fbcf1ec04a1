//! The status page (`GET /` on the HTTP port) and its JSON API, against a
//! real daemon that replayed two golden traces: the API gives what
//! `paramctl status --json` gives, the history one entry per round with
//! the lr and grad norm the trace expects, and a real headless Chromium
//! (Debian's package, installed by `tests/scripts/install-chromium.sh`)
//! draws one chart per series with a point per round. The screenshot it
//! takes is kept in the target directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use paramd_client::replay::{ReplayOptions, replay};
use paramd_client::trace::Trace;
use paramd_tests::{Daemon, http_get, install, paramctl_status, reserve_ports};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name)
}

async fn get_json(http: SocketAddr, path: &str) -> (u16, Value) {
    let (code, body) = http_get(http, path).await.expect("GET");
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (code, value)
}

/// The response head of `GET path`, lowercased.
async fn head_of(http: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(http).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_lowercase();
    text.split("\r\n\r\n").next().unwrap_or("").to_owned()
}

fn close(got: f64, want: f64, rtol: f64) -> bool {
    (got - want).abs() <= 1e-6 + rtol * want.abs()
}

/// Runs headless Chromium on `url` with `args`; returns its stdout.
async fn chromium(url: &str, args: &[String], profile: &Path) -> String {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        // Timers run in virtual time: the page polls, fetches and draws
        // as it would over seconds, without the test waiting for them.
        "--virtual-time-budget=10000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium finishes within 120 s")
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of attribute `name` in the first tag of `dom` that holds
/// `marker`.
fn attribute(dom: &str, marker: &str, name: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{name}=\"");
    let i = tag.find(&key)? + key.len();
    Some(tag[i..i + tag[i..].find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_replayed_trace_in_a_real_browser() {
    let ports = reserve_ports(2);
    let grpc = format!("127.0.0.1:{}", ports[0]);
    let http: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().expect("addr");
    let _daemon = Daemon::start(&["--listen", &grpc, "--http-listen", &http.to_string()])
        .await
        .expect("paramd starts");
    let server = format!("http://{grpc}");
    for (file, job) in [
        ("adamw_warmup_cosine_clip.safetensors", "warmup-cosine"),
        ("adamw_param_groups.safetensors", "param-groups"),
    ] {
        let opts = ReplayOptions {
            credentials: Default::default(),
            server: server.clone(),
            job: Some(job.into()),
            every_step: false,
        };
        replay(&golden(file), &opts).await.expect("replay");
    }

    // The API: what paramctl reports, for every job and for one.
    let (code, all) = get_json(http, "/api/v1/jobs").await;
    assert_eq!(code, 200);
    assert_eq!(all, paramctl_status(&server, None).await);
    let (code, one) = get_json(http, "/api/v1/jobs/param-groups").await;
    assert_eq!(code, 200);
    let want = paramctl_status(&server, Some("param-groups")).await;
    assert_eq!(one, want["jobs"][0]);

    // The history: one entry per round, the lr and grad norm of the trace.
    let trace = Trace::load(&golden("adamw_param_groups.safetensors")).expect("trace");
    let (code, history) = get_json(http, "/api/v1/jobs/param-groups/history").await;
    assert_eq!(code, 200);
    assert_eq!(history["groups"], trace.groups);
    let rounds = history["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len() as u64, trace.steps);
    for (t, e) in rounds.iter().enumerate() {
        assert_eq!(e["round"], t, "{e}");
        let lrs = &trace.tensors[&format!("lr/{t}")].values;
        for (g, want) in lrs.iter().enumerate() {
            let got = e["lr"][g].as_f64().expect("lr");
            assert!(
                close(got, *want, 1e-4),
                "round {t} group {g}: lr {got}, torch {want}"
            );
        }
        let want = trace.tensors[&format!("grad_norm/{t}")].values[0];
        let got = e["grad_norm"].as_f64().expect("grad_norm");
        assert!(
            close(got, want, 1e-3),
            "round {t}: grad norm {got}, torch {want}"
        );
        assert!(e["seconds"].as_f64().expect("seconds") >= 0.0);
    }
    let (_, later) = get_json(http, "/api/v1/jobs/param-groups/history?since=7").await;
    let later: Vec<&Value> = later["rounds"].as_array().expect("rounds").iter().collect();
    assert_eq!(later.first().map(|e| &e["round"]), Some(&Value::from(7)));
    assert_eq!(later.len() as u64, trace.steps - 7);
    let (code, missing) = get_json(http, "/api/v1/jobs/nope/history").await;
    assert_eq!(
        (code, &missing["reason"]),
        (404, &Value::from("unknown_job"))
    );
    let (code, _) = get_json(http, "/api/v1/jobs/param-groups/history?since=-1").await;
    assert_eq!(code, 400);

    // A round with one of its two workers in: the late one is named.
    let c = paramd_client::Client::connect(&server)
        .await
        .expect("connect");
    let grads: Vec<Vec<f32>> = trace
        .grads(0, 0)
        .expect("gradients")
        .into_iter()
        .map(|g| g.expect("every gradient"))
        .collect();
    let mut pusher = c.clone();
    pusher
        .push("param-groups", 0, trace.steps, &trace.named(&grads))
        .await
        .expect("push");
    let (_, one) = get_json(http, "/api/v1/jobs/param-groups").await;
    assert_eq!(one["waiting_for"], serde_json::json!([1]), "{one}");
    assert_eq!(one["workers_pushed"], 1);

    // The page only runs its own script, whatever a value holds.
    let head = head_of(http, "/").await;
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );

    install("install-chromium.sh");
    let profile = tempfile::tempdir().expect("profile dir");
    let url = format!("http://{http}/#param-groups");
    let dom = chromium(&url, &["--dump-dom".into()], profile.path()).await;
    let round = want["jobs"][0]["round"].to_string();
    assert_eq!(
        attribute(&dom, "data-job=", "data-job").as_deref(),
        Some("param-groups"),
        "{dom}"
    );
    assert_eq!(attribute(&dom, "data-job=", "data-round"), Some(round));
    for series in ["lr", "grad_norm", "clip_coefficient", "round_seconds"] {
        let marker = format!("data-series=\"{series}\"");
        let points = attribute(&dom, &marker, "data-points");
        assert_eq!(
            points,
            Some(trace.steps.to_string()),
            "chart {series}: {dom}"
        );
    }
    // One line per param group in the lr chart, each with a point per round.
    let lr = &dom[dom.find("data-series=\"lr\"").expect("lr chart")..];
    let lr = &lr[..lr.find("</figure>").expect("end of chart")];
    let lines: Vec<&str> = lr.split("<polyline").skip(1).collect();
    assert_eq!(lines.len(), trace.groups);
    for line in lines {
        let line = format!("<polyline{line}");
        let points = attribute(&line, " points=", "points").expect("points");
        assert_eq!(points.split_whitespace().count() as u64, trace.steps);
    }
    // Both jobs are listed, and the late worker is named.
    assert!(dom.contains("data-job=\"warmup-cosine\""));
    assert!(dom.contains("1 of 2 (waiting for 1)"), "{dom}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &url,
        &[
            "--window-size=1280,1150".into(),
            format!("--screenshot={}", shot.display()),
        ],
        profile.path(),
    )
    .await;
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
}
