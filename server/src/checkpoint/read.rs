//! Reading checkpoints back: manifests, shard files checked against
//! them, the newest intact round, and resharding onto another shape.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use paramd_proto::v1 as pb;
use prost::Message;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use super::retention::{complete_rounds, set_aside};
use super::{
    CheckpointError, CheckpointResult, FORMAT, Loaded, MANIFEST, Manifest, ManifestFile, ShardMeta,
    hex, round_dir, shard_file, unhex,
};
use crate::chunk::ChunkState;
use crate::error::Result;
use crate::layout::Layout;
use crate::math::state::OptimState;
use crate::spec::JobConfig;

/// The newest round of `job` that has a manifest.
pub fn newest_round(root: &Path, job: &str) -> Option<u64> {
    complete_rounds(&root.join(job)).into_iter().max()
}

/// Reads `path`, a file of a checkpoint. A missing file is damage (the
/// checkpoint is incomplete, and is set aside); any other failure to read
/// may pass (a full file table, a disk error, a file replaced by a
/// directory): `Unreadable`, and the checkpoint is kept, neither set aside
/// nor skipped for an older one.
fn read_file(path: &Path) -> CheckpointResult<Vec<u8>> {
    fs::read(path).map_err(|source| {
        let path = path.to_owned();
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::Missing { path, source }
        } else {
            CheckpointError::Unreadable { path, source }
        }
    })
}

/// Damage found in checkpoint directory `dir`, said by `reason`.
fn damaged(dir: &Path) -> impl Fn(String) -> CheckpointError + '_ {
    move |reason| CheckpointError::Damaged {
        dir: dir.to_owned(),
        reason,
    }
}

/// The manifest in checkpoint directory `dir`, refused if unreadable or of
/// a format this build does not read.
fn manifest_in(dir: &Path) -> CheckpointResult<Manifest> {
    let bad = damaged(dir);
    let manifest: Manifest = serde_json::from_slice(&read_file(&dir.join(MANIFEST))?)
        .map_err(|e| bad(format!("manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(CheckpointError::Unusable(format!(
            "{}: format {:?} is a newer format than this build reads ({FORMAT})",
            dir.display(),
            manifest.format
        )));
    }
    manifest.check().map_err(|e| bad(e.to_string()))?;
    Ok(manifest)
}

/// Reads the manifest of checkpoint `round` of `job`, refusing a format
/// this build does not read.
pub fn read_manifest(root: &Path, job: &str, round: u64) -> CheckpointResult<Manifest> {
    manifest_in(&round_dir(root, job, round))
}

/// The shards (of the cluster that took it) whose files of checkpoint
/// `round` a restore onto `shards` shards needs and this directory lacks:
/// none when the shape is the same (a shard needs only its own file).
pub fn missing_files(
    root: &Path,
    job: &str,
    round: u64,
    shards: usize,
) -> CheckpointResult<Vec<usize>> {
    let manifest = read_manifest(root, job, round)?;
    if manifest.shards == shards {
        return Ok(Vec::new());
    }
    let dir = round_dir(root, job, round);
    Ok((0..manifest.shards)
        .filter(|&i| !dir.join(shard_file(i, manifest.shards)).exists())
        .collect())
}

/// Loads the newest checkpoint of `job` that is complete and intact for
/// shard `shard` of `shards`. A bad one is reported and set aside (renamed
/// `<round>.bad-<pid>`), and the one before it is tried.
pub fn load_latest(root: &Path, job: &str, shard: usize, shards: usize) -> Result<Option<Loaded>> {
    restorable(root, job, shard, shards).map(|(loaded, _)| loaded)
}

/// Loads the newest checkpoint of `job` that is complete and intact for
/// shard `shard` of `shards`, and lists the rounds of every intact one,
/// newest first, so that the shards of a cluster can agree on a round all
/// of them can restore. A bad checkpoint is reported and set aside
/// (renamed `<round>.bad-<pid>`, not deleted); one that cannot be read
/// (an I/O error other than a missing file) stops the restore with
/// `Unavailable` and is kept.
pub fn restorable(
    root: &Path,
    job: &str,
    shard: usize,
    shards: usize,
) -> Result<(Option<Loaded>, Vec<u64>)> {
    let mut rounds = complete_rounds(&root.join(job));
    rounds.sort_unstable_by(|a, b| b.cmp(a));
    let mut newest = None;
    let mut intact = Vec::new();
    for round in rounds {
        let dir = round_dir(root, job, round);
        match load_one(&dir, shard, shards) {
            Ok(l) => {
                intact.push(round);
                // Older ones are only checked, so that they can be agreed on.
                newest.get_or_insert(l);
            }
            // A newer format, or a reshard this directory cannot serve: not
            // damage; stop with the reason rather than set it aside.
            Err(e @ CheckpointError::Unusable(_)) if newest.is_none() => return Err(e.into()),
            Err(CheckpointError::Unusable(_)) => {}
            // It may be intact: restoring an older one would lose
            // acknowledged rounds, setting it aside would lose it.
            Err(e @ CheckpointError::Unreadable { .. }) => return Err(e.into()),
            Err(e) => {
                set_aside(&dir, "bad");
                tracing::error!(job, round, error = %e, "checkpoint unusable; trying the one before");
            }
        }
    }
    Ok((newest, intact))
}

/// Loads checkpoint `round` of `job` for shard `shard` of `shards`.
pub fn load_round(
    root: &Path,
    job: &str,
    round: u64,
    shard: usize,
    shards: usize,
) -> CheckpointResult<Loaded> {
    load_one(&round_dir(root, job, round), shard, shards)
}

/// One shard's file of a checkpoint, checked against its manifest entry.
struct ShardFile {
    meta: ShardMeta,
    spec: pb::JobSpec,
    layout: pb::LayoutResponse,
    /// Its chunks by key (`param@offset`).
    chunks: HashMap<String, ChunkState>,
}

fn read_shard_file(dir: &Path, entry: &ManifestFile, index: usize) -> CheckpointResult<ShardFile> {
    let bad = damaged(dir);
    let name = &entry.name;
    let data = read_file(&dir.join(name))?;
    let sum = hex(&Sha256::digest(&data));
    if sum != entry.sha256 || data.len() as u64 != entry.bytes {
        return Err(bad(format!(
            "{name}: checksum {sum} ({} bytes), the manifest says {} ({} bytes)",
            data.len(),
            entry.sha256,
            entry.bytes
        )));
    }
    let (_, header) = SafeTensors::read_metadata(&data).map_err(|e| bad(format!("{name}: {e}")))?;
    let info = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        info.get(k)
            .ok_or_else(|| bad(format!("{name}: no {k} in the metadata")))
    };
    let meta: ShardMeta =
        serde_json::from_str(get("meta")?).map_err(|e| bad(format!("meta: {e}")))?;
    let spec =
        pb::JobSpec::decode(&unhex(get("spec")?).ok_or_else(|| bad("spec is not hex".into()))?[..])
            .map_err(|e| bad(format!("spec: {e}")))?;
    let layout = pb::LayoutResponse::decode(
        &unhex(get("layout")?).ok_or_else(|| bad("layout is not hex".into()))?[..],
    )
    .map_err(|e| bad(format!("layout: {e}")))?;
    if meta.shard != index {
        return Err(bad(format!("{name} says it is shard {}", meta.shard)));
    }
    let config = JobConfig::try_from(&spec).map_err(|e| bad(format!("spec: {e}")))?;
    let st = SafeTensors::deserialize(&data).map_err(|e| bad(format!("{name}: {e}")))?;
    let f32s = |key: &str| -> CheckpointResult<Vec<f32>> {
        let t = st.tensor(key).map_err(|e| bad(format!("{key}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("{key} is {:?}, not F32", t.dtype())));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let elems = usize::try_from(layout.chunk_elems)
        .map_err(|_| bad("chunk_elems".into()))?
        .max(1);
    let mut chunks = HashMap::new();
    let mut id = 0;
    for param in &config.params {
        let hyper = &config.groups[param.group];
        let mut offset = 0;
        while offset < param.numel {
            let owner = *layout
                .owners
                .get(id)
                .ok_or_else(|| bad("layout has too few owners".into()))?
                as usize;
            if owner == index {
                let key = format!("{}@{offset}", param.name);
                let values = f32s(&format!("{key}/param"))?;
                let state = OptimState::from_named(hyper, |n| f32s(&format!("{key}/{n}")))?;
                if state.named().iter().any(|(_, b)| b.len() != values.len())
                    || values.len() != elems.min(param.numel - offset)
                {
                    return Err(bad(format!("{key}: sizes do not match the layout")));
                }
                let step = st
                    .tensor(&format!("{key}/step"))
                    .ok()
                    .and_then(|t| {
                        t.data().get(..8).map(|b| {
                            i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                        })
                    })
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or_else(|| bad(format!("{key}/step is not a step count")))?;
                chunks.insert(
                    key,
                    ChunkState {
                        values: crate::chunk::Values::new(values),
                        state,
                        step,
                    },
                );
            }
            offset += elems;
            id += 1;
        }
    }
    Ok(ShardFile {
        meta,
        spec,
        layout,
        chunks,
    })
}

/// Loads shard `shard` of `shards` from the checkpoint in `dir`. A
/// checkpoint of the same cluster shape needs only this shard's file; one
/// of another shape is resharded (same chunks, placed anew) and needs every
/// file of it in `dir` (a shared checkpoint directory).
fn load_one(dir: &Path, shard: usize, shards: usize) -> CheckpointResult<Loaded> {
    let bad = damaged(dir);
    let manifest = manifest_in(dir)?;
    let indices: Vec<usize> = if manifest.shards == shards {
        vec![shard]
    } else {
        (0..manifest.shards).collect()
    };
    let mut files = Vec::with_capacity(indices.len());
    for i in indices {
        let name = shard_file(i, manifest.shards);
        let entry = manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| bad(format!("the manifest lists no {name}")))?;
        if !dir.join(&name).exists() && manifest.shards != shards {
            // Not damage: this directory holds only some shards' files.
            return Err(CheckpointError::Unusable(format!(
                "{}: taken on {} shards, this cluster has {shards}; restoring onto another number of shards needs every shard's file, and {name} is neither here nor on a shard of this cluster (copy it here)",
                dir.display(),
                manifest.shards
            )));
        }
        files.push(read_shard_file(dir, entry, i)?);
    }
    let first = files.first().ok_or_else(|| bad("no shard files".into()))?;
    if files
        .iter()
        .any(|f| f.meta.round != manifest.round || f.spec != first.spec)
    {
        return Err(bad("the shard files are of different rounds or jobs".into()));
    }
    let config = JobConfig::try_from(&first.spec).map_err(|e| bad(format!("spec: {e}")))?;
    let elems = usize::try_from(first.layout.chunk_elems).map_err(|_| bad("chunk_elems".into()))?;
    let chunking = Layout::with_chunk_elems(&config.params, elems);
    let owners = if manifest.shards == shards {
        first.layout.owners.clone()
    } else {
        chunking.place(shards)
    };
    let mut all: HashMap<String, ChunkState> = HashMap::new();
    for f in &mut files {
        all.extend(f.chunks.drain());
    }
    let mut chunks = Vec::new();
    for (id, c) in chunking.chunks.iter().enumerate() {
        if owners.get(id).is_some_and(|&o| o as usize == shard) {
            let key = format!("{}@{}", config.params[c.param].name, c.offset);
            chunks.push(
                all.remove(&key)
                    .ok_or_else(|| bad(format!("no chunk {key} in any shard file")))?,
            );
        }
    }
    let f = files.swap_remove(0);
    let layout = pb::LayoutResponse { owners, ..f.layout };
    let meta = ShardMeta {
        shard,
        shards,
        ..f.meta
    };
    Ok(Loaded {
        meta,
        spec: f.spec,
        layout,
        chunks,
    })
}
