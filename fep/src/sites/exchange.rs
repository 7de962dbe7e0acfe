//! The site-state exchange: each site keeps a connection to every other
//! and sends its whole state every `update_interval_ms`, and at once when a
//! site becomes unreachable or a local VIP runs out of room. Connections
//! in are bounded, authenticated (the agent protocol's hello, HMAC,
//! sequence numbers and size limit) and must come from the sending site's
//! configured address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fep_shared::protocol::{io, ProtocolError, MAX_REGISTER_FRAME};
use fep_shared::sites::{SiteMsg, MAX_STATE_FRAME};
use fep_shared::SiteConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use super::Sites;

/// The hello must be done within this.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that sends nothing for this many update intervals ends.
const IDLE_INTERVALS: u32 = 3;
/// Time for one frame to be written.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait before dialling a site again after a failure.
const REDIAL: Duration = Duration::from_millis(500);

/// Receives the other sites' updates on `sites.listen`.
pub async fn serve(sites: Arc<Sites>) -> anyhow::Result<()> {
    let listen = sites.config().listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for the other sites on {listen} (sites.listen)"))?;
    tracing::info!("listening for the other sites' state on {listen}");
    // Two per other site: a reconnect may overlap the connection it replaces.
    let slots = Arc::new(Semaphore::new(2 * sites.config().sites.len()));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accepting a site connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            sites.stats.reject("busy");
            continue;
        };
        let sites = sites.clone();
        tokio::spawn(async move {
            if let Err(e) = receive(&sites, stream, from).await {
                tracing::warn!("site connection from {from}: {e:#}");
            }
            drop(slot);
        });
    }
}

async fn receive(sites: &Sites, mut stream: TcpStream, from: SocketAddr) -> anyhow::Result<()> {
    let refuse = |e: ProtocolError| {
        sites.stats.reject(e.kind());
        anyhow::anyhow!("rejected frame: {e}")
    };
    let hello = async {
        let mut session = io::handshake(&mut stream, sites.key().clone(), AUTH_TIMEOUT).await?;
        let frame = io::read_frame(&mut stream, MAX_REGISTER_FRAME)
            .await
            .map_err(refuse)?
            .context("closed before its hello")?;
        match session.open::<SiteMsg>(&frame).map_err(refuse)? {
            SiteMsg::Hello { site } => anyhow::Ok((session, site)),
            SiteMsg::State(_) => {
                sites.stats.reject("unsolicited");
                bail!("a state before the hello")
            }
        }
    };
    let (mut session, name) = tokio::time::timeout(AUTH_TIMEOUT, hello)
        .await
        .map_err(|_| {
            sites.stats.reject("auth_timeout");
            anyhow::anyhow!("no valid hello within {AUTH_TIMEOUT:?}")
        })??;
    let known = sites
        .config()
        .site(&name)
        .filter(|s| s.name != sites.config().me);
    let site = match known {
        None => {
            sites.stats.reject("unknown_site");
            bail!("'{name}' is not one of the other sites");
        }
        Some(s) if s.exchange.ip() != from.ip() => {
            sites.stats.reject("wrong_address");
            bail!(
                "site '{name}' connects from {}, its address is {}",
                from.ip(),
                s.exchange.ip()
            );
        }
        Some(s) => s.name.clone(),
    };
    let idle = Duration::from_millis(sites.config().update_interval_ms) * IDLE_INTERVALS;
    loop {
        let frame =
            match tokio::time::timeout(idle, io::read_frame(&mut stream, MAX_STATE_FRAME)).await {
                Err(_) => bail!("site '{site}' sent nothing for {idle:?}"),
                Ok(frame) => match frame.map_err(refuse)? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
        match session.open::<SiteMsg>(&frame).map_err(refuse)? {
            SiteMsg::State(state) => {
                sites
                    .stats
                    .updates_received
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!("site '{site}' sent its state ({})", state.reason);
                sites.change(|table| {
                    if let Some(i) = table.site_index(&site) {
                        table.accept(i, state, Instant::now());
                    }
                    None
                });
            }
            SiteMsg::Hello { .. } => {
                sites.stats.reject("unsolicited");
                bail!("site '{site}' said hello twice");
            }
        }
    }
}

/// Connects from this site's own exchange address, the one the other
/// sites check the connection against.
async fn dial(sites: &Sites, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match to {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let own = sites.config().listen.ip();
    if !own.is_unspecified() && own.is_ipv4() == to.is_ipv4() {
        socket.bind(SocketAddr::new(own, 0))?;
    }
    socket.connect(to).await
}

/// Keeps sending this site's state to `peer` until the runtime stops.
pub async fn send_to(sites: Arc<Sites>, peer: SiteConfig) {
    let mut triggers = sites.triggers();
    let every = Duration::from_millis(sites.config().update_interval_ms);
    loop {
        let result = async {
            let mut stream = tokio::time::timeout(AUTH_TIMEOUT, dial(&sites, peer.exchange))
                .await
                .map_err(|_| anyhow::anyhow!("no answer"))??;
            let mut session = io::handshake(&mut stream, sites.key().clone(), AUTH_TIMEOUT).await?;
            let hello = SiteMsg::Hello {
                site: sites.config().me.clone(),
            };
            stream.write_all(&session.seal(&hello)).await?;
            let mut reason = "connected".to_string();
            loop {
                let frame = session.seal(&SiteMsg::State(sites.own_state(&reason)));
                tokio::time::timeout(SEND_TIMEOUT, stream.write_all(&frame))
                    .await
                    .map_err(|_| anyhow::anyhow!("takes no update"))??;
                sites
                    .stats
                    .updates_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if reason != "periodic" {
                    sites
                        .stats
                        .triggered_sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                reason = tokio::select! {
                    _ = tokio::time::sleep(every) => "periodic".to_string(),
                    changed = triggers.changed() => match changed {
                        Ok(()) => triggers.borrow_and_update().clone(),
                        Err(_) => return anyhow::Ok(()),
                    },
                };
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!("site '{}' at {}: {e:#}", peer.name, peer.exchange);
        }
        tokio::time::sleep(REDIAL).await;
    }
}
