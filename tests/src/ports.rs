//! Loopback ports reserved for processes that must know each other's
//! addresses before they start.

/// Loopback ports free right now, for processes that must know each
/// other's addresses before they start (and again when they restart).
///
/// They are taken below the kernel's ephemeral range, where no `bind` to
/// port 0 (another daemon's HTTP port, an in-process server) can land on
/// one between a kill and a restart; each test process starts at its own
/// offset and never hands out a port twice.
pub fn reserve_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    // Ports [low, ephemeral_low): well above the privileged and the usual
    // service ports.
    let low = ephemeral_low.saturating_sub(12_000).max(10_000);
    let span = ephemeral_low.saturating_sub(low).max(1);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(low + (start + i) % span).expect("a port number");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "no {n} free ports below {ephemeral_low}");
    ports
}

/// The port of the shard-to-shard service of the shard whose workers'
/// port is `port` (one of `reserve_ports`): reserved the first time it is
/// asked for, the same one after, so a restarted shard gets it again.
pub fn peer_port(port: u16) -> u16 {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static PEERS: OnceLock<Mutex<HashMap<u16, u16>>> = OnceLock::new();
    let mut peers = PEERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *peers.entry(port).or_insert_with(|| reserve_ports(1)[0])
}
