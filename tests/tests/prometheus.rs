//! A real Prometheus server (Debian's package, installed by
//! `tests/scripts/install-prometheus.sh`) scrapes a real paramd during a
//! replay; its query API then gives the same lr and grad norm of the last
//! round as `paramctl status`. `promtool check metrics` finds nothing to say
//! about the live `/metrics`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use paramd_client::replay::{ReplayOptions, replay};
use paramd_tests::{Daemon, http_get, install, paramctl_status, reserve_ports};

/// A Prometheus server scraping `target` every second, on a loopback port,
/// with its storage in a temporary directory; killed when dropped.
struct Prometheus {
    _child: tokio::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        // paramd labels its series with `job`; honor_labels keeps that label
        // instead of renaming it `exported_job`.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: paramd\n    honor_labels: true\n    \
             static_configs:\n      - targets: ['{target}']\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = reserve_ports(1)[0];
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            _child: child,
            addr,
            _dir: dir,
        };
        let ready = wait_for(
            "Prometheus to be ready",
            Duration::from_secs(60),
            || async { matches!(http_get(addr, "/-/ready").await, Ok((200, _))).then_some(()) },
        )
        .await;
        assert!(ready.is_some(), "Prometheus on {addr} never became ready");
        p
    }

    /// The value of the single series `query` returns, if it returns one.
    async fn query(&self, query: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", urlencode(query));
        let (code, body) = http_get(self.addr, &path).await.ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `probe` until it gives a value or `limit` passes.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    while start.elapsed() < limit {
        interval.tick().await;
        if let Some(v) = probe().await {
            return Some(v);
        }
    }
    eprintln!("gave up waiting for {what} after {limit:?}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_values_paramctl_reports() {
    install("install-prometheus.sh");
    let ports = reserve_ports(2);
    let grpc = format!("127.0.0.1:{}", ports[0]);
    let http: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().expect("addr");
    let _daemon = Daemon::start(&["--listen", &grpc, "--http-listen", &http.to_string()])
        .await
        .expect("paramd starts");
    let prometheus = Prometheus::start(http).await;

    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/adamw_param_groups.safetensors");
    let opts = ReplayOptions {
        credentials: Default::default(),
        server: format!("http://{grpc}"),
        job: Some("scraped".into()),
        every_step: false,
    };
    replay(&trace, &opts).await.expect("replay");

    // What paramctl status reports for the last round.
    let status = paramctl_status(&opts.server, Some("scraped")).await;
    let job = &status["jobs"][0];
    let last = &job["last"];
    let lrs: Vec<f64> = last["lr"]
        .as_array()
        .expect("lr per group")
        .iter()
        .map(|v| v.as_f64().expect("lr"))
        .collect();
    assert_eq!(lrs.len(), 2, "two param groups: {job}");
    let grad_norm = last["grad_norm"].as_f64().expect("grad_norm");
    let round = job["round"].as_f64().expect("round");

    // Prometheus has them once a scrape after the last round landed.
    let scraped_round = wait_for(
        "the last round in Prometheus",
        Duration::from_secs(30),
        || async {
            let r = prometheus.query(r#"paramd_round{job="scraped"}"#).await?;
            (r == round).then_some(r)
        },
    )
    .await;
    assert_eq!(
        scraped_round,
        Some(round),
        "Prometheus never saw round {round}"
    );
    let norm = prometheus
        .query(r#"paramd_grad_norm{job="scraped"}"#)
        .await
        .expect("paramd_grad_norm in Prometheus");
    // An f32 on both sides: status prints its shortest form, Prometheus the
    // exact f64 widening.
    assert_eq!(
        norm as f32, grad_norm as f32,
        "grad norm: Prometheus vs paramctl status"
    );
    for (g, want) in lrs.iter().enumerate() {
        let q = format!(r#"paramd_learning_rate{{job="scraped",group="{g}"}}"#);
        let got = prometheus
            .query(&q)
            .await
            .expect("paramd_learning_rate in Prometheus");
        assert_eq!(got, *want, "lr of group {g}: Prometheus vs paramctl status");
    }
    let rounds = prometheus
        .query(r#"paramd_rounds_total{job="scraped"}"#)
        .await
        .expect("paramd_rounds_total in Prometheus");
    assert_eq!(rounds, round);

    // promtool's lint of the live exposition.
    let (code, body) = http_get(http, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200);
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = promtool.stdin.take().expect("stdin");
        stdin.write_all(body.as_bytes()).await.expect("write");
    }
    let out = tokio::time::timeout(Duration::from_secs(30), promtool.wait_with_output())
        .await
        .expect("promtool finishes")
        .expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
}
