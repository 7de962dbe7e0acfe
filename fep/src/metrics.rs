//! Prometheus metrics on `metrics_listen` (`GET /metrics`), read from the
//! data path's counters and the control plane at scrape time, so that the
//! packet path does no metrics work of its own.

mod families;
mod fast_path;
mod http;
mod sites;

use crate::clock::idle_since;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use fep_shared::protocol::ProtocolError;

use crate::control::model::{Model, NodeState};
use crate::control::{agents, peers, ControlPlane};
use crate::counters::{Count, DropReason, Totals};
use crate::transfer_table::TransferTable;
use crate::views::Sources;
use fast_path::FastPathMetrics;
use http::HttpMetrics;
use sites::SiteMetrics;

/// Every metric fep exports.
pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    drops: IntCounterVec,
    routes: IntGaugeVec,
    assignments: IntCounterVec,
    expired: IntCounter,
    evicted: IntCounter,
    node_up: IntGaugeVec,
    node_state: IntGaugeVec,
    load: GaugeVec,
    configured_ratio: IntGaugeVec,
    effective_ratio: IntGaugeVec,
    report_age: GaugeVec,
    prune_cycles: IntCounter,
    pruned: IntCounter,
    tun_errors: IntCounterVec,
    tun_workers: IntGaugeVec,
    rejects: IntCounterVec,
    peer_rejects: IntCounterVec,
    icmp: IntCounterVec,
    unconfirmed_evicted: IntCounter,
    handshakes_adopted: IntCounter,
    packets_held: IntCounter,
    syn_refused: IntCounter,
    http: HttpMetrics,
    sites: SiteMetrics,
    fast_path: FastPathMetrics,
}

/// Raises a counter to `value` (counters only go up; the sources are
/// monotonic too).
fn sync(c: &IntCounter, value: u64) {
    let current = c.get();
    if value > current {
        c.inc_by(value - current);
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let float_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let sb = &["service", "direction"][..];
        let sn = &["service", "node"][..];
        Metrics {
            packets: counter_vec("fep_packets_total", "Packets forwarded, by service and direction (to_backend, to_client).", sb),
            bytes: counter_vec("fep_bytes_total", "Bytes of IP packets forwarded, by service and direction.", sb),
            drops: counter_vec("fep_dropped_packets_total", "Packets dropped, by reason.", &["reason"]),
            routes: gauge_vec("fep_routes", "Routes in the assigned-route table, by service, node and state (live: the connection is open; closing: over, lingering for its last segments).", &["service", "node", "state"]),
            assignments: counter_vec("fep_route_assignments_total", "Routes assigned, by service and node.", sn),
            expired: counter("fep_routes_expired_total", "Routes removed because their connection ended or idled out."),
            evicted: counter("fep_routes_evicted_total", "Routes evicted because the table neared max_routes."),
            node_up: gauge_vec("fep_node_up", "1 if the node is up (agent reporting or none configured, not pinned down).", &["node"]),
            node_state: gauge_vec("fep_node_state", "1 for the node's current state (up, down, draining, drained).", &["node", "state"]),
            load: float_vec("fep_backend_load", "The back end's load as its service measures it (load_metric).", sn),
            configured_ratio: gauge_vec("fep_backend_configured_ratio", "The configured ratio of a back end.", sn),
            effective_ratio: gauge_vec(
                "fep_backend_effective_ratio",
                "The ratio the chooser uses (0 when down, draining or a spare; lowered under load).",
                sn,
            ),
            report_age: float_vec("fep_agent_report_age_seconds", "Age of the node agent's last report.", &["node"]),
            prune_cycles: counter("fep_prune_cycles_total", "Pruning rounds that looked at routes."),
            pruned: counter("fep_routes_pruned_total", "Idle routes deleted by pruning."),
            tun_errors: counter_vec("fep_tun_errors_total", "TUN device read and write errors.", &["op"]),
            tun_workers: gauge_vec(
                "fep_tun_workers",
                "Data-path workers by TUN I/O mode: batched (io_uring) or blocking (a system call per packet).",
                &["io"],
            ),
            rejects: counter_vec("fep_agent_rejected_frames_total", "Agent frames and connections rejected, by reason.", &["reason"]),
            peer_rejects: counter_vec("fep_peer_rejected_total", "Frames and connections from other front ends (the fep-to-fep channel) rejected, by reason.", &["reason"]),
            icmp: counter_vec(
                "fep_icmp_total",
                "ICMP handled: echo replies sent for VIPs, errors translated for tracked flows.",
                &["kind"],
            ),
            unconfirmed_evicted: counter(
                "fep_unconfirmed_routes_evicted_total",
                "Unconfirmed routes (a SYN never completed, a datagram never followed up after a reply) evicted to make room for new clients under a flood.",
            ),
            handshakes_adopted: counter(
                "fep_handshakes_adopted_total",
                "Routes made from a back end's SYN-ACK in the first minute after a start (handshakes in flight across a restart).",
            ),
            packets_held: counter(
                "fep_packets_held_total",
                "Packets of a VIP group stored while the group's routes came to this gateway, replayed when they were back (fep_dropped_packets_total{reason=\"hold_full\"}: those that did not fit).",
            ),
            syn_refused: counter(
                "fep_syn_refused_total",
                "SYNs answered with a RST, so that the client gives up at once: their TCP service was at max_connections or had no back end with a ratio above 0 (refuse_when_full; fep_dropped_packets_total{reason=\"service_full\"}: those dropped instead).",
            ),
            http: HttpMetrics::new(&registry),
            sites: SiteMetrics::new(&registry),
            fast_path: FastPathMetrics::new(&registry),
            registry,
        }
        .with_zero_series()
    }

    /// Creates the series of every known reason at 0, so that rates and
    /// alerts work before the first event.
    fn with_zero_series(self) -> Self {
        for r in ProtocolError::KINDS.iter().chain(&agents::REFUSALS) {
            self.rejects.with_label_values(&[r]);
        }
        for r in ProtocolError::KINDS.iter().chain(&peers::REFUSALS) {
            self.peer_rejects.with_label_values(&[r]);
        }
        for e in Count::ALL {
            self.event_series(e);
        }
        for r in DropReason::ALL {
            self.drops.with_label_values(&[r.as_str()]);
        }
        self
    }

    /// The series an event counter is exported as.
    fn event_series(&self, e: Count) -> Option<IntCounter> {
        match e {
            // Exported by service and node, as fep_route_assignments_total.
            Count::RoutesCreated => None,
            Count::UnconfirmedEvicted => Some(self.unconfirmed_evicted.clone()),
            Count::HandshakesAdopted => Some(self.handshakes_adopted.clone()),
            Count::IcmpEchoReplies => Some(self.icmp.with_label_values(&["echo_reply"])),
            Count::IcmpErrorsTranslated => Some(self.icmp.with_label_values(&["error_translated"])),
            Count::TunReadErrors => Some(self.tun_errors.with_label_values(&["read"])),
            Count::TunWriteErrors => Some(self.tun_errors.with_label_values(&["write"])),
            Count::PacketsHeld => Some(self.packets_held.clone()),
            Count::SynRefused => Some(self.syn_refused.clone()),
        }
    }

    /// Brings every metric up to date and renders the text format.
    pub fn render(&self, cp: &ControlPlane, sources: &Sources) -> String {
        let totals = Totals::sum(sources.workers.iter().map(|c| &**c));
        let table = cp.dispatcher().table();
        self.sync_traffic(&table, &totals);
        self.sync_events(&totals);
        self.sync_control(cp);
        let now = cp.now();
        let state = cp.state();
        let model = &state.model;
        self.sync_backends(model, &table, now);
        self.sync_nodes(model, now);
        drop(state);
        let latency = self.http.sync(&table, &sources.http);
        if let Some(sites) = &sources.sites {
            self.sites.sync(sites);
        }
        self.fast_path.sync(&sources.fast_path.view());
        let mut families = self.registry.gather();
        families.extend(latency);
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&families, &mut out)
            .expect("text encoding of valid metrics");
        out
    }

    /// Packets and bytes by service and direction (services that saw none
    /// have no series).
    fn sync_traffic(&self, table: &TransferTable, totals: &Totals) {
        for (slot, svc) in table.services().iter().enumerate() {
            let t = &totals.services[slot.min(totals.services.len() - 1)];
            if t.to_backend_packets + t.to_client_packets == 0 {
                continue;
            }
            for (dir, packets, bytes) in [
                ("to_backend", t.to_backend_packets, t.to_backend_bytes),
                ("to_client", t.to_client_packets, t.to_client_bytes),
            ] {
                sync(&self.packets.with_label_values(&[&svc.name, dir]), packets);
                sync(&self.bytes.with_label_values(&[&svc.name, dir]), bytes);
            }
        }
    }

    /// The data path's drops and events, and its workers' I/O modes.
    fn sync_events(&self, totals: &Totals) {
        for r in DropReason::ALL {
            sync(
                &self.drops.with_label_values(&[r.as_str()]),
                totals.drops(r),
            );
        }
        for e in Count::ALL {
            if let Some(series) = self.event_series(e) {
                sync(&series, totals.get(e));
            }
        }
        self.tun_workers
            .with_label_values(&["batched"])
            .set(totals.batched_workers as i64);
        self.tun_workers
            .with_label_values(&["blocking"])
            .set((totals.workers - totals.batched_workers) as i64);
    }

    /// The control plane's own counters: routes removed, pruning, rejected
    /// agent frames.
    fn sync_control(&self, cp: &ControlPlane) {
        let removed = cp.dispatcher().removed_totals();
        sync(&self.expired, removed.expired as u64);
        sync(&self.evicted, removed.evicted as u64);
        let (cycles, pruned) = cp.pruning_totals();
        sync(&self.prune_cycles, cycles);
        sync(&self.pruned, pruned);
        for (reason, n) in cp.rejects() {
            sync(&self.rejects.with_label_values(&[reason]), n);
        }
        for (reason, n) in cp.peers().map(|p| p.rejects()).unwrap_or_default() {
            sync(&self.peer_rejects.with_label_values(&[reason]), n);
        }
    }

    /// Each back end's routes, ratios and load; series of removed back ends
    /// go.
    fn sync_backends(&self, m: &Model, table: &TransferTable, now: u32) {
        for g in [&self.routes, &self.configured_ratio, &self.effective_ratio] {
            g.reset();
        }
        self.load.reset();
        for b in &m.backends {
            let svc = table.service(b.service);
            let be = table.backend(b.service, b.index);
            let labels = [svc.name.as_str(), be.node.as_str()];
            for (state, n) in [("live", be.live_routes()), ("closing", be.closing())] {
                self.routes
                    .with_label_values(&[labels[0], labels[1], state])
                    .set(i64::from(n));
            }
            sync(&self.assignments.with_label_values(&labels), be.assigned());
            self.configured_ratio
                .with_label_values(&labels)
                .set(i64::from(b.configured));
            self.effective_ratio
                .with_label_values(&labels)
                .set(i64::from(be.ratio()));
            if let Some(load) = m.load(b, now) {
                self.load.with_label_values(&labels).set(load);
            }
        }
    }

    /// Each node's state and the age of its agent's last report; series of
    /// removed nodes go.
    fn sync_nodes(&self, m: &Model, now: u32) {
        self.node_up.reset();
        self.node_state.reset();
        self.report_age.reset();
        for (id, n) in m.nodes.iter().enumerate().filter(|(_, n)| !n.removed) {
            let state = m.node_state(id as u16, now);
            self.node_up
                .with_label_values(&[&n.name])
                .set(i64::from(m.node_up(id as u16, now)));
            for s in NodeState::ALL {
                self.node_state
                    .with_label_values(&[n.name.as_str(), &s.to_string()])
                    .set(i64::from(state == s));
            }
            if let Some((at, _)) = &n.report {
                self.report_age
                    .with_label_values(&[&n.name])
                    .set(f64::from(idle_since(*at, now)) / 1000.0);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What a scrape reads and the metrics it brings up to date.
struct Scrape {
    cp: Arc<ControlPlane>,
    sources: Sources,
    metrics: Metrics,
}

/// Serves `/metrics` on `listen` until the runtime stops.
pub async fn serve(
    cp: Arc<ControlPlane>,
    sources: Sources,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for metrics on {listen} (metrics_listen)"))?;
    tracing::info!("metrics on http://{listen}/metrics");
    let state = Arc::new(Scrape {
        cp,
        sources,
        metrics: Metrics::new(),
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<Scrape>>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    s.metrics.render(&s.cp, &s.sources),
                )
                    .into_response()
            }),
        )
        .with_state(state);
    crate::http_server::serve(listener, app, "metrics").await
}
