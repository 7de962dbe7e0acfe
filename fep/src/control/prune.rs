//! Pruning: routes change only when idle. After a ratio change, a drain or a
//! node's return, every `prune_interval_ms` the FEP takes the routes of back
//! ends above their target share, asks each node's agent which of them still
//! have a live connection (in queries of at most `MAX_CONNS_PER_FRAME`, one
//! after the other), and deletes the others — until the shares have reached
//! the target. A route with a live connection is never deleted; nor is one
//! whose node has no agent to ask or does not answer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fep_shared::protocol::{ConnId, MAX_CONNS_PER_FRAME};
use tokio::task::JoinSet;

use super::model::{over_target, Model};
use super::ControlPlane;
use crate::dispatcher::Dispatcher;
use crate::routes::{FlowKey, Row};
use crate::transfer_table::{NodeId, ServiceId, TransferTable};
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
pub type Candidate = (ConnId, FlowKey, u32);

/// One pruning round.
pub async fn round(cp: &Arc<ControlPlane>) {
    let over = services_over_target(&cp.dispatcher().table(), &mut cp.state().model);
    if over.is_empty() {
        return;
    }
    let now = cp.now();
    // Passes over the route table run on the blocking pool: planning (the
    // whole table) and the deletions (possibly many).
    let dispatcher = cp.dispatcher_arc();
    let Ok((ask, idle_udp)) = tokio::task::spawn_blocking(move || {
        let plan = plan(
            &dispatcher.table(),
            dispatcher.routes().export(|_| true),
            &over,
            now,
        );
        let deleted = delete(&dispatcher, plan.idle_udp.iter().copied());
        (plan.ask, deleted)
    })
    .await
    else {
        return;
    };
    let (query_cp, delete_cp) = (cp.clone(), cp.clone());
    let asked = ask_and_delete(
        ask,
        move |node, conns| {
            let cp = query_cp.clone();
            async move { cp.query_live(node, conns).await }
        },
        move |idle| {
            let dispatcher = delete_cp.dispatcher_arc();
            async move {
                tokio::task::spawn_blocking(move || delete(&dispatcher, idle.into_iter()))
                    .await
                    .unwrap_or(0)
            }
        },
    )
    .await;
    let deleted = Deleted { idle_udp, asked };
    if let Some(line) = deleted.record(&cp.prune_cycles, &cp.routes_pruned) {
        tracing::info!("{line}");
    }
    cp.tick();
}

/// What one round deleted: idle UDP routes, and TCP routes whose agent
/// answered that their connection is not live.
#[derive(Debug, Clone, Copy)]
struct Deleted {
    idle_udp: usize,
    asked: usize,
}

impl Deleted {
    /// Counts the round into `cycles` and its deletions into `pruned` (what
    /// `fep_prune_cycles_total` and `fep_routes_pruned_total` show); the
    /// line to log, when it deleted any.
    fn record(self, cycles: &AtomicU64, pruned: &AtomicU64) -> Option<String> {
        let total = self.idle_udp + self.asked;
        cycles.fetch_add(1, Ordering::Relaxed);
        pruned.fetch_add(total as u64, Ordering::Relaxed);
        (total > 0).then(|| format!("pruned {total} idle route(s) toward the target shares"))
    }
}

/// Asks each node (all at once) about its candidates, in frame-sized parts
/// one after the other so that each part has the whole answer time to
/// itself, and deletes the routes whose connection is not live; a node that
/// does not answer keeps the rest of its routes. How many were deleted.
async fn ask_and_delete<Q, QF, D, DF>(
    ask: HashMap<NodeId, Vec<Candidate>>,
    query: Q,
    delete: D,
) -> usize
where
    Q: Fn(NodeId, Vec<ConnId>) -> QF + Clone + Send + 'static,
    QF: Future<Output = Option<Vec<ConnId>>> + Send,
    D: Fn(Vec<(FlowKey, u32)>) -> DF + Clone + Send + 'static,
    DF: Future<Output = usize> + Send,
{
    let mut queries = JoinSet::new();
    for (node, candidates) in ask {
        let (query, delete) = (query.clone(), delete.clone());
        queries.spawn(async move {
            let mut deleted = 0;
            for part in candidates.chunks(MAX_CONNS_PER_FRAME) {
                let conns = part.iter().map(|c| c.0).collect();
                // No answer: the connections may be live, so nothing is deleted.
                let Some(live) = query(node, conns).await else {
                    break;
                };
                let live: HashSet<ConnId> = live.into_iter().collect();
                let idle: Vec<(FlowKey, u32)> = part
                    .iter()
                    .filter(|(conn, _, _)| !live.contains(conn))
                    .map(|&(_, key, last_seen)| (key, last_seen))
                    .collect();
                deleted += delete(idle).await;
            }
            deleted
        });
    }
    let mut deleted = 0;
    while let Some(Ok(n)) = queries.join_next().await {
        deleted += n;
    }
    deleted
}

/// Deletes each route that has had no packet since the round began (its
/// last-seen time unchanged); how many it deleted.
fn delete(dispatcher: &Dispatcher, routes: impl Iterator<Item = (FlowKey, u32)>) -> usize {
    let table = dispatcher.table();
    routes
        .filter(|(key, last_seen)| {
            dispatcher.end_route_if(&table, key, |r| r.last_seen() == *last_seen)
        })
        .count()
}

/// What one round does before asking anyone.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// UDP routes idle long enough to delete without asking.
    pub idle_udp: Vec<(FlowKey, u32)>,
    /// TCP routes to ask each node's agent about.
    pub ask: HashMap<NodeId, Vec<Candidate>>,
}

/// Picks the candidates: routes of back ends above target (`over`, per
/// service) with no packet for [`MIN_IDLE_MS`].
pub fn plan(
    table: &TransferTable,
    routes: Vec<Row>,
    over: &HashMap<ServiceId, Vec<bool>>,
    now: u32,
) -> Plan {
    let mut plan = Plan::default();
    for Row { key, route } in routes {
        let (backend, last_seen) = (route.backend, route.last_seen());
        let idle = route.idle_ms(now);
        let is_over = over
            .get(&key.service)
            .is_some_and(|o| o[usize::from(backend)]);
        if idle < MIN_IDLE_MS || !is_over {
            continue;
        }
        let svc = table.service(key.service);
        let be = &svc.backends[usize::from(backend)];
        if !svc.is_tcp() {
            if idle >= UDP_IDLE_MS {
                plan.idle_udp.push((key, last_seen));
            }
            continue;
        }
        let conn = ConnId {
            client: ip_from_addr(&key.client),
            client_port: key.client_port,
            port: be.port,
        };
        plan.ask
            .entry(be.node_id)
            .or_default()
            .push((conn, key, last_seen));
    }
    plan
}

/// For each service being pruned, which back ends are above target; a
/// service whose shares are on target stops being pruned.
fn services_over_target(table: &TransferTable, m: &mut Model) -> HashMap<ServiceId, Vec<bool>> {
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

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use super::*;
    use crate::routes::Route;
    use crate::testing::CONFIG;
    use crate::transfer_table::BackendId;
    use crate::wire::addr_from_ip;

    fn key(service: ServiceId, n: u8) -> FlowKey {
        FlowKey {
            service,
            client_port: 40000 + u16::from(n),
            client: addr_from_ip([192, 0, 2, n].into()),
        }
    }

    /// A row of `key` on `backend`, last seen at `last_seen`, no state bits.
    fn row(key: FlowKey, backend: BackendId, last_seen: u32) -> Row {
        Row {
            key,
            route: Route::from_parts(backend, 0, last_seen),
        }
    }

    #[tokio::test]
    async fn only_routes_without_a_live_connection_are_deleted_part_by_part() {
        use std::sync::Mutex;
        let candidate = |n: u32| {
            let conn = ConnId {
                client: std::net::Ipv4Addr::from(n).into(),
                client_port: 40_000,
                port: 80,
            };
            let key = FlowKey {
                service: 0,
                client_port: 40_000,
                client: addr_from_ip(conn.client),
            };
            (conn, key, n)
        };
        let full = MAX_CONNS_PER_FRAME as u32;
        // Node 0: two parts; its agent says the first of each part is live.
        // Node 1: no answer.
        let ask = HashMap::from([
            (0, (0..full + 2).map(candidate).collect()),
            (1, vec![candidate(1 << 30)]),
        ]);
        let asked = Arc::new(Mutex::new(Vec::new()));
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let (a, d) = (asked.clone(), deleted.clone());
        let n = ask_and_delete(
            ask,
            move |node, conns: Vec<ConnId>| {
                a.lock().unwrap().push((node, conns.len()));
                async move { (node == 0).then(|| vec![conns[0]]) }
            },
            move |idle: Vec<(FlowKey, u32)>| {
                let n = idle.len();
                d.lock()
                    .unwrap()
                    .extend(idle.into_iter().map(|(_, seen)| seen));
                async move { n }
            },
        )
        .await;
        assert_eq!(n, full as usize);
        let mut asked = asked.lock().unwrap().clone();
        asked.sort();
        assert_eq!(asked, vec![(0, 2), (0, MAX_CONNS_PER_FRAME), (1, 1)]);
        let deleted = deleted.lock().unwrap();
        assert_eq!(deleted.len(), full as usize);
        assert!(!deleted.contains(&0) && !deleted.contains(&full));
        assert!(!deleted.contains(&(1 << 30)));
    }

    #[test]
    fn a_round_counts_itself_and_all_it_deleted_and_logs_only_deletions() {
        let (cycles, pruned) = (AtomicU64::new(0), AtomicU64::new(0));
        let round = |idle_udp, asked| Deleted { idle_udp, asked }.record(&cycles, &pruned);
        assert_eq!(
            round(2, 3).as_deref(),
            Some("pruned 5 idle route(s) toward the target shares")
        );
        assert_eq!(round(0, 0), None, "nothing deleted: nothing to say");
        assert_eq!(
            round(0, 1).as_deref(),
            Some("pruned 1 idle route(s) toward the target shares")
        );
        assert_eq!(cycles.load(Ordering::Relaxed), 3);
        assert_eq!(pruned.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn only_services_being_pruned_and_still_off_target_are_pruned() {
        // web: be1 ratio 2, be2 ratio 1, and be2 holds all 10 routes.
        let cfg = FepConfig::parse(CONFIG).unwrap();
        let table = TransferTable::from_config(&cfg);
        let mut model = Model::from_config(&cfg);
        for _ in 0..10 {
            table.service(0).backends[1].route_added();
            table.service(2).backends[1].route_added();
        }
        model.services[0].pruning = true;
        model.services[1].pruning = true; // dns: no routes, on target
        let over = services_over_target(&table, &mut model);
        assert_eq!(over, HashMap::from([(0, vec![false, true])]));
        assert!(model.services[0].pruning);
        assert!(!model.services[1].pruning, "on target: pruning ends");
    }

    #[test]
    fn a_route_idle_exactly_the_minimum_is_a_candidate() {
        let table = TransferTable::from_config(&FepConfig::parse(CONFIG).unwrap());
        let over = HashMap::from([(0, vec![true, true])]);
        let p = plan(&table, vec![row(key(0, 1), 0, 0)], &over, MIN_IDLE_MS);
        assert_eq!(p.ask[&0].len(), 1);
    }

    #[test]
    fn a_route_seen_since_the_round_began_is_not_deleted() {
        let d = Dispatcher::new(&FepConfig::parse(CONFIG).unwrap());
        for n in 1..=3 {
            let route = Route::from_parts(1, 0, 1_000);
            assert_eq!(
                d.routes().import(
                    &d.table(),
                    [Row {
                        key: key(0, n),
                        route
                    }]
                ),
                1
            );
        }
        // key 2 had a packet after the plan (its last-seen time moved on);
        // key 9 has no route.
        let idle = [(key(0, 1), 1_000), (key(0, 2), 900), (key(0, 9), 1_000)];
        assert_eq!(delete(&d, idle.into_iter()), 1);
        assert_eq!(d.routes().backend_of(&key(0, 1)), None);
        assert_eq!(d.routes().backend_of(&key(0, 2)), Some(1));
        assert_eq!(d.routes().len(), 2);
        assert_eq!(d.table().service(0).backends[1].routes(), 2);
    }

    #[test]
    fn only_idle_routes_of_backends_above_target_are_candidates() {
        // testing::CONFIG: web = be1 (port 80), be2 (port 8080); dns is UDP.
        let table = TransferTable::from_config(&FepConfig::parse(CONFIG).unwrap());
        let over = HashMap::from([(0, vec![false, true]), (1, vec![true, false])]);
        let now = 10_000;
        let routes = vec![
            row(key(0, 1), 1, now - 5_000),           // be2, idle: ask be2's agent
            row(key(0, 2), 1, now - MIN_IDLE_MS + 1), // be2, too recent
            row(key(0, 3), 0, now - 9_000),           // be1 is on target
            row(key(1, 4), 0, now - UDP_IDLE_MS),     // UDP, idle long enough
            row(key(1, 5), 0, now - 2_000),           // UDP, not idle long enough
        ];
        let p = plan(&table, routes, &over, now);
        assert_eq!(p.idle_udp, vec![(key(1, 4), now - UDP_IDLE_MS)]);
        let conn = ConnId {
            client: [192, 0, 2, 1].into(),
            client_port: 40001,
            port: 8080,
        };
        assert_eq!(
            p.ask,
            HashMap::from([(1, vec![(conn, key(0, 1), now - 5_000)])])
        );
    }
}
