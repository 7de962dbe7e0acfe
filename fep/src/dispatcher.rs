//! The data-plane core: one packet in, a verdict out, no I/O.
//!
//! [`Dispatcher::process`] parses a packet read from the TUN device, follows
//! or creates its route, rewrites it in place and says whether to write it
//! back. Time is passed in (milliseconds of a clock the caller owns), so unit
//! tests replay ageing and closes without sleeping.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;

use fep_shared::FepConfig;

use crate::counters::{Count, DropReason, WorkerCounters};
use crate::routes::{state, FlowKey, Refused, ReplyKey, Route, RouteRef, Routes};
use crate::transfer_table::{BackendId, Service, ServiceId, TransferTable};
use crate::wire::icmp::{IcmpKind, IcmpPacket};
use crate::wire::{tcp_flags, FlowPacket, ParseError};

/// How long a TCP route whose connection has closed (FIN both ways, or RST)
/// stays, so that the last ACK and a retransmitted FIN still get through.
pub const CLOSED_LINGER_MS: u32 = 4_000;
/// How long a TCP route whose handshake never completed (embryonic: a SYN,
/// its retransmissions, a SYN-ACK to a spoofed source) lives.
pub const EMBRYONIC_TIMEOUT_MS: u32 = 5_000;
/// Under a flood, unconfirmed routes younger than this are not evicted by
/// the data path, so a real client's handshake or first answer in progress
/// is not cut.
pub const UNCONFIRMED_MIN_AGE_MS: u32 = 500;
/// Routes a worker remembers having opened, for eviction under a flood.
const RECENT_ROUTES: usize = 65_536;
/// Keys looked at per eviction before giving up.
const EVICT_ATTEMPTS: usize = 32;
/// Slots one expiry pass looks at (32 MB of the table): the work per pass
/// is bounded however large `max_routes` is; a larger table is swept over
/// several passes.
pub const SWEEP_SLOTS: usize = 1 << 20;
/// Routes one expiry pass evicts at most when the table nears `max_routes`.
const EVICT_PER_PASS: usize = 65_536;
/// Confirmed routes the journal has not taken yet; beyond this they wait
/// for the next route snapshot (counted as `journal_overflow`).
const JOURNAL_QUEUE: usize = 65_536;

/// What one data-path worker owns: its counters, and the routes it opened
/// most recently (oldest first), which make room for new clients when a
/// flood (spoofed SYNs or datagrams) fills the table.
#[derive(Debug)]
pub struct Worker {
    pub counters: Arc<WorkerCounters>,
    recent: VecDeque<FlowKey>,
    /// The transfer table this worker last used, with its version: checking
    /// one shared counter per packet is cheaper than loading the `ArcSwap`.
    table: Option<(u64, Arc<TransferTable>)>,
}

impl Worker {
    pub fn new(counters: Arc<WorkerCounters>) -> Self {
        Worker {
            counters,
            recent: VecDeque::with_capacity(RECENT_ROUTES),
            table: None,
        }
    }

    fn opened(&mut self, key: FlowKey) {
        if self.recent.len() == RECENT_ROUTES {
            self.recent.pop_front();
        }
        self.recent.push_back(key);
    }
}

/// What to do with a processed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write the first `len` bytes of the (rewritten) buffer back to the device.
    Forward(usize),
    Drop(DropReason),
}

/// A route that just became confirmed, for the journal that lets a restart
/// after a crash restore it (see `control::journal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub key: FlowKey,
    pub backend: BackendId,
}

/// Where the expiry passes are in the table, and their reused buffers.
#[derive(Debug, Default)]
struct Sweep {
    cursor: usize,
    expired: Vec<FlowKey>,
    /// The most evictable routes of the window, least evictable on top:
    /// (score, key, last seen).
    evict: BinaryHeap<Reverse<(u64, FlowKey, u32)>>,
}

/// What expiry removed (one pass, or the totals since the start).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExpireStats {
    /// Routes whose connection ended or that were idle past the timeout.
    pub expired: usize,
    /// Routes evicted, oldest-idle first, because the table neared `max_routes`.
    pub evicted: usize,
}

#[derive(Debug)]
pub struct Dispatcher {
    /// Swapped whole when the config changes; each worker keeps the one it
    /// last loaded until `table_version` moves.
    table: ArcSwap<TransferTable>,
    /// Bumped after every new table, so workers know to load it.
    table_version: AtomicU64,
    routes: Routes,
    idle_timeout_ms: AtomicU32,
    /// Routes removed by expiry and eviction since the start.
    expired: AtomicU64,
    evicted: AtomicU64,
    sweep: Mutex<Sweep>,
    confirmed: ArrayQueue<Confirmed>,
    journal_overflow: AtomicU64,
}

impl From<ParseError> for DropReason {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Malformed => DropReason::Malformed,
            ParseError::Fragment => DropReason::Fragment,
            ParseError::UnsupportedProtocol | ParseError::Icmp => DropReason::UnsupportedProtocol,
        }
    }
}

impl Dispatcher {
    pub fn new(cfg: &FepConfig) -> Self {
        let d = Dispatcher {
            table: ArcSwap::from_pointee(TransferTable::from_config(cfg)),
            table_version: AtomicU64::new(0),
            routes: Routes::with_room(cfg.max_routes),
            idle_timeout_ms: AtomicU32::new(0),
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            sweep: Mutex::default(),
            confirmed: ArrayQueue::new(JOURNAL_QUEUE),
            journal_overflow: AtomicU64::new(0),
        };
        d.set_limits(cfg);
        d
    }

    /// The current transfer table.
    pub fn table(&self) -> Arc<TransferTable> {
        self.table.load_full()
    }

    /// Publishes a new transfer table (built with [`TransferTable::build`]
    /// from the current one, so that route slots keep their meaning).
    pub fn set_table(&self, table: TransferTable) {
        self.table.store(Arc::new(table));
        self.table_version.fetch_add(1, Ordering::Release);
    }

    /// Applies `route_idle_timeout_s` and `max_routes` (up to the room the
    /// route table was given at the start).
    pub fn set_limits(&self, cfg: &FepConfig) {
        let idle = cfg
            .route_idle_timeout_s
            .saturating_mul(1000)
            .min(u64::from(u32::MAX / 2));
        self.idle_timeout_ms.store(idle as u32, Ordering::Relaxed);
        let room = self.routes.room();
        if cfg.max_routes > room {
            tracing::warn!(
                "max_routes = {} is more than the route table was sized for at the start; \
                 it holds {room} until fep restarts",
                cfg.max_routes
            );
        }
        self.routes.set_max(cfg.max_routes);
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Handles one packet in place and counts what happened.
    #[inline]
    pub fn process(&self, buf: &mut [u8], now: u32, worker: &mut Worker) -> Verdict {
        self.process_offloaded(buf, false, now, worker)
    }

    /// As [`Dispatcher::process`], for a packet read with checksum offload:
    /// `partial_csum` says its L4 checksum is a pseudo-header sum the
    /// device will finish (virtio-net `NEEDS_CSUM`).
    #[inline]
    pub fn process_offloaded(
        &self,
        buf: &mut [u8],
        partial_csum: bool,
        now: u32,
        worker: &mut Worker,
    ) -> Verdict {
        let (version, table) = self.worker_table(worker);
        let verdict =
            match FlowPacket::new_checked(buf).map(|p| p.with_partial_checksum(partial_csum)) {
                Ok(mut pkt) => {
                    let dst = pkt.dst_addr();
                    match table.lookup(pkt.protocol(), &dst, pkt.dst_port()) {
                        Some((id, svc)) => self.to_backend(&mut pkt, id, svc, now, worker),
                        None => self.to_client(&table, &mut pkt, now, &worker.counters),
                    }
                }
                Err(ParseError::Icmp) => self.icmp(&table, buf, &worker.counters),
                Err(e) => Verdict::Drop(e.into()),
            };
        worker.table = Some((version, table));
        if let Verdict::Drop(reason) = verdict {
            worker.counters.dropped(reason);
        }
        verdict
    }

    /// The current transfer table, moved out of `worker` (no reference
    /// count touched) unless a newer one was published; the caller puts it
    /// back.
    #[inline]
    fn worker_table(&self, worker: &mut Worker) -> (u64, Arc<TransferTable>) {
        let version = self.table_version.load(Ordering::Acquire);
        match worker.table.take() {
            Some((v, table)) if v == version => (v, table),
            _ => (version, self.table.load_full()),
        }
    }

    /// ICMP: echo requests to a VIP are answered; errors about a tracked
    /// flow are translated toward the side that sent the packet in error.
    fn icmp(&self, table: &TransferTable, buf: &mut [u8], counters: &WorkerCounters) -> Verdict {
        let mut pkt = match IcmpPacket::new_checked(buf) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(e.into()),
        };
        match pkt.kind() {
            IcmpKind::EchoRequest if table.is_vip(&pkt.dst_addr()) => {
                pkt.make_echo_reply();
                counters.count(Count::IcmpEchoReplies);
                Verdict::Forward(pkt.len())
            }
            IcmpKind::Error { .. } => {
                let Some(inner) = pkt.inner() else {
                    return Verdict::Drop(DropReason::UnknownFlow);
                };
                // About a reply fep rewrote (VIP → client), sent to the VIP:
                // to the back end, from the VIP, as about its own packet.
                if table.is_vip(&pkt.dst_addr()) {
                    let Some((id, svc)) = table.lookup(inner.protocol, &inner.src, inner.src_port)
                    else {
                        return Verdict::Drop(DropReason::UnknownFlow);
                    };
                    let key = FlowKey {
                        service: id,
                        client_port: inner.dst_port,
                        client: inner.dst,
                    };
                    let Some(b) = self.routes.backend_of(&key) else {
                        return Verdict::Drop(DropReason::UnknownFlow);
                    };
                    let be = &svc.backends[usize::from(b)];
                    // From the VIP: the original sender (often this very
                    // gateway) would look like a spoofed local address.
                    pkt.translate(
                        Some(&svc.vip),
                        Some(&be.addr),
                        Some((&be.addr, be.port)),
                        None,
                    );
                } else {
                    // From the back-end side about a client's packet: to the
                    // client, as about its packet to the VIP.
                    let reply = ReplyKey {
                        protocol: inner.protocol,
                        backend_port: inner.dst_port,
                        client_port: inner.src_port,
                        backend: inner.dst,
                        client: inner.src,
                    };
                    let Some(key) = self.find_reply(table, &reply, |_| true) else {
                        return Verdict::Drop(DropReason::UnknownFlow);
                    };
                    let svc = table.service(key.service);
                    let from_backend = pkt.src_addr() == inner.dst;
                    pkt.translate(
                        from_backend.then_some(&svc.vip),
                        None,
                        None,
                        Some((&svc.vip, svc.port)),
                    );
                }
                counters.count(Count::IcmpErrorsTranslated);
                Verdict::Forward(pkt.len())
            }
            IcmpKind::EchoRequest => Verdict::Drop(DropReason::UnknownFlow),
            IcmpKind::Other => Verdict::Drop(DropReason::UnsupportedProtocol),
        }
    }

    /// Forward direction: client → VIP becomes client → back end.
    fn to_backend(
        &self,
        pkt: &mut FlowPacket,
        id: ServiceId,
        svc: &Service,
        now: u32,
        worker: &mut Worker,
    ) -> Verdict {
        let key = FlowKey {
            service: id,
            client_port: pkt.src_port(),
            client: pkt.src_addr(),
        };
        let flags = pkt.tcp_flags();
        let closing = close_bits(flags, state::FIN_FROM_CLIENT);
        let confirms = Cell::new(false);
        let hit = self.routes.get_and(&key, |route| {
            let st = route.state();
            let set = closing | confirm_bit(svc, flags, st);
            confirms.set(set & !st & state::ESTABLISHED != 0);
            let fresh = !(is_bare_syn(flags) && state::is_closed(st));
            (fresh || route.reopen(now)) && route.touch(now, set)
        });
        let backend = match hit {
            Some(b) => {
                if confirms.get() {
                    self.journal(key, b);
                }
                b
            }
            None => match self.assign(key, svc, flags, now, worker) {
                Ok(b) => {
                    worker.counters.count(Count::RoutesCreated);
                    b
                }
                Err(reason) => return Verdict::Drop(reason),
            },
        };
        let be = &svc.backends[usize::from(backend)];
        pkt.set_destination(&be.addr, be.port);
        worker.counters.to_backend(id, pkt.len());
        Verdict::Forward(pkt.len())
    }

    /// Reverse direction: back end → client becomes VIP → client.
    fn to_client(
        &self,
        table: &TransferTable,
        pkt: &mut FlowPacket,
        now: u32,
        counters: &WorkerCounters,
    ) -> Verdict {
        let reply = ReplyKey {
            protocol: pkt.protocol(),
            backend_port: pkt.src_port(),
            client_port: pkt.dst_port(),
            backend: pkt.src_addr(),
            client: pkt.dst_addr(),
        };
        let set = close_bits(pkt.tcp_flags(), state::FIN_FROM_BACKEND) | state::REPLIED;
        let Some(key) = self.find_reply(table, &reply, |r| r.touch(now, set)) else {
            return Verdict::Drop(DropReason::UnknownFlow);
        };
        let svc = table.service(key.service);
        pkt.set_source(&svc.vip, svc.port);
        counters.to_client(key.service, pkt.len());
        Verdict::Forward(pkt.len())
    }

    /// The route a back end's packet (or an ICMP error about one) belongs to:
    /// in each service behind the back end's endpoint, the route of the
    /// client's (IP, port), if that back end holds it. `touch` updates the
    /// route found (false: it moved, look again).
    #[inline]
    fn find_reply(
        &self,
        table: &TransferTable,
        reply: &ReplyKey,
        touch: impl Fn(&RouteRef<'_>) -> bool,
    ) -> Option<FlowKey> {
        for &service in table.services_behind(reply.protocol, &reply.backend, reply.backend_port) {
            let key = FlowKey {
                service,
                client_port: reply.client_port,
                client: reply.client,
            };
            let holds = |b: BackendId| {
                table
                    .service(service)
                    .backends
                    .get(usize::from(b))
                    .is_some_and(|be| be.addr == reply.backend && be.port == reply.backend_port)
            };
            let found = self
                .routes
                .get_and(&key, |r| !holds(r.backend()) || touch(r));
            if found.is_some_and(holds) {
                return Some(key);
            }
        }
        None
    }

    /// A route miss: choose a back end and record the route. Only a SYN opens
    /// a TCP route, as in IPVS: a stray segment must not claim a back end.
    fn assign(
        &self,
        key: FlowKey,
        svc: &Service,
        flags: u8,
        now: u32,
        worker: &mut Worker,
    ) -> Result<BackendId, DropReason> {
        if svc.removed {
            return Err(DropReason::UnknownFlow);
        }
        if svc.is_tcp() && !is_bare_syn(flags) {
            return Err(DropReason::NoRoute);
        }
        // Room, or room made by evicting a flood's unconfirmed route.
        let assigned = match self.routes.assign(&key, svc, now) {
            Err(Refused::Full) if self.evict_unconfirmed(worker, now) => {
                self.routes.assign(&key, svc, now)
            }
            assigned => assigned,
        };
        match assigned {
            Err(Refused::Full) => Err(DropReason::TableFull),
            assigned => {
                worker.opened(key);
                assigned.map_err(|_| DropReason::NoBackend)
            }
        }
    }

    /// Records that a route became confirmed, for the journal; when the
    /// journal falls behind, the route waits for the next snapshot.
    #[inline]
    fn journal(&self, key: FlowKey, backend: BackendId) {
        if self.confirmed.push(Confirmed { key, backend }).is_err() {
            self.journal_overflow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Routes confirmed since the last call, oldest first (for the journal).
    pub fn take_confirmed(&self, mut f: impl FnMut(Confirmed)) {
        while let Some(c) = self.confirmed.pop() {
            f(c);
        }
    }

    /// Confirmed routes the journal had no room for since the start.
    pub fn journal_overflow(&self) -> u64 {
        self.journal_overflow.load(Ordering::Relaxed)
    }

    /// With the table full, removes the oldest route this worker opened that
    /// is still unconfirmed (a flood's: a SYN never completed, a datagram
    /// never answered and followed up), so a new client can have its place;
    /// routes with a packet in the last [`UNCONFIRMED_MIN_AGE_MS`] are spared.
    /// A confirmed route is never evicted here.
    fn evict_unconfirmed(&self, worker: &mut Worker, now: u32) -> bool {
        let table = self.table.load();
        for _ in 0..EVICT_ATTEMPTS {
            let Some(key) = worker.recent.pop_front() else {
                return false;
            };
            let mut too_young = false;
            let removed = self.routes.remove_if(&table, &key, |r| {
                let unconfirmed = state::is_unconfirmed(r.state());
                too_young = unconfirmed && r.idle_ms(now) < UNCONFIRMED_MIN_AGE_MS;
                unconfirmed && !too_young
            });
            if removed {
                worker.counters.count(Count::UnconfirmedEvicted);
                return true;
            }
            if too_young {
                // Seen lately (a retransmitted SYN-ACK, or a handshake in
                // progress): look at it again later.
                worker.recent.push_back(key);
            }
        }
        false
    }

    /// One expiry pass over the next [`SWEEP_SLOTS`] slots of the table
    /// (all of it when smaller): removes routes whose connection is over or
    /// that have been idle past the timeout; above 95 % of `max_routes`, also
    /// evicts toward 90 % — unconfirmed routes first, then confirmed ones
    /// only when the window holds no unconfirmed route left, longest idle
    /// first within each kind. Runs on the control plane; reads the routes
    /// without a lock, then removes one at a time (each checked again) so
    /// that new routes never wait long. Its memory is bounded by the window
    /// and [`EVICT_PER_PASS`], reused from pass to pass.
    pub fn expire(&self, now: u32) -> ExpireStats {
        let table = self.table.load();
        let mut sweep = self.sweep.lock().unwrap_or_else(|e| e.into_inner());
        let Sweep {
            cursor,
            expired,
            evict,
        } = &mut *sweep;
        let slots = self.routes.slots();
        let window = slots.min(SWEEP_SLOTS);
        let max_routes = self.routes.max();
        let len = self.routes.len();
        // This window's share of the excess over the low-water mark.
        let quota = if len > max_routes - max_routes / 20 {
            let excess = len - (max_routes - max_routes / 10);
            (excess * window).div_ceil(slots).min(EVICT_PER_PASS)
        } else {
            0
        };
        expired.clear();
        evict.clear();
        *cursor = self.routes.scan_window(*cursor, window, |k, r| {
            if self.is_expired(&table, &k, &r, now) {
                expired.push(k);
            } else if quota > 0 {
                let unconfirmed = u64::from(state::is_unconfirmed(r.state()));
                let score = unconfirmed << 32 | u64::from(r.idle_ms(now));
                // Ties go by key, not by the order of the scan: evicting the
                // first routes of the window would empty its start and crowd
                // the rest into long probe runs.
                let candidate = Reverse((score, k, r.last_seen()));
                if evict.len() < quota {
                    evict.push(candidate);
                } else if evict.peek().is_some_and(|top| candidate < *top) {
                    evict.pop();
                    evict.push(candidate);
                }
            }
            ControlFlow::Continue(())
        });
        let mut stats = ExpireStats::default();
        for key in expired.iter() {
            if self
                .routes
                .remove_if(&table, key, |r| self.is_expired(&table, key, r, now))
            {
                stats.expired += 1;
            }
        }
        for Reverse((_, key, seen)) in evict.drain() {
            // Not if a packet came meanwhile.
            if self
                .routes
                .remove_if(&table, &key, |r| r.last_seen() == seen)
            {
                stats.evicted += 1;
            }
        }
        self.expired
            .fetch_add(stats.expired as u64, Ordering::Relaxed);
        self.evicted
            .fetch_add(stats.evicted as u64, Ordering::Relaxed);
        stats
    }

    /// Routes removed by expiry (connection over, or idle) and by eviction
    /// (table near `max_routes`) since the start.
    pub fn removed_totals(&self) -> ExpireStats {
        ExpireStats {
            expired: self.expired.load(Ordering::Relaxed) as usize,
            evicted: self.evicted.load(Ordering::Relaxed) as usize,
        }
    }

    fn is_expired(&self, table: &TransferTable, key: &FlowKey, route: &Route, now: u32) -> bool {
        let idle = route.idle_ms(now);
        if idle >= self.idle_timeout_ms.load(Ordering::Relaxed) {
            return true;
        }
        if !table.service(key.service).is_tcp() {
            return false;
        }
        let st = route.state();
        (state::is_closed(st) && idle >= CLOSED_LINGER_MS)
            || (state::is_unconfirmed(st) && idle >= EMBRYONIC_TIMEOUT_MS)
    }
}

/// A SYN that opens a connection (no ACK, no RST).
fn is_bare_syn(flags: u8) -> bool {
    flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN
}

/// The confirming bit a client packet sets on a route in state `st`: for
/// TCP, the handshake's last ACK (or any later segment); for UDP, a datagram
/// after the back end has replied.
#[inline]
fn confirm_bit(svc: &Service, flags: u8, st: u8) -> u8 {
    let confirms = if svc.is_tcp() {
        flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::ACK
    } else {
        st & state::REPLIED != 0
    };
    if confirms {
        state::ESTABLISHED
    } else {
        0
    }
}

/// The route state bits a segment's FIN/RST set; `fin` says whose FIN it is.
fn close_bits(flags: u8, fin: u8) -> u8 {
    let mut bits = 0;
    if flags & tcp_flags::FIN != 0 {
        bits |= fin;
    }
    if flags & tcp_flags::RST != 0 {
        bits |= state::RESET;
    }
    bits
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use etherparse::PacketBuilder;

    use super::*;
    use crate::wire::{addr_from_ip, ip_from_addr};

    /// Document 003's transfer table, with A–F on 10.0.2.1–6, VIP 10.0.0.100.
    const GOLDEN: &str = r#"
route_idle_timeout_s = 60
max_routes = 100
[[node]]
name = "A"
address = "10.0.2.1"
[[node]]
name = "B"
address = "10.0.2.2"
[[node]]
name = "C"
address = "10.0.2.3"
[[node]]
name = "D"
address = "10.0.2.4"
[[node]]
name = "E"
address = "10.0.2.5"
[[node]]
name = "F"
address = "10.0.2.6"
[[service]]
name = "s8080"
vip = "10.0.0.100"
port = 8080
protocol = "tcp"
backend = [{ node = "A", ratio = 1 }, { node = "B", ratio = 1 }]
[[service]]
name = "s8081"
vip = "10.0.0.100"
port = 8081
protocol = "tcp"
backend = [{ node = "C", ratio = 2 }, { node = "D", ratio = 1 }]
[[service]]
name = "s8082"
vip = "10.0.0.100"
port = 8082
protocol = "tcp"
backend = [{ node = "E", ratio = 1 }, { node = "F", ratio = 1 }]
"#;

    const VIP: [u8; 4] = [10, 0, 0, 100];

    struct Rig {
        d: Dispatcher,
        w: std::cell::RefCell<Worker>,
    }

    fn rig(text: &str) -> Rig {
        Rig {
            d: Dispatcher::new(&FepConfig::parse(text).unwrap()),
            w: std::cell::RefCell::new(Worker::new(Arc::default())),
        }
    }

    fn client(n: u8) -> [u8; 4] {
        [192, 0, 2, n]
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 1000);
        if flags & tcp_flags::SYN != 0 {
            b = b.syn();
        }
        if flags & tcp_flags::ACK != 0 {
            b = b.ack(1);
        }
        if flags & tcp_flags::FIN != 0 {
            b = b.fin();
        }
        if flags & tcp_flags::RST != 0 {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, b"data").unwrap();
        out
    }

    const SYN: u8 = tcp_flags::SYN;
    const ACK: u8 = tcp_flags::ACK;
    const FIN_ACK: u8 = tcp_flags::FIN | tcp_flags::ACK;

    impl Rig {
        fn run(&self, mut pkt: Vec<u8>, now: u32) -> (Verdict, Vec<u8>) {
            let v = self.d.process(&mut pkt, now, &mut self.w.borrow_mut());
            (v, pkt)
        }

        /// Sends a client packet; returns the back end's node name it went to.
        fn send(
            &self,
            client: [u8; 4],
            sport: u16,
            port: u16,
            flags: u8,
            now: u32,
        ) -> Result<String, DropReason> {
            match self.run(tcp(client, sport, VIP, port, flags), now) {
                (Verdict::Forward(_), out) => {
                    let p = etherparse::SlicedPacket::from_ip(&out).unwrap();
                    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
                        panic!()
                    };
                    let dst = IpAddr::V4(ip.header().destination_addr());
                    let table = self.d.table();
                    let node = table
                        .services()
                        .iter()
                        .flat_map(|s| &s.backends)
                        .find(|b| ip_from_addr(&b.addr) == dst)
                        .unwrap();
                    Ok(node.node.clone())
                }
                (Verdict::Drop(r), _) => Err(r),
            }
        }

        /// Sends a back end's reply; returns the (source, source port) the client sees.
        fn reply(
            &self,
            node_ip: [u8; 4],
            port: u16,
            client: [u8; 4],
            cport: u16,
            flags: u8,
            now: u32,
        ) -> Result<(IpAddr, u16), DropReason> {
            match self.run(tcp(node_ip, port, client, cport, flags), now) {
                (Verdict::Forward(_), out) => {
                    let p = etherparse::SlicedPacket::from_ip(&out).unwrap();
                    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
                        panic!()
                    };
                    let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
                        panic!()
                    };
                    Ok((IpAddr::V4(ip.header().source_addr()), t.source_port()))
                }
                (Verdict::Drop(r), _) => Err(r),
            }
        }

        fn counters(&self) -> Arc<WorkerCounters> {
            self.w.borrow().counters.clone()
        }

        fn routes(&self) -> usize {
            self.d.routes().len()
        }
    }

    #[test]
    fn a_worker_uses_a_new_transfer_table_from_its_next_packet() {
        let r = rig(GOLDEN);
        assert_eq!(
            r.send(client(1), 5000, 9000, SYN, 0),
            Err(DropReason::UnknownFlow),
            "no service on 9000 yet"
        );
        let added = format!(
            "{GOLDEN}\n[[service]]\nname = \"s9000\"\nvip = \"10.0.0.100\"\nport = 9000\nprotocol = \"tcp\"\nbackend = [{{ node = \"F\", ratio = 1 }}]\n"
        );
        let cfg = FepConfig::parse(&added).unwrap();
        r.d.set_table(TransferTable::build(&cfg, Some(&r.d.table())));
        assert_eq!(r.send(client(1), 5000, 9000, SYN, 1).as_deref(), Ok("F"));
        // Routes made under the old table keep working.
        assert!(r.send(client(2), 5000, 8080, SYN, 2).is_ok());
    }

    #[test]
    fn a_removed_service_keeps_its_live_routes_and_opens_no_new_one() {
        let r = rig(GOLDEN);
        assert_eq!(r.send(client(1), 5000, 8082, SYN, 0).as_deref(), Ok("E"));
        let without = GOLDEN
            .split("[[service]]\nname = \"s8082\"")
            .next()
            .unwrap();
        let cfg = FepConfig::parse(without).unwrap();
        r.d.set_table(TransferTable::build(&cfg, Some(&r.d.table())));
        assert_eq!(
            r.send(client(1), 5000, 8082, ACK, 1).as_deref(),
            Ok("E"),
            "the client's segments still reach its back end"
        );
        assert_eq!(
            r.reply([10, 0, 2, 5], 8082, client(1), 5000, ACK, 1),
            Ok((IpAddr::V4(VIP.into()), 8082))
        );
        assert_eq!(
            r.send(client(2), 5000, 8082, SYN, 2),
            Err(DropReason::UnknownFlow),
            "no new route for a removed service"
        );
        assert_eq!(r.routes(), 1);
        // Path MTU discovery still works for the route.
        let (v, out) = r.run(
            crate::wire::icmp::tests::error_v4(
                "10.0.1.1",
                "10.0.0.100",
                "10.0.0.100",
                8082,
                "192.0.2.1",
                5000,
            ),
            3,
        );
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[16..20], &[10, 0, 2, 5], "to the back end");
    }

    #[test]
    fn replies_find_their_route_when_one_back_end_serves_two_services() {
        // A serves 8080 and, on the same port, a second VIP's 9090.
        let r = rig(&GOLDEN.replace(
            "[[service]]\nname = \"s8081\"",
            "[[service]]\nname = \"other\"\nvip = \"10.0.0.101\"\nport = 9090\nprotocol = \"tcp\"\nbackend = [{ node = \"A\", ratio = 1, port = 8080 }]\n\n[[service]]\nname = \"s8081\"",
        ));
        let a = [10, 0, 2, 1];
        let other_vip = [10, 0, 0, 101];
        let mut pkt = tcp(client(1), 5000, other_vip, 9090, SYN);
        assert!(matches!(r.run(pkt.clone(), 0).0, Verdict::Forward(_)));
        // Same client, another port, to the first VIP: A or B.
        let first = r.send(client(1), 5001, 8080, SYN, 0).unwrap();
        assert_eq!(
            r.reply(a, 8080, client(1), 5000, ACK, 1),
            Ok((IpAddr::V4(other_vip.into()), 9090)),
            "the reply carries the VIP the client used"
        );
        let first_ip = if first == "A" { a } else { [10, 0, 2, 2] };
        assert_eq!(
            r.reply(first_ip, 8080, client(1), 5001, ACK, 1),
            Ok((IpAddr::V4(VIP.into()), 8080))
        );
        // A back end that does not hold a route cannot answer on it.
        let not_first = if first == "A" { [10, 0, 2, 2] } else { a };
        assert_eq!(
            r.reply(not_first, 8080, client(1), 5001, ACK, 1),
            Err(DropReason::UnknownFlow)
        );
        // Nor can anyone answer for a client port without a route.
        assert_eq!(
            r.reply(a, 8080, client(1), 5002, ACK, 1),
            Err(DropReason::UnknownFlow)
        );
        pkt = tcp(client(1), 5000, other_vip, 9090, ACK);
        assert!(matches!(r.run(pkt, 2).0, Verdict::Forward(_)));
    }

    #[test]
    fn golden_six_new_clients_of_8081_go_c_d_c_c_d_c() {
        for scheduler in ["ratio", "least-routes"] {
            let r = rig(&GOLDEN.replace(
                "port = 8081\n",
                &format!("port = 8081\nscheduler = \"{scheduler}\"\n"),
            ));
            let got: Vec<String> = (1..=6)
                .map(|n| r.send(client(n), 1000, 8081, SYN, 0).unwrap())
                .collect();
            assert_eq!(got, ["C", "D", "C", "C", "D", "C"], "{scheduler}");
        }
    }

    #[test]
    fn golden_one_to_one_service_alternates() {
        let r = rig(GOLDEN);
        let got: Vec<String> = (1..=4)
            .map(|n| r.send(client(n), 1000, 8080, SYN, 0).unwrap())
            .collect();
        assert_eq!(got, ["A", "B", "A", "B"]);
    }

    #[test]
    fn routes_are_sticky_even_when_ratios_change() {
        let r = rig(GOLDEN);
        let first = r.send(client(1), 1000, 8081, SYN, 0).unwrap();
        assert_eq!(first, "C");
        r.d.table().service(1).backends[0].set_ratio(0);
        for t in 1..20 {
            assert_eq!(r.send(client(1), 1000, 8081, ACK, t).unwrap(), "C");
        }
        // Ratio 0: no new routes to C, its existing route keeps working.
        for n in 2..10 {
            assert_eq!(r.send(client(n), 1000, 8081, SYN, 30).unwrap(), "D");
        }
        assert_eq!(r.send(client(1), 1000, 8081, ACK, 31).unwrap(), "C");
    }

    #[test]
    fn two_ports_of_one_client_may_land_on_different_backends() {
        let r = rig(GOLDEN);
        assert_eq!(r.send(client(1), 1000, 8080, SYN, 0).unwrap(), "A");
        assert_eq!(r.send(client(1), 1001, 8080, SYN, 0).unwrap(), "B");
        assert_eq!(r.routes(), 2);
    }

    #[test]
    fn the_service_is_part_of_the_key() {
        let r = rig(GOLDEN);
        assert_eq!(r.send(client(1), 1000, 8080, SYN, 0).unwrap(), "A");
        assert_eq!(r.send(client(1), 1000, 8082, SYN, 0).unwrap(), "E");
        assert_eq!(r.routes(), 2);
    }

    #[test]
    fn replies_are_rewritten_to_the_vip_and_service_port() {
        let r = rig(&GOLDEN.replace(
            "{ node = \"A\", ratio = 1 }",
            "{ node = \"A\", ratio = 1, port = 9000 }",
        ));
        assert_eq!(r.send(client(1), 1234, 8080, SYN, 0).unwrap(), "A");
        let seen = r
            .reply([10, 0, 2, 1], 9000, client(1), 1234, SYN | ACK, 1)
            .unwrap();
        assert_eq!(seen, (IpAddr::from(VIP), 8080));
        // A reply from the wrong port, or to another client, is not ours.
        assert_eq!(
            r.reply([10, 0, 2, 1], 8080, client(1), 1234, ACK, 1),
            Err(DropReason::UnknownFlow)
        );
        assert_eq!(
            r.reply([10, 0, 2, 1], 9000, client(2), 1234, ACK, 1),
            Err(DropReason::UnknownFlow)
        );
        assert_eq!(
            r.counters()
                .traffic(0)
                .to_client_packets
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn unknown_services_stray_segments_and_empty_services_are_dropped_and_counted() {
        let r = rig(&GOLDEN.replace(
            "{ node = \"E\", ratio = 1 }, { node = \"F\", ratio = 1 }",
            "{ node = \"E\", ratio = 0 }",
        ));
        assert_eq!(
            r.send(client(1), 1000, 9999, SYN, 0),
            Err(DropReason::UnknownFlow)
        );
        assert_eq!(
            r.send(client(1), 1000, 8080, ACK, 0),
            Err(DropReason::NoRoute)
        );
        assert_eq!(
            r.send(client(1), 1000, 8082, SYN, 0),
            Err(DropReason::NoBackend)
        );
        let (v, _) = r.run(vec![0x45, 0, 0], 0);
        assert_eq!(v, Verdict::Drop(DropReason::Malformed));
        for reason in [
            DropReason::UnknownFlow,
            DropReason::NoRoute,
            DropReason::NoBackend,
            DropReason::Malformed,
        ] {
            assert_eq!(r.counters().drops(reason), 1, "{reason:?}");
        }
        assert_eq!(r.routes(), 0);
    }

    #[test]
    fn a_route_ends_after_fin_both_ways_and_a_short_linger() {
        let r = rig(GOLDEN);
        r.send(client(1), 1000, 8080, SYN, 0).unwrap();
        r.reply([10, 0, 2, 1], 8080, client(1), 1000, SYN | ACK, 1)
            .unwrap();
        r.send(client(1), 1000, 8080, FIN_ACK, 100).unwrap();
        assert_eq!(
            r.d.expire(100 + CLOSED_LINGER_MS),
            ExpireStats::default(),
            "half-closed stays"
        );
        r.reply([10, 0, 2, 1], 8080, client(1), 1000, FIN_ACK, 200)
            .unwrap();
        r.send(client(1), 1000, 8080, ACK, 210).unwrap();
        assert_eq!(r.d.expire(210 + CLOSED_LINGER_MS - 1).expired, 0, "lingers");
        assert_eq!(r.d.expire(210 + CLOSED_LINGER_MS).expired, 1);
        assert_eq!(r.routes(), 0);
        assert_eq!(r.d.table().service(0).backends[0].routes(), 0);
        // The reply index went with it.
        assert_eq!(
            r.reply([10, 0, 2, 1], 8080, client(1), 1000, ACK, 5000),
            Err(DropReason::UnknownFlow)
        );
    }

    #[test]
    fn a_reset_ends_the_route_and_a_new_syn_on_a_closed_route_reopens_it() {
        let r = rig(GOLDEN);
        assert_eq!(r.send(client(1), 1000, 8080, SYN, 0).unwrap(), "A");
        r.reply([10, 0, 2, 1], 8080, client(1), 1000, tcp_flags::RST, 1)
            .unwrap();
        // Same client port connects again before the linger is over: same back end, fresh state.
        assert_eq!(r.send(client(1), 1000, 8080, SYN, 2).unwrap(), "A");
        assert_eq!(r.d.expire(2 + CLOSED_LINGER_MS).expired, 0);
        assert_eq!(r.routes(), 1);
    }

    #[test]
    fn idle_established_routes_expire_after_the_idle_timeout_and_busy_ones_stay() {
        // GOLDEN: route_idle_timeout_s = 60. Both connections are through
        // their handshake, so neither the embryonic timeout nor the linger
        // applies: only the idle timeout can remove them.
        let r = rig(GOLDEN);
        r.connect(client(1), 1000, 0);
        r.connect(client(2), 1000, 0);
        r.send(client(2), 1000, 8080, ACK, 50_000).unwrap();
        assert_eq!(
            r.d.expire(59_999),
            ExpireStats::default(),
            "not idle long enough"
        );
        assert_eq!(r.d.expire(60_000).expired, 1);
        assert_eq!(r.send(client(2), 1000, 8080, ACK, 60_001).unwrap(), "B");
        assert_eq!(
            r.send(client(1), 1000, 8080, ACK, 60_001),
            Err(DropReason::NoRoute)
        );
    }

    #[test]
    fn udp_routes_expire_after_the_idle_timeout_answered_or_not() {
        let r = with_udp();
        let key = |n: u8| FlowKey {
            service: 3,
            client_port: 1000,
            client: addr_from_ip(IpAddr::from(client(n))),
        };
        // Confirmed (a datagram after a reply), unconfirmed, and busy.
        let be = r.udp(client(1), 1000, 0).unwrap();
        r.udp_reply(be, client(1), 1000, 0);
        r.udp(client(1), 1000, 0).unwrap();
        r.udp(client(2), 1000, 0).unwrap();
        r.udp(client(3), 1000, 0).unwrap();
        r.udp(client(3), 1000, 30_000).unwrap();
        // Far past the embryonic timeout, which is TCP's only.
        assert_eq!(r.d.expire(59_999), ExpireStats::default());
        assert_eq!(r.d.expire(60_000).expired, 2);
        assert!(r.d.routes().backend_of(&key(1)).is_none());
        assert!(r.d.routes().backend_of(&key(2)).is_none());
        assert!(r.d.routes().backend_of(&key(3)).is_some());
        assert_eq!(r.d.expire(89_999).expired, 0);
        assert_eq!(r.d.expire(90_000).expired, 1);
        assert_eq!(r.routes(), 0);
    }

    #[test]
    fn the_table_never_exceeds_max_routes_and_pressure_evicts_the_longest_idle() {
        let r = rig(GOLDEN);
        for n in 0..100u16 {
            let be = r
                .send(client(1), 2000 + n, 8080, SYN, u32::from(n))
                .unwrap();
            let be_ip = if be == "A" {
                [10, 0, 2, 1]
            } else {
                [10, 0, 2, 2]
            };
            r.reply(be_ip, 8080, client(1), 2000 + n, SYN | ACK, u32::from(n))
                .unwrap();
        }
        assert_eq!(
            r.send(client(1), 3000, 8080, SYN, 200),
            Err(DropReason::TableFull)
        );
        assert_eq!(r.routes(), 100);
        let s = r.d.expire(300);
        assert_eq!(s.evicted, 10);
        assert_eq!(r.routes(), 90);
        // The ten oldest went; the newest stays.
        assert_eq!(
            r.send(client(1), 2000, 8080, ACK, 301),
            Err(DropReason::NoRoute)
        );
        assert!(r.send(client(1), 2099, 8080, ACK, 301).is_ok());
        assert!(r.send(client(1), 3000, 8080, SYN, 302).is_ok());
    }

    #[test]
    fn the_expiry_pass_evicts_only_above_95_percent_and_down_to_90_longest_idle_first() {
        // GOLDEN: max_routes = 100. Confirmed routes, idle the longer the
        // lower their client port.
        let r = rig(GOLDEN);
        for n in 0..95u16 {
            r.connect(client(1), 2000 + n, u32::from(n));
        }
        assert_eq!(
            r.d.expire(200),
            ExpireStats::default(),
            "at 95 % nothing is evicted"
        );
        r.connect(client(1), 2095, 200);
        assert_eq!(r.routes(), 96);
        assert_eq!(r.d.expire(201).evicted, 6, "above 95 %: down to 90 %");
        assert_eq!(r.routes(), 90);
        for n in 0..96u16 {
            let kept = r.send(client(1), 2000 + n, 8080, ACK, 202).is_ok();
            assert_eq!(
                kept,
                n >= 6,
                "client port {}: the six longest idle go",
                2000 + n
            );
        }
        assert_eq!(
            r.d.expire(203),
            ExpireStats::default(),
            "at 90 %: nothing more"
        );
    }

    #[test]
    fn a_syn_flood_cannot_crowd_out_new_clients() {
        let r = rig(GOLDEN);
        // An established connection, then a flood of SYNs (answered by the
        // back end, never completed) fills the table.
        r.send(client(200), 1, 8080, SYN, 0).unwrap();
        r.reply([10, 0, 2, 1], 8080, client(200), 1, SYN | ACK, 0)
            .unwrap();
        r.send(client(200), 1, 8080, ACK, 0).unwrap();
        for n in 0..99u16 {
            r.send(client(1), 2000 + n, 8080, SYN, 0).unwrap();
        }
        assert_eq!(r.routes(), 100);
        // A new client a while later takes the oldest flood route's place …
        assert!(r
            .send(client(2), 5000, 8080, SYN, UNCONFIRMED_MIN_AGE_MS)
            .is_ok());
        assert_eq!(r.routes(), 100);
        assert_eq!(r.counters().get(Count::UnconfirmedEvicted), 1);
        assert_eq!(
            r.send(client(1), 2000, 8080, ACK, UNCONFIRMED_MIN_AGE_MS + 1),
            Err(DropReason::NoRoute)
        );
        // … the established connection is never evicted …
        let later = 2 * UNCONFIRMED_MIN_AGE_MS;
        for n in 0..200u16 {
            let _ = r.send(client(3), 6000 + n, 8080, SYN, later);
        }
        assert!(r.counters().get(Count::UnconfirmedEvicted) >= 99);
        assert!(r.send(client(200), 1, 8080, ACK, later).is_ok());
        // … and a handshake younger than UNCONFIRMED_MIN_AGE_MS is not cut.
        let r = rig(GOLDEN);
        for n in 0..100u16 {
            r.send(client(1), 2000 + n, 8080, SYN, 0).unwrap();
        }
        assert_eq!(
            r.send(client(2), 5000, 8080, SYN, UNCONFIRMED_MIN_AGE_MS - 1),
            Err(DropReason::TableFull)
        );
        // Never-answered routes expire after EMBRYONIC_TIMEOUT_MS.
        assert_eq!(r.d.expire(EMBRYONIC_TIMEOUT_MS).expired, 100);
    }

    #[test]
    fn icmp_echo_to_a_vip_is_answered_and_errors_about_routes_are_translated() {
        use crate::wire::icmp::tests::{assert_icmp_checksums, error_v4};
        let r = rig(GOLDEN);
        let mut ping = Vec::new();
        PacketBuilder::ipv4(client(9), VIP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, b"x")
            .unwrap();
        let (v, out) = r.run(ping.clone(), 0);
        assert!(matches!(v, Verdict::Forward(_)));
        assert_eq!((&out[12..16], &out[16..20]), (&VIP[..], &client(9)[..]));
        ping[16..20].copy_from_slice(&[10, 9, 9, 9]);
        assert_eq!(
            r.run(ping, 0).0,
            Verdict::Drop(DropReason::UnknownFlow),
            "not a VIP"
        );

        // A route: client(1):40000 → 8080 → A (10.0.2.1).
        r.send(client(1), 40000, 8080, SYN, 0).unwrap();
        // The gateway cannot pass the reply VIP:8080 → client on: its
        // error goes to the VIP, and fep hands it to A about A's own segment.
        let (v, out) = r.run(
            error_v4(
                "10.0.1.1",
                "10.0.0.100",
                "10.0.0.100",
                8080,
                "192.0.2.1",
                40000,
            ),
            1,
        );
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[16..20], &[10, 0, 2, 1], "to the back end");
        assert_eq!(
            &out[28 + 12..28 + 16],
            &[10, 0, 2, 1],
            "about its own packet"
        );
        assert_icmp_checksums(&out);
        // A itself reports a problem with the client's segment: to the
        // client, from the VIP, about its segment to the VIP.
        let (v, out) = r.run(
            error_v4(
                "10.0.2.1",
                "192.0.2.1",
                "192.0.2.1",
                40000,
                "10.0.2.1",
                8080,
            ),
            1,
        );
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!((&out[12..16], &out[28 + 16..28 + 20]), (&VIP[..], &VIP[..]));
        assert_icmp_checksums(&out);
        // About no known route: dropped.
        let (v, _) = r.run(
            error_v4(
                "10.0.1.1",
                "10.0.0.100",
                "10.0.0.100",
                8080,
                "192.0.2.77",
                1,
            ),
            1,
        );
        assert_eq!(v, Verdict::Drop(DropReason::UnknownFlow));
    }

    /// An IPv6 packet `src:sport → dst:dport`: a TCP segment with 1400
    /// bytes of data, or a UDP datagram.
    fn packet6(tcp: bool, src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        use crate::wire::icmp::tests::v6;
        let b = PacketBuilder::ipv6(v6(src), v6(dst), 63);
        let mut out = Vec::new();
        if tcp {
            b.tcp(sport, dport, 7, 100)
                .ack(1)
                .write(&mut out, &[0x5a; 1400])
                .unwrap();
        } else {
            b.udp(sport, dport).write(&mut out, b"query").unwrap();
        }
        out
    }

    /// An ICMPv6 error of type `ty` from `from` to `to` quoting `about`: its
    /// IPv6 header and up to 48 bytes (a whole TCP header and some data).
    fn error6(ty: u8, from: &str, to: &str, about: &[u8]) -> Vec<u8> {
        use crate::wire::icmp::tests::v6;
        let quoted = &about[..about.len().min(40 + 48)];
        let mut out = Vec::new();
        PacketBuilder::ipv6(v6(from), v6(to), 64)
            .icmpv6_raw(ty, 0, [0, 0, 0x05, 0x78])
            .write(&mut out, quoted)
            .unwrap();
        out
    }

    #[test]
    fn icmpv6_errors_are_translated_both_ways_with_inner_addresses_and_checksums() {
        use crate::wire::icmp::tests::{assert_icmp_checksums, v6};
        let r = rig(r#"
[[node]]
name = "b1"
address = "fd00:2::11"
[[service]]
name = "web6"
vip = "fd00::100"
port = 80
protocol = "tcp"
backend = [{ node = "b1", ratio = 1, port = 8080 }]
[[service]]
name = "dns6"
vip = "fd00::100"
port = 53
protocol = "udp"
backend = [{ node = "b1", ratio = 1, port = 5353 }]
"#);
        let (client, vip, be) = ("fd00:1::2", "fd00::100", "fd00:2::11");
        let mut syn = Vec::new();
        PacketBuilder::ipv6(v6(client), v6(vip), 64)
            .tcp(40000, 80, 1, 1000)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let (v, out) = r.run(syn, 0);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[24..40], &v6(be)[..]);
        let (v, _) = r.run(packet6(false, client, 5000, vip, 53), 0);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        // What an error carries after the outer IPv6 and ICMPv6 headers must
        // be, byte for byte, the start of `want`: addresses, ports and the
        // L4 checksum as if that packet had been sent.
        let quotes = |out: &[u8], want: &[u8]| {
            assert_eq!(&out[48..], &want[..out.len() - 48], "the quoted packet");
        };

        // "Packet too big" from a router toward the client, about the reply
        // VIP:80 → client: to the back end, from the VIP, about its own
        // segment be:8080 → client.
        let reply = packet6(true, vip, 80, client, 40000);
        let (v, out) = r.run(error6(2, "fd00:1::1", vip, &reply), 1);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!((&out[8..24], &out[24..40]), (&v6(vip)[..], &v6(be)[..]));
        assert_eq!(out[40], 2, "still packet too big");
        quotes(&out, &packet6(true, be, 8080, client, 40000));
        assert_icmp_checksums(&out);

        // The back end's "port unreachable" about the client's datagram
        // client → be:5353: to the client, from the VIP, about its datagram
        // to VIP:53.
        let datagram = packet6(false, client, 5000, be, 5353);
        let (v, out) = r.run(error6(1, be, client, &datagram), 1);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!((&out[8..24], &out[24..40]), (&v6(vip)[..], &v6(client)[..]));
        quotes(&out, &packet6(false, client, 5000, vip, 53));
        assert_icmp_checksums(&out);

        // A router between the back end and the gateway, about the client's
        // segment client → be:8080: to the client, its own source kept,
        // about the segment to VIP:80.
        let segment = packet6(true, client, 40000, be, 8080);
        let (v, out) = r.run(error6(1, "fd00:2::1", client, &segment), 1);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(
            (&out[8..24], &out[24..40]),
            (&v6("fd00:2::1")[..], &v6(client)[..])
        );
        quotes(&out, &packet6(true, client, 40000, vip, 80));
        assert_icmp_checksums(&out);

        // About a flow fep does not know: dropped.
        let stranger = packet6(true, vip, 80, client, 40001);
        let (v, _) = r.run(error6(2, "fd00:1::1", vip, &stranger), 1);
        assert_eq!(v, Verdict::Drop(DropReason::UnknownFlow));
        assert_eq!(r.counters().get(Count::IcmpErrorsTranslated), 3);
    }

    #[test]
    fn client_affinity_keeps_every_connection_of_a_client_on_one_backend() {
        let r = rig(&GOLDEN.replace("port = 8081\n", "port = 8081\naffinity = \"client\"\n"));
        let first = r.send(client(1), 1000, 8081, SYN, 0).unwrap();
        for port in 1001..1010 {
            assert_eq!(r.send(client(1), port, 8081, SYN, 0).unwrap(), first);
        }
        // Another client gets the next choice.
        assert_eq!(r.send(client(2), 1000, 8081, SYN, 0).unwrap(), "D");
        // Once all of client 1's routes are gone, it is chosen afresh.
        assert_eq!(r.d.expire(60_000).expired, 11);
        assert!(r
            .d
            .routes()
            .sticky(1, addr_from_ip(IpAddr::from(client(1))))
            .is_none());
    }

    #[test]
    fn udp_flows_are_routed_by_source_port() {
        let r = rig(r#"
[[node]]
name = "u1"
address = "fd00::11"
[[node]]
name = "u2"
address = "fd00::12"
[[service]]
name = "dns"
vip = "fd00::100"
port = 53
protocol = "udp"
backend = [{ node = "u1", ratio = 1 }, { node = "u2", ratio = 1 }]
"#);
        let udp = |sport: u16, now| {
            let mut out = Vec::new();
            PacketBuilder::ipv6(
                [0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                "fd00::100".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                64,
            )
            .udp(sport, 53)
            .write(&mut out, b"q")
            .unwrap();
            let (v, out) = r.run(out, now);
            assert!(matches!(v, Verdict::Forward(_)));
            out[24 + 15]
        };
        assert_eq!(udp(5000, 0), 0x11);
        assert_eq!(udp(5001, 0), 0x12);
        for t in 1..10 {
            assert_eq!(udp(5000, t), 0x11);
        }
    }

    /// GOLDEN with a UDP service on port 53 over A and B.
    fn with_udp() -> Rig {
        rig(&format!(
            "{GOLDEN}\n[[service]]\nname = \"s53\"\nvip = \"10.0.0.100\"\nport = 53\nprotocol = \"udp\"\n\
             backend = [{{ node = \"A\", ratio = 1 }}, {{ node = \"B\", ratio = 1 }}]\n"
        ))
    }

    fn udp_v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, b"q")
            .unwrap();
        out
    }

    impl Rig {
        /// A client datagram to VIP:53; the back end's address it went to.
        fn udp(&self, client: [u8; 4], sport: u16, now: u32) -> Result<[u8; 4], DropReason> {
            match self.run(udp_v4(client, sport, VIP, 53), now) {
                (Verdict::Forward(_), out) => Ok(out[16..20].try_into().unwrap()),
                (Verdict::Drop(r), _) => Err(r),
            }
        }

        fn udp_reply(&self, be: [u8; 4], client: [u8; 4], cport: u16, now: u32) {
            let (v, _) = self.run(udp_v4(be, 53, client, cport), now);
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        }

        fn confirmed(&self) -> Vec<Confirmed> {
            let mut all = Vec::new();
            self.d.take_confirmed(|c| all.push(c));
            all
        }

        /// A TCP connection through its handshake: confirmed.
        fn connect(&self, client: [u8; 4], sport: u16, now: u32) {
            let be = self.send(client, sport, 8080, SYN, now).unwrap();
            let be_ip = if be == "A" {
                [10, 0, 2, 1]
            } else {
                [10, 0, 2, 2]
            };
            self.reply(be_ip, 8080, client, sport, SYN | ACK, now)
                .unwrap();
            self.send(client, sport, 8080, ACK, now).unwrap();
        }
    }

    #[test]
    fn a_route_is_confirmed_by_the_handshake_or_a_datagram_after_a_reply_and_journaled_once() {
        let r = with_udp();
        let be = r.udp(client(1), 1000, 0).unwrap();
        r.udp(client(1), 1000, 1).unwrap();
        assert!(r.confirmed().is_empty(), "no reply yet: unconfirmed");
        r.udp_reply(be, client(1), 1000, 2);
        assert!(r.confirmed().is_empty(), "a reply alone does not confirm");
        r.udp(client(1), 1000, 3).unwrap();
        r.udp(client(1), 1000, 4).unwrap();
        let udp_key = FlowKey {
            service: 3,
            client_port: 1000,
            client: addr_from_ip(IpAddr::from(client(1))),
        };
        assert_eq!(
            r.confirmed(),
            [Confirmed {
                key: udp_key,
                backend: r.d.routes().backend_of(&udp_key).unwrap()
            }]
        );
        r.send(client(2), 7, 8080, SYN, 5).unwrap();
        assert!(r.confirmed().is_empty(), "embryonic");
        r.connect(client(3), 8, 6);
        r.send(client(3), 8, 8080, ACK, 7).unwrap();
        let c = r.confirmed();
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].key.client, addr_from_ip(IpAddr::from(client(3))));
        assert_eq!(r.d.journal_overflow(), 0);
    }

    #[test]
    fn a_datagram_flood_evicts_its_own_routes_never_confirmed_connections() {
        let r = with_udp();
        // Ten confirmed connections, idle since 0 (the longest idle) …
        for n in 0..10u16 {
            r.connect(client(100), 100 + n, 0);
        }
        // … then spoofed flows fill the table, answered but never followed up.
        for n in 0..90u16 {
            let be = r.udp(client(1), 2000 + n, 1_000).unwrap();
            r.udp_reply(be, client(1), 2000 + n, 1_000);
        }
        assert_eq!(r.routes(), 100);
        // The data path makes room from the flood's routes, once they are old enough.
        assert_eq!(r.udp(client(2), 1, 1_001), Err(DropReason::TableFull));
        assert!(r.udp(client(2), 1, 1_000 + UNCONFIRMED_MIN_AGE_MS).is_ok());
        // The expiry pass evicts toward 90 %: only the flood's routes.
        let s = r.d.expire(2_000);
        assert_eq!(s.evicted, 10);
        for n in 0..10u16 {
            assert!(
                r.send(client(100), 100 + n, 8080, ACK, 2_001).is_ok(),
                "confirmed connection {n} was evicted"
            );
        }
        // Once nothing unconfirmed is left, confirmed routes go, longest idle first.
        let r = with_udp();
        for n in 0..95u16 {
            r.connect(client(100), 100 + n, u32::from(n));
        }
        for n in 0..5u16 {
            r.send(client(5), 100 + n, 8080, SYN, 1_000).unwrap();
        }
        assert_eq!(r.d.expire(1_001).evicted, 10);
        for n in 0..5u16 {
            assert_eq!(
                r.send(client(5), 100 + n, 8080, ACK, 1_002),
                Err(DropReason::NoRoute),
                "the unconfirmed go first"
            );
            assert_eq!(
                r.send(client(100), 100 + n, 8080, ACK, 1_002),
                Err(DropReason::NoRoute),
                "then the longest idle"
            );
        }
        assert!(r.send(client(100), 105, 8080, ACK, 1_002).is_ok());
    }

    #[test]
    fn an_expiry_pass_looks_at_a_bounded_window_of_a_large_table() {
        let r = rig(&GOLDEN.replace("max_routes = 100", "max_routes = 1000000"));
        assert!(r.d.routes().room() >= 1_000_000);
        for n in 0..200u16 {
            r.send(client(1), 1000 + n, 8080, SYN, 0).unwrap();
        }
        let first = r.d.expire(EMBRYONIC_TIMEOUT_MS).expired;
        assert!(
            first > 0 && first < 200,
            "the first pass sees one window of two: {first}"
        );
        assert_eq!(first + r.d.expire(EMBRYONIC_TIMEOUT_MS).expired, 200);
        assert_eq!(r.routes(), 0);
    }

    #[test]
    fn evictions_among_equally_idle_routes_do_not_follow_the_table_order() {
        // All equally idle and unconfirmed: the key decides (the largest
        // client ports go), not where the routes sit in the table, which
        // would empty one end of it and crowd the other.
        let r = rig(GOLDEN);
        for n in 0..100u16 {
            r.send(client(1), 2000 + n, 8080, SYN, 0).unwrap();
        }
        assert_eq!(r.d.expire(1).evicted, 10);
        for n in 0..100u16 {
            let kept = r.send(client(1), 2000 + n, 8080, ACK, 2).is_ok();
            assert_eq!(kept, n < 90, "client port {}", 2000 + n);
        }
    }
}
