//! Tests of the segment checks and of initial values written into place.

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
        "'p1' is missing: expected 8 bytes",
    );
    refused(
        fill(all(), vec![seg(0, 0, &[0.0; 3]), seg(1, 0, &[0.0; 2])]),
        "'p0' [4]: expected 16 bytes, got 12",
    );
    refused(
        fill(all(), vec![seg(0, 3, &[0.0; 2])]),
        "'p0' [4]: expected 16 bytes, got 8 bytes at element 3",
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
