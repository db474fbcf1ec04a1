//! Parameters without a gradient, torch's way: a push names them in
//! `no_grad` instead of sending values. A parameter no worker of the round
//! has a gradient for is not stepped at all (no weight decay, no moments,
//! its own step count unchanged, nothing in the norm); one that only some
//! workers have a gradient for is averaged over every worker, the others
//! counting as zeros (DistributedDataParallel's rule). Bit-identical on 1
//! and 3 shards.

use std::collections::HashMap;
use std::sync::Arc;

use paramd_client::codec::Payload;
use paramd_client::v1 as pb;
use paramd_client::{Client, ClientError, to_le_bytes};
use paramd_tests::{TestServer, flat_spec, on_one_and_three_shards};
use tonic::Code;

const SHAPES: [(&str, usize); 3] = [("used", 6), ("some", 5), ("never", 4)];

fn spec() -> pb::JobSpec {
    let adamw = pb::Optimizer {
        kind: pb::OptimizerKind::Adamw as i32,
        hyper: Some(pb::Hyperparameters {
            lr: Some(0.1),
            weight_decay: Some(0.1),
            ..Default::default()
        }),
    };
    pb::JobSpec {
        clip: Some(pb::Clip { max_norm: 1.0 }),
        ..flat_spec(&SHAPES, adamw, 2)
    }
}

fn values(name: &str, n: usize, scale: f32) -> Vec<f32> {
    let salt = name.len() as f32;
    (0..n)
        .map(|i| scale * (i as f32 - 2.0 + 0.37 * salt))
        .collect()
}

/// Worker `worker`'s push: values for `grads`, `no_grad` for the rest.
async fn push(
    c: &Client,
    job: &str,
    worker: u32,
    round: u64,
    grads: &[(&str, Vec<f32>)],
    no_grad: &[&str],
) -> Result<pb::PushResponse, ClientError> {
    let grads: Vec<(Arc<str>, Payload)> = grads
        .iter()
        .map(|(n, v)| (Arc::from(*n), Payload::Owned(to_le_bytes(v))))
        .collect();
    let no_grad: Vec<Arc<str>> = no_grad.iter().map(|&n| Arc::from(n)).collect();
    c.push_payloads(
        job,
        worker,
        round,
        &grads,
        &no_grad,
        paramd_client::PushOptions::default(),
    )
    .await
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

async fn create(c: &mut Client, job: &str) {
    let init: Vec<(String, Vec<f32>)> = SHAPES
        .iter()
        .map(|&(n, len)| (n.to_owned(), values(n, len, 0.5)))
        .collect();
    let refs: Vec<(&str, &[f32])> = init
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    c.init(job, spec(), &refs).await.expect("init");
}

async fn pulled(c: &mut Client, job: &str, round: u64) -> HashMap<String, Vec<u32>> {
    let p = c.pull(job, round).await.expect("pull");
    p.params.iter().map(|(n, v)| (n.clone(), bits(v))).collect()
}

/// Three rounds: `never` has no gradient from anyone in rounds 0 and 1,
/// then one from worker 0 only; `some` only ever from worker 0.
async fn main_run(c: &mut Client) -> Vec<HashMap<String, Vec<u32>>> {
    create(c, "main").await;
    let mut after = vec![pulled(c, "main", 0).await];
    for round in 0..3u64 {
        let s = round as f32 + 1.0;
        let used = |w: f32| ("used", values("used", 6, s * w));
        let some = ("some", values("some", 5, -s));
        if round < 2 {
            push(c, "main", 0, round, &[used(1.0), some], &["never"])
                .await
                .expect("push");
        } else {
            let never = ("never", values("never", 4, 3.0));
            push(c, "main", 0, round, &[used(1.0), some, never], &[])
                .await
                .expect("push");
        }
        push(c, "main", 1, round, &[used(-0.5)], &["some", "never"])
            .await
            .expect("push");
        after.push(pulled(c, "main", round + 1).await);
    }
    after
}

/// The reference: `some` pushed as explicit zeros by worker 1 (what the
/// rule says its absence counts as), and `never` fresh, getting at round 0
/// the gradient `main` gives it at round 2.
async fn reference_run(c: &mut Client) -> (Vec<HashMap<String, Vec<u32>>>, Vec<u32>) {
    create(c, "zeros").await;
    let mut after = vec![pulled(c, "zeros", 0).await];
    for round in 0..2u64 {
        let s = round as f32 + 1.0;
        let used = |w: f32| ("used", values("used", 6, s * w));
        push(
            c,
            "zeros",
            0,
            round,
            &[used(1.0), ("some", values("some", 5, -s))],
            &["never"],
        )
        .await
        .expect("push");
        push(
            c,
            "zeros",
            1,
            round,
            &[used(-0.5), ("some", vec![0.0; 5])],
            &["never"],
        )
        .await
        .expect("push");
        after.push(pulled(c, "zeros", round + 1).await);
    }
    create(c, "fresh").await;
    let never = ("never", values("never", 4, 3.0));
    // The other parameters get what `main` gives them at round 2, so the
    // global norm (and the clip coefficient) is the same.
    let used = |w: f32| ("used", values("used", 6, 3.0 * w));
    push(
        c,
        "fresh",
        0,
        0,
        &[used(1.0), ("some", values("some", 5, -3.0)), never],
        &[],
    )
    .await
    .expect("push");
    push(c, "fresh", 1, 0, &[used(-0.5)], &["some", "never"])
        .await
        .expect("push");
    (after, pulled(c, "fresh", 1).await["never"].clone())
}

async fn check(mut c: Client) -> Vec<HashMap<String, Vec<u32>>> {
    let main = main_run(&mut c).await;
    let (zeros, fresh_never) = reference_run(&mut c).await;
    // No gradient from anyone: not even weight decay touches it.
    assert_eq!(
        main[1]["never"], main[0]["never"],
        "round 0 stepped 'never'"
    );
    assert_eq!(
        main[2]["never"], main[0]["never"],
        "round 1 stepped 'never'"
    );
    // Its first gradient is its first step (bias correction of step 1).
    assert_eq!(
        main[3]["never"], fresh_never,
        "'never' did not start at step 1"
    );
    assert_ne!(main[3]["never"], main[0]["never"]);
    // A gradient from some workers: the others count as zeros.
    for r in 1..3 {
        assert_eq!(
            main[r]["some"],
            zeros[r]["some"],
            "'some' after round {}",
            r - 1
        );
        assert_eq!(
            main[r]["used"],
            zeros[r]["used"],
            "'used' after round {}",
            r - 1
        );
    }
    let status = c.status(Some("main")).await.expect("status");
    assert_eq!(status.jobs[0].round, 3);
    // Each parameter's own step count (torch's state['step']), read back
    // with its moments from every shard.
    let state = c.state("main", 3).await.expect("state");
    let steps: Vec<u64> = ["used", "some", "never"]
        .iter()
        .map(|n| state.params[*n].step)
        .collect();
    assert_eq!(steps, [3, 3, 1]);
    let moments = &state.params["never"].buffers;
    assert_eq!(
        moments.keys().collect::<Vec<_>>(),
        ["exp_avg", "exp_avg_sq"]
    );
    assert!(moments["exp_avg"].iter().all(|m| *m != 0.0));
    main
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_without_gradient_is_skipped_or_averaged_as_torch_does() {
    on_one_and_three_shards(check).await;
}

#[tokio::test]
async fn a_wrong_no_grad_is_refused_whole() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    create(&mut c, "job").await;
    let all = |s: f32| -> Vec<(&'static str, Vec<f32>)> {
        SHAPES
            .iter()
            .map(|&(n, len)| (n, values(n, len, s)))
            .collect()
    };
    type Grads = Vec<(&'static str, Vec<f32>)>;
    let cases: Vec<(Grads, Vec<&str>, &str)> = vec![
        (all(1.0), vec!["nope"], "nope"),
        (all(1.0), vec!["used"], "'used'"),
        (all(1.0)[1..].to_vec(), vec![], "'used'"),
    ];
    let raw = server.client().await;
    for (grads, no_grad, naming) in cases {
        let e = push(&raw, "job", 0, 0, &grads, &no_grad)
            .await
            .expect_err("refused");
        let status = e.status().expect("a status");
        assert_eq!(status.code(), Code::InvalidArgument, "{e}");
        assert!(status.message().contains(naming), "{naming:?} not in {e}");
    }
    let status = c.status(Some("job")).await.expect("status");
    let job = &status.jobs[0];
    assert_eq!((job.round, job.workers_pushed), (0, 0));
}
