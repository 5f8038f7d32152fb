//! [`free_port`]: a TCP port on 127.0.0.1 for a server that will bind it a moment later.
//!
//! A port from the kernel's ephemeral range (what binding port 0 returns) does not stay free
//! until then: every outgoing connection (a peer's RPC client, an NBD client, a SAN path) takes
//! one from that range, and one did take a node's NBD port between `cluster up` choosing it and
//! the node binding it ("Address already in use"). So ports are chosen below the ephemeral range,
//! at random (clusters and test servers started at the same moment rarely pick the same one),
//! and checked free by binding them. Where the range leaves no room below it, the kernel's
//! choice is the fallback.
//!
//! A process never hands out one port twice: parallel tests bring clusters up in one process,
//! and a port chosen for one cluster's node stays that node's while the node is down for a
//! restart, when binding it would succeed.

use std::collections::BTreeSet;
use std::io;
use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};

/// Lowest port [`free_port`] hands out.
pub const FIRST_PORT: u16 = 10_000;

/// Every port this process handed out.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port on 127.0.0.1 that was free a moment ago and that this process never handed out
/// before.
pub fn free_port() -> io::Result<u16> {
    let below = ephemeral_start().unwrap_or(32_768);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    if below > FIRST_PORT + 1_000 {
        for _ in 0..1_000 {
            let p = rand::random_range(FIRST_PORT..below);
            if !handed_out.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
                handed_out.insert(p);
                return Ok(p);
            }
        }
    }
    let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    handed_out.insert(p);
    Ok(p)
}

/// First port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_below_the_ephemeral_range_and_never_handed_out_twice() {
        let below = ephemeral_start().unwrap_or(32_768);
        assert!(
            below > FIRST_PORT + 1_000,
            "this machine's ephemeral range starts at {below}"
        );
        let ports: Vec<u16> = (0..32).map(|_| free_port().unwrap()).collect();
        let taken: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(
            taken.len(),
            ports.len(),
            "a port was handed out twice: {ports:?}"
        );
        // Another caller (a second cluster in this process) never gets one of them.
        let more: Vec<u16> = (0..32).map(|_| free_port().unwrap()).collect();
        assert!(
            more.iter().all(|p| !taken.contains(p)),
            "{more:?} reuses {ports:?}"
        );
        for p in ports {
            assert!(
                (FIRST_PORT..below).contains(&p),
                "{p} outside {FIRST_PORT}..{below}"
            );
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
