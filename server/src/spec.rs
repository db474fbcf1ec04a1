//! A job's configuration: validated from the wire `JobSpec` the way torch
//! validates its optimizers and schedulers, with torch's defaults filled in.

use std::collections::HashMap;
use std::time::Duration;

use paramd_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::invalid;
use crate::optim::{AdamHyper, Hyper, SgdHyper};
use crate::schedule::Schedule;

/// Upper bound on workers per job: rounds keep one slot per worker.
pub const MAX_WORKERS: u32 = 1 << 16;

/// One parameter of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<u64>,
    /// Number of elements (1 for a scalar).
    pub numel: usize,
    /// Index of the param group holding it.
    pub group: usize,
}

/// What to do with a round whose gradients are not finite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonFinite {
    /// Skip the round everywhere; nothing changes but the round counter.
    Skip,
    /// Refuse any push that holds a non-finite value.
    Error,
}

/// A validated job configuration. Two Init calls describe the same job when
/// their configurations are equal.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    pub params: Vec<ParamInfo>,
    /// The optimizer of each param group, overrides applied.
    pub groups: Vec<Hyper>,
    pub schedule: Schedule,
    /// `max_norm` of global-norm clipping.
    pub clip: Option<f64>,
    pub workers: u32,
    pub non_finite: NonFinite,
    /// How long a round waits for missing workers once one has pushed.
    pub worker_timeout: Duration,
    /// Workers a round does not wait for.
    pub backup_workers: u32,
    /// How a round combines its pushes.
    pub merge: Merge,
    /// Elastic membership: workers join and leave (`None`: workers
    /// `0..workers`, every one expected).
    pub elastic: Option<Elastic>,
}

/// The rules of a job whose workers join and leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elastic {
    /// The participants a round needs.
    pub min_workers: u32,
    /// How long a membership lasts without a heartbeat.
    pub lease: Duration,
}

/// How long an elastic member's lease lasts by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How a round combines its participants' pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Their mean.
    Mean,
    /// Their mean weighted by each push's `weight`.
    Weighted,
}

/// How long a round waits for a missing worker by default.
pub const DEFAULT_WORKER_TIMEOUT: Duration = Duration::from_secs(60);

impl JobConfig {
    /// The index of every parameter, by name.
    pub fn index(&self) -> HashMap<String, usize> {
        self.params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect()
    }

    /// Total number of elements over every parameter.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.numel).sum()
    }

    /// A short name of the optimizer, for status output.
    pub fn optimizer_name(&self) -> &'static str {
        match self.groups.first() {
            Some(Hyper::Sgd(_)) => "sgd",
            Some(Hyper::Adam(h)) if h.decoupled => "adamw",
            Some(Hyper::Adam(_)) => "adam",
            None => "none",
        }
    }

    /// The first field in which two configurations differ, for the message
    /// refusing an Init that does not match the existing job.
    pub fn first_difference(&self, other: &JobConfig) -> String {
        if self.params != other.params {
            let n = self.params.len().min(other.params.len());
            return match (0..n).find(|&i| self.params[i] != other.params[i]) {
                Some(i) => format!(
                    "params[{i}] is '{}' {:?} here, '{}' {:?} in the request",
                    self.params[i].name,
                    self.params[i].shape,
                    other.params[i].name,
                    other.params[i].shape
                ),
                None => format!(
                    "{} params here, {} in the request",
                    self.params.len(),
                    other.params.len()
                ),
            };
        }
        let differ = |field: &str, here: &dyn std::fmt::Debug, there: &dyn std::fmt::Debug| {
            format!("{field} is {here:?} here, {there:?} in the request")
        };
        if self.workers != other.workers {
            return differ("workers", &self.workers, &other.workers);
        }
        if let Some(g) = (0..self.groups.len().max(other.groups.len()))
            .find(|&g| self.groups.get(g) != other.groups.get(g))
        {
            return differ(
                &format!("param group {g}"),
                &self.groups.get(g),
                &other.groups.get(g),
            );
        }
        if let Some(p) =
            (0..self.params.len()).find(|&p| self.params[p].group != other.params[p].group)
        {
            return format!(
                "parameter '{}' is in group {} here, {} in the request",
                self.params[p].name, self.params[p].group, other.params[p].group
            );
        }
        if self.schedule != other.schedule {
            return differ("schedule", &self.schedule, &other.schedule);
        }
        if self.clip != other.clip {
            return differ("clip max_norm", &self.clip, &other.clip);
        }
        if self.non_finite != other.non_finite {
            return differ("non_finite", &self.non_finite, &other.non_finite);
        }
        if self.worker_timeout != other.worker_timeout {
            return differ(
                "worker_timeout",
                &self.worker_timeout,
                &other.worker_timeout,
            );
        }
        if self.merge != other.merge {
            return differ("merge", &self.merge, &other.merge);
        }
        if self.elastic != other.elastic {
            return differ("membership", &self.elastic, &other.elastic);
        }
        differ(
            "backup_workers",
            &self.backup_workers,
            &other.backup_workers,
        )
    }
}

/// Checks a job name: it becomes a metric label and a file name later.
pub fn validate_job_name(job: &str) -> Result<()> {
    // It names the job's checkpoint folder: never `.`, `..` or hidden.
    let ok = !job.is_empty()
        && job.len() <= 128
        && !job.starts_with('.')
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid!(
            "job name \"{}\" is invalid: use 1 to 128 characters from [A-Za-z0-9._-], not starting with a dot",
            crate::limits::shown(job)
        ))
    }
}

impl TryFrom<&pb::JobSpec> for JobConfig {
    type Error = Error;

    fn try_from(spec: &pb::JobSpec) -> Result<Self> {
        let mut params = validate_params(&spec.params)?;
        let opt = spec
            .optimizer
            .as_ref()
            .ok_or_else(|| invalid!("optimizer is required"))?;
        let kind = pb::OptimizerKind::try_from(opt.kind)
            .map_err(|_| invalid!("optimizer.kind {} is not a known optimizer", opt.kind))?;
        let default = defaults(kind)?;
        let base = apply_overrides(default, opt.hyper.as_ref(), "optimizer")?;

        let mut groups = Vec::new();
        if spec.param_groups.is_empty() {
            groups.push(base);
        } else {
            let index: HashMap<&str, usize> = params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.name.as_str(), i))
                .collect();
            let mut owner: Vec<Option<usize>> = vec![None; params.len()];
            for (g, group) in spec.param_groups.iter().enumerate() {
                if group.params.is_empty() {
                    return Err(invalid!("param_groups[{g}].params is empty"));
                }
                for name in &group.params {
                    let &i = index.get(name.as_str()).ok_or_else(|| {
                        invalid!("param_groups[{g}] names unknown parameter '{name}'")
                    })?;
                    if let Some(first) = owner[i] {
                        return Err(invalid!(
                            "parameter '{name}' is in two param groups: {first} and {g}"
                        ));
                    }
                    owner[i] = Some(g);
                }
                let field = format!("param_groups[{g}]");
                groups.push(apply_overrides(base.clone(), group.hyper.as_ref(), &field)?);
            }
            for (p, o) in params.iter_mut().zip(&owner) {
                p.group =
                    o.ok_or_else(|| invalid!("parameter '{}' is in no param group", p.name))?;
            }
        }

        let schedule = validate_schedule(spec.schedule.as_ref())?;
        let clip = match &spec.clip {
            None => None,
            Some(c) if c.max_norm > 0.0 && c.max_norm.is_finite() => Some(c.max_norm),
            Some(c) => return Err(invalid!("clip.max_norm must be > 0, got {}", c.max_norm)),
        };
        if spec.workers == 0 || spec.workers > MAX_WORKERS {
            return Err(invalid!(
                "workers must be between 1 and {MAX_WORKERS}, got {}",
                spec.workers
            ));
        }
        let non_finite = match pb::NonFinitePolicy::try_from(spec.non_finite) {
            Ok(pb::NonFinitePolicy::Skip) => NonFinite::Skip,
            Ok(pb::NonFinitePolicy::Error) => NonFinite::Error,
            Err(_) => {
                return Err(invalid!(
                    "non_finite {} is not a known policy",
                    spec.non_finite
                ));
            }
        };
        let worker_timeout = match spec.worker_timeout_seconds {
            None => DEFAULT_WORKER_TIMEOUT,
            Some(s) => Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| invalid!("worker_timeout_seconds must be > 0, got {s}"))?,
        };
        if spec.backup_workers >= spec.workers {
            return Err(invalid!(
                "backup_workers must be less than workers ({}), got {}",
                spec.workers,
                spec.backup_workers
            ));
        }
        let merge = match pb::Merge::try_from(spec.merge) {
            Ok(pb::Merge::Mean) => Merge::Mean,
            Ok(pb::Merge::Weighted) => Merge::Weighted,
            Err(_) => {
                return Err(invalid!(
                    "merge {} is not a known merge (0: mean, 1: weighted)",
                    spec.merge
                ));
            }
        };
        let elastic = validate_membership(spec)?;
        Ok(JobConfig {
            params,
            groups,
            schedule,
            clip,
            workers: spec.workers,
            non_finite,
            worker_timeout,
            backup_workers: spec.backup_workers,
            merge,
            elastic,
        })
    }
}

/// The membership fields of a spec: `min_workers` and `lease_seconds` only
/// in an elastic job, which has no backup workers (its quorum is
/// `min_workers`).
fn validate_membership(spec: &pb::JobSpec) -> Result<Option<Elastic>> {
    match pb::Membership::try_from(spec.membership) {
        Ok(pb::Membership::Fixed) => {
            if spec.min_workers != 0 {
                return Err(invalid!(
                    "min_workers is for elastic membership; a job of fixed workers waits for all {} (or uses backup_workers), got min_workers {}",
                    spec.workers,
                    spec.min_workers
                ));
            }
            if let Some(s) = spec.lease_seconds {
                return Err(invalid!(
                    "lease_seconds is for elastic membership; a job of fixed workers has no leases, got {s}"
                ));
            }
            Ok(None)
        }
        Ok(pb::Membership::Elastic) => {
            if spec.min_workers == 0 || spec.min_workers > spec.workers {
                return Err(invalid!(
                    "min_workers must be between 1 and workers ({}) in an elastic job, got {}",
                    spec.workers,
                    spec.min_workers
                ));
            }
            if spec.backup_workers != 0 {
                return Err(invalid!(
                    "backup_workers is for fixed workers; an elastic job completes rounds by min_workers, got backup_workers {}",
                    spec.backup_workers
                ));
            }
            let lease = match spec.lease_seconds {
                None => DEFAULT_LEASE,
                Some(s) => Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero() && s <= 86_400.0)
                    .ok_or_else(|| {
                        invalid!("lease_seconds must be > 0 and at most a day, got {s}")
                    })?,
            };
            Ok(Some(Elastic {
                min_workers: spec.min_workers,
                lease,
            }))
        }
        Err(_) => Err(invalid!(
            "membership {} is not a known membership (0: fixed, 1: elastic)",
            spec.membership
        )),
    }
}

fn validate_params(specs: &[pb::ParamSpec]) -> Result<Vec<ParamInfo>> {
    if specs.is_empty() {
        return Err(invalid!(
            "params is empty: a job needs at least one parameter"
        ));
    }
    let mut seen = HashMap::new();
    let mut params = Vec::with_capacity(specs.len());
    for (i, p) in specs.iter().enumerate() {
        if p.name.is_empty() {
            return Err(invalid!("params[{i}].name is empty"));
        }
        if let Some(first) = seen.insert(p.name.as_str(), i) {
            return Err(invalid!(
                "parameter '{}' is declared twice: params[{first}] and params[{i}]",
                p.name
            ));
        }
        let numel = p
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
            .filter(|&n| n.checked_mul(4).is_some())
            .ok_or_else(|| {
                invalid!(
                    "parameter '{}' has shape {:?}: too many elements",
                    p.name,
                    p.shape
                )
            })?;
        params.push(ParamInfo {
            name: p.name.clone(),
            shape: p.shape.clone(),
            numel,
            group: 0,
        });
    }
    Ok(params)
}

fn defaults(kind: pb::OptimizerKind) -> Result<Hyper> {
    let adam = |decoupled: bool| {
        Hyper::Adam(AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            // torch's AdamW defaults to weight_decay 0.01, Adam to 0.
            weight_decay: if decoupled { 1e-2 } else { 0.0 },
            amsgrad: false,
            decoupled,
            maximize: false,
        })
    };
    Ok(match kind {
        pb::OptimizerKind::Unspecified => {
            return Err(invalid!("optimizer.kind is required (sgd, adam or adamw)"));
        }
        pb::OptimizerKind::Sgd => Hyper::Sgd(SgdHyper {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }),
        pb::OptimizerKind::Adam => adam(false),
        pb::OptimizerKind::Adamw => adam(true),
    })
}

/// Overrides `base` with the fields set in `h`, refusing fields the
/// optimizer does not have, then validates the result as torch would.
fn apply_overrides(mut base: Hyper, h: Option<&pb::Hyperparameters>, field: &str) -> Result<Hyper> {
    let Some(h) = h else {
        return Ok(base);
    };
    let not_for = |name: &str, opt: &str| invalid!("{field}.{name} is not an option of {opt}");
    match &mut base {
        Hyper::Sgd(s) => {
            for (set, name) in [
                (h.beta1.is_some(), "beta1"),
                (h.beta2.is_some(), "beta2"),
                (h.eps.is_some(), "eps"),
                (h.amsgrad.is_some(), "amsgrad"),
            ] {
                if set {
                    return Err(not_for(name, "SGD"));
                }
            }
            s.lr = h.lr.unwrap_or(s.lr);
            s.weight_decay = h.weight_decay.unwrap_or(s.weight_decay);
            s.momentum = h.momentum.unwrap_or(s.momentum);
            s.dampening = h.dampening.unwrap_or(s.dampening);
            s.nesterov = h.nesterov.unwrap_or(s.nesterov);
            s.maximize = h.maximize.unwrap_or(s.maximize);
            non_negative(field, "lr", s.lr)?;
            non_negative(field, "weight_decay", s.weight_decay)?;
            non_negative(field, "momentum", s.momentum)?;
            finite(field, "dampening", s.dampening)?;
            if s.nesterov && (s.momentum <= 0.0 || s.dampening != 0.0) {
                return Err(invalid!(
                    "{field}.nesterov requires momentum > 0 and dampening 0, got momentum {} and dampening {}",
                    s.momentum,
                    s.dampening
                ));
            }
        }
        Hyper::Adam(a) => {
            let opt = if a.decoupled { "AdamW" } else { "Adam" };
            for (set, name) in [
                (h.momentum.is_some(), "momentum"),
                (h.dampening.is_some(), "dampening"),
                (h.nesterov.is_some(), "nesterov"),
            ] {
                if set {
                    return Err(not_for(name, opt));
                }
            }
            a.lr = h.lr.unwrap_or(a.lr);
            a.weight_decay = h.weight_decay.unwrap_or(a.weight_decay);
            a.beta1 = h.beta1.unwrap_or(a.beta1);
            a.beta2 = h.beta2.unwrap_or(a.beta2);
            a.eps = h.eps.unwrap_or(a.eps);
            a.amsgrad = h.amsgrad.unwrap_or(a.amsgrad);
            a.maximize = h.maximize.unwrap_or(a.maximize);
            non_negative(field, "lr", a.lr)?;
            non_negative(field, "eps", a.eps)?;
            non_negative(field, "weight_decay", a.weight_decay)?;
            for (name, beta) in [("beta1", a.beta1), ("beta2", a.beta2)] {
                if !(0.0..1.0).contains(&beta) {
                    return Err(invalid!("{field}.{name} must be in [0, 1), got {beta}"));
                }
            }
        }
    }
    Ok(base)
}

fn finite(field: &str, name: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(invalid!("{field}.{name} must be finite, got {v}"))
    }
}

fn non_negative(field: &str, name: &str, v: f64) -> Result<()> {
    finite(field, name, v)?;
    if v < 0.0 {
        return Err(invalid!("{field}.{name} must be >= 0, got {v}"));
    }
    Ok(())
}

fn validate_schedule(s: Option<&pb::Schedule>) -> Result<Schedule> {
    use pb::schedule::Kind;
    Ok(match s.and_then(|s| s.kind.as_ref()) {
        None | Some(Kind::Constant(_)) => Schedule::Constant,
        Some(Kind::WarmupCosine(w)) => {
            if w.warmup_steps > w.total_steps {
                return Err(invalid!(
                    "schedule.warmup_steps ({}) must not exceed schedule.total_steps ({})",
                    w.warmup_steps,
                    w.total_steps
                ));
            }
            if !(0.0..=1.0).contains(&w.min_lr_ratio) {
                return Err(invalid!(
                    "schedule.min_lr_ratio must be in [0, 1], got {}",
                    w.min_lr_ratio
                ));
            }
            Schedule::WarmupCosine {
                warmup_steps: w.warmup_steps,
                total_steps: w.total_steps,
                min_lr_ratio: w.min_lr_ratio,
            }
        }
        Some(Kind::CosineAnnealing(c)) => {
            if c.t_max < 1 {
                return Err(invalid!("schedule.t_max must be >= 1, got {}", c.t_max));
            }
            non_negative("schedule", "eta_min", c.eta_min)?;
            Schedule::CosineAnnealing {
                t_max: c.t_max,
                eta_min: c.eta_min,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::JobSpec {
        pb::JobSpec {
            params: vec![
                pb::ParamSpec {
                    name: "w".into(),
                    shape: vec![2, 3],
                },
                pb::ParamSpec {
                    name: "b".into(),
                    shape: vec![],
                },
            ],
            optimizer: Some(pb::Optimizer {
                kind: pb::OptimizerKind::Adamw as i32,
                hyper: None,
            }),
            workers: 2,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_torchs() {
        let c = JobConfig::try_from(&spec()).expect("valid");
        assert_eq!(c.params[0].numel, 6);
        assert_eq!(c.params[1].numel, 1, "a scalar has one element");
        let Hyper::Adam(a) = &c.groups[0] else {
            panic!("adamw")
        };
        assert_eq!((a.lr, a.weight_decay, a.eps), (1e-3, 1e-2, 1e-8));
        assert_eq!(c.schedule, Schedule::Constant);
    }

    fn with_hyper(h: pb::Hyperparameters) -> pb::JobSpec {
        let mut s = spec();
        s.optimizer = Some(pb::Optimizer {
            kind: pb::OptimizerKind::Adamw as i32,
            hyper: Some(h),
        });
        s
    }

    #[test]
    fn refusals_name_the_field_and_value() {
        let no_workers = pb::JobSpec {
            workers: 0,
            ..spec()
        };
        let no_params = pb::JobSpec {
            params: vec![],
            ..spec()
        };
        let cases = [
            (
                with_hyper(pb::Hyperparameters {
                    lr: Some(-1.0),
                    ..Default::default()
                }),
                "optimizer.lr must be >= 0, got -1",
            ),
            (
                with_hyper(pb::Hyperparameters {
                    beta2: Some(1.0),
                    ..Default::default()
                }),
                "optimizer.beta2 must be in [0, 1), got 1",
            ),
            (
                with_hyper(pb::Hyperparameters {
                    momentum: Some(0.9),
                    ..Default::default()
                }),
                "optimizer.momentum is not an option of AdamW",
            ),
            (no_workers, "workers must be between 1"),
            (no_params, "params is empty"),
        ];
        for (s, want) in cases {
            let err = JobConfig::try_from(&s).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn job_names_are_bounded() {
        assert!(validate_job_name("bert-ft_2.1").is_ok());
        assert!(validate_job_name("").is_err());
        assert!(validate_job_name("a/b").is_err());
    }
}
