//! Which checkpoint folders exist, and which are set aside or removed.

use std::fs;
use std::path::{Path, PathBuf};

use super::{MANIFEST, io, round_dir};
use crate::error::Result;

/// Rounds of a job directory that have a manifest.
pub(super) fn complete_rounds(job_dir: &Path) -> Vec<u64> {
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
pub(super) fn prune_set_aside(dir: &Path, keep: usize, order: impl Fn(&str) -> Option<u64>) {
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
pub(super) fn set_aside_round(name: &str) -> Option<u64> {
    let (round, why) = name.split_once('.')?;
    if why.is_empty() || why.starts_with("tmp") {
        return None;
    }
    round.parse().ok()
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

pub(super) fn set_aside(dir: &Path, why: &str) {
    let aside = dir.with_extension(format!("{why}-{}", std::process::id()));
    match fs::rename(dir, &aside) {
        Ok(()) => tracing::warn!(set_aside = %aside.display(), "checkpoint set aside"),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot set the checkpoint aside")
        }
    }
}
