//! Specs, tensors and the expected SGD step.

use std::collections::BTreeMap;

use paramd_client::v1 as pb;

use crate::{LR, Params, SHAPES, Tensors};

pub(crate) fn param(name: &str, shape: &[u64]) -> pb::ParamSpec {
    pb::ParamSpec {
        name: name.to_owned(),
        shape: shape.to_vec(),
    }
}

pub(crate) fn optimizer(
    kind: pb::OptimizerKind,
    hyper: pb::Hyperparameters,
) -> Option<pb::Optimizer> {
    Some(pb::Optimizer {
        kind: kind as i32,
        hyper: Some(hyper),
    })
}

pub(crate) fn lr(lr: f64) -> pb::Hyperparameters {
    pb::Hyperparameters {
        lr: Some(lr),
        ..Default::default()
    }
}

pub(crate) fn group(params: &[&str], hyper: Option<pb::Hyperparameters>) -> pb::ParamGroup {
    pb::ParamGroup {
        params: params.iter().map(|p| (*p).to_owned()).collect(),
        hyper,
    }
}

/// `w` [2, 3], `b` [], `e` [4]; 2 workers; SGD with lr 0.1.
pub(crate) fn spec() -> pb::JobSpec {
    pb::JobSpec {
        params: SHAPES.iter().map(|(n, s)| param(n, s)).collect(),
        optimizer: optimizer(pb::OptimizerKind::Sgd, lr(LR)),
        workers: 2,
        ..Default::default()
    }
}

/// `spec()` with Adam (or AdamW) and the given hyperparameters.
pub(crate) fn adam_spec(kind: pb::OptimizerKind, hyper: pb::Hyperparameters) -> pb::JobSpec {
    pb::JobSpec {
        optimizer: optimizer(kind, hyper),
        ..spec()
    }
}

/// `spec()` with SGD and the given hyperparameters.
pub(crate) fn sgd_spec(hyper: pb::Hyperparameters) -> pb::JobSpec {
    adam_spec(pb::OptimizerKind::Sgd, hyper)
}

fn numel(shape: &[u64]) -> usize {
    shape.iter().map(|&d| d as usize).product()
}

pub(crate) fn initial() -> Tensors {
    vec![
        ("w", vec![0.5, -1.25, 2.0, 0.3, -0.7, 1.1]),
        ("b", vec![0.42]),
        ("e", vec![3.0, -2.5, 0.01, 7.7]),
    ]
}

/// Worker `worker`'s gradients for `round`: distinct per worker, round,
/// parameter and element, and not exactly representable.
pub(crate) fn grads(worker: u32, round: u64) -> Tensors {
    SHAPES
        .iter()
        .enumerate()
        .map(|(p, (name, shape))| {
            let values = (0..numel(shape))
                .map(|i| {
                    let k = (p * 7 + i * 3 + worker as usize * 5 + round as usize * 11) % 13;
                    k as f32 * 0.37 - 2.1 + worker as f32 * 0.013
                })
                .collect();
            (*name, values)
        })
        .collect()
}

pub(crate) fn refs(t: &Tensors) -> Vec<(&str, &[f32])> {
    t.iter().map(|(n, v)| (*n, v.as_slice())).collect()
}

pub(crate) fn as_params(t: &Tensors) -> Params {
    t.iter()
        .map(|(n, v)| ((*n).to_owned(), v.clone()))
        .collect()
}

pub(crate) fn get<'a>(t: &'a Tensors, name: &str) -> &'a [f32] {
    &t.iter().find(|(n, _)| *n == name).expect("tensor").1
}

/// One SGD step (no momentum, no decay, no clip) by hand, in f32 as the
/// server (and torch) computes it: `p - lr * mean(g0, g1)`, the
/// multiply-add rounded once.
pub(crate) fn sgd_step(params: &Params, g0: &Tensors, g1: &Tensors) -> Params {
    let neg_lr = (-LR) as f32;
    params
        .iter()
        .map(|(name, p)| {
            let (a, b) = (get(g0, name), get(g1, name));
            let next = p
                .iter()
                .zip(a.iter().zip(b))
                .map(|(p, (a, b))| ((*a + *b) / 2.0).mul_add(neg_lr, *p))
                .collect();
            (name.clone(), next)
        })
        .collect()
}

pub(crate) fn bits(p: &Params) -> BTreeMap<String, Vec<u32>> {
    p.iter()
        .map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

pub(crate) fn segment(param: &str, offset: u64, values: &[f32]) -> pb::Segment {
    pb::Segment {
        dtype: 0,
        param: param.to_owned(),
        offset,
        data: paramd_client::to_le_bytes(values),
    }
}

/// Every tensor of `t` as one segment.
pub(crate) fn segments(t: &Tensors) -> Vec<pb::Segment> {
    t.iter().map(|(n, v)| segment(n, 0, v)).collect()
}

/// The segments of `t` but the one named `name`.
pub(crate) fn segments_without(t: &Tensors, name: &str) -> Vec<pb::Segment> {
    segments(t)
        .into_iter()
        .filter(|s| s.param != name)
        .collect()
}
