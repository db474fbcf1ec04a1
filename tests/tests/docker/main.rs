//! paramd as users deploy it (`deploy/`).
//!
//! With a Docker engine: the image built through `deploy/build-image.sh`'s
//! offline path, three shard containers on a private network with a volume
//! each; a golden trace replayed from a client container, and another
//! driven from the host through a `docker kill` and restart of one shard
//! (restored from its checkpoint, bit-identical result) and a shard cut off
//! the network mid-round (clear errors in time, completion once it is
//! back); health, non-root user, `docker stop` exiting 0 with a final
//! checkpoint; then the compose file's shards started, replayed through and
//! stopped. Set `PARAMD_SKIP_DOCKER=1` to skip what needs the engine.
//!
//! Without one: every Grafana query names metrics a live paramd exports,
//! and the compose file and Kubernetes manifests hold together and their
//! container arguments are accepted by `paramd --print-config`.

mod containers;
mod dashboard;
mod harness;
mod manifests;

use std::path::PathBuf;
use std::time::Duration;

/// The trace driven from the host through the failures.
pub(crate) const TRACE: &str = "adamw_warmup_cosine_clip.safetensors";
/// The trace replayed by `paramctl` in a client container.
pub(crate) const CLIENT_TRACE: &str = "sgd_momentum.safetensors";
/// Small chunks, so that every shard holds some of every parameter.
pub(crate) const CHUNK_BYTES: usize = 64;
/// Every call of the host's client ends within this.
pub(crate) const CALL: Duration = Duration::from_secs(5);
/// Workers must see a failure within this. A shard whose address stopped
/// answering costs a new connection the client's connect timeout (10 s),
/// which its call deadline does not shorten.
pub(crate) const FAIL_WITHIN: Duration = Duration::from_secs(13);
/// A container becomes healthy within this.
pub(crate) const HEALTHY_WITHIN: Duration = Duration::from_secs(90);

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the repository")
        .to_path_buf()
}

pub(crate) fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name)
}
