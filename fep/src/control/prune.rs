//! Pruning: routes change only when idle. After a ratio change, a drain or a
//! node's return, every `prune_interval_ms` the FEP takes the routes of back
//! ends above their target share, asks each node's agent which of them still
//! have a live connection, and deletes the others — until the shares have
//! reached the target. A route with a live connection is never deleted; nor
//! is one whose node has no agent to ask.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fep_shared::protocol::ConnId;
use tokio::task::JoinSet;

use super::model::over_target;
use super::ControlPlane;
use crate::route_table::FlowKey;
use crate::transfer_table::{NodeId, ServiceId};
use crate::wire::ip_from_addr;

/// A route with a packet this recent is not a candidate at all.
pub const MIN_IDLE_MS: u32 = 1_000;
/// UDP has no connection to ask about: a UDP route this idle counts as idle.
pub const UDP_IDLE_MS: u32 = 5_000;

pub async fn run(cp: Arc<ControlPlane>) {
    let mut tick = tokio::time::interval(Duration::from_millis(cp.prune_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        round(&cp).await;
    }
}

/// A route to ask about: the connection as the back end sees it, the route
/// and its last-seen time when the round began.
type Candidate = (ConnId, FlowKey, u32);

/// One pruning round; returns how many routes it deleted.
pub async fn round(cp: &Arc<ControlPlane>) -> usize {
    let over = services_over_target(cp);
    if over.is_empty() {
        return 0;
    }
    let now = cp.now();
    let dispatcher = cp.dispatcher();
    let table = dispatcher.table();
    let mut deleted = 0;
    let mut ask: HashMap<NodeId, Vec<Candidate>> = HashMap::new();
    for (key, backend, _, last_seen) in dispatcher.routes().snapshot() {
        let idle = now.wrapping_sub(last_seen);
        if idle < MIN_IDLE_MS
            || !over
                .get(&key.service)
                .is_some_and(|o| o[usize::from(backend)])
        {
            continue;
        }
        let svc = table.service(key.service);
        let be = &svc.backends[usize::from(backend)];
        if !svc.is_tcp() {
            if idle >= UDP_IDLE_MS
                && dispatcher.remove_route(&key, |_, r| r.last_seen() == last_seen)
            {
                deleted += 1;
            }
            continue;
        }
        let conn = ConnId {
            client: ip_from_addr(&key.client),
            client_port: key.client_port,
            port: be.port,
        };
        ask.entry(be.node_id)
            .or_default()
            .push((conn, key, last_seen));
    }
    let mut queries = JoinSet::new();
    for (node, candidates) in ask {
        let cp = cp.clone();
        queries.spawn(async move {
            let conns = candidates.iter().map(|c| c.0).collect();
            let live = cp.query_live(node, conns).await;
            (candidates, live)
        });
    }
    while let Some(Ok((candidates, live))) = queries.join_next().await {
        // No answer: the connections may be live, so nothing is deleted.
        let Some(live) = live else { continue };
        let live: HashSet<ConnId> = live.into_iter().collect();
        for (conn, key, last_seen) in candidates {
            if !live.contains(&conn)
                && dispatcher.remove_route(&key, |_, r| r.last_seen() == last_seen)
            {
                deleted += 1;
            }
        }
    }
    if deleted > 0 {
        tracing::info!("pruned {deleted} idle route(s) toward the target shares");
    }
    cp.tick();
    deleted
}

/// For each service being pruned, which back ends are above target; a
/// service whose shares are on target stops being pruned.
fn services_over_target(cp: &ControlPlane) -> HashMap<ServiceId, Vec<bool>> {
    let table = cp.dispatcher().table();
    let mut m = cp.model();
    let mut out = HashMap::new();
    for (sid, svc) in m.services.iter_mut().enumerate() {
        if !svc.pruning {
            continue;
        }
        let shares: Vec<(u32, u32)> = table.services()[sid]
            .backends
            .iter()
            .map(|b| (b.ratio(), b.routes()))
            .collect();
        let over = over_target(&shares);
        if over.iter().any(|&o| o) {
            out.insert(sid as ServiceId, over);
        } else {
            svc.pruning = false;
            tracing::info!("service '{}': route shares reached the target", svc.name);
        }
    }
    out
}
