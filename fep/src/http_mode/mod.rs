//! HTTP mode: services whose client connections fep ends itself, to
//! dispatch them request by request over pools of open server connections.
//!
//! It runs on a runtime of its own, apart from the TUN workers and the
//! control plane: a flood of HTTP clients cannot delay an agent report or an
//! admin command. It reads the same transfer table as the TUN path — ratios,
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
mod request;
mod session;
pub mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::dispatcher::Dispatcher;
use crate::transfer_table::{ServiceId, TransferTable};
use pool::{Pool, Range};
use proxy::{BackendFront, ServiceFront};

pub(crate) use proxy::client_edge;
use stats::BackendStats;

const MAINTAIN_EVERY: Duration = Duration::from_millis(100);

/// Threads of HTTP mode's runtime.
const THREADS: usize = 2;

/// A running service's listener task and state.
struct Running {
    front: Arc<ServiceFront>,
    accept: tokio::task::JoinHandle<()>,
}

/// HTTP mode's services, as the views and metrics read them.
pub struct HttpFront {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    services: Arc<Mutex<HashMap<ServiceId, Running>>>,
}

/// One back end's figures now.
pub struct BackendSnapshot<'a> {
    pub stats: &'a BackendStats,
    pub sessions: u64,
}

impl HttpFront {
    /// Starts the runtime and the listeners of the table's HTTP services
    /// (bound before this returns), then follows the table.
    pub fn start(dispatcher: Arc<Dispatcher>) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .thread_name("fep-http")
            .enable_all()
            .build()
            .context("cannot start HTTP mode's runtime")?;
        let services = Arc::new(Mutex::new(HashMap::new()));
        let first = runtime.block_on(async {
            let mut last = None;
            follow(&dispatcher, &services, &mut last)?;
            anyhow::Ok(last)
        })?;
        let shared = services.clone();
        runtime.spawn(async move {
            let (services, mut last) = (shared, first);
            loop {
                tokio::time::sleep(MAINTAIN_EVERY).await;
                if let Err(e) = follow(&dispatcher, &services, &mut last) {
                    tracing::error!("HTTP mode: {e:#}");
                }
            }
        });
        Ok(HttpFront {
            runtime: Mutex::new(Some(runtime)),
            services,
        })
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
                    stats: b.pool.stats(),
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

    /// Stops accepting and ends every connection (within a second). Called
    /// outside any runtime.
    pub fn stop(&self) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rt) = runtime {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// One maintenance pass: listeners and pools after a table change, pool
/// ranges and sessions always.
fn follow(
    dispatcher: &Arc<Dispatcher>,
    services: &Mutex<HashMap<ServiceId, Running>>,
    last: &mut Option<Arc<TransferTable>>,
) -> anyhow::Result<()> {
    let table = dispatcher.table();
    let mut running = services.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &table)) {
        reconcile(dispatcher, &table, &mut running)?;
        *last = Some(table.clone());
    }
    let now = Instant::now();
    for run in running.values() {
        let svc = table.service(run.front.slot);
        for (b, front) in svc.backends.iter().zip(run.front.backends.load().iter()) {
            if let Some(front) = front {
                let ratio = if b.removed { 0 } else { b.ratio() };
                front
                    .pool
                    .maintain(Range::for_backend(&run.front.cfg, ratio, b.overloaded()));
            }
        }
        run.front.sessions.expire(now);
        run.front.stats.sample_rate(now, run.front.requests());
    }
    Ok(())
}

/// Brings listeners and pools to `table`: a listener per configured HTTP
/// service (restarted when its settings changed), a pool per back end
/// (kept while the slot's endpoint is the same).
fn reconcile(
    dispatcher: &Arc<Dispatcher>,
    table: &TransferTable,
    running: &mut HashMap<ServiceId, Running>,
) -> anyhow::Result<()> {
    running.retain(|slot, run| {
        let svc = table.service(*slot);
        let keep = !svc.removed && svc.http.as_ref() == Some(&run.front.cfg);
        if !keep {
            run.accept.abort();
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
            ));
            let listener = proxy::bind(front.vip).with_context(|| {
                format!(
                    "HTTP service '{}': cannot listen on {} (fep needs root or CAP_NET_ADMIN \
                     for a transparent socket, and the port must be free)",
                    svc.name, front.vip
                )
            })?;
            tracing::info!("HTTP service '{}': listening on {}", svc.name, front.vip);
            let accept = tokio::spawn(front.clone().accept(listener));
            entry.insert(Running { front, accept });
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
                    Some(f) if f.pool.addr() == addr && f.node == b.node => Some(f),
                    _ if b.removed => None,
                    _ => Some(Arc::new(BackendFront {
                        pool: Arc::new(Pool::new(addr, cfg, Arc::new(BackendStats::default()))),
                        node: b.node.clone(),
                    })),
                }
            })
            .collect();
        front.backends.store(Arc::new(backends));
    }
    Ok(())
}

impl Drop for HttpFront {
    fn drop(&mut self) {
        let runtime = self
            .runtime
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rt) = runtime {
            rt.shutdown_background();
        }
    }
}
