//! Shared helpers of the integration tests: an in-process server on
//! loopback ports the OS picked, the golden traces, and a tiny HTTP GET.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use paramd::NodeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A paramd serving in this process on `127.0.0.1:0`, shut down on drop.
#[derive(Debug)]
pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The shard-to-shard service's address, on a cluster's shard.
    pub peer: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with default settings.
    pub async fn start() -> TestServer {
        Self::with_config(NodeConfig::default()).await
    }

    /// Starts a server with `config`. The listeners are bound before the
    /// server task starts, so the addresses accept connections at once.
    pub async fn with_config(config: NodeConfig) -> TestServer {
        TestServer::serve(listeners(false).await, config)
    }

    fn serve(listeners: paramd::Listeners, config: NodeConfig) -> TestServer {
        let (grpc_addr, http_addr) = (
            listeners.grpc.local_addr().expect("addr"),
            listeners.http.local_addr().expect("addr"),
        );
        let peer = listeners
            .peer
            .as_ref()
            .map(|p| p.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(paramd::serve(
            listeners,
            config,
            Duration::from_secs(5),
            async {
                let _ = stopped.await;
            },
        ));
        TestServer {
            grpc: grpc_addr,
            http: http_addr,
            peer,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The gRPC URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A connected client.
    pub async fn client(&self) -> paramd_client::Client {
        paramd_client::Client::connect(&self.url())
            .await
            .expect("connect")
    }

    /// Stops the server and waits until it has returned.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Listeners on loopback ports the OS picks, with a peer listener when
/// the server is a shard of a cluster of more than one.
async fn listeners(peer: bool) -> paramd::Listeners {
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
    paramd::Listeners {
        grpc: bind().await,
        http: bind().await,
        peer: if peer { Some(bind().await) } else { None },
    }
}

/// Several in-process shards forming one cluster, listeners bound before
/// any server starts so that every shard's address is known up front.
#[derive(Debug)]
pub struct TestCluster {
    pub shards: Vec<TestServer>,
}

impl TestCluster {
    /// Starts `n` shards with `config` (its cluster fields are filled in).
    pub async fn start(n: usize, config: NodeConfig) -> TestCluster {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(listeners(n > 1).await);
        }
        let url = |l: &TcpListener| format!("http://{}", l.local_addr().expect("addr"));
        let urls: Vec<String> = all.iter().map(|l| url(&l.grpc)).collect();
        let peers: Vec<String> = all
            .iter()
            .filter_map(|l| l.peer.as_ref().map(url))
            .collect();
        let mut shards = Vec::new();
        for (i, listeners) in all.into_iter().enumerate() {
            let config = NodeConfig {
                shard_index: i,
                cluster: urls.clone(),
                peers: peers.clone(),
                ..config.clone()
            };
            shards.push(TestServer::serve(listeners, config));
        }
        TestCluster { shards }
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        self.shards[0].url()
    }

    /// Stops every shard.
    pub async fn shutdown(self) {
        for s in self.shards {
            s.shutdown().await;
        }
    }
}

/// Loopback ports free right now, for processes that must know each
/// other's addresses before they start (and again when they restart).
///
/// They are taken below the kernel's ephemeral range, where no `bind` to
/// port 0 (another daemon's HTTP port, an in-process server) can land on
/// one between a kill and a restart; each test process starts at its own
/// offset and never hands out a port twice.
pub fn reserve_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    // Ports [low, ephemeral_low): well above the privileged and the usual
    // service ports.
    let low = ephemeral_low.saturating_sub(12_000).max(10_000);
    let span = ephemeral_low.saturating_sub(low).max(1);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(low + (start + i) % span).expect("a port number");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "no {n} free ports below {ephemeral_low}");
    ports
}

/// The port of the shard-to-shard service of the shard whose workers'
/// port is `port` (one of `reserve_ports`): reserved the first time it is
/// asked for, the same one after, so a restarted shard gets it again.
pub fn peer_port(port: u16) -> u16 {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static PEERS: OnceLock<Mutex<HashMap<u16, u16>>> = OnceLock::new();
    let mut peers = PEERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *peers.entry(port).or_insert_with(|| reserve_ports(1)[0])
}

/// A job of `workers` workers training one parameter `w` of shape `shape`
/// with optimizer `kind` at learning rate `lr`, torch's defaults otherwise.
pub fn one_param_spec(
    kind: paramd_proto::v1::OptimizerKind,
    shape: &[u64],
    workers: u32,
    lr: f64,
) -> paramd_proto::v1::JobSpec {
    use paramd_proto::v1 as pb;
    pb::JobSpec {
        params: vec![pb::ParamSpec {
            name: "w".into(),
            shape: shape.to_vec(),
        }],
        optimizer: Some(pb::Optimizer {
            kind: kind as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(lr),
                ..Default::default()
            }),
        }),
        workers,
        ..Default::default()
    }
}

/// The golden traces copied into the repository.
pub fn golden_traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    traces.sort();
    assert!(!traces.is_empty(), "no traces in {}", dir.display());
    traces
}

/// `GET path` over HTTP/1.1, returning the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// The value of the Prometheus sample whose name and labels start with
/// `prefix` (e.g. `paramd_round{job="a"`), if present.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if all { value.parse().ok() } else { None }
        })
}

/// A binary of the workspace (`paramd`, `paramctl`), next to the test
/// executables. `cargo test --workspace` builds both before running tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` or run `cargo test --workspace`",
        path.display()
    );
    path
}

/// A real `paramd` process, killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    pub child: tokio::process::Child,
    /// What the daemon logged until it was serving.
    pub log: Vec<String>,
}

impl Daemon {
    /// Starts `paramd args...` and waits until it logs that it is ready
    /// (listening, checkpoints restored).
    pub async fn start(args: &[&str]) -> anyhow::Result<Daemon> {
        Daemon::start_with_env(args, &[]).await
    }

    /// Starts `paramd args...` with the environment variables `env` added
    /// (e.g. a `PARAMD_FAILPOINT`), and waits until it is ready.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Daemon> {
        let mut cmd = tokio::process::Command::new(binary("paramd"));
        cmd.args(args).envs(env.iter().copied());
        Daemon::spawn(cmd).await
    }

    /// Starts `cmd` (which runs paramd, e.g. through `sh -c 'ulimit ...;
    /// exec paramd ...'`) and waits until it is ready.
    pub async fn spawn(mut cmd: tokio::process::Command) -> anyhow::Result<Daemon> {
        use tokio::io::AsyncBufReadExt;
        if !cmd.as_std().get_envs().any(|(k, _)| k == "PARAMD_LOG") {
            cmd.env("PARAMD_LOG", "info");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut log = Vec::new();
        let serving = async {
            while let Some(line) = lines.next_line().await? {
                let done = line.contains("paramd ready");
                log.push(line);
                if done {
                    return Ok(true);
                }
            }
            anyhow::Ok(false)
        };
        let ok = tokio::time::timeout(Duration::from_secs(30), serving).await??;
        anyhow::ensure!(ok, "paramd exited before it was ready: {log:?}");
        // Keep draining the log so the daemon never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Daemon { child, log })
    }

    /// The HTTP address (`/metrics`, probes) the daemon logged at start.
    pub fn http_addr(&self) -> SocketAddr {
        self.log
            .iter()
            .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("http=")))
            .expect("the daemon logs its HTTP address")
            .parse()
            .expect("an address")
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.sigterm()?;
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??)
    }

    /// Sends SIGTERM without waiting, so that several daemons can be sent
    /// it at once.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("already exited"))?;
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(kill.success(), "kill -TERM {pid} failed");
        Ok(())
    }
}

/// Sends `signal` (`-STOP`, `-CONT`, `-TERM`, ...) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {signal} {pid}");
}

/// The flags of shard `i` of a cluster of real processes on loopback
/// `ports` (one port: a one-shard cluster), then `extra`.
pub fn shard_args(i: usize, ports: &[u16], extra: &[String]) -> Vec<String> {
    let mut a = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{}", ports[i]),
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    if ports.len() > 1 {
        let urls = |port: &dyn Fn(u16) -> u16| {
            ports
                .iter()
                .map(|&p| format!("http://127.0.0.1:{}", port(p)))
                .collect::<Vec<_>>()
                .join(",")
        };
        a.extend([
            "--shard-index".to_owned(),
            i.to_string(),
            "--cluster".to_owned(),
            urls(&|p| p),
            "--peer-listen".to_owned(),
            format!("127.0.0.1:{}", peer_port(ports[i])),
            "--peers".to_owned(),
            urls(&peer_port),
        ]);
    }
    a.extend_from_slice(extra);
    a
}

/// Starts shard `i` of the cluster on `ports` and waits until it is ready.
pub async fn start_shard(i: usize, ports: &[u16], extra: &[String]) -> Daemon {
    let args = shard_args(i, ports, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&args).await.expect("shard starts")
}

/// Starts shard `i` of the cluster on `ports` with the environment
/// variables `env` added, and waits until it is ready.
pub async fn start_shard_with_env(
    i: usize,
    ports: &[u16],
    extra: &[String],
    env: &[(&str, &str)],
) -> Daemon {
    let args = shard_args(i, ports, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_with_env(&args, env)
        .await
        .expect("shard starts")
}

/// Starts every shard of the cluster on `ports`, shard `i` with `extra(i)`.
pub async fn start_cluster(ports: &[u16], extra: impl Fn(usize) -> Vec<String>) -> Vec<Daemon> {
    let mut daemons = Vec::new();
    for i in 0..ports.len() {
        daemons.push(start_shard(i, ports, &extra(i)).await);
    }
    daemons
}

/// Waits (bounded) until job `job` serves workers again after a restart,
/// the shards having agreed on the round they restore; returns what a pull
/// of its current round gives. Pulls refused as UNAVAILABLE (restoring,
/// agreeing) are tried again, paced; any other error fails the test.
pub async fn wait_serving(c: &mut paramd_client::Client, job: &str) -> paramd_client::Pulled {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // This loop paces the tries itself and fails on any other error: the
    // client's own retries of UNAVAILABLE are off for it.
    let mut c = c.clone();
    c.retries = Some(0);
    loop {
        match c.pull(job, 0).await {
            Ok(p) => return p,
            Err(e) if e.status().map(tonic::Status::code) == Some(tonic::Code::Unavailable) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "job '{job}' does not serve after 30 s: {e}"
                );
                // Pacing the polls of a state change made by other
                // processes, which report it no other way.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("pull of job '{job}' failed: {e}"),
        }
    }
}

/// Runs `tests/scripts/<script>`, the project's installer of a tool a
/// test needs (Debian's package, when it is not on PATH yet); fails the
/// test with the script's output if it fails.
pub fn install(script: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = std::process::Command::new("bash")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `paramctl status --json` prints for `job` (every job with `None`)
/// on `server`.
pub async fn paramctl_status(server: &str, job: Option<&str>) -> serde_json::Value {
    let mut args = vec!["--server", server, "status", "--json"];
    if let Some(job) = job {
        args.extend(["--job", job]);
    }
    let out = tokio::process::Command::new(binary("paramctl"))
        .args(&args)
        .output()
        .await
        .expect("paramctl status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}
