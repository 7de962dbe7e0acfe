//! The assigned-route table (document 003, table 111): per (service, client
//! IP, client port), the back end chosen for it.
//!
//! One map serves both directions: a back end's reply names the client's
//! (IP, port) as its destination, and the transfer table says which services
//! the back end's endpoint serves, so the reply's route is found under the
//! same key as the client's packets (no reverse index to keep in step, one
//! entry per route).
//!
//! Routes live in a [`RouteMap`] (lock-free lookups, one writer lock for
//! inserts and removals); client affinity in a sharded map (dashmap). Both
//! hash with aHash under a random key, against collision floods. Lock
//! order, where both are held: the route map's writer lock before `clients`.

use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::route_map::RouteMap;
use crate::transfer_table::{BackendId, ServiceId};
use crate::wire::Addr;

type Map<K, V> = DashMap<K, V, ahash::RandomState>;

/// Key of a route: the service and the client's (IP, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    pub service: ServiceId,
    pub client_port: u16,
    pub client: Addr,
}

impl Hash for FlowKey {
    /// Two words instead of field by field (and the address as a
    /// length-prefixed slice): this hash runs for every packet.
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u128(u128::from_ne_bytes(self.client));
        h.write_u32(u32::from(self.service) << 16 | u32::from(self.client_port));
    }
}

/// What a back end's reply carries: (protocol, back end address and port,
/// client address and port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyKey {
    pub protocol: u8,
    pub backend_port: u16,
    pub client_port: u16,
    pub backend: Addr,
    pub client: Addr,
}

/// Key of a client-affinity entry: the service and the client's IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub service: ServiceId,
    pub client: Addr,
}

/// State bits of a route.
pub mod state {
    /// The client sent a FIN.
    pub const FIN_FROM_CLIENT: u8 = 0x01;
    /// The back end sent a FIN.
    pub const FIN_FROM_BACKEND: u8 = 0x02;
    /// Either side sent a RST.
    pub const RESET: u8 = 0x04;
    /// The back end has answered at least once.
    pub const REPLIED: u8 = 0x08;
    /// The route is confirmed (as conntrack's ASSURED): for TCP, the client
    /// completed the handshake (sent a segment without SYN); for UDP, the
    /// client sent again after a reply. Routes without it are the first to
    /// go when the table is full, and an unconfirmed TCP route is embryonic.
    pub const ESTABLISHED: u8 = 0x10;
    pub fn is_unconfirmed(s: u8) -> bool {
        s & ESTABLISHED == 0
    }
    /// The connection is over; the route lingers briefly for the last ACKs.
    pub fn is_closed(s: u8) -> bool {
        s & RESET != 0
            || s & (FIN_FROM_CLIENT | FIN_FROM_BACKEND) == FIN_FROM_CLIENT | FIN_FROM_BACKEND
    }
}

/// What a route holds, as read at one moment (the live route sits in the
/// [`RouteMap`]). Times are milliseconds of the dispatcher's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub backend: BackendId,
    state: u8,
    last_seen: u32,
}

impl Route {
    pub fn from_parts(backend: BackendId, state: u8, last_seen: u32) -> Self {
        Route {
            backend,
            state,
            last_seen,
        }
    }

    pub fn state(&self) -> u8 {
        self.state
    }

    pub fn last_seen(&self) -> u32 {
        self.last_seen
    }

    /// Milliseconds since the last packet.
    /// A `now` taken before a worker's latest touch (the control plane reads
    /// the clock once per pass) sees a last-seen time in its future: that is
    /// idle 0, not a wrapped-around eternity.
    pub fn idle_ms(&self, now: u32) -> u32 {
        idle_since(self.last_seen, now)
    }
}

/// Milliseconds from `then` to `now` on the wrapping u32 clock; a `then`
/// after `now` counts as 0.
pub fn idle_since(then: u32, now: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if d > u32::MAX / 2 {
        0
    } else {
        d
    }
}

/// A client's back end under `affinity = "client"`, held while it has routes.
#[derive(Debug, Clone, Copy)]
pub struct Sticky {
    pub backend: BackendId,
    pub routes: u32,
}

/// The assigned-route table with its reply index and client-affinity map.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_touch_after_the_readers_clock_is_not_an_eternity_of_idleness() {
        let r = Route::from_parts(0, 0, 1_005);
        assert_eq!(
            r.idle_ms(1_000),
            0,
            "the sweeper read the clock before the worker's touch"
        );
        assert_eq!(r.idle_ms(1_505), 500);
        // Across the u32 wrap.
        let r = Route::from_parts(0, 0, u32::MAX - 10);
        assert_eq!(r.idle_ms(20), 31);
    }

    #[test]
    fn half_the_clock_is_the_longest_idleness() {
        assert_eq!(idle_since(0, u32::MAX / 2), u32::MAX / 2);
        assert_eq!(idle_since(0, u32::MAX / 2 + 1), 0);
    }

    #[test]
    fn a_connection_is_over_after_a_reset_or_a_fin_each_way() {
        use state::*;
        assert!(is_closed(RESET));
        assert!(is_closed(FIN_FROM_CLIENT | FIN_FROM_BACKEND | ESTABLISHED));
        assert!(!is_closed(FIN_FROM_CLIENT | ESTABLISHED));
        assert!(!is_closed(FIN_FROM_BACKEND));
        assert!(!is_closed(ESTABLISHED | REPLIED));
        assert!(is_unconfirmed(REPLIED));
        assert!(!is_unconfirmed(ESTABLISHED));
    }

    fn key(n: u8) -> FlowKey {
        FlowKey {
            service: 1,
            client_port: 40_000,
            client: [n; 16],
        }
    }

    #[test]
    fn reservations_never_pass_the_bound_and_releases_give_room_back() {
        let t = RouteTable::with_room(8);
        assert!(t.room() >= 8);
        assert!(t.is_empty());
        assert!(t.reserve(2) && t.reserve(2));
        assert!(!t.reserve(2));
        assert_eq!(t.len(), 2);
        t.release();
        assert_eq!(t.len(), 1);
        assert!(!t.is_empty());
        assert!(t.reserve(2));
    }

    #[test]
    fn routes_are_found_listed_and_scanned_with_their_back_end_and_state() {
        let t = RouteTable::with_room(8);
        for (n, backend) in [(1, 3), (2, 5)] {
            assert!(t.reserve(8));
            t.map
                .insert_with(&key(n), 700, state::REPLIED, || Some(backend));
        }
        assert_eq!(t.backend_of(&key(1)), Some(3));
        assert_eq!(t.backend_of(&key(2)), Some(5));
        assert_eq!(t.backend_of(&key(9)), None);
        let mut listed = t.snapshot();
        listed.sort();
        assert_eq!(
            listed,
            vec![
                (key(1), 3, state::REPLIED, 700),
                (key(2), 5, state::REPLIED, 700)
            ]
        );
        let mut scanned = Vec::new();
        t.scan(|k, r| {
            scanned.push((k, r.backend));
            ControlFlow::Continue(())
        });
        scanned.sort();
        assert_eq!(scanned, vec![(key(1), 3), (key(2), 5)]);
        let client = ClientKey {
            service: 1,
            client: [1; 16],
        };
        assert!(t.sticky(&client).is_none());
        t.clients.insert(
            client,
            Sticky {
                backend: 3,
                routes: 1,
            },
        );
        assert_eq!(
            t.sticky(&client).map(|s| (s.backend, s.routes)),
            Some((3, 1))
        );
    }
}

#[derive(Debug)]
pub struct RouteTable {
    pub(crate) map: RouteMap,
    pub(crate) clients: Map<ClientKey, Sticky>,
    len: AtomicUsize,
}

impl RouteTable {
    /// A table with room for `routes` routes (its slots are sized once).
    pub fn with_room(routes: usize) -> Self {
        RouteTable {
            map: RouteMap::with_room(routes),
            clients: Map::default(),
            len: AtomicUsize::new(0),
        }
    }

    /// The most routes the table can hold.
    pub fn room(&self) -> usize {
        self.map.room()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The back end of a route, if it exists.
    pub fn backend_of(&self, key: &FlowKey) -> Option<BackendId> {
        self.map.get(key).map(|r| r.backend())
    }

    /// The back end a client is held to under client affinity.
    pub fn sticky(&self, key: &ClientKey) -> Option<Sticky> {
        self.clients.get(key).map(|s| *s)
    }

    /// Calls `f` with routes until it breaks (see [`RouteMap::scan`]).
    pub fn scan(&self, f: impl FnMut(FlowKey, Route) -> ControlFlow<()>) {
        self.map.scan(0, self.map.slots(), f);
    }

    /// Every route's key, back end and state (a snapshot for the control plane).
    pub fn snapshot(&self) -> Vec<(FlowKey, BackendId, u8, u32)> {
        let mut out = Vec::with_capacity(self.len());
        self.map
            .for_each(|k, r| out.push((k, r.backend, r.state(), r.last_seen())));
        out
    }
}

impl RouteTable {
    /// Claims room for one more route if the table holds fewer than `max`,
    /// so concurrent workers can never push it past the bound.
    pub(crate) fn reserve(&self, max: usize) -> bool {
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back one route's room: a reservation not used, or a removal.
    pub(crate) fn release(&self) {
        self.len.fetch_sub(1, Ordering::Relaxed);
    }
}
