//! Admission limits: a job's declared sizes are checked against the
//! server's limits before any of its values is read or allocated, refused
//! with the limit and the value named, and nothing is kept of a refused
//! job; a deleted job gives its place back.

use paramd::limits::Limits;
use paramd::node::NodeConfig;
use paramd_client::v1 as pb;
use paramd_client::{Client, ClientError};
use paramd_tests::{Daemon, TestServer, one_param_spec};
use tonic::Code;

fn refused(r: Result<pb::InitResponse, ClientError>, code: Code, naming: &str) {
    let e = r.expect_err("refused");
    let status = e.status().expect("a status");
    assert_eq!(status.code(), code, "{e}");
    assert!(status.message().contains(naming), "{naming:?} not in: {e}");
}

async fn server(limits: Limits) -> (TestServer, Client) {
    let config = NodeConfig {
        limits,
        ..NodeConfig::default()
    };
    let server = TestServer::with_config(config).await;
    let c = server.client().await;
    (server, c)
}

fn sgd(shape: &[u64], workers: u32) -> pb::JobSpec {
    one_param_spec(pb::OptimizerKind::Sgd, shape, workers, 0.1)
}

#[tokio::test]
async fn a_tiny_init_declaring_terabytes_is_refused_before_anything_is_allocated() {
    let (_server, mut c) = server(Limits::default()).await;
    let before = c.status(None).await.expect("status").rss_bytes;
    // 2^44 elements: 64 TiB of parameters, in a request of a few bytes.
    let huge = one_param_spec(pb::OptimizerKind::Adamw, &[1 << 22, 1 << 22], 1, 0.1);
    refused(
        c.init("huge", huge, &[]).await,
        Code::ResourceExhausted,
        "max_job_bytes",
    );
    // 2^62 elements and more do not overflow the arithmetic either.
    let absurd = sgd(&[1 << 31, 1 << 31, 1 << 31], 1);
    let e = c.init("absurd", absurd, &[]).await.expect_err("refused");
    assert!(
        matches!(
            e.status().map(tonic::Status::code),
            Some(Code::ResourceExhausted | Code::InvalidArgument)
        ),
        "{e}"
    );
    let status = c.status(None).await.expect("status");
    assert!(status.jobs.is_empty(), "nothing kept: {:?}", status.jobs);
    assert!(
        status.rss_bytes < before + (64 << 20),
        "RSS grew from {before} to {}",
        status.rss_bytes
    );
}

#[tokio::test]
async fn counts_and_names_are_bounded() {
    let limits = Limits {
        max_workers: 8,
        max_params: 2,
        max_name_bytes: 16,
        ..Limits::default()
    };
    let (_server, mut c) = server(limits).await;
    refused(
        c.init("workers", sgd(&[4], 9), &[]).await,
        Code::ResourceExhausted,
        "workers = 9 is over this server's max_workers (8)",
    );
    let mut three = sgd(&[4], 1);
    for n in ["a", "b"] {
        three.params.push(pb::ParamSpec {
            name: n.into(),
            shape: vec![2],
        });
    }
    refused(
        c.init("params", three, &[]).await,
        Code::ResourceExhausted,
        "3 parameters, over this server's max_params (2)",
    );
    let mut long = sgd(&[4], 1);
    long.params[0].name = "x".repeat(5000);
    refused(
        c.init("names", long, &[]).await,
        Code::InvalidArgument,
        "5000 bytes, over this server's max_name_bytes (16)",
    );
    for bad in ["..", ".", ".hidden"] {
        refused(
            c.init(bad, sgd(&[4], 1), &[("w", &[0.0; 4])]).await,
            Code::InvalidArgument,
            "not starting with a dot",
        );
    }
    assert!(c.status(None).await.expect("status").jobs.is_empty());
}

#[tokio::test]
async fn jobs_and_their_bytes_are_reserved_and_given_back_on_delete() {
    // An SGD job of 50 elements needs 400 bytes (parameters and gradient).
    let limits = Limits {
        max_jobs: 2,
        max_total_bytes: 1000,
        ..Limits::default()
    };
    let (_server, mut c) = server(limits).await;
    let values = [0.5f32; 50];
    c.init("a", sgd(&[50], 1), &[("w", &values)])
        .await
        .expect("a");
    c.init("b", sgd(&[50], 1), &[("w", &values)])
        .await
        .expect("b");
    refused(
        c.init("c", sgd(&[1], 1), &[("w", &[0.0])]).await,
        Code::ResourceExhausted,
        "max_jobs",
    );
    c.delete_job("b").await.expect("delete b");
    refused(
        c.init("big", sgd(&[100], 1), &[("w", &[0.0; 100])]).await,
        Code::ResourceExhausted,
        "the job needs 800 bytes and the jobs held need 400: over this server's max_total_bytes (1000)",
    );
    c.init("c", sgd(&[50], 1), &[("w", &values)])
        .await
        .expect("room again after the delete");
    // Init of a job that exists is still a no-op, not a new admission.
    let again = c
        .init("a", sgd(&[50], 1), &[("w", &values)])
        .await
        .expect("existing");
    assert!(!again.created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_job_name_is_refused_for_what_it_is_with_a_bounded_message() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.retries = Some(0);
    let name = "x".repeat(1 << 20);
    let e = c.status(Some(&name)).await.expect_err("no such job");
    let status = e.status().expect("a status");
    assert_eq!(status.code(), Code::NotFound, "{e}");
    assert!(
        status.message().len() <= 2048,
        "{} bytes",
        status.message().len()
    );
    assert_eq!(e.reason(), Some("unknown_job"));
    let spec = one_param_spec(pb::OptimizerKind::Sgd, &[2], 1, 0.1);
    let r = c.init(&name, spec, &[("w", &[0.0; 2])]).await;
    refused(r, Code::InvalidArgument, "job name");
    server.shutdown().await;
}

/// Initial values are written into the job's chunks as they arrive: an
/// Init grows the daemon (a real process, its peak RSS) by about the job's
/// size, never by a buffered copy of the values on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_values_are_written_into_place() {
    let addr = format!("127.0.0.1:{}", paramd_tests::reserve_ports(1)[0]);
    let _daemon = Daemon::start(&[
        "--listen",
        &addr,
        "--http-listen",
        "127.0.0.1:0",
        "--chunk-bytes",
        "33554432",
    ])
    .await
    .expect("paramd starts");
    let mut c = Client::connect(&format!("http://{addr}"))
        .await
        .expect("connect");
    // The runtime's first allocations are not the job's.
    c.init("small", sgd(&[4], 1), &[("w", &[1.0; 4])])
        .await
        .expect("init");
    let before = c.status(None).await.expect("status").peak_rss_bytes;

    const N: usize = 32 << 20; // 128 MiB of values
    let values: Vec<f32> = (0..N).map(|i| i as f32).collect();
    c.init("big", sgd(&[N as u64], 1), &[("w", &values)])
        .await
        .expect("init");
    let status = c.status(None).await.expect("status");
    let job = status
        .jobs
        .iter()
        .find(|j| j.job == "big")
        .expect("the job");
    let held = job.parameter_bytes + job.optimizer_state_bytes;
    let grew = status.peak_rss_bytes.saturating_sub(before);
    eprintln!(
        "job of {:.0} MiB: peak RSS grew by {:.0} MiB",
        held as f64 / 1048576.0,
        grew as f64 / 1048576.0
    );
    // Beyond the job: the HTTP/2 windows (8 MiB per stream, 32 MiB per
    // connection), a few 4 MiB messages being decoded and what the
    // allocator keeps of them. A buffered copy of the values would add
    // another 128 MiB.
    assert!(
        grew < held + (96 << 20),
        "peak RSS grew by {grew} bytes for a job holding {held}"
    );
    let pulled = c.pull("big", 0).await.expect("pull");
    let w = &pulled.params["w"];
    assert_eq!(w.len(), N);
    for i in [0, 1, N / 2, N - 1] {
        assert_eq!(w[i].to_bits(), (i as f32).to_bits(), "element {i}");
    }
}
