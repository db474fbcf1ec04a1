//! Weighted merges (`merge = MERGE_WEIGHTED`): a round's gradient is
//! `sum_i(w_i * g_i) / sum_i(w_i)`, each product rounded to f32, the
//! products and the weights summed in worker order, then one division; a
//! parameter a worker has no gradient for counts as zeros with that
//! worker's weight. Bit for bit the step of a job given that gradient, on
//! 1 and 3 shards, with f32 and bf16 pushes. Weights are checked: required
//! (> 0, finite) by a weighted job, refused by one that merges by mean.

use std::sync::Arc;

use paramd_client::codec::Payload;
use paramd_client::v1 as pb;
use paramd_client::{Client, PushOptions};
use paramd_proto::wire;
use paramd_tests::{TestServer, bits, flat_spec, on_one_and_three_shards, outer_sgd};
use tonic::Code;

const SHAPES: [(&str, usize); 2] = [("w", 9), ("b", 4)];
const WEIGHTS: [f32; 3] = [3.0, 1.5, 0.1];

fn spec(workers: u32, merge: pb::Merge) -> pb::JobSpec {
    pb::JobSpec {
        merge: merge as i32,
        ..flat_spec(&SHAPES, outer_sgd(), workers)
    }
}

fn grad(name: &str, n: usize, w: usize, r: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (i as f32 * 0.37 + w as f32 * 1.1 - r as f32) * if name == "b" { -0.3 } else { 0.7 }
        })
        .collect()
}

/// Worker `w` pushes in bf16 (worker 1) or f32, and has no gradient for
/// "b" in round 1 (worker 2).
fn has(name: &str, w: usize, r: u64) -> bool {
    !(name == "b" && w == 2 && r == 1)
}

fn dtype_of(w: usize) -> pb::Dtype {
    if w == 1 {
        pb::Dtype::Bf16
    } else {
        pb::Dtype::F32
    }
}

/// The weighted mean as the merge defines it.
fn weighted_mean(name: &str, n: usize, r: u64) -> Vec<f32> {
    let mut sum = vec![0.0f32; n];
    let mut total = 0.0f32;
    for (w, &weight) in WEIGHTS.iter().enumerate() {
        total += weight;
        let g = if has(name, w, r) {
            let mut g = vec![0.0; n];
            wire::decode_into(
                &mut g,
                &wire::encode(&grad(name, n, w, r), dtype_of(w)),
                dtype_of(w),
            );
            g
        } else {
            vec![0.0; n]
        };
        for (s, x) in sum.iter_mut().zip(&g) {
            let p = weight * x;
            *s = if w == 0 { p } else { *s + p };
        }
    }
    sum.iter().map(|s| s / total).collect()
}

async fn check(mut c: Client) -> Vec<(String, Vec<u32>)> {
    let init: Vec<(&str, Vec<f32>)> = SHAPES.iter().map(|&(n, len)| (n, vec![0.5; len])).collect();
    let refs: Vec<(&str, &[f32])> = init.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    c.init("weighted", spec(3, pb::Merge::Weighted), &refs)
        .await
        .expect("init");
    c.init("given", spec(1, pb::Merge::Mean), &refs)
        .await
        .expect("init");
    for r in 0..3u64 {
        for (w, &weight) in WEIGHTS.iter().enumerate() {
            let grads: Vec<(Arc<str>, Payload)> = SHAPES
                .iter()
                .filter(|&&(n, _)| has(n, w, r))
                .map(|&(n, len)| {
                    let bytes = wire::encode(&grad(n, len, w, r), dtype_of(w));
                    (Arc::from(n), Payload::Owned(bytes))
                })
                .collect();
            let no_grad: Vec<Arc<str>> = SHAPES
                .iter()
                .filter(|&&(n, _)| !has(n, w, r))
                .map(|&(n, _)| Arc::from(n))
                .collect();
            let options = PushOptions {
                dtype: dtype_of(w),
                weight,
                ..Default::default()
            };
            c.push_payloads("weighted", w as u32, r, &grads, &no_grad, options)
                .await
                .expect("push");
        }
        let means: Vec<(&str, Vec<f32>)> = SHAPES
            .iter()
            .map(|&(n, len)| (n, weighted_mean(n, len, r)))
            .collect();
        let refs: Vec<(&str, &[f32])> = means.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        c.push("given", 0, r, &refs).await.expect("push");
        let (a, b) = (
            c.pull("weighted", r + 1).await.expect("pull"),
            c.pull("given", r + 1).await.expect("pull"),
        );
        assert_eq!(bits(&a), bits(&b), "round {r}");
        assert_eq!(a.last.expect("outcome").participants, 3);
    }
    bits(&c.pull("weighted", 3).await.expect("pull"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_round_is_the_step_on_the_weighted_mean() {
    on_one_and_three_shards(check).await;
}

#[tokio::test]
async fn weights_are_required_by_a_weighted_job_and_refused_by_a_mean() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let init: Vec<(&str, Vec<f32>)> = SHAPES.iter().map(|&(n, len)| (n, vec![0.5; len])).collect();
    let refs: Vec<(&str, &[f32])> = init.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    c.init("weighted", spec(2, pb::Merge::Weighted), &refs)
        .await
        .expect("init");
    c.init("mean", spec(2, pb::Merge::Mean), &refs)
        .await
        .expect("init");
    let grads: Vec<(Arc<str>, Payload)> = SHAPES
        .iter()
        .map(|&(n, len)| {
            (
                Arc::from(n),
                Payload::Owned(wire::to_le_bytes(&vec![1.0; len])),
            )
        })
        .collect();
    for (job, weight, needle) in [
        ("weighted", 0.0, "must be > 0 and finite, got 0"),
        ("weighted", -2.0, "got -2"),
        ("weighted", f32::NAN, "got NaN"),
        ("weighted", f32::INFINITY, "got inf"),
        ("mean", 2.0, "merges pushes by mean; weight 2"),
    ] {
        let options = PushOptions {
            weight,
            ..Default::default()
        };
        let e = c
            .push_payloads(job, 0, 0, &grads, &[], options)
            .await
            .expect_err("refused");
        let status = e.status().expect("status");
        assert_eq!(status.code(), Code::InvalidArgument, "{e}");
        assert!(status.message().contains(needle), "'{needle}' not in {e}");
    }
    let status = c.status(Some("weighted")).await.expect("status");
    assert_eq!(status.jobs[0].workers_pushed, 0, "nothing was counted");
}
