//! Connections a hostile or careless fleet opens: at most
//! `--max-connections` are accepted at once (the rest wait in the backlog),
//! and a daemon out of file descriptors pauses accepting instead of
//! spinning, then serves again once connections close.

use std::time::Duration;

use paramd_client::Client;
use paramd_tests::{Daemon, binary, http_get, metric, reserve_ports};

fn flags(port: u16, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc")
        .count()
}

/// CPU time process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc");
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 here.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Opens `n` idle TCP connections to `port`; the kernel completes each
/// handshake whether or not paramd accepts it.
async fn idle_connections(port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    conns
}

/// Waits (bounded) until the daemon answers a status call.
async fn answers(url: &str) {
    let mut c = Client::lazy(url, paramd_client::Credentials::none()).expect("client");
    c.timeout = Duration::from_secs(20);
    c.status(None).await.expect("the daemon answers again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_to_be_accepted() {
    let port = reserve_ports(1)[0];
    let args = flags(port, &["--max-connections", "4"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&args).await.expect("paramd starts");
    let pid = d.child.id().expect("running");
    let before = open_fds(pid);
    let conns = idle_connections(port, 16).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while open_fds(pid) < before + 4 {
        assert!(tokio::time::Instant::now() < deadline, "4 are accepted");
        tokio::task::yield_now().await;
    }
    // A call on a further connection is not served while the cap is full:
    // its connection waits in the backlog until the call's deadline.
    let mut c = Client::lazy(
        &format!("http://127.0.0.1:{port}"),
        paramd_client::Credentials::none(),
    )
    .expect("client");
    (c.retries, c.timeout) = (Some(0), Duration::from_secs(1));
    c.status(None)
        .await
        .expect_err("a call beyond the cap is not served");
    let during = open_fds(pid);
    assert!(
        during <= before + 4,
        "{during} descriptors open with 16 connections and a cap of 4 (was {before})"
    );
    drop(conns);
    answers(&format!("http://127.0.0.1:{port}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_daemon_pauses_instead_of_spinning() {
    let port = reserve_ports(1)[0];
    let mut cmd = tokio::process::Command::new("sh");
    // A soft limit of 64 descriptors: a few dozen connections exhaust it.
    cmd.arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
        .arg(binary("paramd"))
        .args(flags(port, &[]));
    let d = Daemon::spawn(cmd).await.expect("paramd starts");
    let pid = d.child.id().expect("running");
    let http = d.http_addr();
    let conns = idle_connections(port, 100).await;
    // Accepting fails from the first connection past the limit on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while open_fds(pid) < 60 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "descriptors run out"
        );
        tokio::task::yield_now().await;
    }
    // Over two seconds out of descriptors, a spinning accept loop burns
    // most of a core (~150 ticks); pausing costs next to nothing.
    let start = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - start;
    assert!(
        used < 50,
        "{used} ticks of CPU in 2 s while out of descriptors"
    );
    drop(conns);
    answers(&format!("http://127.0.0.1:{port}")).await;
    let (_, body) = http_get(http, "/metrics").await.expect("metrics");
    let errors = metric(&body, "paramd_accept_errors_total", &[]);
    assert!(errors.is_some_and(|e| e >= 1.0), "{errors:?}");
}
