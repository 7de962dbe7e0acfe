//! The control plane: everything that decides, kept apart from the data
//! path (as in Katran). It owns the [`model::Model`], takes agent reports,
//! health checks and operator commands, and publishes the outcome to the
//! data path as effective ratios and loads in the transfer table, and as
//! route deletions (failed nodes, pruning of idle routes).

pub mod agents;
pub mod health;
pub mod model;
pub mod prune;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use fep_shared::protocol::{ConnId, FepMsg};
use fep_shared::FepConfig;
use tokio::sync::{mpsc, oneshot};

use crate::dispatcher::Dispatcher;
use crate::transfer_table::{NodeId, ServiceId};
use crate::tun_io::Clock;
use model::{Event, Model, Pin};

/// A connected agent: where to send it messages, and its pending queries.
#[derive(Debug)]
pub(crate) struct AgentLink {
    /// Distinguishes a reconnection from the link it replaced.
    pub(crate) generation: u64,
    pub(crate) tx: mpsc::UnboundedSender<FepMsg>,
    pub(crate) pending: HashMap<u64, oneshot::Sender<Vec<ConnId>>>,
}

/// An operator command the control plane refuses, with what exists.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no node '{name}'; nodes: {known}")]
    NoNode { name: String, known: String },
    #[error("no service '{name}'; services: {known}")]
    NoService { name: String, known: String },
    #[error("node '{node}' is not a back end or spare of service '{service}'")]
    NotABackend { node: String, service: String },
    #[error("ratio {0} is above the maximum {max}", max = fep_shared::config::MAX_RATIO)]
    BadRatio(u32),
}

pub struct ControlPlane {
    model: Mutex<Model>,
    dispatcher: Arc<Dispatcher>,
    clock: Clock,
    pub(crate) agents: Mutex<HashMap<NodeId, AgentLink>>,
    /// Rejected agent frames and connections, by reason.
    rejects: Mutex<BTreeMap<&'static str, u64>>,
    state: state::StateFile,
    pub(crate) prune_interval_ms: u64,
}

/// "a, b, c" for error messages that say what exists.
fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

impl ControlPlane {
    /// Builds the model from the config and applies the runtime changes saved
    /// in `state_dir`.
    pub fn new(cfg: &FepConfig, dispatcher: Arc<Dispatcher>, clock: Clock) -> Self {
        let cp = ControlPlane {
            model: Mutex::new(Model::from_config(cfg)),
            dispatcher,
            clock,
            agents: Mutex::new(HashMap::new()),
            rejects: Mutex::new(BTreeMap::new()),
            state: state::StateFile::new(&cfg.state_dir),
            prune_interval_ms: cfg.prune_interval_ms,
        };
        cp.state.restore(&mut cp.model());
        cp.tick();
        cp
    }

    pub(crate) fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
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

    /// Live routes of a node, over all its back ends.
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
            let mut m = self.model();
            let events = m.tick(now, |n| self.routes_of_node(n));
            let changed = self.publish(&mut m, now);
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
    }

    /// Writes effective ratios and loads into the transfer table; marks the
    /// services whose ratios changed for pruning and returns them.
    fn publish(&self, m: &mut Model, now: u32) -> Vec<ServiceId> {
        let table = self.dispatcher.table();
        let mut changed = Vec::new();
        for b in &m.backends {
            let be = &table.service(b.service).backends[usize::from(b.index)];
            let ratio = m.effective_ratio(b, now);
            if be.ratio() != ratio {
                be.set_ratio(ratio);
                if !changed.contains(&b.service) {
                    changed.push(b.service);
                }
            }
            be.set_load(m.load(b, now).unwrap_or(0.0));
        }
        for &sid in &changed {
            m.services[usize::from(sid)].pruning = true;
        }
        changed
    }

    fn act(&self, event: Event) {
        let table = self.dispatcher.table();
        match event {
            Event::BackendDown { service, backend } => {
                let be = &table.service(service).backends[usize::from(backend)];
                let n = self
                    .dispatcher
                    .remove_routes(|k, r| k.service == service && r.backend == backend);
                tracing::warn!(
                    "node '{}' is down for service '{}': no new routes, {n} route(s) deleted",
                    be.node,
                    table.service(service).name
                );
            }
            Event::BackendUp { service, backend } => {
                let be = &table.service(service).backends[usize::from(backend)];
                tracing::info!(
                    "node '{}' is up for service '{}'",
                    be.node,
                    table.service(service).name
                );
            }
            Event::StartSpare { node, port } => {
                let name = self.model().nodes[usize::from(node)].name.clone();
                tracing::warn!("every back end stays overloaded: asking spare node '{name}' to start port {port}");
                if !self.send(node, FepMsg::Start { port }) {
                    tracing::warn!("spare node '{name}' has no agent connected; it stays a spare");
                    self.model().spare_failed(node, port);
                }
            }
            Event::NodeDrained { node } => {
                let (name, stop) = {
                    let m = self.model();
                    let n = &m.nodes[usize::from(node)];
                    (n.name.clone(), n.stop_when_drained)
                };
                tracing::info!("node '{name}' is drained: it holds no routes and is safe to stop");
                self.save();
                if stop {
                    let ports: Vec<u16> = self
                        .model()
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

    /// Sends to a node's agent; false when none is connected.
    pub(crate) fn send(&self, node: NodeId, msg: FepMsg) -> bool {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents.get(&node).is_some_and(|a| a.tx.send(msg).is_ok())
    }

    fn save(&self) {
        if let Err(e) = self.state.save(&self.model()) {
            tracing::error!("{e}");
        }
    }

    fn node_id(&self, m: &Model, name: &str) -> Result<NodeId, CommandError> {
        m.node_id(name).ok_or_else(|| CommandError::NoNode {
            name: name.into(),
            known: list(m.nodes.iter().map(|n| n.name.as_str())),
        })
    }

    /// `fepctl ratio SERVICE NODE N`: affects new routes; idle routes are
    /// pruned until the shares follow.
    pub fn set_ratio(&self, service: &str, node: &str, ratio: u32) -> Result<(), CommandError> {
        if ratio > fep_shared::config::MAX_RATIO {
            return Err(CommandError::BadRatio(ratio));
        }
        {
            let mut m = self.model();
            let nid = self.node_id(&m, node)?;
            let sid = m
                .service_id(service)
                .ok_or_else(|| CommandError::NoService {
                    name: service.into(),
                    known: list(m.services.iter().map(|s| s.name.as_str())),
                })?;
            let b = m
                .backend_mut(sid, nid)
                .ok_or_else(|| CommandError::NotABackend {
                    node: node.into(),
                    service: service.into(),
                })?;
            b.configured = ratio;
        }
        tracing::info!("ratio of node '{node}' in service '{service}' set to {ratio}");
        self.save();
        self.tick();
        Ok(())
    }

    pub fn drain(&self, node: &str) -> Result<(), CommandError> {
        self.with_node(node, |m, id| m.drain(id))?;
        tracing::info!("draining node '{node}'");
        Ok(())
    }

    pub fn undrain(&self, node: &str) -> Result<(), CommandError> {
        self.with_node(node, |m, id| m.undrain(id))?;
        tracing::info!("node '{node}' back in rotation");
        Ok(())
    }

    /// Pins the given values (the others stay as they are).
    pub fn pin(&self, node: &str, pin: Pin) -> Result<(), CommandError> {
        if let Some(r) = pin.ratio.filter(|&r| r > fep_shared::config::MAX_RATIO) {
            return Err(CommandError::BadRatio(r));
        }
        self.with_node(node, |m, id| {
            let p = &mut m.nodes[usize::from(id)].pin;
            p.state = pin.state.or(p.state);
            p.load = pin.load.or(p.load);
            p.ratio = pin.ratio.or(p.ratio);
        })?;
        tracing::info!("node '{node}' pinned: {pin:?}");
        Ok(())
    }

    pub fn unpin(&self, node: &str) -> Result<(), CommandError> {
        self.with_node(node, |m, id| m.nodes[usize::from(id)].pin = Pin::default())?;
        tracing::info!("node '{node}' unpinned");
        Ok(())
    }

    fn with_node(
        &self,
        node: &str,
        f: impl FnOnce(&mut Model, NodeId),
    ) -> Result<(), CommandError> {
        {
            let mut m = self.model();
            let id = self.node_id(&m, node)?;
            f(&mut m, id);
        }
        self.save();
        self.tick();
        Ok(())
    }
}
