//! Access control and transport security: bearer tokens (missing or wrong:
//! UNAUTHENTICATED, nothing applied, the token never in logs or metrics),
//! mutual TLS on a two-shard cluster of real processes replaying a golden
//! trace, clients without the CA or certificate refused, gRPC reflection,
//! and a message over the size limit refused without the server's memory
//! growing by its size.

use std::path::{Path, PathBuf};
use std::time::Duration;

use paramd::auth::AuthToken;
use paramd_client::trace::{Tolerance, compare, read_tensors};
use paramd_client::{Client, Credentials, v1 as pb};
use paramd_tests::{
    Daemon, TestServer, binary, http_get, one_param_spec, peer_port, reserve_ports,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::Code;

const TOKEN: &str = "s3cret-Token_0123456789";

fn sgd_spec(workers: u32) -> pb::JobSpec {
    one_param_spec(pb::OptimizerKind::Sgd, &[2], workers, 1.0)
}

fn code(e: &paramd_client::ClientError) -> Option<Code> {
    e.status().map(tonic::Status::code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_token_are_refused_and_change_nothing() {
    let server = TestServer::with_config(paramd::NodeConfig {
        auth_token: Some(AuthToken::new(TOKEN)),
        ..Default::default()
    })
    .await;
    let with = |t: &str| Credentials::none().with_token(t).expect("token");

    // No token, a wrong one, a prefix of the right one: refused.
    let mut none = Client::connect(&server.url()).await.expect("connect");
    let e = none.status(None).await.expect_err("no token");
    assert_eq!(code(&e), Some(Code::Unauthenticated), "{e}");
    assert!(e.to_string().contains("Bearer"), "{e}");
    let mut wrong = Client::connect_with(&server.url(), with("s3cret-Token_012345678"))
        .await
        .expect("connect");
    let e = wrong
        .init("j", sgd_spec(1), &[("w", &[1.0, 2.0])])
        .await
        .expect_err("wrong token");
    assert_eq!(code(&e), Some(Code::Unauthenticated), "{e}");

    // The right token: the job exists, and a wrong-token push of its first
    // round changes nothing.
    let mut right = Client::connect_with(&server.url(), with(TOKEN))
        .await
        .expect("connect");
    right
        .init("j", sgd_spec(1), &[("w", &[1.0, 2.0])])
        .await
        .expect("init");
    let e = wrong
        .push("j", 0, 0, &[("w", &[1.0, 1.0])])
        .await
        .expect_err("wrong-token push");
    assert_eq!(code(&e), Some(Code::Unauthenticated), "{e}");
    let status = right.status(Some("j")).await.expect("status");
    assert_eq!(
        (status.jobs[0].round, status.jobs[0].workers_pushed),
        (0, 0)
    );
    let e = none.delete_job("j").await.expect_err("no-token delete");
    assert_eq!(code(&e), Some(Code::Unauthenticated), "{e}");
    right
        .push("j", 0, 0, &[("w", &[1.0, 1.0])])
        .await
        .expect("push");
    assert_eq!(
        right.pull("j", 1).await.expect("pull").params["w"],
        vec![0.0, 1.0]
    );

    // Health probes carry no token and are answered.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a token");
    assert_eq!(health.into_inner().status, 1, "SERVING");

    // Refusals are counted by reason; the token is nowhere in the metrics.
    let (_, body) = http_get(server.http, "/metrics").await.expect("metrics");
    assert!(!body.contains(TOKEN));
    for reason in ["missing", "wrong_token"] {
        let n = paramd_tests::metric(
            &body,
            "paramd_unauthenticated_calls_total",
            &[("reason", reason)],
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{reason}: {n:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "paramd.v1.ParamServer".into(),
        )),
    ];
    let mut responses = client
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let mut names = Vec::new();
    let mut files = 0;
    while let Some(r) = responses.message().await.expect("response") {
        match r.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                names.extend(l.service.into_iter().map(|s| s.name));
            }
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                files += f.file_descriptor_proto.len();
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }
    for want in [
        "paramd.v1.ParamServer",
        "paramd.v1.Shard",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert!(files >= 1, "no descriptor for paramd.v1.ParamServer");
    server.shutdown().await;
}

/// A CA and certificates signed by it, as PEM files in a directory.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `names` (DNS names or IP addresses): its PEM
    /// certificate and key files.
    fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (c, k) = (
            self.dir.path().join(format!("{stem}.pem")),
            self.dir.path().join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_with_a_token_replays_a_golden_trace() {
    let pki = Pki::new();
    let (server_cert, server_key) = pki.issue("server", &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = pki.issue("client", &["worker"]);
    let token_file = pki.dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");

    let peer_token_file = pki.dir.path().join("peer-token");
    std::fs::write(&peer_token_file, "peer-s3cret\n").expect("write peer token");
    for f in [&token_file, &peer_token_file] {
        use std::os::unix::fs::PermissionsExt;
        // Readable by others, which paramd warns about.
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    let ports = reserve_ports(2);
    let https = |port: &dyn Fn(u16) -> u16| -> Vec<String> {
        ports
            .iter()
            .map(|&p| format!("https://localhost:{}", port(p)))
            .collect()
    };
    let urls = https(&|p| p);
    let peers = https(&peer_port);
    let mut daemons = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let args = [
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--http-listen".into(),
            "127.0.0.1:0".into(),
            "--shard-index".into(),
            i.to_string(),
            "--cluster".into(),
            urls.join(","),
            "--peer-listen".into(),
            format!("127.0.0.1:{}", peer_port(*port)),
            "--peers".into(),
            peers.join(","),
            "--peer-token-file".into(),
            s(&peer_token_file),
            "--chunk-bytes".into(),
            "16".into(),
            "--tls-cert".into(),
            s(&server_cert),
            "--tls-key".into(),
            s(&server_key),
            "--tls-client-ca".into(),
            s(&pki.ca()),
            "--auth-token-file".into(),
            s(&token_file),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        daemons.push(Daemon::start(&args).await.expect("TLS shard starts"));
    }
    for d in &daemons {
        assert!(
            d.log.iter().all(|l| !l.contains(TOKEN)),
            "the token is in the log: {:?}",
            d.log
        );
        // Others can read the token files, and paramd says so.
        for key in ["auth_token_file", "peer_token_file"] {
            assert!(
                d.log
                    .iter()
                    .any(|l| l.contains("can be read by other users") && l.contains(key)),
                "no warning about {key}: {:?}",
                d.log
            );
        }
    }

    // paramctl with the CA, a client certificate and the token replays a
    // trace through both shards.
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/adamw_param_groups.safetensors");
    let out = pki.dir.path().join("result.safetensors");
    let paramctl = |extra: &[String]| {
        let mut c = std::process::Command::new(binary("paramctl"));
        c.args(["--server", &urls[0], "--ca-cert", &s(&pki.ca())])
            .args(extra)
            .env_remove("PARAMD_TOKEN")
            .env_remove("PARAMD_TOKEN_FILE");
        c
    };
    let identity = [
        "--cert".to_owned(),
        s(&client_cert),
        "--key".to_owned(),
        s(&client_key),
    ];
    let mut replay = paramctl(&identity);
    replay
        .args(["--token-file", &s(&token_file), "replay", "--job", "tls"])
        .arg(&trace)
        .arg("--out")
        .arg(&out);
    let done = tokio::task::spawn_blocking(move || replay.output())
        .await
        .expect("join")
        .expect("paramctl replay");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let (want, _) = read_tensors(&std::fs::read(&trace).expect("trace")).expect("parse");
    let (got, _) = read_tensors(&std::fs::read(&out).expect("result")).expect("parse");
    let c = compare(&want, &got, Tolerance::default());
    assert!(c.failures.is_empty() && c.passed > 0, "{:?}", c.failures);

    // The Rust client with the same credentials sees both shards up.
    let creds = Credentials::none()
        .with_token(TOKEN)
        .expect("token")
        .with_tls(&pki.ca(), Some((&client_cert, &client_key)))
        .expect("tls");
    let mut client = Client::connect_with(&urls[0], creds.clone())
        .await
        .expect("connect");
    let status = client.status(Some("tls")).await.expect("status");
    assert!(
        status.jobs[0].shards.iter().all(|s| s.up),
        "{:?}",
        status.jobs[0].shards
    );

    // Without the token: UNAUTHENTICATED.
    let no_token = Credentials::none()
        .with_tls(&pki.ca(), Some((&client_cert, &client_key)))
        .expect("tls");
    let mut c = Client::connect_with(&urls[0], no_token)
        .await
        .expect("connect");
    let e = c.status(None).await.expect_err("no token");
    assert_eq!(code(&e), Some(Code::Unauthenticated), "{e}");

    // Without the CA, with another CA, without a client certificate, or in
    // plaintext: no connection, within the connect timeout.
    let other = Pki::new();
    let attempts: Vec<(&str, paramd_client::Result<Client>)> = vec![
        (
            "no CA",
            Client::connect_with(&urls[0], Credentials::none().with_token(TOKEN).expect("t")).await,
        ),
        (
            "another CA",
            Client::connect_with(
                &urls[0],
                Credentials::none()
                    .with_tls(&other.ca(), Some((&client_cert, &client_key)))
                    .expect("tls"),
            )
            .await,
        ),
        (
            "plaintext",
            Client::connect(&format!("http://localhost:{}", ports[0])).await,
        ),
    ];
    for (what, r) in attempts {
        match r {
            Err(e) => eprintln!("{what}: refused as expected: {e}"),
            Ok(mut c) => {
                // A refused handshake looks like a dropped connection:
                // not tried again here, so the refusal itself is seen.
                c.retries = Some(0);
                let e = c.status(None).await.expect_err(what);
                eprintln!("{what}: refused as expected: {e}");
            }
        }
    }
    // A TLS client without a certificate is refused by mutual TLS.
    let anonymous = Credentials::none()
        .with_token(TOKEN)
        .expect("t")
        .with_tls(&pki.ca(), None)
        .expect("tls");
    if let Ok(mut c) = Client::connect_with(&urls[0], anonymous).await {
        c.retries = Some(0);
        c.status(None).await.expect_err("no client certificate");
    }
    drop(daemons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_before_it_is_buffered() {
    let ports = reserve_ports(1);
    let addr = format!("127.0.0.1:{}", ports[0]);
    let _daemon = Daemon::start(&[
        "--listen",
        &addr,
        "--http-listen",
        "127.0.0.1:0",
        "--max-message-bytes",
        "1048576",
        "--chunk-bytes",
        "65536",
    ])
    .await
    .expect("paramd starts");
    let url = format!("http://{addr}");
    let mut client = Client::connect(&url).await.expect("connect");
    client
        .init("big", sgd_spec(1), &[("w", &[1.0, 2.0])])
        .await
        .expect("init");
    let before = client.status(None).await.expect("status").peak_rss_bytes;

    // One Push message of 128 MiB, far over the 1 MiB limit.
    const SIZE: usize = 128 << 20;
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut raw = pb::param_server_client::ParamServerClient::new(channel)
        .max_encoding_message_size(usize::MAX);
    let msg = pb::PushRequest {
        lease: 0,
        weight: 0.0,
        job: "big".into(),
        worker: 0,
        round: 0,
        grads: vec![pb::Segment {
            dtype: 0,
            param: "w".into(),
            offset: 0,
            data: bytes::Bytes::from(vec![0u8; SIZE]),
        }],
        no_grad: Vec::new(),
    };
    let mut req = tonic::Request::new(futures::stream::iter(vec![msg]));
    req.set_timeout(Duration::from_secs(30));
    let e = raw.push(req).await.expect_err("oversized push");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_message_bytes"), "{e:?}");

    let after = client.status(None).await.expect("status");
    let grew = after.peak_rss_bytes.saturating_sub(before);
    eprintln!(
        "peak RSS {:.1} MiB -> {:.1} MiB",
        before as f64 / 1048576.0,
        after.peak_rss_bytes as f64 / 1048576.0
    );
    assert!(
        grew < (SIZE / 4) as u64,
        "the server's peak RSS grew by {grew} bytes for a refused {SIZE}-byte message"
    );
    // Nothing was applied.
    assert_eq!((after.jobs[0].round, after.jobs[0].workers_pushed), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_duplicate_pushes_keeps_memory_bounded() {
    let ports = reserve_ports(1);
    let addr = format!("127.0.0.1:{}", ports[0]);
    let _daemon = Daemon::start(&["--listen", &addr, "--http-listen", "127.0.0.1:0"])
        .await
        .expect("paramd starts");
    let url = format!("http://{addr}");
    let mut client = Client::connect(&url).await.expect("connect");
    const N: usize = 2 << 20; // 8 MiB of f32 per push
    let mut spec = sgd_spec(2);
    spec.params[0].shape = vec![N as u64];
    let init = vec![0.0f32; N];
    client
        .init("flood", spec, &[("w", &init)])
        .await
        .expect("init");
    let before = client.status(None).await.expect("status").peak_rss_bytes;

    // 32 copies of worker 0's push at once: one is counted, the others are
    // acknowledged as duplicates. Only one is read at a time: a copy that
    // arrives meanwhile is refused (ABORTED) unread, and the client sends
    // it again.
    const COPIES: usize = 32;
    let grad = std::sync::Arc::new(vec![1.0f32; N]);
    let pushes: Vec<_> = (0..COPIES)
        .map(|_| {
            let (mut c, grad) = (client.clone(), std::sync::Arc::clone(&grad));
            tokio::spawn(async move { c.push("flood", 0, 0, &[("w", &grad)]).await })
        })
        .collect();
    let (mut counted, mut duplicates, mut aborted) = (0, 0, 0);
    for p in pushes {
        match p.await.expect("join") {
            Ok(r) if r.duplicate => duplicates += 1,
            Ok(_) => counted += 1,
            Err(e) if code(&e) == Some(Code::Aborted) => aborted += 1,
            Err(e) => panic!("push: {e}"),
        }
    }
    assert_eq!(counted, 1, "{duplicates} duplicates, {aborted} refused");
    assert_eq!(duplicates + aborted, COPIES - 1);
    let after = client.status(None).await.expect("status");
    let grew = after.peak_rss_bytes.saturating_sub(before);
    eprintln!(
        "{COPIES} pushes of {} MiB ({duplicates} duplicates, {aborted} refused): peak RSS {:.1} MiB -> {:.1} MiB",
        (N * 4) >> 20,
        before as f64 / 1048576.0,
        after.peak_rss_bytes as f64 / 1048576.0
    );
    // Read all at once they would take COPIES x 8 MiB = 256 MiB.
    assert!(
        grew < (COPIES * N * 4 / 2) as u64,
        "peak RSS grew by {} MiB",
        grew >> 20
    );
    assert_eq!(after.jobs[0].workers_pushed, 1);
    client
        .push("flood", 1, 0, &[("w", &grad)])
        .await
        .expect("worker 1");
    assert_eq!(client.pull("flood", 1).await.expect("round 0").round, 1);
}
