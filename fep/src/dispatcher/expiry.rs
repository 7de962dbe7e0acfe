//! Expiry: the control plane's passes over the route table that remove
//! routes whose connection is over or that sat idle past the timeout, and
//! that evict toward 90 % of `max_routes` when the table nears it. The data
//! path only makes room under a flood (see `Dispatcher::assign`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use super::Dispatcher;
use crate::routes::{state, FlowKey, Route};
use crate::transfer_table::TransferTable;

/// How long a TCP route whose connection has closed (FIN both ways, or RST)
/// stays, so that the last ACK and a retransmitted FIN still get through.
pub(super) const CLOSED_LINGER_MS: u32 = 4_000;
/// How long a TCP route whose handshake never completed (embryonic: a SYN,
/// its retransmissions, a SYN-ACK to a spoofed source) lives.
pub(super) const EMBRYONIC_TIMEOUT_MS: u32 = 5_000;
/// Slots one expiry pass looks at (32 MB of the table): the work per pass
/// is bounded however large `max_routes` is; a larger table is swept over
/// several passes.
pub(super) const SWEEP_SLOTS: usize = 1 << 20;
/// Routes one expiry pass evicts at most when the table nears `max_routes`.
const EVICT_PER_PASS: usize = 65_536;

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

/// What expiry keeps between passes: the idle timeout in force, where the
/// passes are, and what they removed.
#[derive(Debug, Default)]
pub(super) struct Expiry {
    idle_timeout_ms: AtomicU32,
    /// Routes removed by expiry and eviction since the start.
    expired: AtomicU64,
    evicted: AtomicU64,
    sweep: Mutex<Sweep>,
}

impl Expiry {
    /// `route_idle_timeout_s`, kept within the clock's half range so that
    /// idle times compare correctly across its wrap.
    pub(super) fn set_idle_timeout(&self, seconds: u64) {
        let ms = seconds.saturating_mul(1000).min(u64::from(u32::MAX / 2));
        self.idle_timeout_ms.store(ms as u32, Ordering::Relaxed);
    }

    /// Over (closed and lingered, or a handshake never completed) or idle
    /// past the timeout.
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

impl Dispatcher {
    /// One expiry pass over the next `SWEEP_SLOTS` slots of the table
    /// (all of it when smaller): removes routes whose connection is over or
    /// that have been idle past the timeout; above 95 % of `max_routes`, also
    /// evicts toward 90 % — unconfirmed routes first, then confirmed ones
    /// only when the window holds no unconfirmed route left, longest idle
    /// first within each kind. Runs on the control plane; reads the routes
    /// without a lock, then removes one at a time (each checked again) so
    /// that new routes never wait long. Its memory is bounded by the window
    /// and `EVICT_PER_PASS`, reused from pass to pass.
    pub fn expire(&self, now: u32) -> ExpireStats {
        let table = self.table.load();
        let mut sweep = self.expiry.sweep.lock().unwrap_or_else(|e| e.into_inner());
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
            if self.expiry.is_expired(&table, &k, &r, now) {
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
            if self.end_route_if(&table, key, |r| self.expiry.is_expired(&table, key, r, now)) {
                stats.expired += 1;
            }
        }
        for Reverse((_, key, seen)) in evict.drain() {
            // Not if a packet came meanwhile.
            if self.end_route_if(&table, &key, |r| r.last_seen() == seen) {
                stats.evicted += 1;
            }
        }
        self.expiry
            .expired
            .fetch_add(stats.expired as u64, Ordering::Relaxed);
        self.expiry
            .evicted
            .fetch_add(stats.evicted as u64, Ordering::Relaxed);
        stats
    }

    /// Routes removed by expiry (connection over, or idle) and by eviction
    /// (table near `max_routes`) since the start.
    pub fn removed_totals(&self) -> ExpireStats {
        ExpireStats {
            expired: self.expiry.expired.load(Ordering::Relaxed) as usize,
            evicted: self.expiry.evicted.load(Ordering::Relaxed) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::super::rig::*;
    use super::*;
    use crate::counters::DropReason;
    use crate::wire::addr_from_ip;

    #[test]
    fn a_route_ends_after_fin_both_ways_and_a_short_linger() {
        let r = rig(GOLDEN);
        r.send(client(1), 1000, 8080, SYN, 0).unwrap();
        r.reply([10, 0, 2, 1], 8080, client(1), 1000, SYN | ACK, 1)
            .unwrap();
        let a = |r: &Rig| {
            let t = r.d.table();
            let be = &t.service(0).backends[0];
            (be.routes(), be.live_routes(), be.closing())
        };
        r.send(client(1), 1000, 8080, FIN_ACK, 100).unwrap();
        assert_eq!(
            r.d.expire(100 + CLOSED_LINGER_MS),
            ExpireStats::default(),
            "half-closed stays"
        );
        assert_eq!(a(&r), (1, 1, 0), "half-closed is still a live connection");
        r.reply([10, 0, 2, 1], 8080, client(1), 1000, FIN_ACK, 200)
            .unwrap();
        assert_eq!(a(&r), (1, 0, 1), "closed: lingering, no longer live");
        r.send(client(1), 1000, 8080, ACK, 210).unwrap();
        r.reply([10, 0, 2, 1], 8080, client(1), 1000, FIN_ACK, 211)
            .unwrap();
        assert_eq!(a(&r), (1, 0, 1), "counted closing once");
        assert_eq!(r.d.expire(211 + CLOSED_LINGER_MS - 1).expired, 0, "lingers");
        assert_eq!(r.d.expire(211 + CLOSED_LINGER_MS).expired, 1);
        assert_eq!(r.routes(), 0);
        assert_eq!(a(&r), (0, 0, 0));
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
        let t = r.d.table();
        let be = &t.service(0).backends[0];
        assert_eq!((be.live_routes(), be.closing()), (0, 1));
        // Same client port connects again before the linger is over: same back end, fresh state.
        assert_eq!(r.send(client(1), 1000, 8080, SYN, 2).unwrap(), "A");
        assert_eq!((be.live_routes(), be.closing()), (1, 0), "open again");
        assert_eq!(r.d.expire(2 + CLOSED_LINGER_MS).expired, 0);
        assert_eq!(r.routes(), 1);
    }

    #[test]
    fn a_reset_from_either_side_ends_an_established_route_after_the_linger() {
        for from_client in [true, false] {
            let r = rig(GOLDEN);
            r.connect(client(1), 1000, 0);
            let rst = tcp_flags::RST | ACK;
            if from_client {
                r.send(client(1), 1000, 8080, rst, 10).unwrap();
            } else {
                r.reply([10, 0, 2, 1], 8080, client(1), 1000, rst, 10)
                    .unwrap();
            }
            assert_eq!(r.d.expire(10 + CLOSED_LINGER_MS - 1).expired, 0);
            assert_eq!(
                r.d.expire(10 + CLOSED_LINGER_MS).expired,
                1,
                "{from_client}"
            );
        }
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
        assert_eq!(
            r.d.removed_totals().expired,
            3,
            "the totals add up the passes"
        );
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
        assert_eq!(
            r.d.removed_totals(),
            ExpireStats {
                expired: 0,
                evicted: 6
            }
        );
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
