//! The state directory at start. fep saves `state.json`, `routes.bin` and the
//! route journal within seconds of starting, so starting without a file it cannot use
//! (unreadable, damaged, of a newer version, or runtime changes that no
//! longer fit the config file) would replace it silently: fep refuses to
//! start instead, unless the operator asks for such files to be set aside
//! (`--discard-state`: renamed to `FILE.discarded-SECONDS`, kept for them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fep_shared::FepConfig;

use super::state::{Saved, StateFile, Unusable};
use super::{journal, snapshot};

/// What fep starts from.
#[derive(Debug)]
pub struct Start {
    /// The saved runtime state (empty when there is none or it was set aside).
    pub saved: Saved,
    /// The config in force: the file plus the saved runtime changes.
    pub live: FepConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}", refusal(.0))]
    Unusable(Vec<(PathBuf, Unusable)>),
    #[error("cannot set {} aside as {}: {source}", path.display(), aside.display())]
    SetAside {
        path: PathBuf,
        aside: PathBuf,
        source: std::io::Error,
    },
}

fn refusal(files: &[(PathBuf, Unusable)]) -> String {
    let mut out = String::new();
    for (path, why) in files {
        let _ = write!(out, "{} {why}; ", path.display());
    }
    let (it, the_files) = match files.len() {
        1 => ("it", "the file"),
        _ => ("them", "the files"),
    };
    let remedies = files
        .iter()
        .map(|(path, why)| format!("{} ({})", why.remedy(), file_name(path)))
        .collect::<Vec<_>>()
        .join("; ");
    let _ = write!(
        out,
        "fep did not start, so as not to overwrite {it}. Either {remedies}, or start fep with \
         --discard-state: it moves {the_files} to FILE.discarded-SECONDS and starts without {it}."
    );
    out
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

/// Whether a file's bytes are usable.
type Check = fn(&[u8]) -> Result<(), Unusable>;

/// Reads and checks the state in `file`'s state directory; with `discard`,
/// sets unusable files aside instead of refusing.
pub fn prepare(file: &FepConfig, discard: bool) -> Result<Start, StartError> {
    let dir = &file.state_dir;
    let state = StateFile::new(dir);
    let mut unusable = Vec::new();
    let start = match state.load().and_then(|saved| {
        let live = saved.live_config(file)?;
        Ok(Start { saved, live })
    }) {
        Ok(start) => start,
        Err(why) => {
            unusable.push((state.path(), why));
            Start {
                saved: Saved::default(),
                live: file.clone(),
            }
        }
    };
    let [old_journal, journal] = journal::paths(dir);
    let routes: [(PathBuf, Check); 3] = [
        (snapshot::path(dir), snapshot::check),
        (old_journal, journal::check),
        (journal, journal::check),
    ];
    for (path, check) in routes {
        match std::fs::read(&path) {
            Ok(bytes) => {
                if let Err(why) = check(&bytes) {
                    unusable.push((path, why));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => unusable.push((path, Unusable::Unreadable(e))),
        }
    }
    if unusable.is_empty() {
        return Ok(start);
    }
    if !discard {
        return Err(StartError::Unusable(unusable));
    }
    for (path, why) in unusable {
        let aside = set_aside(&path)?;
        tracing::warn!(
            "--discard-state: {} {why}; moved it to {} and starting without it",
            path.display(),
            aside.display()
        );
    }
    Ok(start)
}

/// Renames `path` to a name that is not taken: `FILE.discarded-SECONDS`
/// (with `-2`, `-3`, … after it if that exists).
fn set_aside(path: &Path) -> Result<PathBuf, StartError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}.discarded-{secs}", path.display());
    let aside = (1..1000)
        .map(|n| {
            PathBuf::from(if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            })
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| PathBuf::from(base));
    std::fs::rename(path, &aside).map_err(|source| StartError::SetAside {
        path: path.to_path_buf(),
        aside: aside.clone(),
        source,
    })?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::Model;

    fn config(name: &str) -> FepConfig {
        let mut cfg = FepConfig::parse(crate::testing::CONFIG).unwrap();
        cfg.state_dir =
            std::env::temp_dir().join(format!("fep-start-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cfg.state_dir);
        cfg
    }

    /// The files in the state directory other than state.json and routes.bin.
    fn set_aside_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".discarded-"))
            .map(|n| {
                let bytes = std::fs::read(dir.join(&n)).unwrap();
                (n, bytes)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn damaged_state_is_refused_or_set_aside_on_request() {
        let file = config("refuse");
        let dir = file.state_dir.clone();
        // No state directory at all: the config file alone.
        let start = prepare(&file, false).unwrap();
        assert_eq!(start.live, file);

        // A runtime ratio saved, then the file cut in half.
        let mut live = file.clone();
        live.services[0].backends[0].ratio = 0;
        let state = StateFile::new(&dir);
        state
            .save(&file, &live, &Model::from_config(&file))
            .unwrap();
        assert_eq!(prepare(&file, false).unwrap().live, live);
        let text = std::fs::read(state.path()).unwrap();
        let half = &text[..text.len() / 2];
        std::fs::write(state.path(), half).unwrap();
        // A route snapshot of a newer version beside it.
        std::fs::write(snapshot::path(&dir), b"FEPR\x09").unwrap();

        let e = prepare(&file, false).unwrap_err().to_string();
        let state_json = state.path().display().to_string();
        let routes_bin = snapshot::path(&dir).display().to_string();
        assert!(e.contains(&format!("{state_json} is damaged: EOF")), "{e}");
        assert!(
            e.contains(&format!(
                "{routes_bin} was written by a newer fep (format version 9"
            )),
            "{e}"
        );
        assert!(
            e.contains("fep did not start, so as not to overwrite them"),
            "{e}"
        );
        assert!(e.contains("restore it from a backup (state.json)"), "{e}");
        assert!(
            e.contains("run the fep version that wrote it (routes.bin)"),
            "{e}"
        );
        assert!(
            e.contains("or start fep with --discard-state: it moves the files to FILE.discarded-SECONDS and starts without them."),
            "{e}"
        );
        // Refusing touched nothing.
        assert_eq!(std::fs::read(state.path()).unwrap(), half);
        assert!(set_aside_files(&dir).is_empty());

        let start = prepare(&file, true).unwrap();
        assert_eq!(start.live, file, "the config file alone");
        assert!(!state.path().exists() && !snapshot::path(&dir).exists());
        let aside = set_aside_files(&dir);
        assert_eq!(aside.len(), 2, "{aside:?}");
        assert!(aside[0].0.starts_with("routes.bin.discarded-"));
        assert_eq!(aside[0].1, b"FEPR\x09");
        assert!(aside[1].0.starts_with("state.json.discarded-"));
        assert_eq!(aside[1].1, half, "the damaged bytes are kept");

        // Damaged again within the same second: a second name, nothing lost.
        std::fs::write(state.path(), half).unwrap();
        prepare(&file, true).unwrap();
        assert_eq!(set_aside_files(&dir).len(), 3);
        // Usable state is kept even with --discard-state.
        state
            .save(&file, &live, &Model::from_config(&file))
            .unwrap();
        assert_eq!(prepare(&file, true).unwrap().live, live);
        assert_eq!(set_aside_files(&dir).len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn saved_changes_that_no_longer_fit_the_file_are_refused() {
        let file = config("misfit");
        let mut live = file.clone();
        live.nodes[1].address = "10.0.2.13".parse().unwrap();
        let state = StateFile::new(&file.state_dir);
        state
            .save(&file, &live, &Model::from_config(&file))
            .unwrap();
        // The file now gives be1 the address be2 has at runtime.
        let mut changed = file.clone();
        changed.nodes[0].address = "10.0.2.13".parse().unwrap();
        let e = prepare(&changed, false).unwrap_err().to_string();
        assert!(
            e.contains("holds runtime changes that no longer fit the config file")
                && e.contains("change the config file so that they fit (state.json)"),
            "{e}"
        );
        assert_eq!(prepare(&changed, true).unwrap().live, changed);
        std::fs::remove_dir_all(&file.state_dir).unwrap();
    }
}
