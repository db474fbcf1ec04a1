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

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use paramd_proto::v1 as pb;
use prost::Message;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::coordinator::Decision;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::optim::Hyper;
use crate::spec::JobConfig;
use crate::store::ChunkState;

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

fn io<'a>(what: &str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    let what = what.to_owned();
    move |e| Error::Internal(format!("cannot {what} {}: {e}", path.display()))
}

/// The failpoint this process was started with: `PARAMD_FAILPOINT=<name>`
/// or `<name>@<round>`, read once. When the named point is reached (for
/// checkpoint `<round>` only, if given), the process aborts there, as a
/// `kill -9` at exactly that point would stop it. Crash tests use it; it
/// is unset in production. The points:
///
/// - `checkpoint.mid_write`: a shard has written half of its checkpoint
///   file (under its temporary name);
/// - `checkpoint.before_manifest`: the coordinator has every shard's file,
///   durable, and has written no manifest yet;
/// - `checkpoint.between_manifests`: the coordinator has written its own
///   manifest and not yet sent it to the other shards.
pub fn failpoint(name: &str, round: u64) {
    static ARMED: OnceLock<Option<(String, Option<u64>)>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("PARAMD_FAILPOINT").ok()?;
        Some(match v.split_once('@') {
            Some((n, r)) => (n.to_owned(), r.parse().ok()),
            None => (v, None),
        })
    });
    if let Some((n, r)) = armed
        && n == name
        && r.is_none_or(|r| r == round)
    {
        tracing::error!(
            failpoint = name,
            round,
            "PARAMD_FAILPOINT reached: aborting"
        );
        std::process::abort();
    }
}

/// Writes `data` to `path` atomically and durably. `round` names the
/// checkpoint for the `checkpoint.mid_write` failpoint.
fn write_durably(path: &Path, data: &[u8], round: Option<u64>) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no directory", path.display())))?;
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
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
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

/// The names of a chunk's state buffers, as torch names its state.
fn buffer_names(hyper: &Hyper) -> &'static [&'static str] {
    match hyper {
        Hyper::Sgd(_) => &["momentum_buffer"],
        Hyper::Adam(_) => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    }
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
) -> Result<ManifestFile> {
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for c in chunks {
        let n = c.state.values.len();
        blobs.push((
            format!("{}/param", c.key),
            Dtype::F32,
            vec![n],
            f32_bytes(&c.state.values),
        ));
        for (name, buf) in buffer_names(c.hyper).iter().zip(&c.state.buffers) {
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
        .map_err(|e| Error::Internal(format!("checkpoint tensor: {e}")))?;
    let info = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        (
            "meta".to_owned(),
            serde_json::to_string(meta).map_err(|e| Error::Internal(e.to_string()))?,
        ),
        ("spec".to_owned(), hex(&spec.encode_to_vec())),
        ("layout".to_owned(), hex(&layout.encode_to_vec())),
    ]);
    let data = safetensors::serialize(views, Some(info))
        .map_err(|e| Error::Internal(format!("checkpoint: {e}")))?;
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
pub fn commit(root: &Path, manifest: &Manifest, keep: usize) -> Result<()> {
    let dir = round_dir(root, &manifest.job, manifest.round);
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| Error::Internal(e.to_string()))?;
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
) -> Result<()> {
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
    let json = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    fs::write(dir.join(MANIFEST), json).map_err(io("write", dir))
}

/// The newest round of `job` that has a manifest.
pub fn newest_round(root: &Path, job: &str) -> Option<u64> {
    complete_rounds(&root.join(job)).into_iter().max()
}

/// The manifest in checkpoint directory `dir`, refused if unreadable or of
/// a format this build does not read.
fn manifest_in(dir: &Path) -> Result<Manifest> {
    let bad = |m: String| Error::Internal(format!("{}: {m}", dir.display()));
    let manifest: Manifest =
        serde_json::from_slice(&fs::read(dir.join(MANIFEST)).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(format!("manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(Error::Invalid(format!(
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
pub fn read_manifest(root: &Path, job: &str, round: u64) -> Result<Manifest> {
    manifest_in(&round_dir(root, job, round))
}

/// The shards (of the cluster that took it) whose files of checkpoint
/// `round` a restore onto `shards` shards needs and this directory lacks:
/// none when the shape is the same (a shard needs only its own file).
pub fn missing_files(root: &Path, job: &str, round: u64, shards: usize) -> Result<Vec<usize>> {
    let manifest = read_manifest(root, job, round)?;
    if manifest.shards == shards {
        return Ok(Vec::new());
    }
    let dir = round_dir(root, job, round);
    Ok((0..manifest.shards)
        .filter(|&i| !dir.join(shard_file(i, manifest.shards)).exists())
        .collect())
}

/// The path of file `name` of checkpoint `round` of `job`, if `name` is a
/// checkpoint file's name (the manifest or a shard's file) and nothing else.
pub fn file_path(root: &Path, job: &str, round: u64, name: &str) -> Result<PathBuf> {
    let shard_file = name.starts_with("shard-")
        && name.ends_with(".safetensors")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.contains("..");
    if name != MANIFEST && !shard_file {
        return Err(crate::invalid!(
            "name {name:?} is not a checkpoint file (MANIFEST.json or shard-<i>-of-<n>.safetensors)"
        ));
    }
    Ok(round_dir(root, job, round).join(name))
}

/// A checkpoint file arriving from another shard: written under a
/// temporary name and hashed as it comes, kept only if it is what the
/// manifest says.
pub struct Receiving {
    tmp: PathBuf,
    path: PathBuf,
    file: fs::File,
    hash: Sha256,
    bytes: u64,
}

impl Receiving {
    /// Starts receiving file `name` of checkpoint `round` of `job`.
    pub fn new(root: &Path, job: &str, round: u64, name: &str) -> Result<Receiving> {
        let path = file_path(root, job, round, name)?;
        let dir = round_dir(root, job, round);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let tmp = temp_path(&path);
        let file = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        Ok(Receiving {
            tmp,
            path,
            file,
            hash: Sha256::new(),
            bytes: 0,
        })
    }

    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hash.update(data);
        self.bytes += data.len() as u64;
        self.file.write_all(data).map_err(io("write", &self.tmp))
    }

    /// Checks the file against `expect` (its manifest entry; none for the
    /// manifest itself) and makes it durable under its name.
    pub fn finish(self, expect: Option<&ManifestFile>) -> Result<()> {
        let sum = hex(&self.hash.finalize());
        if let Some(e) = expect
            && (e.sha256 != sum || e.bytes != self.bytes)
        {
            let _ = fs::remove_file(&self.tmp);
            return Err(Error::Internal(format!(
                "{}: received {} bytes with checksum {sum}, the manifest says {} bytes with {}",
                self.path.display(),
                self.bytes,
                e.bytes,
                e.sha256
            )));
        }
        self.file.sync_all().map_err(io("fsync", &self.tmp))?;
        fs::rename(&self.tmp, &self.path).map_err(io("rename to", &self.path))?;
        let dir = self
            .path
            .parent()
            .ok_or_else(|| Error::Internal(format!("{} has no directory", self.path.display())))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", dir))
    }
}

/// Rounds of a job directory that have a manifest.
fn complete_rounds(job_dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(job_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(MANIFEST).is_file())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// The jobs with a directory under `root`: folders named as a job may be
/// (not those a deleted job was moved to).
pub fn jobs(root: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut jobs: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| crate::spec::validate_job_name(name).is_ok())
        .collect();
    jobs.sort();
    jobs
}

/// Moves the checkpoints of deleted job `job` aside, to
/// `<job>@deleted-<unix seconds>-<pid>` (`@` is never in a job name), so
/// that a restart does not bring the job back and a job re-created under
/// its name starts afresh; returns where they went, if there were any. The
/// newest `keep` such folders of the job are kept, older ones removed.
pub fn set_aside_deleted(root: &Path, job: &str, keep: usize) -> Result<Option<PathBuf>> {
    let dir = root.join(job);
    if !dir.is_dir() {
        return Ok(None);
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = root.join(format!("{job}@deleted-{secs}-{}", std::process::id()));
    fs::rename(&dir, &aside).map_err(io("rename", &dir))?;
    fs::File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", root))?;
    let prefix = format!("{job}@deleted-");
    prune_set_aside(root, keep, |name| {
        let rest = name.strip_prefix(&prefix)?;
        let (secs, _pid) = rest.split_once('-')?;
        secs.parse().ok()
    });
    Ok(Some(aside))
}

/// Deletes all but the newest `keep` of the folders in `dir` that `order`
/// recognizes as set aside (it gives their age order: a round, a time), so
/// that damaged, abandoned and deleted checkpoints do not pile up.
fn prune_set_aside(dir: &Path, keep: usize, order: impl Fn(&str) -> Option<u64>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut aside: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            Some((order(&name)?, e.path()))
        })
        .collect();
    aside.sort_unstable_by(|a, b| b.cmp(a));
    for (_, path) in aside.into_iter().skip(keep.max(1)) {
        match fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "old set-aside checkpoint removed"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a set-aside checkpoint")
            }
        }
    }
}

/// The round of a checkpoint folder set aside (`<round>.<why>-<pid>`).
fn set_aside_round(name: &str) -> Option<u64> {
    let (round, why) = name.split_once('.')?;
    if why.is_empty() || why.starts_with("tmp") {
        return None;
    }
    round.parse().ok()
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
/// (renamed `<round>.bad-<pid>`, not deleted).
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
            Err(e @ Error::Invalid(_)) if newest.is_none() => return Err(e),
            Err(Error::Invalid(_)) => {}
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
) -> Result<Loaded> {
    load_one(&round_dir(root, job, round), shard, shards)
}

/// Sets aside (renames `<round>.<why>-<pid>`) every checkpoint of `job`
/// newer than `round`: the cluster went back to `round`, and a later
/// checkpoint of the same round must not meet these files.
pub fn set_aside_newer(root: &Path, job: &str, round: u64) {
    for newer in complete_rounds(&root.join(job))
        .into_iter()
        .filter(|&r| r > round)
    {
        let dir = round_dir(root, job, newer);
        set_aside(&dir, "abandoned");
        tracing::warn!(
            job,
            round = newer,
            agreed = round,
            "checkpoint newer than the round the shards agree on set aside"
        );
    }
}

fn set_aside(dir: &Path, why: &str) {
    let aside = dir.with_extension(format!("{why}-{}", std::process::id()));
    match fs::rename(dir, &aside) {
        Ok(()) => tracing::warn!(set_aside = %aside.display(), "checkpoint set aside"),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot set the checkpoint aside")
        }
    }
}

/// One shard's file of a checkpoint, checked against its manifest entry.
struct ShardFile {
    meta: ShardMeta,
    spec: pb::JobSpec,
    layout: pb::LayoutResponse,
    /// Its chunks by key (`param@offset`).
    chunks: HashMap<String, ChunkState>,
}

fn read_shard_file(dir: &Path, entry: &ManifestFile, index: usize) -> Result<ShardFile> {
    let bad = |m: String| Error::Internal(format!("{}: {m}", dir.display()));
    let name = &entry.name;
    let data = fs::read(dir.join(name)).map_err(|e| bad(format!("{name}: {e}")))?;
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
    let f32s = |key: &str| -> Result<Vec<f32>> {
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
                let buffers = buffer_names(hyper)
                    .iter()
                    .take(hyper.state_buffers())
                    .map(|n| f32s(&format!("{key}/{n}")))
                    .collect::<Result<Vec<_>>>()?;
                if buffers.iter().any(|b| b.len() != values.len())
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
                        values: crate::store::Values::new(values),
                        buffers,
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
fn load_one(dir: &Path, shard: usize, shards: usize) -> Result<Loaded> {
    let bad = |m: String| Error::Internal(format!("{}: {m}", dir.display()));
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
            return Err(Error::Invalid(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamHyper;

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&b)), Some(b.to_vec()));
        assert_eq!(unhex("zz"), None);
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
            values: crate::store::Values::new(vec![round as f32; 5]),
            buffers: vec![vec![1.0; 5], vec![2.0; 5]],
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
    fn the_newest_intact_checkpoint_is_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        take(dir.path(), 3, 1);
        take(dir.path(), 6, 1);
        let l = load(dir.path()).expect("load").expect("a checkpoint");
        assert_eq!(l.meta.round, 6);
        assert_eq!(*l.chunks[0].values, [6.0; 5]);
        assert_eq!(l.chunks[0].buffers, vec![vec![1.0; 5], vec![2.0; 5]]);
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
