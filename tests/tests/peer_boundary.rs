//! The shard-to-shard service is closed to workers: it is not served on
//! the workers' address at all (not even by a one-shard daemon), and on its
//! own address it takes only the peer token, never the workers'. Forged
//! peer calls change nothing: the job's status and parameters stay
//! bit-identical and training goes on.

use std::net::SocketAddr;
use std::time::Duration;

use paramd::NodeConfig;
use paramd::auth::AuthToken;
use paramd_client::v1 as pb;
use paramd_client::v1::shard_client::ShardClient;
use paramd_client::{Client, Credentials};
use paramd_proto::transport::AuthChannel;
use paramd_tests::{TestCluster, TestServer, binary, one_param_spec};
use tonic::Code;

const WORKER_TOKEN: &str = "worker-s3cret";
const PEER_TOKEN: &str = "peer-s3cret";

/// A Shard client of `addr` presenting `token`, if any.
fn shard_client(addr: SocketAddr, token: Option<&str>) -> ShardClient<AuthChannel> {
    let mut credentials = Credentials::none();
    if let Some(t) = token {
        credentials = credentials.with_token(t).expect("a token");
    }
    let endpoint = credentials
        .endpoint(&format!("http://{addr}"), Duration::from_secs(10))
        .expect("endpoint")
        .timeout(Duration::from_secs(10));
    ShardClient::new(credentials.wrap(endpoint.connect_lazy()))
}

/// Every kind of forged peer call a hostile worker could make against job
/// `job`, each with the code it got.
async fn forge(c: &mut ShardClient<AuthChannel>, job: &str) -> Vec<(&'static str, Code)> {
    let mut got = Vec::new();
    got.push((
        "report",
        code(
            c.report(pb::ReportRequest {
                job: job.into(),
                round: 2,
                shard: 1,
                chunks: vec![0],
                sum_squares: vec![1e30],
                non_finite: false,
                ..Default::default()
            })
            .await,
        ),
    ));
    got.push((
        "members",
        code(
            c.members(pb::MembersRequest {
                leases: Vec::new(),
                job: job.into(),
                round: 2,
                shard: 1,
                workers: vec![0],
            })
            .await,
        ),
    ));
    got.push((
        "adopt",
        code(
            c.adopt(pb::AdoptRequest {
                job: job.into(),
                round: 0,
            })
            .await,
        ),
    ));
    got.push((
        "commit_shard",
        code(
            c.commit_shard(pb::CommitShardRequest {
                job: job.into(),
                round: 1,
                manifest: Some(pb::Manifest::default()),
            })
            .await,
        ),
    ));
    got.push((
        "save_shard",
        code(
            c.save_shard(pb::SaveShardRequest {
                job: job.into(),
                round: 2,
            })
            .await,
        ),
    ));
    got.push((
        "restorable",
        code(
            c.restorable(pb::RestorableRequest { job: job.into() })
                .await,
        ),
    ));
    got.push((
        "shard_status",
        code(
            c.shard_status(pb::ShardStatusRequest { job: job.into() })
                .await,
        ),
    ));
    let create = pb::CreateShardRequest {
        job: "forged".into(),
        shard: 0,
        spec: Some(one_param_spec(pb::OptimizerKind::Sgd, &[1 << 20], 1, 0.1)),
        layout: Some(pb::LayoutResponse {
            chunk_elems: 1,
            ..Default::default()
        }),
        values: Vec::new(),
    };
    got.push((
        "create_shard",
        code(c.create_shard(futures::stream::iter([create])).await),
    ));
    got.push((
        "drop_shard",
        code(c.drop_shard(pb::DropShardRequest { job: job.into() }).await),
    ));
    got
}

/// The code a call ended with.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn assert_all(got: &[(&str, Code)], want: Code, what: &str) {
    for (call, code) in got {
        assert_eq!(*code, want, "{call} {what}");
    }
}

/// What a worker sees of job `job`: its status and its parameters' bits.
async fn snapshot(c: &mut Client, job: &str) -> (pb::StatusResponse, Vec<u32>) {
    let mut status = c.status(Some(job)).await.expect("status");
    // The process's memory is not the job's state.
    (status.rss_bytes, status.peak_rss_bytes) = (0, 0);
    let round = status.jobs[0].round;
    let pulled = c.pull(job, round).await.expect("pull");
    let bits = pulled.params["w"].iter().map(|v| v.to_bits()).collect();
    (status, bits)
}

async fn round(c: &mut Client, job: &str, round: u64) {
    c.push(job, 0, round, &[("w", &[0.5; 8])])
        .await
        .expect("push");
    c.pull(job, round + 1).await.expect("pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_peer_calls_reach_nothing_and_change_nothing() {
    let config = NodeConfig {
        chunk_bytes: 8,
        auth_token: Some(AuthToken::new(WORKER_TOKEN)),
        peer_token: Some(AuthToken::new(PEER_TOKEN)),
        peer_credentials: Credentials::none().with_token(PEER_TOKEN).expect("a token"),
        ..NodeConfig::default()
    };
    let cluster = TestCluster::start(2, config).await;
    let worker = Credentials::none()
        .with_token(WORKER_TOKEN)
        .expect("a token");
    let mut c = Client::connect_with(&cluster.url(), worker)
        .await
        .expect("connect");
    let job = "run";
    c.init(
        job,
        one_param_spec(pb::OptimizerKind::Sgd, &[8], 1, 0.1),
        &[("w", &[1.0; 8])],
    )
    .await
    .expect("init");
    for r in 0..3 {
        round(&mut c, job, r).await;
    }
    let before = snapshot(&mut c, job).await;
    assert_eq!(before.0.jobs[0].round, 3);

    for shard in &cluster.shards {
        // The workers' address does not serve the Shard service at all,
        // whatever token the call carries.
        for token in [Some(WORKER_TOKEN), Some(PEER_TOKEN), None] {
            let got = forge(&mut shard_client(shard.grpc, token), job).await;
            assert_all(&got, Code::Unimplemented, "on the workers' address");
        }
        // The peer address takes neither the workers' token nor none.
        let peer = shard.peer.expect("a cluster's shard has a peer address");
        for token in [Some(WORKER_TOKEN), None] {
            let got = forge(&mut shard_client(peer, token), job).await;
            assert_all(&got, Code::Unauthenticated, "without the peer token");
        }
    }
    // The peer token opens it, and a call naming a shard the cluster does
    // not have is refused for what it is.
    let mut peer = shard_client(cluster.shards[0].peer.expect("peer"), Some(PEER_TOKEN));
    let status = peer
        .report(pb::ReportRequest {
            job: job.into(),
            round: 3,
            shard: 7,
            ..Default::default()
        })
        .await
        .expect_err("no shard 7");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("shard 7"), "{status:?}");

    // Nothing changed, and training goes on.
    assert_eq!(snapshot(&mut c, job).await, before);
    round(&mut c, job, 3).await;
    assert_eq!(snapshot(&mut c, job).await.0.jobs[0].round, 4);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shard_daemon_serves_no_shard_service() {
    let server = TestServer::start().await;
    assert!(server.peer.is_none());
    let mut c = server.client().await;
    c.init(
        "run",
        one_param_spec(pb::OptimizerKind::Sgd, &[8], 1, 0.1),
        &[("w", &[1.0; 8])],
    )
    .await
    .expect("init");
    round(&mut c, "run", 0).await;
    let before = snapshot(&mut c, "run").await;
    let got = forge(&mut shard_client(server.grpc, None), "run").await;
    assert_all(&got, Code::Unimplemented, "on a one-shard daemon");
    assert_eq!(snapshot(&mut c, "run").await, before);
    server.shutdown().await;
}

/// `paramd --print-config ARGS` fails with exit code 64 and a message
/// naming `key`.
fn refused(args: &[&str], key: &str) {
    let out = std::process::Command::new(binary("paramd"))
        .arg("--print-config")
        .args(args)
        .env_clear()
        .output()
        .expect("run paramd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(stderr.contains(key), "{args:?} should name {key}: {stderr}");
}

#[test]
fn a_cluster_without_a_closed_peer_address_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let worker = dir.path().join("token");
    std::fs::write(&worker, WORKER_TOKEN).expect("write");
    let same = dir.path().join("same");
    std::fs::write(&same, WORKER_TOKEN).expect("write");
    let (worker, same) = (
        worker.to_str().expect("utf-8"),
        same.to_str().expect("utf-8"),
    );
    let cluster = ["--cluster", "http://a:1,http://b:1"];
    let peers = [
        "--peer-listen",
        "127.0.0.1:2",
        "--peers",
        "http://a:2,http://b:2",
    ];
    refused(&cluster, "peer_listen");
    refused(
        &[&cluster[..], &["--peer-listen", "127.0.0.1:2"]].concat(),
        "peers",
    );
    refused(
        &[
            &cluster[..],
            &[
                "--peer-listen",
                "127.0.0.1:2",
                "--peers",
                "http://a:1,http://b:1",
            ],
        ]
        .concat(),
        "peers[0]",
    );
    refused(
        &[&cluster[..], &peers, &["--auth-token-file", worker]].concat(),
        "peer_token_file",
    );
    refused(
        &[
            &cluster[..],
            &peers,
            &["--auth-token-file", worker, "--peer-token-file", same],
        ]
        .concat(),
        "peer_token_file",
    );
    refused(&["--peer-listen", "127.0.0.1:2"], "peer_listen");
}
