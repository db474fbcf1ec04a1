//! Prometheus metrics: every name declared once, with its unit, and the
//! per-job handles resolved once per job so a round allocates no labels.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use paramd_proto::wire::DTYPES;

/// Seconds buckets for latencies, from 100 µs to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// A series nothing touched for this long is dropped from the recorder at
/// the next scrape. Every live job's counters and gauges, and the
/// process's, are touched before each scrape, so this reclaims the series
/// of deleted jobs (hidden from scrapes at once, see `live_only`); a live
/// job's histograms that saw no sample for this long start afresh.
const IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// The label that tells instances of a job apart inside the recorder;
/// scrapes show only the live instance's series, without it.
const INCARNATION: &str = "incarnation";

/// Reasons of `paramd_unauthenticated_calls_total`, exported from zero.
pub const UNAUTHENTICATED_REASONS: &[&str] = &["missing", "scheme", "wrong_token"];

/// Installs the process-wide Prometheus recorder (once) and returns the
/// handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::ALL, Some(IDLE))
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
    describe_gauge!(
        "paramd_round_participants",
        Unit::Count,
        "Workers whose pushes the last round averaged"
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
        "Gradient bytes received in counted pushes, by wire dtype"
    );
    describe_counter!(
        "paramd_pull_bytes_total",
        Unit::Bytes,
        "Parameter bytes served by pulls, by wire dtype"
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
    describe_gauge!(
        "paramd_members",
        Unit::Count,
        "Current members of an elastic job (on its coordinator)"
    );
    describe_counter!(
        "paramd_member_joins_total",
        Unit::Count,
        "Workers that joined an elastic job"
    );
    describe_counter!(
        "paramd_member_leaves_total",
        Unit::Count,
        "Memberships of an elastic job that ended, by reason (left, expired)"
    );
    describe_histogram!(
        "paramd_quorum_wait_seconds",
        Unit::Seconds,
        "Elastic jobs: time from a round's first push to its min_workers-th"
    );
    describe_histogram!(
        "paramd_grace_used_seconds",
        Unit::Seconds,
        "Elastic jobs: time a round waited after its min_workers-th push for the other members"
    );
    describe_histogram!(
        "paramd_apply_duration_seconds",
        Unit::Seconds,
        "Time to reduce and apply a round"
    );
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

/// Sets the series read at scrape time (jobs held, process memory, build)
/// and touches every live job's and the process's counters and gauges, so
/// that only deleted jobs' series go idle.
pub fn before_scrape<'a>(jobs: impl ExactSizeIterator<Item = &'a JobMetrics>) {
    gauge!("paramd_jobs").set(jobs.len() as f64);
    let (rss, peak) = process_memory();
    gauge!("paramd_process_resident_memory_bytes").set(rss as f64);
    gauge!("paramd_process_peak_resident_memory_bytes").set(peak as f64);
    gauge!("paramd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for reason in UNAUTHENTICATED_REASONS {
        counter!("paramd_unauthenticated_calls_total", "reason" => *reason).increment(0);
    }
    counter!("paramd_accept_errors_total").increment(0);
    for m in jobs {
        m.touch();
    }
}

/// Keeps the lines of a rendered scrape that belong to no job or to the
/// live instance of one (`live`: job name to incarnation), without their
/// incarnation label: a deleted job's series leave the scrape at once, and
/// a re-created job's start afresh, before the recorder drops the old ones.
pub fn live_only(text: &str, live: &std::collections::HashMap<String, u64>) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\""))?;
            let value_start = start + name.len() + 2;
            let len = line[value_start..].find('"')?;
            Some((
                start,
                &line[value_start..value_start + len],
                value_start + len + 1,
            ))
        };
        let (Some((_, job, _)), Some((start, incarnation, end))) =
            (label("job"), label(INCARNATION))
        else {
            out.push_str(line);
            continue;
        };
        if line.starts_with('#') {
            out.push_str(line);
            continue;
        }
        if live.get(job).map(u64::to_string).as_deref() != Some(incarnation) {
            continue;
        }
        // The label and the comma that joins it to its neighbour.
        let (cut_start, cut_end) = if line[end..].starts_with(',') {
            (start, end + 1)
        } else {
            (start.saturating_sub(1), end)
        };
        out.push_str(&line[..cut_start]);
        out.push_str(&line[cut_end..]);
    }
    out
}

/// A call refused for its credentials, counted by reason.
pub fn unauthenticated(reason: &'static str) {
    counter!("paramd_unauthenticated_calls_total", "reason" => reason).increment(1);
}

/// An accept that failed for want of a resource (file descriptors, memory).
pub fn accept_error() {
    counter!("paramd_accept_errors_total").increment(1);
}

/// A histogram of one job, looked up at each sample: a cached handle would
/// outlive its series once the recorder drops it as idle.
#[derive(Clone, Debug)]
pub struct JobHistogram {
    name: &'static str,
    job: String,
    incarnation: String,
}

impl JobHistogram {
    /// The histogram `name` of incarnation `incarnation` of job `job`.
    pub fn new(name: &'static str, job: &str, incarnation: &str) -> JobHistogram {
        JobHistogram {
            name,
            job: job.to_owned(),
            incarnation: incarnation.to_owned(),
        }
    }

    /// Records one sample.
    pub fn record(&self, value: f64) {
        histogram!(self.name, "job" => self.job.clone(), INCARNATION => self.incarnation.clone())
            .record(value);
    }
}

/// The series of an elastic job's membership, kept by its coordinator.
#[derive(Clone, Debug)]
pub struct MemberMetrics {
    pub members: Gauge,
    pub joins: Counter,
    pub left: Counter,
    pub expired: Counter,
    pub quorum_wait: JobHistogram,
    pub grace_used: JobHistogram,
}

impl MemberMetrics {
    /// The membership series of incarnation `i` of job `j`.
    pub fn new(j: &str, i: &str) -> MemberMetrics {
        let (j, i) = (j.to_owned(), i.to_owned());
        let leaves = |reason: &'static str| counter!("paramd_member_leaves_total", "job" => j.clone(), INCARNATION => i.clone(), "reason" => reason);
        MemberMetrics {
            members: gauge!("paramd_members", "job" => j.clone(), INCARNATION => i.clone()),
            joins: counter!("paramd_member_joins_total", "job" => j.clone(), INCARNATION => i.clone()),
            left: leaves("left"),
            expired: leaves("expired"),
            quorum_wait: JobHistogram::new("paramd_quorum_wait_seconds", &j, &i),
            grace_used: JobHistogram::new("paramd_grace_used_seconds", &j, &i),
        }
    }
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
    pub participants: Gauge,
    pub parameter_bytes: Gauge,
    pub state_bytes: Gauge,
    pub chunks: Gauge,
    pub shard_wait: JobHistogram,
    pub skipped: Counter,
    pub pushes: Counter,
    pub duplicates: Counter,
    pub dropped: Counter,
    pub checkpoint_duration: JobHistogram,
    pub checkpoint_failures: Counter,
    pub round_failures: Counter,
    pub checkpoint_round: Gauge,
    pub checkpoint_timestamp: Gauge,
    pub stale: Counter,
    /// By wire dtype, indexed by `Dtype as usize`.
    pub push_bytes: [Counter; 3],
    pub pull_bytes: [Counter; 3],
    pub push_duration: JobHistogram,
    pub pull_wait: JobHistogram,
    pub barrier_wait: JobHistogram,
    pub apply_duration: JobHistogram,
    /// An elastic job's membership.
    pub membership: Option<MemberMetrics>,
    /// Refused pushes by reason, made at the first of each.
    refused: parking_lot::Mutex<Vec<(&'static str, Counter)>>,
    job: String,
    /// This instance of the job, among all jobs this process ever held.
    pub incarnation: u64,
}

impl JobMetrics {
    /// Resolves the series of a new instance of job `job` with `groups`
    /// param groups: they carry the instance's incarnation, so that a job
    /// re-created under a deleted one's name (or losing a race of
    /// concurrent Inits) shares no series with it.
    pub fn new(job: &str, groups: usize, elastic: bool) -> JobMetrics {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let incarnation = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let j = job.to_owned();
        let i = incarnation.to_string();
        JobMetrics {
            lr: (0..groups)
                .map(|g| gauge!("paramd_learning_rate", "job" => j.clone(), "group" => g.to_string(), INCARNATION => i.clone()))
                .collect(),
            grad_norm: gauge!("paramd_grad_norm", "job" => j.clone(), INCARNATION => i.clone()),
            grad_norm_clipped: gauge!("paramd_grad_norm_clipped", "job" => j.clone(), INCARNATION => i.clone()),
            clip_coefficient: gauge!("paramd_grad_clip_coefficient", "job" => j.clone(), INCARNATION => i.clone()),
            step: gauge!("paramd_optimizer_step", "job" => j.clone(), INCARNATION => i.clone()),
            round: gauge!("paramd_round", "job" => j.clone(), INCARNATION => i.clone()),
            rounds: counter!("paramd_rounds_total", "job" => j.clone(), INCARNATION => i.clone()),
            workers_expected: gauge!("paramd_workers_expected", "job" => j.clone(), INCARNATION => i.clone()),
            workers_pushed: gauge!("paramd_workers_pushed", "job" => j.clone(), INCARNATION => i.clone()),
            participants: gauge!("paramd_round_participants", "job" => j.clone(), INCARNATION => i.clone()),
            parameter_bytes: gauge!("paramd_shard_parameter_bytes", "job" => j.clone(), INCARNATION => i.clone()),
            state_bytes: gauge!("paramd_shard_optimizer_state_bytes", "job" => j.clone(), INCARNATION => i.clone()),
            chunks: gauge!("paramd_shard_chunks", "job" => j.clone(), INCARNATION => i.clone()),
            shard_wait: JobHistogram::new("paramd_coordinator_shard_wait_seconds", &j, &i),
            skipped: counter!("paramd_rounds_skipped_total", "job" => j.clone(), INCARNATION => i.clone()),
            pushes: counter!("paramd_pushes_total", "job" => j.clone(), INCARNATION => i.clone()),
            duplicates: counter!("paramd_duplicate_pushes_total", "job" => j.clone(), INCARNATION => i.clone()),
            dropped: counter!("paramd_workers_dropped_total", "job" => j.clone(), INCARNATION => i.clone()),
            checkpoint_duration: JobHistogram::new("paramd_checkpoint_duration_seconds", &j, &i),
            checkpoint_failures: counter!("paramd_checkpoint_failures_total", "job" => j.clone(), INCARNATION => i.clone()),
            round_failures: counter!("paramd_round_failures_total", "job" => j.clone(), INCARNATION => i.clone()),
            checkpoint_round: gauge!("paramd_checkpoint_last_round", "job" => j.clone(), INCARNATION => i.clone()),
            checkpoint_timestamp: gauge!("paramd_checkpoint_last_timestamp_seconds", "job" => j.clone(), INCARNATION => i.clone()),
            stale: counter!("paramd_stale_pushes_total", "job" => j.clone(), INCARNATION => i.clone()),
            push_bytes: DTYPES.map(|(_, d)| counter!("paramd_push_bytes_total", "job" => j.clone(), INCARNATION => i.clone(), "dtype" => d)),
            pull_bytes: DTYPES.map(|(_, d)| counter!("paramd_pull_bytes_total", "job" => j.clone(), INCARNATION => i.clone(), "dtype" => d)),
            push_duration: JobHistogram::new("paramd_push_duration_seconds", &j, &i),
            pull_wait: JobHistogram::new("paramd_pull_wait_seconds", &j, &i),
            barrier_wait: JobHistogram::new("paramd_barrier_wait_seconds", &j, &i),
            apply_duration: JobHistogram::new("paramd_apply_duration_seconds", &j, &i),
            membership: elastic.then(|| MemberMetrics::new(&j, &i)),
            refused: parking_lot::Mutex::new(Vec::new()),
            job: j,
            incarnation,
        }
    }

    /// A refused push, counted by reason.
    pub fn refused(&self, reason: &'static str) {
        let mut refused = self.refused.lock();
        if let Some((_, c)) = refused.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
            return;
        }
        let c =
            counter!("paramd_refused_pushes_total", "job" => self.job.clone(), "reason" => reason);
        c.increment(1);
        refused.push((reason, c));
    }

    fn counters(&self) -> Vec<&Counter> {
        [
            &self.rounds,
            &self.skipped,
            &self.pushes,
            &self.duplicates,
            &self.dropped,
            &self.checkpoint_failures,
            &self.round_failures,
            &self.stale,
        ]
        .into_iter()
        .chain(&self.push_bytes)
        .chain(&self.pull_bytes)
        .collect()
    }

    /// Marks every counter and gauge of the job as alive (a no-op update),
    /// so that the recorder never drops them as idle.
    pub fn touch(&self) {
        let gauges = [
            &self.grad_norm,
            &self.grad_norm_clipped,
            &self.clip_coefficient,
            &self.step,
            &self.round,
            &self.workers_expected,
            &self.workers_pushed,
            &self.participants,
            &self.parameter_bytes,
            &self.state_bytes,
            &self.chunks,
            &self.checkpoint_round,
            &self.checkpoint_timestamp,
        ];
        for g in gauges.into_iter().chain(&self.lr) {
            g.increment(0.0);
        }
        for c in self.counters() {
            c.increment(0);
        }
        if let Some(m) = &self.membership {
            m.members.increment(0.0);
            for c in [&m.joins, &m.left, &m.expired] {
                c.increment(0);
            }
        }
        for (_, c) in self.refused.lock().iter() {
            c.increment(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_instances_series_are_scraped_without_their_incarnation() {
        let text = "# HELP paramd_round Rounds completed\n\
                    # TYPE paramd_round gauge\n\
                    paramd_round{job=\"a\",incarnation=\"3\"} 3\n\
                    paramd_round{job=\"a\",incarnation=\"1\"} 9\n\
                    paramd_round{job=\"gone\",incarnation=\"2\"} 7\n\
                    paramd_jobs 1\n\
                    paramd_learning_rate{job=\"a\",group=\"0\",incarnation=\"3\"} 0.1\n\
                    paramd_push_duration_seconds_bucket{job=\"a\",incarnation=\"3\",le=\"0.1\"} 2\n\
                    paramd_push_duration_seconds_bucket{job=\"gone\",incarnation=\"2\",le=\"0.1\"} 2\n";
        let live = [("a".to_owned(), 3)].into_iter().collect();
        assert_eq!(
            live_only(text, &live),
            "# HELP paramd_round Rounds completed\n\
             # TYPE paramd_round gauge\n\
             paramd_round{job=\"a\"} 3\n\
             paramd_jobs 1\n\
             paramd_learning_rate{job=\"a\",group=\"0\"} 0.1\n\
             paramd_push_duration_seconds_bucket{job=\"a\",le=\"0.1\"} 2\n"
        );
    }
}
