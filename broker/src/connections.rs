//! Connection admission and idleness: caps on open connections (in total and per peer IP),
//! and a per-connection clock that says when no request has been in flight for too long.
//!
//! Without these a client can open connections that never send a request (silent HTTP/1, or
//! HTTP/2 with only its preface) until the process runs out of file descriptors, and then no
//! one — not even the health check — gets an answer. The accept loop in `server.rs` asks
//! [`Connections::admit`] for every accepted socket and closes it at once when refused, and
//! closes an admitted connection once [`Activity::idle`] fires.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `[limits] max_connections` are open.
    Total,
    /// `[limits] max_connections_per_peer` are open from this IP.
    PerPeer,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::PerPeer => "max_connections_per_peer",
        }
    }

    /// The `reason` label of `botcreds_connections_refused_total`.
    pub fn metric_reason(self) -> &'static str {
        match self {
            Refused::Total => "total_cap",
            Refused::PerPeer => "peer_cap",
        }
    }
}

/// The open connections of all listeners.
pub struct Connections {
    max_total: usize,
    max_per_peer: usize,
    open: Mutex<Open>,
    /// Sends the number of open connections whenever it changes (for the shutdown drain).
    count: tokio::sync::watch::Sender<usize>,
    /// The same number, for `/metrics` (`botcreds_connections_open`).
    gauge: Gauge,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

impl Connections {
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<Connections> {
        Connections::with_gauge(max_total, max_per_peer, Gauge::default())
    }

    /// Like [`Connections::new`], keeping `gauge` set to the number of open connections.
    pub fn with_gauge(max_total: usize, max_per_peer: usize, gauge: Gauge) -> Arc<Connections> {
        gauge.set(0);
        Arc::new(Connections {
            max_total: max_total.max(1),
            max_per_peer: max_per_peer.max(1),
            open: Mutex::new(Open::default()),
            count: tokio::sync::watch::channel(0).0,
            gauge,
        })
    }

    /// Publish the count (called with the lock held, so that updates land in order).
    fn publish(&self, total: usize) {
        self.count.send_replace(total);
        self.gauge.set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    /// Count a new connection from `peer`, or refuse it. The connection counts until the
    /// returned guard drops.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        let peer = canonical(peer);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max_total {
            return Err(Refused::Total);
        }
        let from_peer = open.per_peer.entry(peer).or_insert(0);
        if *from_peer >= self.max_per_peer {
            return Err(Refused::PerPeer);
        }
        *from_peer += 1;
        open.total += 1;
        self.publish(open.total);
        Ok(Admitted {
            connections: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        *self.count.borrow()
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    fn release(&self, peer: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&peer);
            }
        }
        open.total = open.total.saturating_sub(1);
        self.publish(open.total);
    }
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    connections: Arc<Connections>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.release(self.peer);
    }
}

/// IPv4-mapped IPv6 peers count as their IPv4 address, so one host is one peer.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Requests in flight on one connection and when the last one ended.
pub struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last_done: Mutex::new(Instant::now()),
        })
    }

    /// A request started; it is in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Resolves once no request has been in flight for `timeout`: the connection is idle.
    /// Time spent inside a request (a long-poll, a slow upstream) never counts.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let busy = self.in_flight.load(Ordering::SeqCst) > 0;
            let deadline = *self
                .last_done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                + timeout;
            let now = Instant::now();
            if !busy && now >= deadline {
                return;
            }
            // While busy, look again a timeout later: the request's end moves the deadline.
            tokio::time::sleep_until(if busy { now + timeout } else { deadline }).await;
        }
    }
}

/// A request in flight (see [`Activity::begin`]).
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self
            .0
            .last_done
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Raise this process's open-file limit to its hard limit (cheap, and each connection is a
/// file descriptor); answers the soft limit now in force, if it could be read.
pub fn raise_file_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY, which libc spells u64::MAX.
    let current = limit.current.unwrap_or(u64::MAX);
    if current < limit.maximum.unwrap_or(u64::MAX) {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return Some(limit.maximum.unwrap_or(u64::MAX));
        }
    }
    Some(current)
}

/// File descriptors kept free of connections: the store, the audit log, tailscaled's socket,
/// upstream HTTP clients, the policy file.
pub const RESERVED_FILES: u64 = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_peer_and_in_total_and_frees_on_drop() {
        let c = Connections::new(3, 2);
        let a: IpAddr = "100.64.0.1".parse().unwrap();
        let b: IpAddr = "100.64.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:100.64.0.1".parse().unwrap();
        let a1 = c.admit(a).unwrap();
        let _a2 = c.admit(mapped).unwrap();
        assert_eq!(c.admit(a).err(), Some(Refused::PerPeer));
        let _b1 = c.admit(b).unwrap();
        assert_eq!(c.admit(b).err(), Some(Refused::Total));
        assert_eq!(c.open(), 3);
        drop(a1);
        assert_eq!(c.open(), 2);
        let _a3 = c.admit(a).unwrap();
    }

    #[tokio::test]
    async fn idle_only_counts_time_without_requests() {
        let activity = Activity::new();
        let busy = activity.begin();
        let timeout = Duration::from_millis(20);
        // A request in flight for many times the timeout keeps the connection.
        let idle = tokio::time::timeout(timeout * 10, activity.idle(timeout)).await;
        assert!(idle.is_err(), "a busy connection was called idle");
        drop(busy);
        activity.idle(timeout).await;
    }
}
