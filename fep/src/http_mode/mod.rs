//! HTTP mode: services whose client connections fep ends itself, to
//! dispatch them request by request over pools of open server connections.
//!
//! It runs on threads of its own (`threads`), apart from the TUN workers
//! and the control plane: a flood of HTTP clients cannot delay an agent
//! report or an admin command. It reads the same transfer table as the TUN path — ratios,
//! effective ratios, drains, pins, loads and health all apply — and counts
//! each request in flight as a route of its back end, so that `least-routes`
//! weighs in-flight requests and a drain completes when they have.
//!
//! A maintenance pass every [`MAINTAIN_EVERY`] follows the table: listeners
//! for new HTTP services, none for removed ones, a pool for each back end,
//! each pool's range from its back end's state, expired sessions dropped.

mod body;
mod pool;
mod proxy;
mod redirect;
mod request;
mod session;
pub mod stats;
mod threads;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use threads::Threads;

use crate::dispatcher::Dispatcher;
use crate::sites::Sites;
use crate::transfer_table::{ServiceId, TransferTable};
use pool::{Pool, Range};
use proxy::{BackendFront, ServiceFront};

pub(crate) use proxy::client_edge;
use stats::BackendStats;

const MAINTAIN_EVERY: Duration = Duration::from_millis(100);

/// HTTP mode's threads.
const THREADS: usize = 2;

/// A running service's listener tasks (one per thread) and state.
struct Running {
    front: Arc<ServiceFront>,
    accepts: Vec<tokio::task::JoinHandle<()>>,
}

/// HTTP mode's services, as the views and metrics read them.
pub struct HttpFront {
    threads: Arc<Threads>,
    services: Arc<Mutex<HashMap<ServiceId, Running>>>,
}

/// One back end's figures now.
pub struct BackendSnapshot<'a> {
    pub stats: &'a BackendStats,
    pub sessions: u64,
}

impl HttpFront {
    /// Starts the threads and the listeners of the table's HTTP services
    /// (bound before this returns), then follows the table.
    pub fn start(dispatcher: Arc<Dispatcher>, sites: Option<Arc<Sites>>) -> anyhow::Result<Self> {
        let threads = Arc::new(Threads::start(THREADS)?);
        let services = Arc::new(Mutex::new(HashMap::new()));
        let mut last = None;
        follow(&dispatcher, &sites, &threads, &services, &mut last)?;
        let (shared, on) = (services.clone(), threads.clone());
        threads.handle(0).spawn(async move {
            loop {
                tokio::time::sleep(MAINTAIN_EVERY).await;
                if let Err(e) = follow(&dispatcher, &sites, &on, &shared, &mut last) {
                    tracing::error!("HTTP mode: {e:#}");
                }
            }
        });
        Ok(HttpFront { threads, services })
    }

    /// Calls `f` with the HTTP service in `slot`, if it runs, and its back
    /// ends' figures by back-end slot.
    pub fn with_service<R>(
        &self,
        slot: ServiceId,
        f: impl FnOnce(&ServiceFront, &[Option<BackendSnapshot<'_>>]) -> R,
    ) -> Option<R> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let front = &services.get(&slot)?.front;
        let backends = front.backends.load();
        let sessions = front.sessions.per_backend(backends.len());
        let snaps: Vec<Option<BackendSnapshot<'_>>> = backends
            .iter()
            .zip(&sessions)
            .map(|(b, &sessions)| {
                b.as_ref().map(|b| BackendSnapshot {
                    stats: &b.stats,
                    sessions,
                })
            })
            .collect();
        Some(f(front, &snaps))
    }

    /// The slots of the running HTTP services.
    pub fn slots(&self) -> Vec<ServiceId> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let mut slots: Vec<ServiceId> = services.keys().copied().collect();
        slots.sort_unstable();
        slots
    }

    /// Stops accepting and ends every connection. Called outside any
    /// runtime.
    pub fn stop(&self) {
        self.threads.stop();
    }
}

/// One maintenance pass: listeners and pools after a table change, pool
/// ranges and sessions always.
fn follow(
    dispatcher: &Arc<Dispatcher>,
    sites: &Option<Arc<Sites>>,
    threads: &Threads,
    services: &Mutex<HashMap<ServiceId, Running>>,
    last: &mut Option<Arc<TransferTable>>,
) -> anyhow::Result<()> {
    let table = dispatcher.table();
    let mut running = services.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &table)) {
        reconcile(dispatcher, sites, threads, &table, &mut running)?;
        *last = Some(table.clone());
    }
    let now = Instant::now();
    for run in running.values() {
        let svc = table.service(run.front.slot);
        for (b, front) in svc.backends.iter().zip(run.front.backends.load().iter()) {
            if let Some(front) = front {
                let ratio = if b.removed { 0 } else { b.ratio() };
                let shares = front.pools.len() as u32;
                let range = Range::for_backend(&run.front.cfg, ratio, b.overloaded(), shares);
                for pool in &front.pools {
                    pool.maintain(range);
                }
            }
        }
        run.front.sessions.expire(now);
        run.front.stats.sample_rate(now, run.front.requests());
    }
    Ok(())
}

/// Brings listeners and pools to `table`: a listener per configured HTTP
/// service and thread (restarted when its settings changed), a pool per
/// back end and thread (kept while the slot's endpoint is the same).
fn reconcile(
    dispatcher: &Arc<Dispatcher>,
    sites: &Option<Arc<Sites>>,
    threads: &Threads,
    table: &TransferTable,
    running: &mut HashMap<ServiceId, Running>,
) -> anyhow::Result<()> {
    running.retain(|slot, run| {
        let svc = table.service(*slot);
        let keep = !svc.removed && svc.http.as_ref() == Some(&run.front.cfg);
        if !keep {
            run.accepts.iter().for_each(|a| a.abort());
            tracing::info!("HTTP service '{}': listener closed", run.front.name);
        }
        keep
    });
    for (slot, svc) in table.services().iter().enumerate() {
        let slot = slot as ServiceId;
        let Some(cfg) = svc.http.as_ref().filter(|_| !svc.removed) else {
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(entry) = running.entry(slot) {
            let front = Arc::new(ServiceFront::new(
                svc,
                slot,
                cfg.clone(),
                dispatcher.clone(),
                sites.clone(),
            ));
            let mut accepts = Vec::with_capacity(threads.len());
            for shard in 0..threads.len() {
                let on = threads.handle(shard);
                // Registered with that thread's reactor.
                let bound = {
                    let _in = on.enter();
                    proxy::bind(front.vip)
                };
                let listener = match bound {
                    Ok(l) => l,
                    Err(e) => {
                        accepts
                            .iter()
                            .for_each(|a: &tokio::task::JoinHandle<()>| a.abort());
                        return Err(e).with_context(|| {
                            format!(
                                "HTTP service '{}': cannot listen on {} (fep needs root or \
                                 CAP_NET_ADMIN for a transparent socket, and the port must be free)",
                                svc.name, front.vip
                            )
                        });
                    }
                };
                accepts.push(on.spawn(front.clone().accept(listener, shard)));
            }
            tracing::info!("HTTP service '{}': listening on {}", svc.name, front.vip);
            entry.insert(Running { front, accepts });
        }
        let front = &running[&slot].front;
        let old = front.backends.load();
        let backends: Vec<Option<Arc<BackendFront>>> = svc
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let addr = SocketAddr::new(crate::wire::ip_from_addr(&b.addr), b.port);
                match old.get(i).cloned().flatten() {
                    Some(f) if f.pools[0].addr() == addr && f.node == b.node => Some(f),
                    _ if b.removed => None,
                    _ => {
                        let stats = Arc::new(BackendStats::default());
                        let pools = (0..threads.len())
                            .map(|t| {
                                let on = threads.handle(t).clone();
                                Arc::new(Pool::new(addr, cfg, stats.clone(), on))
                            })
                            .collect();
                        Some(Arc::new(BackendFront {
                            pools,
                            stats,
                            node: b.node.clone(),
                        }))
                    }
                }
            })
            .collect();
        front.backends.store(Arc::new(backends));
    }
    Ok(())
}
