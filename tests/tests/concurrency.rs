//! Eight workers on their own connections, pushing in a random order with
//! retries, train exactly as one worker pushing the mean gradient does.

use std::collections::HashMap;

use paramd_client::v1 as pb;
use paramd_client::{Client, Pulled};
use paramd_tests::{TestServer, http_get, metric};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const WORKERS: u32 = 8;
const ROUNDS: u64 = 50;

fn params() -> Vec<(&'static str, Vec<u64>)> {
    vec![
        ("enc.weight", vec![7, 5]),
        ("enc.bias", vec![13]),
        ("scale", vec![]),
        ("head", vec![3, 2, 4]),
    ]
}

fn spec(workers: u32) -> pb::JobSpec {
    pb::JobSpec {
        params: params()
            .into_iter()
            .map(|(name, shape)| pb::ParamSpec {
                name: name.into(),
                shape,
            })
            .collect(),
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Adamw as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(0.05),
                amsgrad: Some(true),
                ..Default::default()
            }),
        }),
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::WarmupCosine(pb::WarmupCosine {
                warmup_steps: 5,
                total_steps: 40,
                min_lr_ratio: 0.1,
            })),
        }),
        clip: Some(pb::Clip { max_norm: 0.5 }),
        workers,
        ..Default::default()
    }
}

fn numel(shape: &[u64]) -> usize {
    shape.iter().product::<u64>() as usize
}

fn named(values: &[Vec<f32>]) -> Vec<(&'static str, &[f32])> {
    params()
        .iter()
        .map(|(n, _)| *n)
        .zip(values.iter().map(Vec::as_slice))
        .collect()
}

async fn init(client: &mut Client, job: &str, workers: u32, init: &[Vec<f32>]) {
    let r = client
        .init(job, spec(workers), &named(init))
        .await
        .expect("init");
    assert!(r.created);
}

fn bits(p: &Pulled) -> HashMap<String, Vec<u32>> {
    p.params
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_workers_in_random_order_with_retries_match_the_mean_gradient() {
    let server = TestServer::start().await;
    let mut rng = StdRng::seed_from_u64(7);
    let initial: Vec<Vec<f32>> = params()
        .iter()
        .map(|(_, s)| (0..numel(s)).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    // grads[t][w][p]
    let grads: Vec<Vec<Vec<Vec<f32>>>> = (0..ROUNDS)
        .map(|_| {
            (0..WORKERS)
                .map(|_| {
                    params()
                        .iter()
                        .map(|(_, s)| (0..numel(s)).map(|_| rng.random_range(-2.0..2.0)).collect())
                        .collect()
                })
                .collect()
        })
        .collect();

    // The reference: one worker pushing the mean, summed in rank order.
    let mut reference = server.client().await;
    init(&mut reference, "reference", 1, &initial).await;
    let mut want = Vec::new();
    for (t, round) in grads.iter().enumerate() {
        let mean: Vec<Vec<f32>> = (0..initial.len())
            .map(|p| {
                let mut acc = round[0][p].clone();
                for g in &round[1..] {
                    acc.iter_mut().zip(&g[p]).for_each(|(a, x)| *a += x);
                }
                acc.iter().map(|a| a / WORKERS as f32).collect()
            })
            .collect();
        reference
            .push("reference", 0, t as u64, &named(&mean))
            .await
            .expect("push");
        want.push(
            reference
                .pull("reference", t as u64 + 1)
                .await
                .expect("pull"),
        );
    }

    let mut clients = Vec::new();
    for _ in 0..WORKERS {
        clients.push(server.client().await);
    }
    init(&mut clients[0], "fleet", WORKERS, &initial).await;
    let mut duplicates = 0u64;
    for (t, round) in grads.iter().enumerate() {
        let t = t as u64;
        let mut order: Vec<u32> = (0..WORKERS).collect();
        order.shuffle(&mut rng);
        for (i, &w) in order.iter().enumerate() {
            let last = i + 1 == order.len();
            let g = named(&round[w as usize]);
            let c = &mut clients[w as usize];
            if !last && rng.random_bool(0.3) {
                // A retry racing the original: exactly one of them counts.
                let mut twin = c.clone();
                let (a, b) = tokio::join!(c.push("fleet", w, t, &g), twin.push("fleet", w, t, &g));
                let (a, b) = (a.expect("push"), b.expect("retry"));
                assert!(
                    a.duplicate != b.duplicate,
                    "round {t} worker {w}: one of two counts"
                );
                duplicates += 1;
            } else {
                let r = c.push("fleet", w, t, &g).await.expect("push");
                assert!(!r.duplicate);
                assert_eq!(r.pushed as usize, i + 1, "pushes counted so far");
                if !last && rng.random_bool(0.2) {
                    let again = c.push("fleet", w, t, &g).await.expect("retry");
                    assert!(again.duplicate, "a retry after the ack is a duplicate");
                    duplicates += 1;
                }
            }
        }
        let pulls = clients.iter().map(|c| {
            let mut c = c.clone();
            async move { c.pull("fleet", t + 1).await.expect("pull") }
        });
        let pulled = futures::future::join_all(pulls).await;
        for p in &pulled {
            assert_eq!(p.round, t + 1);
            assert_eq!(
                bits(p),
                bits(&want[t as usize]),
                "round {t}: bit-identical to the reference"
            );
            // The reference is a one-worker job given the mean: the same
            // outcome but for the participants.
            let last = p.last.clone().expect("outcome");
            assert_eq!(last.participants, 8, "round {t}: every worker");
            let reference = want[t as usize].last.clone().expect("outcome");
            assert_eq!(
                pb::RoundOutcome {
                    participants: 1,
                    ..last
                },
                reference,
                "round {t}: same norm, coefficient and lr"
            );
        }
    }

    let last = want.last().and_then(|p| p.last.clone()).expect("outcome");
    assert!(
        last.clip_coefficient < 1.0,
        "clipping was exercised: {last:?}"
    );
    let (code, body) = http_get(server.http, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    let job = [("job", "fleet")];
    assert_eq!(
        metric(&body, "paramd_pushes_total", &job),
        Some((WORKERS as u64 * ROUNDS) as f64)
    );
    assert_eq!(
        metric(&body, "paramd_duplicate_pushes_total", &job),
        Some(duplicates as f64)
    );
    assert_eq!(metric(&body, "paramd_round", &job), Some(ROUNDS as f64));
    server.shutdown().await;
}
