//! paramd's status as JSON, one shape for every place that prints or serves
//! it.

use serde_json::json;

use crate::v1 as pb;

/// A `StatusResponse` as `paramctl status --json` prints it and the status
/// page's API serves it: `{"jobs": [...]}`.
pub fn status(s: &pb::StatusResponse) -> serde_json::Value {
    json!({ "jobs": s.jobs.iter().map(job).collect::<Vec<_>>() })
}

/// One job of a `StatusResponse`.
pub fn job(j: &pb::JobStatus) -> serde_json::Value {
    json!({
        "job": j.job,
        "optimizer": j.optimizer,
        "round": j.round,
        "step": j.step,
        "workers_expected": j.workers_expected,
        "workers_pushed": j.workers_pushed,
        "rounds_skipped": j.rounds_skipped,
        "waiting_for": j.waiting_for,
        "parameters": j.parameters,
        "parameter_bytes": j.parameter_bytes,
        "optimizer_state_bytes": j.optimizer_state_bytes,
        "shards": j.shards.iter().map(|sh| json!({
            "index": sh.index,
            "address": sh.address,
            "up": sh.up,
            "chunks": sh.chunks,
            "parameter_bytes": sh.parameter_bytes,
            "optimizer_state_bytes": sh.optimizer_state_bytes,
            "round": sh.round,
            "error": sh.error,
        })).collect::<Vec<_>>(),
        "last": j.last.as_ref().map(|l| json!({
            "round": l.round,
            "step": l.step,
            "skipped": l.skipped,
            "grad_norm": l.grad_norm,
            "clip_coefficient": l.clip_coefficient,
            "lr": l.lr,
        })),
    })
}
