//! The admin API: JSON over HTTP on a Unix socket (mode 0600), for `fepctl`.
//!
//! | method | path | body / query | what |
//! |---|---|---|---|
//! | GET | `/v1/status` | | services, nodes, routes, counters, rejected agent frames |
//! | GET | `/v1/nodes` | | every node: state, pin, routes, load, per-service ratios |
//! | GET | `/v1/services` | | every service: its transfer table with ratios and shares |
//! | GET | `/v1/cluster` | | this fep, its VIP groups (master here or not, held or not, routes, last hold), last moves, refused peer frames; each peer's groups as it answers |
//! | POST | `/v1/vip/move` | `{"group","to"}` | a planned move of a VIP group to a front end; answers with its report |
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
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use fep_shared::api::{
    ApiError, BackendAddArg, BackendRemoveArg, Done, ExplainQuery, MoveArg, NodeAddArg, NodeArg,
    PinArg, RatioArg, RemoveArg, RouteQuery, StatusView,
};
use fep_shared::ServiceConfig;

use crate::control::{CommandError, ControlPlane};
use crate::views::{self, Sources};

#[derive(Clone)]
pub struct Admin {
    cp: Arc<ControlPlane>,
    sources: Sources,
}

impl Admin {
    pub fn new(cp: Arc<ControlPlane>, sources: Sources) -> Self {
        Admin { cp, sources }
    }
}

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
    crate::http_server::serve(listener, router(admin), "admin API (socket)").await
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
                refused(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (admin_token_file)".into(),
                )
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

/// A POST route for a command on one node (`{"node": NAME}`).
fn on_node(f: fn(&ControlPlane, &str) -> Result<(), CommandError>) -> MethodRouter<Admin> {
    post(
        move |State(a): State<Admin>, JsonBody(n): JsonBody<NodeArg>| async move {
            command(a, move |cp| f(cp, &n.node)).await
        },
    )
}

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/nodes",
            get(|State(a): State<Admin>| async move { Json(views::nodes(&a.cp)) }),
        )
        .route(
            "/v1/services",
            get(|State(a): State<Admin>| async move { Json(views::services(&a.cp, &a.sources.http)) }),
        )
        .route("/v1/routes", get(routes))
        .route("/v1/explain", get(explain))
        .route("/v1/sites", get(sites))
        .route(
            "/v1/cluster",
            get(|State(a): State<Admin>| async move { Json(a.cp.cluster_view().await) }),
        )
        .route("/v1/vip/move", post(vip_move))
        .route("/v1/ratio", post(ratio))
        .route("/v1/drain", on_node(ControlPlane::drain))
        .route("/v1/undrain", on_node(ControlPlane::undrain))
        .route("/v1/pin", post(pin))
        .route("/v1/unpin", on_node(ControlPlane::unpin))
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

/// Several sites' hand-off state; 404 on a single site.
async fn explain(State(a): State<Admin>, Query(q): Query<ExplainQuery>) -> Response {
    match views::explain(&a.cp, &a.sources.http, &q) {
        Some(view) => Json(view).into_response(),
        None => refused(StatusCode::NOT_FOUND, format!("no service '{}'", q.service)),
    }
}

async fn sites(State(a): State<Admin>) -> Response {
    match &a.sources.sites {
        Some(sites) => Json(sites.view()).into_response(),
        None => refused(
            StatusCode::NOT_FOUND,
            "this fep is not one of several sites (no [sites] table in its config)".into(),
        ),
    }
}

/// A JSON request body. One that does not parse as what the path takes is
/// answered 400 with `{"error": …}`, like every other refused request.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err(refused(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
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
        Err(e) => refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the command failed: {e}"),
        ),
    }
}

fn reply(result: Result<(), CommandError>) -> Response {
    match result {
        Ok(()) => Json(Done { ok: true }).into_response(),
        Err(e) => {
            let code = if e.is_bad_request() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::NOT_FOUND
            };
            refused(code, e.to_string())
        }
    }
}

/// A refused request: its status and `{"error": …}`.
fn refused(code: StatusCode, error: String) -> Response {
    (code, Json(ApiError { error })).into_response()
}

async fn node_add(State(a): State<Admin>, JsonBody(n): JsonBody<NodeAddArg>) -> Response {
    command(a, move |cp| {
        cp.node_add(&n.name, n.address, n.agent_address)
    })
    .await
}

/// A planned move; answered when it is done (or refused), with its report.
async fn vip_move(State(a): State<Admin>, JsonBody(m): JsonBody<MoveArg>) -> Response {
    match a.cp.move_group(&m.group, &m.to).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => refused(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
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

async fn status(State(a): State<Admin>) -> Json<StatusView> {
    Json(views::status(&a.cp, &a.sources))
}

/// Chunks buffered between the listing's pass and the client: a listing
/// holds at most this many times [`views::CHUNK`], whatever its limit.
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
        views::list_routes(&dispatcher, &q, now, |chunk| {
            tx.blocking_send(chunk).is_ok()
        })
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(Chunks(rx)),
    )
        .into_response()
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
