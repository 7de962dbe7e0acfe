//! The HTTP listeners (the admin API on its Unix socket and on TCP, the
//! metrics), bounded like every listener: at most [`MAX_CONNECTIONS`] at once (one more is closed at
//! once), request headers of at most [`MAX_HEADER_BYTES`] within
//! [`HEADER_TIMEOUT`] — which also closes a keep-alive connection idle that
//! long — and no connection lives longer than [`MAX_LIFETIME`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_HEADER_BYTES: usize = 16 << 10;
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// Where connections come from: a TCP or a Unix listener.
pub trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, with a name for its peer in logs.
    fn next(&self) -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        Ok((stream, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "a local client".into()))
    }
}

/// Serves `app` on `listener` until the runtime stops; `what` names the
/// listener in logs.
pub async fn serve(listener: impl Listener, app: Router, what: &'static str) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_header_size(MAX_HEADER_BYTES);
    let http = Arc::new(http);
    loop {
        let (stream, peer) = match listener.next().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, typically: back off instead of spinning.
                tracing::warn!("{what}: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("{what}: {peer} refused, {MAX_CONNECTIONS} connections open");
            continue;
        };
        let (http, service) = (http.clone(), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            let conn = http.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(MAX_LIFETIME, conn).await {
                Ok(Err(e)) => tracing::debug!("{what}: connection from {peer}: {e}"),
                Err(_) => {
                    tracing::debug!("{what}: connection from {peer} closed after {MAX_LIFETIME:?}")
                }
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}
