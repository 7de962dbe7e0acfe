//! The admin API: JSON over HTTP on a Unix socket (mode 0600), for `fepctl`.
//!
//! | method | path | body / query | what |
//! |---|---|---|---|
//! | GET | `/v1/status` | | services, nodes, routes, counters, rejected agent frames |
//! | GET | `/v1/nodes` | | every node: state, pin, routes, load, per-service ratios |
//! | GET | `/v1/services` | | every service: its transfer table with ratios and shares |
//! | GET | `/v1/routes` | `service`, `node`, `client`, `limit` | the first `limit` (1000) matching routes, streamed |
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

use crate::clock::idle_since;
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{FromRequest, Query, Request, State};
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
use crate::dispatcher::Dispatcher;
use crate::routes::state;
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
                |State(a): State<Admin>, JsonBody(n): JsonBody<NodeArg>| async move {
                    command(a, move |cp| cp.drain(&n.node)).await
                },
            ),
        )
        .route(
            "/v1/undrain",
            post(
                |State(a): State<Admin>, JsonBody(n): JsonBody<NodeArg>| async move {
                    command(a, move |cp| cp.undrain(&n.node)).await
                },
            ),
        )
        .route("/v1/pin", post(pin))
        .route(
            "/v1/unpin",
            post(
                |State(a): State<Admin>, JsonBody(n): JsonBody<NodeArg>| async move {
                    command(a, move |cp| cp.unpin(&n.node)).await
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
            post(|State(a): State<Admin>| async move { command(a, |cp| cp.reload()).await }),
        )
        .with_state(admin)
}

/// A JSON request body. One that does not parse as what the path takes is
/// answered 400 with `{"error": …}`, like every other refused request.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err((
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": e.body_text() })),
            )
                .into_response()),
        }
    }
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

/// Runs an operator command on the blocking pool (a change can pass over
/// the whole route table), then waits until the host's network set-up and
/// the state file have caught up: a success is in force and saved.
async fn command(
    a: Admin,
    f: impl FnOnce(&ControlPlane) -> Result<(), CommandError> + Send + 'static,
) -> Response {
    let cp = a.cp.clone();
    let result = tokio::task::spawn_blocking(move || f(&cp)).await;
    a.cp.settled().await;
    match result {
        Ok(r) => reply(r),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": format!("the command failed: {e}")})),
        )
            .into_response(),
    }
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

async fn node_add(State(a): State<Admin>, JsonBody(n): JsonBody<NodeAddArg>) -> Response {
    command(a, move |cp| cp.node_add(&n.name, n.address)).await
}

async fn node_remove(State(a): State<Admin>, JsonBody(n): JsonBody<RemoveArg>) -> Response {
    command(a, move |cp| cp.node_remove(&n.name, n.force)).await
}

async fn backend_add(State(a): State<Admin>, JsonBody(b): JsonBody<BackendAddArg>) -> Response {
    command(a, move |cp| {
        cp.backend_add(&b.service, &b.node, b.ratio, b.port)
    })
    .await
}

async fn backend_remove(
    State(a): State<Admin>,
    JsonBody(b): JsonBody<BackendRemoveArg>,
) -> Response {
    command(a, move |cp| cp.backend_remove(&b.service, &b.node, b.force)).await
}

async fn service_add(State(a): State<Admin>, JsonBody(s): JsonBody<ServiceConfig>) -> Response {
    command(a, move |cp| cp.service_add(s)).await
}

async fn service_remove(State(a): State<Admin>, JsonBody(s): JsonBody<RemoveArg>) -> Response {
    command(a, move |cp| cp.service_remove(&s.name, s.force)).await
}

async fn ratio(State(a): State<Admin>, JsonBody(r): JsonBody<RatioArg>) -> Response {
    command(a, move |cp| cp.set_ratio(&r.service, &r.node, r.ratio)).await
}

async fn pin(State(a): State<Admin>, JsonBody(p): JsonBody<PinArg>) -> Response {
    command(a, move |cp| cp.pin(&p.node, p.pin)).await
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
    unconfirmed_evicted: u64,
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
            unconfirmed_evicted: t.unconfirmed_evicted,
            icmp_echo_replies: t.icmp_echo_replies,
            icmp_errors_translated: t.icmp_errors_translated,
            tun_read_errors: t.tun_read_errors,
            tun_write_errors: t.tun_write_errors,
        }
    }
}

async fn status(State(a): State<Admin>) -> impl IntoResponse {
    let totals = Totals::sum(a.counters.iter().map(|c| &**c));
    let removed = a.cp.dispatcher().removed_totals();
    Json(serde_json::json!({
        "routes": a.cp.dispatcher().routes().len(),
        "routes_expired": removed.expired,
        "routes_evicted": removed.evicted,
        "journal_overflow": a.cp.dispatcher().journal_overflow(),
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
struct RouteView<'a> {
    service: &'a str,
    client: std::net::IpAddr,
    client_port: u16,
    node: &'a str,
    backend_port: u16,
    state: &'static str,
    idle_ms: u32,
}

/// Bytes of JSON handed to the response at a time, and chunks buffered
/// between the pass and the client: a listing holds at most their product,
/// whatever its limit.
const CHUNK: usize = 64 * 1024;
const CHUNKS_BUFFERED: usize = 4;

/// `/v1/routes`: the first `limit` (default 1000) routes matching the
/// filters, as a JSON array streamed from a pass on the blocking pool that
/// stops there — so a listing costs what it shows, not the table (only a
/// filter few routes match looks through it all), and never holds up the
/// control-plane thread.
async fn routes(State(a): State<Admin>, Query(q): Query<RouteQuery>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_BUFFERED);
    let (dispatcher, now) = (a.cp.dispatcher_arc(), a.cp.now());
    tokio::task::spawn_blocking(move || {
        list_routes(&dispatcher, &q, now, |chunk| {
            tx.blocking_send(chunk).is_ok()
        })
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(Chunks(rx)),
    )
        .into_response()
}

/// Writes the routes matching `q` as a JSON array, in chunks of about
/// [`CHUNK`] bytes given to `send`; stops after the limit, or once `send`
/// says the reader is gone.
fn list_routes(
    dispatcher: &Dispatcher,
    q: &RouteQuery,
    now: u32,
    mut send: impl FnMut(Vec<u8>) -> bool,
) {
    let table = dispatcher.table();
    let limit = q.limit.unwrap_or(1000);
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
                service: &svc.name,
                client,
                client_port: key.client_port,
                node: &be.node,
                backend_port: be.port,
                state: if state::is_closed(st) {
                    "closed"
                } else if st & (state::FIN_FROM_CLIENT | state::FIN_FROM_BACKEND) != 0 {
                    "closing"
                } else {
                    "open"
                },
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

/// A response body from the chunks a pass on the blocking pool sends.
struct Chunks(tokio::sync::mpsc::Receiver<Vec<u8>>);

impl futures_core::Stream for Chunks {
    type Item = Result<Vec<u8>, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use super::*;
    use crate::routes::{FlowKey, Route, Row};
    use crate::wire::addr_from_ip;

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

    /// The listing's chunks, how many there were, and the array they make.
    fn listing(d: &Dispatcher, query: &str) -> (usize, Vec<serde_json::Value>) {
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
            .all(|r| r["node"] == "be2" && r["backend_port"] == 8080 && r["service"] == "web"));
        let (_, one) = listing(&d, r#"{"client": "192.0.2.7", "service": "web"}"#);
        assert_eq!(one.len(), 15, "ports 1007, 1207, … 2807");
        assert!(one
            .iter()
            .all(|r| r["client"] == "192.0.2.7" && r["state"] == "open"));
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
