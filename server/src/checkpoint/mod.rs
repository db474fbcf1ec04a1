//! Checkpoint files: a shard's chunks and optimizer state as safetensors,
//! and the manifest that makes a checkpoint exist.
//!
//! `DIR/<job>/<round>/shard-<i>-of-<n>.safetensors` holds shard i's chunks
//! (`<param>@<offset>/param`, `.../exp_avg`, `.../exp_avg_sq`,
//! `.../max_exp_avg_sq`, `.../momentum_buffer`, `.../step`) with the job's
//! spec, layout, round and schedule position in the metadata.
//! `MANIFEST.json` beside it, written last, lists every shard's file with
//! its SHA-256: a directory without it is not a checkpoint. Every file is
//! written under a temporary name, fsynced, renamed, and its directory
//! fsynced.

use std::path::{Path, PathBuf};

use paramd_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkState;
use crate::coordinator::Decision;
use crate::error::{Error, Result};

mod failpoint;
mod read;
mod receive;
mod retention;
mod write;

pub use failpoint::failpoint;
pub use read::{load_latest, load_round, missing_files, newest_round, read_manifest, restorable};
pub use receive::{Receiving, file_path};
pub use retention::{jobs, set_aside_deleted, set_aside_newer};
pub use write::{ChunkRef, commit, write_shard, write_test_manifest};

/// The format this build writes and reads.
pub const FORMAT: &str = "paramd-checkpoint/1";
/// The name of a checkpoint's manifest.
pub const MANIFEST: &str = "MANIFEST.json";

/// Where and how often checkpoints are taken.
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    pub dir: PathBuf,
    /// Take one after every this many rounds; 0: only on request.
    pub every: u64,
    /// Checkpoints kept per job.
    pub keep: usize,
}

/// The manifest of one checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub job: String,
    pub round: u64,
    pub shards: usize,
    pub files: Vec<ManifestFile>,
}

impl From<&Manifest> for pb::Manifest {
    fn from(m: &Manifest) -> pb::Manifest {
        pb::Manifest {
            format: m.format.clone(),
            job: m.job.clone(),
            round: m.round,
            shards: m.shards as u64,
            files: m
                .files
                .iter()
                .map(|f| pb::ManifestFile {
                    name: f.name.clone(),
                    sha256: f.sha256.clone(),
                    bytes: f.bytes,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::Manifest> for Manifest {
    type Error = Error;

    /// Takes a manifest off the wire; `Manifest::check` says whether it is
    /// one to act on.
    fn try_from(m: pb::Manifest) -> Result<Manifest> {
        Ok(Manifest {
            format: m.format,
            job: m.job,
            round: m.round,
            shards: usize::try_from(m.shards).map_err(|_| {
                Error::Invalid(format!("manifest.shards = {} is too large", m.shards))
            })?,
            files: m
                .files
                .into_iter()
                .map(|f| ManifestFile {
                    name: f.name,
                    sha256: f.sha256,
                    bytes: f.bytes,
                })
                .collect(),
        })
    }
}

/// The most shards a manifest may name: far beyond any cluster, and small
/// enough that reading one is cheap whatever it says.
pub const MAX_SHARDS: usize = 4096;

impl Manifest {
    /// Checks what a manifest says before anything is done with it: this
    /// build's format, a shard count within `MAX_SHARDS`, and exactly one
    /// file per shard under the name that shard writes, with a SHA-256.
    pub fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(Error::Invalid(format!(
                "manifest format {:?} is not this build's ({FORMAT})",
                self.format
            )));
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(Error::Invalid(format!(
                "manifest shards must be 1 to {MAX_SHARDS}, got {}",
                self.shards
            )));
        }
        if self.files.len() != self.shards {
            return Err(Error::Invalid(format!(
                "manifest lists {} files for {} shards",
                self.files.len(),
                self.shards
            )));
        }
        for (i, f) in self.files.iter().enumerate() {
            let want = shard_file(i, self.shards);
            if f.name != want {
                return Err(Error::Invalid(format!(
                    "manifest files[{i}] is {:?}, not {want:?}",
                    f.name
                )));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::Invalid(format!(
                    "manifest files[{i}].sha256 is not a SHA-256 in hex"
                )));
            }
        }
        Ok(())
    }
}

/// One shard's file in a manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestFile {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// What a shard's file holds besides the chunks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardMeta {
    pub job: String,
    pub round: u64,
    pub skipped: u64,
    pub last: Option<Decision>,
    pub shard: usize,
    pub shards: usize,
    /// An elastic job's membership, in the coordinator's (shard 0's) file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<crate::coordinator::MembershipRecord>,
}

/// A shard's part of a checkpoint, read back.
#[derive(Debug)]
pub struct Loaded {
    pub meta: ShardMeta,
    pub spec: pb::JobSpec,
    pub layout: pb::LayoutResponse,
    /// Local chunks, in canonical order.
    pub chunks: Vec<ChunkState>,
}

/// The directory of `round` of `job`.
pub fn round_dir(root: &Path, job: &str, round: u64) -> PathBuf {
    root.join(job).join(format!("{round:020}"))
}

/// The name of shard `shard`'s file in a cluster of `shards`.
pub fn shard_file(shard: usize, shards: usize) -> String {
    format!("shard-{shard}-of-{shards}.safetensors")
}

/// What went wrong with a checkpoint. A restore acts on the kind
/// (`read::restorable`): a damaged checkpoint is set aside and the one
/// before it tried; one that cannot be read now, or that this node cannot
/// use, stops the restore and is kept. Every other caller sees it as the
/// node's [`Error`] (`From` below).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Creating, writing, renaming or syncing a file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file of the checkpoint is there but cannot be read now (a full
    /// file table, a disk error, a directory in its place): the checkpoint
    /// may be intact.
    #[error(
        "{}: cannot be read ({source}); the checkpoint is kept: fix the cause and start again",
        path.display()
    )]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the checkpoint needs is missing: it is incomplete.
    #[error("{}: {source}", path.display())]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint is damaged: a checksum that does not match, a
    /// manifest or shard file that does not parse or does not agree.
    #[error("{}: {reason}", dir.display())]
    Damaged { dir: PathBuf, reason: String },
    /// Not damage, but nothing this node can restore: a newer format, or a
    /// reshard that needs files this directory lacks.
    #[error("{0}")]
    Unusable(String),
    /// A checkpoint could not be encoded.
    #[error("checkpoint: {0}")]
    Encode(String),
}

impl From<CheckpointError> for Error {
    fn from(e: CheckpointError) -> Error {
        match e {
            CheckpointError::Unreadable { .. } => Error::Unavailable(e.to_string()),
            CheckpointError::Unusable(_) => Error::Invalid(e.to_string()),
            _ => Error::Internal(e.to_string()),
        }
    }
}

/// The result of a checkpoint's own steps.
pub type CheckpointResult<T> = std::result::Result<T, CheckpointError>;

/// Maps an I/O error of operation `op` on `path`, keeping it as the source.
fn io<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::retention::complete_rounds;
    use super::*;
    use crate::math::state::OptimState;
    use crate::optim::{AdamHyper, Hyper};

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&b)), Some(b.to_vec()));
        assert_eq!(unhex("zz"), None);
    }

    fn adam_state() -> OptimState {
        OptimState::Adam {
            exp_avg: vec![1.0; 5],
            exp_avg_sq: vec![2.0; 5],
            max_exp_avg_sq: None,
        }
    }

    fn hyper() -> Hyper {
        Hyper::Adam(AdamHyper {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            decoupled: true,
            maximize: false,
        })
    }

    fn spec() -> pb::JobSpec {
        pb::JobSpec {
            params: vec![pb::ParamSpec {
                name: "w".into(),
                shape: vec![5],
            }],
            optimizer: Some(pb::Optimizer {
                kind: pb::OptimizerKind::Adamw as i32,
                hyper: None,
            }),
            workers: 1,
            ..Default::default()
        }
    }

    /// Writes and commits checkpoint `round` of job "j" on one shard whose
    /// values are all `round`.
    fn take(root: &Path, round: u64, shards: usize) {
        let state = ChunkState {
            values: crate::chunk::Values::new(vec![round as f32; 5]),
            state: adam_state(),
            step: round,
        };
        let h = hyper();
        let meta = ShardMeta {
            job: "j".into(),
            round,
            skipped: 0,
            last: None,
            shard: 0,
            shards,
            membership: None,
        };
        let layout = pb::LayoutResponse {
            chunk_elems: 8,
            owners: vec![0],
            ..Default::default()
        };
        let chunks = [ChunkRef {
            key: "w@0".into(),
            hyper: &h,
            state: &state,
        }];
        let file = write_shard(root, &meta, &spec(), &layout, &chunks).expect("write");
        let manifest = Manifest {
            format: FORMAT.into(),
            job: "j".into(),
            round,
            shards,
            files: vec![file],
        };
        commit(root, &manifest, 10).expect("commit");
    }

    fn load(root: &Path) -> Result<Option<Loaded>> {
        load_latest(root, "j", 0, 1)
    }

    fn shard_path(root: &Path, round: u64) -> PathBuf {
        round_dir(root, "j", round).join(shard_file(0, 1))
    }

    #[test]
    fn a_failed_write_keeps_its_io_error_as_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The checkpoint root is a file: its job directory cannot be made.
        let root = dir.path().join("not-a-dir");
        fs::write(&root, b"x").expect("write");
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            job: "j".to_owned(),
            round: 1,
            shards: 1,
            files: Vec::new(),
        };
        let e = write::commit(&root, &manifest, 1).expect_err("refused");
        assert!(
            matches!(e, CheckpointError::Io { op: "create", .. }),
            "{e:?}"
        );
        let source = std::error::Error::source(&e).expect("a source");
        assert!(
            source.downcast_ref::<std::io::Error>().is_some(),
            "{source:?}"
        );
        assert!(matches!(Error::from(e), Error::Internal(_)));
    }

    #[test]
    fn the_newest_intact_checkpoint_is_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        take(dir.path(), 3, 1);
        take(dir.path(), 6, 1);
        let l = load(dir.path()).expect("load").expect("a checkpoint");
        assert_eq!(l.meta.round, 6);
        assert_eq!(*l.chunks[0].values, [6.0; 5]);
        assert_eq!(l.chunks[0].state, adam_state());
        assert_eq!(l.chunks[0].step, 6);
    }

    #[test]
    fn truncated_corrupt_or_unfinished_checkpoints_fall_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        take(root, 3, 1);
        take(root, 6, 1);
        take(root, 9, 1);
        // 9: the shard file truncated.
        let data = fs::read(shard_path(root, 9)).expect("read");
        fs::write(shard_path(root, 9), &data[..data.len() / 2]).expect("truncate");
        // 6: written but never committed (a crash before the manifest).
        fs::remove_file(round_dir(root, "j", 6).join(MANIFEST)).expect("unfinished");
        let l = load(root).expect("load").expect("a checkpoint");
        assert_eq!(l.meta.round, 3, "9 is truncated, 6 has no manifest");
        assert!(!round_dir(root, "j", 9).exists(), "9 set aside");
        let aside = fs::read_dir(root.join("j"))
            .expect("dir")
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("00000000000000000009.bad-")
            });
        assert!(aside, "renamed, not deleted");
    }

    #[test]
    fn a_checkpoint_that_cannot_be_read_is_kept_and_stops_the_restore() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        take(root, 3, 1);
        take(root, 6, 1);
        // Reading 6's shard file fails without it being missing: it is a
        // directory now (as a disk error would, whoever runs the test).
        let path = shard_path(root, 6);
        let data = fs::read(&path).expect("read");
        fs::remove_file(&path).expect("remove");
        fs::create_dir(&path).expect("a directory in its place");
        let e = load(root).expect_err("an unreadable checkpoint stops the restore");
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("the checkpoint is kept"), "{e}");
        assert!(round_dir(root, "j", 6).exists(), "6 is not set aside");
        // Once it reads again, it is the one restored, not 3.
        fs::remove_dir(&path).expect("rmdir");
        fs::write(&path, data).expect("restore the file");
        let l = load(root).expect("load").expect("a checkpoint");
        assert_eq!(l.meta.round, 6);
    }

    #[test]
    fn a_checkpoint_of_another_cluster_shape_is_not_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        take(dir.path(), 4, 3);
        assert!(load(dir.path()).expect("load").is_none());
    }

    #[test]
    fn a_newer_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        take(dir.path(), 2, 1);
        let path = round_dir(dir.path(), "j", 2).join(MANIFEST);
        let text = fs::read_to_string(&path)
            .expect("manifest")
            .replace(FORMAT, "paramd-checkpoint/2");
        fs::write(&path, text).expect("write");
        let err = load(dir.path()).expect_err("newer");
        assert!(err.to_string().contains("newer format"), "{err}");
    }

    #[test]
    fn only_the_newest_k_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        for r in 1..=5 {
            take(dir.path(), r, 1);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            job: "j".into(),
            round: 5,
            shards: 1,
            files: vec![],
        };
        commit(dir.path(), &manifest, 2).expect("commit");
        let mut left = complete_rounds(&dir.path().join("j"));
        left.sort_unstable();
        assert_eq!(left, vec![4, 5]);
    }

    #[test]
    fn set_aside_checkpoints_do_not_pile_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for (round, why) in [(1, "bad-7"), (2, "bad-7"), (3, "newer-8"), (4, "bad-9")] {
            let aside = round_dir(root, "run", round).with_extension(why);
            fs::create_dir_all(&aside).expect("mkdir");
        }
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            job: "run".to_owned(),
            round: 5,
            shards: 1,
            files: Vec::new(),
        };
        commit(root, &manifest, 2).expect("commit");
        let mut left: Vec<String> = fs::read_dir(root.join("run"))
            .expect("the job's folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let name = |r: u64, why: &str| format!("{r:020}.{why}");
        assert_eq!(
            left,
            [name(3, "newer-8"), name(4, "bad-9"), format!("{:020}", 5)]
        );
        for secs in [10, 20, 30] {
            fs::create_dir_all(root.join(format!("gone@deleted-{secs}-1"))).expect("mkdir");
        }
        fs::create_dir_all(root.join("gone")).expect("mkdir");
        set_aside_deleted(root, "gone", 2).expect("set aside");
        let deleted = fs::read_dir(root)
            .expect("root")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with("gone@deleted-")
            })
            .count();
        assert_eq!(deleted, 2);
    }
}
