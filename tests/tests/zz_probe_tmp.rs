use paramd_client::v1 as pb;
use paramd_proto::v1::param_server_client::ParamServerClient;
use paramd_tests::TestServer;

fn seg(p: &str, off: u64, v: &[f32]) -> pb::Segment {
    pb::Segment {
        param: p.into(),
        offset: off,
        data: paramd_client::to_le_bytes(v),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let spec = pb::JobSpec {
        params: vec![
            pb::ParamSpec {
                name: "w".into(),
                shape: vec![2, 3],
            },
            pb::ParamSpec {
                name: "b".into(),
                shape: vec![],
            },
            pb::ParamSpec {
                name: "e".into(),
                shape: vec![4],
            },
        ],
        optimizer: Some(pb::Optimizer {
            kind: pb::OptimizerKind::Sgd as i32,
            hyper: Some(pb::Hyperparameters {
                lr: Some(0.1),
                ..Default::default()
            }),
        }),
        workers: 2,
        ..Default::default()
    };
    client
        .init(
            "j",
            spec.clone(),
            &[("w", &[0.0; 6]), ("b", &[0.0]), ("e", &[0.0; 4])],
        )
        .await
        .expect("init");
    let mut raw = ParamServerClient::connect(server.url()).await.expect("c");
    for off in [1u64 << 62, u64::MAX] {
        let req = pb::PushRequest {
            job: "j".into(),
            worker: 0,
            round: 0,
            grads: vec![
                seg("w", 0, &[1.0; 6]),
                seg("b", 0, &[1.0]),
                seg("e", 0, &[1.0; 4]),
                seg("e", off, &[1.0]),
            ],
        };
        let r = raw.push(tokio_stream::iter(vec![req])).await;
        eprintln!("offset {off}: {r:?}");
        let st = client.status(Some("j")).await;
        eprintln!("status after: {st:?}");
    }
    // Init with huge offset
    let r = client.init("k", spec.clone(), &[]).await;
    eprintln!("empty init: {r:?}");
    let mut ireq = pb::InitRequest {
        job: "k2".into(),
        spec: Some(spec.clone()),
        values: vec![
            seg("w", 0, &[1.0; 6]),
            seg("b", 0, &[1.0]),
            seg("e", 0, &[1.0; 4]),
            seg("e", u64::MAX, &[1.0]),
        ],
    };
    let r = raw.init(tokio_stream::iter(vec![ireq.clone()])).await;
    eprintln!("init offset max: {r:?}");
    ireq.job = "k3".into();
    ireq.values[3].offset = 1 << 62;
    let r = raw.init(tokio_stream::iter(vec![ireq.clone()])).await;
    eprintln!("init offset 2^62: {r:?}");
    // zero-size param
    let mut s0 = spec.clone();
    s0.params.push(pb::ParamSpec {
        name: "z".into(),
        shape: vec![0, 3],
    });
    let r = client
        .init(
            "zero",
            s0,
            &[("w", &[0.0; 6]), ("b", &[0.0]), ("e", &[0.0; 4])],
        )
        .await;
    eprintln!("zero-size init: {r:?}");
    let r = client
        .push(
            "zero",
            0,
            0,
            &[("w", &[0.0; 6]), ("b", &[0.0]), ("e", &[0.0; 4])],
        )
        .await;
    eprintln!("zero-size push: {r:?}");
    let r = client
        .push(
            "zero",
            1,
            0,
            &[("w", &[0.0; 6]), ("b", &[0.0]), ("e", &[0.0; 4])],
        )
        .await;
    eprintln!("zero-size push: {r:?}");
    let r = client.pull("zero", 1).await;
    eprintln!("zero-size pull: {r:?}");
    // mismatch messages
    for (what, s) in [
        (
            "lr",
            pb::JobSpec {
                optimizer: Some(pb::Optimizer {
                    kind: pb::OptimizerKind::Sgd as i32,
                    hyper: Some(pb::Hyperparameters {
                        lr: Some(0.2),
                        ..Default::default()
                    }),
                }),
                ..spec.clone()
            },
        ),
        (
            "clip",
            pb::JobSpec {
                clip: Some(pb::Clip { max_norm: 1.0 }),
                ..spec.clone()
            },
        ),
        (
            "policy",
            pb::JobSpec {
                non_finite: 1,
                ..spec.clone()
            },
        ),
    ] {
        let r = client.init("j", s, &[]).await;
        eprintln!("mismatch {what}: {r:?}");
    }
    let r = client.status(None).await;
    eprintln!("all: {r:?}");
}
