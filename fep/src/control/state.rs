//! Runtime changes kept in `state_dir/state.json`, so that a restart of fep
//! does not undo what an operator did: the config in force (the file plus
//! ratios, nodes, back ends and services changed at runtime), the file it
//! was based on, and pins and drains. Written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fep_shared::FepConfig;
use serde::{Deserialize, Serialize};

use super::model::{Model, Pin};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    /// The config file the runtime changes were made on.
    #[serde(default)]
    pub base: Option<FepConfig>,
    /// The config in force: the file plus runtime changes.
    #[serde(default)]
    pub live: Option<FepConfig>,
    #[serde(default)]
    pub pins: BTreeMap<String, Pin>,
    #[serde(default)]
    pub draining: Vec<String>,
    #[serde(default)]
    pub drained: Vec<String>,
}

impl Saved {
    /// The config to run: `file`, with the saved runtime changes merged in
    /// (what the file changed since they were made wins).
    pub fn live_config(&self, file: &FepConfig) -> FepConfig {
        let (Some(base), Some(live)) = (&self.base, &self.live) else {
            return file.clone();
        };
        let merged = FepConfig::merge(base, file, live);
        match merged.validate() {
            Ok(()) => {
                if &merged != file {
                    tracing::info!("applying the runtime changes saved in the state directory on top of the config file");
                }
                merged
            }
            Err(e) => {
                tracing::error!("saved runtime changes no longer fit the config file ({e}); starting from the file alone");
                file.clone()
            }
        }
    }

    /// Puts back saved pins and drains; names the config no longer has are
    /// skipped with a warning.
    pub fn restore_nodes(&self, m: &mut Model) {
        let mut node = |name: &str, f: &dyn Fn(&mut super::model::Node)| match m.node_id(name) {
            Some(id) => f(&mut m.nodes[usize::from(id)]),
            None => tracing::warn!(
                "saved state names node '{name}', which the config no longer has; skipped"
            ),
        };
        for (name, pin) in &self.pins {
            node(name, &|n| n.pin = pin.clone());
        }
        for name in &self.draining {
            node(name, &|n| n.draining = true);
        }
        for name in &self.drained {
            node(name, &|n| n.drained = true);
        }
    }
}

#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        StateFile {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The saved state; missing is empty, damaged is reported and ignored.
    pub fn load(&self) -> Saved {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Saved::default(),
            Err(e) => {
                tracing::error!(
                    "cannot read saved state {}: {e}; starting from the config alone",
                    path.display()
                );
                return Saved::default();
            }
        };
        match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "saved state {} is damaged ({e}); starting from the config alone",
                    path.display()
                );
                Saved::default()
            }
        }
    }

    /// Saves the configs and the model's pins and drains.
    pub fn save(&self, base: &FepConfig, live: &FepConfig, m: &Model) -> Result<(), String> {
        let mut saved = Saved {
            base: Some(base.clone()),
            live: Some(live.clone()),
            ..Saved::default()
        };
        for n in m.nodes.iter().filter(|n| !n.removed) {
            if !n.pin.is_empty() {
                saved.pins.insert(n.name.clone(), n.pin.clone());
            }
            if n.draining {
                saved.draining.push(n.name.clone());
            }
            if n.drained {
                saved.drained.push(n.name.clone());
            }
        }
        let text = serde_json::to_vec_pretty(&saved).expect("state serialises");
        crate::atomic_file::write(&self.dir, &self.path(), &text).map_err(|e| {
            format!(
                "cannot save runtime state to {}: {e} (changes hold until fep stops)",
                self.path().display()
            )
        })
    }
}
