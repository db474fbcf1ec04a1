//! Real `paramd` and `paramctl` processes: started, waited for, signalled
//! and killed with the test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::ports::peer_port;

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
