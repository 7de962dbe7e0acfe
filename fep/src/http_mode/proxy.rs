//! One HTTP service's client side: its listener's connections and each
//! request's way to a back end and back.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use fep_shared::HttpConfig;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::body::{ReqBody, RespBody};
use super::pool::{Lease, Pool, Sender};
use super::session::Sessions;
use super::stats::{BackendStats, Refusal, ServiceStats};
use super::{redirect, request};
use crate::chooser::Candidate;
use crate::dispatcher::Dispatcher;
use crate::sites::Sites;
use crate::transfer_table::{BackendId, InFlight, Service, ServiceId};

/// How often a request chooses again when its back end's ratio fell to 0
/// as it was chosen (a drain or a failure at that moment).
const CHOOSE_ATTEMPTS: usize = 3;
/// Connections over the limit answered a redirect at once; more are closed.
const MAX_REDIRECTING: usize = 256;

/// One back end as HTTP mode sees it: a pool per thread and its counters,
/// kept across table rebuilds while its slot is the same endpoint.
pub struct BackendFront {
    /// By thread (`Shard`): each thread's requests use its own pool.
    pub pools: Vec<Arc<Pool>>,
    pub stats: Arc<BackendStats>,
    pub node: String,
}

/// One of HTTP mode's threads, by index.
pub type Shard = usize;

/// One HTTP service's listener state, shared by its connections.
pub struct ServiceFront {
    pub slot: ServiceId,
    pub name: String,
    pub vip: SocketAddr,
    pub cfg: Arc<HttpConfig>,
    /// By back-end slot; `None` for a slot HTTP mode has no pool for.
    pub backends: ArcSwap<Vec<Option<Arc<BackendFront>>>>,
    pub stats: ServiceStats,
    pub sessions: Sessions,
    dispatcher: Arc<Dispatcher>,
    connections: Arc<Semaphore>,
    per_client: DashMap<IpAddr, usize, ahash::RandomState>,
    /// Where a full service sends new clients (several sites only).
    sites: Option<Arc<Sites>>,
    /// Connections at the limit that get a redirect, at once.
    redirecting: Arc<Semaphore>,
}

/// Why a request got fep's own answer instead of a back end's.
struct Answer {
    status: StatusCode,
    text: String,
}

impl Answer {
    fn new(status: StatusCode, text: String) -> Self {
        Answer { status, text }
    }

    fn response(self) -> Response<RespBody> {
        let mut resp = Response::new(RespBody::Text(Some(Bytes::from(self.text + "\n"))));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

/// What the chooser reads of a back end for one request: its ratio, or 0
/// where a content rule leaves it out.
struct View {
    ratio: u32,
    routes: u32,
    load: f64,
    idle: u32,
}

impl Candidate for View {
    fn ratio(&self) -> u32 {
        self.ratio
    }
    fn routes(&self) -> u32 {
        self.routes
    }
    fn load(&self) -> f64 {
        self.load
    }
    fn preference(&self) -> u32 {
        self.idle
    }
}

/// A request to a service's `session_start` or `session_end` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boundary {
    Start,
    End,
}

/// A body-less idempotent request's head, kept to send it again.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<ReqBody> {
        let mut req = Request::new(ReqBody::Empty);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

impl ServiceFront {
    pub fn new(
        svc: &Service,
        slot: ServiceId,
        cfg: Arc<HttpConfig>,
        d: Arc<Dispatcher>,
        sites: Option<Arc<Sites>>,
    ) -> Self {
        ServiceFront {
            slot,
            name: svc.name.clone(),
            vip: SocketAddr::new(crate::wire::ip_from_addr(&svc.vip), svc.port),
            sessions: Sessions::new(
                cfg.max_sessions,
                Duration::from_secs(cfg.session_idle_timeout_s),
            ),
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            backends: ArcSwap::from_pointee(Vec::new()),
            stats: ServiceStats::default(),
            dispatcher: d,
            per_client: DashMap::default(),
            sites: sites.filter(|s| s.config().redirect),
            redirecting: Arc::new(Semaphore::new(MAX_REDIRECTING)),
        }
    }

    /// Responses from (or for) its back ends so far.
    pub fn requests(&self) -> u64 {
        let backends = self.backends.load();
        backends.iter().flatten().map(|b| b.stats.requests()).sum()
    }

    /// Accepts clients on thread `shard`'s listener until the task is
    /// aborted, within the limits.
    pub async fn accept(self: Arc<Self>, listener: TcpListener, shard: Shard) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("HTTP service '{}': accept failed: {e}", self.name);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.stats.refused(Refusal::TooManyConnections);
                self.clone().redirect_connection(stream, peer);
                continue;
            };
            if !self.enter(peer.ip()) {
                self.stats.refused(Refusal::TooManyFromClient);
                continue;
            }
            let front = self.clone();
            tokio::spawn(async move {
                front.serve(stream, peer, shard).await;
                front.leave(peer.ip());
                drop(permit);
            });
        }
    }

    fn enter(&self, client: IpAddr) -> bool {
        let mut n = self.per_client.entry(client).or_insert(0);
        if *n >= self.cfg.max_connections_per_client {
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, client: IpAddr) {
        if let Some(mut n) = self.per_client.get_mut(&client) {
            *n -= 1;
        }
        self.per_client.remove_if(&client, |_, n| *n == 0);
    }

    /// Serves one client connection: HTTP/1.1, one request at a time, so a
    /// request goes to its back end only once the previous response is
    /// complete.
    async fn serve(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, shard: Shard) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let service = Handler {
            front: self.clone(),
            peer,
            shard,
        };
        let mut conn = client_side(&self.cfg)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        if let Err(e) = (&mut conn).await {
            self.client_error(&e, conn.into_parts().map(|p| (p.io, p.read_buf)))
                .await;
        }
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// A client over the connection limit: with another site to go to, it
    /// is read one request and answered a redirect; else it is closed.
    fn redirect_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        if self.sites.is_none() {
            return;
        }
        let Ok(permit) = self.redirecting.clone().try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let front = self.clone();
            let answer = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = front.redirect(peer, req.uri()).unwrap_or_else(|| {
                    Answer::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("service '{}' is at its connection limit", front.name),
                    )
                    .response()
                });
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut side = client_side(&self.cfg);
            side.keep_alive(false);
            let _ = side.serve_connection(TokioIo::new(stream), answer).await;
            drop(permit);
        });
    }

    /// The redirect for a new client of a full service: a 307 to the same
    /// request at the next site chosen as for DNS, or a 503 once the client
    /// followed `redirect_hops` redirects (every site it tried was full).
    fn redirect(&self, peer: SocketAddr, uri: &Uri) -> Option<Response<RespBody>> {
        let sites = self.sites.as_ref()?;
        let hops = redirect::hops(uri);
        if hops >= sites.config().redirect_hops {
            sites
                .stats
                .redirects_refused
                .fetch_add(1, Ordering::Relaxed);
            return Some(
                Answer::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "service '{}' is full, and so were the {hops} site(s) before it",
                        self.name
                    ),
                )
                .response(),
            );
        }
        let target = sites.redirect_target(self.vip.ip(), self.vip.port(), peer.ip())?;
        let location = redirect::location(SocketAddr::new(target, self.vip.port()), uri, hops);
        sites.stats.redirects.fetch_add(1, Ordering::Relaxed);
        let mut resp = Answer::new(
            StatusCode::TEMPORARY_REDIRECT,
            format!("service '{}' is full here; try {location}", self.name),
        )
        .response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(hyper::header::LOCATION, v);
        }
        Some(resp)
    }

    /// Counts a client connection's error; a request head begun but not
    /// finished in time gets its 408 (hyper answers 400 and 431 itself).
    async fn client_error(&self, e: &hyper::Error, parts: Option<(TokioIo<TcpStream>, Bytes)>) {
        if e.is_timeout() {
            if let Some((io, _)) = parts.filter(|(_, read)| !read.is_empty()) {
                self.stats.refused(Refusal::HeaderTimeout);
                let mut stream = io.into_inner();
                let text = "request head not complete in time\n";
                let msg = format!(
                    "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
                    text.len()
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    stream.write_all(msg.as_bytes()).await?;
                    stream.shutdown().await
                })
                .await;
            }
        } else if e.is_parse_too_large() {
            self.stats.refused(Refusal::HeaderTooLarge);
        } else if e.is_parse() {
            self.stats.refused(Refusal::BadRequest);
        }
    }

    /// The back end for a request, with the request counted in flight on
    /// it. The count is taken before the ratio is read again: a drain that
    /// saw no request in flight has already set the ratio to 0, so this
    /// request chooses again instead of reaching a drained node.
    fn choose_and_hold(
        &self,
        shard: Shard,
        svc: &Service,
        req: &Request<Incoming>,
        session: Option<u128>,
    ) -> Option<(BackendId, InFlight)> {
        for _ in 0..CHOOSE_ATTEMPTS {
            let backend = self.choose(shard, svc, req, session)?;
            let be = &svc.backends[usize::from(backend)];
            let held = be.in_flight();
            std::sync::atomic::fence(Ordering::SeqCst);
            if be.ratio() > 0 {
                return Some((backend, held));
            }
        }
        None
    }

    /// The back end for a request: its session's, or the chooser's among
    /// the back ends its content rule allows (ties to the one with more
    /// idle connections in this thread's pools).
    fn choose(
        &self,
        shard: Shard,
        svc: &Service,
        req: &Request<Incoming>,
        session: Option<u128>,
    ) -> Option<BackendId> {
        if let Some(b) = session.and_then(|id| self.sessions.touch(id, Instant::now())) {
            let be = svc.backends.get(usize::from(b));
            if be.is_some_and(|be| !be.removed && be.ratio() > 0) {
                return Some(b);
            }
        }
        let rule = if self.cfg.rules.is_empty() {
            None
        } else {
            let host = request::host_of(req);
            request::matching_rule(&self.cfg.rules, host.as_deref(), req.uri().path())
        };
        let fronts = self.backends.load();
        let views = svc.backends.iter().enumerate().map(|(i, b)| View {
            idle: fronts
                .get(i)
                .and_then(Option::as_ref)
                .and_then(|f| f.pools.get(shard))
                .map_or(0, |p| p.idle_count() as u32),
            ratio: if rule.is_none_or(|r| r.nodes.contains(&b.node)) {
                b.ratio()
            } else {
                0
            },
            routes: b.routes(),
            load: b.load(),
        });
        svc.choose_from(views)
    }

    async fn handle(
        self: Arc<Self>,
        shard: Shard,
        peer: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Response<RespBody> {
        let table = self.dispatcher.table();
        let svc = table.service(self.slot);
        if svc.removed || svc.http.is_none() {
            return Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("service '{}' is no longer configured", self.name),
            )
            .response();
        }
        let boundary = self.boundary(req.uri().path());
        let session = if self.cfg.session_start.is_some() {
            request::session_id(req.headers())
        } else {
            None
        };
        let Some((backend, in_flight)) = self.choose_and_hold(shard, svc, &req, session) else {
            self.stats.refused(Refusal::NoBackend);
            if let Some(redirect) = self.redirect(peer, req.uri()) {
                return redirect;
            }
            return Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no back end available for service '{}': every back end allowed for this \
                     request is down, drained or at ratio 0",
                    self.name
                ),
            )
            .response();
        };
        let fronts = self.backends.load();
        let pool = fronts
            .get(usize::from(backend))
            .and_then(Option::as_ref)
            .and_then(|f| Some((f.clone(), f.pools.get(shard)?.clone())));
        let Some((front, pool)) = pool else {
            self.stats.refused(Refusal::NoBackend);
            return Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "service '{}': the back end chosen has no pool yet",
                    self.name
                ),
            )
            .response();
        };
        if let Some(uri) = redirect::strip(req.uri()) {
            *req.uri_mut() = uri;
        }
        let upgrade = request::is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        request::strip_hop_by_hop(req.headers_mut(), upgrade);
        request::add_forwarded(req.headers_mut(), self.cfg.forwarded, peer.ip(), self.vip);
        let (parts, body) = req.into_parts();
        let replay =
            (request::is_idempotent(&parts.method) && body.is_end_stream()).then(|| Replay {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                version: parts.version,
                headers: parts.headers.clone(),
            });
        let body = if body.is_end_stream() {
            ReqBody::Empty
        } else {
            ReqBody::Stream(body)
        };
        let request = Request::from_parts(parts, body);
        let started = Instant::now();
        let stats = front.stats.clone();
        let (mut resp, lease) = match self.send(&front, &pool, request, replay).await {
            Ok(r) => r,
            Err(answer) => {
                stats.response(answer.status.as_u16(), started.elapsed());
                return answer.response();
            }
        };
        stats.response(resp.status().as_u16(), started.elapsed());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                tunnel(client, hyper::upgrade::on(&mut resp), in_flight);
            }
            drop(lease);
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, RespBody::Text(None));
        }
        request::strip_hop_by_hop(resp.headers_mut(), false);
        self.session_after(boundary, session, backend, resp.headers_mut());
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, RespBody::backend(body, lease, in_flight))
    }

    /// Whether a request to `path` starts or ends a session.
    fn boundary(&self, path: &str) -> Option<Boundary> {
        if self.cfg.session_end.as_deref() == Some(path) {
            Some(Boundary::End)
        } else if self.cfg.session_start.as_deref() == Some(path) {
            Some(Boundary::Start)
        } else {
            None
        }
    }

    /// A session's start or end: the cookie that says so.
    fn session_after(
        &self,
        boundary: Option<Boundary>,
        session: Option<u128>,
        backend: BackendId,
        headers: &mut HeaderMap,
    ) {
        if boundary == Some(Boundary::End) {
            if let Some(id) = session {
                if self.sessions.end(id) {
                    self.stats.sessions_ended.fetch_add(1, Ordering::Relaxed);
                }
                headers.append(hyper::header::SET_COOKIE, request::session_cookie(None));
            }
        } else if boundary == Some(Boundary::Start) {
            if let Some(id) = session {
                self.sessions.end(id);
            }
            match self.sessions.start(backend, Instant::now()) {
                Some(id) => {
                    self.stats.sessions_started.fetch_add(1, Ordering::Relaxed);
                    headers.append(hyper::header::SET_COOKIE, request::session_cookie(Some(id)));
                }
                None => {
                    self.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends the request on a pooled connection (or a new one), again on
    /// another one when a pooled connection turns out closed — if the
    /// request was not sent, or can be sent twice — up to `retries` times.
    async fn send(
        &self,
        front: &BackendFront,
        pool: &Arc<Pool>,
        mut request: Request<ReqBody>,
        replay: Option<Replay>,
    ) -> Result<(Response<Incoming>, Lease), Answer> {
        let node = &front.node;
        let timeout = Duration::from_millis(self.cfg.response_timeout_ms);
        let mut attempt = 0;
        loop {
            let sender: Sender = match pool.take().await {
                Some(s) => s,
                None => pool.connect().await.map_err(|e| {
                    Answer::new(
                        StatusCode::BAD_GATEWAY,
                        format!("cannot connect to back end '{node}' ({}): {e}", pool.addr()),
                    )
                })?,
            };
            let mut lease = Lease::new(pool.clone(), sender);
            let sent =
                tokio::time::timeout(timeout, lease.sender().try_send_request(request)).await;
            let err = match sent {
                Ok(Ok(resp)) => return Ok((resp, lease)),
                Err(_) => {
                    return Err(Answer::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "back end '{node}' did not answer within {} ms",
                            self.cfg.response_timeout_ms
                        ),
                    ))
                }
                Ok(Err(e)) => e,
            };
            let mut err = err;
            drop(lease);
            let broken = err.error().to_string();
            request = match (err.take_message(), &replay) {
                (Some(unsent), _) => unsent,
                (None, Some(replay)) => replay.request(),
                (None, None) => {
                    return Err(Answer::new(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "back end '{node}' closed the connection during a request that \
                             cannot be sent twice: {broken}"
                        ),
                    ))
                }
            };
            attempt += 1;
            if attempt > self.cfg.retries {
                return Err(Answer::new(
                    StatusCode::BAD_GATEWAY,
                    format!("back end '{node}': {attempt} connections failed: {broken}"),
                ));
            }
            front.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Splices an upgraded client connection to its back end's for their life;
/// the request stays in flight (pinning the back end) until both close.
fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    in_flight: InFlight,
) {
    tokio::spawn(async move {
        let (Ok(client), Ok(server)) = (client.await, server.await) else {
            return;
        };
        let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        drop(in_flight);
    });
}

/// hyper's server side of a client connection, within the service's limits
/// (the head's size and time; hyper caps its read buffer at 8 KiB or more).
fn client_side(cfg: &HttpConfig) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_timeout_ms))
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_header_size(cfg.max_header_bytes);
    http
}

/// The client side's edge for the fuzzer: `input` as one client
/// connection's bytes, parsed with `cfg`'s limits, each request put through
/// what `handle` does before a back end sees it (session cookie, content
/// rule, upgrade, hop-by-hop headers, forwarding headers) and its body read;
/// returns what the client would read.
pub async fn client_edge(cfg: &HttpConfig, input: &[u8]) -> Vec<u8> {
    use http_body_util::BodyExt;
    let (client, server) = tokio::io::duplex(64 * 1024);
    let service = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
        let _ = request::session_id(req.headers());
        let host = request::host_of(&req);
        let rule = request::matching_rule(&cfg.rules, host.as_deref(), req.uri().path()).is_some();
        let upgrade = request::is_upgrade(&req);
        request::strip_hop_by_hop(req.headers_mut(), upgrade);
        let (client, vip) = (
            IpAddr::from([10, 0, 1, 2]),
            SocketAddr::from(([10, 0, 0, 100], 80)),
        );
        request::add_forwarded(req.headers_mut(), cfg.forwarded, client, vip);
        let idempotent = request::is_idempotent(req.method());
        let mut body = req.into_body();
        let mut len = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            len += frame.data_ref().map_or(0, |d| d.len());
        }
        let text = format!("rule {rule} idempotent {idempotent} body {len}\n");
        Ok::<_, Infallible>(Answer::new(StatusCode::OK, text).response())
    });
    let conn = client_side(cfg).serve_connection(TokioIo::new(server), service);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let feed = async {
        let _ = to_server.write_all(input).await;
        let _ = to_server.shutdown().await;
    };
    let mut out = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut from_server, &mut out);
    let _ = tokio::join!(conn, feed, read);
    out
}

/// hyper's service for one client connection.
struct Handler {
    front: Arc<ServiceFront>,
    peer: SocketAddr,
    shard: Shard,
}

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RespBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let (front, peer, shard) = (self.front.clone(), self.peer, self.shard);
        Box::pin(async move { Ok(front.handle(shard, peer, req).await) })
    }
}

/// A listener on an HTTP service's (VIP, port): transparent, since the VIP
/// is not an address of the gateway (a rule delivers its port locally), and
/// one per thread on the same port (`SO_REUSEPORT`: the kernel spreads new
/// connections over them).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    let (level, name) = if addr.is_ipv4() {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    } else {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    };
    let one: libc::c_int = 1;
    // SAFETY: a socket option on a descriptor this function owns, with a
    // pointer to an int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(addr)?;
    socket.listen(1024)
}
