//! `paramctl export` writes the parameters a replay ended with, under their
//! original names and shapes, as plain safetensors.

use paramd_client::export::export;
use paramd_client::replay::{ReplayOptions, replay};
use paramd_client::trace::read_tensors;
use paramd_tests::{TestCluster, TestServer, golden_traces};

async fn check(url: String) {
    let trace = golden_traces()
        .into_iter()
        .find(|t| t.ends_with("adamw_shapes_8_workers.safetensors"))
        .expect("trace");
    let opts = ReplayOptions {
        credentials: Default::default(),
        server: url.clone(),
        job: Some("exported".into()),
        every_step: false,
    };
    let result = replay(&trace, &opts).await.expect("replay");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.safetensors");
    let mut c = paramd_client::Client::connect(&url).await.expect("connect");
    // The only job: no name needed.
    let e = export(&mut c, None, &out).await.expect("export");
    assert_eq!(
        (e.job.as_str(), e.round, e.tensors),
        ("exported", result.lr.len() as u64, result.params.len())
    );

    let buf = std::fs::read(&out).expect("read");
    let (got, meta) = read_tensors(&buf).expect("parse");
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    assert_eq!(got.len(), result.params.len(), "exactly the parameters");
    for ((name, shape), values) in result.params.iter().zip(&result.final_params) {
        let t = &got[name];
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        let want: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(t.values, want, "{name}: the pulled values, bit for bit");
    }
    let (init, _) = read_tensors(&std::fs::read(&trace).expect("trace")).expect("parse");
    for name in got.keys() {
        assert_eq!(
            got[name].shape,
            init[&format!("init/{name}")].shape,
            "{name}: the trace's shape"
        );
    }

    // With two jobs the name is required.
    c.init("other", result_spec(), &[("x", &[1.0])])
        .await
        .expect("second job");
    let err = export(&mut c, None, &out).await.expect_err("ambiguous");
    assert!(err.to_string().contains("name one with --job"), "{err}");
}

fn result_spec() -> paramd_client::v1::JobSpec {
    use paramd_client::v1 as pb;
    pb::JobSpec {
        params: vec![pb::ParamSpec {
            name: "x".into(),
            shape: vec![],
        }],
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: None,
        }),
        workers: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_writes_the_parameters_with_names_and_shapes() {
    let server = TestServer::start().await;
    check(server.url()).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_gathers_every_shard() {
    let config = paramd::NodeConfig {
        chunk_bytes: 16,
        ..Default::default()
    };
    let cluster = TestCluster::start(3, config).await;
    check(cluster.url()).await;
    cluster.shutdown().await;
}
