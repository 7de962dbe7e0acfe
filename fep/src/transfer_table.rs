//! The transfer table: per service, the back-end nodes allowed to serve it
//! and each one's ratio.
//!
//! The data path only reads it; ratios are atomics so that the control plane
//! can change them without stopping a worker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use fep_shared::{Affinity, FepConfig, HttpConfig, Scheduler, ServiceConfig, ServiceMode};

use crate::chooser::{Candidate, Chooser};
use crate::endpoint_map::{Endpoint, EndpointMap};
use crate::holds::GroupId;
use crate::wire::{addr_from_ip, Addr};

/// Slot of a service (see [`TransferTable`]); part of every route key.
pub type ServiceId = u16;
/// Slot of a back end within its service.
pub type BackendId = u16;
/// Slot of a node (see [`TransferTable`]).
pub type NodeId = u16;
/// Slot of an affinity group (see [`TransferTable`]).
pub type AffinityGroupId = u16;

/// Where a client is held to one node: the services whose routes share the
/// client's hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AffinityScope {
    /// `affinity = "client"`: the service's own routes.
    Service(ServiceId),
    /// `affinity_group`: the routes of every service in the group.
    Group(AffinityGroupId),
}

/// A back end's counters and effective ratio, shared by every version of
/// the table so that rebuilding it (a node added, a reload) loses nothing.
#[derive(Debug, Default)]
pub struct BackendShared {
    /// The effective ratio the chooser uses; the control plane derives it
    /// from the configured ratio, the node's state, pins and load.
    ratio: AtomicU32,
    /// The load the `load` scheduler compares (f64 bits).
    load: AtomicU64,
    /// Above the service's `high_load` (with its hysteresis): HTTP pools
    /// keep fewer idle connections to it.
    overloaded: AtomicBool,
    /// Routes assigned to this back end (and HTTP requests in flight to it).
    routes: AtomicU32,
    /// Of those, routes whose connection is over, lingering for its last
    /// segments.
    closing: AtomicU32,
    /// Routes ever assigned to it.
    assigned: AtomicU64,
}

/// One back end of a service: a node (or a spare node, which starts with
/// ratio 0 and joins when the control plane has started it).
#[derive(Debug, Clone)]
pub struct Backend {
    pub node: String,
    pub node_id: NodeId,
    pub addr: Addr,
    /// Port the back end serves the service on.
    pub port: u16,
    /// Configured as a spare (scale-out) rather than a back end.
    pub spare: bool,
    /// No longer configured: never chosen, kept so that the slot (which
    /// routes refer to) is never given to another back end.
    pub removed: bool,
    shared: Arc<BackendShared>,
}

impl Backend {
    /// The effective ratio.
    pub fn ratio(&self) -> u32 {
        self.shared.ratio.load(Ordering::Relaxed)
    }

    pub fn set_ratio(&self, ratio: u32) {
        self.shared.ratio.store(ratio, Ordering::Relaxed);
    }

    pub fn load(&self) -> f64 {
        f64::from_bits(self.shared.load.load(Ordering::Relaxed))
    }

    pub fn set_load(&self, load: f64) {
        self.shared.load.store(load.to_bits(), Ordering::Relaxed);
    }

    /// Its routes, open or lingering: what the chooser, `max_connections`
    /// and a drain count (a lingering route still carries segments).
    pub fn routes(&self) -> u32 {
        self.shared.routes.load(Ordering::Relaxed)
    }

    /// Its routes whose connection is over (FIN both ways or a RST),
    /// lingering until they expire.
    pub fn closing(&self) -> u32 {
        self.shared.closing.load(Ordering::Relaxed)
    }

    /// Its routes whose connection is open: what the views' shares count.
    pub fn live_routes(&self) -> u32 {
        self.routes().saturating_sub(self.closing())
    }

    pub fn overloaded(&self) -> bool {
        self.shared.overloaded.load(Ordering::Relaxed)
    }

    pub fn set_overloaded(&self, overloaded: bool) {
        self.shared.overloaded.store(overloaded, Ordering::Relaxed);
    }

    /// Routes ever assigned to this back end.
    pub fn assigned(&self) -> u64 {
        self.shared.assigned.load(Ordering::Relaxed)
    }

    pub(crate) fn route_added(&self) {
        self.shared.routes.fetch_add(1, Ordering::Relaxed);
        self.shared.assigned.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn route_removed(&self, closed: bool) {
        self.shared.routes.fetch_sub(1, Ordering::Relaxed);
        if closed {
            self.route_closing(-1);
        }
    }

    /// `by` routes' connections closed (a reopened port: -1). Saturating:
    /// a count that never goes round, whatever the order of updates.
    pub(crate) fn route_closing(&self, by: i8) {
        let _ = self
            .shared
            .closing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add_signed(i32::from(by)))
            });
    }

    /// Counts an HTTP request in flight to this back end (as a route: the
    /// chooser's `least-routes`, drain completion and the views see it)
    /// until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.route_added();
        InFlight(self.shared.clone())
    }

    /// Same node, address and port: routes to one are routes to the other.
    fn same_endpoint(&self, other: &Backend) -> bool {
        self.node == other.node && self.addr == other.addr && self.port == other.port
    }
}

/// One in-flight HTTP request (or upgraded connection) on a back end.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<BackendShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.routes.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Candidate for Backend {
    fn ratio(&self) -> u32 {
        Backend::ratio(self)
    }

    fn routes(&self) -> u32 {
        Backend::routes(self)
    }

    fn load(&self) -> f64 {
        Backend::load(self)
    }
}

/// One service: (VIP, port, protocol) and its back ends.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub vip: Addr,
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    /// Where the service's clients are held to a node; `None` under
    /// `affinity = "port"`.
    pub affinity: Option<AffinityScope>,
    /// The VIP group the service's VIP moves with between gateways.
    pub group: Option<GroupId>,
    /// HTTP mode's settings; `None` for a service on the TUN path. An HTTP
    /// service's packets never reach the TUN path (they are delivered to
    /// its listener), so it is not in the lookups by endpoint.
    pub http: Option<Arc<HttpConfig>>,
    /// No longer configured (its slot is never reused).
    pub removed: bool,
    /// Indexed by [`BackendId`]; removed back ends stay as tombstones.
    pub backends: Vec<Backend>,
    chooser: Chooser,
    /// Routes at which the service takes no new client (`max_connections`).
    max_connections: Option<u32>,
    /// A TCP client that cannot be placed gets a RST (`refuse_when_full`).
    refuse_when_full: bool,
}

impl Service {
    /// Picks the back end for a new route, or `None` when no back end has a
    /// ratio above 0.
    pub fn choose(&self) -> Option<BackendId> {
        self.chooser.choose(&self.backends).map(|i| i as BackendId)
    }

    /// The back end [`Service::choose`] would pick now, without moving the
    /// round robin (`fepctl explain`).
    pub fn peek(&self) -> Option<BackendId> {
        self.chooser.peek(&self.backends).map(|i| i as BackendId)
    }

    /// Picks among `candidates`, one per back end slot in order (a view of
    /// the back ends with other ratios or counts, e.g. a content rule's),
    /// built as the chooser reads them.
    pub(crate) fn choose_from<C: Candidate>(
        &self,
        candidates: impl IntoIterator<Item = C>,
    ) -> Option<BackendId> {
        self.chooser.choose(candidates).map(|i| i as BackendId)
    }

    pub fn is_tcp(&self) -> bool {
        self.protocol == crate::wire::TCP
    }

    /// The configured `max_connections`, if any.
    pub fn max_connections(&self) -> Option<u32> {
        self.max_connections
    }

    /// Whether a SYN the service cannot place is answered with a RST
    /// (else dropped); TCP only.
    pub fn refuse_when_full(&self) -> bool {
        self.refuse_when_full
    }

    /// At `max_connections` routes over its back ends (tombstones
    /// included: their routes still count). Read per new client: a sum
    /// over a few relaxed loads, so two workers may both take the last
    /// place, by one route each at most.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.max_connections.is_some_and(|max| {
            let routes: u64 = self.backends.iter().map(|b| u64::from(b.routes())).sum();
            routes >= u64::from(max)
        })
    }

    /// Whether its routes are copied to the back ends they point at: a VIP
    /// group's UDP routes, which no socket table on the back end remembers.
    pub fn copies_routes(&self) -> bool {
        self.group.is_some() && !self.is_tcp()
    }

    /// The configured back end on `node`, if any (a node is listed once).
    pub fn backend_on(&self, node: NodeId) -> Option<BackendId> {
        self.live_backends()
            .find(|(_, b)| b.node_id == node)
            .map(|(i, _)| i)
    }

    /// The configured back ends (not the tombstones).
    pub fn live_backends(&self) -> impl Iterator<Item = (BackendId, &Backend)> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.removed)
            .map(|(i, b)| (i as BackendId, b))
    }

    fn same_endpoint(&self, vip: Addr, port: u16, protocol: u8) -> bool {
        self.vip == vip && self.port == port && self.protocol == protocol
    }
}

/// All services, looked up by (protocol, VIP, port).
///
/// Services, back ends and nodes sit in slots that keep their index for the
/// life of the process (routes store the indices): [`TransferTable::build`]
/// gives a changed config a new table in which whatever is unchanged keeps
/// its slot and its counters, new things get new slots, and removed ones stay
/// as tombstones that are never chosen.
#[derive(Debug)]
pub struct TransferTable {
    services: Vec<Service>,
    by_endpoint: EndpointMap<ServiceId>,
    /// The services (removed ones included: their routes still carry
    /// replies) each back-end endpoint (protocol, address, port) serves.
    by_backend: EndpointMap<Vec<ServiceId>>,
    /// Every configured VIP (echo requests to them are answered).
    vips: HashSet<Addr, ahash::RandomState>,
    /// Node names by [`NodeId`].
    nodes: Vec<String>,
    /// Affinity group names by [`AffinityGroupId`].
    affinity_groups: Vec<String>,
}

impl TransferTable {
    /// Builds the table from a validated config.
    pub fn from_config(cfg: &FepConfig) -> Self {
        Self::build(cfg, None)
    }

    /// Builds the table for `cfg`, keeping the slots of `previous`.
    pub fn build(cfg: &FepConfig, previous: Option<&TransferTable>) -> Self {
        let mut nodes: Vec<String> = previous.map(|p| p.nodes.clone()).unwrap_or_default();
        for n in &cfg.nodes {
            if !nodes.contains(&n.name) {
                nodes.push(n.name.clone());
            }
        }
        let node_id = |name: &str| {
            nodes
                .iter()
                .position(|n| n == name)
                .expect("every node has a slot") as NodeId
        };
        let mut affinity_groups: Vec<String> = previous
            .map(|p| p.affinity_groups.clone())
            .unwrap_or_default();
        for g in cfg
            .services
            .iter()
            .filter_map(|s| s.affinity_group.as_ref())
        {
            if !affinity_groups.contains(g) {
                affinity_groups.push(g.clone());
            }
        }
        let previous: &[Service] = previous.map_or(&[], |p| &p.services);

        // Each configured service takes the slot of the same service (name
        // and endpoint) or a new one; the others become tombstones.
        let mut services: Vec<Service> = previous.iter().map(tombstone).collect();
        let mut by_endpoint = EndpointMap::with_room(cfg.services.len());
        for s in &cfg.services {
            let vip = addr_from_ip(s.vip);
            let protocol = s.protocol.ip_number();
            let http = s.mode == ServiceMode::Http;
            let slot = previous
                .iter()
                .position(|p| {
                    !p.removed
                        && p.name == s.name
                        && p.same_endpoint(vip, s.port, protocol)
                        && p.http.is_some() == http
                })
                .unwrap_or_else(|| {
                    services.push(tombstone_of(&s.name, vip, s.port, protocol));
                    services.len() - 1
                });
            let backends = merge_backends(cfg, s, &services[slot].backends, &node_id);
            if !http {
                by_endpoint.insert(Endpoint::new(protocol, vip, s.port), slot as ServiceId);
            }
            services[slot] = Service {
                name: s.name.clone(),
                vip,
                port: s.port,
                protocol,
                affinity: match (&s.affinity_group, s.affinity) {
                    (Some(g), _) => Some(AffinityScope::Group(
                        affinity_groups
                            .iter()
                            .position(|n| n == g)
                            .expect("slotted above") as AffinityGroupId,
                    )),
                    (None, Affinity::Client) => Some(AffinityScope::Service(slot as ServiceId)),
                    (None, Affinity::Port) => None,
                },
                group: cfg
                    .vip_groups
                    .iter()
                    .position(|g| g.vips.contains(&s.vip))
                    .map(|g| g as GroupId),
                http: http.then(|| Arc::new(s.http_config())),
                removed: false,
                chooser: Chooser::new(s.scheduler, backends.len()),
                backends,
                max_connections: s.max_connections,
                refuse_when_full: s.refuse_when_full,
            };
        }
        for svc in services.iter().filter(|s| s.removed) {
            for b in &svc.backends {
                b.set_ratio(0);
            }
        }
        // A removed service's clients (and ICMP errors about its replies)
        // still reach its live routes (no new route is opened for it), unless
        // a configured service took its endpoint; the latest removal of an
        // endpoint wins. Its VIP reaches fep only while it carries routes.
        for (slot, svc) in services.iter().enumerate().rev() {
            let endpoint = Endpoint::new(svc.protocol, svc.vip, svc.port);
            if svc.removed && svc.http.is_none() && by_endpoint.get(&endpoint).is_none() {
                by_endpoint.insert(endpoint, slot as ServiceId);
            }
        }
        let http_vips = services.iter().filter(|s| s.http.is_some() && !s.removed);
        let vips = by_endpoint
            .keys()
            .map(|e| e.addr)
            .chain(http_vips.map(|s| s.vip))
            .collect();
        let by_backend = index_by_backend(&services);
        TransferTable {
            services,
            by_endpoint,
            by_backend,
            vips,
            nodes,
            affinity_groups,
        }
    }

    /// Node names by slot (removed nodes included).
    pub fn node_names(&self) -> &[String] {
        &self.nodes
    }

    /// The slot of a node, if it ever had one.
    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|n| n == name)
            .map(|i| i as NodeId)
    }

    /// The slot of a configured service.
    pub fn service_id(&self, name: &str) -> Option<ServiceId> {
        self.services
            .iter()
            .position(|s| !s.removed && s.name == name)
            .map(|i| i as ServiceId)
    }

    /// The service a client packet to (`dst`, `port`) over `protocol` is for.
    #[inline]
    pub fn lookup(&self, protocol: u8, dst: &Addr, port: u16) -> Option<(ServiceId, &Service)> {
        let id = *self.by_endpoint.get(&Endpoint::new(protocol, *dst, port))?;
        Some((id, &self.services[usize::from(id)]))
    }

    /// The services whose back ends include the endpoint (protocol, `addr`,
    /// `port`): where a packet from that endpoint may belong.
    #[inline]
    pub fn services_behind(&self, protocol: u8, addr: &Addr, port: u16) -> &[ServiceId] {
        self.by_backend
            .get(&Endpoint::new(protocol, *addr, port))
            .map_or(&[], Vec::as_slice)
    }

    /// Whether `addr` is the VIP of a configured service.
    pub fn is_vip(&self, addr: &Addr) -> bool {
        self.vips.contains(addr)
    }

    pub fn service(&self, id: ServiceId) -> &Service {
        &self.services[usize::from(id)]
    }

    /// Back end `backend` of service `service`: the one place a (service,
    /// back end) pair, as routes and the control plane's model hold it, is
    /// looked up.
    pub fn backend(&self, service: ServiceId, backend: BackendId) -> &Backend {
        &self.service(service).backends[usize::from(backend)]
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The scheduler a service was configured with.
    pub fn scheduler(&self, id: ServiceId) -> Scheduler {
        self.service(id).chooser.scheduler()
    }
}

/// A removed service: same slot, no back end chosen; looked up only for
/// the routes it still has.
fn tombstone(s: &Service) -> Service {
    Service {
        name: s.name.clone(),
        vip: s.vip,
        port: s.port,
        protocol: s.protocol,
        affinity: s.affinity,
        group: s.group,
        http: s.http.clone(),
        removed: true,
        backends: s
            .backends
            .iter()
            .map(|b| Backend {
                removed: true,
                ..b.clone()
            })
            .collect(),
        chooser: Chooser::new(Scheduler::Ratio, 0),
        max_connections: None,
        refuse_when_full: true,
    }
}

/// The placeholder a new service slot starts as.
fn tombstone_of(name: &str, vip: Addr, port: u16, protocol: u8) -> Service {
    Service {
        name: name.to_string(),
        vip,
        port,
        protocol,
        affinity: None,
        group: None,
        http: None,
        removed: true,
        backends: Vec::new(),
        chooser: Chooser::new(Scheduler::Ratio, 0),
        max_connections: None,
        refuse_when_full: true,
    }
}

/// A service's back ends after a rebuild: the previous ones keep their slots
/// (and their counters) where node, address and port are unchanged; the
/// rest of the configured ones are added; the previous ones no longer
/// configured stay as tombstones with ratio 0.
fn merge_backends(
    cfg: &FepConfig,
    s: &ServiceConfig,
    previous: &[Backend],
    node_id: &impl Fn(&str) -> NodeId,
) -> Vec<Backend> {
    let mut backends: Vec<Backend> = previous
        .iter()
        .map(|b| Backend {
            removed: true,
            ..b.clone()
        })
        .collect();
    for (b, spare) in s.all_backends() {
        let node = cfg
            .node(&b.node)
            .expect("validated config names only defined nodes");
        let candidate = Backend {
            node: node.name.clone(),
            node_id: node_id(&node.name),
            addr: addr_from_ip(node.address),
            port: s.backend_port(b),
            spare,
            removed: false,
            shared: Arc::new(BackendShared::default()),
        };
        // Until the control plane publishes the effective ratio.
        candidate.set_ratio(if spare { 0 } else { b.ratio });
        match backends
            .iter_mut()
            .find(|old| old.same_endpoint(&candidate))
        {
            Some(old) => {
                old.removed = false;
                old.spare = spare;
                old.node_id = candidate.node_id;
            }
            None => backends.push(candidate),
        }
    }
    for b in backends.iter().filter(|b| b.removed) {
        b.set_ratio(0);
    }
    backends
}

/// The services each back-end endpoint serves, for matching its replies.
fn index_by_backend(services: &[Service]) -> EndpointMap<Vec<ServiceId>> {
    let mut by_backend = EndpointMap::default();
    for (slot, svc) in services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.http.is_none())
    {
        for b in &svc.backends {
            let ids: &mut Vec<ServiceId> = by_backend
                .get_or_insert_with(Endpoint::new(svc.protocol, b.addr, b.port), Vec::new);
            if !ids.contains(&(slot as ServiceId)) {
                ids.push(slot as ServiceId);
            }
        }
    }
    by_backend
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(svc: &Service) -> Vec<(&str, bool)> {
        svc.backends
            .iter()
            .map(|b| (b.node.as_str(), b.removed))
            .collect()
    }

    #[test]
    fn a_rebuild_keeps_slots_and_counters_and_leaves_tombstones() {
        // testing::CONFIG: web (be1, be2), dns, web6, dns6; nodes be1, be2, be1v6, be2v6.
        let cfg = FepConfig::parse(crate::testing::CONFIG).unwrap();
        let t1 = TransferTable::from_config(&cfg);
        t1.service(0).backends[1].route_added();

        // be1 leaves web, be3 joins it; dns goes; a new service comes.
        let mut cfg2 = cfg.clone();
        cfg2.nodes.push(fep_shared::NodeConfig {
            name: "be3".into(),
            address: "10.0.2.13".parse().unwrap(),
            agent_address: None,
            stop_when_drained: false,
        });
        cfg2.services[0].backends.remove(0);
        cfg2.services[0].backends.push(fep_shared::BackendConfig {
            node: "be3".into(),
            ratio: 4,
            port: None,
        });
        cfg2.services.remove(1);
        let mut extra = cfg.services[1].clone();
        extra.name = "dns2".into();
        extra.port = 54;
        cfg2.services.push(extra);
        let t2 = TransferTable::build(&cfg2, Some(&t1));

        assert_eq!(t2.service_id("web"), Some(0));
        assert_eq!(
            names(t2.service(0)),
            [("be1", true), ("be2", false), ("be3", false)]
        );
        assert_eq!(t2.service(0).backends[1].routes(), 1, "counters carry over");
        assert_eq!(
            t2.service(0).backends[0].ratio(),
            0,
            "a removed back end is never chosen"
        );
        assert_eq!(t2.service(0).backends[2].ratio(), 4);
        assert!(t2.service(1).removed, "dns keeps its slot as a tombstone");
        assert_eq!(t2.service_id("dns"), None);
        assert_eq!(
            t2.service_id("dns2"),
            Some(4),
            "a new service gets a new slot"
        );
        let dns = addr_from_ip("10.0.0.100".parse().unwrap());
        assert!(
            t2.lookup(17, &dns, 53)
                .is_some_and(|(id, s)| id == 1 && s.removed),
            "its clients still reach their live routes"
        );
        assert_eq!(t2.node_id("be3"), Some(4));

        // Back again: be1 gets its old slot.
        let t3 = TransferTable::build(&cfg, Some(&t2));
        assert_eq!(
            names(t3.service(0)),
            [("be1", false), ("be2", false), ("be3", true)]
        );
        assert_eq!(
            t3.service_id("dns"),
            Some(5),
            "a removed service comes back in a new slot"
        );
        assert_eq!(
            t3.lookup(17, &dns, 53).map(|(id, _)| id),
            Some(5),
            "a configured service's endpoint is its own, not a tombstone's"
        );
    }
}
