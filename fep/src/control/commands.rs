//! Operator commands and config changes on a running fep.
//!
//! The config in force (`live`) is the source of truth: every change —
//! `fepctl ratio`, adding or removing a node, back end or service, a reload
//! of the file — produces a new config, validated like the file, and
//! [`ControlPlane::apply`] moves the running system to it: a new transfer
//! table (unchanged things keep their slots, so no route moves), the
//! network set-up reconciled, the model rebuilt with what it knew. A back end
//! or service removed while it carries routes keeps forwarding them (like a
//! drain) until they end, unless the removal is forced.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::MutexGuard;

use fep_shared::config::{MAX_RATIO, MAX_SERVICES};
use fep_shared::{BackendConfig, ConfigError, FepConfig, NodeConfig, ServiceConfig};

use super::model::{Model, NodeState, Pin};
use super::{ControlPlane, State};
use crate::netsetup::NetError;
use crate::routes::{FlowKey, Route};
use crate::transfer_table::{NodeId, TransferTable};

/// The config file as last loaded and the config in force.
#[derive(Debug)]
pub struct Configs {
    pub path: PathBuf,
    pub file: FepConfig,
    pub live: FepConfig,
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
    #[error("{0} already exists")]
    Exists(String),
    #[error("ratio {0} is above the maximum {MAX_RATIO}")]
    BadRatio(u32),
    #[error("node '{node}' is {state} with {routes} route(s); drain it first (fepctl drain {node} --wait) or use --force")]
    NotDrained {
        node: String,
        state: NodeState,
        routes: u32,
    },
    #[error("the change would make the config invalid: {0}")]
    Invalid(ConfigError),
    #[error("changing `{0}` needs a restart of fep; the running config stays")]
    NeedsRestart(&'static str),
    #[error("reload refused, the running config stays: {0}")]
    Reload(ConfigError),
    #[error("fep has used all {MAX_SERVICES} service slots since it started (removed services keep theirs); restart it to start afresh")]
    SlotsExhausted,
    #[error("network set-up: {0}")]
    Net(#[from] NetError),
}

impl CommandError {
    /// True when the request itself is wrong (HTTP 400), not a missing name (404).
    pub fn is_bad_request(&self) -> bool {
        !matches!(
            self,
            CommandError::NoNode { .. }
                | CommandError::NoService { .. }
                | CommandError::NotABackend { .. }
        )
    }
}

/// "a, b, c" for error messages that say what exists.
fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

fn no_node(cfg: &FepConfig, name: &str) -> CommandError {
    CommandError::NoNode {
        name: name.into(),
        known: list(cfg.nodes.iter().map(|n| n.name.as_str())),
    }
}

fn service_mut<'a>(
    cfg: &'a mut FepConfig,
    name: &str,
) -> Result<&'a mut ServiceConfig, CommandError> {
    let known = list(cfg.services.iter().map(|s| s.name.as_str()));
    cfg.services
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or(CommandError::NoService {
            name: name.into(),
            known,
        })
}

impl ControlPlane {
    /// Has the configs and the model's pins and drains saved (on the
    /// saver's thread). The copy is taken and handed over under the state
    /// lock, so saves reach the file in the order they were made.
    pub(crate) fn save(&self) {
        let state = self.state();
        let c = &state.configs;
        self.saver
            .request((c.file.clone(), c.live.clone(), state.model.clone()));
    }

    /// Has VIP routes and rules brought to the current table (removed back
    /// ends drop out once their last route is gone), on the reconciler's
    /// thread.
    pub(crate) fn reconcile_network(&self) {
        self.reconciler.request(());
    }

    /// Moves the running system to `new`. With `force`, routes of removed
    /// back ends and services are deleted; without, they live on until they
    /// end. `state` was locked before `new` was made from the config in
    /// force: commands run on the blocking pool, and two edits must not
    /// start from the same copy (the second would undo the first). `file`:
    /// the config file just read, the base of the next reload.
    fn apply_locked(
        &self,
        mut state: MutexGuard<'_, State>,
        new: FepConfig,
        force: bool,
        file: Option<FepConfig>,
    ) -> Result<(), CommandError> {
        new.validate().map_err(CommandError::Invalid)?;
        if let Some(key) = state.configs.live.restart_key_changed(&new) {
            return Err(CommandError::NeedsRestart(key));
        }
        let previous = self.dispatcher.table();
        let table = TransferTable::build(&new, Some(&previous));
        if table.services().len() > MAX_SERVICES {
            return Err(CommandError::SlotsExhausted);
        }
        self.dispatcher.set_table(table);
        self.dispatcher.set_limits(&new);
        let table = self.dispatcher.table();
        state.model = Model::new(&new, &table, Some(&state.model));
        state.configs.live = new;
        if let Some(file) = file {
            state.configs.file = file;
        }
        drop(state);
        // A pass over the whole table, outside the state lock (a save
        // from the control-plane thread takes it). Only what this change
        // removes: back ends and services removed earlier without `force`
        // keep their live connections.
        if force {
            let removed = |t: &TransferTable, k: &FlowKey, r: &Route| {
                t.services().get(usize::from(k.service)).is_none_or(|svc| {
                    svc.removed
                        || svc
                            .backends
                            .get(usize::from(r.backend))
                            .is_none_or(|b| b.removed)
                })
            };
            let n = self.dispatcher.routes().remove_where(&table, |k, r| {
                removed(&table, k, r) && !removed(&previous, k, r)
            });
            if n > 0 {
                tracing::warn!("forced: deleted {n} route(s) of removed back ends and services");
            }
        }
        self.reconcile_network();
        self.save();
        self.tick();
        Ok(())
    }

    /// Edits a copy of the config in force and applies it.
    fn change(
        &self,
        force: bool,
        edit: impl FnOnce(&mut FepConfig) -> Result<(), CommandError>,
    ) -> Result<(), CommandError> {
        self.change_locked(self.state(), force, edit)
    }

    /// As [`ControlPlane::change`], for a caller that already holds the
    /// state lock (to check something the edit depends on).
    fn change_locked(
        &self,
        state: MutexGuard<'_, State>,
        force: bool,
        edit: impl FnOnce(&mut FepConfig) -> Result<(), CommandError>,
    ) -> Result<(), CommandError> {
        let mut cfg = state.configs.live.clone();
        edit(&mut cfg)?;
        self.apply_locked(state, cfg, force, None)
    }

    /// `fepctl ratio SERVICE NODE N`: affects new routes; idle routes are
    /// pruned until the shares follow.
    pub fn set_ratio(&self, service: &str, node: &str, ratio: u32) -> Result<(), CommandError> {
        if ratio > MAX_RATIO {
            return Err(CommandError::BadRatio(ratio));
        }
        self.change(false, |cfg| {
            if cfg.node(node).is_none() {
                return Err(no_node(cfg, node));
            }
            let svc = service_mut(cfg, service)?;
            let be = svc
                .backends
                .iter_mut()
                .chain(svc.spares.iter_mut())
                .find(|b| b.node == node);
            be.ok_or_else(|| CommandError::NotABackend {
                node: node.into(),
                service: service.into(),
            })?
            .ratio = ratio;
            Ok(())
        })?;
        tracing::info!("ratio of node '{node}' in service '{service}' set to {ratio}");
        Ok(())
    }

    pub fn node_add(
        &self,
        name: &str,
        address: IpAddr,
        agent_address: Option<IpAddr>,
    ) -> Result<(), CommandError> {
        self.change(false, |cfg| {
            if cfg.node(name).is_some() {
                return Err(CommandError::Exists(format!("node '{name}'")));
            }
            cfg.nodes.push(NodeConfig {
                name: name.into(),
                address,
                agent_address,
                stop_when_drained: false,
            });
            Ok(())
        })?;
        tracing::info!("node '{name}' ({address}) added");
        Ok(())
    }

    /// Removes a node, its back ends and spares. Without `force` the node
    /// must be drained with no routes left; the check and the removal
    /// happen under one hold of the state lock, so an `undrain` cannot come
    /// between them and have its new connections cut.
    pub fn node_remove(&self, name: &str, force: bool) -> Result<(), CommandError> {
        let state = self.state();
        let id = state.node_id(name)?;
        let node_state = state.model.node_state(id, self.now());
        let routes = self.routes_of_node(id);
        if !force && (node_state != NodeState::Drained || routes > 0) {
            return Err(CommandError::NotDrained {
                node: name.into(),
                state: node_state,
                routes,
            });
        }
        self.change_locked(state, true, |cfg| {
            cfg.nodes.retain(|n| n.name != name);
            for s in &mut cfg.services {
                s.backends.retain(|b| b.node != name);
                s.spares.retain(|b| b.node != name);
            }
            Ok(())
        })?;
        tracing::info!("node '{name}' removed");
        Ok(())
    }

    pub fn backend_add(
        &self,
        service: &str,
        node: &str,
        ratio: u32,
        port: Option<u16>,
    ) -> Result<(), CommandError> {
        self.change(false, |cfg| {
            if cfg.node(node).is_none() {
                return Err(no_node(cfg, node));
            }
            let svc = service_mut(cfg, service)?;
            if svc
                .backends
                .iter()
                .chain(&svc.spares)
                .any(|b| b.node == node)
            {
                return Err(CommandError::Exists(format!(
                    "back end '{node}' of service '{service}'"
                )));
            }
            svc.backends.push(BackendConfig {
                node: node.into(),
                ratio,
                port,
            });
            Ok(())
        })?;
        tracing::info!("node '{node}' added to service '{service}' with ratio {ratio}");
        Ok(())
    }

    /// Removes a back end; its live routes carry on until they end, unless
    /// `force`.
    pub fn backend_remove(
        &self,
        service: &str,
        node: &str,
        force: bool,
    ) -> Result<(), CommandError> {
        self.change(force, |cfg| {
            let svc = service_mut(cfg, service)?;
            let before = svc.backends.len() + svc.spares.len();
            svc.backends.retain(|b| b.node != node);
            svc.spares.retain(|b| b.node != node);
            if svc.backends.len() + svc.spares.len() == before {
                return Err(CommandError::NotABackend {
                    node: node.into(),
                    service: service.into(),
                });
            }
            Ok(())
        })?;
        tracing::info!("node '{node}' removed from service '{service}'");
        Ok(())
    }

    pub fn service_add(&self, service: ServiceConfig) -> Result<(), CommandError> {
        let name = service.name.clone();
        self.change(false, |cfg| {
            if cfg.services.iter().any(|s| s.name == name) {
                return Err(CommandError::Exists(format!("service '{name}'")));
            }
            cfg.services.push(service);
            Ok(())
        })?;
        tracing::info!("service '{name}' added");
        Ok(())
    }

    /// Removes a service; its live routes carry on until they end (no new
    /// ones), unless `force`.
    pub fn service_remove(&self, name: &str, force: bool) -> Result<(), CommandError> {
        self.change(force, |cfg| {
            service_mut(cfg, name)?;
            cfg.services.retain(|s| s.name != name);
            Ok(())
        })?;
        tracing::info!("service '{name}' removed");
        Ok(())
    }

    /// Re-reads the config file and applies what it changed since it was
    /// last loaded; runtime changes to anything else stay. An invalid file is
    /// refused with the reason and the running config stays.
    pub fn reload(&self) -> Result<(), CommandError> {
        let path = self.state().configs.path.clone();
        // Read outside the lock; merged under it with the configs in force.
        let file = FepConfig::load(&path).map_err(CommandError::Reload)?;
        let state = self.state();
        let merged = FepConfig::merge(&state.configs.file, &file, &state.configs.live);
        match self.apply_locked(state, merged, false, Some(file)) {
            Ok(()) => {
                tracing::info!("reloaded {}", path.display());
                Ok(())
            }
            Err(CommandError::Invalid(e)) => Err(CommandError::Reload(e)),
            Err(e) => Err(e),
        }
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
        if let Some(r) = pin.ratio.filter(|&r| r > MAX_RATIO) {
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
            // One lock for the lookup and the change: a node removed meanwhile
            // would leave the id naming another node.
            let mut state = self.state();
            let id = state.node_id(node)?;
            f(&mut state.model, id);
        }
        self.save();
        self.tick();
        Ok(())
    }
}

impl State {
    /// The id of node `name`, or an error naming the nodes there are.
    fn node_id(&self, name: &str) -> Result<NodeId, CommandError> {
        self.model
            .node_id(name)
            .ok_or_else(|| no_node(&self.configs.live, name))
    }
}
