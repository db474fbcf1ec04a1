//! bf16 and f16 on the wire: pushed values are decoded exactly to f32
//! before the mean, so a round of bf16/f16 pushes is bit for bit the round
//! of f32 pushes of the decoded values (torch's round-to-nearest-even cast
//! and back); pulls in bf16/f16 are the f32 values rounded to nearest
//! even. A value that is not finite once decoded follows the job's policy;
//! a dtype the protocol does not know is refused. On 1 and 3 shards.

use std::collections::HashMap;
use std::sync::Arc;

use paramd::node::NodeConfig;
use paramd_client::codec::Payload;
use paramd_client::v1 as pb;
use paramd_client::{Client, PullInto, to_le_bytes};
use paramd_proto::wire;
use paramd_tests::{TestCluster, TestServer, flat_spec, outer_sgd};
use tonic::Code;

const SHAPES: [(&str, usize); 2] = [("w", 7), ("b", 3)];
const WORKERS: u32 = 3;

/// DiLoCo's outer step.
fn spec(non_finite: pb::NonFinitePolicy) -> pb::JobSpec {
    pb::JobSpec {
        non_finite: non_finite as i32,
        ..flat_spec(&SHAPES, outer_sgd(), WORKERS)
    }
}

/// Worker `w`'s pseudo-gradient of round `r`: values no bf16 or f16
/// holds exactly, so the casts round.
fn delta(name: &str, n: usize, w: u32, r: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as f32 + 1.0) * 0.013_371 + w as f32 * 0.101_7 - r as f32 * 0.05;
            x * if name == "b" { -1.3 } else { 1.0 } + 1e-3 / 3.0
        })
        .collect()
}

/// The dtype worker `w` pushes in.
fn dtype_of(w: u32) -> pb::Dtype {
    [pb::Dtype::Bf16, pb::Dtype::F16, pb::Dtype::F32][w as usize % 3]
}

/// `values` as they arrive when sent as `dtype`.
fn through(values: &[f32], dtype: pb::Dtype) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    wire::decode_into(&mut out, &wire::encode(values, dtype), dtype);
    out
}

async fn push(c: &Client, job: &str, w: u32, r: u64, dtype: pb::Dtype, cast: bool) {
    let grads: Vec<(Arc<str>, Payload)> = SHAPES
        .iter()
        .map(|&(n, len)| {
            let d = delta(n, len, w, r);
            // The reference sends the decoded values as f32.
            let bytes = if cast {
                wire::encode(&d, dtype)
            } else {
                to_le_bytes(&through(&d, dtype))
            };
            (Arc::from(n), Payload::Owned(bytes))
        })
        .collect();
    let sent = if cast { dtype } else { pb::Dtype::F32 };
    c.push_payloads(job, w, r, &grads, &[], as_(sent))
        .await
        .expect("push");
}

fn bits(p: &HashMap<String, Vec<f32>>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = p
        .iter()
        .map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect();
    v.sort();
    v
}

async fn pull_as(c: &Client, job: &str, round: u64, dtype: pb::Dtype) -> HashMap<String, Vec<f32>> {
    let targets: Vec<(PullInto, Arc<std::sync::Mutex<Vec<f32>>>)> = SHAPES
        .iter()
        .map(|&(n, len)| {
            let v = Arc::new(std::sync::Mutex::new(vec![0.0; len]));
            (
                PullInto {
                    name: Arc::from(n),
                    target: paramd_client::codec::Target::Owned(Arc::clone(&v)),
                },
                v,
            )
        })
        .collect();
    let into: Vec<PullInto> = targets.iter().map(|(t, _)| t.clone()).collect();
    c.pull_into_as(job, round, &into, dtype)
        .await
        .expect("pull");
    SHAPES
        .iter()
        .zip(&targets)
        .map(|(&(n, _), (_, v))| (n.to_owned(), v.lock().expect("values").clone()))
        .collect()
}

/// Three rounds of bf16, f16 and f32 pushes against the same rounds sent
/// as f32 after the casts; returns the final values.
async fn check(mut c: Client) -> Vec<(String, Vec<u32>)> {
    let init: Vec<(&str, Vec<f32>)> = SHAPES
        .iter()
        .map(|&(n, len)| (n, (0..len).map(|i| 0.25 * i as f32 - 0.3).collect()))
        .collect();
    let refs: Vec<(&str, &[f32])> = init.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    let skip = pb::NonFinitePolicy::Skip;
    c.init("wire", spec(skip), &refs).await.expect("init");
    c.init("f32", spec(skip), &refs).await.expect("init");
    for r in 0..3u64 {
        for w in 0..WORKERS {
            push(&c, "wire", w, r, dtype_of(w), true).await;
            push(&c, "f32", w, r, dtype_of(w), false).await;
        }
        let (a, b) = (
            c.pull("wire", r + 1).await.expect("pull"),
            c.pull("f32", r + 1).await.expect("pull"),
        );
        assert_eq!(bits(&a.params), bits(&b.params), "round {r}");
        // Pulled as bf16 or f16: the f32 values rounded to nearest even.
        for dtype in [pb::Dtype::Bf16, pb::Dtype::F16] {
            let got = pull_as(&c, "wire", r + 1, dtype).await;
            let want: HashMap<String, Vec<f32>> = a
                .params
                .iter()
                .map(|(n, v)| (n.clone(), through(v, dtype)))
                .collect();
            assert_eq!(bits(&got), bits(&want), "{dtype:?} pull of round {r}");
        }
    }
    bits(&c.pull("wire", 3).await.expect("pull").params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_and_f16_pushes_are_their_decoded_f32_values() {
    let one = TestServer::start().await;
    let on_one = check(one.client().await).await;
    // Bytes are counted by the dtype they travelled in: every worker
    // pushed 3 rounds, every pull of one dtype read 3 rounds' values.
    let (_, body) = paramd_tests::http_get(one.http, "/metrics")
        .await
        .expect("metrics");
    let elems: usize = SHAPES.iter().map(|&(_, n)| n).sum();
    for (dtype, size) in [("bf16", 2), ("f16", 2)] {
        let pushed = paramd_tests::metric(
            &body,
            "paramd_push_bytes_total",
            &[("job", "wire"), ("dtype", dtype)],
        );
        assert_eq!(pushed, Some((3 * elems * size) as f64), "{dtype} pushes");
        let pulled = paramd_tests::metric(
            &body,
            "paramd_pull_bytes_total",
            &[("job", "wire"), ("dtype", dtype)],
        );
        assert_eq!(pulled, Some((3 * elems * size) as f64), "{dtype} pulls");
    }
    let three = TestCluster::start(
        3,
        NodeConfig {
            chunk_bytes: 8,
            ..NodeConfig::default()
        },
    )
    .await;
    let on_three = check(Client::connect(&three.url()).await.expect("connect")).await;
    assert_eq!(on_one, on_three, "1 and 3 shards differ");
}

fn as_(dtype: pb::Dtype) -> paramd_client::PushOptions {
    paramd_client::PushOptions {
        dtype,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_value_not_finite_once_decoded_follows_the_policy() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let zeros: Vec<(&str, Vec<f32>)> = SHAPES.iter().map(|&(n, len)| (n, vec![0.0; len])).collect();
    let refs: Vec<(&str, &[f32])> = zeros.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    c.init("strict", spec(pb::NonFinitePolicy::Error), &refs)
        .await
        .expect("init");
    // 65520 is finite in f32 and bf16, and rounds to infinity in f16.
    let grads = |dtype: pb::Dtype| -> Vec<(Arc<str>, Payload)> {
        SHAPES
            .iter()
            .map(|&(n, len)| {
                let mut v = vec![1.0f32; len];
                v[len - 1] = 65520.0;
                (Arc::from(n), Payload::Owned(wire::encode(&v, dtype)))
            })
            .collect()
    };
    let e = c
        .push_payloads(
            "strict",
            0,
            0,
            &grads(pb::Dtype::F16),
            &[],
            as_(pb::Dtype::F16),
        )
        .await
        .expect_err("an infinite f16 is refused");
    let status = e.status().expect("status");
    assert_eq!(status.code(), Code::InvalidArgument, "{e}");
    assert!(status.message().contains("is inf"), "{e}");
    c.push_payloads(
        "strict",
        0,
        0,
        &grads(pb::Dtype::Bf16),
        &[],
        as_(pb::Dtype::Bf16),
    )
    .await
    .expect("bf16 holds 65520 (rounded to 65536)");

    // A dtype the protocol does not have.
    let mut raw = pb::param_server_client::ParamServerClient::connect(server.url())
        .await
        .expect("connect");
    let messages = vec![
        pb::PushRequest {
            job: "strict".into(),
            worker: 1,
            round: 0,
            ..Default::default()
        },
        pb::PushRequest {
            grads: vec![pb::Segment {
                param: "w".into(),
                offset: 0,
                data: bytes::Bytes::from(vec![0u8; 14]),
                dtype: 7,
            }],
            ..Default::default()
        },
    ];
    let e = raw
        .push(futures::stream::iter(messages))
        .await
        .expect_err("unknown dtype");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("dtype: 7"), "{}", e.message());
    let e = raw
        .pull(pb::PullRequest {
            job: "strict".into(),
            dtype: 9,
            ..Default::default()
        })
        .await
        .expect_err("unknown pull dtype");
    assert_eq!(e.code(), Code::InvalidArgument);
}
