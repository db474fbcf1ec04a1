//! Checkpoint files arriving from another shard.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::write::temp_path;
use super::{MANIFEST, ManifestFile, hex, io, round_dir};
use crate::error::{Error, Result};

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
        Ok(self.file.write_all(data).map_err(io("write", &self.tmp))?)
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
            .map_err(io("fsync", dir))?;
        Ok(())
    }
}
