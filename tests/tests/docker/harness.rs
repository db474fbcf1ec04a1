//! Docker: every call bounded, everything a test makes labelled, named
//! after it and removed when it ends, also when it fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{CLIENT_TRACE, repo};

/// Set to 1 to skip what needs a Docker engine.
const SKIP_DOCKER: &str = "PARAMD_SKIP_DOCKER";
/// Label of every container, network and volume a test makes; its value
/// is the test process's pid, so that leftovers of a killed run can be
/// told from a live run's.
const LABEL: &str = "io.paramd.test";

/// `program args...`, killed after `limit`: its stdout when it exits 0.
pub(crate) fn run_bounded(program: &str, args: &[&str], limit: Duration) -> Result<String, String> {
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

pub(crate) fn docker(args: &[&str], limit: Duration) -> Result<String, String> {
    run_bounded("docker", args, limit)
}

/// promtool, from Debian's `prometheus` package, through the project's
/// install script (idempotent; the Prometheus test uses it too).
pub(crate) fn install_promtool() {
    let script = repo().join("tests/scripts/install-prometheus.sh");
    let script = script.display().to_string();
    if let Err(e) = run_bounded("bash", &[&script], Duration::from_secs(900)) {
        panic!("{script} failed: {e}");
    }
}

/// Whether the Docker part runs: a Docker engine answers, or the test
/// fails saying how to skip it; PARAMD_SKIP_DOCKER=1 skips it.
pub(crate) fn docker_or_skip() -> bool {
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
pub(crate) struct Docker {
    /// Names of everything this test makes start with it.
    pub(crate) prefix: String,
    pub(crate) image: String,
    label: String,
}

impl Docker {
    pub(crate) fn new() -> Docker {
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

    pub(crate) fn shard(&self, i: usize) -> String {
        format!("{}-shard{i}", self.prefix)
    }

    pub(crate) fn volume(&self, i: usize) -> String {
        format!("{}-checkpoints{i}", self.prefix)
    }

    pub(crate) fn network(&self) -> String {
        format!("{}-net", self.prefix)
    }

    /// `docker args...` within `limit`, or the test fails saying why.
    /// Blocking, so off the runtime's worker when called in a test.
    pub(crate) fn docker(&self, args: &[&str], limit: Duration) -> String {
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
    pub(crate) fn build_image(&self, paramd: &Path) {
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
    pub(crate) fn create_network(&self, n: usize) -> Vec<String> {
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
    pub(crate) fn run_shard(&self, i: usize, ip: &str, env: &[(&str, String)]) {
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
    pub(crate) fn wait_healthy(&self, name: &str, within: Duration) {
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

    pub(crate) fn exec(&self, name: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.docker(&args, Duration::from_secs(30))
    }

    pub(crate) fn logs(&self, name: &str) -> String {
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
    pub(crate) fn replay_in_client_container(&self, network: &str, server: &str) {
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
    pub(crate) fn free_net_prefix(&self) -> String {
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
    pub(crate) fn compose(&self, env: &[(&str, &str)], args: &[&str], limit: Duration) -> String {
        let file = repo().join("deploy/compose.yaml").display().to_string();
        let mut a = vec!["-f", file.as_str(), "-p", self.prefix.as_str()];
        a.extend_from_slice(args);
        tokio::task::block_in_place(|| run_bounded_env("docker-compose", &a, env, limit))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The checkpoint rounds of `job` in shard `i`'s volume.
    pub(crate) fn volume_ls(&self, i: usize, job: &str) -> Vec<String> {
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
