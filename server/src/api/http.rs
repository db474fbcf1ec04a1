//! The HTTP port: Prometheus metrics and probes for agents that speak HTTP.

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::Node;

/// Routes of the HTTP port: `/metrics`, `/healthz` (the process is up) and
/// `/readyz` (503 until checkpoints are restored).
pub fn router(handle: PrometheusHandle, node: Arc<Node>) -> Router {
    let scraped = Arc::clone(&node);
    let ready = move || node.is_ready();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let jobs = scraped.jobs();
                crate::metrics::before_scrape(jobs.iter().map(|j| &j.metrics));
                let live = jobs
                    .iter()
                    .map(|j| (j.name.clone(), j.metrics.incarnation))
                    .collect();
                std::future::ready(crate::metrics::live_only(&handle.render(), &live))
            }),
        )
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
