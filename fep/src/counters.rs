//! Per-worker packet counters.
//!
//! Each worker owns one [`WorkerCounters`] and is its only writer, so a bump
//! is a plain load and store (no locked instruction, no shared cache line);
//! readers sum all workers' counters into a [`Totals`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed IPv4/IPv6 packet with a complete TCP/UDP header.
    Malformed,
    /// IP fragments are not forwarded.
    Fragment,
    /// Neither TCP nor UDP.
    UnsupportedProtocol,
    /// To no service and not a reply on a known route.
    UnknownFlow,
    /// A TCP segment other than a SYN for a service, with no route to follow.
    NoRoute,
    /// The service has no back end with a ratio above 0.
    NoBackend,
    /// The assigned-route table is at `max_routes`.
    TableFull,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::UnknownFlow,
        DropReason::NoRoute,
        DropReason::NoBackend,
        DropReason::TableFull,
    ];

    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::UnknownFlow => "unknown_flow",
            DropReason::NoRoute => "no_route",
            DropReason::NoBackend => "no_backend",
            DropReason::TableFull => "table_full",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters written by one worker only; 128-byte aligned so that two workers'
/// counters never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters {
    pub to_backend_packets: AtomicU64,
    pub to_backend_bytes: AtomicU64,
    pub to_client_packets: AtomicU64,
    pub to_client_bytes: AtomicU64,
    pub routes_created: AtomicU64,
    pub tun_read_errors: AtomicU64,
    pub tun_write_errors: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

/// Adds `n` to a counter that has a single writer.
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl WorkerCounters {
    #[inline]
    pub fn drop(&self, reason: DropReason) {
        bump(&self.drops[reason.index()], 1);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }
}

/// The sum of all workers' counters at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub to_backend_packets: u64,
    pub to_backend_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    pub routes_created: u64,
    pub tun_read_errors: u64,
    pub tun_write_errors: u64,
    pub drops: [u64; DropReason::ALL.len()],
}

impl Totals {
    pub fn sum<'a>(workers: impl IntoIterator<Item = &'a WorkerCounters>) -> Totals {
        let mut t = Totals::default();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for w in workers {
            t.to_backend_packets += get(&w.to_backend_packets);
            t.to_backend_bytes += get(&w.to_backend_bytes);
            t.to_client_packets += get(&w.to_client_packets);
            t.to_client_bytes += get(&w.to_client_bytes);
            t.routes_created += get(&w.routes_created);
            t.tun_read_errors += get(&w.tun_read_errors);
            t.tun_write_errors += get(&w.tun_write_errors);
            for r in DropReason::ALL {
                t.drops[r.index()] += w.drops(r);
            }
        }
        t
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
}

impl std::fmt::Display for Totals {
    /// One log line: `to_backend=… to_client=… routes_created=… drops: reason=n …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "to_backend={} pkts/{} bytes, to_client={} pkts/{} bytes, routes_created={}, tun_errors read={} write={}; drops:",
            self.to_backend_packets,
            self.to_backend_bytes,
            self.to_client_packets,
            self.to_client_bytes,
            self.routes_created,
            self.tun_read_errors,
            self.tun_write_errors,
        )?;
        for r in DropReason::ALL {
            write!(f, " {}={}", r.as_str(), self.drops(r))?;
        }
        Ok(())
    }
}
