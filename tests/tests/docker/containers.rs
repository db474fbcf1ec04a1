//! Three shard containers and a client container: a golden trace
//! replayed, a kill and restart, a partition, a clean stop.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use paramd::NodeConfig;
use paramd_client::replay::ReplayResult;
use paramd_client::trace::{Tolerance, Trace, compare, read_tensors};
use paramd_client::{Client, ClientError, Pulled};
use paramd_tests::{TestServer, binary};
use tonic::Code;

use crate::harness::{Docker, docker_or_skip};
use crate::{CALL, CHUNK_BYTES, FAIL_WITHIN, HEALTHY_WITHIN, TRACE, golden};

/// One round of the trace: every worker pushes step `t`, then the
/// parameters after it are pulled.
pub(crate) async fn round(c: &mut Client, trace: &Trace, job: &str, t: u64) -> Pulled {
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

pub(crate) async fn push(
    c: &mut Client,
    trace: &Trace,
    job: &str,
    t: u64,
    w: u32,
) -> Result<(), ClientError> {
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
pub(crate) async fn status(c: &mut Client, job: &str) -> paramd_client::v1::JobStatus {
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
