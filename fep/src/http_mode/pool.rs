//! One back end's pool of open server connections.
//!
//! Idle connections are taken newest first (the least likely to have been
//! closed by the server) and checked before use; the oldest are closed
//! after `pool_idle_timeout_ms`, before a back end's own keep-alive timeout
//! closes them under a request. A connection taken is replaced at once,
//! up to the pool's current range, which follows the back end's state:
//! none idle for a back end out of the transfer table (down, drained,
//! draining), fewer for one overloaded.
//!
//! Each of HTTP mode's threads has a pool of its own per back end (its
//! share of the range), so a request, its server connection and the
//! connection's task run on one thread: no lock or wake-up crosses threads
//! on a request's way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fep_shared::HttpConfig;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::body::ReqBody;
use super::stats::BackendStats;

pub type Sender = SendRequest<ReqBody>;

/// How long a pooled connection may take to say it is ready again after
/// its last response (the connection's task catching up), before it is
/// given up as broken.
const READY_WAIT: Duration = Duration::from_millis(200);

/// How many idle connections a pool opens ahead of demand and keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub min: u32,
    pub max: u32,
}

impl Range {
    /// One of `shares` pools' range for a back end with `ratio` (its
    /// effective ratio: 0 when down, draining or drained), `overloaded` or
    /// not: the back end's range divided, rounded up.
    pub fn for_backend(cfg: &HttpConfig, ratio: u32, overloaded: bool, shares: u32) -> Range {
        let share = |n: u32| n.div_ceil(shares.max(1));
        match (ratio, overloaded) {
            (0, _) => Range { min: 0, max: 0 },
            (_, true) => Range {
                min: 0,
                max: share(cfg.pool_min_idle),
            },
            _ => Range {
                min: share(cfg.pool_min_idle),
                max: share(cfg.pool_max_idle),
            },
        }
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

pub struct Pool {
    addr: SocketAddr,
    /// Oldest first; taken from the end.
    idle: Mutex<Vec<Idle>>,
    connecting: AtomicU32,
    /// Idle connections now (what `idle` holds), readable without its lock.
    idle_now: AtomicU64,
    range: Mutex<Range>,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// The back end's counters, shared by its pools on every thread.
    stats: Arc<BackendStats>,
    /// The thread (runtime) whose requests use this pool: refills open
    /// connections there.
    runtime: tokio::runtime::Handle,
}

impl Pool {
    pub fn new(
        addr: SocketAddr,
        cfg: &HttpConfig,
        stats: Arc<BackendStats>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Pool {
            addr,
            idle: Mutex::new(Vec::new()),
            connecting: AtomicU32::new(0),
            idle_now: AtomicU64::new(0),
            runtime,
            range: Mutex::new(Range { min: 0, max: 0 }),
            idle_timeout: Duration::from_millis(cfg.pool_idle_timeout_ms),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            stats,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self) -> Range {
        *self.range.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `n` idle here, and the change in the back end's total.
    fn set_idle_gauge(&self, n: usize) {
        let before = self.idle_now.swap(n as u64, Ordering::Relaxed);
        if n as u64 >= before {
            self.stats
                .idle
                .fetch_add(n as u64 - before, Ordering::Relaxed);
        } else {
            self.stats
                .idle
                .fetch_sub(before - n as u64, Ordering::Relaxed);
        }
    }

    /// Idle connections now.
    pub fn idle_count(&self) -> usize {
        self.idle_now.load(Ordering::Relaxed) as usize
    }

    /// The newest idle connection that is still open and ready, if any;
    /// starts its replacement.
    pub async fn take(self: &Arc<Self>) -> Option<Sender> {
        let found = loop {
            let next = {
                let mut idle = self.idle();
                let next = idle.pop();
                self.set_idle_gauge(idle.len());
                next
            };
            let Some(Idle { mut sender, since }) = next else {
                break None;
            };
            if sender.is_closed() || since.elapsed() >= self.idle_timeout {
                continue;
            }
            if sender.is_ready()
                || matches!(
                    tokio::time::timeout(READY_WAIT, sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                break Some(sender);
            }
        };
        self.refill();
        found
    }

    /// Opens a new server connection (counted), within the connect timeout.
    pub async fn connect(&self) -> std::io::Result<Sender> {
        let result = self.open().await;
        let counter = match result {
            Ok(_) => &self.stats.connects,
            Err(_) => &self.stats.connect_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn open(&self) -> std::io::Result<Sender> {
        let timed_out = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {:?}", self.connect_timeout),
            )
        };
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .map_err(|_| timed_out())??;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            // Ends when the server or fep closes the connection; an
            // upgrade hands the connection over to its tunnel.
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Gives a connection back after a complete response: kept while the
    /// pool has room, closed otherwise.
    pub fn release(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let max = self.range().max as usize;
        let mut idle = self.idle();
        if idle.len() < max {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        self.set_idle_gauge(idle.len());
    }

    /// Opens connections until idle + opening reach the range's minimum.
    pub fn refill(self: &Arc<Self>) {
        let min = self.range().min as usize;
        let have = self.idle_count() + self.connecting.load(Ordering::Relaxed) as usize;
        for _ in have..min {
            self.connecting.fetch_add(1, Ordering::Relaxed);
            let pool = self.clone();
            self.runtime.spawn(async move {
                if let Ok(sender) = pool.connect().await {
                    pool.release(sender);
                }
                pool.connecting.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Sets the range, closes connections that are closed by the server,
    /// idle too long or beyond the range, and refills.
    pub fn maintain(self: &Arc<Self>, range: Range) {
        *self.range.lock().unwrap_or_else(|e| e.into_inner()) = range;
        {
            let mut idle = self.idle();
            idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < self.idle_timeout);
            let excess = idle.len().saturating_sub(range.max as usize);
            idle.drain(..excess);
            self.set_idle_gauge(idle.len());
        }
        self.refill();
    }
}

/// A connection taken from the pool for one request: counted busy until
/// it is given back (response complete) or dropped (closed).
pub struct Lease {
    pool: Arc<Pool>,
    sender: Option<Sender>,
}

impl Lease {
    pub fn new(pool: Arc<Pool>, sender: Sender) -> Self {
        pool.stats.busy.fetch_add(1, Ordering::Relaxed);
        Lease {
            pool,
            sender: Some(sender),
        }
    }

    pub fn sender(&mut self) -> &mut Sender {
        self.sender
            .as_mut()
            .expect("a lease holds its sender until it ends")
    }

    /// The response is complete: the connection goes back to the pool.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.release(sender);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.stats.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_follows_the_back_ends_state() {
        let cfg = HttpConfig {
            pool_min_idle: 4,
            pool_max_idle: 16,
            ..HttpConfig::default()
        };
        assert_eq!(
            Range::for_backend(&cfg, 2, false, 1),
            Range { min: 4, max: 16 }
        );
        assert_eq!(
            Range::for_backend(&cfg, 1, true, 1),
            Range { min: 0, max: 4 }
        );
        assert_eq!(
            Range::for_backend(&cfg, 0, false, 1),
            Range { min: 0, max: 0 }
        );
        // Split over 3 threads, rounded up: never below the configured total.
        assert_eq!(
            Range::for_backend(&cfg, 2, false, 3),
            Range { min: 2, max: 6 }
        );
    }
}
