//! Crash points for tests: where a checkpoint can be made to stop.

use std::sync::OnceLock;

/// The failpoint this process was started with: `PARAMD_FAILPOINT=<name>`
/// or `<name>@<round>`, read once. When the named point is reached (for
/// checkpoint `<round>` only, if given), the process aborts there, as a
/// `kill -9` at exactly that point would stop it. Crash tests use it; it
/// is unset in production. The points:
///
/// - `checkpoint.mid_write`: a shard has written half of its checkpoint
///   file (under its temporary name);
/// - `checkpoint.before_manifest`: the coordinator has every shard's file,
///   durable, and has written no manifest yet;
/// - `checkpoint.between_manifests`: the coordinator has written its own
///   manifest and not yet sent it to the other shards.
pub fn failpoint(name: &str, round: u64) {
    static ARMED: OnceLock<Option<(String, Option<u64>)>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("PARAMD_FAILPOINT").ok()?;
        Some(match v.split_once('@') {
            Some((n, r)) => (n.to_owned(), r.parse().ok()),
            None => (v, None),
        })
    });
    if let Some((n, r)) = armed
        && n == name
        && r.is_none_or(|r| r == round)
    {
        tracing::error!(
            failpoint = name,
            round,
            "PARAMD_FAILPOINT reached: aborting"
        );
        std::process::abort();
    }
}
