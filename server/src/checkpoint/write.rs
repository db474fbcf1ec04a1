//! Writing checkpoints: durable files, a shard's file, the manifest.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use paramd_proto::v1 as pb;
use prost::Message;
use safetensors::{Dtype, tensor::TensorView};
use sha2::{Digest, Sha256};

use super::failpoint::failpoint;
use super::retention::{complete_rounds, prune_set_aside, set_aside_round};
use super::{
    CheckpointError, CheckpointResult, FORMAT, MANIFEST, Manifest, ManifestFile, ShardMeta, hex,
    io, round_dir, shard_file,
};
use crate::chunk::ChunkState;
use crate::optim::Hyper;

/// Writes `data` to `path` atomically and durably. `round` names the
/// checkpoint for the `checkpoint.mid_write` failpoint.
fn write_durably(path: &Path, data: &[u8], round: Option<u64>) -> CheckpointResult<()> {
    let dir = path.parent().ok_or_else(|| {
        io("find the directory of", path)(std::io::ErrorKind::InvalidInput.into())
    })?;
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        let (head, tail) = data.split_at(data.len() / 2);
        f.write_all(head).map_err(io("write", &tmp))?;
        if let Some(round) = round {
            failpoint("checkpoint.mid_write", round);
        }
        f.write_all(tail).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename to", path))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// A temporary name next to `path`, unique to this write: concurrent
/// writers of the same file (in this process or another) never share one.
pub(super) fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// A chunk to write: its key (`param@offset`), optimizer and state.
pub struct ChunkRef<'a> {
    pub key: String,
    pub hyper: &'a Hyper,
    pub state: &'a ChunkState,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes shard `meta.shard`'s file for `meta.round`; returns its manifest
/// entry.
pub fn write_shard(
    root: &Path,
    meta: &ShardMeta,
    spec: &pb::JobSpec,
    layout: &pb::LayoutResponse,
    chunks: &[ChunkRef<'_>],
) -> CheckpointResult<ManifestFile> {
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for c in chunks {
        let n = c.state.values.len();
        blobs.push((
            format!("{}/param", c.key),
            Dtype::F32,
            vec![n],
            f32_bytes(&c.state.values),
        ));
        for (name, buf) in c.state.state.named() {
            blobs.push((
                format!("{}/{name}", c.key),
                Dtype::F32,
                vec![n],
                f32_bytes(buf),
            ));
        }
        blobs.push((
            format!("{}/step", c.key),
            Dtype::I64,
            vec![],
            (c.state.step as i64).to_le_bytes().to_vec(),
        ));
    }
    let views = blobs
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CheckpointError::Encode(format!("tensor: {e}")))?;
    let info = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        (
            "meta".to_owned(),
            serde_json::to_string(meta).map_err(|e| CheckpointError::Encode(e.to_string()))?,
        ),
        ("spec".to_owned(), hex(&spec.encode_to_vec())),
        ("layout".to_owned(), hex(&layout.encode_to_vec())),
    ]);
    let data = safetensors::serialize(views, Some(info))
        .map_err(|e| CheckpointError::Encode(e.to_string()))?;
    let name = shard_file(meta.shard, meta.shards);
    let path = round_dir(root, &meta.job, meta.round).join(&name);
    write_durably(&path, &data, Some(meta.round))?;
    Ok(ManifestFile {
        name,
        sha256: hex(&Sha256::digest(&data)),
        bytes: data.len() as u64,
    })
}

/// Writes the manifest that makes the checkpoint exist on this shard, and
/// removes all but the newest `keep` checkpoints of the job, and all but
/// the newest `keep` of its set-aside ones.
pub fn commit(root: &Path, manifest: &Manifest, keep: usize) -> CheckpointResult<()> {
    let dir = round_dir(root, &manifest.job, manifest.round);
    let json =
        serde_json::to_vec_pretty(manifest).map_err(|e| CheckpointError::Encode(e.to_string()))?;
    write_durably(&dir.join(MANIFEST), &json, None)?;
    let mut rounds = complete_rounds(&root.join(&manifest.job));
    rounds.sort_unstable_by(|a, b| b.cmp(a));
    for old in rounds.into_iter().skip(keep.max(1)) {
        let path = round_dir(root, &manifest.job, old);
        if let Err(e) = fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an old checkpoint");
        }
    }
    prune_set_aside(&root.join(&manifest.job), keep, set_aside_round);
    Ok(())
}

/// Writes a manifest vouching for `data` as the only file of a one-shard
/// checkpoint (for fuzzing the loader).
pub fn write_test_manifest(
    dir: &Path,
    job: &str,
    round: u64,
    name: &str,
    data: &[u8],
) -> CheckpointResult<()> {
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        job: job.to_owned(),
        round,
        shards: 1,
        files: vec![ManifestFile {
            name: name.to_owned(),
            sha256: hex(&Sha256::digest(data)),
            bytes: data.len() as u64,
        }],
    };
    let json = serde_json::to_vec(&manifest).map_err(|e| CheckpointError::Encode(e.to_string()))?;
    fs::write(dir.join(MANIFEST), json).map_err(io("write", dir))
}
