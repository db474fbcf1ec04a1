//! Training traces computed by PyTorch (`paramd-trace/1`, safetensors), the
//! job they describe, and checking a replay's result against them.

use std::collections::HashMap;
use std::path::Path;

use paramd_proto::v1 as pb;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// The trace format this module reads.
pub const FORMAT: &str = "paramd-trace/1";

/// A tensor of a trace or a result, widened to f64 for comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// A loaded trace.
#[derive(Debug)]
pub struct Trace {
    /// Parameter names, in torch's order.
    pub params: Vec<String>,
    pub shapes: Vec<Vec<u64>>,
    pub workers: u32,
    pub steps: u64,
    pub groups: usize,
    /// The job the trace was computed with.
    pub spec: pb::JobSpec,
    pub tensors: HashMap<String, Tensor>,
}

/// Reads every tensor of a safetensors buffer (f32 or f64) as f64, and the
/// header's metadata.
pub fn read_tensors(
    buf: &[u8],
) -> anyhow::Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let (_, meta) = SafeTensors::read_metadata(buf)?;
    let st = SafeTensors::deserialize(buf)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let values = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            other => anyhow::bail!("tensor '{name}' has dtype {other:?}; expected F32 or F64"),
        };
        out.insert(
            name,
            Tensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

impl Trace {
    /// Loads a trace file.
    pub fn load(path: &Path) -> anyhow::Result<Trace> {
        let buf = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let (tensors, meta) = read_tensors(&buf)?;
        match meta.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            other => anyhow::bail!(
                "{}: format is {other:?}, expected {FORMAT:?}",
                path.display()
            ),
        }
        let config: Value =
            serde_json::from_str(meta.get("config").ok_or_else(|| {
                anyhow::anyhow!("{}: no config in the metadata", path.display())
            })?)?;
        let params: Vec<String> = serde_json::from_value(config["params"].clone())?;
        let mut shapes = Vec::with_capacity(params.len());
        for p in &params {
            let t = tensors
                .get(&format!("init/{p}"))
                .ok_or_else(|| anyhow::anyhow!("trace has no init/{p}"))?;
            shapes.push(t.shape.iter().map(|&d| d as u64).collect());
        }
        let workers = config["workers"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("config.workers is missing"))?
            as u32;
        let steps = config["steps"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("config.steps is missing"))?;
        let spec = job_spec(&config, &params, &shapes, workers)?;
        Ok(Trace {
            groups: spec.param_groups.len().max(1),
            params,
            shapes,
            workers,
            steps,
            spec,
            tensors,
        })
    }

    /// A tensor of the trace as f32 values.
    pub fn f32s(&self, name: &str) -> anyhow::Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("trace has no tensor '{name}'"))?;
        Ok(t.values.iter().map(|&v| v as f32).collect())
    }

    /// `values` (one per parameter, in trace order) named as the client
    /// takes them.
    pub fn named<'a>(&'a self, values: &'a [Vec<f32>]) -> Vec<(&'a str, &'a [f32])> {
        self.params
            .iter()
            .map(String::as_str)
            .zip(values.iter().map(Vec::as_slice))
            .collect()
    }

    /// The initial values of every parameter, in order.
    pub fn init(&self) -> anyhow::Result<Vec<Vec<f32>>> {
        self.params
            .iter()
            .map(|p| self.f32s(&format!("init/{p}")))
            .collect()
    }

    /// The gradients worker `w` pushes at step `t`, in parameter order;
    /// `None` where the trace has none (torch's `grad is None`: the worker
    /// pushes the parameter as having no gradient).
    pub fn grads(&self, t: u64, w: u32) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
        self.params
            .iter()
            .map(|p| {
                let name = format!("grad/{t}/{w}/{p}");
                if self.tensors.contains_key(&name) {
                    self.f32s(&name).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect()
    }
}

/// Translates a trace's config into a JobSpec, refusing options paramd does
/// not reproduce rather than ignoring them.
fn job_spec(
    config: &Value,
    params: &[String],
    shapes: &[Vec<u64>],
    workers: u32,
) -> anyhow::Result<pb::JobSpec> {
    let known = |v: &Value, field: &str, keys: &[&str]| -> anyhow::Result<()> {
        if let Some(obj) = v.as_object()
            && let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str()))
        {
            anyhow::bail!("{field}.{k} is not something paramd knows: refused rather than ignored");
        }
        Ok(())
    };
    known(
        config,
        "config",
        &[
            "params",
            "workers",
            "steps",
            "optimizer",
            "param_groups",
            "schedule",
            "clip",
        ],
    )?;
    let opt = &config["optimizer"];
    let mut kind = match opt["kind"].as_str() {
        Some("sgd") => pb::OptimizerKind::Sgd,
        Some("adam") => pb::OptimizerKind::Adam,
        Some("adamw") => pb::OptimizerKind::Adamw,
        other => anyhow::bail!("optimizer.kind {other:?} is not sgd, adam or adamw"),
    };
    // torch's Adam(decoupled_weight_decay=True) is AdamW, with Adam's
    // default weight decay (0, where AdamW's is 0.01).
    let decoupled = match &opt["decoupled_weight_decay"] {
        Value::Null => None,
        Value::Bool(b) => Some(*b),
        v => anyhow::bail!("optimizer.decoupled_weight_decay is not a boolean: {v}"),
    };
    let adam_as_adamw = kind == pb::OptimizerKind::Adam && decoupled == Some(true);
    if adam_as_adamw {
        kind = pb::OptimizerKind::Adamw;
    }
    if decoupled.is_some() && !matches!(opt["kind"].as_str(), Some("adam" | "adamw")) {
        anyhow::bail!("optimizer.decoupled_weight_decay is an option of adam and adamw only");
    }
    if opt["kind"].as_str() == Some("adamw") && decoupled == Some(false) {
        anyhow::bail!("optimizer.decoupled_weight_decay = false is not AdamW: use kind adam");
    }
    let hyper = |v: &Value, field: &str| -> anyhow::Result<pb::Hyperparameters> {
        let mut h = pb::Hyperparameters::default();
        let Some(obj) = v.as_object() else {
            return Ok(h);
        };
        let num = |key: &str| -> anyhow::Result<f64> {
            obj[key]
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("{field}.{key} is not a number"))
        };
        let flag = |key: &str| -> anyhow::Result<bool> {
            obj[key]
                .as_bool()
                .ok_or_else(|| anyhow::anyhow!("{field}.{key} is not a boolean"))
        };
        for key in obj.keys() {
            match key.as_str() {
                "kind" | "params" | "decoupled_weight_decay" => {}
                "lr" => h.lr = Some(num(key)?),
                "weight_decay" => h.weight_decay = Some(num(key)?),
                "momentum" => h.momentum = Some(num(key)?),
                "dampening" => h.dampening = Some(num(key)?),
                "nesterov" => h.nesterov = Some(flag(key)?),
                "eps" => h.eps = Some(num(key)?),
                "amsgrad" => h.amsgrad = Some(flag(key)?),
                "maximize" => h.maximize = Some(flag(key)?),
                "betas" => {
                    let b = obj[key]
                        .as_array()
                        .filter(|b| b.len() == 2)
                        .ok_or_else(|| anyhow::anyhow!("{field}.betas is not a pair"))?;
                    let beta = |i: usize| {
                        b[i].as_f64().ok_or_else(|| {
                            anyhow::anyhow!("{field}.betas[{i}] is not a number: {}", b[i])
                        })
                    };
                    h.beta1 = Some(beta(0)?);
                    h.beta2 = Some(beta(1)?);
                }
                // Implementation switches of torch that do not change the
                // numerics paramd reproduces.
                "foreach" | "fused" | "capturable" | "differentiable" => {}
                other => anyhow::bail!("{field}.{other} is not supported by paramd"),
            }
        }
        Ok(h)
    };
    let mut base = hyper(opt, "optimizer")?;
    if adam_as_adamw {
        base.weight_decay.get_or_insert(0.0);
    }
    let optimizer = pb::Optimizer {
        kind: kind as i32,
        hyper: Some(base),
    };
    let mut param_groups = Vec::new();
    if let Some(groups) = config["param_groups"].as_array() {
        for (i, g) in groups.iter().enumerate() {
            param_groups.push(pb::ParamGroup {
                params: serde_json::from_value(g["params"].clone()).map_err(|e| {
                    anyhow::anyhow!("param_groups[{i}].params is not a list of names: {e}")
                })?,
                hyper: Some(hyper(g, &format!("param_groups[{i}]"))?),
            });
        }
    }
    let s = &config["schedule"];
    let u = |key: &str| -> anyhow::Result<u64> {
        s[key]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("schedule.{key} is missing or not a count: {}", s[key]))
    };
    // An optional number: absent is `default`, anything but a number is refused.
    let number = |v: &Value, field: &str, default: f64| -> anyhow::Result<f64> {
        match v {
            Value::Null => Ok(default),
            v => v
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("{field} is not a number: {v}")),
        }
    };
    if !s.is_null() && !s.is_object() {
        anyhow::bail!("schedule is not an object: {s}");
    }
    // torch's fresh scheduler has last_epoch -1; a resumed one is not replayed.
    match &s["last_epoch"] {
        Value::Null => {}
        v if v.as_i64() == Some(-1) => {}
        v => anyhow::bail!("schedule.last_epoch {v}: only a fresh schedule (-1) is replayed"),
    }
    let kind = match (s.is_null(), s["kind"].as_str()) {
        (true, _) => pb::schedule::Kind::Constant(pb::Constant {}),
        (false, Some("constant")) => {
            known(s, "schedule", &["kind", "last_epoch"])?;
            pb::schedule::Kind::Constant(pb::Constant {})
        }
        (false, Some("warmup_cosine")) => {
            known(
                s,
                "schedule",
                &[
                    "kind",
                    "warmup_steps",
                    "total_steps",
                    "min_lr_ratio",
                    "last_epoch",
                ],
            )?;
            pb::schedule::Kind::WarmupCosine(pb::WarmupCosine {
                warmup_steps: u("warmup_steps")?,
                total_steps: u("total_steps")?,
                min_lr_ratio: number(&s["min_lr_ratio"], "schedule.min_lr_ratio", 0.0)?,
            })
        }
        (false, Some("cosine_annealing")) => {
            known(s, "schedule", &["kind", "t_max", "eta_min", "last_epoch"])?;
            pb::schedule::Kind::CosineAnnealing(pb::CosineAnnealing {
                t_max: u("t_max")?,
                eta_min: number(&s["eta_min"], "schedule.eta_min", 0.0)?,
            })
        }
        (false, Some(other)) => anyhow::bail!("schedule.kind {other:?} is not supported"),
        (false, None) => {
            anyhow::bail!("schedule.kind is missing (constant, warmup_cosine or cosine_annealing)")
        }
    };
    let mut non_finite = pb::NonFinitePolicy::Skip;
    let clip = match &config["clip"] {
        Value::Null => None,
        c => {
            known(
                c,
                "clip",
                &["max_norm", "norm_type", "error_if_nonfinite", "foreach"],
            )?;
            // torch's defaults: the L2 norm, non-finite norms not an error.
            let norm_type = number(&c["norm_type"], "clip.norm_type", 2.0)?;
            if norm_type != 2.0 {
                anyhow::bail!("clip.norm_type {norm_type}: paramd clips by the L2 norm (2.0) only");
            }
            match &c["error_if_nonfinite"] {
                Value::Null | Value::Bool(false) => {}
                // torch raises on a non-finite norm: the job refuses
                // non-finite gradients instead of skipping their round.
                Value::Bool(true) => non_finite = pb::NonFinitePolicy::Error,
                v => anyhow::bail!("clip.error_if_nonfinite is not a boolean: {v}"),
            }
            Some(pb::Clip {
                max_norm: c["max_norm"].as_f64().ok_or_else(|| {
                    anyhow::anyhow!("clip.max_norm is not a number: {}", c["max_norm"])
                })?,
            })
        }
    };
    Ok(pb::JobSpec {
        params: params
            .iter()
            .zip(shapes)
            .map(|(name, shape)| pb::ParamSpec {
                name: name.clone(),
                shape: shape.clone(),
            })
            .collect(),
        optimizer: Some(optimizer),
        param_groups,
        schedule: Some(pb::Schedule { kind: Some(kind) }),
        clip,
        workers,
        non_finite: non_finite as i32,
        // A replay waits for every worker, as the trace was computed.
        ..Default::default()
    })
}

/// Tolerances of a comparison: `|got - want| <= atol + rtol * |want|`, with
/// ten times `rtol` for grad norms.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Default for Tolerance {
    /// The golden traces' tolerance.
    fn default() -> Self {
        Tolerance {
            atol: 1e-6,
            rtol: 1e-4,
        }
    }
}

/// The verdict of comparing a result with a trace.
#[derive(Debug, Default)]
pub struct Comparison {
    pub passed: usize,
    pub failures: Vec<String>,
    /// Largest `|got - want| / (atol + |want|)` seen.
    pub worst: f64,
}

/// Checks a replay result against a trace's expectations, as the golden
/// README's `compare.py` does.
pub fn compare(
    trace: &HashMap<String, Tensor>,
    result: &HashMap<String, Tensor>,
    tol: Tolerance,
) -> Comparison {
    let mut c = Comparison::default();
    let mut keys: Vec<&String> = trace.keys().collect();
    keys.sort();
    for key in keys {
        let want = &trace[key];
        let got_key = if let Some(rest) = key.strip_prefix("expect/") {
            let Some((step, name)) = rest.split_once('/') else {
                continue;
            };
            if step == "final" {
                format!("final/{name}")
            } else {
                let k = format!("params/{step}/{name}");
                if !result.contains_key(&k) {
                    continue;
                }
                k
            }
        } else if key.starts_with("lr/") || key.starts_with("grad_norm/") {
            key.clone()
        } else {
            continue;
        };
        let Some(got) = result.get(&got_key) else {
            c.failures.push(format!("missing {got_key}"));
            continue;
        };
        if got.shape != want.shape {
            c.failures.push(format!(
                "shape {got_key}: got {:?}, want {:?}",
                got.shape, want.shape
            ));
            continue;
        }
        let rtol = tol.rtol
            * if key.starts_with("grad_norm/") {
                10.0
            } else {
                1.0
            };
        let mut bad = false;
        let mut max_abs: f64 = 0.0;
        for (&g, &w) in got.values.iter().zip(&want.values) {
            let diff = (g - w).abs();
            max_abs = max_abs.max(diff);
            c.worst = c.worst.max(diff / (tol.atol + w.abs()));
            bad |= !g.is_finite() || diff > tol.atol + rtol * w.abs();
        }
        if bad {
            c.failures.push(format!(
                "mismatch {got_key}: max |got-want| = {max_abs:.3e}"
            ));
        } else {
            c.passed += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(config: Value) -> anyhow::Result<pb::JobSpec> {
        job_spec(&config, &["w".to_owned()], &[vec![2]], 1)
    }

    fn base() -> Value {
        json!({
            "params": ["w"], "workers": 1, "steps": 3,
            "optimizer": {"kind": "adamw", "lr": 0.01, "betas": [0.9, 0.999]},
            "schedule": {"kind": "warmup_cosine", "warmup_steps": 1, "total_steps": 3, "min_lr_ratio": 0.1},
            "clip": {"max_norm": 1.0, "norm_type": 2.0, "error_if_nonfinite": false, "foreach": null}
        })
    }

    fn refused(edit: impl FnOnce(&mut Value), naming: &str) {
        let mut c = base();
        edit(&mut c);
        let e = spec(c).expect_err("refused").to_string();
        assert!(e.contains(naming), "{naming:?} not in {e:?}");
    }

    #[test]
    fn what_torch_does_and_paramd_reproduces_is_read() {
        let s = spec(base()).expect("a spec");
        assert_eq!(s.clip.expect("clip").max_norm, 1.0);
        let mut c = base();
        c["schedule"] = Value::Null;
        let s = spec(c.clone()).expect("no schedule: constant");
        assert!(matches!(
            s.schedule.and_then(|s| s.kind),
            Some(pb::schedule::Kind::Constant(_))
        ));
        c["schedule"] = json!({"kind": "cosine_annealing", "t_max": 3, "last_epoch": -1});
        spec(c).expect("a fresh cosine annealing");
        let mut c = base();
        c["clip"]["error_if_nonfinite"] = json!(true);
        let s = spec(c).expect("error_if_nonfinite maps to the error policy");
        assert_eq!(s.non_finite, pb::NonFinitePolicy::Error as i32);
    }

    #[test]
    fn what_paramd_would_not_reproduce_is_refused_not_ignored() {
        refused(|c| c["clip"]["norm_type"] = json!(1.0), "clip.norm_type 1");
        refused(
            |c| c["clip"]["norm_type"] = json!("inf"),
            "clip.norm_type is not a number",
        );
        refused(
            |c| c["clip"]["error_if_nonfinite"] = json!("yes"),
            "error_if_nonfinite",
        );
        refused(|c| c["clip"]["max_norm"] = json!("1.0"), "clip.max_norm");
        refused(|c| c["schedule"]["last_epoch"] = json!(4), "last_epoch 4");
        refused(|c| c["schedule"]["warmup"] = json!(4), "schedule.warmup");
        refused(
            |c| {
                c["schedule"]
                    .as_object_mut()
                    .expect("an object")
                    .remove("kind");
            },
            "schedule.kind is missing",
        );
        refused(
            |c| c["schedule"]["min_lr_ratio"] = json!("0.1"),
            "min_lr_ratio",
        );
        refused(
            |c| c["optimizer"]["betas"] = json!(["0.9", 0.999]),
            "betas[0]",
        );
        refused(
            |c| c["momentum_schedule"] = json!(1),
            "config.momentum_schedule",
        );
        refused(
            |c| c["schedule"] = json!({"kind": "cosine_annealing", "t_max": 3, "eta_min": "0"}),
            "eta_min",
        );
        refused(
            |c| c["optimizer"]["decoupled_weight_decay"] = json!(false),
            "decoupled_weight_decay = false is not AdamW",
        );
        refused(
            |c| c["optimizer"] = json!({"kind": "sgd", "decoupled_weight_decay": true}),
            "an option of adam and adamw only",
        );
        refused(
            |c| c["optimizer"]["maximize"] = json!(1),
            "optimizer.maximize is not a boolean",
        );
    }

    #[test]
    fn adam_with_decoupled_weight_decay_is_adamw_with_adams_default_decay() {
        let mut c = base();
        c["optimizer"] = json!({"kind": "adam", "decoupled_weight_decay": true, "maximize": true});
        let s = spec(c).expect("a spec");
        let opt = s.optimizer.expect("optimizer");
        assert_eq!(opt.kind, pb::OptimizerKind::Adamw as i32);
        let h = opt.hyper.expect("hyper");
        assert_eq!((h.weight_decay, h.maximize), (Some(0.0), Some(true)));
    }
}
