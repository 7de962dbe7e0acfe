//! Files written so that a crash leaves the old or the new one, never half:
//! a temporary file, fsync, rename, fsync of the directory.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` (in `dir`) atomically.
pub fn write(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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
