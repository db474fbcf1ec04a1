//! Fixtures: job specs, the golden traces, and the
//! installers of tools a test needs.

use std::path::{Path, PathBuf};

/// A job of `workers` workers training one parameter `w` of shape `shape`
/// with optimizer `kind` at learning rate `lr`, torch's defaults otherwise.
pub fn one_param_spec(
    kind: paramd_proto::v1::OptimizerKind,
    shape: &[u64],
    workers: u32,
    lr: f64,
) -> paramd_proto::v1::JobSpec {
    use paramd_proto::v1 as pb;
    pb::JobSpec {
        params: vec![pb::ParamSpec {
            name: "w".into(),
            shape: shape.to_vec(),
        }],
        optimizer: Some(pb::Optimizer {
            kind: kind as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(lr),
                ..Default::default()
            }),
        }),
        workers,
        ..Default::default()
    }
}

/// A job of `workers` workers training flat parameters `shapes` (name,
/// elements) with `optimizer`, the spec's defaults otherwise (set others
/// with `..`).
pub fn flat_spec(
    shapes: &[(&str, usize)],
    optimizer: paramd_proto::v1::Optimizer,
    workers: u32,
) -> paramd_proto::v1::JobSpec {
    use paramd_proto::v1 as pb;
    pb::JobSpec {
        params: shapes
            .iter()
            .map(|&(name, n)| pb::ParamSpec {
                name: name.into(),
                shape: vec![n as u64],
            })
            .collect(),
        optimizer: Some(optimizer),
        workers,
        ..Default::default()
    }
}

/// DiLoCo's outer optimizer: SGD with lr 0.7, momentum 0.9 and Nesterov.
pub fn outer_sgd() -> paramd_proto::v1::Optimizer {
    use paramd_proto::v1 as pb;
    pb::Optimizer {
        kind: pb::OptimizerKind::Sgd as i32,
        hyper: Some(pb::Hyperparameters {
            lr: Some(0.7),
            momentum: Some(0.9),
            nesterov: Some(true),
            ..Default::default()
        }),
    }
}

/// The golden traces copied into the repository.
pub fn golden_traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    traces.sort();
    assert!(!traces.is_empty(), "no traces in {}", dir.display());
    traces
}

/// Runs `tests/scripts/<script>`, the project's installer of a tool a
/// test needs (Debian's package, when it is not on PATH yet); fails the
/// test with the script's output if it fails.
pub fn install(script: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = std::process::Command::new("bash")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every parameter of a pull as the bits of its values, by name: what
/// tests compare when they require bit-identical results.
pub fn bits(p: &paramd_client::Pulled) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> = p
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect();
    v.sort();
    v
}
