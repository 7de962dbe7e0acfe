//! Runtime changes kept in `state_dir/state.json`, so that a restart of fep
//! does not undo what an operator did: the config in force (the file plus
//! ratios, nodes, back ends and services changed at runtime), the file it
//! was based on, and pins and drains. Written atomically: a temporary file,
//! fsync, rename, fsync of the directory; mode 0600 (it holds addresses), see
//! [`crate::atomic_file`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fep_shared::FepConfig;
use serde::{Deserialize, Serialize};

use super::model::{Model, Pin};

/// The state file's format version; a file of a newer one is refused.
pub const VERSION: u32 = 1;

/// Why a state file (`state.json`, `routes.bin`) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error("cannot be read: {0}")]
    Unreadable(std::io::Error),
    #[error("is damaged: {0}")]
    Damaged(String),
    #[error(
        "was written by a newer fep (format version {found}; this fep reads up to {supported})"
    )]
    Newer { found: u32, supported: u32 },
    #[error("holds runtime changes that no longer fit the config file: {0}")]
    Misfit(String),
}

impl Unusable {
    /// What an operator can do to use the file after all.
    pub fn remedy(&self) -> &'static str {
        match self {
            Unusable::Unreadable(_) => "make it readable by fep",
            Unusable::Damaged(_) => "restore it from a backup",
            Unusable::Newer { .. } => "run the fep version that wrote it",
            Unusable::Misfit(_) => "change the config file so that they fit",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Saved {
    /// The format version; files from before it was recorded are version 1.
    #[serde(default = "first_version")]
    pub version: u32,
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

fn first_version() -> u32 {
    1
}

impl Default for Saved {
    fn default() -> Self {
        Saved {
            version: VERSION,
            base: None,
            live: None,
            pins: BTreeMap::new(),
            draining: Vec::new(),
            drained: Vec::new(),
        }
    }
}

impl Saved {
    /// The config to run: `file`, with the saved runtime changes merged in
    /// (what the file changed since they were made wins); refused when the
    /// merge is not a valid config.
    pub fn live_config(&self, file: &FepConfig) -> Result<FepConfig, Unusable> {
        let (Some(base), Some(live)) = (&self.base, &self.live) else {
            return Ok(file.clone());
        };
        let merged = FepConfig::merge(base, file, live);
        merged
            .validate()
            .map_err(|e| Unusable::Misfit(e.to_string()))?;
        if &merged != file {
            tracing::info!(
                "applying the runtime changes saved in the state directory on top of the config file"
            );
        }
        Ok(merged)
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

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The saved state; a missing file is an empty state.
    pub fn load(&self) -> Result<Saved, Unusable> {
        let text = match std::fs::read(self.path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
            Err(e) => return Err(Unusable::Unreadable(e)),
        };
        decode(&text)
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

/// The state in `text`: the version is read first, so that a newer file is
/// reported as such even where its fields no longer parse.
fn decode(text: &[u8]) -> Result<Saved, Unusable> {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default = "first_version")]
        version: u32,
    }
    let damaged = |e: serde_json::Error| Unusable::Damaged(e.to_string());
    let Version { version } = serde_json::from_slice(text).map_err(damaged)?;
    if version > VERSION {
        return Err(Unusable::Newer {
            found: version,
            supported: VERSION,
        });
    }
    serde_json::from_slice(text).map_err(damaged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fep-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn damaged_newer_and_misfit_state_is_refused_with_the_reason() {
        let file = FepConfig::parse(crate::testing::CONFIG).unwrap();
        let dir = scratch("load");
        let state = StateFile::new(&dir);
        let m = Model::from_config(&file);
        let mut live = file.clone();
        live.services[0].backends[0].ratio = 0;
        state.save(&file, &live, &m).unwrap();
        let text = std::fs::read(state.path()).unwrap();
        let saved = state.load().unwrap();
        assert_eq!(saved.version, VERSION);
        assert_eq!(saved.live_config(&file).unwrap(), live);

        // Cut in half: damaged, with the parser's reason.
        std::fs::write(state.path(), &text[..text.len() / 2]).unwrap();
        let e = state.load().unwrap_err();
        assert!(
            matches!(&e, Unusable::Damaged(r) if r.contains("EOF")),
            "{e}"
        );

        // A newer version is reported as such, even if the rest is foreign.
        std::fs::write(state.path(), br#"{"version": 2, "live": 17}"#).unwrap();
        let e = state.load().unwrap_err();
        assert_eq!(
            e.to_string(),
            "was written by a newer fep (format version 2; this fep reads up to 1)"
        );

        // A file written before the version was recorded reads as version 1.
        std::fs::write(state.path(), br#"{"pins": {}}"#).unwrap();
        assert_eq!(state.load().unwrap().version, 1);

        // Unreadable (a directory where the file should be).
        std::fs::remove_file(state.path()).unwrap();
        std::fs::create_dir(state.path()).unwrap();
        assert!(matches!(state.load(), Err(Unusable::Unreadable(_))));
        std::fs::remove_dir(state.path()).unwrap();
        assert_eq!(state.load().unwrap().base, None, "missing is empty");

        // Saved changes that no longer fit: a node added at runtime, and
        // the file since given another node the same address.
        let node = |name: &str| fep_shared::config::NodeConfig {
            name: name.into(),
            address: "10.0.2.13".parse().unwrap(),
            stop_when_drained: false,
            agent_address: None,
        };
        let base = file.clone();
        let mut live = file.clone();
        live.nodes.push(node("be3"));
        let mut changed = file.clone();
        changed.nodes.push(node("be9"));
        let saved = Saved {
            base: Some(base),
            live: Some(live),
            ..Saved::default()
        };
        let e = saved.live_config(&changed).unwrap_err();
        assert!(
            matches!(&e, Unusable::Misfit(r) if r.contains("already the address of node")),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
