//! The HTTP port: the status page and its JSON API, Prometheus metrics, and
//! probes for agents that speak HTTP. Everything here only reads; its
//! exposure is that of `/metrics` (see the README on binding it).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::Node;
use crate::error::Error;
use crate::job::history::Entry;

/// The status page: its document, script and style, embedded in the
/// binary (nothing is fetched from elsewhere).
pub const PAGE: &str = include_str!("status/index.html");
pub const SCRIPT: &str = include_str!("status/status.js");
pub const STYLE: &str = include_str!("status/status.css");

/// The page may load only its own script, style and API: a value that
/// slipped through unescaped still could not run.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      connect-src 'self'; img-src 'self'; base-uri 'none'; \
                      form-action 'none'; frame-ancestors 'none'";

/// Most history entries one request returns; a longer history is thinned
/// (`every`) by the client.
const MAX_HISTORY: usize = 20_000;

/// Routes of the HTTP port: `/` (the status page), `/api/v1/...` (its JSON
/// API), `/metrics`, `/healthz` (the process is up) and `/readyz` (503
/// until checkpoints are restored).
pub fn router(handle: PrometheusHandle, node: Arc<Node>) -> Router {
    let scraped = Arc::clone(&node);
    let ready_node = Arc::clone(&node);
    let ready = move || ready_node.is_ready();
    let (all, one, history) = (Arc::clone(&node), Arc::clone(&node), node);
    Router::new()
        .route(
            "/",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/status.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/status.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/api/v1/jobs",
            get(move || {
                let node = Arc::clone(&all);
                async move {
                    match super::param_server::status(&node, "").await {
                        Ok(s) => json_response(StatusCode::OK, &paramd_proto::json::status(&s)),
                        Err(e) => error_response(&e),
                    }
                }
            }),
        )
        .route(
            "/api/v1/jobs/{job}",
            get(move |Path(job): Path<String>| {
                let node = Arc::clone(&one);
                async move {
                    if job.is_empty() {
                        return error_response(&Error::NotFound("no job named".into()));
                    }
                    match super::param_server::status(&node, &job).await {
                        Ok(s) => match s.jobs.first() {
                            Some(j) => json_response(StatusCode::OK, &paramd_proto::json::job(j)),
                            None => error_response(&Error::NotFound(format!("no job '{job}'"))),
                        },
                        Err(e) => error_response(&e),
                    }
                }
            }),
        )
        .route(
            "/api/v1/jobs/{job}/history",
            get(move |Path(job): Path<String>, RawQuery(query): RawQuery| {
                let node = Arc::clone(&history);
                async move { history_response(&node, &job, query.as_deref()) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let jobs = scraped.jobs();
                // Memberships whose lease ran out end before the scrape
                // counts the members.
                jobs.iter().for_each(|j| j.expire_leases());
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

/// An embedded file of the page, never framed or sniffed as another type.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn json_response(code: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = (code, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `{"error": ..., "reason": ...}` with the HTTP code closest to the
/// error's gRPC code.
fn error_response(e: &Error) -> Response {
    let code = match e.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(
        code,
        &json!({ "error": e.to_string(), "reason": e.reason() }),
    )
}

/// `since` (the first round wanted, default 0) and `every` (one entry in
/// `every`, default 1) from a query string.
fn history_query(query: Option<&str>) -> Result<(u64, usize), Error> {
    let (mut since, mut every) = (0u64, 1usize);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || {
            let shown: String = pair.chars().take(64).collect();
            Error::Invalid(format!(
                "history query '{shown}': since and every take a whole number"
            ))
        };
        match key {
            "since" => since = value.parse().map_err(|_| bad())?,
            "every" => every = value.parse().map_err(|_| bad())?,
            _ => return Err(bad()),
        }
    }
    Ok((since, every.max(1)))
}

fn history_response(node: &Node, job: &str, query: Option<&str>) -> Response {
    let (since, every) = match history_query(query) {
        Ok(q) => q,
        Err(e) => return error_response(&e),
    };
    let job = match node.job(job) {
        Ok(j) => j,
        Err(e) => return error_response(&e),
    };
    let mut rounds = job.history(since, every);
    // Thinned further rather than cut: the chart keeps its whole span.
    if rounds.len() > MAX_HISTORY {
        let step = rounds.len().div_ceil(MAX_HISTORY);
        let last = rounds.len() - 1;
        rounds = rounds
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i.is_multiple_of(step) || *i == last)
            .map(|(_, e)| e)
            .collect();
    }
    let body = history_json(&job.name, job.config.groups.len(), job.config.clip, &rounds);
    json_response(StatusCode::OK, &body)
}

/// The body of `/api/v1/jobs/JOB/history`.
pub fn history_json(
    job: &str,
    groups: usize,
    max_norm: Option<f64>,
    rounds: &[Entry],
) -> serde_json::Value {
    json!({
        "job": job,
        "groups": groups,
        "max_norm": max_norm,
        "rounds": rounds,
    })
}
