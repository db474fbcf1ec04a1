//! Admission limits: what one job, and all jobs together, may declare.
//! Checked from a job's spec alone, before anything of its size is
//! allocated (a 40-byte Init can declare terabytes), and reserved while the
//! job is being created so that concurrent Inits cannot pass together.

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::invalid;
use crate::spec::JobConfig;

/// The limits of one daemon. The defaults keep a default daemon alive on a
/// 24 GiB machine whatever its clients declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Jobs held at once.
    pub max_jobs: usize,
    /// Memory one job may need, in bytes: its parameters, one gradient
    /// accumulator and its optimizer state (see [`job_bytes`]).
    pub max_job_bytes: u64,
    /// Memory all jobs together may need, in bytes.
    pub max_total_bytes: u64,
    /// Workers of one job.
    pub max_workers: u32,
    /// Parameter tensors of one job.
    pub max_params: usize,
    /// Length of a parameter's name, in bytes.
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_jobs: 1024,
            max_job_bytes: 16 << 30,
            max_total_bytes: 16 << 30,
            max_workers: 4096,
            max_params: 100_000,
            max_name_bytes: 1024,
        }
    }
}

/// The memory `config` needs on the daemons holding it, in bytes: per
/// element, the parameter, one accumulator and the optimizer's state
/// buffers (the most any of its groups keeps). None when it overflows.
pub fn job_bytes(config: &JobConfig) -> Option<u64> {
    let state = config
        .groups
        .iter()
        .map(|g| g.state_buffers())
        .max()
        .unwrap_or(0);
    let numel = config
        .params
        .iter()
        .try_fold(0u64, |n, p| n.checked_add(u64::try_from(p.numel).ok()?))?;
    numel.checked_mul(4)?.checked_mul(2 + state as u64)
}

/// Jobs being created, not yet in the node's map, with their bytes.
#[derive(Debug, Default)]
pub struct Pending {
    inner: Mutex<(usize, u64)>,
}

/// A job's admission, held while it is created: released when dropped (the
/// job is then in the node's map, or it was not created).
#[derive(Debug)]
pub struct Admitted<'a> {
    pending: &'a Pending,
    bytes: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut p = self.pending.inner.lock();
        p.0 -= 1;
        p.1 -= self.bytes;
    }
}

impl Limits {
    /// Checks what `config` declares against the per-job limits; returns
    /// the bytes it needs.
    pub fn check_job(&self, config: &JobConfig) -> Result<u64> {
        if config.workers > self.max_workers {
            return Err(Error::TooLarge(format!(
                "workers = {} is over this server's max_workers ({})",
                config.workers, self.max_workers
            )));
        }
        if config.params.len() > self.max_params {
            return Err(Error::TooLarge(format!(
                "the job declares {} parameters, over this server's max_params ({})",
                config.params.len(),
                self.max_params
            )));
        }
        if let Some(p) = config
            .params
            .iter()
            .find(|p| p.name.len() > self.max_name_bytes)
        {
            return Err(invalid!(
                "parameter name {}... is {} bytes, over this server's max_name_bytes ({})",
                shown(&p.name),
                p.name.len(),
                self.max_name_bytes
            ));
        }
        let bytes = job_bytes(config).filter(|&b| b <= self.max_job_bytes);
        bytes.ok_or_else(|| {
            Error::TooLarge(format!(
                "the job needs {} bytes (parameters, gradient and optimizer state of {} elements), over this server's max_job_bytes ({})",
                job_bytes(config).map_or_else(|| "more than 2^64".to_owned(), |b| b.to_string()),
                config
                    .params
                    .iter()
                    .fold(0u128, |n, p| n + p.numel as u128),
                self.max_job_bytes
            ))
        })
    }

    /// Checks `config` and reserves its place beside the `jobs` held now,
    /// which need `held_bytes`, and the jobs being created.
    pub fn admit<'a>(
        &self,
        pending: &'a Pending,
        config: &JobConfig,
        jobs: usize,
        held_bytes: u64,
    ) -> Result<Admitted<'a>> {
        let bytes = self.check_job(config)?;
        let mut p = pending.inner.lock();
        if jobs + p.0 >= self.max_jobs {
            return Err(Error::TooLarge(format!(
                "this server holds {} jobs already, its max_jobs",
                self.max_jobs
            )));
        }
        let total = held_bytes.saturating_add(p.1);
        if total.saturating_add(bytes) > self.max_total_bytes {
            return Err(Error::TooLarge(format!(
                "the job needs {bytes} bytes and the jobs held need {total}: over this server's max_total_bytes ({})",
                self.max_total_bytes
            )));
        }
        p.0 += 1;
        p.1 += bytes;
        Ok(Admitted { pending, bytes })
    }
}

/// The first characters of a client's string, for an error message.
pub fn shown(s: &str) -> String {
    s.chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use paramd_proto::v1 as pb;

    fn config(shape: Vec<u64>, workers: u32, kind: pb::OptimizerKind) -> JobConfig {
        let spec = pb::JobSpec {
            params: vec![pb::ParamSpec {
                name: "w".into(),
                shape,
            }],
            optimizer: Some(pb::Optimizer {
                kind: kind as i32,
                hyper: None,
            }),
            workers,
            ..Default::default()
        };
        JobConfig::try_from(&spec).expect("valid spec")
    }

    #[test]
    fn a_job_is_counted_with_its_gradient_and_state() {
        let adamw = config(vec![10, 10], 1, pb::OptimizerKind::Adamw);
        assert_eq!(job_bytes(&adamw), Some(100 * 4 * 4));
        let sgd = config(vec![10, 10], 1, pb::OptimizerKind::Sgd);
        assert_eq!(job_bytes(&sgd), Some(100 * 4 * 2));
    }

    #[test]
    fn declared_sizes_are_refused_before_anything_is_allocated() {
        let limits = Limits::default();
        let huge = config(vec![1 << 22, 1 << 22], 1, pb::OptimizerKind::Adamw);
        let e = limits.check_job(&huge).expect_err("2^44 elements");
        assert!(e.to_string().contains("max_job_bytes"), "{e}");
        let many = config(vec![4], 5000, pb::OptimizerKind::Sgd);
        let e = limits.check_job(&many).expect_err("workers");
        assert!(e.to_string().contains("max_workers (4096)"), "{e}");
    }

    #[test]
    fn admissions_are_reserved_until_dropped() {
        let limits = Limits {
            max_jobs: 2,
            max_total_bytes: 1000,
            ..Limits::default()
        };
        let pending = Pending::default();
        let small = config(vec![50], 1, pb::OptimizerKind::Sgd); // 400 bytes
        let a = limits.admit(&pending, &small, 0, 0).expect("first");
        let e = limits.admit(&pending, &small, 0, 400).expect_err("bytes");
        assert!(e.to_string().contains("max_total_bytes"), "{e}");
        let e = limits.admit(&pending, &small, 1, 0).expect_err("jobs");
        assert!(e.to_string().contains("max_jobs"), "{e}");
        drop(a);
        limits.admit(&pending, &small, 1, 400).expect("room again");
    }
}
