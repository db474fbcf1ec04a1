//! Prometheus metrics: every name declared once, with its unit, and the
//! per-job handles resolved once per job so a round allocates no labels.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds buckets for latencies, from 100 µs to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns the
/// handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    // Fails only if another recorder was installed first, as
                    // in a test process embedding something else; rendering
                    // then shows nothing, which the tests would notice.
                    let _ = metrics::set_global_recorder(recorder);
                    describe();
                    handle
                }
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

fn describe() {
    describe_gauge!(
        "paramd_build_info",
        "Always 1; the labels give the version of this paramd"
    );
    describe_gauge!(
        "paramd_learning_rate",
        "Learning rate of a param group in the last round"
    );
    describe_gauge!(
        "paramd_grad_norm",
        "Global L2 norm of the mean gradient of the last round, before clipping"
    );
    describe_gauge!(
        "paramd_grad_norm_clipped",
        "Global L2 norm of the gradient the last round applied, after clipping (0 if skipped)"
    );
    describe_gauge!(
        "paramd_grad_clip_coefficient",
        "Factor the last round's gradient was multiplied by (1: not clipped)"
    );
    describe_gauge!(
        "paramd_optimizer_step",
        Unit::Count,
        "Optimizer updates applied"
    );
    describe_gauge!("paramd_round", Unit::Count, "Rounds completed");
    describe_counter!(
        "paramd_rounds_total",
        Unit::Count,
        "Rounds completed by this process, applied or skipped"
    );
    describe_gauge!(
        "paramd_workers_expected",
        Unit::Count,
        "Workers a round waits for"
    );
    describe_gauge!(
        "paramd_workers_pushed",
        Unit::Count,
        "Workers that pushed for the round being collected"
    );
    describe_gauge!("paramd_jobs", Unit::Count, "Jobs held by this process");
    describe_gauge!(
        "paramd_process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of this process"
    );
    describe_gauge!(
        "paramd_process_peak_resident_memory_bytes",
        Unit::Bytes,
        "Peak resident memory of this process"
    );
    describe_gauge!(
        "paramd_shard_chunks",
        Unit::Count,
        "Chunks of the job held by this shard"
    );
    describe_gauge!(
        "paramd_shard_parameter_bytes",
        Unit::Bytes,
        "Bytes of parameters held by this shard"
    );
    describe_gauge!(
        "paramd_shard_optimizer_state_bytes",
        Unit::Bytes,
        "Bytes of optimizer state held by this shard"
    );
    describe_counter!(
        "paramd_rounds_skipped_total",
        Unit::Count,
        "Rounds skipped because the gradient was not finite"
    );
    describe_counter!(
        "paramd_pushes_total",
        Unit::Count,
        "Pushes counted towards a round (retries excluded)"
    );
    describe_counter!(
        "paramd_workers_dropped_total",
        Unit::Count,
        "Workers left out of a round after the worker timeout"
    );
    describe_histogram!(
        "paramd_checkpoint_duration_seconds",
        Unit::Seconds,
        "Time to take a checkpoint on every shard"
    );
    describe_counter!(
        "paramd_checkpoint_failures_total",
        Unit::Count,
        "Checkpoints that could not be taken"
    );
    describe_counter!(
        "paramd_round_failures_total",
        Unit::Count,
        "Failed attempts to complete a round on this shard (retried; the job is held if it cannot be)"
    );
    describe_gauge!(
        "paramd_checkpoint_last_round",
        Unit::Count,
        "Round of the newest complete checkpoint taken by this process"
    );
    describe_gauge!(
        "paramd_checkpoint_last_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the newest complete checkpoint taken by this process"
    );
    describe_counter!(
        "paramd_stale_pushes_total",
        Unit::Count,
        "Pushes for a round that had already completed"
    );
    describe_counter!(
        "paramd_duplicate_pushes_total",
        Unit::Count,
        "Retried pushes acknowledged without counting again"
    );
    describe_counter!(
        "paramd_refused_pushes_total",
        Unit::Count,
        "Pushes refused, by reason"
    );
    describe_counter!(
        "paramd_accept_errors_total",
        Unit::Count,
        "Connections that could not be accepted (file descriptors or memory ran out); accepting pauses and tries again"
    );
    describe_counter!(
        "paramd_unauthenticated_calls_total",
        Unit::Count,
        "Calls refused for a missing or wrong bearer token, by reason"
    );
    describe_counter!(
        "paramd_push_bytes_total",
        Unit::Bytes,
        "Gradient bytes received in counted pushes"
    );
    describe_counter!(
        "paramd_pull_bytes_total",
        Unit::Bytes,
        "Parameter bytes served by pulls"
    );
    describe_histogram!(
        "paramd_push_duration_seconds",
        Unit::Seconds,
        "Time to receive and validate a push"
    );
    describe_histogram!(
        "paramd_pull_wait_seconds",
        Unit::Seconds,
        "Time a pull waited for its round"
    );
    describe_histogram!(
        "paramd_barrier_wait_seconds",
        Unit::Seconds,
        "Time from a round's first push to its last: how long early workers wait"
    );
    describe_histogram!(
        "paramd_coordinator_shard_wait_seconds",
        Unit::Seconds,
        "Time the coordinator waited for every shard's report of a round"
    );
    describe_histogram!(
        "paramd_apply_duration_seconds",
        Unit::Seconds,
        "Time to reduce and apply a round"
    );
    gauge!("paramd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Resident and peak resident bytes of this process (Linux; zeros
/// elsewhere).
pub fn process_memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Sets the gauges read at scrape time: jobs held and process memory.
pub fn before_scrape(jobs: usize) {
    gauge!("paramd_jobs").set(jobs as f64);
    let (rss, peak) = process_memory();
    gauge!("paramd_process_resident_memory_bytes").set(rss as f64);
    gauge!("paramd_process_peak_resident_memory_bytes").set(peak as f64);
}

/// A call refused for its credentials, counted by reason.
pub fn unauthenticated(reason: &'static str) {
    counter!("paramd_unauthenticated_calls_total", "reason" => reason).increment(1);
}

/// An accept that failed for want of a resource (file descriptors, memory).
pub fn accept_error() {
    counter!("paramd_accept_errors_total").increment(1);
}

/// A refused push, counted by reason.
pub fn refused(job: &str, reason: &'static str) {
    counter!("paramd_refused_pushes_total", "job" => job.to_owned(), "reason" => reason)
        .increment(1);
}

/// Handles of one job's series.
#[derive(Debug)]
pub struct JobMetrics {
    pub lr: Vec<Gauge>,
    pub grad_norm: Gauge,
    pub grad_norm_clipped: Gauge,
    pub clip_coefficient: Gauge,
    pub step: Gauge,
    pub round: Gauge,
    pub rounds: Counter,
    pub workers_expected: Gauge,
    pub workers_pushed: Gauge,
    pub parameter_bytes: Gauge,
    pub state_bytes: Gauge,
    pub chunks: Gauge,
    pub shard_wait: Histogram,
    pub skipped: Counter,
    pub pushes: Counter,
    pub duplicates: Counter,
    pub dropped: Counter,
    pub checkpoint_duration: Histogram,
    pub checkpoint_failures: Counter,
    pub round_failures: Counter,
    pub checkpoint_round: Gauge,
    pub checkpoint_timestamp: Gauge,
    pub stale: Counter,
    pub push_bytes: Counter,
    pub pull_bytes: Counter,
    pub push_duration: Histogram,
    pub pull_wait: Histogram,
    pub barrier_wait: Histogram,
    pub apply_duration: Histogram,
}

impl JobMetrics {
    /// Resolves the series of job `job` with `groups` param groups.
    pub fn new(job: &str, groups: usize) -> JobMetrics {
        let j = job.to_owned();
        JobMetrics {
            lr: (0..groups)
                .map(|g| gauge!("paramd_learning_rate", "job" => j.clone(), "group" => g.to_string()))
                .collect(),
            grad_norm: gauge!("paramd_grad_norm", "job" => j.clone()),
            grad_norm_clipped: gauge!("paramd_grad_norm_clipped", "job" => j.clone()),
            clip_coefficient: gauge!("paramd_grad_clip_coefficient", "job" => j.clone()),
            step: gauge!("paramd_optimizer_step", "job" => j.clone()),
            round: gauge!("paramd_round", "job" => j.clone()),
            rounds: counter!("paramd_rounds_total", "job" => j.clone()),
            workers_expected: gauge!("paramd_workers_expected", "job" => j.clone()),
            workers_pushed: gauge!("paramd_workers_pushed", "job" => j.clone()),
            parameter_bytes: gauge!("paramd_shard_parameter_bytes", "job" => j.clone()),
            state_bytes: gauge!("paramd_shard_optimizer_state_bytes", "job" => j.clone()),
            chunks: gauge!("paramd_shard_chunks", "job" => j.clone()),
            shard_wait: histogram!("paramd_coordinator_shard_wait_seconds", "job" => j.clone()),
            skipped: counter!("paramd_rounds_skipped_total", "job" => j.clone()),
            pushes: counter!("paramd_pushes_total", "job" => j.clone()),
            duplicates: counter!("paramd_duplicate_pushes_total", "job" => j.clone()),
            dropped: counter!("paramd_workers_dropped_total", "job" => j.clone()),
            checkpoint_duration: histogram!("paramd_checkpoint_duration_seconds", "job" => j.clone()),
            checkpoint_failures: counter!("paramd_checkpoint_failures_total", "job" => j.clone()),
            round_failures: counter!("paramd_round_failures_total", "job" => j.clone()),
            checkpoint_round: gauge!("paramd_checkpoint_last_round", "job" => j.clone()),
            checkpoint_timestamp: gauge!("paramd_checkpoint_last_timestamp_seconds", "job" => j.clone()),
            stale: counter!("paramd_stale_pushes_total", "job" => j.clone()),
            push_bytes: counter!("paramd_push_bytes_total", "job" => j.clone()),
            pull_bytes: counter!("paramd_pull_bytes_total", "job" => j.clone()),
            push_duration: histogram!("paramd_push_duration_seconds", "job" => j.clone()),
            pull_wait: histogram!("paramd_pull_wait_seconds", "job" => j.clone()),
            barrier_wait: histogram!("paramd_barrier_wait_seconds", "job" => j.clone()),
            apply_duration: histogram!("paramd_apply_duration_seconds", "job" => j),
        }
    }
}
