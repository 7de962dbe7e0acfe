//! The assigned-route table: per (service, client IP, client port), the
//! back end chosen for it.
//!
//! One map serves both directions: a back end's reply names the client's
//! (IP, port) as its destination, and the transfer table says which services
//! the back end's endpoint serves, so the reply's route is found under the
//! same key as the client's packets (no reverse index to keep in step, one
//! entry per route).
//!
//! [`Routes`] alone changes the table, and keeps with every insert and
//! removal: the count of routes within `max_routes` (a reservation taken
//! before an insert, so concurrent workers never pass the bound), each back
//! end's route count and how many of them are closing (from the one update
//! that closes or reopens each connection), and under client affinity each
//! client's held node with its number of routes in the scope (the service,
//! or every service of its affinity group). Routes live in a lock-free [`map`] (one writer
//! lock for inserts and removals); client affinity in a sharded map
//! (dashmap). Both hash with aHash under a random key, against collision
//! floods. Lock order, where both are held: the route map's writer lock
//! before the affinity map's shard.

mod map;
mod route;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::clock::idle_since;
use crate::transfer_table::{AffinityScope, BackendId, NodeId, Service, TransferTable};
use crate::wire::Addr;
pub(crate) use map::RouteRef;
use map::{Inserted, RouteMap};
use route::ClientKey;
pub use route::{state, FlowKey, ReplyKey, Route, Row, Sticky};

/// Why [`Routes::assign`] recorded no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The table holds `max_routes` routes.
    Full,
    /// The service has no back end to choose.
    NoBackend,
}

/// Where a packet of a client would go now, and why (`fepctl explain`):
/// what [`Routes::assign`] and the dispatcher would do, with nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Explained {
    /// The client port has a route: its back end, state bits, last packet.
    Route {
        backend: BackendId,
        state: u8,
        last_seen: u32,
    },
    /// No route; the service is at `max_connections`.
    ServiceFull,
    /// No route; the table holds `max_routes`.
    TableFull,
    /// No route; client affinity holds the client to this back end's node
    /// while it has `routes` routes in the scope.
    Held { backend: BackendId, routes: u32 },
    /// No route; a new one would go to this back end now.
    Chosen(BackendId),
    /// No route; no back end has a ratio above 0.
    NoBackend,
}

/// The route table with its reply index, client affinity and counts.
#[derive(Debug)]
pub struct Routes {
    map: RouteMap,
    clients: DashMap<ClientKey, Sticky, ahash::RandomState>,
    /// Routes in the map, plus reservations about to be inserted.
    len: AtomicUsize,
    max: AtomicUsize,
}

impl Routes {
    /// A table with room for `routes` routes (its slots are sized once),
    /// holding at most that many until [`Routes::set_max`].
    pub fn with_room(routes: usize) -> Self {
        let map = RouteMap::with_room(routes);
        let max = AtomicUsize::new(map.room());
        Routes {
            map,
            clients: DashMap::default(),
            len: AtomicUsize::new(0),
            max,
        }
    }

    /// The most routes the table can hold.
    pub fn room(&self) -> usize {
        self.map.room()
    }

    /// The most routes the table takes (`max_routes`, up to its room).
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Sets `max_routes`, up to the room; returns the bound now in force.
    pub fn set_max(&self, max: usize) -> usize {
        let max = max.min(self.room());
        self.max.store(max, Ordering::Relaxed);
        max
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

    /// The node a client is held to in `scope`.
    pub fn sticky(&self, scope: AffinityScope, client: Addr) -> Option<Sticky> {
        self.clients.get(&ClientKey::new(scope, client)).map(|s| *s)
    }

    /// The packet path's lookup: `key`'s back end in `svc` (its service),
    /// if it has a route, after `f` updated the route (`f` returns false
    /// when the route moved under it, and the lookup looks again). An
    /// update that closes or reopens the connection counts on the back end.
    #[inline]
    pub(crate) fn get_and(
        &self,
        key: &FlowKey,
        svc: &Service,
        f: impl Fn(&RouteRef<'_>) -> bool,
    ) -> Option<BackendId> {
        self.map.get_and(key, |r| {
            let done = f(r);
            if r.closes() != 0 {
                if let Some(b) = svc.backends.get(usize::from(r.backend())) {
                    b.route_closing(r.closes());
                }
            }
            done
        })
    }

    /// Where `key`'s next packet would go in `svc` (see [`Explained`]).
    pub(crate) fn explain(&self, key: &FlowKey, svc: &Service) -> Explained {
        if let Some(r) = self.map.get(key) {
            return Explained::Route {
                backend: r.backend(),
                state: r.state(),
                last_seen: r.last_seen(),
            };
        }
        if svc.is_full() {
            return Explained::ServiceFull;
        }
        if self.len() >= self.max() {
            return Explained::TableFull;
        }
        let held = svc
            .affinity
            .and_then(|scope| self.sticky(scope, key.client));
        if let Some((backend, s)) = held.and_then(|s| Some((svc.backend_on(s.node)?, s))) {
            return Explained::Held {
                backend,
                routes: s.routes,
            };
        }
        svc.peek().map_or(Explained::NoBackend, Explained::Chosen)
    }

    /// A route forwarded outside the TUN path (by the kernel fast path):
    /// its back end and state bits, after moving its last-seen time forward
    /// to `seen` (never back); `None` when `key` has no route.
    pub(crate) fn refresh(&self, key: &FlowKey, seen: Option<u32>) -> Option<(BackendId, u8)> {
        let state = std::cell::Cell::new(0);
        let backend = self.map.get_and(key, |r| {
            state.set(r.state());
            match seen {
                Some(t) if idle_since(r.last_seen(), t) > 0 => r.touch(t, 0),
                _ => true,
            }
        })?;
        Some((backend, state.get()))
    }

    /// A route miss: records a route for `key` to the back end `svc`
    /// chooses (the client's held one under client affinity), or the route
    /// another worker recorded meanwhile.
    pub(crate) fn assign(
        &self,
        key: &FlowKey,
        svc: &Service,
        now: u32,
    ) -> Result<BackendId, Refused> {
        match self.insert(key, svc, now, 0, || self.choose(key, svc)) {
            Some(Inserted::New(b) | Inserted::Existing(b)) => Ok(b),
            Some(Inserted::Refused) => Err(Refused::NoBackend),
            None => Err(Refused::Full),
        }
    }

    /// Puts back rows (from a snapshot, the journal, a back end's
    /// connections or another front end), each with its back end, state and
    /// last-seen time; a row whose key has a route already, whose back end
    /// or service is not configured or removed, or beyond `max_routes`, is
    /// left out. Returns how many went in.
    pub fn import(&self, table: &TransferTable, rows: impl IntoIterator<Item = Row>) -> usize {
        rows.into_iter()
            .filter(|row| {
                let svc = table.service(row.key.service);
                let backend = row.route.backend;
                let live = svc
                    .backends
                    .get(usize::from(backend))
                    .is_some_and(|b| !b.removed && !svc.removed);
                live && matches!(
                    self.insert(
                        &row.key,
                        svc,
                        row.route.last_seen(),
                        row.route.state(),
                        || {
                            if let Some(scope) = svc.affinity {
                                let node = svc.backends[usize::from(backend)].node_id;
                                self.hold(scope, &row.key, |_| Some(node));
                            }
                            Some(backend)
                        }
                    ),
                    Some(Inserted::New(_))
                )
            })
            .count()
    }

    /// Every route for which `keep` holds, read without a lock (see
    /// [`Routes::scan`]).
    pub fn export(&self, mut keep: impl FnMut(&Row) -> bool) -> Vec<Row> {
        let mut out = Vec::new();
        self.scan(|key, route| {
            let row = Row { key, route };
            if keep(&row) {
                out.push(row);
            }
            ControlFlow::Continue(())
        });
        out
    }

    /// Removes `key`'s route if `cond` holds for it (checked under the
    /// writer lock), with its share of the counts; the route it removed.
    /// `table` is the current transfer table.
    pub fn remove_if(
        &self,
        table: &TransferTable,
        key: &FlowKey,
        cond: impl FnOnce(&Route) -> bool,
    ) -> Option<Route> {
        let route = self.map.remove_if(key, cond)?;
        self.release();
        let svc = table.service(key.service);
        svc.backends[usize::from(route.backend)].route_removed(state::is_closed(route.state()));
        if let Some(scope) = svc.affinity {
            // Saturating: a service whose affinity changed at runtime
            // removes routes it did not count in this scope.
            let entry = self.clients.entry(ClientKey::new(scope, key.client));
            if let Entry::Occupied(mut e) = entry {
                e.get_mut().routes = e.get().routes.saturating_sub(1);
                if e.get().routes == 0 {
                    e.remove();
                }
            }
        }
        Some(route)
    }

    /// Removes every route for which `pred` holds (checked again at the
    /// removal, so a route touched meanwhile is judged afresh); how many.
    pub fn remove_where(
        &self,
        table: &TransferTable,
        pred: impl Fn(&FlowKey, &Route) -> bool,
    ) -> usize {
        self.export(|row| pred(&row.key, &row.route))
            .iter()
            .filter(|row| {
                self.remove_if(table, &row.key, |r| pred(&row.key, r))
                    .is_some()
            })
            .count()
    }

    /// Calls `f` with routes until it breaks, read slot by slot without a
    /// lock: a route that a concurrent removal shifts across the scan can be
    /// missed or seen twice (the control plane's passes repeat).
    pub fn scan(&self, f: impl FnMut(FlowKey, Route) -> ControlFlow<()>) {
        self.map.scan(0, self.map.slots(), f);
    }

    /// As [`Routes::scan`], over `count` slots from slot `from` (wrapping
    /// around the end); returns the slot after the last one read, where the
    /// next window starts.
    pub fn scan_window(
        &self,
        from: usize,
        count: usize,
        f: impl FnMut(FlowKey, Route) -> ControlFlow<()>,
    ) -> usize {
        self.map.scan(from, count, f)
    }

    /// Number of slots, the span of all the windows.
    pub fn slots(&self) -> usize {
        self.map.slots()
    }

    /// Inserts `key`'s route within `max_routes` and counts it on its back
    /// end; `make` chooses the back end under the map's writer lock. `None`
    /// when the table is full.
    fn insert(
        &self,
        key: &FlowKey,
        svc: &Service,
        now: u32,
        state: u8,
        make: impl FnOnce() -> Option<BackendId>,
    ) -> Option<Inserted> {
        if !self.reserve() {
            return None;
        }
        let inserted = self.map.insert_with(key, now, state, make);
        match inserted {
            Inserted::New(b) => {
                let be = &svc.backends[usize::from(b)];
                be.route_added();
                if state::is_closed(state) {
                    be.route_closing(1);
                }
            }
            Inserted::Existing(_) | Inserted::Refused => self.release(),
        }
        Some(inserted)
    }

    /// The back end for a new route: the service's choice, or under client
    /// affinity the back end on the client's held node (chosen afresh when
    /// the service has no back end there, the hold staying as it is).
    fn choose(&self, key: &FlowKey, svc: &Service) -> Option<BackendId> {
        let Some(scope) = svc.affinity else {
            return svc.choose();
        };
        let mut backend = None;
        self.hold(scope, key, |held| {
            let b = held
                .and_then(|node| svc.backend_on(node))
                .or_else(|| svc.choose())?;
            backend = Some(b);
            Some(held.unwrap_or(svc.backends[usize::from(b)].node_id))
        });
        backend
    }

    /// Counts one more route of `key`'s client in `scope`, held to the node
    /// `pick` returns given the one the client is held to (if any); no
    /// count when `pick` returns `None`.
    fn hold(
        &self,
        scope: AffinityScope,
        key: &FlowKey,
        pick: impl FnOnce(Option<NodeId>) -> Option<NodeId>,
    ) {
        match self.clients.entry(ClientKey::new(scope, key.client)) {
            Entry::Occupied(mut e) => {
                if pick(Some(e.get().node)).is_some() {
                    e.get_mut().routes += 1;
                }
            }
            Entry::Vacant(e) => {
                if let Some(node) = pick(None) {
                    e.insert(Sticky { node, routes: 1 });
                }
            }
        }
    }

    /// Claims room for one more route if the table holds fewer than
    /// `max_routes`, so concurrent workers can never push it past the bound.
    fn reserve(&self) -> bool {
        let max = self.max();
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back one route's room: a reservation not used, or a removal.
    fn release(&self) {
        self.len.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use crate::transfer_table::ServiceId;

    use super::*;

    /// testing::CONFIG: service 0 is `web` (port affinity, be1 and be2),
    /// service 1 is `dns` (client affinity).
    fn table() -> TransferTable {
        TransferTable::from_config(&FepConfig::parse(crate::testing::CONFIG).unwrap())
    }

    fn key(service: ServiceId, client: u8, client_port: u16) -> FlowKey {
        FlowKey {
            service,
            client_port,
            client: [client; 16],
        }
    }

    fn counts(t: &TransferTable, service: ServiceId) -> Vec<u32> {
        t.service(service)
            .backends
            .iter()
            .map(|b| b.routes())
            .collect()
    }

    #[test]
    fn the_table_never_takes_more_than_max_routes_and_a_removal_gives_room_back() {
        let t = table();
        let r = Routes::with_room(8);
        assert!(r.room() >= 8 && r.is_empty());
        assert_eq!(r.set_max(usize::MAX), r.room(), "never above the room");
        assert_eq!(r.set_max(2), 2);
        let web = t.service(0);
        let first = r.assign(&key(0, 1, 1), web, 0).unwrap();
        assert!(!r.is_empty());
        assert!(r.assign(&key(0, 2, 1), web, 0).is_ok());
        assert_eq!(r.assign(&key(0, 3, 1), web, 0), Err(Refused::Full));
        assert_eq!(r.len(), 2);
        assert_eq!(counts(&t, 0).iter().sum::<u32>(), 2);
        assert!(
            r.remove_if(&t, &key(0, 1, 1), |_| false).is_none(),
            "cond fails"
        );
        assert!(r
            .remove_if(&t, &key(0, 1, 1), |route| route.backend == first)
            .is_some());
        assert!(
            r.remove_if(&t, &key(0, 1, 1), |_| true).is_none(),
            "already gone"
        );
        assert_eq!(r.len(), 1);
        assert_eq!(counts(&t, 0).iter().sum::<u32>(), 1);
        assert!(r.assign(&key(0, 3, 1), web, 0).is_ok());
        assert_eq!(r.backend_of(&key(0, 9, 1)), None);
    }

    #[test]
    fn a_key_assigned_twice_keeps_its_first_back_end_and_counts_once() {
        let t = table();
        let r = Routes::with_room(8);
        let b = r.assign(&key(0, 1, 1), t.service(0), 0).unwrap();
        for _ in 0..4 {
            assert_eq!(r.assign(&key(0, 1, 1), t.service(0), 5), Ok(b));
        }
        assert_eq!(r.len(), 1);
        assert_eq!(counts(&t, 0).iter().sum::<u32>(), 1);
    }

    #[test]
    fn client_affinity_holds_a_client_while_it_has_routes() {
        let t = table();
        let r = Routes::with_room(64);
        let dns = t.service(1);
        let b = r.assign(&key(1, 1, 1000), dns, 0).unwrap();
        for port in 1001..1010 {
            assert_eq!(r.assign(&key(1, 1, port), dns, 0), Ok(b));
        }
        let scope = AffinityScope::Service(1);
        let held = r.sticky(scope, [1; 16]).unwrap();
        assert_eq!(
            (held.node, held.routes),
            (dns.backends[usize::from(b)].node_id, 10)
        );
        assert_eq!(r.remove_where(&t, |k, _| k.client_port != 1000), 9);
        assert_eq!(r.sticky(scope, [1; 16]).map(|s| s.routes), Some(1));
        assert!(r.remove_if(&t, &key(1, 1, 1000), |_| true).is_some());
        assert!(
            r.sticky(scope, [1; 16]).is_none(),
            "released with its last route"
        );
        assert!(r.is_empty());
    }

    #[test]
    fn explain_tells_the_route_the_hold_or_the_next_choice_without_changing_them() {
        let t = table();
        let r = Routes::with_room(64);
        let (web, dns) = (t.service(0), t.service(1));
        let next = r.explain(&key(0, 1, 1000), web);
        let Explained::Chosen(b) = next else {
            panic!("{next:?}")
        };
        assert_eq!(r.explain(&key(0, 1, 1000), web), next, "nothing moved");
        assert_eq!(
            r.assign(&key(0, 1, 1000), web, 7),
            Ok(b),
            "the next route's back end"
        );
        assert!(matches!(
            r.explain(&key(0, 1, 1000), web),
            Explained::Route { backend, last_seen: 7, .. } if backend == b
        ));
        // Client affinity: another port of a held client goes to its node.
        let held = r.assign(&key(1, 2, 5000), dns, 0).unwrap();
        assert_eq!(
            r.explain(&key(1, 2, 5001), dns),
            Explained::Held {
                backend: held,
                routes: 1
            }
        );
        r.set_max(r.len());
        assert_eq!(r.explain(&key(0, 3, 1), web), Explained::TableFull);
        r.set_max(64);
        for b in &web.backends {
            b.set_ratio(0);
        }
        assert_eq!(r.explain(&key(0, 3, 1), web), Explained::NoBackend);
    }

    #[test]
    fn each_back_end_counts_its_closing_routes_exactly_however_workers_race() {
        let t = table();
        let web = t.service(0);
        let r = Routes::with_room(4096);
        let keys: Vec<FlowKey> = (0..1000u16).map(|p| key(0, 1, 1000 + p)).collect();
        for k in &keys {
            r.assign(k, web, 0).unwrap();
        }
        let closing =
            |t: &TransferTable| -> u32 { t.service(0).backends.iter().map(|b| b.closing()).sum() };
        // Two workers close each connection from both sides at once (and
        // again: a retransmitted FIN): one update makes the change.
        std::thread::scope(|s| {
            for bits in [state::FIN_FROM_CLIENT, state::FIN_FROM_BACKEND] {
                let (r, keys) = (&r, &keys);
                s.spawn(move || {
                    for _ in 0..2 {
                        for k in keys {
                            r.get_and(k, web, |route| route.touch(1, bits)).unwrap();
                        }
                    }
                });
            }
        });
        assert_eq!(closing(&t), 1000);
        assert_eq!(counts(&t, 0).iter().sum::<u32>(), 1000, "all still there");
        // A new connection on a closed port is open again; a removal of a
        // closed route takes its closing count with it.
        r.get_and(&keys[0], web, |route| route.reopen(2)).unwrap();
        assert_eq!(closing(&t), 999);
        assert!(r.remove_if(&t, &keys[1], |_| true).is_some());
        assert!(r.remove_if(&t, &keys[0], |_| true).is_some());
        assert_eq!(closing(&t), 998);
        // Imported rows count as they are.
        let rows = r.export(|_| true);
        let (t2, to) = (table(), Routes::with_room(4096));
        assert_eq!(to.import(&t2, rows), 998);
        assert_eq!(closing(&t2), 998);
        let live: u32 = t2.service(0).backends.iter().map(|b| b.live_routes()).sum();
        assert_eq!(live, 0);
    }

    #[test]
    fn exported_rows_import_elsewhere_with_their_back_end_state_and_counts() {
        let t = table();
        let from = Routes::with_room(64);
        for n in 1..=6u8 {
            let service = ServiceId::from(n % 2);
            from.assign(&key(service, n, 1000), t.service(service), 700)
                .unwrap();
        }
        let mut rows = from.export(|row| row.key.client[0] != 6);
        rows.sort();
        assert_eq!(rows.len(), 5);
        assert!(rows.iter().all(|r| r.route.last_seen() == 700));

        let t2 = table();
        let to = Routes::with_room(64);
        let bogus = Row {
            key: key(0, 9, 1),
            route: Route::from_parts(9, 0, 0),
        };
        let twice = rows.iter().chain(&rows).copied().chain([bogus]);
        assert_eq!(to.import(&t2, twice), 5, "once each; no back end 9");
        let mut back = to.export(|_| true);
        back.sort();
        assert_eq!(back, rows);
        assert_eq!(to.len(), 5);
        let imported: u32 = (0..2).flat_map(|s| counts(&t2, s)).sum();
        assert_eq!(imported, 5);
        let dns = rows.iter().find(|r| r.key.service == 1).unwrap();
        let node = t2.backend(1, dns.route.backend).node_id;
        assert_eq!(
            to.sticky(AffinityScope::Service(1), dns.key.client)
                .map(|s| (s.node, s.routes)),
            Some((node, 1))
        );
    }

    #[test]
    fn rows_of_a_removed_back_end_or_service_are_not_imported() {
        let t = table();
        // be2 leaves web; dns goes (both stay as tombstones).
        let cfg = crate::testing::CONFIG
            .replace(", { node = \"be2\", ratio = 1, port = 8080 }", "")
            .replace("name = \"dns\"", "name = \"dns-gone\"");
        let cfg = FepConfig::parse(&cfg).unwrap();
        let after = TransferTable::build(&cfg, Some(&t));
        assert!(after.service(0).backends[1].removed && !after.service(0).removed);
        assert!(after.service(1).removed);
        let r = Routes::with_room(8);
        let row = |service, backend| Row {
            key: key(service, 1, 1000),
            route: Route::from_parts(backend, 0, 0),
        };
        assert_eq!(r.import(&after, [row(0, 1), row(1, 0)]), 0);
        assert_eq!(r.import(&after, [row(0, 0)]), 1, "be1 in web stays");
    }
}
