//! The running daemon: TUN device, network set-up, workers, and the control
//! loop (signals, route expiry, periodic counters in the log).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fep_shared::FepConfig;
use tokio::signal::unix::{signal, SignalKind};

use fep_shared::api::FastPathState;
use fep_shared::protocol::Key;
use tokio::task::JoinSet;

use crate::admin::{self, Admin};
use crate::clock::Clock;
use crate::control::copies::Copies;
use crate::control::journal::{self, Journal};
use crate::control::peers::{self, Peers};
use crate::control::snapshot;
use crate::control::startup::Start;
use crate::control::{agents, health, prune, ControlPlane, DataPath};
use crate::counters::Totals;
use crate::dispatcher::Dispatcher;
use crate::fast_path::{FastPath, FastPathStats};
use crate::http_mode::HttpFront;
use crate::metrics;
use crate::netsetup::NetSetup;
use crate::sites::dns_server::DnsServer;
use crate::sites::{self, checks, exchange, Sites};
use crate::tun_io::{self, Workers};
use crate::views::Sources;

/// How often routes are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// How long after a start a back end's SYN-ACK without a route makes one
/// (see `Dispatcher::adopt_handshakes`): a back end retries a SYN-ACK for
/// about a minute (5 retries by default).
const ADOPT_HANDSHAKES_FOR: Duration = Duration::from_secs(60);
/// How often the control plane re-evaluates node states and ratios.
const TICK_EVERY: Duration = Duration::from_millis(200);
/// How often a site reads its own services' room (a change is sent to the
/// other sites at once).
const FOLLOW_ROOM_EVERY: Duration = Duration::from_millis(200);
/// How often the counters are logged while traffic flows.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Serves the config file at `config_path` (already loaded as `file`),
/// with the runtime changes saved in its state directory (`start`, checked
/// under the state directory's [`lock_state_dir`]), until SIGINT or SIGTERM;
/// then saves the route table and leaves the network set-up in place for
/// the next start (`fep --cleanup` removes it).
pub fn run(config_path: &Path, file: FepConfig, start: Start) -> anyhow::Result<()> {
    let Start { saved, live: cfg } = start;
    let secrets = Secrets::load(&cfg)?;
    let dispatcher = Arc::new(Dispatcher::new(&cfg));
    let queues =
        tun_io::open_queues(&cfg.tun, cfg.workers, cfg.tun_queue_len).with_context(|| {
            format!(
                "cannot create TUN device '{}' with {} queues: fep needs root (CAP_NET_ADMIN) and \
             /dev/net/tun, and the name must not be taken by another device or a running fep",
                cfg.tun, cfg.workers
            )
        })?;
    let mut net = NetSetup::new(&cfg.tun, cfg.policy_table, &cfg.state_dir);
    net.reconcile(&dispatcher.table())?;
    let sites = match &cfg.sites {
        Some(sites) => {
            let key = secrets
                .sites_key
                .clone()
                .context("the sites key was read")?;
            Some(Arc::new(Sites::new(sites, key)?))
        }
        None => None,
    };
    let http = Arc::new(HttpFront::start(dispatcher.clone(), sites.clone())?);
    let dns = match sites.as_ref().filter(|s| s.config().dns.is_some()) {
        Some(s) => Some(DnsServer::start(s.clone())?),
        None => None,
    };
    let clock = Clock::start();
    let copies = cfg.cluster.as_ref().map(|_| Arc::new(Copies::default()));
    let (journal, journal_stop) = restore_routes(&dispatcher, &cfg, clock, copies.clone())?;
    dispatcher.adopt_handshakes(true);
    let (workers, mut replayer) =
        Workers::spawn(queues, dispatcher.clone(), clock, cfg.tun_batching)
            .context("cannot start worker threads")?;
    let fast_stats = Arc::new(FastPathStats::default());
    let fast_path = start_fast_path(&cfg, &dispatcher, clock, &fast_stats);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control-plane runtime")?;
    let result = rt.block_on(async {
        let cp = Arc::new(
            ControlPlane::new(
                config_path,
                file,
                cfg.clone(),
                &saved,
                DataPath {
                    dispatcher: dispatcher.clone(),
                    replayer: Box::new(move |group| replayer.release(group)),
                },
                net,
                clock,
            )
            .context("cannot start the control plane's threads")?,
        );
        if let Some(cluster) = &cfg.cluster {
            let groups: Vec<String> = cfg.vip_groups.iter().map(|g| g.name.clone()).collect();
            if let Some(peers) = Peers::new(cluster, &groups, workers.counters().to_vec())? {
                cp.set_peers(peers);
            }
        }
        let sources = Sources {
            workers: workers.counters().to_vec(),
            http: http.clone(),
            sites: sites.clone(),
            fast_path: fast_stats,
        };
        let mut tasks = spawn_tasks(&cp, &cfg, secrets, sources, clock);
        if let Some(copies) = copies {
            tasks.spawn(forever(cp.clone().send_route_copies(copies)));
        }
        // Let every task bind its listener before saying so: "serving" means
        // the data path, the admin socket and the agent port are all up.
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
        tracing::info!(
            "serving {} service(s) on {} with {} worker(s)",
            cfg.services.len(),
            cfg.tun,
            cfg.workers
        );
        let result = control_loop(&cp, &workers, &mut tasks).await;
        let _ = std::fs::remove_file(&cfg.control_socket);
        cp.stop();
        result
    });

    let totals = Totals::sum(workers.counters().iter().map(|c| &**c));
    if let Some(dns) = dns {
        dns.stop();
    }
    http.stop();
    if let Some(fast_path) = fast_path {
        fast_path.stop();
    }
    workers.stop();
    // With no worker left, the last snapshot holds every route.
    journal_stop.store(true, Ordering::Relaxed);
    match journal.join() {
        Ok(j) => j.finish(),
        Err(_) => tracing::error!("the journal thread panicked; the route table was not saved"),
    }
    tracing::info!(
        "stopped; device {} and the return path stay, dropping packets until fep starts \
         again (`fep --cleanup` removes them); totals: {totals}",
        cfg.tun
    );
    result
}

/// The kernel fast path when the config asks for it; where it cannot run,
/// fep says why and goes on with the TUN path alone.
fn start_fast_path(
    cfg: &FepConfig,
    dispatcher: &Arc<Dispatcher>,
    clock: Clock,
    stats: &Arc<FastPathStats>,
) -> Option<FastPath> {
    if cfg.fast_path == fep_shared::FastPath::Off {
        return None;
    }
    match FastPath::start(dispatcher.clone(), clock, cfg.max_routes, stats.clone()) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("fast_path = \"tc-bpf\": {e}; every packet takes the TUN path");
            stats.set_state(FastPathState::Unavailable, Some(e.to_string()), Vec::new());
            None
        }
    }
}

/// Holds `state_dir/fep.lock` while fep runs (the kernel releases it however
/// fep ends): two feps on one state directory would share its TUN device and
/// overwrite each other's state. Taken before the state is read.
pub fn lock_state_dir(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = state_dir.join("fep.lock");
    let file =
        std::fs::File::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "another fep runs with the state directory {} ({} is locked): stop it first",
            state_dir.display(),
            path.display()
        );
    }
    Ok(file)
}

/// `fep --cleanup`: removes the TUN device, VIP routes, return-path rules and
/// table and puts back the sysctls fep changed; refused while fep runs.
pub fn cleanup(cfg: &FepConfig) -> anyhow::Result<Vec<String>> {
    let _lock = lock_state_dir(&cfg.state_dir)?;
    Ok(crate::netsetup::cleanup(
        &cfg.tun,
        cfg.policy_table,
        &cfg.state_dir,
    ))
}

/// Expires routes every [`EXPIRE_EVERY`], one pass at a time on the
/// blocking pool: a pass looks at the whole route table.
/// What the listeners check their peers against.
struct Secrets {
    agent_key: Option<Key>,
    admin_token: Option<String>,
    sites_key: Option<Key>,
}

impl Secrets {
    /// Read at the start, so a missing or bad key file stops fep at once.
    fn load(cfg: &FepConfig) -> anyhow::Result<Self> {
        let agent_key = match &cfg.agent_key_file {
            Some(path) => Some(Key::load(path).map_err(|e| {
                anyhow::anyhow!(
                    "agent_key_file: {e} (write the agents' master key with \
                     `bep-agent --gen-key {}`)",
                    path.display()
                )
            })?),
            None => None,
        };
        let admin_token = match &cfg.admin_token_file {
            Some(path) => Some(admin::load_token(path)?),
            None => None,
        };
        let sites_key = match &cfg.sites {
            Some(sites) => Some(Key::load(&sites.key_file).map_err(|e| {
                anyhow::anyhow!(
                    "sites.key_file: {e} (write 64 hex characters, the same on every site, \
                     e.g. from `bep-agent --gen-key`)"
                )
            })?),
            None => None,
        };
        Ok(Secrets {
            agent_key,
            admin_token,
            sites_key,
        })
    }
}

/// Puts back the routes of the last run (the journal is newer than the
/// snapshot: its routes first) and starts the journal thread (noting route
/// copies into `copies`), which the returned flag stops.
fn restore_routes(
    dispatcher: &Arc<Dispatcher>,
    cfg: &FepConfig,
    clock: Clock,
    copies: Option<Arc<Copies>>,
) -> anyhow::Result<(std::thread::JoinHandle<Journal>, Arc<AtomicBool>)> {
    let (_, journalled) = journal::restore(dispatcher, &cfg.state_dir, clock.now_ms());
    snapshot::restore(dispatcher, &cfg.state_dir, clock.now_ms());
    let journal = Journal::open(dispatcher.clone(), &cfg.state_dir, journalled, copies);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = journal
        .spawn(stop.clone())
        .context("cannot start the journal thread")?;
    Ok((handle, stop))
}

/// The control plane's tasks: the agent port, health checks, pruning, route
/// expiry, metrics and the admin API (socket, and TCP where configured).
fn spawn_tasks(
    cp: &Arc<ControlPlane>,
    cfg: &FepConfig,
    secrets: Secrets,
    sources: Sources,
    clock: Clock,
) -> JoinSet<anyhow::Result<()>> {
    let mut tasks = JoinSet::new();
    if let (Some(listen), Some(key)) = (cfg.agent_listen, secrets.agent_key) {
        tasks.spawn(agents::serve(cp.clone(), listen, key));
    }
    if cfg.health_check_interval_ms > 0 {
        let (every, timeout) = (cfg.health_check_interval_ms, cfg.health_check_timeout_ms);
        tasks.spawn(forever(health::run(cp.clone(), every, timeout)));
    }
    tasks.spawn(forever(prune::run(cp.clone())));
    if let Some(cluster) = &cfg.cluster {
        tasks.spawn(cp.clone().follow_keepalived(cluster.notify_fifo.clone()));
        if let (Some(listen), Some(_)) = (cluster.listen, cp.peers()) {
            tasks.spawn(peers::serve(cp.clone(), listen));
            if cluster.controller_interval_ms > 0 {
                let every = Duration::from_millis(cluster.controller_interval_ms);
                tasks.spawn(forever(
                    cp.clone()
                        .run_controller(every, cluster.controller_hysteresis),
                ));
            }
        }
    }
    tasks.spawn(forever(expire_routes(cp.dispatcher_arc(), clock)));
    let dispatcher = cp.dispatcher_arc();
    tasks.spawn(forever(async move {
        tokio::time::sleep(ADOPT_HANDSHAKES_FOR).await;
        dispatcher.adopt_handshakes(false);
        std::future::pending().await
    }));
    if let Some(listen) = cfg.metrics_listen {
        tasks.spawn(metrics::serve(cp.clone(), sources.clone(), listen));
    }
    if let Some(sites) = &sources.sites {
        spawn_sites(&mut tasks, sites, cp.dispatcher_arc(), sources.http.clone());
    }
    let admin = Admin::new(cp.clone(), sources);
    if let (Some(listen), Some(token)) = (cfg.admin_listen, secrets.admin_token) {
        tasks.spawn(admin::serve_tcp(admin.clone(), listen, token));
    }
    let socket = cfg.control_socket.clone();
    tasks.spawn(async move { admin::serve_socket(admin, &socket).await });
    tasks
}

/// Several sites: the checks of every site's VIPs, the exchange both ways,
/// and this site's own room followed from its services.
fn spawn_sites(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    sites: &Arc<Sites>,
    dispatcher: Arc<Dispatcher>,
    http: Arc<HttpFront>,
) {
    tasks.spawn(forever(checks::run(sites.clone())));
    tasks.spawn(exchange::serve(sites.clone()));
    for peer in sites
        .config()
        .sites
        .iter()
        .filter(|s| s.name != sites.config().me)
    {
        tasks.spawn(forever(exchange::send_to(sites.clone(), peer.clone())));
    }
    let sites = sites.clone();
    tasks.spawn(forever(async move {
        loop {
            let table = dispatcher.table();
            sites.refresh_local(|vip, port| {
                sites::vip_state(&table, vip, port, |slot| {
                    http.with_service(slot, |front, _| front.stats.open.load(Ordering::Relaxed))
                })
            });
            tokio::time::sleep(FOLLOW_ROOM_EVERY).await;
        }
    }));
}

async fn expire_routes(dispatcher: Arc<Dispatcher>, clock: Clock) {
    let mut every = tokio::time::interval(EXPIRE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let d = dispatcher.clone();
        match tokio::task::spawn_blocking(move || d.expire(clock.now_ms())).await {
            Ok(s) if s.evicted > 0 => tracing::warn!(
                "route table near max_routes: evicted {} longest-idle route(s)",
                s.evicted
            ),
            Ok(_) => {}
            Err(e) => tracing::error!("expiring routes failed: {e}"),
        }
    }
}

/// A task that runs until the runtime stops.
async fn forever(f: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    f.await;
    Ok(())
}

async fn control_loop(
    cp: &Arc<ControlPlane>,
    workers: &Workers,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let dispatcher = cp.dispatcher();
    let mut sigterm =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut tick = tokio::time::interval(TICK_EVERY);
    let mut log = tokio::time::interval_at(tokio::time::Instant::now() + LOG_EVERY, LOG_EVERY);
    let mut logged = Totals::default();
    let result = loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break Ok(()) }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break Ok(()) }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading the config file");
                // It may scan the route table (a removal): on the blocking pool.
                let cp = cp.clone();
                match tokio::task::spawn_blocking(move || cp.reload()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("{e}"),
                    Err(e) => tracing::error!("the reload failed: {e}"),
                }
            }
            Some(done) = tasks.join_next() => {
                break match done {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Err(anyhow::anyhow!("a control-plane task ended unexpectedly")),
                    Err(e) => Err(anyhow::anyhow!("a control-plane task failed: {e}")),
                };
            }
            _ = tick.tick() => cp.tick(),
            _ = log.tick() => {
                let totals = Totals::sum(workers.counters().iter().map(|c| &**c));
                if totals != logged {
                    tracing::info!("{}; {totals}", route_summary(dispatcher));
                    logged = totals;
                }
            }
        }
    };
    tracing::info!("{} at stop", route_summary(dispatcher));
    result
}

fn route_summary(dispatcher: &Dispatcher) -> String {
    let removed = dispatcher.removed_totals();
    format!(
        "routes live={} expired={} evicted={}",
        dispatcher.routes().len(),
        removed.expired,
        removed.evicted
    )
}

/// What `fep --check` prints: the settings and each service's transfer table.
/// What `fep --check` prints: [`describe`], once the key and token files
/// the config names have been read (a missing or bad one is an error).
pub fn check(cfg: &FepConfig) -> anyhow::Result<String> {
    Secrets::load(cfg)?;
    Ok(describe(cfg))
}

pub fn describe(cfg: &FepConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config OK: tun {}, {} worker(s), route idle timeout {} s, max {} routes, policy table {}",
        cfg.tun, cfg.workers, cfg.route_idle_timeout_s, cfg.max_routes, cfg.policy_table
    );
    if cfg.fast_path != fep_shared::FastPath::Off {
        let _ = match crate::fast_path::built_in() {
            true => writeln!(
                out,
                "fast path: tc-bpf (established routes forwarded in the kernel)"
            ),
            false => writeln!(
                out,
                "fast path: tc-bpf, NOT available: {}",
                crate::fast_path::FastPathError::NotBuilt
            ),
        };
    }
    for s in &cfg.services {
        let scheduler = s.scheduler.as_str();
        let vip = std::net::SocketAddr::new(s.vip, s.port);
        let _ = writeln!(
            out,
            "service {}: {} {vip}, scheduler {scheduler}, affinity {}",
            s.name,
            s.protocol.as_str(),
            match &s.affinity_group {
                Some(group) => format!("client (group {group})"),
                None => format!("{:?}", s.affinity).to_lowercase(),
            }
        );
        let total: u64 = s.backends.iter().map(|b| u64::from(b.ratio)).sum();
        if total == 0 {
            let _ = writeln!(
                out,
                "  (no back end with a ratio above 0: new flows are {})",
                if s.protocol == fep_shared::Protocol::Tcp && s.refuse_when_full {
                    "refused with a RST"
                } else {
                    "dropped"
                }
            );
        }
        for b in &s.backends {
            let node = cfg
                .node(&b.node)
                .expect("validated config names only defined nodes");
            let share = if total == 0 {
                0.0
            } else {
                100.0 * f64::from(b.ratio) / total as f64
            };
            let _ = writeln!(
                out,
                "  {:<12} {:<40} ratio {:>4}  {share:5.1}% of new routes",
                b.node,
                std::net::SocketAddr::new(node.address, s.backend_port(b)).to_string(),
                b.ratio
            );
        }
    }
    if let Some(sites) = &cfg.sites {
        let names: Vec<&str> = sites.sites.iter().map(|s| s.name.as_str()).collect();
        let dns = sites.dns.as_ref().map_or("no DNS server".to_string(), |d| {
            let listen: Vec<String> = d.listen.iter().map(|a| a.to_string()).collect();
            format!("DNS for {} on {}", d.zone, listen.join(", "))
        });
        let _ = writeln!(
            out,
            "sites: this is '{}' of {} ({}); exchange on {}; {dns}; redirects {}",
            sites.me,
            names.len(),
            names.join(", "),
            sites.listen,
            if sites.redirect { "on" } else { "off" }
        );
        for n in &sites.names {
            let at: Vec<&str> = n.sites.iter().map(|a| a.site.as_str()).collect();
            let _ = writeln!(
                out,
                "  name {}: port {}, TTL {} s, OHW {:?}, at {}",
                n.name,
                n.port,
                n.ttl_s,
                n.ohw,
                at.join(", ")
            );
        }
    }
    out
}
