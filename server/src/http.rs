//! The HTTP port: Prometheus metrics and probes for agents that speak HTTP.

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

/// Routes of the HTTP port: `/metrics`, `/healthz`, `/readyz`.
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route("/readyz", get(|| std::future::ready("ok\n")))
}
