//! `fep-testsrv --http PORT`: a keep-alive HTTP/1.1 origin server, the back
//! end HTTP mode is tested against. Every response names its node
//! (`X-Node`); it counts the connections it accepted and the requests it
//! served — not its own host's connections nor `/stats` requests, so that
//! asking for the counts does not change them — and closes idle
//! connections after its own keep-alive timeout.
//!
//! | Request | Answer |
//! |---|---|
//! | `GET /…` (any other path) | the node name and a newline |
//! | `GET /bytes/N` | N bytes of the pattern, with `Content-Length` |
//! | `GET /chunked/N` | N bytes of the pattern, chunked |
//! | `POST /upload` | `LEN HASH` of the body (FNV-1a, hex), however framed |
//! | `POST /echo` | the body back, streamed |
//! | `GET /stats` | `connections N` and `requests N` lines |
//! | `GET /slow/MS` | the node name after MS milliseconds |
//! | `GET /ws` + `Upgrade: websocket` | 101, then every frame echoed |
//! | `GET /headers` | the request's head as received, one header a line |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{pattern, websocket};

type Reply = Response<BoxBody<Bytes, hyper::Error>>;

/// The pattern's first `len` bytes as a body, a piece at a time (the
/// origin's downloads, the client's uploads).
pub struct PatternBody {
    off: u64,
    len: u64,
    /// Says its length up front (`Content-Length`) or not (chunked).
    sized: bool,
}

impl PatternBody {
    /// `sized`: says its length up front (`Content-Length`) or not (chunked).
    pub fn new(len: u64, sized: bool) -> Self {
        PatternBody { off: 0, len, sized }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.off >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.off).min(64 * 1024) as usize;
        let mut chunk = vec![0u8; n];
        pattern::fill(self.off, &mut chunk);
        self.off += n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.off >= self.len
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.sized {
            hyper::body::SizeHint::with_exact(self.len - self.off)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    requests: AtomicU64,
}

/// Serves HTTP/1.1 on `[::]:port` for every port (bound before this
/// returns), as node `name`, closing connections idle for `keepalive`,
/// every answer but `/stats`'s `delay` late (a server far away).
pub fn serve(
    name: String,
    ports: &[u16],
    keepalive: Duration,
    delay: Duration,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP/1.1 server's runtime")?;
    let listeners = runtime.block_on(async {
        let mut out = Vec::new();
        for &port in ports {
            let l = tokio::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port)))
                .await
                .with_context(|| format!("bind tcp {port} (--http)"))?;
            out.push(l);
        }
        anyhow::Ok(out)
    })?;
    let name: Arc<str> = name.into();
    Ok(std::thread::spawn(move || {
        runtime.block_on(async move {
            let counts = Arc::new(Counts::default());
            let mut tasks = Vec::new();
            for listener in listeners {
                let (name, counts) = (name.clone(), counts.clone());
                tasks.push(tokio::spawn(async move {
                    while let Ok((conn, peer)) = listener.accept().await {
                        if conn.local_addr().is_ok_and(|l| l.ip() != peer.ip()) {
                            counts.connections.fetch_add(1, Ordering::Relaxed);
                        }
                        let (name, counts) = (name.clone(), counts.clone());
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let (name, counts) = (name.clone(), counts.clone());
                                async move {
                                    if !delay.is_zero() && req.uri().path() != "/stats" {
                                        tokio::time::sleep(delay).await;
                                    }
                                    Ok::<_, Infallible>(answer(req, &name, &counts).await)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .timer(TokioTimer::new())
                                .header_read_timeout(keepalive)
                                .serve_connection(TokioIo::new(conn), service)
                                .with_upgrades()
                                .await;
                        });
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    }))
}

fn text(name: &str, status: StatusCode, body: String) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-node", v);
    }
    resp
}

async fn answer(req: Request<Incoming>, name: &str, counts: &Counts) -> Reply {
    let path = req.uri().path().to_string();
    if path != "/stats" {
        counts.requests.fetch_add(1, Ordering::Relaxed);
    }
    let number = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|n| n.parse::<u64>().ok())
    };
    if let Some(len) = number("/bytes/").or(number("/chunked/")) {
        let sized = path.starts_with("/bytes/");
        let mut resp = text(name, StatusCode::OK, String::new());
        *resp.body_mut() = PatternBody::new(len, sized).boxed();
        return resp;
    }
    if let Some(ms) = number("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        return text(name, StatusCode::OK, format!("{name}\n"));
    }
    match path.as_str() {
        "/upload" => {
            let mut body = req.into_body();
            let (mut len, mut hash) = (0u64, pattern::Fnv::default());
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(data) = f.data_ref() {
                            len += data.len() as u64;
                            hash.write(data);
                        }
                    }
                    Err(e) => return text(name, StatusCode::BAD_REQUEST, format!("body: {e}\n")),
                }
            }
            text(name, StatusCode::OK, format!("{len} {:x}\n", hash.finish()))
        }
        "/echo" => {
            let mut resp = text(name, StatusCode::OK, String::new());
            *resp.body_mut() = req.into_body().boxed();
            resp
        }
        "/stats" => text(
            name,
            StatusCode::OK,
            format!(
                "connections {}\nrequests {}\n",
                counts.connections.load(Ordering::Relaxed),
                counts.requests.load(Ordering::Relaxed)
            ),
        ),
        "/headers" => {
            let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            text(name, StatusCode::OK, out)
        }
        "/ws" => websocket_upgrade(req, name),
        _ => text(name, StatusCode::OK, format!("{name}\n")),
    }
}

/// Answers a WebSocket handshake and echoes every frame, unmasked, until a
/// close frame (echoed too) or the end of the connection.
fn websocket_upgrade(mut req: Request<Incoming>, name: &str) -> Reply {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|k| k.to_str().ok())
        .map(websocket::accept_key);
    let is_ws = req
        .headers()
        .get(UPGRADE)
        .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let (Some(accept), true) = (key, is_ws) else {
        return text(
            name,
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake, please\n".into(),
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match websocket::decode(&buf) {
                Ok(Some((frame, used))) => {
                    buf.drain(..used);
                    let wire = websocket::encode(frame.opcode, &frame.payload, None);
                    if io.write_all(&wire).await.is_err() || frame.opcode == websocket::CLOSE {
                        return;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(_) => return,
            }
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    let mut resp = text(name, StatusCode::SWITCHING_PROTOCOLS, String::new());
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    resp
}
