//! Setting a job's optimizer state (torch's `load_state_dict`): a run moved
//! to a new job mid-training, with its values and its state loaded, goes on
//! bit for bit as the original, on 1 and 3 shards; a load is applied before
//! its round's step on every shard or on none, and a refused one changes
//! nothing.

use std::collections::HashMap;

use paramd::node::NodeConfig;
use paramd_client::v1 as pb;
use paramd_client::{Client, ClientError, OptimizerState};
use paramd_tests::{TestCluster, TestServer, flat_spec};
use tonic::Code;

const SHAPES: [(&str, usize); 3] = [("w", 6), ("b", 5), ("late", 4)];

fn spec(kind: pb::OptimizerKind) -> pb::JobSpec {
    let hyper = match kind {
        pb::OptimizerKind::Sgd => pb::Hyperparameters {
            lr: Some(0.5),
            momentum: Some(0.9),
            nesterov: Some(true),
            weight_decay: Some(0.01),
            ..Default::default()
        },
        _ => pb::Hyperparameters {
            lr: Some(0.1),
            weight_decay: Some(0.1),
            amsgrad: Some(true),
            ..Default::default()
        },
    };
    let optimizer = pb::Optimizer {
        kind: kind as i32,
        hyper: Some(hyper),
    };
    pb::JobSpec {
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::WarmupCosine(pb::WarmupCosine {
                warmup_steps: 2,
                total_steps: 6,
                min_lr_ratio: 0.1,
            })),
        }),
        clip: Some(pb::Clip { max_norm: 2.0 }),
        ..flat_spec(&SHAPES, optimizer, 2)
    }
}

fn values(name: &str, n: usize, scale: f32) -> Vec<f32> {
    let salt = name.len() as f32;
    (0..n)
        .map(|i| scale * (i as f32 - 2.0 + 0.37 * salt))
        .collect()
}

async fn create(
    c: &mut Client,
    job: &str,
    kind: pb::OptimizerKind,
    init: &HashMap<String, Vec<f32>>,
) {
    let refs: Vec<(&str, &[f32])> = SHAPES
        .iter()
        .map(|&(n, _)| (n, init[n].as_slice()))
        .collect();
    c.init(job, spec(kind), &refs).await.expect("init");
}

/// Round `round` of the run: both workers push, and it completes; `late`
/// has no gradient before round 1, so its step count trails the others'.
async fn round(c: &mut Client, job: &str, round: u64) {
    round_of(c, job, round, round).await;
}

/// Round `round` of `job` with the gradients of the run's round `data`.
async fn round_of(c: &mut Client, job: &str, round: u64, data: u64) {
    for worker in 0..2u32 {
        let s = (data as f32 + 1.0) * if worker == 0 { 1.0 } else { -0.3 };
        let grads: Vec<(&str, Vec<f32>)> = SHAPES
            .iter()
            .filter(|&&(n, _)| n != "late" || data >= 1)
            .map(|&(n, len)| (n, values(n, len, s)))
            .collect();
        let refs: Vec<(std::sync::Arc<str>, paramd_client::codec::Payload)> = grads
            .iter()
            .map(|(n, v)| {
                (
                    std::sync::Arc::from(*n),
                    paramd_client::codec::Payload::Owned(paramd_client::to_le_bytes(v)),
                )
            })
            .collect();
        let no_grad: Vec<std::sync::Arc<str>> = if data >= 1 {
            Vec::new()
        } else {
            vec![std::sync::Arc::from("late")]
        };
        c.push_payloads(
            job,
            worker,
            round,
            &refs,
            &no_grad,
            paramd_client::PushOptions::default(),
        )
        .await
        .expect("push");
    }
    c.pull(job, round + 1).await.expect("the round completes");
}

fn bits(p: &HashMap<String, Vec<f32>>) -> HashMap<String, Vec<u32>> {
    p.iter()
        .map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// Each parameter's name, step and buffers as bits, sorted.
type StateBits = Vec<(String, u64, Vec<(String, Vec<u32>)>)>;

fn state_bits(s: &OptimizerState) -> StateBits {
    let mut out: Vec<_> = s
        .params
        .iter()
        .map(|(n, p)| {
            let b = p
                .buffers
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
                .collect();
            (n.clone(), p.step, b)
        })
        .collect();
    out.sort();
    out
}

/// Runs `orig` for 5 rounds; after round 2 moves it to a new job (its
/// values as the initial values, its state loaded) and runs both on.
/// Returns the moved job's values and state at the end, which must equal
/// the original's.
async fn moved_run(c: &mut Client, kind: pb::OptimizerKind) -> HashMap<String, Vec<u32>> {
    let orig = format!("orig-{kind:?}");
    let moved = format!("moved-{kind:?}");
    let init: HashMap<String, Vec<f32>> = SHAPES
        .iter()
        .map(|&(n, len)| (n.to_owned(), values(n, len, 0.5)))
        .collect();
    create(c, &orig, kind, &init).await;
    for r in 0..2 {
        round(c, &orig, r).await;
    }
    let at = c.pull(&orig, 2).await.expect("pull");
    let state = c.state(&orig, 2).await.expect("state");
    let step = at.last.as_ref().expect("outcome").step;
    assert_eq!(step, 2);
    create(c, &moved, kind, &at.params).await;
    let id = c
        .load_state(&moved, 0, step, &state.params)
        .await
        .expect("load");
    // The moved job's round 0 is the original's round 2.
    for r in 2..5 {
        round(c, &orig, r).await;
        round_of(c, &moved, r - 2, r).await;
        let a = c.pull(&orig, r + 1).await.expect("pull orig");
        let b = c.pull(&moved, r - 1).await.expect("pull moved");
        let (la, lb) = (
            a.last.expect("orig outcome"),
            b.last.expect("moved outcome"),
        );
        assert_eq!(lb.loaded_state, if r == 2 { id } else { 0 });
        assert_eq!(
            (lb.step, &lb.lr),
            (la.step, &la.lr),
            "round {r}: step or lr"
        );
        assert_eq!(lb.grad_norm.to_bits(), la.grad_norm.to_bits());
        assert_eq!(bits(&b.params), bits(&a.params), "round {r}: values differ");
    }
    let (sa, sb) = (
        c.state(&orig, 5).await.expect("state"),
        c.state(&moved, 3).await.expect("state"),
    );
    assert_eq!(state_bits(&sb), state_bits(&sa), "the states differ");
    bits(&c.pull(&moved, 3).await.expect("pull").params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_moved_with_its_state_goes_on_bit_for_bit() {
    let config = NodeConfig {
        chunk_bytes: 8,
        ..NodeConfig::default()
    };
    let one = TestServer::start().await;
    let three = TestCluster::start(3, config).await;
    let mut c1 = one.client().await;
    let mut c3 = Client::connect(&three.url()).await.expect("connect");
    for kind in [pb::OptimizerKind::Adamw, pb::OptimizerKind::Sgd] {
        let on_one = moved_run(&mut c1, kind).await;
        let on_three = moved_run(&mut c3, kind).await;
        assert_eq!(on_one, on_three, "{kind:?}: 1 and 3 shards differ");
    }
}

fn zeroed(step: u64, buffers: &[&str]) -> HashMap<String, paramd_client::ParamState> {
    SHAPES
        .iter()
        .map(|&(n, len)| {
            let b = buffers
                .iter()
                .map(|&k| (k.to_owned(), vec![0.0f32; len]))
                .collect();
            (n.to_owned(), paramd_client::ParamState { step, buffers: b })
        })
        .collect()
}

fn refused(r: Result<u64, ClientError>, code: Code, needle: &str) {
    let e = r.expect_err("the load should be refused");
    assert_eq!(e.status().map(tonic::Status::code), Some(code), "{e}");
    assert!(e.to_string().contains(needle), "'{needle}' not in: {e}");
}

/// Every refused load leaves the job as it was: the next round is the one
/// a job never loaded would run.
async fn refusals(c: &mut Client, cluster: bool) {
    let kind = pb::OptimizerKind::Adamw;
    let init: HashMap<String, Vec<f32>> = SHAPES
        .iter()
        .map(|&(n, len)| (n.to_owned(), values(n, len, 0.5)))
        .collect();
    create(c, "plain", kind, &init).await;
    create(c, "refused", kind, &init).await;
    let adam = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"];
    let good = || {
        let mut s = zeroed(3, &adam);
        for p in s.values_mut() {
            for (k, v) in p.buffers.iter_mut() {
                v.iter_mut()
                    .for_each(|x| *x = if k == "exp_avg" { -0.25 } else { 0.5 });
            }
        }
        s
    };
    refused(
        c.load_state("refused", 1, 3, &good()).await,
        Code::FailedPrecondition,
        "is at round 0",
    );
    let mut s = good();
    s.get_mut("w")
        .expect("w")
        .buffers
        .insert("momentum_buffer".into(), vec![0.0; 6]);
    refused(
        c.load_state("refused", 0, 3, &s).await,
        Code::InvalidArgument,
        "'momentum_buffer' is not kept",
    );
    let mut s = good();
    s.get_mut("b").expect("b").buffers.remove("max_exp_avg_sq");
    refused(
        c.load_state("refused", 0, 3, &s).await,
        Code::InvalidArgument,
        "max_exp_avg_sq",
    );
    // One bad element, on whichever shard holds it: the others stage
    // their part, and it is never applied anywhere.
    let mut s = good();
    s.get_mut("w")
        .expect("w")
        .buffers
        .get_mut("exp_avg_sq")
        .expect("sq")[5] = -1.0;
    refused(
        c.load_state("refused", 0, 3, &s).await,
        Code::InvalidArgument,
        "'w': buffer 'exp_avg_sq' element 5 is -1",
    );
    let mut s = good();
    s.get_mut("late")
        .expect("late")
        .buffers
        .get_mut("exp_avg")
        .expect("m")[3] = f32::NAN;
    refused(
        c.load_state("refused", 0, 3, &s).await,
        Code::InvalidArgument,
        "must be finite",
    );
    let mut s = good();
    s.get_mut("late").expect("late").step = 0;
    refused(
        c.load_state("refused", 0, 3, &s).await,
        Code::InvalidArgument,
        "with step 0",
    );
    for job in ["plain", "refused"] {
        round(c, job, 0).await;
    }
    let (a, b) = (
        c.pull("plain", 1).await.expect("pull"),
        c.pull("refused", 1).await.expect("pull"),
    );
    assert_eq!(
        b.last.as_ref().expect("outcome").loaded_state,
        0,
        "cluster: {cluster}"
    );
    assert_eq!(bits(&b.params), bits(&a.params));
    assert_eq!(
        state_bits(&c.state("refused", 1).await.expect("state")),
        state_bits(&c.state("plain", 1).await.expect("state")),
    );
    // A load staged on every shard after a refused one is applied.
    let id = c.load_state("refused", 1, 1, &good()).await.expect("load");
    round(c, "refused", 1).await;
    let after = c.pull("refused", 2).await.expect("pull");
    let outcome = after.last.expect("outcome");
    assert_eq!((outcome.loaded_state, outcome.step), (id, 2));
    let state = c.state("refused", 2).await.expect("state");
    assert_eq!(state.params["w"].step, 4, "loaded at 3, then one step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_load_changes_nothing_on_any_shard() {
    let one = TestServer::start().await;
    refusals(&mut one.client().await, false).await;
    let three = TestCluster::start(
        3,
        NodeConfig {
            chunk_bytes: 8,
            ..NodeConfig::default()
        },
    )
    .await;
    let mut c = Client::connect(&three.url()).await.expect("connect");
    refusals(&mut c, true).await;
}
