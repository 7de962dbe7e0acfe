//! Per-worker packet counters.
//!
//! Each worker owns one [`WorkerCounters`] and is its only writer, so a bump
//! is a plain load and store (no locked instruction, no shared cache line);
//! readers sum all workers' counters into a [`Totals`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use fep_shared::api::Count;

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
    /// The service has no back end with a ratio above 0 (a TCP service
    /// answers a SYN with a RST instead, unless `refuse_when_full = false`).
    NoBackend,
    /// The service is at its `max_connections` (a TCP service answers a SYN
    /// with a RST instead, unless `refuse_when_full = false`).
    ServiceFull,
    /// The assigned-route table is at `max_routes`.
    TableFull,
    /// A held VIP group's buffer (`hold_max_bytes`) is full.
    HoldFull,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::UnknownFlow,
        DropReason::NoRoute,
        DropReason::NoBackend,
        DropReason::ServiceFull,
        DropReason::TableFull,
        DropReason::HoldFull,
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
            DropReason::ServiceFull => "service_full",
            DropReason::TableFull => "table_full",
            DropReason::HoldFull => "hold_full",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Service slots with their own traffic counters; the transfer table never
/// hands out more.
pub const MAX_SERVICE_SLOTS: usize = fep_shared::config::MAX_SERVICES;

/// One service's traffic, as seen by one worker.
#[derive(Debug, Default)]
pub struct Traffic {
    pub to_backend_packets: AtomicU64,
    pub to_backend_bytes: AtomicU64,
    pub to_client_packets: AtomicU64,
    pub to_client_bytes: AtomicU64,
}

/// Counters written by one worker only; 128-byte aligned so that two workers'
/// counters never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerCounters {
    /// Indexed by service slot.
    traffic: Box<[Traffic]>,
    /// Indexed by the [`Count`]'s discriminant.
    events: [AtomicU64; Count::ALL.len()],
    drops: [AtomicU64; DropReason::ALL.len()],
    /// The worker batches its TUN I/O through io_uring (else one system call
    /// per packet read or written).
    pub batched: AtomicBool,
    /// A TUN queue's worker, not the replayer of held packets (which
    /// forwards, and is counted, but serves no queue).
    serves_queue: bool,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters {
            traffic: (0..MAX_SERVICE_SLOTS).map(|_| Traffic::default()).collect(),
            events: Default::default(),
            drops: Default::default(),
            batched: AtomicBool::new(false),
            serves_queue: true,
        }
    }
}

impl WorkerCounters {
    /// The counters of the replayer of held packets.
    pub fn replayer() -> Self {
        WorkerCounters {
            serves_queue: false,
            ..WorkerCounters::default()
        }
    }
}

/// Adds `n` to a counter that has a single writer.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl WorkerCounters {
    /// Counts one `event`.
    #[inline]
    pub fn count(&self, event: Count) {
        bump(&self.events[event as usize], 1);
    }

    pub fn get(&self, event: Count) -> u64 {
        self.events[event as usize].load(Ordering::Relaxed)
    }

    #[inline]
    pub fn dropped(&self, reason: DropReason) {
        bump(&self.drops[reason.index()], 1);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    /// A service's traffic counters (slots past the bound share the last).
    #[inline]
    pub fn traffic(&self, service: u16) -> &Traffic {
        let last = self.traffic.len() - 1;
        &self.traffic[usize::from(service).min(last)]
    }

    #[inline]
    pub fn to_backend(&self, service: u16, bytes: usize) {
        let t = self.traffic(service);
        bump(&t.to_backend_packets, 1);
        bump(&t.to_backend_bytes, bytes as u64);
    }

    #[inline]
    pub fn to_client(&self, service: u16, bytes: usize) {
        let t = self.traffic(service);
        bump(&t.to_client_packets, 1);
        bump(&t.to_client_bytes, bytes as u64);
    }
}

/// Traffic totals (of a service, or of all).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TrafficTotals {
    pub to_backend_packets: u64,
    pub to_backend_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

impl TrafficTotals {
    fn add(&mut self, t: &Traffic) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.to_backend_packets += get(&t.to_backend_packets);
        self.to_backend_bytes += get(&t.to_backend_bytes);
        self.to_client_packets += get(&t.to_client_packets);
        self.to_client_bytes += get(&t.to_client_bytes);
    }

    fn merge(&mut self, o: &TrafficTotals) {
        self.to_backend_packets += o.to_backend_packets;
        self.to_backend_bytes += o.to_backend_bytes;
        self.to_client_packets += o.to_client_packets;
        self.to_client_bytes += o.to_client_bytes;
    }
}

/// The sum of all workers' counters at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub all: TrafficTotals,
    /// By service slot.
    pub services: Vec<TrafficTotals>,
    events: [u64; Count::ALL.len()],
    drops: [u64; DropReason::ALL.len()],
    /// Workers serving a TUN queue.
    pub workers: u64,
    /// Workers whose TUN I/O is batched.
    pub batched_workers: u64,
}

impl Totals {
    pub fn sum<'a>(workers: impl IntoIterator<Item = &'a WorkerCounters>) -> Totals {
        let mut t = Totals {
            services: vec![TrafficTotals::default(); MAX_SERVICE_SLOTS],
            ..Totals::default()
        };
        for w in workers {
            for (total, traffic) in t.services.iter_mut().zip(w.traffic.iter()) {
                total.add(traffic);
            }
            for e in Count::ALL {
                t.events[e as usize] += w.get(e);
            }
            if w.serves_queue {
                t.workers += 1;
                t.batched_workers += u64::from(w.batched.load(Ordering::Relaxed));
            }
            for r in DropReason::ALL {
                t.drops[r.index()] += w.drops(r);
            }
        }
        for s in &t.services {
            t.all.merge(s);
        }
        t
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn get(&self, event: Count) -> u64 {
        self.events[event as usize]
    }
}

impl std::fmt::Display for Totals {
    /// One log line: `to_backend=… to_client=… routes_created=… …; drops: reason=n …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.all;
        write!(
            f,
            "to_backend={} pkts/{} bytes, to_client={} pkts/{} bytes",
            a.to_backend_packets, a.to_backend_bytes, a.to_client_packets, a.to_client_bytes,
        )?;
        for e in Count::ALL {
            write!(f, ", {e}={}", self.get(e))?;
        }
        write!(f, "; drops:")?;
        for r in DropReason::ALL {
            write!(f, " {}={}", r.as_str(), self.drops(r))?;
        }
        Ok(())
    }
}
