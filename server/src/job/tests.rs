//! Tests of a job on one shard: pushes read in rank order.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use paramd_proto::transport::Credentials;
use paramd_proto::v1 as pb;

use super::admit::ARRIVAL_GRACE;
use super::*;
use crate::pieces::to_le_bytes;

const ELEMS: u64 = 8;

/// A one-shard SGD job of one parameter `p` of `ELEMS` elements.
fn job(workers: u32) -> Arc<Job> {
    let spec = pb::JobSpec {
        params: vec![pb::ParamSpec {
            name: "p".into(),
            shape: vec![ELEMS],
        }],
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(1.0),
                ..Default::default()
            }),
        }),
        workers,
        ..Default::default()
    };
    let config = JobConfig::try_from(&spec).expect("spec");
    let layout = Layout::with_chunk_elems(&config.params, 3);
    let owners = vec![0; layout.chunks.len()];
    let values = layout.chunks.iter().map(|c| vec![0.0; c.len]).collect();
    let second = Duration::from_secs(1);
    let cluster = Cluster::new(0, Vec::new(), &[], second, second, &Credentials::default())
        .expect("one-shard cluster");
    Arc::new(
        Job::create(
            "j".into(),
            spec,
            config,
            layout,
            owners,
            Arc::new(cluster),
            values,
        )
        .expect("job"),
    )
}

/// Worker `w`'s gradient: every element `w + 1`.
fn gradient(w: u32) -> Vec<pb::Segment> {
    vec![pb::Segment {
        dtype: 0,
        param: "p".into(),
        offset: 0,
        data: to_le_bytes(&[(w + 1) as f32; ELEMS as usize]),
    }]
}

#[tokio::test]
async fn overlapping_pushes_are_read_in_rank_order_and_summed_as_they_stream() {
    let job = job(3);
    // Rank 0 is being received; ranks 2 and 1 start meanwhile and wait.
    let (reading0, mut push0) = job.staging(0, 0, None).await;
    let mut second = Box::pin(job.staging(2, 0, None));
    assert!(
        (&mut second).now_or_never().is_none(),
        "rank 2 waits for rank 0"
    );
    let mut first = Box::pin(job.staging(1, 0, None));
    assert!(
        (&mut first).now_or_never().is_none(),
        "rank 1 waits for rank 0"
    );

    job.feed(&mut push0, gradient(0), &[]).expect("feed");
    job.push(0, 0, job.finish(push0).expect("push 0"), 1.0, 0)
        .expect("recorded");
    drop(reading0);
    // Rank 1 goes once rank 0 is summed and its buffers are back.
    let (reading1, mut push1) = first.await;
    assert_eq!(
        job.collect.lock().folded,
        1,
        "rank 1 was let in by rank 0's fold"
    );
    assert!(
        push1.summed(),
        "rank 1 is summed onto rank 0's as it streams"
    );
    assert!(
        (&mut second).now_or_never().is_none(),
        "rank 2 waits while rank 1 is received"
    );
    assert_eq!(job.spare.allocated(), 1, "rank 1 reuses rank 0's set");
    job.feed(&mut push1, gradient(1), &[]).expect("feed");
    job.push(1, 0, job.finish(push1).expect("push 1"), 1.0, 0)
        .expect("recorded");
    drop(reading1);
    let (reading2, mut push2) = second.await;
    assert!(push2.summed());
    job.feed(&mut push2, gradient(2), &[]).expect("feed");
    job.push(2, 0, job.finish(push2).expect("push 2"), 1.0, 0)
        .expect("recorded");
    drop(reading2);

    let mut completed = job.completed.subscribe();
    completed
        .wait_for(|&r| r == 1)
        .await
        .expect("round 0 completes");
    // Each push was summed by trading its set with the accumulators, and
    // the next one was read into the set given back.
    assert_eq!(
        job.spare.allocated(),
        1,
        "one set of push buffers served all three pushes"
    );
    // lr 1, mean gradient (1 + 2 + 3) / 3 = 2, from zeros.
    let store = job.store.read();
    for chunk in &store.chunks {
        assert!(
            chunk.values.iter().all(|&v| v == -2.0),
            "{:?}",
            &chunk.values[..]
        );
    }
}

#[tokio::test]
async fn a_push_whose_lower_ranks_have_not_started_is_read_after_a_grace() {
    let job = job(2);
    let started = tokio::time::Instant::now();
    let (_reading, _push) = job.staging(1, 0, None).await;
    // No push was timed yet: the first round's workers are connecting.
    let patience = job.turn_patience();
    assert!(
        started.elapsed() >= patience,
        "rank 1 gave rank 0 {patience:?} to start"
    );
    job.read_took(Duration::from_millis(30));
    assert_eq!(job.turn_grace(), ARRIVAL_GRACE);
    job.read_took(Duration::from_millis(600));
    assert_eq!(job.turn_grace(), Duration::from_millis(300));
}
