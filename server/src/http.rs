//! The HTTP port: Prometheus metrics and probes for agents that speak HTTP.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

/// Routes of the HTTP port: `/metrics`, `/healthz` (the process is up) and
/// `/readyz` (503 until checkpoints are restored).
pub fn router(
    handle: PrometheusHandle,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> Router {
    Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/readyz",
            get(move || {
                let r = if ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "restoring checkpoints\n")
                };
                std::future::ready(r)
            }),
        )
}
