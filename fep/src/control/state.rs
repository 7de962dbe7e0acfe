//! Runtime changes (ratios, pins, drains) kept in `state_dir/state.json`, so
//! that a restart of fep does not undo what an operator did. Written
//! atomically: a temporary file, fsync, rename, fsync of the directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{Model, Pin};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    /// service → node → ratio, where it differs from the config file.
    #[serde(default)]
    ratios: BTreeMap<String, BTreeMap<String, u32>>,
    #[serde(default)]
    pins: BTreeMap<String, Pin>,
    #[serde(default)]
    draining: Vec<String>,
    #[serde(default)]
    drained: Vec<String>,
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

    /// Saves the model's runtime changes.
    pub fn save(&self, m: &Model) -> Result<(), String> {
        let mut saved = Saved::default();
        for b in m.backends.iter().filter(|b| b.configured != b.config_ratio) {
            saved
                .ratios
                .entry(m.services[usize::from(b.service)].name.clone())
                .or_default()
                .insert(m.nodes[usize::from(b.node)].name.clone(), b.configured);
        }
        for n in &m.nodes {
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
        write_atomically(&self.dir, &self.path(), &text).map_err(|e| {
            format!(
                "cannot save runtime state to {}: {e} (changes hold until fep stops)",
                self.path().display()
            )
        })
    }

    /// Applies saved runtime changes; names the config no longer has are
    /// skipped with a warning, and a damaged file is reported and ignored.
    pub fn restore(&self, m: &mut Model) {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!(
                    "cannot read saved state {}: {e}; starting from the config alone",
                    path.display()
                );
                return;
            }
        };
        let saved: Saved = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "saved state {} is damaged ({e}); starting from the config alone",
                    path.display()
                );
                return;
            }
        };
        for (service, nodes) in &saved.ratios {
            for (node, &ratio) in nodes {
                match (m.service_id(service), m.node_id(node)) {
                    (Some(s), Some(n)) if m.backend_mut(s, n).is_some() => {
                        m.backend_mut(s, n).expect("checked").configured = ratio;
                    }
                    _ => tracing::warn!(
                        "saved ratio for '{node}' in '{service}' no longer applies; skipped"
                    ),
                }
            }
        }
        let mut node = |name: &str, f: &dyn Fn(&mut super::model::Node)| match m.node_id(name) {
            Some(id) => f(&mut m.nodes[usize::from(id)]),
            None => tracing::warn!(
                "saved state names node '{name}', which the config no longer has; skipped"
            ),
        };
        for (name, pin) in &saved.pins {
            node(name, &|n| n.pin = pin.clone());
        }
        for name in &saved.draining {
            node(name, &|n| n.draining = true);
        }
        for name in &saved.drained {
            node(name, &|n| n.drained = true);
        }
        tracing::info!("restored runtime changes from {}", path.display());
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
