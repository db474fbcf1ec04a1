//! Entry points for fuzzing what a client or a disk can hand the server:
//! shared by the cargo-fuzz targets in `fuzz/` and by an ordinary test that
//! replays their corpora on stable Rust. Each must return, whatever the
//! input, without panicking or allocating beyond a bound of the input size.

use std::sync::OnceLock;

use paramd_proto::v1 as pb;
use prost::Message;

use crate::checkpoint;
use crate::layout::Layout;
use crate::pieces::{Ownership, Spare, Target};
use crate::spec::JobConfig;

/// The job pushes are checked against: three parameters, a scalar among
/// them, in chunks of 4 elements.
pub fn push_spec() -> pb::JobSpec {
    let param = |name: &str, shape: Vec<u64>| pb::ParamSpec {
        name: name.into(),
        shape,
    };
    pb::JobSpec {
        params: vec![
            param("w", vec![3, 5]),
            param("b", vec![5]),
            param("s", vec![]),
        ],
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: None,
        }),
        workers: 2,
        non_finite: pb::NonFinitePolicy::Error as i32,
        ..Default::default()
    }
}

struct PushTarget {
    config: JobConfig,
    layout: Layout,
    own: Ownership,
}

fn push_target() -> Option<&'static PushTarget> {
    static T: OnceLock<Option<PushTarget>> = OnceLock::new();
    T.get_or_init(|| {
        let config = JobConfig::try_from(&push_spec()).ok()?;
        let layout = Layout::new(&config.params, 16);
        let own = Ownership::all(&layout);
        Some(PushTarget {
            config,
            layout,
            own,
        })
    })
    .as_ref()
}

/// Decodes `data` as a PushRequest and validates its segments. Returns
/// whether the push would be accepted.
pub fn push(data: &[u8]) -> bool {
    let Ok(req) = pb::PushRequest::decode(data) else {
        return false;
    };
    let Some(t) = push_target() else {
        return false;
    };
    let index = t.config.index();
    let target = Target {
        params: &t.config.params,
        index: &index,
        layout: &t.layout,
        own: &t.own,
        finite_only: true,
    };
    let lens = t
        .own
        .chunks
        .iter()
        .map(|&c| t.layout.chunks[c].len)
        .collect();
    let mut staging = target.stage(Spare::new(lens, 1).take(), false, None);
    staging.feed(req.grads, &req.no_grad, None).is_ok() && staging.finish(None).is_ok()
}

/// Loads `data` as shard 0's file of a one-shard checkpoint whose manifest
/// vouches for it. Returns whether it loaded.
pub fn checkpoint(data: &[u8]) -> bool {
    let Ok(dir) = tempfile_dir() else {
        return false;
    };
    let round_dir = checkpoint::round_dir(&dir, "j", 1);
    let ok = (|| {
        std::fs::create_dir_all(&round_dir).ok()?;
        let name = checkpoint::shard_file(0, 1);
        std::fs::write(round_dir.join(&name), data).ok()?;
        checkpoint::write_test_manifest(&round_dir, "j", 1, &name, data).ok()?;
        checkpoint::load_latest(&dir, "j", 0, 1).ok()?
    })()
    .is_some();
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "paramd-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
