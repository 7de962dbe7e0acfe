//! The transfer table (document 003, table 112): per service, the back-end
//! nodes allowed to serve it and each one's ratio.
//!
//! The data path only reads it; ratios are atomics so that the control plane
//! can change them without stopping a worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use fep_shared::{Affinity, FepConfig, Scheduler};

use crate::chooser::Chooser;
use crate::wire::{addr_from_ip, Addr};

/// Index of a service in the transfer table; part of every route key.
pub type ServiceId = u16;
/// Index of a back end within its service.
pub type BackendId = u16;
/// Index of a node in the config's `[[node]]` list.
pub type NodeId = u16;

/// One back end of a service: a node (or a spare node, which starts with
/// ratio 0 and joins when the control plane has started it).
#[derive(Debug)]
pub struct Backend {
    pub node: String,
    pub node_id: NodeId,
    pub addr: Addr,
    /// Port the back end serves the service on.
    pub port: u16,
    /// Configured as a spare (scale-out) rather than a back end.
    pub spare: bool,
    /// The effective ratio the chooser uses; the control plane derives it
    /// from the configured ratio, the node's state, pins and load.
    ratio: AtomicU32,
    /// The load the `load` scheduler compares (f64 bits).
    load: AtomicU64,
    /// Live routes assigned to this back end.
    routes: AtomicU32,
}

impl Backend {
    /// The effective ratio.
    pub fn ratio(&self) -> u32 {
        self.ratio.load(Ordering::Relaxed)
    }

    pub fn set_ratio(&self, ratio: u32) {
        self.ratio.store(ratio, Ordering::Relaxed);
    }

    pub fn load(&self) -> f64 {
        f64::from_bits(self.load.load(Ordering::Relaxed))
    }

    pub fn set_load(&self, load: f64) {
        self.load.store(load.to_bits(), Ordering::Relaxed);
    }

    pub fn routes(&self) -> u32 {
        self.routes.load(Ordering::Relaxed)
    }

    pub(crate) fn route_added(&self) {
        self.routes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn route_removed(&self) {
        self.routes.fetch_sub(1, Ordering::Relaxed);
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
    pub affinity: Affinity,
    pub backends: Vec<Backend>,
    chooser: Chooser,
}

impl Service {
    /// Picks the back end for a new route, or `None` when no back end has a
    /// ratio above 0.
    pub fn choose(&self) -> Option<BackendId> {
        self.chooser.choose(&self.backends).map(|i| i as BackendId)
    }

    pub fn is_tcp(&self) -> bool {
        self.protocol == crate::wire::TCP
    }
}

/// All services, looked up by (protocol, VIP, port).
#[derive(Debug)]
pub struct TransferTable {
    services: Vec<Service>,
    by_endpoint: HashMap<(u8, Addr, u16), ServiceId, ahash::RandomState>,
}

impl TransferTable {
    /// Builds the table from a validated config.
    pub fn from_config(cfg: &FepConfig) -> Self {
        let mut services = Vec::with_capacity(cfg.services.len());
        let mut by_endpoint = HashMap::default();
        for (id, s) in cfg.services.iter().enumerate() {
            let backends: Vec<Backend> = s
                .all_backends()
                .map(|(b, spare)| {
                    let node_id = cfg
                        .nodes
                        .iter()
                        .position(|n| n.name == b.node)
                        .expect("validated config names only defined nodes");
                    let node = &cfg.nodes[node_id];
                    Backend {
                        node: node.name.clone(),
                        node_id: node_id as NodeId,
                        addr: addr_from_ip(node.address),
                        port: s.backend_port(b),
                        spare,
                        ratio: AtomicU32::new(if spare { 0 } else { b.ratio }),
                        load: AtomicU64::new(0f64.to_bits()),
                        routes: AtomicU32::new(0),
                    }
                })
                .collect();
            let vip = addr_from_ip(s.vip);
            by_endpoint.insert((s.protocol.ip_number(), vip, s.port), id as ServiceId);
            services.push(Service {
                name: s.name.clone(),
                vip,
                port: s.port,
                protocol: s.protocol.ip_number(),
                affinity: s.affinity,
                chooser: Chooser::new(s.scheduler, backends.len()),
                backends,
            });
        }
        TransferTable {
            services,
            by_endpoint,
        }
    }

    /// The service a client packet to (`dst`, `port`) over `protocol` is for.
    pub fn lookup(&self, protocol: u8, dst: &Addr, port: u16) -> Option<(ServiceId, &Service)> {
        let id = *self.by_endpoint.get(&(protocol, *dst, port))?;
        Some((id, &self.services[usize::from(id)]))
    }

    pub fn service(&self, id: ServiceId) -> &Service {
        &self.services[usize::from(id)]
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The scheduler a service was configured with.
    pub fn scheduler(&self, id: ServiceId) -> Scheduler {
        self.service(id).chooser.scheduler()
    }
}
