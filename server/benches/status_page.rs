//! What the status page costs at its stated scale, 50 jobs with 10,000
//! rounds of history each (two param groups): the daemon's memory for the
//! histories, against the bound the README states (`History::bound_bytes`),
//! and the bytes of the page's first load (its document, script and style,
//! `/api/v1/jobs` for 50 jobs, and the selected job's first history
//! request, thinned to 1,000 points as the page asks), against 1 MB.
//!
//! `cargo bench -p paramd --bench status_page` (add `-- --json` for one
//! JSON line).

use paramd::coordinator::Decision;
use paramd::http::{PAGE, SCRIPT, STYLE, history_json};
use paramd::job::history::History;
use paramd::metrics::process_memory;
use paramd_proto::v1 as pb;

const JOBS: usize = 50;
const ROUNDS: u64 = 10_000;
const GROUPS: usize = 2;
/// What the page asks for first: `every = ceil(rounds / 1000)`.
const FIRST_POINTS: u64 = 1000;

fn decision(round: u64) -> Decision {
    let x = round as f64;
    Decision {
        round,
        step: round + 1,
        skipped: round.is_multiple_of(997),
        grad_norm: (1.0 + (x * 0.37).sin().abs() * 20.0) as f32,
        clip_coefficient: (1.0 / (1.0 + x.sqrt())) as f32,
        lr: (0..GROUPS)
            .map(|g| 1e-3 * (g + 1) as f64 * (1.0 - x / 2e4))
            .collect(),
        loaded_state: 0,
        participants: 16,
    }
}

fn job_status(i: usize) -> pb::JobStatus {
    let last = decision(ROUNDS - 1);
    pb::JobStatus {
        members: Vec::new(),
        min_workers: 0,
        job: format!("team-{i:02}-llm-finetune-run"),
        optimizer: "adamw".into(),
        round: ROUNDS,
        step: ROUNDS,
        workers_expected: 16,
        workers_pushed: 7,
        rounds_skipped: 11,
        waiting_for: (7..16).collect(),
        parameters: 124_439_808,
        parameter_bytes: 497_759_232,
        optimizer_state_bytes: 995_518_464,
        last: Some(pb::RoundOutcome {
            round: last.round,
            step: last.step,
            skipped: false,
            grad_norm: last.grad_norm,
            clip_coefficient: last.clip_coefficient,
            lr: last.lr,
            loaded_state: 0,
            participants: 16,
        }),
        shards: (0..3)
            .map(|s| pb::ShardInfo {
                index: s,
                address: format!("http://paramd-{s}.paramd:50051"),
                up: true,
                chunks: 40,
                parameter_bytes: 165_919_744,
                optimizer_state_bytes: 331_839_488,
                round: ROUNDS,
                error: String::new(),
            })
            .collect(),
    }
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let (rss_before, _) = process_memory();
    let mut histories: Vec<History> = (0..JOBS)
        .map(|_| History::new(ROUNDS as usize, GROUPS))
        .collect();
    for h in &mut histories {
        for r in 0..ROUNDS {
            h.record(&decision(r));
        }
    }
    let (rss_after, _) = process_memory();
    let held = rss_after.saturating_sub(rss_before) as f64;
    let bound = (JOBS * History::bound_bytes(ROUNDS as usize, GROUPS)) as f64;

    let status = pb::StatusResponse {
        jobs: (0..JOBS).map(job_status).collect(),
        ..Default::default()
    };
    let jobs_bytes = paramd_proto::json::status(&status).to_string().len();
    let every = ROUNDS.div_ceil(FIRST_POINTS) as usize;
    let first = histories[0].since(0, every);
    let history_bytes = history_json("team-00-llm-finetune-run", GROUPS, Some(1.0), &first)
        .to_string()
        .len();
    let assets = PAGE.len() + SCRIPT.len() + STYLE.len();
    let first_load = assets + jobs_bytes + history_bytes;
    let limit = 1_000_000.0;
    if json {
        println!(
            "{{\"jobs\": {JOBS}, \"rounds\": {ROUNDS}, \"history_rss_bytes\": {held}, \"history_bound_bytes\": {bound}, \
             \"history_vs_bound\": {:.3}, \"first_load_bytes\": {first_load}, \"first_load_vs_1mb\": {:.3}}}",
            held / bound,
            first_load as f64 / limit
        );
    } else {
        println!(
            "history of {JOBS} jobs x {ROUNDS} rounds ({GROUPS} groups): {:.1} MiB resident, bound {:.1} MiB: {:.2} of the bound",
            held / 1048576.0,
            bound / 1048576.0,
            held / bound
        );
        println!(
            "first load: page {assets} B + /api/v1/jobs {jobs_bytes} B + history ({} points) {history_bytes} B = {first_load} B: {:.2} of 1 MB",
            first.len(),
            first_load as f64 / limit
        );
    }
    assert_eq!(
        histories.iter().map(History::len).sum::<usize>(),
        JOBS * ROUNDS as usize
    );
}
