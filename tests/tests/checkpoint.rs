//! Checkpoints: kill -9 every shard, restart from the last checkpoint, push
//! the same gradients again from that round, and the result is bit-identical
//! to a run that never stopped. A corrupt checkpoint is set aside and the
//! one before it used; on a cluster every shard goes back to the newest
//! round all of them can restore. Processes stopped at exact points of a
//! checkpoint (`PARAMD_FAILPOINT`) lose no acknowledged checkpoint.

use std::path::Path;
use std::time::Duration;

use paramd_client::{Client, Pulled, v1 as pb};
use paramd_tests::{
    Daemon, TestServer, bits, reserve_ports, shard_args, start_cluster, start_shard_with_env,
    wait_serving,
};

const ROUNDS: u64 = 10;
const WORKERS: u32 = 2;

fn spec() -> pb::JobSpec {
    pb::JobSpec {
        params: vec![
            pb::ParamSpec {
                name: "enc.weight".into(),
                shape: vec![6, 5],
            },
            pb::ParamSpec {
                name: "enc.bias".into(),
                shape: vec![5],
            },
            pb::ParamSpec {
                name: "scale".into(),
                shape: vec![],
            },
        ],
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Adamw as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(0.05),
                amsgrad: Some(true),
                ..Default::default()
            }),
        }),
        param_groups: vec![
            pb::ParamGroup {
                params: vec!["enc.weight".into(), "enc.bias".into()],
                hyper: None,
            },
            pb::ParamGroup {
                params: vec!["scale".into()],
                hyper: Some(pb::Hyperparameters {
                    lr: Some(0.01),
                    weight_decay: Some(0.0),
                    ..Default::default()
                }),
            },
        ],
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::WarmupCosine(pb::WarmupCosine {
                warmup_steps: 2,
                total_steps: 8,
                min_lr_ratio: 0.1,
            })),
        }),
        clip: Some(pb::Clip { max_norm: 0.7 }),
        workers: WORKERS,
        ..Default::default()
    }
}

fn sizes() -> [usize; 3] {
    [30, 5, 1]
}

fn grads(round: u64, w: u32) -> Vec<Vec<f32>> {
    sizes()
        .iter()
        .enumerate()
        .map(|(p, &n)| {
            (0..n)
                .map(|i| {
                    (((i * 31 + p * 7 + round as usize * 13 + w as usize * 5) % 17) as f32 - 8.0)
                        * 0.1
                })
                .collect()
        })
        .collect()
}

async fn round(c: &mut Client, job: &str, t: u64) -> Pulled {
    for w in 0..WORKERS {
        let g = grads(t, w);
        let named = [
            ("enc.weight", g[0].as_slice()),
            ("enc.bias", g[1].as_slice()),
            ("scale", g[2].as_slice()),
        ];
        c.push(job, w, t, &named).await.expect("push");
    }
    c.pull(job, t + 1).await.expect("pull")
}

async fn init(c: &mut Client, job: &str) {
    let init: Vec<Vec<f32>> = sizes()
        .iter()
        .map(|&n| (0..n).map(|i| i as f32 * 0.01 - 0.1).collect())
        .collect();
    let named = [
        ("enc.weight", init[0].as_slice()),
        ("enc.bias", init[1].as_slice()),
        ("scale", init[2].as_slice()),
    ];
    c.init(job, spec(), &named).await.expect("init");
}

/// The run that never stops.
async fn uninterrupted() -> Pulled {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    init(&mut c, "run").await;
    let mut last = None;
    for t in 0..ROUNDS {
        last = Some(round(&mut c, "run", t).await);
    }
    server.shutdown().await;
    last.expect("rounds")
}

/// Checkpoints every 3 rounds into `ckpt`, chunks of 4 floats.
fn flags(ckpt: &Path) -> Vec<String> {
    let mut f = vec!["--checkpoint-dir".to_owned(), ckpt.display().to_string()];
    f.extend(
        [
            "--checkpoint-every",
            "3",
            "--keep-checkpoints",
            "2",
            "--chunk-bytes",
            "16",
        ]
        .map(str::to_owned),
    );
    f
}

/// Starts `n` shards, each with its own checkpoint directory under `dir`.
async fn start(n: usize, ports: &[u16], dir: &Path) -> Vec<Daemon> {
    start_cluster(&ports[..n], |i| flags(&dir.join(format!("shard{i}")))).await
}

/// Starts `n` shards sharing the checkpoint directory `ckpt`.
async fn start_shared(n: usize, ports: &[u16], ckpt: &Path) -> Vec<Daemon> {
    start_cluster(&ports[..n], |_| flags(ckpt)).await
}

async fn kill_all(daemons: Vec<Daemon>) {
    for mut d in daemons {
        d.child.kill().await.expect("kill -9");
    }
}

/// Waits (bounded) until the coordinator reports the job at `round`.
async fn round_is(c: &mut Client, job: &str, round: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status(Some(job)).await.expect("status");
        if s.jobs[0].round == round {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job at round {}, not {round}",
            s.jobs[0].round
        );
        tokio::task::yield_now().await;
    }
}

async fn resume_after_kill(shards: usize) {
    let want = uninterrupted().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(shards);
    let url = format!("http://127.0.0.1:{}", ports[0]);

    let daemons = start(shards, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    // Checkpoints at rounds 3 and 6; round 7 is applied but not saved.
    for t in 0..7 {
        round(&mut c, "run", t).await;
    }
    // The checkpoint of round 6 is taken before round 6 can be decided:
    // once a pull of round 7 returned, it exists.
    kill_all(daemons).await;

    let daemons = start(shards, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(wait_serving(&mut c, "run").await.round, 6);
    let s = c.status(Some("run")).await.expect("restored");
    assert_eq!(s.jobs[0].round, 6, "restored at the last checkpoint");
    for sh in &s.jobs[0].shards {
        assert_eq!(sh.round, 6, "every shard restored the same round: {sh:?}");
    }
    let mut last = None;
    for t in 6..ROUNDS {
        last = Some(round(&mut c, "run", t).await);
    }
    let got = last.expect("rounds");
    assert_eq!(
        bits(&got),
        bits(&want),
        "bit-identical to the run that never stopped"
    );
    assert_eq!(got.last, want.last, "same norm, coefficient, lr and step");
    round_is(&mut c, "run", ROUNDS).await;
    kill_all(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_resumes_bit_exactly_after_kill_9() {
    resume_after_kill(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_resume_bit_exactly_after_kill_9() {
    resume_after_kill(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_set_aside_and_the_previous_one_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(1);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let daemons = start(1, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    let mut after = Vec::new();
    for t in 0..7 {
        after.push(round(&mut c, "run", t).await);
    }
    // An explicit checkpoint too: rounds 3, 6 and 7 exist; 2 are kept.
    let done = c.checkpoint(Some("run")).await.expect("checkpoint");
    assert_eq!((done[0].job.as_str(), done[0].round), ("run", 7));
    kill_all(daemons).await;

    let job_dir = dir.path().join("shard0/run");
    let mut rounds: Vec<String> = std::fs::read_dir(&job_dir)
        .expect("job dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    rounds.sort();
    assert_eq!(rounds.len(), 2, "keep 2: {rounds:?}");
    // Flip one byte of the newest shard file: its checksum no longer matches.
    let newest = job_dir.join(&rounds[1]).join("shard-0-of-1.safetensors");
    let mut data = std::fs::read(&newest).expect("read");
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&newest, data).expect("corrupt");

    let daemons = start(1, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    let s = c.status(Some("run")).await.expect("restored");
    assert_eq!(s.jobs[0].round, 6, "the previous checkpoint");
    let p = c.pull("run", 6).await.expect("pull");
    assert_eq!(bits(&p), bits(&after[5]), "the parameters after round 6");
    let names: Vec<String> = std::fs::read_dir(&job_dir)
        .expect("job dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    assert!(
        names.iter().any(|n| n.contains(".bad-")),
        "set aside, not deleted: {names:?}"
    );
    kill_all(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_takes_a_final_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(1);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let ckpt = dir.path().join("ckpt").display().to_string();
    let a = [
        "--listen",
        &format!("127.0.0.1:{}", ports[0]),
        "--http-listen",
        "127.0.0.1:0",
        "--checkpoint-dir",
        &ckpt,
    ]
    .map(str::to_owned);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let d = Daemon::start(&a).await.expect("start");
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    let mut last = None;
    for t in 0..4 {
        last = Some(round(&mut c, "run", t).await);
    }
    assert_eq!(d.terminate().await.expect("terminate").code(), Some(0));

    let d = Daemon::start(&a).await.expect("restart");
    let mut c = Client::connect(&url).await.expect("connect");
    let p = c.pull("run", 4).await.expect("restored at round 4");
    assert_eq!(p.round, 4);
    assert_eq!(bits(&p), bits(&last.expect("rounds")));
    assert_eq!(d.terminate().await.expect("terminate").code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_once_restored_and_readyz_agrees() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(1);
    let daemons = start(1, &ports, dir.path()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", ports[0]))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut h = HealthClient::new(channel);
    for service in ["", "paramd.v1.ParamServer"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    // The HTTP probe agrees; its address is in the serving log line.
    let http = daemons[0].http_addr();
    let (code, body) = paramd_tests::http_get(http, "/readyz")
        .await
        .expect("readyz");
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    kill_all(daemons).await;
}

/// A checkpoint taken on `from` shards sharing one directory, restored on
/// `to` shards: the chunks are placed anew and training goes on exactly.
async fn reshard(from: usize, to: usize) {
    let want = uninterrupted().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("shared");
    let ports = reserve_ports(from.max(to));
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let daemons = start_shared(from, &ports, &ckpt).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    for t in 0..7 {
        round(&mut c, "run", t).await;
    }
    kill_all(daemons).await;

    let daemons = start_shared(to, &ports, &ckpt).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(wait_serving(&mut c, "run").await.round, 6);
    let s = c.status(Some("run")).await.expect("restored");
    assert_eq!(s.jobs[0].round, 6);
    assert_eq!(s.jobs[0].shards.len(), to);
    let total: u64 = s.jobs[0].shards.iter().map(|x| x.chunks).sum();
    assert!(
        s.jobs[0]
            .shards
            .iter()
            .all(|x| x.round == 6 && (to == 1 || x.chunks < total)),
        "{:?}",
        s.jobs[0].shards
    );
    let mut last = None;
    for t in 6..ROUNDS {
        last = Some(round(&mut c, "run", t).await);
    }
    assert_eq!(
        bits(&last.expect("rounds")),
        bits(&want),
        "{from} shards -> {to}: bit-identical"
    );
    kill_all(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_shard_checkpoint_restores_on_two_and_on_one() {
    reshard(3, 2).await;
    reshard(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_shard_checkpoint_in_separate_directories_restores_on_three() {
    let want = uninterrupted().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let daemons = start(2, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    for t in 0..7 {
        round(&mut c, "run", t).await;
    }
    kill_all(daemons).await;

    // Shard 2 starts with an empty directory (a new volume); the others
    // each hold their own file of round 6.
    let daemons = start(3, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(wait_serving(&mut c, "run").await.round, 6);
    every_shard_at(&mut c, 6).await;
    let s = c.status(Some("run")).await.expect("status");
    assert!(
        s.jobs[0].shards.iter().all(|x| x.chunks > 0),
        "the chunks are placed on three shards: {:?}",
        s.jobs[0].shards
    );
    for i in 0..3 {
        let round6 = shard_dir(dir.path(), i).join("run/00000000000000000006");
        for f in [
            "shard-0-of-2.safetensors",
            "shard-1-of-2.safetensors",
            "MANIFEST.json",
        ] {
            assert!(
                round6.join(f).is_file(),
                "shard {i} holds {f}: {:?}",
                entries(dir.path(), i)
            );
        }
    }
    finish_exactly(&mut c, 6, &want).await;
    kill_all(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_from_separate_directories_without_every_file_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let daemons = start(3, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    for t in 0..4 {
        round(&mut c, "run", t).await;
    }
    kill_all(daemons).await;
    // On one shard or on two, a file (shard 1's, shard 2's) is on no shard
    // of the new cluster: the coordinator does not start, and says which.
    for n in [1, 2] {
        let a = shard_args(0, &ports[..n], &flags(&shard_dir(dir.path(), 0)));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let err = Daemon::start(&a).await.expect_err("refuses to start");
        let want = if n == 1 {
            "shard-1-of-3"
        } else {
            "shard-2-of-3"
        };
        assert!(
            err.to_string()
                .contains(&format!("{want}.safetensors is neither"))
                && err.to_string().contains("copy it here"),
            "{n} shards: {err}"
        );
    }
    assert!(
        dir.path().join("shard0/run/00000000000000000003").is_dir(),
        "the checkpoint is left in place"
    );
}

/// The checkpoint directory of shard `i` under `dir`.
fn shard_dir(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("shard{i}"))
}

/// The names in job "run"'s checkpoint directory of shard `i`.
fn entries(dir: &Path, i: usize) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(shard_dir(dir, i).join("run"))
        .expect("job dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    names
}

/// Pushes the same gradients again from `from`, and checks the result is
/// bit-identical to the run that never stopped.
async fn finish_exactly(c: &mut Client, from: u64, want: &Pulled) {
    let mut last = None;
    for t in from..ROUNDS {
        last = Some(round(c, "run", t).await);
    }
    let got = last.expect("rounds");
    assert_eq!(
        bits(&got),
        bits(want),
        "resumed from round {from}: bit-identical to the run that never stopped"
    );
    assert_eq!(got.last, want.last, "same norm, coefficient, lr and step");
}

/// Every shard of the job holds `round`, as the coordinator sees them.
async fn every_shard_at(c: &mut Client, round: u64) {
    let s = c.status(Some("run")).await.expect("status");
    assert_eq!(s.jobs[0].round, round);
    assert!(
        s.jobs[0].shards.iter().all(|x| x.up && x.round == round),
        "every shard at round {round}: {:?}",
        s.jobs[0].shards
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_newest_checkpoint_is_corrupt_takes_every_shard_back_to_an_older_one() {
    let want = uninterrupted().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let daemons = start(3, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    // Checkpoints at rounds 3 and 6, then killed mid-round 7: worker 0
    // pushed, worker 1 not yet.
    for t in 0..7 {
        round(&mut c, "run", t).await;
    }
    let g = grads(7, 0);
    let named = [
        ("enc.weight", g[0].as_slice()),
        ("enc.bias", g[1].as_slice()),
        ("scale", g[2].as_slice()),
    ];
    c.push("run", 0, 7, &named).await.expect("push");
    kill_all(daemons).await;

    // Shard 1's file of round 6 loses a byte at its end.
    let newest = shard_dir(dir.path(), 1).join("run/00000000000000000006/shard-1-of-3.safetensors");
    let data = std::fs::read(&newest).expect("read");
    std::fs::write(&newest, &data[..data.len() - 1]).expect("truncate");

    let daemons = start(3, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(
        wait_serving(&mut c, "run").await.round,
        3,
        "round 6 is not intact on shard 1: every shard goes back to round 3"
    );
    every_shard_at(&mut c, 3).await;
    assert!(
        entries(dir.path(), 1)
            .iter()
            .any(|n| n.starts_with("00000000000000000006.bad-")),
        "shard 1 set its corrupt round 6 aside: {:?}",
        entries(dir.path(), 1)
    );
    for i in [0, 2] {
        assert!(
            entries(dir.path(), i)
                .iter()
                .any(|n| n.starts_with("00000000000000000006.abandoned-")),
            "shard {i} set its round 6 aside, not deleted: {:?}",
            entries(dir.path(), i)
        );
    }
    finish_exactly(&mut c, 3, &want).await;
    kill_all(daemons).await;
}

/// Checkpoints on request only, three kept, chunks of 4 floats.
fn on_request_flags(ckpt: &Path) -> Vec<String> {
    let mut f = vec!["--checkpoint-dir".to_owned(), ckpt.display().to_string()];
    f.extend(["--keep-checkpoints", "3", "--chunk-bytes", "16"].map(str::to_owned));
    f
}

/// Three shards, shard `victim` started with `PARAMD_FAILPOINT=<point>@6`:
/// a checkpoint of round 4 is acknowledged, the one of round 6 stops the
/// victim exactly at `point`; the others are killed too. After a restart,
/// every shard holds round 4 (no acknowledged checkpoint lost, nothing of
/// the unacknowledged one used unless every shard has it whole), and the
/// same gradients from there give the bits of the run that never stopped.
async fn crash_at(point: &str, victim: usize) {
    use std::os::unix::process::ExitStatusExt;
    let want = uninterrupted().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let failpoint = format!("{point}@6");
    let mut daemons = Vec::new();
    for i in 0..3 {
        let env: &[(&str, &str)] = if i == victim {
            &[("PARAMD_FAILPOINT", failpoint.as_str())]
        } else {
            &[]
        };
        let flags = on_request_flags(&shard_dir(dir.path(), i));
        daemons.push(start_shard_with_env(i, &ports, &flags, env).await);
    }
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    for t in 0..4 {
        round(&mut c, "run", t).await;
    }
    let ack = c
        .checkpoint(Some("run"))
        .await
        .expect("checkpoint of round 4");
    assert_eq!(ack[0].round, 4);
    for t in 4..6 {
        round(&mut c, "run", t).await;
    }
    // The victim dies under the call: not tried again (the client's
    // default would retry the lost connection until its deadline).
    c.retries = Some(0);
    c.checkpoint(Some("run"))
        .await
        .expect_err("the checkpoint of round 6 is never acknowledged");
    let mut dead = daemons.remove(victim);
    let exit = tokio::time::timeout(Duration::from_secs(30), dead.child.wait())
        .await
        .expect("the victim stops at the failpoint")
        .expect("exit status");
    assert_eq!(exit.signal(), Some(6), "aborted at {point}: {exit:?}");
    kill_all(daemons).await;

    let daemons = start(3, &ports, dir.path()).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(wait_serving(&mut c, "run").await.round, 4, "{point}");
    every_shard_at(&mut c, 4).await;
    for i in 0..3 {
        let round6 = shard_dir(dir.path(), i).join("run/00000000000000000006");
        assert!(
            !round6.join("MANIFEST.json").exists(),
            "{point}: shard {i} holds no complete round 6: {:?}",
            entries(dir.path(), i)
        );
    }
    finish_exactly(&mut c, 4, &want).await;
    kill_all(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_checkpoint_write_loses_no_acknowledged_checkpoint() {
    crash_at("checkpoint.mid_write", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_the_shard_files_and_the_manifest_loses_no_acknowledged_checkpoint() {
    crash_at("checkpoint.before_manifest", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_the_manifests_of_the_shards_restores_a_round_all_of_them_hold() {
    crash_at("checkpoint.between_manifests", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_every_shard_at_once_takes_a_consistent_final_checkpoint() {
    let want = uninterrupted().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let grace = Duration::from_secs(10);
    let flags = |i: usize| {
        let mut f = on_request_flags(&shard_dir(dir.path(), i));
        f.extend(["--shutdown-grace".to_owned(), grace.as_secs().to_string()]);
        f
    };
    let daemons = start_cluster(&ports, flags).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    for t in 0..5 {
        round(&mut c, "run", t).await;
    }
    // As `docker stop` of every container does: SIGTERM to all at once,
    // the coordinator last.
    let started = std::time::Instant::now();
    for d in daemons.iter().rev() {
        d.sigterm().expect("SIGTERM");
    }
    for (i, mut d) in daemons.into_iter().enumerate() {
        let exit = tokio::time::timeout(grace + Duration::from_secs(5), d.child.wait())
            .await
            .expect("exits within the grace period")
            .expect("exit status");
        assert_eq!(exit.code(), Some(0), "shard {i}: {exit:?}");
    }
    assert!(
        started.elapsed() < grace,
        "every shard stopped in {:?}, within the grace period",
        started.elapsed()
    );
    for i in 0..3 {
        assert!(
            shard_dir(dir.path(), i)
                .join("run/00000000000000000005/MANIFEST.json")
                .is_file(),
            "shard {i} holds the final checkpoint of round 5: {:?}",
            entries(dir.path(), i)
        );
    }

    let daemons = start_cluster(&ports, flags).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(wait_serving(&mut c, "run").await.round, 5);
    every_shard_at(&mut c, 5).await;
    finish_exactly(&mut c, 5, &want).await;
    kill_all(daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_restarted_alone_rejoins_only_at_the_coordinators_round() {
    let want = uninterrupted().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let flags = |i: usize| on_request_flags(&shard_dir(dir.path(), i));
    let mut daemons = start_cluster(&ports, flags).await;
    let mut c = Client::connect(&url).await.expect("connect");
    init(&mut c, "run").await;
    for t in 0..3 {
        round(&mut c, "run", t).await;
    }
    assert_eq!(
        c.checkpoint(Some("run")).await.expect("checkpoint")[0].round,
        3
    );

    // Shard 2 dies and comes back while the others run on: it restored the
    // round the coordinator is at, and serves again.
    let mut d2 = daemons.pop().expect("shard 2");
    d2.child.kill().await.expect("kill -9");
    daemons.push(paramd_tests::start_shard(2, &ports, &flags(2)).await);
    assert_eq!(wait_serving(&mut c, "run").await.round, 3);
    every_shard_at(&mut c, 3).await;
    for t in 3..5 {
        round(&mut c, "run", t).await;
    }

    // Again after two rounds without a checkpoint: shard 2 restores round
    // 3, the coordinator is at 5; shard 2 refuses workers and says why.
    let mut d2 = daemons.pop().expect("shard 2");
    d2.child.kill().await.expect("kill -9");
    daemons.push(paramd_tests::start_shard(2, &ports, &flags(2)).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Each refusal is wanted here, not tried again until the deadline.
    c.retries = Some(0);
    let why = loop {
        let err = c.pull("run", 5).await.expect_err("shard 2 is at round 3");
        let msg = err.to_string();
        if msg.contains("restart every shard") {
            break msg;
        }
        assert!(tokio::time::Instant::now() < deadline, "{msg}");
        // Pacing the polls until shard 2 has asked the coordinator.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(why.contains("shard 2") && why.contains("round 3"), "{why}");

    // Restarting every shard brings them to round 3, and training goes on
    // exactly.
    kill_all(daemons).await;
    let daemons = start_cluster(&ports, flags).await;
    let mut c = Client::connect(&url).await.expect("connect");
    assert_eq!(wait_serving(&mut c, "run").await.round, 3);
    finish_exactly(&mut c, 3, &want).await;
    kill_all(daemons).await;
}
