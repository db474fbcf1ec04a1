//! The fuzz targets' inputs replayed on stable Rust: the seed corpora in
//! `fuzz/corpus/`, plus every truncation and a sweep of byte flips of a
//! valid push and a valid checkpoint file. None may panic; the valid ones
//! must load. `PARAMD_WRITE_SEEDS=1` rewrites the seed files.

use std::path::PathBuf;

use paramd::checkpoint::{ChunkRef, ShardMeta, write_shard};
use paramd::chunk::ChunkState;
use paramd::fuzzing;
use paramd::math::state::OptimState;
use paramd::optim::{Hyper, SgdHyper};
use paramd_client::v1 as pb;
use prost::Message;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn segment(param: &str, offset: u64, n: usize) -> pb::Segment {
    pb::Segment {
        dtype: 0,
        param: param.into(),
        offset,
        data: paramd_client::to_le_bytes(&vec![0.5; n]),
    }
}

fn valid_push() -> Vec<u8> {
    pb::PushRequest {
        lease: 0,
        weight: 0.0,
        job: "j".into(),
        worker: 1,
        round: 0,
        grads: vec![
            segment("w", 0, 10),
            segment("w", 10, 5),
            segment("b", 0, 5),
            segment("s", 0, 1),
        ],
        no_grad: Vec::new(),
    }
    .encode_to_vec()
}

fn valid_checkpoint() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = fuzzing::push_spec();
    let hyper = Hyper::Sgd(SgdHyper {
        lr: 1e-3,
        momentum: 0.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
    });
    let sizes = [
        ("w", 0, 4),
        ("w", 4, 4),
        ("w", 8, 4),
        ("w", 12, 3),
        ("b", 0, 4),
        ("b", 4, 1),
        ("s", 0, 1),
    ];
    let states: Vec<ChunkState> = sizes
        .iter()
        .map(|&(_, _, n)| ChunkState {
            values: paramd::chunk::Values::new(vec![1.5; n]),
            state: OptimState::Sgd {
                momentum_buffer: None,
            },
            step: 2,
        })
        .collect();
    let chunks: Vec<ChunkRef<'_>> = sizes
        .iter()
        .zip(&states)
        .map(|(&(p, o, _), state)| ChunkRef {
            key: format!("{p}@{o}"),
            hyper: &hyper,
            state,
        })
        .collect();
    let layout = pb::LayoutResponse {
        chunk_elems: 4,
        owners: vec![0; sizes.len()],
        params: spec.params.clone(),
        ..Default::default()
    };
    let meta = ShardMeta {
        job: "j".into(),
        round: 1,
        skipped: 0,
        last: None,
        shard: 0,
        shards: 1,
        membership: None,
    };
    write_shard(dir.path(), &meta, &spec, &layout, &chunks).expect("write");
    std::fs::read(
        paramd::checkpoint::round_dir(dir.path(), "j", 1)
            .join(paramd::checkpoint::shard_file(0, 1)),
    )
    .expect("read")
}

/// Every prefix, and byte flips at up to `flips` spread positions.
fn mutants(seed: &[u8], flips: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..seed.len()).map(|n| seed[..n].to_vec()).collect();
    let step = (seed.len() / flips.max(1)).max(1);
    for i in (0..seed.len()).step_by(step) {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut m = seed.to_vec();
            m[i] ^= mask;
            out.push(m);
        }
    }
    out
}

fn seeds(target: &str, valid: Vec<u8>) -> Vec<Vec<u8>> {
    let dir = corpus(target);
    if std::env::var_os("PARAMD_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join("valid"), &valid).expect("write seed");
    }
    let mut all = vec![valid];
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            all.push(std::fs::read(e.expect("entry").path()).expect("seed"));
        }
    }
    all
}

#[test]
fn push_inputs_never_panic() {
    let valid = valid_push();
    assert!(fuzzing::push(&valid), "the valid push is accepted");
    let all = seeds("push", valid.clone());
    assert!(all.len() >= 2, "the checked-in seed is replayed too");
    let mut refused = 0;
    for seed in &all {
        for m in mutants(seed, 400) {
            refused += usize::from(!fuzzing::push(&m));
        }
    }
    assert!(refused > 0, "malformed pushes are refused");
}

#[test]
fn checkpoint_inputs_never_panic() {
    let valid = valid_checkpoint();
    assert!(fuzzing::checkpoint(&valid), "the valid checkpoint loads");
    let all = seeds("checkpoint", valid);
    assert!(all.len() >= 2, "the checked-in seed is replayed too");
    let mut refused = 0;
    for seed in &all {
        // Prefixes of the header and a sweep of flips over the whole file.
        for m in mutants(seed, 300) {
            refused += usize::from(!fuzzing::checkpoint(&m));
        }
    }
    assert!(refused > 0, "damaged checkpoints are refused");
}
