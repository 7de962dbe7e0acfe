//! The HTTP listeners on TCP (admin API, metrics), bounded like every
//! listener: at most [`MAX_CONNECTIONS`] at once (one more is closed at
//! once), request headers of at most [`MAX_HEADER_BYTES`] within
//! [`HEADER_TIMEOUT`] — which also closes a keep-alive connection idle that
//! long — and no connection lives longer than [`MAX_LIFETIME`].

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_HEADER_BYTES: usize = 16 << 10;
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until the runtime stops; `what` names the
/// listener in logs.
pub async fn serve(listener: TcpListener, app: Router, what: &'static str) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_header_size(MAX_HEADER_BYTES);
    let http = Arc::new(http);
    loop {
        let (stream, peer) = match listener.accept().await {
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
