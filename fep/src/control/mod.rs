//! The control plane: everything that decides, kept apart from the data
//! path (as in Katran). It owns the [`model::Model`], takes agent reports,
//! health checks and operator commands, and publishes the outcome to the
//! data path as effective ratios and loads in the transfer table, as new
//! transfer tables when the config changes, and as route deletions (failed
//! nodes, pruning of idle routes).

pub mod agents;
pub mod cluster;
pub mod commands;
pub mod controller;
pub mod copies;
pub mod health;
pub mod journal;
pub mod latest;
pub mod model;
pub mod peers;
pub mod prune;
pub mod snapshot;
pub mod startup;
pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fep_shared::protocol::FepMsg;
use fep_shared::FepConfig;

pub use commands::CommandError;

use crate::clock::Clock;
use crate::dispatcher::Dispatcher;
use crate::holds::{GroupId, Replayed};
use crate::netsetup::NetSetup;
use crate::transfer_table::NodeId;
use agents::AgentLink;
use latest::Latest;
use model::{Event, Model};

/// The control plane runs on one thread (a current-thread runtime) that
/// serves agents, health checks and the admin API; blocking work goes
/// elsewhere: `ip` calls and state-file fsyncs to their own [`Latest`]
/// threads, passes over the route table to the blocking pool.
///
/// What decides is behind one lock, [`State`]; the two others, the agent
/// links and the reject counts, are leaves: never taken while another lock
/// is held, and nothing is locked while they are, so there is no order to
/// keep.
pub struct ControlPlane {
    state: Mutex<State>,
    dispatcher: Arc<Dispatcher>,
    clock: Clock,
    agents: Mutex<HashMap<NodeId, AgentLink>>,
    /// Rejected agent frames and connections, by reason.
    rejects: Mutex<BTreeMap<&'static str, u64>>,
    /// Writes `state_dir/state.json`: the file, the config in force, the
    /// model's pins and drains.
    saver: Latest<(FepConfig, FepConfig, Model)>,
    /// Brings the host's VIP routes and rules to the transfer table in
    /// force when it runs (so never to an older one).
    reconciler: Latest<()>,
    prune_interval_ms: u64,
    /// Pruning rounds that had routes to look at, and routes they deleted.
    prune_cycles: AtomicU64,
    routes_pruned: AtomicU64,
    /// Ends a VIP group's hold, replaying its packets into the TUN device.
    replayer: Mutex<Replayer>,
    /// The other front ends, where planned moves are set up (set once, at
    /// the start).
    peers: std::sync::OnceLock<peers::Peers>,
}

/// Replays a held VIP group's packets (the TUN shell's replayer).
pub type Replayer = Box<dyn FnMut(GroupId) -> Replayed + Send>;

/// What the control plane drives in the data path: the dispatcher's
/// tables, and the replay of held packets into the TUN device.
pub struct DataPath {
    pub dispatcher: Arc<Dispatcher>,
    pub replayer: Replayer,
}

/// The control state: the model and the configs it was built from change
/// together (a config change rebuilds the model), so one lock holds both.
pub(crate) struct State {
    pub(crate) model: Model,
    /// The config file as last loaded, and the config in force.
    configs: commands::Configs,
    /// Nodes whose live connections were asked for since the start (or
    /// since a VIP group of theirs arrived).
    rebuilt: HashSet<NodeId>,
    groups: cluster::Groups,
}

impl ControlPlane {
    /// The control plane for `live` (the config in force: `file`, read from
    /// `config_path`, plus saved runtime changes), driving `data`, with the
    /// host's network set up by `net`. Fails only if its threads cannot be
    /// started.
    pub fn new(
        config_path: &Path,
        file: FepConfig,
        live: FepConfig,
        saved: &state::Saved,
        data: DataPath,
        net: NetSetup,
        clock: Clock,
    ) -> std::io::Result<Self> {
        let DataPath {
            dispatcher,
            replayer,
        } = data;
        let prune_interval_ms = live.prune_interval_ms;
        let groups = cluster::Groups::new(&live);
        let mut model = Model::new(&live, &dispatcher.table(), None);
        saved.restore_nodes(&mut model);
        let file_state = state::StateFile::new(&live.state_dir);
        let saver = Latest::spawn("fep-state", move |(base, live, m): (_, _, Model)| {
            if let Err(e) = file_state.save(&base, &live, &m) {
                tracing::error!("{e}");
            }
        });
        let (mut net, current) = (net, dispatcher.clone());
        let reconciler = Latest::spawn("fep-netsetup", move |()| {
            if let Err(e) = net.reconcile(&current.table()) {
                tracing::error!("{e}");
            }
        });
        let (saver, reconciler) = match (saver, reconciler) {
            (Ok(s), Ok(r)) => (s, r),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let cp = ControlPlane {
            state: Mutex::new(State {
                model,
                configs: commands::Configs {
                    path: config_path.to_path_buf(),
                    file,
                    live,
                },
                rebuilt: HashSet::new(),
                groups,
            }),
            dispatcher,
            clock,
            agents: Mutex::new(HashMap::new()),
            rejects: Mutex::new(BTreeMap::new()),
            saver,
            reconciler,
            prune_interval_ms,
            prune_cycles: AtomicU64::new(0),
            routes_pruned: AtomicU64::new(0),
            replayer: Mutex::new(replayer),
            peers: std::sync::OnceLock::new(),
        };
        cp.save();
        cp.tick();
        Ok(cp)
    }

    /// At exit: finishes the state saves and network changes asked for (the
    /// network set-up itself stays for the next start, see
    /// [`crate::netsetup`]).
    pub fn stop(&self) {
        self.saver.stop();
        self.reconciler.stop();
    }

    /// Waits (without blocking the thread) until the state file and the
    /// host's network set-up reflect every change made so far.
    pub async fn settled(&self) {
        self.reconciler.settled().await;
        self.saver.settled().await;
    }

    /// The control state. Held for one step and let go before anything
    /// else is locked (the lock is not reentrant: a second `state()` while
    /// one is held would wait forever).
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    pub fn dispatcher_arc(&self) -> Arc<Dispatcher> {
        self.dispatcher.clone()
    }

    /// Pruning rounds that had routes to look at, and routes they deleted.
    pub(crate) fn pruning_totals(&self) -> (u64, u64) {
        (
            self.prune_cycles.load(Ordering::Relaxed),
            self.routes_pruned.load(Ordering::Relaxed),
        )
    }

    /// Sets up planned moves with `peers` (at the start, before serving).
    pub fn set_peers(&self, peers: peers::Peers) {
        if self.peers.set(peers).is_err() {
            tracing::error!("the cluster's peers were set up twice; the first set stays");
        }
    }

    pub(crate) fn peers(&self) -> Option<&peers::Peers> {
        self.peers.get()
    }

    /// Ends a VIP group's hold: its held packets replayed in order.
    fn replay(&self, group: GroupId) -> Replayed {
        (self.replayer.lock().unwrap_or_else(|e| e.into_inner()))(group)
    }

    pub fn now(&self) -> u32 {
        self.clock.now_ms()
    }

    pub(crate) fn reject(&self, kind: &'static str) {
        *self
            .rejects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    /// Rejected agent frames and connections by reason.
    pub fn rejects(&self) -> BTreeMap<&'static str, u64> {
        self.rejects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Routes of a node (open or closing), over all its back ends: a drain
    /// completes when none is left.
    pub fn routes_of_node(&self, node: NodeId) -> u32 {
        self.dispatcher
            .table()
            .services()
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.node_id == node)
            .map(|b| b.routes())
            .sum()
    }

    /// Advances the model and publishes effective ratios and loads; acts on
    /// what changed. Called every 200 ms and after every report or command.
    pub fn tick(&self) {
        let now = self.now();
        let (events, changed) = {
            let mut state = self.state();
            let m = &mut state.model;
            let events = m.tick(now, |n| self.routes_of_node(n));
            let changed = m.publish(&self.dispatcher.table(), now);
            (events, changed)
        };
        for sid in changed {
            tracing::info!(
                "service '{}': effective ratios changed; pruning idle routes until the shares reach them",
                self.dispatcher.table().service(sid).name
            );
        }
        for e in events {
            self.act(e);
        }
        self.reconcile_network();
    }

    fn act(&self, event: Event) {
        let table = self.dispatcher.table();
        match event {
            Event::BackendDown { service, backend } => {
                // A pass over the whole table: on the blocking pool. While
                // its effective ratio stays 0 no new route goes to it, so
                // every route the pass finds is from before it went down.
                let dispatcher = self.dispatcher.clone();
                tokio::task::spawn_blocking(move || {
                    let svc = table.service(service);
                    let be = table.backend(service, backend);
                    let n = dispatcher
                        .routes()
                        .remove_where(&dispatcher.table(), |k, r| {
                            k.service == service
                                && r.backend == backend
                                && dispatcher.table().backend(service, backend).ratio() == 0
                        });
                    tracing::warn!(
                        "node '{}' is down for service '{}': no new routes, {n} route(s) deleted",
                        be.node,
                        svc.name
                    );
                });
            }
            Event::BackendUp { service, backend } => {
                let be = table.backend(service, backend);
                tracing::info!(
                    "node '{}' is up for service '{}'",
                    be.node,
                    table.service(service).name
                );
            }
            Event::StartSpare { node, port } => {
                let name = self.state().model.nodes[usize::from(node)].name.clone();
                tracing::warn!("every back end stays overloaded: asking spare node '{name}' to start port {port}");
                if !self.send(node, FepMsg::Start { port }) {
                    tracing::warn!("spare node '{name}' has no agent connected; it stays a spare");
                    self.state().model.spare_failed(node, port, self.now());
                }
            }
            Event::NodeDrained { node } => {
                let (name, stop) = {
                    let state = self.state();
                    let m = &state.model;
                    let n = &m.nodes[usize::from(node)];
                    (n.name.clone(), n.stop_when_drained)
                };
                tracing::info!("node '{name}' is drained: it holds no routes and is safe to stop");
                self.save();
                if stop {
                    let ports: Vec<u16> = self
                        .state()
                        .model
                        .backends
                        .iter()
                        .filter(|b| b.node == node)
                        .map(|b| b.port)
                        .collect();
                    for port in ports {
                        self.send(node, FepMsg::Stop { port });
                    }
                }
            }
        }
    }
}
