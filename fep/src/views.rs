//! The admin API's views (`fep_shared::api`) built from the control state,
//! the transfer table and the counters; the HTTP transport (`admin`) only
//! routes requests here.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fep_shared::api::{
    BackendView, CountersView, ExplainQuery, ExplainReason, ExplainView, HttpBackendView,
    HttpServiceView, NodeServiceView, NodeView, RouteQuery, RouteState, RouteView, ServiceView,
    StatusView, TunWorkersView,
};
use fep_shared::Protocol;

use crate::clock::idle_since;
use crate::control::model::Model;
use crate::control::ControlPlane;
use crate::counters::{Count, DropReason, Totals, WorkerCounters};
use crate::dispatcher::Dispatcher;
use crate::fast_path::FastPathStats;
use crate::http_mode::HttpFront;
use crate::routes::{state, Explained, FlowKey};
use crate::sites::Sites;
use crate::transfer_table::{ServiceId, TransferTable};
use crate::wire::{addr_from_ip, ip_from_addr};

/// What the views and the metrics read besides the control plane: the TUN
/// workers' counters and HTTP mode's figures.
#[derive(Clone)]
pub struct Sources {
    pub workers: Vec<Arc<WorkerCounters>>,
    pub http: Arc<HttpFront>,
    /// Several sites: the hand-off state, the DNS server's and the
    /// exchange's counters.
    pub sites: Option<Arc<Sites>>,
    /// The kernel fast path's state and figures.
    pub fast_path: Arc<FastPathStats>,
}

/// Every configured service with its back ends' ratios and shares, and
/// HTTP mode's figures for its HTTP services.
pub fn services(cp: &ControlPlane, http: &HttpFront) -> Vec<ServiceView> {
    let now = cp.now();
    let state = cp.state();
    let table = cp.dispatcher().table();
    (0..state.model.services.len())
        .filter_map(|sid| service_view(&state.model, &table, http, sid as ServiceId, now))
        .collect()
}

/// A configured service's view (`None` for a removed one).
fn service_view(
    m: &Model,
    table: &TransferTable,
    http: &HttpFront,
    sid: ServiceId,
    now: u32,
) -> Option<ServiceView> {
    let s = m.services.get(usize::from(sid)).filter(|s| !s.removed)?;
    let svc = table.service(sid);
    let routes: u32 = svc.live_backends().map(|(_, b)| b.live_routes()).sum();
    let closing: u32 = svc.live_backends().map(|(_, b)| b.closing()).sum();
    let ratio_sum: u32 = svc.live_backends().map(|(_, b)| b.ratio()).sum();
    let (http_service, mut http_backends) = http_views(http, sid);
    Some(ServiceView {
        name: s.name.clone(),
        vip: ip_from_addr(&svc.vip),
        port: s.port,
        protocol: if s.tcp { Protocol::Tcp } else { Protocol::Udp },
        scheduler: s.scheduler,
        routes,
        closing,
        pruning: s.pruning,
        backends: m
            .backends
            .iter()
            .filter(|b| b.service == sid)
            .map(|b| {
                let be = &svc.backends[usize::from(b.index)];
                BackendView {
                    node: be.node.clone(),
                    port: be.port,
                    configured_ratio: b.configured,
                    effective_ratio: be.ratio(),
                    routes: be.live_routes(),
                    closing: be.closing(),
                    share: fraction(be.live_routes(), routes),
                    target_share: fraction(be.ratio(), ratio_sum),
                    up: m.backend_up(b, now),
                    overloaded: b.overloaded,
                    spare: b.spare,
                    load: m.load(b, now),
                    http: http_backends
                        .get_mut(usize::from(b.index))
                        .and_then(Option::take),
                }
            })
            .collect(),
        http: http_service,
    })
}

/// Every configured node: state, pins, agent, ratios per service.
pub fn nodes(cp: &ControlPlane) -> Vec<NodeView> {
    let now = cp.now();
    let connected: Vec<u16> = cp.agents().keys().copied().collect();
    let state = cp.state();
    let m = &state.model;
    let table = cp.dispatcher().table();
    m.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.removed)
        .map(|(id, n)| {
            let services: Vec<NodeServiceView> = m
                .backends
                .iter()
                .filter(|b| usize::from(b.node) == id)
                .map(|b| {
                    let be = &table.service(b.service).backends[usize::from(b.index)];
                    NodeServiceView {
                        service: m.services[usize::from(b.service)].name.clone(),
                        configured_ratio: b.configured,
                        effective_ratio: be.ratio(),
                        routes: be.live_routes(),
                        closing: be.closing(),
                    }
                })
                .collect();
            NodeView {
                name: n.name.clone(),
                address: n.address,
                agent_address: n.agent_address,
                state: m.node_state(id as u16, now),
                pinned: !n.pin.is_empty(),
                pin: n.pin.clone(),
                routes: services.iter().map(|s| s.routes).sum(),
                closing: services.iter().map(|s| s.closing).sum(),
                agent_connected: connected.contains(&(id as u16)),
                report_age_ms: n.report.as_ref().map(|(at, _)| idle_since(*at, now)),
                cpu_percent: n.report.as_ref().map(|(_, r)| r.cpu_percent),
                services,
            }
        })
        .collect()
}

/// HTTP mode's figures for the service in `slot` (none for a TCP or UDP
/// service), its back ends' by back-end slot.
fn http_views(
    http: &HttpFront,
    slot: ServiceId,
) -> (Option<HttpServiceView>, Vec<Option<HttpBackendView>>) {
    http.with_service(slot, |front, backends| {
        let s = &front.stats;
        let service = HttpServiceView {
            requests_per_s: s.requests_per_s(),
            requests: front.requests(),
            connections: s.open.load(Ordering::Relaxed),
            refused: s
                .refusals()
                .map(|(why, n)| (why.name().to_string(), n))
                .collect(),
        };
        let backends = backends
            .iter()
            .map(|snap| {
                snap.as_ref().map(|snap| {
                    let b = snap.stats;
                    HttpBackendView {
                        requests: b.requests(),
                        pool_idle: b.idle.load(Ordering::Relaxed),
                        pool_busy: b.busy.load(Ordering::Relaxed),
                        connects: b.connects.load(Ordering::Relaxed),
                        reuse: b.reuse(),
                        retries: b.retries.load(Ordering::Relaxed),
                        sessions: snap.sessions,
                    }
                })
            })
            .collect();
        (Some(service), backends)
    })
    .unwrap_or_default()
}

fn fraction(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

/// Services, nodes, the route table's size and the workers' counters.
pub fn status(cp: &ControlPlane, sources: &Sources) -> StatusView {
    let totals = Totals::sum(sources.workers.iter().map(|c| &**c));
    let dispatcher = cp.dispatcher();
    let removed = dispatcher.removed_totals();
    let table = dispatcher.table();
    let closing: usize = table
        .services()
        .iter()
        .flat_map(|s| &s.backends)
        .map(|b| b.closing() as usize)
        .sum();
    StatusView {
        routes: dispatcher.routes().len().saturating_sub(closing),
        closing,
        routes_expired: removed.expired,
        routes_evicted: removed.evicted,
        journal_overflow: dispatcher.journal_overflow(),
        tun_workers: TunWorkersView {
            batched: totals.batched_workers,
            blocking: totals.workers - totals.batched_workers,
        },
        fast_path: sources.fast_path.view(),
        counters: counters_view(&totals),
        agent_rejects: cp
            .rejects()
            .into_iter()
            .map(|(reason, n)| (reason.to_string(), n))
            .collect(),
        services: services(cp, &sources.http),
        nodes: nodes(cp),
    }
}

fn counters_view(t: &Totals) -> CountersView {
    CountersView {
        drops: DropReason::ALL
            .iter()
            .map(|&r| (r.as_str().to_string(), t.drops(r)))
            .collect(),
        to_backend_packets: t.all.to_backend_packets,
        to_backend_bytes: t.all.to_backend_bytes,
        to_client_packets: t.all.to_client_packets,
        to_client_bytes: t.all.to_client_bytes,
        events: Count::ALL.iter().map(|&e| (e, t.get(e))).collect(),
    }
}

/// Bytes of JSON handed to `send` at a time by [`list_routes`].
pub const CHUNK: usize = 64 * 1024;

/// Writes the first `limit` (default [`RouteQuery::DEFAULT_LIMIT`]) routes
/// matching `q` as a JSON array, in chunks of about [`CHUNK`] bytes given to
/// `send`; stops after the limit, or once `send` says the reader is gone. A
/// listing costs what it shows, not the table (only a filter few routes
/// match looks through it all).
pub fn list_routes(
    dispatcher: &Dispatcher,
    q: &RouteQuery,
    now: u32,
    mut send: impl FnMut(Vec<u8>) -> bool,
) {
    let table = dispatcher.table();
    let limit = q.limit.unwrap_or(RouteQuery::DEFAULT_LIMIT);
    let (mut out, mut listed, mut gone) = (vec![b'['], 0, false);
    if limit > 0 {
        dispatcher.routes().scan(|key, route| {
            let svc = table.service(key.service);
            let be = &svc.backends[usize::from(route.backend)];
            let client = ip_from_addr(&key.client);
            let keep = q.service.as_ref().is_none_or(|s| *s == svc.name)
                && q.node.as_ref().is_none_or(|n| *n == be.node)
                && q.client.is_none_or(|c| c == client);
            if !keep {
                return ControlFlow::Continue(());
            }
            let st = route.state();
            let view = RouteView {
                service: svc.name.as_str().into(),
                client,
                client_port: key.client_port,
                node: be.node.as_str().into(),
                backend_port: be.port,
                state: route_state(st),
                idle_ms: route.idle_ms(now),
            };
            if listed > 0 {
                out.push(b',');
            }
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, &view);
            listed += 1;
            if out.len() >= CHUNK && !send(std::mem::replace(&mut out, Vec::with_capacity(CHUNK))) {
                gone = true;
                return ControlFlow::Break(());
            }
            if listed < limit {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        });
    }
    if !gone {
        out.push(b']');
        send(out);
    }
}

/// Where a route's connection stands, from its state bits.
fn route_state(bits: u8) -> RouteState {
    if state::is_closed(bits) {
        RouteState::Closed
    } else if bits & (state::FIN_FROM_CLIENT | state::FIN_FROM_BACKEND) != 0 {
        RouteState::Closing
    } else {
        RouteState::Open
    }
}

/// `GET /v1/explain`: where a packet from the query's client would go in
/// its service, and why; `None` for a service that is not configured.
pub fn explain(cp: &ControlPlane, http: &HttpFront, q: &ExplainQuery) -> Option<ExplainView> {
    let dispatcher = cp.dispatcher();
    let table = dispatcher.table();
    let sid = table.service_id(&q.service)?;
    let svc = table.service(sid);
    let key = FlowKey {
        service: sid,
        client_port: q.port,
        client: addr_from_ip(q.client),
    };
    let (reason, backend, route, held_routes) = match dispatcher.routes().explain(&key, svc) {
        Explained::Route {
            backend,
            state,
            last_seen,
        } => (
            ExplainReason::Route,
            Some(backend),
            Some((route_state(state), idle_since(last_seen, cp.now()))),
            None,
        ),
        Explained::Held { backend, routes } => {
            (ExplainReason::Affinity, Some(backend), None, Some(routes))
        }
        Explained::Chosen(backend) => (ExplainReason::Chooser, Some(backend), None, None),
        Explained::ServiceFull => (ExplainReason::ServiceFull, None, None, None),
        Explained::TableFull => (ExplainReason::TableFull, None, None, None),
        Explained::NoBackend => (ExplainReason::NoBackend, None, None, None),
    };
    let be = backend.map(|b| &svc.backends[usize::from(b)]);
    let view = service_view(&cp.state().model, &table, http, sid, cp.now());
    Some(ExplainView {
        service: q.service.clone(),
        client: q.client,
        client_port: q.port,
        reason,
        node: be.map(|b| b.node.clone()),
        backend_port: be.map(|b| b.port),
        route,
        held_routes,
        scheduler: table.scheduler(sid),
        backends: view.map(|v| v.backends).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use super::*;
    use crate::routes::{Route, Row};

    /// A dispatcher holding `n` routes of `web` (testing::CONFIG), from
    /// 192.0.2.x:port, alternating be1 (port 80) and be2 (port 8080).
    fn with_routes(n: u16) -> Dispatcher {
        let d = Dispatcher::new(&FepConfig::parse(crate::testing::CONFIG).unwrap());
        for i in 0..n {
            let key = FlowKey {
                service: 0,
                client_port: 1000 + i,
                client: addr_from_ip([192, 0, 2, (i % 200) as u8].into()),
            };
            let route = Route::from_parts(i % 2, state::ESTABLISHED, 0);
            assert_eq!(d.routes().import(&d.table(), [Row { key, route }]), 1);
        }
        d
    }

    /// The listing's chunks, how many there were, and the routes they list.
    fn listing(d: &Dispatcher, query: &str) -> (usize, Vec<RouteView<'static>>) {
        let q: RouteQuery = serde_json::from_str(query).unwrap();
        let mut chunks = Vec::new();
        list_routes(d, &q, 10, |c| {
            chunks.push(c);
            true
        });
        let json: Vec<u8> = chunks.concat();
        (chunks.len(), serde_json::from_slice(&json).unwrap())
    }

    #[test]
    fn a_listing_stops_at_its_limit_and_filters_while_it_scans() {
        let d = with_routes(3000);
        let (chunks, all) = listing(&d, r#"{"limit": 2500}"#);
        assert_eq!(all.len(), 2500);
        assert!(chunks > 1, "more than one chunk of 64 KB");
        assert_eq!(listing(&d, "{}").1.len(), 1000, "the default limit");
        let (_, be2) = listing(&d, r#"{"node": "be2", "limit": 10}"#);
        assert_eq!(be2.len(), 10);
        assert!(be2
            .iter()
            .all(|r| r.node == "be2" && r.backend_port == 8080 && r.service == "web"));
        let (_, one) = listing(&d, r#"{"client": "192.0.2.7", "service": "web"}"#);
        assert_eq!(one.len(), 15, "ports 1007, 1207, … 2807");
        assert!(one
            .iter()
            .all(|r| r.client.to_string() == "192.0.2.7" && r.state == RouteState::Open));
        assert!(listing(&d, r#"{"service": "dns"}"#).1.is_empty());
        assert!(listing(&d, r#"{"limit": 0}"#).1.is_empty());
    }

    #[test]
    fn a_listing_whose_reader_is_gone_stops() {
        let d = with_routes(3000);
        let q: RouteQuery = serde_json::from_str(r#"{"limit": 3000}"#).unwrap();
        let mut sent = 0;
        list_routes(&d, &q, 10, |_| {
            sent += 1;
            false
        });
        assert_eq!(sent, 1, "nothing after the first refused chunk");
    }
}
