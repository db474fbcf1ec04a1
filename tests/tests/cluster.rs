//! Three shards: every golden trace replayed through a cluster whose chunks
//! are small enough that every parameter of more than a few elements spans
//! several shards matches torch, and is bit-identical to a one-shard run
//! with the same chunk size.

use std::path::Path;

use paramd::NodeConfig;
use paramd_client::replay::{ReplayOptions, ReplayResult, replay};
use paramd_client::trace::{Tolerance, compare, read_tensors};
use paramd_tests::{
    TestCluster, TestServer, golden_traces, http_get, metric, reserve_ports, start_cluster,
};

/// 4 floats per chunk: a [4, 8] weight is cut into 8 chunks.
const CHUNK_BYTES: usize = 16;

fn config() -> NodeConfig {
    NodeConfig {
        chunk_bytes: CHUNK_BYTES,
        ..Default::default()
    }
}

async fn run(url: String, trace: &Path) -> ReplayResult {
    let opts = ReplayOptions {
        credentials: Default::default(),
        server: url,
        job: None,
        every_step: true,
    };
    replay(trace, &opts).await.expect("replay")
}

fn check_against_torch(trace: &Path, result: &ReplayResult) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("result.safetensors");
    result.write(&out).expect("write");
    let (want, _) = read_tensors(&std::fs::read(trace).expect("trace")).expect("read");
    let (got, _) = read_tensors(&std::fs::read(&out).expect("result")).expect("read");
    let c = compare(&want, &got, Tolerance::default());
    assert!(
        c.failures.is_empty() && c.passed > 0,
        "{}: {:?}",
        trace.display(),
        c.failures
    );
}

/// Every number a replay recorded (parameters after each step and at the
/// end, lr, grad norm), as bits.
fn bits(r: &ReplayResult) -> Vec<u64> {
    let params = r.steps.iter().flatten().chain(&r.final_params).flatten();
    let params = params.map(|x| u64::from(x.to_bits()));
    let lrs = r.lr.iter().flatten().map(|x| x.to_bits());
    let norms = r.grad_norm.iter().map(|x| u64::from(x.to_bits()));
    params.chain(lrs).chain(norms).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_in_process_shards_match_torch_and_one_shard_bit_for_bit() {
    let one = TestServer::with_config(config()).await;
    let three = TestCluster::start(3, config()).await;
    for trace in golden_traces() {
        let single = run(one.url(), &trace).await;
        let sharded = run(three.url(), &trace).await;
        check_against_torch(&trace, &sharded);
        assert!(
            bits(&single) == bits(&sharded),
            "{}: 3 shards differ from 1",
            trace.display()
        );

        // Every shard holds part of the job, and the layout is balanced.
        let mut c = paramd_client::Client::connect(&three.url())
            .await
            .expect("connect");
        let status = c.status(Some(&sharded.job)).await.expect("status");
        let shards = &status.jobs[0].shards;
        assert_eq!(shards.len(), 3);
        let total: u64 = shards.iter().map(|s| s.parameter_bytes).sum();
        assert_eq!(total, status.jobs[0].parameters * 4);
        assert_eq!(
            status.jobs[0].parameter_bytes, total,
            "the job's bytes are the cluster's"
        );
        for s in shards {
            assert!(s.up && s.chunks > 0, "{s:?}");
            assert!(
                s.parameter_bytes <= total.div_ceil(3) + CHUNK_BYTES as u64,
                "{s:?} of {total}"
            );
            assert_eq!(
                s.round,
                sharded.lr.len() as u64,
                "every shard applied every round"
            );
        }
    }
    let (_, body) = http_get(three.shards[1].http, "/metrics")
        .await
        .expect("metrics");
    assert!(
        metric(&body, "paramd_shard_chunks", &[]).is_some_and(|c| c > 0.0),
        "{body}"
    );
    let (_, body) = http_get(three.shards[0].http, "/metrics")
        .await
        .expect("metrics");
    assert!(
        body.contains("paramd_coordinator_shard_wait_seconds_bucket"),
        "{body}"
    );
    one.shutdown().await;
    three.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_paramd_processes_match_torch_and_one_shard_bit_for_bit() {
    let ports = reserve_ports(3);
    let daemons = start_cluster(&ports, |_| {
        vec!["--chunk-bytes".into(), CHUNK_BYTES.to_string()]
    })
    .await;
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let one = TestServer::with_config(config()).await;
    for trace in golden_traces() {
        let sharded = run(url.clone(), &trace).await;
        check_against_torch(&trace, &sharded);
        let single = run(one.url(), &trace).await;
        assert!(
            bits(&single) == bits(&sharded),
            "{}: 3 processes differ from 1 shard",
            trace.display()
        );
    }
    for d in daemons {
        let exit = d.terminate().await.expect("terminate");
        assert_eq!(exit.code(), Some(0));
    }
    one.shutdown().await;
}

/// A push holding a tensor the job does not have is refused by every shard,
/// so none of its other tensors is counted anywhere: the corrected push
/// that follows is the one applied, on every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_push_is_refused_by_every_shard_and_counted_nowhere() {
    use paramd_client::v1 as pb;
    let cluster = TestCluster::start(3, config()).await;
    let mut c = paramd_client::Client::connect(&cluster.url())
        .await
        .expect("connect");
    let spec = paramd_tests::one_param_spec(pb::OptimizerKind::Sgd, &[12], 1, 1.0);
    let init = [0.0f32; 12];
    c.init("bad", spec, &[("w", &init)]).await.expect("init");
    let layout = c.layout("bad").await.expect("layout");
    let used: std::collections::BTreeSet<u32> = layout.owners.iter().copied().collect();
    assert_eq!(used.len(), 3, "w spans every shard: {:?}", layout.owners);

    let first = [1.0f32; 12];
    for bad in [
        vec![("w", &first[..]), ("x", &first[..4])],
        vec![("w", &first[..11])],
    ] {
        let e = c.push("bad", 0, 0, &bad).await.expect_err("refused");
        assert_eq!(
            e.status().map(tonic::Status::code),
            Some(tonic::Code::InvalidArgument),
            "{e}"
        );
    }
    let second = [2.0f32; 12];
    let r = c.push("bad", 0, 0, &[("w", &second)]).await.expect("push");
    assert!(!r.duplicate, "the refused pushes were not counted");
    let p = c.pull("bad", 1).await.expect("pull");
    assert_eq!(
        p.params["w"],
        vec![-2.0f32; 12],
        "every shard applied the second push"
    );
    cluster.shutdown().await;
}
