//! Tests of the segment checks and of initial values written into place.

use std::sync::Arc;

use super::*;
use crate::spec::JobConfig;
use paramd_proto::v1 as pb;

#[test]
fn claim_finds_the_first_element_already_set_across_words() {
    let mut bits = vec![0u64; 4];
    assert_eq!(claim(&mut bits, 3, 130), None);
    assert_eq!(claim(&mut bits, 0, 3), None);
    assert_eq!(claim(&mut bits, 130, 256), None);
    assert_eq!(claim(&mut bits, 200, 201), Some(200));
    let mut bits = vec![0u64; 2];
    assert_eq!(claim(&mut bits, 64, 128), None);
    assert_eq!(claim(&mut bits, 10, 70), Some(64));
}

fn config(shapes: &[&[u64]]) -> JobConfig {
    let spec = pb::JobSpec {
        params: shapes
            .iter()
            .enumerate()
            .map(|(i, s)| pb::ParamSpec {
                name: format!("p{i}"),
                shape: s.to_vec(),
            })
            .collect(),
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(0.1),
                ..Default::default()
            }),
        }),
        workers: 1,
        ..Default::default()
    };
    JobConfig::try_from(&spec).expect("a valid spec")
}

fn seg(p: usize, offset: u64, values: &[f32]) -> Segment {
    Segment {
        dtype: 0,
        param: format!("p{p}"),
        offset,
        data: to_le_bytes(values),
    }
}

#[test]
fn values_land_in_their_chunks_and_the_others_are_forwarded() {
    let c = config(&[&[5], &[3]]);
    // Chunks of 2 elements: p0 is 0..2, 2..4, 4..5; p1 is 0..2, 2..3.
    let layout = Layout::with_chunk_elems(&c.params, 2);
    let owners = vec![0, 1, 0, 1, 0];
    let mut f = Filling::new(&c, layout, owners, 0, 2, true).expect("filling");
    f.feed(vec![seg(0, 3, &[3.0, 4.0]), seg(1, 0, &[5.0, 6.0, 7.0])])
        .expect("feed");
    f.feed(vec![seg(0, 0, &[0.0, 1.0, 2.0])]).expect("feed");
    let filled = f.finish().expect("complete");
    assert_eq!(filled.chunks, vec![vec![0.0, 1.0], vec![4.0], vec![7.0]]);
    let forwarded: Vec<(String, u64, usize)> = filled.forward[1]
        .iter()
        .map(|s| (s.param.clone(), s.offset, s.data.len() / 4))
        .collect();
    assert_eq!(
        forwarded,
        vec![
            ("p0".into(), 3, 1),
            ("p1".into(), 0, 2),
            ("p0".into(), 2, 1)
        ]
    );
    assert!(filled.forward[0].is_empty());
}

fn refused(f: Result<Filled>, naming: &str) {
    let e = f.expect_err("refused").to_string();
    assert!(e.contains(naming), "{naming:?} not in: {e}");
}

#[test]
fn twice_missing_short_outside_and_elsewhere_are_refused() {
    let c = config(&[&[4], &[2]]);
    let fill = |owners: Vec<u32>, segments: Vec<Segment>| {
        let layout = Layout::with_chunk_elems(&c.params, 2);
        let mut f = Filling::new(&c, layout, owners, 0, 2, false)?;
        f.feed(segments)?;
        f.finish()
    };
    let all = || vec![0, 0, 0];
    refused(
        fill(
            all(),
            vec![
                seg(0, 0, &[0.0; 4]),
                seg(0, 1, &[1.0]),
                seg(1, 0, &[0.0; 2]),
            ],
        ),
        "'p0' is sent twice: elements 1..2 overlap",
    );
    refused(
        fill(all(), vec![seg(0, 0, &[0.0; 4])]),
        "'p1' is missing: expected 2 elements",
    );
    refused(
        fill(all(), vec![seg(0, 0, &[0.0; 3]), seg(1, 0, &[0.0; 2])]),
        "'p0' [4]: expected 4 elements, got 3",
    );
    refused(
        fill(all(), vec![seg(0, 3, &[0.0; 2])]),
        "'p0' [4]: expected 4 elements, got 2 at element 3",
    );
    refused(
        fill(all(), vec![seg(0, u64::MAX, &[0.0])]),
        "at element 18446744073709551615",
    );
    refused(
        fill(all(), vec![seg(2, 0, &[0.0])]),
        "unknown parameter 'p2'",
    );
    refused(
        fill(vec![0, 1, 0], vec![seg(0, 0, &[0.0; 4])]),
        "'p0': elements 2..4 are not held by this shard",
    );
    refused(
        fill(vec![0, 2, 0], vec![]),
        "layout.owners must name one of 2 shards",
    );
    // Only the chunks held here are expected.
    assert!(fill(vec![1, 1, 0], vec![seg(1, 0, &[1.0, 2.0])]).is_ok());
}

/// Stages `messages` (segments, no_grad names) of a push on the shard that
/// holds the chunks `owners` gives to shard 0, with chunks of 2 elements.
fn stage(
    c: &JobConfig,
    owners: &[u32],
    spare: &Arc<Spare>,
    messages: Vec<(Vec<Segment>, Vec<&str>)>,
) -> Result<Staged> {
    stage_onto(c, owners, spare, messages, None)
}

/// `stage`, summed as it streams onto `sum` if given.
fn stage_onto(
    c: &JobConfig,
    owners: &[u32],
    spare: &Arc<Spare>,
    messages: Vec<(Vec<Segment>, Vec<&str>)>,
    sum: Option<&[Accumulator]>,
) -> Result<Staged> {
    let layout = Layout::with_chunk_elems(&c.params, 2);
    let own = Ownership::of(owners, 0);
    let index = c.index();
    let target = Target {
        params: &c.params,
        index: &index,
        layout: &layout,
        own: &own,
        finite_only: true,
    };
    let mut staging = target.stage(spare.take(), sum.is_some(), None);
    for (segments, no_grad) in messages {
        let names: Vec<String> = no_grad.into_iter().map(String::from).collect();
        staging.feed(segments, &names, sum)?;
    }
    staging.finish(sum)
}

fn spare_for(c: &JobConfig, owners: &[u32], keep: usize) -> Arc<Spare> {
    let layout = Layout::with_chunk_elems(&c.params, 2);
    let own = Ownership::of(owners, 0);
    Spare::new(
        own.chunks.iter().map(|&id| layout.chunks[id].len).collect(),
        keep,
    )
}

#[test]
fn a_push_lands_in_its_chunks_across_messages_and_its_buffers_are_kept() {
    let c = config(&[&[5], &[3]]);
    // Chunks of 2 elements: p0 is 0..2, 2..4, 4..5; p1 is 0..2, 2..3.
    let owners = [0, 1, 0, 1, 0];
    let spare = spare_for(&c, &owners, 1);
    let push = stage(
        &c,
        &owners,
        &spare,
        vec![
            (vec![seg(0, 0, &[0.0, 1.0])], vec![]),
            (vec![seg(1, 2, &[7.0]), seg(0, 4, &[4.0])], vec![]),
        ],
    )
    .expect("staged");
    assert_eq!(push.bytes, [16, 0, 0]);
    let chunks: Vec<Option<Vec<f32>>> =
        (0..3).map(|l| push.chunk(l).map(<[f32]>::to_vec)).collect();
    assert_eq!(
        chunks,
        vec![Some(vec![0.0, 1.0]), Some(vec![4.0]), Some(vec![7.0])]
    );
    assert_eq!(spare.kept(), 0);
    drop(push);
    assert_eq!(
        spare.kept(),
        1,
        "the push's buffers are kept for the next round"
    );
    // The next push reuses them; a third set beyond `keep` is dropped.
    let again = stage(
        &c,
        &owners,
        &spare,
        vec![(
            vec![seg(0, 0, &[2.0; 2]), seg(0, 4, &[3.0]), seg(1, 2, &[5.0])],
            vec![],
        )],
    );
    assert_eq!(spare.kept(), 0);
    let other = spare.take();
    drop(again);
    drop(other);
    assert_eq!(spare.kept(), 1);
}

#[test]
fn no_grad_parameters_have_no_gradient_and_cannot_also_be_sent() {
    let c = config(&[&[4], &[2]]);
    let owners = [0, 0, 0];
    let spare = spare_for(&c, &owners, 2);
    let push = stage(
        &c,
        &owners,
        &spare,
        vec![(vec![seg(1, 0, &[1.0, 2.0])], vec!["p0"])],
    )
    .expect("staged");
    assert_eq!(push.chunk(0), None);
    assert_eq!(push.chunk(1), None);
    assert_eq!(push.chunk(2), Some(&[1.0, 2.0][..]));
    let sent_then_listed = stage(
        &c,
        &owners,
        &spare,
        vec![
            (vec![seg(0, 0, &[0.0; 4]), seg(1, 0, &[0.0; 2])], vec![]),
            (vec![], vec!["p0"]),
        ],
    );
    let listed_then_sent = stage(
        &c,
        &owners,
        &spare,
        vec![(vec![], vec!["p0"]), (vec![seg(0, 0, &[0.0; 4])], vec![])],
    );
    for r in [sent_then_listed, listed_then_sent] {
        let e = r.expect_err("refused").to_string();
        assert!(e.contains("'p0' is sent and also listed in no_grad"), "{e}");
    }
}

#[test]
fn a_push_with_elements_twice_missing_outside_or_not_finite_is_refused() {
    let c = config(&[&[4], &[2]]);
    let all = [0, 0, 0];
    let spare = spare_for(&c, &all, 2);
    let refused = |owners: &[u32], segments: Vec<Segment>, naming: &str| {
        let e = stage(&c, owners, &spare, vec![(segments, vec![])])
            .expect_err("refused")
            .to_string();
        assert!(e.contains(naming), "{naming:?} not in: {e}");
    };
    let p1 = || seg(1, 0, &[0.0; 2]);
    refused(
        &all,
        vec![seg(0, 0, &[0.0; 4]), seg(0, 1, &[1.0]), p1()],
        "'p0' is sent twice: elements 1..2 overlap",
    );
    refused(
        &all,
        vec![seg(0, 0, &[0.0; 4])],
        "'p1' is missing: expected 2 elements",
    );
    refused(
        &all,
        vec![seg(0, 0, &[0.0; 3]), p1()],
        "'p0' [4]: expected 4 elements, got 3",
    );
    refused(
        &all,
        vec![seg(0, 3, &[0.0; 2])],
        "'p0' [4]: expected 4 elements, got 2 at element 3",
    );
    refused(&all, vec![seg(2, 0, &[0.0])], "unknown parameter 'p2'");
    refused(
        &[0, 1, 0],
        vec![seg(0, 0, &[0.0; 4])],
        "'p0': elements 2..4 are not held by this shard",
    );
    refused(
        &all,
        vec![seg(0, 0, &[0.0, f32::NAN, 0.0, 0.0]), p1()],
        "'p0': element 1 is NaN",
    );
    // Only the chunks held here are expected.
    assert!(stage(&c, &[1, 1, 0], &spare, vec![(vec![p1()], vec![])]).is_ok());
}

#[test]
fn the_first_push_of_a_mean_trades_buffers_and_the_next_ones_add() {
    let c = config(&[&[3]]);
    let owners = [0, 0];
    let spare = spare_for(&c, &owners, 2);
    let mut accs = vec![Accumulator::new(2), Accumulator::new(1)];
    let mut a = stage(
        &c,
        &owners,
        &spare,
        vec![(vec![seg(0, 0, &[1.0, -0.0, 3.0])], vec![])],
    )
    .expect("a");
    let mut b = stage(&c, &owners, &spare, vec![(vec![], vec!["p0"])]).expect("b");
    a.fold_all(&mut accs, true);
    b.fold_all(&mut accs, false);
    assert_eq!(accs[0].sum, vec![1.0, 0.0]);
    assert!(accs[0].sum[1].is_sign_positive(), "-0.0 + 0.0 is +0.0");
    assert_eq!(accs[1].sum, vec![3.0]);
    assert_eq!(accs[0].gradients, 1);
}

#[test]
fn a_push_summed_as_it_streams_is_what_folding_it_would_give() {
    let c = config(&[&[3], &[1]]);
    let owners = [0, 0, 0];
    let spare = spare_for(&c, &owners, 2);
    let rank0 = || {
        vec![(
            vec![seg(0, 0, &[1.0, -0.0, 3.0]), seg(1, 0, &[-0.0])],
            vec![],
        )]
    };
    let summed_rank0 = || {
        let mut accs = vec![
            Accumulator::new(2),
            Accumulator::new(1),
            Accumulator::new(1),
        ];
        stage(&c, &owners, &spare, rank0())
            .expect("rank 0")
            .fold_all(&mut accs, true);
        accs
    };
    let (mut folded, mut streamed) = (summed_rank0(), summed_rank0());
    // Rank 1: p0 in two messages, p1 without a gradient.
    let messages = || {
        vec![
            (vec![seg(0, 2, &[0.5])], vec!["p1"]),
            (vec![seg(0, 0, &[0.25, 2.0])], vec![]),
        ]
    };
    stage(&c, &owners, &spare, messages())
        .expect("rank 1")
        .fold_all(&mut folded, false);
    let wrong = stage_onto(&c, &owners, &spare, messages(), Some(&streamed[..1]));
    assert!(wrong.is_err(), "a summed push needs every chunk's sum");
    let mut push = stage_onto(&c, &owners, &spare, messages(), Some(&streamed)).expect("rank 1");
    assert!(push.summed());
    push.fold_all(&mut streamed, false);
    for (f, s) in folded.iter().zip(&streamed) {
        let bits = |a: &Accumulator| a.sum.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(f), bits(s));
        assert_eq!(f.gradients, s.gradients);
    }
    assert!(streamed[2].sum[0].is_sign_positive(), "-0.0 + 0.0 is +0.0");
    assert_eq!(streamed[2].gradients, 1);
}
