//! Copies of VIP groups' UDP routes, kept on the back ends they point at.
//! A UDP flow leaves no connection table on its back end, so a front end
//! taking over a dead one's group could only choose its flows afresh; with
//! a copy on the back end (its agent keeps them, across front ends), it
//! rebuilds their routes as it does TCP ones. The journal thread notes each
//! grouped UDP route that becomes confirmed or ends; a control-plane task
//! sends them to the agents every [`FLUSH_EVERY`](super::journal::FLUSH_EVERY).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fep_shared::protocol::{ConnId, FepMsg, MAX_CONNS_PER_FRAME};

use super::ControlPlane;
use crate::dispatcher::Confirmed;
use crate::transfer_table::{NodeId, TransferTable};
use crate::wire::ip_from_addr;

/// Notes waiting to be sent at most: past it (agents far behind, or a flood
/// of flows confirmed within one flush) notes are dropped and counted.
const MAX_PENDING: usize = 4 * MAX_CONNS_PER_FRAME;

/// Keeps (true) and forgets of route copies, in the order they happened.
#[derive(Debug, Default)]
pub(crate) struct Copies {
    pending: Mutex<Vec<(NodeId, bool, ConnId)>>,
    dropped: AtomicU64,
}

impl Copies {
    /// Notes that `route` became confirmed (`keep`) or ended, if it is a VIP
    /// group's UDP route.
    pub(crate) fn note(&self, table: &TransferTable, route: Confirmed, keep: bool) {
        let svc = table.service(route.key.service);
        if !svc.copies_routes() {
            return;
        }
        let Some(be) = svc.backends.get(usize::from(route.backend)) else {
            return;
        };
        let conn = ConnId {
            client: ip_from_addr(&route.key.client),
            client_port: route.key.client_port,
            port: be.port,
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            pending.push((be.node_id, keep, conn));
        }
    }

    /// The notes since the last call, as messages per node in their order.
    fn take(&self) -> Vec<(NodeId, FepMsg)> {
        let mut pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        // A stable sort: each node's notes stay in the order they happened.
        pending.sort_by_key(|(node, ..)| *node);
        let mut out = Vec::new();
        let mut run: Option<(NodeId, bool, Vec<ConnId>)> = None;
        for (node, keep, conn) in pending {
            match &mut run {
                Some((n, k, conns))
                    if *n == node && *k == keep && conns.len() < MAX_CONNS_PER_FRAME =>
                {
                    conns.push(conn)
                }
                _ => {
                    out.extend(run.take().map(message));
                    run = Some((node, keep, vec![conn]));
                }
            }
        }
        out.extend(run.map(message));
        out
    }
}

fn message((node, keep, conns): (NodeId, bool, Vec<ConnId>)) -> (NodeId, FepMsg) {
    let msg = if keep {
        FepMsg::KeepRoutes { conns }
    } else {
        FepMsg::ForgetRoutes { conns }
    };
    (node, msg)
}

impl ControlPlane {
    /// Sends the noted copies to their nodes' agents, forever. A node whose
    /// agent is not connected misses its notes: its flows confirmed
    /// meanwhile are chosen afresh if this front end dies.
    pub async fn send_route_copies(self: Arc<Self>, copies: Arc<Copies>) {
        let mut every = tokio::time::interval(super::journal::FLUSH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dropped = 0;
        loop {
            every.tick().await;
            for (node, msg) in copies.take() {
                self.send(node, msg);
            }
            let now = copies.dropped.load(Ordering::Relaxed);
            if now > dropped {
                tracing::warn!(
                    "{} UDP route copies not sent to their back ends: more than {MAX_PENDING} \
                     were waiting (those flows are chosen afresh if this front end dies)",
                    now - dropped
                );
                dropped = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use super::*;
    use crate::routes::FlowKey;
    use crate::wire::addr_from_ip;

    const CONFIG: &str = r#"
        tun = "fep0"
        [cluster]
        notify_fifo = "/run/fep.fifo"
        [[vip_group]]
        name = "G0"
        vips = ["10.0.0.100"]
        [[node]]
        name = "be1"
        address = "10.0.4.11"
        [[node]]
        name = "be2"
        address = "10.0.4.12"
        [[service]]
        name = "dns"
        vip = "10.0.0.100"
        port = 53
        protocol = "udp"
        [[service.backend]]
        node = "be1"
        ratio = 1
        port = 5353
        [[service.backend]]
        node = "be2"
        ratio = 1
        [[service]]
        name = "web"
        vip = "10.0.0.100"
        port = 80
        protocol = "tcp"
        [[service.backend]]
        node = "be1"
        ratio = 1
        [[service]]
        name = "ungrouped"
        vip = "10.0.9.1"
        port = 53
        protocol = "udp"
        [[service.backend]]
        node = "be1"
        ratio = 1
    "#;

    fn route(service: u32, port: u16, backend: u16) -> Confirmed {
        Confirmed {
            key: FlowKey {
                service: service as _,
                client: addr_from_ip([10, 0, 1, 2].into()),
                client_port: port,
            },
            backend: backend as _,
        }
    }

    fn conns(ports: &[u16], port: u16) -> Vec<ConnId> {
        ports
            .iter()
            .map(|&client_port| ConnId {
                client: [10, 0, 1, 2].into(),
                client_port,
                port,
            })
            .collect()
    }

    #[test]
    fn grouped_udp_routes_go_to_their_nodes_in_order_and_nothing_else() {
        let cfg = FepConfig::parse(CONFIG).unwrap();
        let table = TransferTable::from_config(&cfg);
        let c = Copies::default();
        c.note(&table, route(0, 1, 0), true);
        c.note(&table, route(0, 2, 1), true);
        c.note(&table, route(0, 3, 0), true);
        c.note(&table, route(1, 4, 0), true); // TCP: the socket table has it
        c.note(&table, route(2, 5, 0), true); // in no VIP group
        c.note(&table, route(0, 1, 0), false);
        c.note(&table, route(0, 6, 0), true);
        let be1 = table.service(0).backends[0].node_id;
        let be2 = table.service(0).backends[1].node_id;
        let mut want = vec![
            (
                be1,
                FepMsg::KeepRoutes {
                    conns: conns(&[1, 3], 5353),
                },
            ),
            (
                be1,
                FepMsg::ForgetRoutes {
                    conns: conns(&[1], 5353),
                },
            ),
            (
                be1,
                FepMsg::KeepRoutes {
                    conns: conns(&[6], 5353),
                },
            ),
            (
                be2,
                FepMsg::KeepRoutes {
                    conns: conns(&[2], 53),
                },
            ),
        ];
        if be2 < be1 {
            want.rotate_left(3);
        }
        assert_eq!(c.take(), want);
        assert_eq!(c.take(), []);
    }
}
