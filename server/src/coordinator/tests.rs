//! Tests of the coordinator: the norm and the step decision, the members
//! of a round (fixed workers, backup workers, elastic membership), and
//! waiting for shards.

use super::*;

fn policy(clip: Option<f64>) -> Policy {
    Policy {
        elastic: None,
        base_lrs: vec![0.1, 0.01],
        schedule: Schedule::WarmupCosine {
            warmup_steps: 2,
            total_steps: 10,
            min_lr_ratio: 0.0,
        },
        clip,
        workers: 4,
        backup_workers: 0,
        worker_timeout: Duration::from_secs(60),
    }
}

#[test]
fn norm_is_independent_of_report_order() {
    let a = Report {
        sums: vec![(2, 0.3), (0, 1.7)],
        non_finite: false,
        ..Default::default()
    };
    let b = Report {
        sums: vec![(1, 2.5e-9), (3, 11.0)],
        non_finite: false,
        ..Default::default()
    };
    let p = policy(Some(1.0));
    let d1 = p.decide(0, 0, &[a.clone(), b.clone()]);
    let d2 = p.decide(0, 0, &[b, a]);
    assert_eq!(d1.grad_norm.to_bits(), d2.grad_norm.to_bits());
    assert!(d1.clip_coefficient < 1.0);
    assert_eq!(d1.lr, vec![0.0, 0.0], "the first warmup step has lr 0");
    assert_eq!(d1.step, 1);
}

#[test]
fn a_norm_past_f32_is_infinite_and_skips_the_round() {
    // Finite sums whose total passes f32's range, as torch's f32 sum does.
    let r = Report {
        sums: vec![(0, 1e39), (1, 1.0)],
        non_finite: false,
        ..Default::default()
    };
    for clip in [Some(1.0), None] {
        let d = policy(clip).decide(0, 5, std::slice::from_ref(&r));
        assert!(d.skipped && d.grad_norm.is_infinite(), "{d:?}");
        assert_eq!(d.step, 5);
    }
}

#[test]
fn non_finite_skips_and_keeps_the_step() {
    let r = Report {
        sums: vec![(0, 1.0)],
        non_finite: true,
        ..Default::default()
    };
    let d = policy(None).decide(7, 3, &[r]);
    assert!(d.skipped);
    assert_eq!(d.step, 3);
    assert_eq!(d.clip_coefficient, 1.0);
}

#[test]
fn a_state_load_is_applied_only_when_every_shard_holds_it() {
    let report = |load: Option<LoadTicket>| Report {
        sums: vec![(0, 1.0)],
        load,
        ..Default::default()
    };
    let t = LoadTicket { id: 7, step: 40 };
    let d = policy(None).decide(2, 2, &[report(Some(t)), report(Some(t))]);
    assert_eq!((d.loaded_state, d.step), (7, 41));
    assert_eq!(
        d.lr,
        policy(None).lrs(40),
        "the schedule counts from the load"
    );
    let other = LoadTicket { id: 8, step: 40 };
    for reports in [
        [report(Some(t)), report(None)],
        [report(Some(t)), report(Some(other))],
        [report(None), report(Some(t))],
    ] {
        let d = policy(None).decide(2, 2, &reports);
        assert_eq!((d.loaded_state, d.step), (0, 3), "{reports:?}");
    }
}

fn held(shards: &[&[u32]]) -> Held {
    shards
        .iter()
        .map(|ws| Some(ws.iter().map(|&w| (w, 0)).collect()))
        .collect()
}

fn whole(shards: &[&[u32]]) -> Vec<u32> {
    whole_everywhere(&held(shards))
        .into_iter()
        .map(|(w, _)| w)
        .collect()
}

#[test]
fn members_are_the_workers_whole_on_every_shard() {
    let p = policy(None);
    // Worker 3 reached shard 0 only; 0..3 are whole everywhere.
    let h = whole(&[&[0, 1, 2, 3], &[2, 0, 1]]);
    assert_eq!(
        p.members(0, h.clone(), false),
        None,
        "all four are expected"
    );
    let m = p.members(0, h, true).expect("timed out with three whole");
    assert_eq!((m.workers, m.dropped), (vec![0, 1, 2], vec![3]));
    let all = whole(&[&[3, 1, 0, 2], &[0, 1, 2, 3]]);
    let m = p.members(0, all, false).expect("everyone");
    assert_eq!((m.workers, m.dropped), (vec![0, 1, 2, 3], vec![]));
    let mut none_yet = held(&[&[0]]);
    none_yet.push(None);
    assert!(
        whole_everywhere(&none_yet).is_empty(),
        "shard 1 holds no push"
    );
    assert_eq!(p.members(0, Vec::new(), true), None);
}

#[test]
fn a_worker_is_whole_only_with_the_same_lease_on_every_shard() {
    let mut h = held(&[&[0, 1], &[0, 1]]);
    // Worker 1's push on shard 1 came from another membership.
    h[1].as_mut().expect("shard 1").insert(1, 9);
    assert_eq!(whole_everywhere(&h), vec![(0, 0)]);
}

#[test]
fn elastic_rounds_wait_for_every_member_or_the_grace() {
    let m = |whole: &[u32], current: &[u32], grace_over| {
        Policy::elastic_members(2, 4, whole.to_vec(), current, grace_over)
    };
    assert_eq!(m(&[0], &[0], true), None, "fewer than min_workers");
    assert_eq!(m(&[0, 2], &[0, 1, 2], false), None, "worker 1 is a member");
    let grace = m(&[0, 2], &[0, 1, 2], true).expect("the grace is over");
    assert_eq!((grace.workers, grace.dropped), (vec![0, 2], vec![1]));
    // A member that pushed and left still counts; the others all pushed.
    let left = m(&[0, 1, 3], &[0, 3], false).expect("every member pushed");
    assert_eq!(
        (left.round, left.workers, left.dropped),
        (4, vec![0, 1, 3], vec![])
    );
}

#[test]
fn backup_workers_complete_a_round_without_the_slowest() {
    let p = Policy {
        backup_workers: 1,
        ..policy(None)
    };
    assert_eq!(p.members(0, whole(&[&[0, 1], &[0, 1, 2]]), false), None);
    let m = p
        .members(0, whole(&[&[0, 1, 3], &[3, 1, 0]]), false)
        .expect("three of four");
    assert_eq!((m.workers, m.dropped), (vec![0, 1, 3], vec![]));
}

#[tokio::test]
async fn members_wait_for_the_worker_timeout() {
    let p = Policy {
        worker_timeout: Duration::from_millis(50),
        ..policy(None)
    };
    let c = std::sync::Arc::new(Coordinator::new(
        p,
        2,
        0,
        0,
        crate::metrics::JobHistogram::new("paramd_coordinator_shard_wait_seconds", "test", "0"),
        None,
    ));
    let c2 = c.clone();
    let wait = Duration::from_secs(30);
    let shard1 = tokio::spawn(async move { c2.members(0, 1, &[(1, 0), (2, 0)], wait).await });
    let started = Instant::now();
    let m = c
        .members(0, 0, &[(0, 0), (1, 0), (2, 0)], wait)
        .await
        .expect("members");
    assert!(started.elapsed() >= Duration::from_millis(40));
    assert_eq!(
        (m.workers.clone(), m.dropped.clone()),
        (vec![1, 2], vec![0, 3])
    );
    assert_eq!(shard1.await.expect("join").expect("members"), m);
    let late = c
        .members(0, 1, &[(0, 0), (1, 0), (2, 0), (3, 0)], wait)
        .await
        .expect("asked again");
    assert_eq!(late, m, "the choice stands once made");
}

#[tokio::test]
async fn decides_once_every_shard_reported() {
    let wait = Duration::from_secs(30);
    let c = std::sync::Arc::new(Coordinator::new(
        policy(None),
        2,
        0,
        0,
        crate::metrics::JobHistogram::new("paramd_coordinator_shard_wait_seconds", "test", "0"),
        None,
    ));
    let c2 = c.clone();
    let first = tokio::spawn(async move { c2.report(0, 0, Report::default(), wait).await });
    let second = c
        .report(0, 1, Report::default(), wait)
        .await
        .expect("decision");
    let first = first.await.expect("join").expect("decision");
    assert_eq!(first, second);
    let again = c
        .report(0, 0, Report::default(), wait)
        .await
        .expect("asked again");
    assert_eq!(again, first, "a shard asking again gets the same decision");
    assert!(
        c.report(5, 0, Report::default(), wait).await.is_err(),
        "round 5 is not open"
    );
}

#[tokio::test]
async fn an_undecided_round_times_out_naming_the_missing_shards() {
    let c = Coordinator::new(
        policy(None),
        3,
        0,
        0,
        crate::metrics::JobHistogram::new("paramd_coordinator_shard_wait_seconds", "test", "0"),
        None,
    );
    let err = c
        .report(0, 1, Report::default(), Duration::from_millis(20))
        .await
        .expect_err("shards 0 and 2 never report");
    assert!(
        err.to_string().contains("shards [0, 2] have not reported"),
        "{err}"
    );
    assert!(err.retryable());
}
