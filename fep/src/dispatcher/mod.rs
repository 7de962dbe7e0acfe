//! The data-plane core: one packet in, a verdict out, no I/O.
//!
//! [`Dispatcher::process`] parses a packet read from the TUN device, follows
//! or creates its route, rewrites it in place and says whether to write it
//! back. Time is passed in (milliseconds of a clock the caller owns), so unit
//! tests replay ageing and closes without sleeping.

mod expiry;
mod icmp;
#[cfg(test)]
mod rig;

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;

use fep_shared::FepConfig;

use expiry::Expiry;

use crate::counters::{Count, DropReason, WorkerCounters};
use crate::holds::{GroupId, Holds};
use crate::routes::{state, FlowKey, Refused, ReplyKey, Route, RouteRef, Routes, Row};
use crate::transfer_table::{BackendId, Service, ServiceId, TransferTable};
use crate::wire::{tcp_flags, FlowPacket, ParseError};

/// Under a flood, unconfirmed routes younger than this are not evicted by
/// the data path, so a real client's handshake or first answer in progress
/// is not cut.
pub const UNCONFIRMED_MIN_AGE_MS: u32 = 500;
/// Routes a worker remembers having opened, for eviction under a flood.
const RECENT_ROUTES: usize = 65_536;
/// Keys looked at per eviction before giving up.
const EVICT_ATTEMPTS: usize = 32;
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
    /// Replays held packets: a held group's packets go through, not back
    /// into the hold.
    replaying: bool,
}

impl Worker {
    pub fn new(counters: Arc<WorkerCounters>) -> Self {
        Worker {
            counters,
            recent: VecDeque::with_capacity(RECENT_ROUTES),
            table: None,
            replaying: false,
        }
    }

    /// The worker that replays a group's held packets when its hold ends.
    pub fn replayer(counters: Arc<WorkerCounters>) -> Self {
        Worker {
            replaying: true,
            ..Worker::new(counters)
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
    /// The packet's VIP group is held: store the packet as read, untouched,
    /// for [`Holds::release`] to replay.
    Hold(GroupId),
}

/// A route handed from the data path to the journal thread: one that just
/// became confirmed (journalled, so that a restart after a crash restores
/// it), or a VIP group's UDP route that just ended (so that the back end's
/// copy of it goes too, see `control::copies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub key: FlowKey,
    pub backend: BackendId,
}

#[derive(Debug)]
pub struct Dispatcher {
    /// Swapped whole when the config changes; each worker keeps the one it
    /// last loaded until `table_version` moves.
    table: ArcSwap<TransferTable>,
    /// Bumped after every new table, so workers know to load it.
    table_version: AtomicU64,
    routes: Routes,
    expiry: Expiry,
    confirmed: ArrayQueue<Confirmed>,
    /// VIP groups' UDP routes removed by expiry or pruning.
    ended: ArrayQueue<Confirmed>,
    /// With the kernel fast path on: routes just confirmed, for it to
    /// install without waiting for its scan of the table (which catches up
    /// on those this queue had no room for).
    established: Option<ArrayQueue<FlowKey>>,
    journal_overflow: AtomicU64,
    /// Whether a back end's SYN-ACK with no route makes one (see
    /// [`Dispatcher::adopt_handshakes`]).
    adopting: AtomicBool,
    holds: Holds,
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
            expiry: Expiry::default(),
            confirmed: ArrayQueue::new(JOURNAL_QUEUE),
            ended: ArrayQueue::new(JOURNAL_QUEUE),
            established: (cfg.fast_path != fep_shared::FastPath::Off)
                .then(|| ArrayQueue::new(JOURNAL_QUEUE)),
            journal_overflow: AtomicU64::new(0),
            adopting: AtomicBool::new(false),
            holds: Holds::new(
                cfg.vip_groups.len(),
                cfg.cluster.as_ref().map_or(0, |c| c.hold_max_bytes),
            ),
        };
        d.set_limits(cfg);
        d
    }

    /// The current transfer table.
    pub fn table(&self) -> Arc<TransferTable> {
        self.table.load_full()
    }

    /// Publishes a new transfer table (built from the current one, so that
    /// route slots keep their meaning).
    pub fn set_table(&self, table: TransferTable) {
        self.table.store(Arc::new(table));
        self.table_version.fetch_add(1, Ordering::Release);
    }

    /// Applies `route_idle_timeout_s` and `max_routes` (up to the room the
    /// route table was given at the start).
    pub fn set_limits(&self, cfg: &FepConfig) {
        self.expiry.set_idle_timeout(cfg.route_idle_timeout_s);
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

    pub fn holds(&self) -> &Holds {
        &self.holds
    }

    /// Every route of a VIP group's services: what a planned move copies.
    pub fn group_rows(&self, group: GroupId) -> Vec<Row> {
        let table = self.table();
        self.routes
            .export(|r| table.service(r.key.service).group == Some(group))
    }

    /// Deletes every route of a VIP group's services (on the old holder,
    /// once they are copied); how many.
    pub fn forget_group(&self, group: GroupId) -> usize {
        let table = self.table();
        self.routes
            .remove_where(&table, |k, _| table.service(k.service).group == Some(group))
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
                        Some((id, svc)) => match self.held(svc, worker) {
                            Some(group) => Verdict::Hold(group),
                            None => self.to_backend(&mut pkt, id, svc, now, worker),
                        },
                        None => match self.held_reply(&table, &pkt, worker) {
                            Some(group) => Verdict::Hold(group),
                            None => self.to_client(&table, &mut pkt, now, &worker.counters),
                        },
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

    /// The held group of a client packet to `svc`, unless `worker` replays.
    #[inline]
    fn held(&self, svc: &Service, worker: &Worker) -> Option<GroupId> {
        svc.group
            .filter(|&g| !worker.replaying && self.holds.is_held(g))
    }

    /// The held group of a back end's packet: one of a service behind its
    /// endpoint.
    #[inline]
    fn held_reply(
        &self,
        table: &TransferTable,
        pkt: &FlowPacket,
        worker: &Worker,
    ) -> Option<GroupId> {
        if !self.holds.any() || worker.replaying {
            return None;
        }
        table
            .services_behind(pkt.protocol(), &pkt.src_addr(), pkt.src_port())
            .iter()
            .find_map(|&s| self.held(table.service(s), worker))
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
        let hit = self.routes.get_and(&key, svc, |route| {
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
                Err(reason) => return refuse(pkt, svc, reason, &worker.counters),
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
        let flags = pkt.tcp_flags();
        let set = close_bits(flags, state::FIN_FROM_BACKEND) | state::REPLIED;
        let found = self.find_reply(table, &reply, |r| r.touch(now, set));
        let Some(key) = found.or_else(|| self.adopt(table, &reply, flags, now, counters)) else {
            return Verdict::Drop(DropReason::UnknownFlow);
        };
        let svc = table.service(key.service);
        pkt.set_source(&svc.vip, svc.port);
        counters.to_client(key.service, pkt.len());
        Verdict::Forward(pkt.len())
    }

    /// For the first minute after a start: a back end's SYN-ACK without a
    /// route answers a SYN the previous run forwarded and had not journaled
    /// yet (a route is journaled once confirmed). Its route is made from the
    /// reply, so the client's ACK reaches the back end holding the half-open
    /// connection instead of both sides retrying until they give up.
    pub fn adopt_handshakes(&self, on: bool) {
        self.adopting.store(on, Ordering::Relaxed);
    }

    /// The route for a SYN-ACK while adopting, when exactly one live service
    /// has the replying back end.
    #[cold]
    fn adopt(
        &self,
        table: &TransferTable,
        reply: &ReplyKey,
        flags: u8,
        now: u32,
        counters: &WorkerCounters,
    ) -> Option<FlowKey> {
        let syn_ack = tcp_flags::SYN | tcp_flags::ACK;
        if !self.adopting.load(Ordering::Relaxed)
            || flags & (syn_ack | tcp_flags::RST | tcp_flags::FIN) != syn_ack
        {
            return None;
        }
        let mut found = None;
        for &service in table.services_behind(reply.protocol, &reply.backend, reply.backend_port) {
            let svc = table.service(service);
            if svc.removed {
                continue;
            }
            if let Some((backend, _)) = svc.live_backends().find(|(_, b)| reply.is_from(b)) {
                if found.replace((service, backend)).is_some() {
                    return None; // two services behind it: which one is unknown
                }
            }
        }
        let (service, backend) = found?;
        let key = reply.key(service);
        let row = Row {
            key,
            route: Route::from_parts(backend, state::REPLIED, now),
        };
        (self.routes.import(table, [row]) == 1).then(|| {
            counters.count(Count::HandshakesAdopted);
            key
        })
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
            let key = reply.key(service);
            let svc = table.service(service);
            let holds = |b: BackendId| {
                svc.backends
                    .get(usize::from(b))
                    .is_some_and(|be| reply.is_from(be))
            };
            let found = self
                .routes
                .get_and(&key, svc, |r| !holds(r.backend()) || touch(r));
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
        if svc.is_full() {
            return Err(DropReason::ServiceFull);
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
        if let Some(q) = &self.established {
            let _ = q.push(key);
        }
    }

    /// Routes confirmed since the last call, for the kernel fast path
    /// (nothing when it is off).
    pub(crate) fn take_established(&self, mut f: impl FnMut(FlowKey)) {
        if let Some(q) = &self.established {
            while let Some(key) = q.pop() {
                f(key);
            }
        }
    }

    /// Routes confirmed since the last call, oldest first (for the journal).
    pub fn take_confirmed(&self, mut f: impl FnMut(Confirmed)) {
        while let Some(c) = self.confirmed.pop() {
            f(c);
        }
    }

    /// Removes `key`'s route if `cond` holds for it (see
    /// [`Routes::remove_if`]); a VIP group's UDP route is queued for
    /// [`Dispatcher::take_ended`]. For the control plane's removals of
    /// routes whose flow is over; true if it removed one.
    pub fn end_route_if(
        &self,
        table: &TransferTable,
        key: &FlowKey,
        cond: impl FnOnce(&Route) -> bool,
    ) -> bool {
        let Some(route) = self.routes.remove_if(table, key, cond) else {
            return false;
        };
        if table.service(key.service).copies_routes() {
            let ended = Confirmed {
                key: *key,
                backend: route.backend,
            };
            if self.ended.push(ended).is_err() {
                self.journal_overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    /// VIP groups' UDP routes ended since the last call, oldest first.
    pub fn take_ended(&self, mut f: impl FnMut(Confirmed)) {
        while let Some(c) = self.ended.pop() {
            f(c);
        }
    }

    /// Routes the journal thread's queues had no room for since the start:
    /// a confirmed route then waits for the next snapshot, an ended one's
    /// copy stays on its back end.
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
            if removed.is_some() {
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
}

/// A new client the service cannot place, full or without a back end to
/// choose: a TCP client's SYN is answered with a RST|ACK, so that it gives
/// up at once (and tries another site) instead of retrying into silence;
/// with `refuse_when_full = false`, and for UDP, the packet is dropped.
#[cold]
fn refuse(
    pkt: &mut FlowPacket,
    svc: &Service,
    reason: DropReason,
    counters: &WorkerCounters,
) -> Verdict {
    let unplaced = matches!(reason, DropReason::ServiceFull | DropReason::NoBackend);
    if !(unplaced && svc.is_tcp() && svc.refuse_when_full()) {
        return Verdict::Drop(reason);
    }
    match pkt.make_rst_reply() {
        Some(len) => {
            counters.count(Count::SynRefused);
            Verdict::Forward(len)
        }
        None => Verdict::Drop(reason),
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

    use super::expiry::EMBRYONIC_TIMEOUT_MS;
    use super::rig::*;
    use crate::wire::addr_from_ip;

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

    /// GOLDEN's services, their VIP in group G1 of a cluster.
    fn grouped() -> Rig {
        rig(&format!(
            "{GOLDEN}\n[cluster]\nnotify_fifo = \"/run/x\"\nhold_max_bytes = 131072\n\
             [[vip_group]]\nname = \"G1\"\nvips = [\"10.0.0.100\"]\n"
        ))
    }

    /// Ends group 0's hold through a replaying worker; what it forwarded,
    /// rewritten, in order.
    fn release(r: &Rig) -> Vec<Vec<u8>> {
        let mut w = Worker::replayer(Arc::default());
        let mut out = Vec::new();
        r.d.holds().release(0, |p| {
            if let Verdict::Forward(len) = r.d.process(p, 10, &mut w) {
                out.push(p[..len].to_vec());
            }
        });
        out
    }

    fn dst_of(pkt: &[u8]) -> std::net::Ipv4Addr {
        etherparse::Ipv4HeaderSlice::from_slice(pkt)
            .unwrap()
            .destination_addr()
    }

    #[test]
    fn a_held_groups_packets_wait_in_both_directions_and_open_no_route() {
        let r = grouped();
        assert!(r.d.holds().hold(0));
        let syn = tcp(client(1), 5000, VIP, 8080, SYN);
        assert_eq!(r.run(syn.clone(), 0), (Verdict::Hold(0), syn), "untouched");
        let reply = tcp([10, 0, 2, 1], 8080, client(1), 5000, ACK);
        assert_eq!(r.run(reply, 0).0, Verdict::Hold(0));
        assert_eq!(r.routes(), 0, "no row is made while held");
        let unrelated = tcp([10, 0, 9, 9], 8080, client(1), 5000, ACK);
        assert_eq!(
            r.run(unrelated, 0).0,
            Verdict::Drop(DropReason::UnknownFlow)
        );
    }

    #[test]
    fn a_released_hold_replays_in_order_through_the_routes_made_meanwhile() {
        let r = grouped();
        r.d.holds().hold(0);
        let mut held = Vec::new();
        for flags in [SYN, ACK] {
            let (v, pkt) = r.run(tcp(client(1), 5000, VIP, 8080, flags), 0);
            assert_eq!(v, Verdict::Hold(0));
            assert_eq!(r.d.holds().store(0, &pkt), crate::holds::Stored::Held);
            held.push(pkt);
        }
        let out = release(&r);
        assert_eq!(out.len(), 2, "the SYN opened the route the ACK follows");
        assert_eq!(dst_of(&out[0]), dst_of(&out[1]));
        assert_eq!(r.routes(), 1);
        // Normal again: the next packet goes straight through.
        assert!(r.send(client(1), 5000, 8080, ACK, 20).is_ok());
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
        // An empty service that does not refuse (else its SYN gets a RST).
        let r = rig(&GOLDEN.replace(
            "port = 8082\nprotocol = \"tcp\"\nbackend = [{ node = \"E\", ratio = 1 }, { node = \"F\", ratio = 1 }]",
            "port = 8082\nprotocol = \"tcp\"\nrefuse_when_full = false\nbackend = [{ node = \"E\", ratio = 0 }]",
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

    /// The RST|ACK fep sent back for a SYN from `client`:`sport` (the rig's
    /// SYN: seq 1, 4 bytes of data) to the VIP's `port`: every field checked.
    fn assert_refused(r: &Rig, client: [u8; 4], sport: u16, port: u16, now: u32) {
        let (v, out) = r.run(tcp(client, sport, VIP, port, SYN), now);
        let Verdict::Forward(len) = v else {
            panic!("not refused: {v:?}")
        };
        assert_rst_to(
            &out[..len],
            IpAddr::from(VIP),
            IpAddr::from(client),
            port,
            sport,
            1 + 4 + 1,
        );
    }

    /// `pkt` is a RST|ACK from `from`:`port` to `to`:`sport` acknowledging
    /// up to `ack`, with valid checksums.
    fn assert_rst_to(pkt: &[u8], from: IpAddr, to: IpAddr, port: u16, sport: u16, ack: u32) {
        crate::testing::checksums_ok(pkt).unwrap();
        let p = etherparse::SlicedPacket::from_ip(pkt).unwrap();
        let (src, dst, ttl) = match p.net.unwrap() {
            etherparse::NetSlice::Ipv4(ip) => {
                let h = ip.header();
                (h.source_addr().into(), h.destination_addr().into(), h.ttl())
            }
            etherparse::NetSlice::Ipv6(ip) => {
                let h = ip.header();
                (
                    h.source_addr().into(),
                    h.destination_addr().into(),
                    h.hop_limit(),
                )
            }
            other => panic!("{other:?}"),
        };
        assert_eq!((src, dst, ttl), (from, to, 64));
        let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP")
        };
        assert_eq!((t.source_port(), t.destination_port()), (port, sport));
        assert_eq!((t.sequence_number(), t.acknowledgment_number()), (0, ack));
        assert!(t.rst() && t.ack() && !t.syn() && !t.fin(), "RST|ACK only");
        assert!(t.payload().is_empty());
    }

    #[test]
    fn a_syn_to_a_full_service_is_refused_with_a_rst_until_a_route_ends() {
        let r = rig(&GOLDEN.replace("port = 8080\n", "port = 8080\nmax_connections = 2\n"));
        r.connect(client(1), 1000, 0);
        r.connect(client(1), 1001, 0);
        assert_eq!(r.routes(), 2);
        assert_refused(&r, client(2), 2000, 8080, 1);
        assert_refused(&r, client(1), 1002, 8080, 1);
        assert_eq!(r.routes(), 2, "no route for a refused client");
        assert_eq!(r.counters().get(Count::SynRefused), 2);
        assert_eq!(r.counters().get(Count::RoutesCreated), 2);
        assert!(DropReason::ALL.iter().all(|&d| r.counters().drops(d) == 0));
        // The open connections go on; other services are not limited.
        assert!(r.send(client(1), 1000, 8080, ACK, 2).is_ok());
        assert!(r.send(client(2), 2000, 8081, SYN, 2).is_ok());
        // One connection ends: while its route lingers it still counts …
        r.send(client(1), 1000, 8080, tcp_flags::RST | ACK, 10)
            .unwrap();
        assert_refused(&r, client(2), 2000, 8080, 11);
        // … and once it is gone, a new client is placed again.
        assert_eq!(r.d.expire(10 + expiry::CLOSED_LINGER_MS + 1).expired, 1);
        assert!(r.send(client(2), 2000, 8080, SYN, 5_000).is_ok());
        assert_eq!(r.counters().get(Count::SynRefused), 3);
        assert_refused(&r, client(3), 3000, 8080, 5_001);
    }

    #[test]
    fn a_syn_no_back_end_can_take_is_refused_with_a_rst() {
        let r = rig(&GOLDEN.replace(
            "{ node = \"E\", ratio = 1 }, { node = \"F\", ratio = 1 }",
            "{ node = \"E\", ratio = 0 }, { node = \"F\", ratio = 0 }",
        ));
        assert_refused(&r, client(1), 1000, 8082, 0);
        assert_eq!(r.counters().get(Count::SynRefused), 1);
        assert_eq!(r.counters().drops(DropReason::NoBackend), 0);
        assert_eq!(r.routes(), 0);
        // A segment other than a SYN is still just dropped.
        assert_eq!(
            r.send(client(1), 1000, 8082, ACK, 1),
            Err(DropReason::NoRoute)
        );
        r.d.table().service(2).backends[1].set_ratio(1);
        assert_eq!(r.send(client(1), 1000, 8082, SYN, 2).as_deref(), Ok("F"));
    }

    #[test]
    fn a_full_service_that_does_not_refuse_drops_and_counts() {
        let r = rig(&GOLDEN.replace(
            "port = 8080\n",
            "port = 8080\nmax_connections = 1\nrefuse_when_full = false\n",
        ));
        assert!(r.send(client(1), 1000, 8080, SYN, 0).is_ok());
        assert_eq!(
            r.send(client(2), 1000, 8080, SYN, 0),
            Err(DropReason::ServiceFull)
        );
        assert_eq!(r.counters().drops(DropReason::ServiceFull), 1);
        assert_eq!(r.counters().get(Count::SynRefused), 0);
        assert_eq!(r.routes(), 1);
        // A UDP service is full at max_connections too: no RST, a drop.
        let r = rig(&udp_config().replace("port = 53\n", "port = 53\nmax_connections = 1\n"));
        assert!(r.udp(client(1), 1000, 0).is_ok());
        assert!(r.udp(client(1), 1000, 1).is_ok(), "its route is followed");
        assert_eq!(r.udp(client(1), 1001, 1), Err(DropReason::ServiceFull));
        assert_eq!(r.counters().get(Count::SynRefused), 0);
    }

    #[test]
    fn a_syn_to_a_full_ipv6_service_is_refused_with_a_rst() {
        let r = rig(r#"
[[node]]
name = "a6"
address = "fd00:2::1"
[[service]]
name = "web6"
vip = "fd00::100"
port = 80
protocol = "tcp"
max_connections = 1
backend = [{ node = "a6", ratio = 1 }]
"#);
        let vip: std::net::Ipv6Addr = "fd00::100".parse().unwrap();
        let syn = |n: u8, sport: u16| {
            let mut c = [0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c[15] = n;
            let mut out = Vec::new();
            PacketBuilder::ipv6(c, vip.octets(), 64)
                .tcp(sport, 80, 7000, 64240)
                .syn()
                .write(&mut out, b"")
                .unwrap();
            (IpAddr::from(c), out)
        };
        let (_, first) = syn(1, 1000);
        assert!(matches!(r.run(first, 0).0, Verdict::Forward(_)));
        let (c2, second) = syn(2, 2000);
        let (v, out) = r.run(second, 1);
        let Verdict::Forward(len) = v else {
            panic!("not refused: {v:?}")
        };
        assert_eq!(len, 60);
        assert_rst_to(&out[..len], IpAddr::from(vip), c2, 80, 2000, 7001);
        assert_eq!(r.routes(), 1);
        assert_eq!(r.counters().get(Count::SynRefused), 1);
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
            .sticky(
                crate::transfer_table::AffinityScope::Service(1),
                addr_from_ip(IpAddr::from(client(1)))
            )
            .is_none());
    }

    #[test]
    fn an_affinity_group_keeps_a_clients_routes_in_every_service_on_one_node() {
        let group = "affinity_group = \"pair\"\n";
        let cfg = GOLDEN
            .replace("port = 8080\n", &format!("port = 8080\n{group}"))
            .replace("port = 8082\n", &format!("port = 8082\n{group}"));
        // s53 lists the nodes the other way round: alone it would pick B first.
        let r = rig(&format!(
            "{cfg}\n[[service]]\nname = \"s53\"\nvip = \"10.0.0.100\"\nport = 53\n\
             protocol = \"udp\"\n{group}backend = [{{ node = \"B\", ratio = 1 }}, \
             {{ node = \"A\", ratio = 1 }}]\n"
        ));
        let (a, b) = ([10, 0, 2, 1], [10, 0, 2, 2]);
        assert_eq!(r.send(client(1), 1000, 8080, SYN, 0).unwrap(), "A");
        for port in 2000..2010 {
            assert_eq!(r.udp(client(1), port, 0), Ok(a), "the TCP route's node");
        }
        // A client seen first on the UDP service is held to that choice.
        assert_eq!(r.udp(client(2), 2000, 0), Ok(b));
        assert_eq!(r.send(client(2), 1000, 8080, SYN, 0).unwrap(), "B");
        // A service of the group without the held node chooses as usual,
        // and the hold stays.
        assert!(matches!(
            r.send(client(1), 1001, 8082, SYN, 0).as_deref(),
            Ok("E" | "F")
        ));
        assert_eq!(r.udp(client(1), 3000, 0), Ok(a));
        let scope = r.d.table().service(0).affinity.unwrap();
        let held =
            r.d.routes()
                .sticky(scope, addr_from_ip(IpAddr::from(client(1))));
        assert_eq!(held.map(|s| s.routes), Some(13));
        // Services outside the group keep their own choice.
        assert_eq!(r.send(client(1), 1002, 8081, SYN, 0).unwrap(), "C");
        assert_eq!(r.send(client(2), 1002, 8081, SYN, 0).unwrap(), "D");
        r.d.expire(600_000);
        assert!(r
            .d
            .routes()
            .sticky(scope, addr_from_ip(IpAddr::from(client(1))))
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

    /// What `f` logs, as text.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let sink = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = capture.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn max_routes_beyond_the_room_the_table_was_given_warns_and_holds_the_room() {
        let r = rig(GOLDEN);
        let room = r.d.routes().room();
        let limits = |max: usize| {
            FepConfig::parse(&GOLDEN.replace("max_routes = 100", &format!("max_routes = {max}")))
                .unwrap()
        };
        assert_eq!(
            logged(|| r.d.set_limits(&limits(room))),
            "",
            "up to the room: quiet"
        );
        assert_eq!(r.d.routes().max(), room);
        let said = logged(|| r.d.set_limits(&limits(room + 1)));
        assert!(
            said.contains(&format!("max_routes = {}", room + 1))
                && said.contains(&format!("it holds {room} until fep restarts")),
            "{said}"
        );
        assert_eq!(r.d.routes().max(), room);
        assert_eq!(logged(|| r.d.set_limits(&limits(10))), "");
        assert_eq!(r.d.routes().max(), 10);
    }

    #[test]
    fn after_a_start_a_syn_ack_without_a_route_makes_one_and_the_handshake_completes() {
        let r = with_udp();
        let a = [10, 0, 2, 1];
        let syn_ack = SYN | ACK;
        let vip = Ok((IpAddr::from(VIP), 8080));
        assert_eq!(
            r.reply(a, 8080, client(1), 1000, syn_ack, 0),
            Err(DropReason::UnknownFlow),
            "not adopting"
        );
        r.d.adopt_handshakes(true);
        for flags in [
            ACK,
            tcp_flags::RST | ACK,
            FIN_ACK,
            SYN,
            syn_ack | tcp_flags::FIN,
            syn_ack | tcp_flags::RST,
        ] {
            assert_eq!(
                r.reply(a, 8080, client(1), 1000, flags, 1),
                Err(DropReason::UnknownFlow),
                "only a SYN-ACK makes a route: {flags:#x}"
            );
        }
        // A UDP reply makes none either.
        let (v, _) = r.run(udp_v4(a, 53, client(1), 1000), 1);
        assert_eq!(v, Verdict::Drop(DropReason::UnknownFlow));
        assert_eq!(r.routes(), 0);
        assert_eq!(r.reply(a, 8080, client(1), 1000, syn_ack, 1), vip);
        assert_eq!(r.counters().get(Count::HandshakesAdopted), 1);
        assert_eq!(
            r.reply(a, 8080, client(1), 1000, syn_ack, 2),
            vip,
            "a retransmission"
        );
        assert_eq!(r.counters().get(Count::HandshakesAdopted), 1);
        // The client's ACK reaches that back end and confirms the route.
        assert_eq!(r.send(client(1), 1000, 8080, ACK, 3).unwrap(), "A");
        assert_eq!(r.confirmed().len(), 1);
        // The other back end of the service (same port, its own address).
        assert_eq!(
            r.reply([10, 0, 2, 2], 8080, client(2), 1000, syn_ack, 3),
            vip
        );
        assert_eq!(r.send(client(2), 1000, 8080, ACK, 3).unwrap(), "B");
        r.d.adopt_handshakes(false);
        assert_eq!(
            r.reply(a, 8080, client(1), 1001, syn_ack, 4),
            Err(DropReason::UnknownFlow)
        );
        // A back end two services share: which one the SYN was for is unknown.
        let r = rig(&format!(
            "{GOLDEN}\n[[service]]\nname = \"alt\"\nvip = \"10.0.0.100\"\nport = 9000\nprotocol = \"tcp\"\n\
             backend = [{{ node = \"A\", ratio = 1, port = 8080 }}]\n"
        ));
        r.d.adopt_handshakes(true);
        assert_eq!(
            r.reply(a, 8080, client(1), 1000, syn_ack, 0),
            Err(DropReason::UnknownFlow)
        );
    }

    #[test]
    fn confirmations_the_journal_has_no_room_for_are_counted_not_lost_silently() {
        let r = rig(&udp_config().replace("max_routes = 100", "max_routes = 70000"));
        for n in 0..=JOURNAL_QUEUE as u32 {
            let (c, port) = (client(1 + (n / 60_000) as u8), 1000 + (n % 60_000) as u16);
            let be = r.udp(c, port, 0).unwrap();
            r.udp_reply(be, c, port, 0);
            r.udp(c, port, 0).unwrap();
        }
        assert_eq!(r.d.journal_overflow(), 1);
        assert_eq!(r.confirmed().len(), JOURNAL_QUEUE);
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
}
