//! The route journal: every route that becomes confirmed (a completed TCP
//! handshake, a UDP flow answered and followed up) is appended to
//! `state_dir/routes.journal` within [`FLUSH_EVERY`], between the route
//! snapshots. A start after a crash (`kill -9`) restores the snapshot and
//! the journal on top of it, so connections opened after the last snapshot
//! keep their back end too. Appends go to the page cache without fsync: a
//! killed process loses nothing written, only a host crash would (and takes
//! the connections with it).
//!
//! Every [`SNAPSHOT_EVERY`] the journal is checkpointed: it is renamed to
//! `routes.journal.old` (new records go to a fresh file), the snapshot is
//! written, and the old journal removed — a crash at any point leaves the
//! snapshot plus every record written since it was taken.
//!
//! Format: `b"FEPJ"`, version u8 = 1, then records: service name, node name
//! (each u16 length + UTF-8), client address 16 bytes, client port u16
//! (big endian), state u8. A record cut short by a crash ends the file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::copies::Copies;
use super::snapshot::{self, put_name, Reader, SNAPSHOT_EVERY};
use super::state::Unusable;
use crate::dispatcher::{Confirmed, Dispatcher};
use crate::routes::state;
use crate::wire::Addr;

/// How often confirmed routes are appended to the journal.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
const MAGIC: &[u8; 4] = b"FEPJ";
const VERSION: u8 = 1;
/// The state a journalled route is restored with: confirmed, answered.
const RESTORED_STATE: u8 = state::ESTABLISHED | state::REPLIED;

fn current(dir: &Path) -> PathBuf {
    dir.join("routes.journal")
}

fn old(dir: &Path) -> PathBuf {
    dir.join("routes.journal.old")
}

/// The journal files a start reads, older first.
pub fn paths(dir: &Path) -> [PathBuf; 2] {
    [old(dir), current(dir)]
}

/// Checks that `bytes` start as a journal this fep can read (the records
/// are read as far as they go: a crash may cut the last one short).
pub fn check(bytes: &[u8]) -> Result<(), Unusable> {
    match (bytes.get(..4), bytes.get(4)) {
        (Some(magic), Some(&v)) if magic == MAGIC && v == VERSION => Ok(()),
        (Some(magic), Some(&v)) if magic == MAGIC && v > VERSION => Err(Unusable::Newer {
            found: v.into(),
            supported: VERSION.into(),
        }),
        _ => Err(Unusable::Damaged("not a route journal".into())),
    }
}

/// A journalled route: (service, client, client port) → node.
type Entries = HashMap<(String, Addr, u16), String>;

/// Reads one journal file into `entries` (a later record of a key wins);
/// how many records it held.
fn read_into(path: &Path, entries: &mut Entries) -> std::io::Result<usize> {
    let bytes = std::fs::read(path)?;
    check(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut r = Reader(&bytes[MAGIC.len() + 1..]);
    let mut n = 0;
    while !r.0.is_empty() {
        let record = (|| {
            let service = r.name()?;
            let node = r.name()?;
            let client: Addr = r.take(16)?.try_into().ok()?;
            let port = r.u16()?;
            r.take(1)?;
            Some(((service, client, port), node))
        })();
        let Some((key, node)) = record else {
            tracing::info!(
                "{}: the last record was cut short (fep stopped while writing it)",
                path.display()
            );
            break;
        };
        entries.insert(key, node);
        n += 1;
    }
    Ok(n)
}

/// Restores the routes journalled since the last snapshot (before the
/// snapshot itself, which is older); returns how many. True in the second
/// place when a journal was found, so that [`Journal::open`] checkpoints.
pub fn restore(dispatcher: &Dispatcher, dir: &Path, now: u32) -> (usize, bool) {
    let mut entries = Entries::new();
    let mut found = false;
    for path in paths(dir) {
        match read_into(&path, &mut entries) {
            Ok(_) => found = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                found = true;
                tracing::error!("cannot read the route journal {}: {e}", path.display());
            }
        }
    }
    let table = dispatcher.table();
    let rows = entries
        .iter()
        .filter_map(|((service, client, port), node)| {
            snapshot::named_row(&table, service, node, *client, *port, RESTORED_STATE, now)
        });
    let restored = dispatcher.routes().import(&table, rows);
    if found {
        tracing::info!(
            "restored {restored} route(s) from the route journal ({} record(s))",
            entries.len()
        );
    }
    (restored, found)
}

/// The journal being written, with the checkpoints that keep it short.
pub struct Journal {
    dispatcher: Arc<Dispatcher>,
    dir: PathBuf,
    file: Option<std::fs::File>,
    buf: Vec<u8>,
    last_checkpoint: Instant,
    /// Write failures are logged once until a write succeeds again.
    failing: bool,
    /// Where grouped UDP routes are noted for their back ends' copies (with
    /// VIP groups only).
    copies: Option<Arc<Copies>>,
}

impl Journal {
    /// Starts journalling into `dir`. `restored_from_journal` (from
    /// [`restore`]) checkpoints first, so that what was restored is in the
    /// snapshot before the old journal goes.
    pub fn open(
        dispatcher: Arc<Dispatcher>,
        dir: &Path,
        restored_from_journal: bool,
        copies: Option<Arc<Copies>>,
    ) -> Self {
        let mut j = Journal {
            dispatcher,
            dir: dir.to_path_buf(),
            file: None,
            buf: Vec::new(),
            last_checkpoint: Instant::now(),
            failing: false,
            copies,
        };
        if restored_from_journal {
            j.checkpoint();
        } else {
            j.file = j.create(&current(dir));
        }
        j
    }

    fn create(&mut self, path: &Path) -> Option<std::fs::File> {
        let made = std::fs::create_dir_all(&self.dir).and_then(|()| {
            let mut f = std::fs::File::create(path)?;
            f.write_all(MAGIC)?;
            f.write_all(&[VERSION])?;
            Ok(f)
        });
        match made {
            Ok(f) => Some(f),
            Err(e) => {
                self.failed(&format!("cannot create {}: {e}", path.display()));
                None
            }
        }
    }

    fn failed(&mut self, what: &str) {
        if !self.failing {
            tracing::error!(
                "route journal: {what} (routes confirmed since the last snapshot would not \
                 survive a crash of fep)"
            );
        }
        self.failing = true;
    }

    /// Appends the routes confirmed since the last call (and notes them,
    /// and the routes that ended, for the copies).
    pub fn flush(&mut self) {
        let table = self.dispatcher.table();
        let buf = &mut self.buf;
        buf.clear();
        let copies = self.copies.as_deref();
        self.dispatcher
            .take_confirmed(|c @ Confirmed { key, backend }| {
                if let Some(copies) = copies {
                    copies.note(&table, c, true);
                }
                let svc = table.service(key.service);
                let Some(be) = svc.backends.get(usize::from(backend)) else {
                    return;
                };
                put_name(buf, &svc.name);
                put_name(buf, &be.node);
                buf.extend_from_slice(&key.client);
                buf.extend_from_slice(&key.client_port.to_be_bytes());
                buf.push(RESTORED_STATE);
            });
        if let Some(copies) = copies {
            self.dispatcher
                .take_ended(|c| copies.note(&table, c, false));
        }
        if self.buf.is_empty() {
            return;
        }
        let Some(file) = &mut self.file else {
            return;
        };
        match file.write_all(&self.buf) {
            Ok(()) => self.failing = false,
            Err(e) => {
                let path = current(&self.dir);
                self.failed(&format!("cannot append to {}: {e}", path.display()));
            }
        }
    }

    /// Saves the snapshot and starts a fresh journal, in the order that
    /// keeps every route in one of them at every moment.
    pub fn checkpoint(&mut self) {
        self.flush();
        self.last_checkpoint = Instant::now();
        let (cur, old) = (current(&self.dir), old(&self.dir));
        self.file = None;
        if let Err(e) = std::fs::rename(&cur, &old) {
            if e.kind() != std::io::ErrorKind::NotFound {
                self.failed(&format!("cannot rename {}: {e}", cur.display()));
            }
        }
        self.file = self.create(&cur);
        match snapshot::save(&self.dispatcher, &self.dir) {
            Ok(n) => {
                tracing::debug!("saved {n} route(s)");
                let _ = std::fs::remove_file(&old);
            }
            Err(e) => tracing::error!(
                "cannot save the route table to {}: {e} (the journal is kept; a restart \
                 restores from it)",
                snapshot::path(&self.dir).display()
            ),
        }
    }

    /// The last checkpoint, at a stop once the workers are gone: the
    /// snapshot then holds every route and no journal is left.
    pub fn finish(mut self) {
        self.checkpoint();
        self.file = None;
        let _ = std::fs::remove_file(current(&self.dir));
    }

    /// Runs the journal on its own thread until `stop` is set; the thread
    /// gives the journal back for [`Journal::finish`].
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<Journal>> {
        std::thread::Builder::new()
            .name("fep-journal".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(FLUSH_EVERY);
                    if self.last_checkpoint.elapsed() >= SNAPSHOT_EVERY {
                        self.checkpoint();
                    } else {
                        self.flush();
                    }
                }
                self
            })
    }
}

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use super::*;
    use crate::dispatcher::Worker;

    fn packet(n: u8, flags: u8) -> Vec<u8> {
        let mut p = Vec::new();
        let b = etherparse::PacketBuilder::ipv4([192, 0, 2, n], [10, 0, 0, 100], 64).tcp(
            1000 + u16::from(n),
            80,
            1,
            100,
        );
        let b = if flags == 0 { b.syn() } else { b.ack(1) };
        b.write(&mut p, &[]).unwrap();
        p
    }

    #[test]
    fn routes_confirmed_after_the_last_snapshot_come_back_from_the_journal() {
        let dir = std::env::temp_dir().join(format!("fep-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = FepConfig::parse(crate::testing::CONFIG).unwrap();
        let d = Arc::new(Dispatcher::new(&cfg));
        let mut w = Worker::new(Default::default());
        let mut j = Journal::open(d.clone(), &dir, false, None);
        // Two connections before the checkpoint, three after; one embryonic.
        for n in 0..6u8 {
            if n == 2 {
                j.checkpoint();
            }
            d.process(&mut packet(n, 0), 0, &mut w);
            if n != 5 {
                d.process(&mut packet(n, 1), 0, &mut w);
            }
        }
        j.flush();
        // A crash: no finish. The snapshot holds 2 routes, the journal 3.
        drop(j);
        let d2 = Dispatcher::new(&cfg);
        let (from_journal, found) = restore(&d2, &dir, 0);
        assert!(found);
        assert_eq!(from_journal, 3);
        assert_eq!(snapshot::restore(&d2, &dir, 0), 2);
        for n in 0..5u8 {
            let key = crate::routes::FlowKey {
                service: 0,
                client_port: 1000 + u16::from(n),
                client: crate::wire::addr_from_ip([192, 0, 2, n].into()),
            };
            let (a, b) = (d.routes().backend_of(&key), d2.routes().backend_of(&key));
            assert!(a.is_some() && a == b, "route {n}: {a:?} then {b:?}");
        }
        // A journal cut mid-record still gives the records before it.
        let bytes = std::fs::read(current(&dir)).unwrap();
        std::fs::write(current(&dir), &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(restore(&Dispatcher::new(&cfg), &dir, 0).0, 2);
        // A file that is no journal, or a newer one's, is refused at the start.
        assert!(matches!(check(b"nonsense"), Err(Unusable::Damaged(_))));
        assert!(matches!(
            check(b"FEPJ\x02"),
            Err(Unusable::Newer { found: 2, .. })
        ));
        // A clean stop leaves the snapshot and no journal.
        let j = Journal::open(Arc::new(d2), &dir, true, None);
        j.finish();
        assert!(!current(&dir).exists() && !old(&dir).exists());
        assert_eq!(
            snapshot::restore(&Dispatcher::new(&cfg), &dir, 0),
            5,
            "the checkpoint at the start saved what the journal restored"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
