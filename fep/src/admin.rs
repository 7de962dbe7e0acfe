//! The admin API: JSON over HTTP on a Unix socket (mode 0600), for `fepctl`.
//!
//! | method | path | body / query | what |
//! |---|---|---|---|
//! | GET | `/v1/status` | | services, nodes, routes, counters, rejected agent frames |
//! | GET | `/v1/nodes` | | every node: state, pin, routes, load, per-service ratios |
//! | GET | `/v1/services` | | every service: its transfer table with ratios and shares |
//! | GET | `/v1/routes` | `service`, `node`, `client`, `limit` | assigned routes |
//! | POST | `/v1/ratio` | `{"service","node","ratio"}` | set a configured ratio |
//! | POST | `/v1/drain`, `/v1/undrain` | `{"node"}` | start / end a drain |
//! | POST | `/v1/pin` | `{"node","state"?,"load"?,"ratio"?}` | pin values |
//! | POST | `/v1/unpin` | `{"node"}` | release all pins |
//! | POST | `/v1/node/add` | `{"name","address"}` | add a node |
//! | POST | `/v1/node/remove` | `{"name","force"?}` | remove a node (refused unless drained, or forced) |
//! | POST | `/v1/backend/add` | `{"service","node","ratio","port"?}` | add a node to a service |
//! | POST | `/v1/backend/remove` | `{"service","node","force"?}` | remove it (live routes carry on unless forced) |
//! | POST | `/v1/service/add` | a `[[service]]` table as JSON | add a service |
//! | POST | `/v1/service/remove` | `{"name","force"?}` | remove a service (live routes carry on unless forced) |
//! | POST | `/v1/reload` | | re-read the config file (as SIGHUP) |
//!
//! Errors answer 400/404 with `{"error": "..."}` naming what exists.

use crate::route_table::idle_since;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use std::net::SocketAddr;

use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::control::model::{NodeState, Pin, Spare};
use fep_shared::ServiceConfig;

use crate::control::{CommandError, ControlPlane};
use crate::counters::{DropReason, Totals, WorkerCounters};
use crate::route_table::state;
use crate::wire::ip_from_addr;

#[derive(Clone)]
pub struct Admin {
    pub cp: Arc<ControlPlane>,
    pub counters: Vec<Arc<WorkerCounters>>,
}

/// Serves the admin API on `path` until the runtime stops.
/// Serves the admin API on the Unix socket `path` (mode 0600: root only)
/// until the runtime stops.
pub async fn serve_socket(admin: Admin, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).with_context(|| {
        format!(
            "cannot listen on control socket {} (control_socket)",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!("admin API on {}", path.display());
    axum::serve(listener, router(admin))
        .await
        .context("admin API")
}

/// Serves the admin API on TCP; every request must carry
/// `Authorization: Bearer <token>` (the token file's content).
pub async fn serve_tcp(admin: Admin, listen: SocketAddr, token: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for the admin API on {listen} (admin_listen)"))?;
    tracing::info!("admin API on {listen} (bearer token required)");
    let token = Arc::new(token);
    let app = router(admin).layer(middleware::from_fn(move |req: Request, next: Next| {
        let token = token.clone();
        async move {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), token.as_bytes())) {
                next.run(req).await
            } else {
                let error = "missing or wrong bearer token (admin_token_file)";
                (
                    StatusCode::UNAUTHORIZED,
                    Json(serde_json::json!({ "error": error })),
                )
                    .into_response()
            }
        }
    }));
    crate::http_server::serve(listener, app, "admin API (TCP)").await
}

/// Compares without an early exit, so the time taken says nothing about
/// where a guessed token differs.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the TCP admin token file.
pub fn load_token(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read admin_token_file {}", path.display()))?
        .trim()
        .to_string();
    if token.len() < 16 {
        anyhow::bail!(
            "admin_token_file {}: the token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token)
}

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/nodes",
            get(|State(a): State<Admin>| async move { Json(nodes(&a.cp)) }),
        )
        .route(
            "/v1/services",
            get(|State(a): State<Admin>| async move { Json(services(&a.cp)) }),
        )
        .route("/v1/routes", get(routes))
        .route("/v1/ratio", post(ratio))
        .route(
            "/v1/drain",
            post(
                |State(a): State<Admin>, Json(n): Json<NodeArg>| async move {
                    reply(a.cp.drain(&n.node))
                },
            ),
        )
        .route(
            "/v1/undrain",
            post(
                |State(a): State<Admin>, Json(n): Json<NodeArg>| async move {
                    reply(a.cp.undrain(&n.node))
                },
            ),
        )
        .route("/v1/pin", post(pin))
        .route(
            "/v1/unpin",
            post(
                |State(a): State<Admin>, Json(n): Json<NodeArg>| async move {
                    reply(a.cp.unpin(&n.node))
                },
            ),
        )
        .route("/v1/node/add", post(node_add))
        .route("/v1/node/remove", post(node_remove))
        .route("/v1/backend/add", post(backend_add))
        .route("/v1/backend/remove", post(backend_remove))
        .route("/v1/service/add", post(service_add))
        .route("/v1/service/remove", post(service_remove))
        .route(
            "/v1/reload",
            post(|State(a): State<Admin>| async move { reply(a.cp.reload()) }),
        )
        .with_state(admin)
}

#[derive(Deserialize)]
struct NodeArg {
    node: String,
}

#[derive(Deserialize)]
struct RatioArg {
    service: String,
    node: String,
    ratio: u32,
}

#[derive(Deserialize)]
struct PinArg {
    node: String,
    #[serde(flatten)]
    pin: Pin,
}

fn reply(result: Result<(), CommandError>) -> Response {
    match result {
        Ok(()) => Json(serde_json::json!({"ok": true})).into_response(),
        Err(e) => {
            let code = if e.is_bad_request() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::NOT_FOUND
            };
            (code, Json(serde_json::json!({"error": e.to_string()}))).into_response()
        }
    }
}

#[derive(Deserialize)]
struct NodeAddArg {
    name: String,
    address: std::net::IpAddr,
}

#[derive(Deserialize)]
struct RemoveArg {
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
struct BackendAddArg {
    service: String,
    node: String,
    ratio: u32,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Deserialize)]
struct BackendRemoveArg {
    service: String,
    node: String,
    #[serde(default)]
    force: bool,
}

async fn node_add(State(a): State<Admin>, Json(n): Json<NodeAddArg>) -> Response {
    reply(a.cp.node_add(&n.name, n.address))
}

async fn node_remove(State(a): State<Admin>, Json(n): Json<RemoveArg>) -> Response {
    reply(a.cp.node_remove(&n.name, n.force))
}

async fn backend_add(State(a): State<Admin>, Json(b): Json<BackendAddArg>) -> Response {
    reply(a.cp.backend_add(&b.service, &b.node, b.ratio, b.port))
}

async fn backend_remove(State(a): State<Admin>, Json(b): Json<BackendRemoveArg>) -> Response {
    reply(a.cp.backend_remove(&b.service, &b.node, b.force))
}

async fn service_add(State(a): State<Admin>, Json(s): Json<ServiceConfig>) -> Response {
    reply(a.cp.service_add(s))
}

async fn service_remove(State(a): State<Admin>, Json(s): Json<RemoveArg>) -> Response {
    reply(a.cp.service_remove(&s.name, s.force))
}

async fn ratio(State(a): State<Admin>, Json(r): Json<RatioArg>) -> Response {
    reply(a.cp.set_ratio(&r.service, &r.node, r.ratio))
}

async fn pin(State(a): State<Admin>, Json(p): Json<PinArg>) -> Response {
    reply(a.cp.pin(&p.node, p.pin))
}

/// One back end of a service, as operators see it.
#[derive(Serialize)]
pub struct BackendView {
    pub node: String,
    pub port: u16,
    pub configured_ratio: u32,
    pub effective_ratio: u32,
    pub routes: u32,
    /// Share of the service's live routes.
    pub share: f64,
    /// Share the effective ratios aim for.
    pub target_share: f64,
    pub up: bool,
    pub overloaded: bool,
    pub spare: Spare,
    pub load: Option<f64>,
}

#[derive(Serialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: &'static str,
    pub scheduler: &'static str,
    pub routes: u32,
    pub pruning: bool,
    pub backends: Vec<BackendView>,
}

/// A node's ratios in one service.
#[derive(Serialize)]
pub struct NodeServiceView {
    pub service: String,
    pub configured_ratio: u32,
    pub effective_ratio: u32,
    pub routes: u32,
}

#[derive(Serialize)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub state: NodeState,
    pub pinned: bool,
    pub pin: Pin,
    pub routes: u32,
    pub agent_connected: bool,
    pub report_age_ms: Option<u32>,
    pub cpu_percent: Option<f64>,
    pub services: Vec<NodeServiceView>,
}

pub fn services(cp: &ControlPlane) -> Vec<ServiceView> {
    let now = cp.now();
    let m = cp.model();
    let table = cp.dispatcher().table();
    m.services
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.removed)
        .map(|(sid, s)| {
            let svc = &table.services()[sid];
            let mine: Vec<_> = m
                .backends
                .iter()
                .filter(|b| usize::from(b.service) == sid)
                .collect();
            let routes: u32 = svc.live_backends().map(|(_, b)| b.routes()).sum();
            let ratio_sum: u32 = svc.live_backends().map(|(_, b)| b.ratio()).sum();
            ServiceView {
                name: s.name.clone(),
                vip: ip_from_addr(&svc.vip).to_string(),
                port: s.port,
                protocol: if s.tcp { "tcp" } else { "udp" },
                scheduler: s.scheduler.as_str(),
                routes,
                pruning: s.pruning,
                backends: mine
                    .iter()
                    .map(|b| {
                        let be = &svc.backends[usize::from(b.index)];
                        BackendView {
                            node: be.node.clone(),
                            port: be.port,
                            configured_ratio: b.configured,
                            effective_ratio: be.ratio(),
                            routes: be.routes(),
                            share: fraction(be.routes(), routes),
                            target_share: fraction(be.ratio(), ratio_sum),
                            up: m.backend_up(b, now),
                            overloaded: b.overloaded,
                            spare: b.spare,
                            load: m.load(b, now),
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

pub fn nodes(cp: &ControlPlane) -> Vec<NodeView> {
    let now = cp.now();
    let connected: Vec<u16> = cp.agents().keys().copied().collect();
    let m = cp.model();
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
                        routes: be.routes(),
                    }
                })
                .collect();
            NodeView {
                name: n.name.clone(),
                address: n.address.to_string(),
                state: m.node_state(id as u16, now),
                pinned: !n.pin.is_empty(),
                pin: n.pin.clone(),
                routes: services.iter().map(|s| s.routes).sum(),
                agent_connected: connected.contains(&(id as u16)),
                report_age_ms: n.report.as_ref().map(|(at, _)| idle_since(*at, now)),
                cpu_percent: n.report.as_ref().map(|(_, r)| r.cpu_percent),
                services,
            }
        })
        .collect()
}

fn fraction(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

#[derive(Serialize)]
struct CountersView {
    to_backend_packets: u64,
    to_backend_bytes: u64,
    to_client_packets: u64,
    to_client_bytes: u64,
    routes_created: u64,
    embryonic_evicted: u64,
    icmp_echo_replies: u64,
    icmp_errors_translated: u64,
    tun_read_errors: u64,
    tun_write_errors: u64,
    drops: std::collections::BTreeMap<&'static str, u64>,
}

impl From<Totals> for CountersView {
    fn from(t: Totals) -> Self {
        CountersView {
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r.as_str(), t.drops(r)))
                .collect(),
            to_backend_packets: t.all.to_backend_packets,
            to_backend_bytes: t.all.to_backend_bytes,
            to_client_packets: t.all.to_client_packets,
            to_client_bytes: t.all.to_client_bytes,
            routes_created: t.routes_created,
            embryonic_evicted: t.embryonic_evicted,
            icmp_echo_replies: t.icmp_echo_replies,
            icmp_errors_translated: t.icmp_errors_translated,
            tun_read_errors: t.tun_read_errors,
            tun_write_errors: t.tun_write_errors,
        }
    }
}

async fn status(State(a): State<Admin>) -> impl IntoResponse {
    let totals = Totals::sum(a.counters.iter().map(|c| &**c));
    Json(serde_json::json!({
        "routes": a.cp.dispatcher().routes().len(),
        "tun_workers": {
            "batched": totals.batched_workers,
            "blocking": totals.workers - totals.batched_workers,
        },
        "counters": CountersView::from(totals),
        "agent_rejects": a.cp.rejects(),
        "services": services(&a.cp),
        "nodes": nodes(&a.cp),
    }))
}

#[derive(Deserialize)]
struct RouteQuery {
    service: Option<String>,
    node: Option<String>,
    client: Option<std::net::IpAddr>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct RouteView {
    service: String,
    client: String,
    client_port: u16,
    node: String,
    backend_port: u16,
    state: &'static str,
    idle_ms: u32,
}

async fn routes(State(a): State<Admin>, Query(q): Query<RouteQuery>) -> impl IntoResponse {
    let now = a.cp.now();
    let table = a.cp.dispatcher().table();
    let limit = q.limit.unwrap_or(1000);
    let list: Vec<RouteView> =
        a.cp.dispatcher()
            .routes()
            .snapshot()
            .into_iter()
            .filter_map(|(key, backend, st, last_seen)| {
                let svc = table.service(key.service);
                let be = &svc.backends[usize::from(backend)];
                let client = ip_from_addr(&key.client);
                let keep = q.service.as_ref().is_none_or(|s| *s == svc.name)
                    && q.node.as_ref().is_none_or(|n| *n == be.node)
                    && q.client.is_none_or(|c| c == client);
                keep.then(|| RouteView {
                    service: svc.name.clone(),
                    client: client.to_string(),
                    client_port: key.client_port,
                    node: be.node.clone(),
                    backend_port: be.port,
                    state: if state::is_closed(st) {
                        "closed"
                    } else if st & (state::FIN_FROM_CLIENT | state::FIN_FROM_BACKEND) != 0 {
                        "closing"
                    } else {
                        "open"
                    },
                    idle_ms: idle_since(last_seen, now),
                })
            })
            .take(limit)
            .collect();
    Json(list)
}
