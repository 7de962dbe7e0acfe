//! What the route table holds: keys, a route's state bits and what a route
//! holds as read at one moment.

use std::hash::{Hash, Hasher};

use crate::clock::idle_since;
use crate::transfer_table::{AffinityScope, Backend, BackendId, NodeId, ServiceId};
use crate::wire::Addr;

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

impl ReplyKey {
    /// The route key the reply has in `service`.
    #[inline]
    pub fn key(&self, service: ServiceId) -> FlowKey {
        FlowKey {
            service,
            client_port: self.client_port,
            client: self.client,
        }
    }

    /// Whether `backend` is the endpoint the reply comes from.
    #[inline]
    pub fn is_from(&self, backend: &Backend) -> bool {
        backend.addr == self.backend && backend.port == self.backend_port
    }
}

/// Key of a client-affinity entry: the scope (a service or an affinity
/// group) and the client's IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ClientKey {
    scope: AffinityScope,
    client: Addr,
}

impl ClientKey {
    pub(super) fn new(scope: AffinityScope, client: Addr) -> Self {
        ClientKey { scope, client }
    }
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
/// route map). Times are milliseconds of the dispatcher's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

    /// Milliseconds since the last packet (see [`idle_since`]).
    pub fn idle_ms(&self, now: u32) -> u32 {
        idle_since(self.last_seen, now)
    }
}

/// One route with its key: the unit the table exports and imports (to a
/// snapshot, from a journal or a back end's connections, between front ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Row {
    pub key: FlowKey,
    pub route: Route,
}

/// A client's node under client affinity, held while the client has routes
/// in the scope (a node, not a back-end slot: the services of an affinity
/// group list their back ends each in its own order).
#[derive(Debug, Clone, Copy)]
pub struct Sticky {
    pub node: NodeId,
    pub routes: u32,
}

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
}
