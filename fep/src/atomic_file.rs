//! Files written so that a crash leaves the old or the new one, never half:
//! a temporary file, fsync, rename, fsync of the directory. They are private
//! (mode 0600, a directory created 0700): state files hold client addresses.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` (in `dir`) atomically, mode 0600.
pub fn write(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A left-over temporary file would keep its mode: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn state_files_are_private_even_over_an_old_temporary_file() {
        let dir = std::env::temp_dir().join(format!("fep-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state.json");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state.json.tmp"), b"left over").unwrap();
        std::fs::set_permissions(
            dir.join("state.json.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write(&dir, &path, b"{}").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert!(!dir.join("state.json.tmp").exists());

        let fresh = dir.join("sub");
        write(&fresh, &fresh.join("routes.bin"), b"x").unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join("routes.bin")), 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
