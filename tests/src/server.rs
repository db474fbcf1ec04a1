//! In-process servers: one paramd, or the shards of a cluster, on loopback
//! ports the OS picked.

use std::net::SocketAddr;
use std::time::Duration;

use paramd::NodeConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A paramd serving in this process on `127.0.0.1:0`, shut down on drop.
#[derive(Debug)]
pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The shard-to-shard service's address, on a cluster's shard.
    pub peer: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with default settings.
    pub async fn start() -> TestServer {
        Self::with_config(NodeConfig::default()).await
    }

    /// Starts a server with `config`. The listeners are bound before the
    /// server task starts, so the addresses accept connections at once.
    pub async fn with_config(config: NodeConfig) -> TestServer {
        TestServer::serve(listeners(false).await, config)
    }

    fn serve(listeners: paramd::Listeners, config: NodeConfig) -> TestServer {
        let (grpc_addr, http_addr) = (
            listeners.grpc.local_addr().expect("addr"),
            listeners.http.local_addr().expect("addr"),
        );
        let peer = listeners
            .peer
            .as_ref()
            .map(|p| p.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(paramd::serve(
            listeners,
            config,
            Duration::from_secs(5),
            async {
                let _ = stopped.await;
            },
        ));
        TestServer {
            grpc: grpc_addr,
            http: http_addr,
            peer,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The gRPC URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A connected client.
    pub async fn client(&self) -> paramd_client::Client {
        paramd_client::Client::connect(&self.url())
            .await
            .expect("connect")
    }

    /// Stops the server and waits until it has returned.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Listeners on loopback ports the OS picks, with a peer listener when
/// the server is a shard of a cluster of more than one.
async fn listeners(peer: bool) -> paramd::Listeners {
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
    paramd::Listeners {
        grpc: bind().await,
        http: bind().await,
        peer: if peer { Some(bind().await) } else { None },
    }
}

/// Several in-process shards forming one cluster, listeners bound before
/// any server starts so that every shard's address is known up front.
#[derive(Debug)]
pub struct TestCluster {
    pub shards: Vec<TestServer>,
}

impl TestCluster {
    /// Starts `n` shards with `config` (its cluster fields are filled in).
    pub async fn start(n: usize, config: NodeConfig) -> TestCluster {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(listeners(n > 1).await);
        }
        let url = |l: &TcpListener| format!("http://{}", l.local_addr().expect("addr"));
        let urls: Vec<String> = all.iter().map(|l| url(&l.grpc)).collect();
        let peers: Vec<String> = all
            .iter()
            .filter_map(|l| l.peer.as_ref().map(url))
            .collect();
        let mut shards = Vec::new();
        for (i, listeners) in all.into_iter().enumerate() {
            let config = NodeConfig {
                shard_index: i,
                cluster: urls.clone(),
                peers: peers.clone(),
                ..config.clone()
            };
            shards.push(TestServer::serve(listeners, config));
        }
        TestCluster { shards }
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        self.shards[0].url()
    }

    /// Stops every shard.
    pub async fn shutdown(self) {
        for s in self.shards {
            s.shutdown().await;
        }
    }
}

/// Runs `check` against a one-shard server and against a three-shard
/// cluster of 2-element chunks (every parameter spread over the shards),
/// and requires both to give the same result, which it returns.
pub async fn on_one_and_three_shards<T, F, Fut>(check: F) -> T
where
    F: Fn(paramd_client::Client) -> Fut,
    Fut: std::future::Future<Output = T>,
    T: PartialEq + std::fmt::Debug,
{
    let one = TestServer::start().await;
    let on_one = check(one.client().await).await;
    let config = NodeConfig {
        chunk_bytes: 8,
        ..NodeConfig::default()
    };
    let three = TestCluster::start(3, config).await;
    let c = paramd_client::Client::connect(&three.url())
        .await
        .expect("connect");
    let on_three = check(c).await;
    assert_eq!(on_one, on_three, "1 and 3 shards differ");
    on_one
}
