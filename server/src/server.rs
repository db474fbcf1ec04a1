//! Serving: the listeners, TLS, the workers' and peers' services, health,
//! restore, and one shutdown deadline for the final checkpoint and the
//! drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use paramd_proto::v1::param_server_server::ParamServerServer;
use paramd_proto::v1::shard_server::ShardServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

use crate::api::pull_frames::PullFrames;
use crate::api::{auth, http, listen, param_server, shard};
use crate::metrics;
use crate::node::{Node, NodeConfig};

pub use paramd_proto::transport::MAX_FRAME;

/// Marks the whole server and the ParamServer service SERVING or
/// NOT_SERVING.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_service_status("paramd.v1.ParamServer", status)
        .await;
}

/// With a checkpoint directory: the coordinator checkpoints every job
/// before stopping, and the other shards of a cluster wait for it to have
/// done so (see `Node::final_checkpoint`), within the grace period, so that
/// SIGTERM sent to every shard at once still leaves a consistent final
/// checkpoint. Failures are logged.
async fn final_checkpoint(node: &Node, deadline: tokio::time::Instant, grace: Duration) {
    if node.cluster.checkpoints.is_none() || node.jobs().is_empty() {
        return;
    }
    match tokio::time::timeout_at(deadline, node.final_checkpoint()).await {
        Ok(Ok(jobs)) => tracing::info!(jobs, "final checkpoint taken"),
        Ok(Err(e)) => tracing::error!(error = %e, "final checkpoint failed"),
        Err(_) => tracing::error!(
            grace_secs = grace.as_secs_f64(),
            "final checkpoint did not finish within the grace period"
        ),
    }
}

/// The sockets a daemon serves on, bound before it starts.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC for workers and operators: ParamServer, health, reflection.
    pub grpc: TcpListener,
    /// HTTP: /metrics, /healthz and /readyz.
    pub http: TcpListener,
    /// gRPC for the other shards only: the Shard service. A cluster of
    /// more than one shard needs it; a one-shard daemon has none.
    pub peer: Option<TcpListener>,
}

/// A gRPC server with paramd's transport settings and `tls`.
fn grpc_builder(
    tls: Option<tonic::transport::ServerTlsConfig>,
    windows: paramd_proto::transport::Http2Windows,
) -> anyhow::Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    Ok(builder
        .initial_stream_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .max_frame_size(MAX_FRAME))
}

/// Serves the workers' gRPC, the peers' gRPC and metrics on `listeners`
/// until `shutdown` resolves, then takes the final checkpoint, stops
/// accepting calls and returns once in-flight calls finished or `grace`
/// passed since `shutdown` resolved, whichever is first.
pub async fn serve(
    listeners: Listeners,
    config: NodeConfig,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Listeners { grpc, http, peer } = listeners;
    let clustered = config.cluster.len() > 1;
    match (&peer, clustered) {
        (None, true) => anyhow::bail!(
            "a cluster of {} shards needs a peer listener for the shard-to-shard service",
            config.cluster.len()
        ),
        (Some(_), false) => anyhow::bail!("a one-shard daemon serves no shard-to-shard service"),
        _ => {}
    }
    let handle = metrics::install();
    let max_message = config.max_message_bytes;
    let auth = auth::Authenticate(config.auth_token.clone());
    let peer_auth = auth::Authenticate(config.peer_token.clone());
    let tls = config.tls.clone();
    let peer_tls = config.peer_tls.clone();
    let concurrency = config.max_concurrent_requests;
    let max_connections = config.max_connections;
    let windows = config.windows;
    let node = Arc::new(Node::new(config)?);
    // Every service but health checks the token on the call's headers,
    // before any message is decoded; messages over the limit are refused
    // from their length prefix, before they are buffered.
    let service = InterceptedService::new(
        PullFrames::new(
            ParamServerServer::new(param_server::Service::new(Arc::clone(&node)))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            param_server::Service::new(Arc::clone(&node)),
            max_message,
        ),
        auth.clone(),
    );
    let reflection = InterceptedService::new(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(paramd_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?,
        auth,
    );
    // The standard gRPC health service: NOT_SERVING until the checkpoints
    // are restored, and again once shutdown starts. Probes carry no token,
    // so it is open.
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, false).await;

    // Once shutdown starts: when it must be over. One deadline covers the
    // final checkpoint and the calls in flight together.
    let (stop_tx, stop_rx) = watch::channel(None::<tokio::time::Instant>);
    let stopped = |mut rx: watch::Receiver<Option<tokio::time::Instant>>| async move {
        // An error means the sender is gone: stop as well.
        let _ = rx.wait_for(Option::is_some).await;
    };
    let grpc_server = grpc_builder(tls, windows)?
        .concurrency_limit_per_connection(concurrency)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(
            listen::incoming(grpc, max_connections),
            stopped(stop_rx.clone()),
        );
    // The shard-to-shard service: on its own address, with its own token
    // (and with TLS, certificates of the peer CA only), so that no worker
    // credential can reach it.
    let peer_server = match peer {
        Some(peer) => {
            let shard_service = InterceptedService::new(
                ShardServer::new(shard::ShardService::new(Arc::clone(&node)))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
                peer_auth,
            );
            let server = grpc_builder(peer_tls, windows)?
                .add_service(shard_service)
                .serve_with_incoming_shutdown(
                    listen::incoming(peer, max_connections),
                    stopped(stop_rx.clone()),
                );
            futures::future::Either::Left(server)
        }
        None => futures::future::Either::Right(std::future::ready(Ok(()))),
    };
    let ready_node = Arc::clone(&node);
    let http_server = axum::serve(http, http::router(handle, ready_node))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let servers = async {
        tokio::try_join!(
            async { grpc_server.await.map_err(anyhow::Error::from) },
            async { peer_server.await.map_err(anyhow::Error::from) },
            async { http_server.await.map_err(anyhow::Error::from) }
        )
    };
    // Restore while the ports already answer (UNAVAILABLE, NOT_SERVING).
    let restore_node = Arc::clone(&node);
    let restore_health = health.clone();
    let restore = async move {
        let restored = tokio::task::spawn_blocking(move || restore_node.restore()).await;
        match restored {
            Ok(Ok(())) => {
                set_health(&restore_health, true).await;
                tracing::info!("paramd ready");
                std::future::pending::<anyhow::Result<()>>().await
            }
            Ok(Err(e)) => Err(anyhow::anyhow!("cannot restore the checkpoints: {e}")),
            Err(e) => Err(anyhow::anyhow!("checkpoint restore panicked: {e}")),
        }
    };
    let last_node = Arc::clone(&node);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        set_health(&health, false).await;
        let deadline = tokio::time::Instant::now() + grace;
        final_checkpoint(&last_node, deadline, grace).await;
        let _ = stop_tx.send(Some(deadline));
    });
    let deadline = async {
        let mut rx = stop_rx;
        let deadline = match rx.wait_for(Option::is_some).await {
            Ok(d) => *d,
            Err(_) => None,
        };
        if let Some(deadline) = deadline {
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = servers => { r?; }
        r = restore => { r?; }
        () = deadline => { tracing::warn!(grace_secs = grace.as_secs_f64(), "grace period over, exiting with calls in flight"); }
    }
    Ok(())
}
