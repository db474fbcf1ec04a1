//! `paramctl replay`: drives a server with a trace's gradients exactly as a
//! fleet would (one task and one connection per worker, every worker
//! pushing each step concurrently and pulling after it) and records what
//! the server computed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype, tensor::TensorView};

use crate::codec::Payload;
use crate::trace::Trace;
use crate::{Client, Credentials, to_le_bytes};

/// What a replay pulled from the server.
#[derive(Debug, Default)]
pub struct ReplayResult {
    /// Parameter names and shapes, in the trace's order.
    pub params: Vec<(String, Vec<u64>)>,
    /// Parameters after the last step.
    pub final_params: Vec<Vec<f32>>,
    /// The lr of every group at each step.
    pub lr: Vec<Vec<f64>>,
    /// The pre-clip global norm at each step.
    pub grad_norm: Vec<f32>,
    /// With `every_step`: the parameters after each step.
    pub steps: Vec<Vec<Vec<f32>>>,
    /// The job the replay ran as.
    pub job: String,
}

/// Options of a replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub server: String,
    /// Token and TLS settings the server needs.
    pub credentials: Credentials,
    /// Job name; a fresh one when absent.
    pub job: Option<String>,
    /// Keep the parameters after every step, not only the last.
    pub every_step: bool,
}

/// A job name no other replay uses.
fn fresh_job_name(trace: &Path) -> String {
    let stem: String = trace
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("trace")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("replay-{stem}-{}-{nanos}", std::process::id())
}

/// Replays the trace at `path` against `opts.server`.
pub async fn replay(path: &Path, opts: &ReplayOptions) -> anyhow::Result<ReplayResult> {
    let trace = Arc::new(Trace::load(path)?);
    let job = opts.job.clone().unwrap_or_else(|| fresh_job_name(path));
    let init = trace.init()?;
    let values = trace.named(&init);
    let mut client = Client::connect_with(&opts.server, opts.credentials.clone()).await?;
    let start = client.init(&job, trace.spec.clone(), &values).await?.round;

    let mut workers = Vec::new();
    for w in 0..trace.workers {
        let (trace, job, server, credentials) = (
            Arc::clone(&trace),
            job.clone(),
            opts.server.clone(),
            opts.credentials.clone(),
        );
        let every_step = opts.every_step;
        workers.push(tokio::spawn(async move {
            run_worker(
                &trace,
                &job,
                &server,
                credentials,
                w,
                start,
                every_step && w == 0,
            )
            .await
        }));
    }
    let mut result = None;
    for (w, handle) in workers.into_iter().enumerate() {
        let r = handle
            .await
            .map_err(|e| anyhow::anyhow!("worker {w} panicked: {e}"))?
            .map_err(|e| e.context(format!("worker {w}")))?;
        if w == 0 {
            result = Some(r);
        }
    }
    let mut result = result.ok_or_else(|| anyhow::anyhow!("the trace has no workers"))?;
    result.params = trace
        .params
        .iter()
        .cloned()
        .zip(trace.shapes.iter().cloned())
        .collect();
    result.job = job;
    Ok(result)
}

/// One worker: push each step's gradients, pull the parameters after it.
async fn run_worker(
    trace: &Trace,
    job: &str,
    server: &str,
    credentials: Credentials,
    w: u32,
    start: u64,
    keep_steps: bool,
) -> anyhow::Result<ReplayResult> {
    let mut client = Client::connect_with(server, credentials).await?;
    let mut out = ReplayResult::default();
    for t in 0..trace.steps {
        let grads = trace.grads(t, w)?;
        let (mut given, mut no_grad) = (Vec::new(), Vec::new());
        for (p, g) in trace.params.iter().zip(grads) {
            let name: Arc<str> = Arc::from(p.as_str());
            match g {
                Some(g) => given.push((name, Payload::Owned(to_le_bytes(&g)))),
                None => no_grad.push(name),
            }
        }
        client
            .push_payloads(
                job,
                w,
                start + t,
                &given,
                &no_grad,
                crate::PushOptions::default(),
            )
            .await?;
        let mut pulled = client.pull(job, start + t + 1).await?;
        let last = pulled
            .last
            .take()
            .ok_or_else(|| anyhow::anyhow!("pull after step {t} reported no round"))?;
        out.lr.push(last.lr);
        out.grad_norm.push(last.grad_norm);
        let params = trace
            .params
            .iter()
            .map(|p| {
                pulled
                    .params
                    .remove(p)
                    .ok_or_else(|| anyhow::anyhow!("pull after step {t} lacks '{p}'"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if keep_steps {
            out.steps.push(params.clone());
        }
        out.final_params = params;
    }
    Ok(out)
}

impl ReplayResult {
    /// Writes the result as safetensors, in the layout of the golden
    /// README: `final/{param}`, `lr/{t}`, `grad_norm/{t}`, `params/{t}/{param}`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let shape = |s: &[u64]| s.iter().map(|&d| d as usize).collect::<Vec<usize>>();
        for ((name, s), values) in self.params.iter().zip(&self.final_params) {
            blobs.push((format!("final/{name}"), Dtype::F32, shape(s), f32s(values)));
        }
        for (t, lrs) in self.lr.iter().enumerate() {
            let bytes = lrs.iter().flat_map(|x| x.to_le_bytes()).collect();
            blobs.push((format!("lr/{t}"), Dtype::F64, vec![lrs.len()], bytes));
        }
        for (t, n) in self.grad_norm.iter().enumerate() {
            blobs.push((
                format!("grad_norm/{t}"),
                Dtype::F32,
                vec![],
                n.to_le_bytes().to_vec(),
            ));
        }
        for (t, params) in self.steps.iter().enumerate() {
            for ((name, s), values) in self.params.iter().zip(params) {
                blobs.push((
                    format!("params/{t}/{name}"),
                    Dtype::F32,
                    shape(s),
                    f32s(values),
                ));
            }
        }
        let views = blobs
            .iter()
            .map(|(name, dtype, shape, data)| {
                Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let meta = HashMap::from([("format".to_owned(), "paramd-replay/1".to_owned())]);
        let bytes = safetensors::serialize(views, Some(meta))?;
        std::fs::write(path, bytes)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        Ok(())
    }
}
