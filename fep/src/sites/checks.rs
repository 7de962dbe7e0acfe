//! This site's checks of every site's VIPs (its own too): a TCP connect,
//! or an HTTP GET of the name's `check_path` that must answer 2xx or 3xx.
//! They start with fep, so the first query already finds them under way.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::Sites;

/// Bytes of a check's response read for its status line.
const STATUS_BYTES: usize = 64;

/// One target: a name's slot, and where to check it.
struct Target {
    name: usize,
    slot: usize,
    site: String,
    addr: SocketAddr,
    path: Option<String>,
}

/// Checks every target every `check_interval_ms`, concurrently, until the
/// runtime stops.
/// A site does not check itself: its own room comes from its services,
/// and the matrix has no diagonal.
pub async fn run(sites: Arc<Sites>) {
    let cfg = sites.config();
    let me = cfg.me.clone();
    let targets: Vec<Arc<Target>> = cfg
        .names
        .iter()
        .enumerate()
        .flat_map(|(n, name)| {
            let me = me.clone();
            name.sites.iter().enumerate().filter_map(move |(slot, at)| {
                if at.site == me {
                    return None;
                }
                Some(Arc::new(Target {
                    name: n,
                    slot,
                    site: at.site.clone(),
                    addr: SocketAddr::new(at.check_target()?, name.port),
                    path: name.check_path.clone(),
                }))
            })
        })
        .collect();
    let timeout = Duration::from_millis(cfg.check_timeout_ms);
    let mut every = tokio::time::interval(Duration::from_millis(cfg.check_interval_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let mut round = JoinSet::new();
        for t in &targets {
            let t = t.clone();
            round.spawn(async move {
                let took = check(t.addr, t.path.as_deref(), timeout).await;
                (t, took)
            });
        }
        let mut results = Vec::with_capacity(targets.len());
        while let Some(done) = round.join_next().await {
            if let Ok(r) = done {
                results.push(r);
            }
        }
        sites.change(|table| {
            let mut reason = None;
            for (t, took) in &results {
                if table.record_check(t.name, t.slot, *took) {
                    let what = match took {
                        Some(_) => "reachable again",
                        None => "unreachable",
                    };
                    tracing::warn!("site '{}' at {} is {what}", t.site, t.addr);
                    reason = Some(format!("site '{}' at {} is {what}", t.site, t.addr));
                }
            }
            reason
        });
    }
}

/// The time one check took, or `None` when it failed.
async fn check(addr: SocketAddr, path: Option<&str>, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let Some(path) = path else {
            return Some(());
        };
        let host = match addr.ip() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fep-site-check\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = [0u8; STATUS_BYTES];
        let mut got = 0;
        while got < 12 {
            match stream.read(&mut buf[got..]).await.ok()? {
                0 => break,
                n => got += n,
            }
        }
        good_status(&buf[..got]).then_some(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .ok()
        .flatten()
        .map(|()| start.elapsed())
}

/// `HTTP/1.x 2xx` or `3xx`.
fn good_status(head: &[u8]) -> bool {
    head.starts_with(b"HTTP/1.") && head.len() >= 12 && matches!(head[9], b'2' | b'3')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_and_3xx_pass() {
        assert!(good_status(b"HTTP/1.1 200 OK\r\n"));
        assert!(good_status(b"HTTP/1.0 302 Found"));
        assert!(!good_status(b"HTTP/1.1 503 Service Unavailable"));
        assert!(!good_status(b"HTTP/1.1 2"));
        assert!(!good_status(b"SSH-2.0-OpenSSH"));
    }
}
