//! `paramctl export`: a job's current parameters as plain safetensors, with
//! the original names and shapes, ready for
//! `model.load_state_dict(safetensors.torch.load_file(path))`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, tensor::TensorView};

use crate::Client;

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub job: String,
    /// The round the parameters are at.
    pub round: u64,
    pub tensors: usize,
    pub bytes: usize,
}

/// Writes the parameters of `job` (the only job when `None`) to `out`.
pub async fn export(
    client: &mut Client,
    job: Option<&str>,
    out: &Path,
) -> anyhow::Result<Exported> {
    let job = match job {
        Some(j) => j.to_owned(),
        None => {
            let jobs = client.status(None).await?.jobs;
            match jobs.as_slice() {
                [one] => one.job.clone(),
                [] => anyhow::bail!("the server has no job to export"),
                many => anyhow::bail!(
                    "the server has {} jobs ({}); name one with --job",
                    many.len(),
                    many.iter()
                        .map(|j| j.job.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    let layout = client.layout(&job).await?;
    // Round 0 is always reached: this reads the parameters as they are.
    let mut pulled = client.pull(&job, 0).await?;
    let mut blobs = Vec::with_capacity(layout.params.len());
    for p in &layout.params {
        let values = pulled
            .params
            .remove(&p.name)
            .ok_or_else(|| anyhow::anyhow!("the server sent no values for '{}'", p.name))?;
        let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
        anyhow::ensure!(
            values.len() == shape.iter().product::<usize>(),
            "'{}' has {} values for shape {:?}",
            p.name,
            values.len(),
            shape
        );
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        blobs.push((p.name.clone(), shape, bytes));
    }
    let views = blobs
        .iter()
        .map(|(name, shape, data)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("paramd.job".to_owned(), job.clone()),
        ("paramd.round".to_owned(), pulled.round.to_string()),
    ]);
    let data = safetensors::serialize(views, Some(meta))?;
    // Write beside the target and rename, so a reader never sees half a file.
    let tmp = out.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &data)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out)
        .map_err(|e| anyhow::anyhow!("cannot rename to {}: {e}", out.display()))?;
    Ok(Exported {
        job,
        round: pulled.round,
        tensors: blobs.len(),
        bytes: data.len(),
    })
}
