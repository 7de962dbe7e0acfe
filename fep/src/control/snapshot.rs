//! The assigned-route table saved to `state_dir/routes.bin` (at shutdown and
//! every [`SNAPSHOT_EVERY`]) and restored at start, so that a restart of fep
//! moves no connection. Written atomically; keyed by service and node names
//! (slots are not stable across restarts).
//!
//! Format (big endian): `b"FEPR"`, version u8 = 1; u16 count then that many
//! service names (u16 length + UTF-8); the same for node names; u32 count
//! then records of service index u16, node index u16, client address 16
//! bytes, client port u16, state u8.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::state::Unusable;
use crate::dispatcher::Dispatcher;
use crate::routes::{FlowKey, Route, Row};
use crate::transfer_table::TransferTable;
use crate::wire::Addr;

/// How often the route table is saved while fep runs.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
const MAGIC: &[u8; 4] = b"FEPR";
const VERSION: u8 = 1;
const RECORD: usize = 2 + 2 + 16 + 2 + 1;
// Name lengths are stored as u16: the config check keeps names within that.
const _: () = assert!(fep_shared::config::MAX_NAME_LEN <= u16::MAX as usize);

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("routes.bin")
}

/// Interns names, in first-seen order.
#[derive(Default)]
struct Names(Vec<String>, HashMap<String, u16>);

impl Names {
    fn index(&mut self, name: &str) -> u16 {
        if let Some(&i) = self.1.get(name) {
            return i;
        }
        let i = self.0.len() as u16;
        self.0.push(name.to_string());
        self.1.insert(name.to_string(), i);
        i
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u16).to_be_bytes());
        for n in &self.0 {
            put_name(out, n);
        }
    }
}

/// Writes a name as [`Reader::name`] reads it.
pub(super) fn put_name(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// The route table as bytes.
pub fn encode(dispatcher: &Dispatcher) -> Vec<u8> {
    encode_rows(&dispatcher.table(), dispatcher.routes().export(|_| true))
}

/// `rows` (routes of `table`) as a route snapshot: what another front end
/// imports with [`decode_into`] too.
pub fn encode_rows(table: &TransferTable, rows: impl IntoIterator<Item = Row>) -> Vec<u8> {
    let (mut services, mut nodes) = (Names::default(), Names::default());
    let mut records = Vec::new();
    for Row { key, route } in rows {
        let svc = table.service(key.service);
        let Some(be) = svc.backends.get(usize::from(route.backend)) else {
            continue;
        };
        records.extend_from_slice(&services.index(&svc.name).to_be_bytes());
        records.extend_from_slice(&nodes.index(&be.node).to_be_bytes());
        records.extend_from_slice(&key.client);
        records.extend_from_slice(&key.client_port.to_be_bytes());
        records.push(route.state());
    }
    let mut out = Vec::with_capacity(records.len() + 64);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    services.write(&mut out);
    nodes.write(&mut out);
    out.extend_from_slice(&((records.len() / RECORD) as u32).to_be_bytes());
    out.extend_from_slice(&records);
    out
}

/// Saves the route table atomically.
pub fn save(dispatcher: &Dispatcher, state_dir: &Path) -> std::io::Result<usize> {
    let bytes = encode(dispatcher);
    crate::atomic_file::write(state_dir, &path(state_dir), &bytes)?;
    Ok((bytes.len().saturating_sub(5)) / RECORD)
}

/// A cursor that fails instead of panicking on short input.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(super) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A name: u16 length, then UTF-8.
    pub(super) fn name(&mut self) -> Option<String> {
        let len = usize::from(self.u16()?);
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn names(&mut self) -> Option<Vec<String>> {
        let n = self.u16()?;
        (0..n).map(|_| self.name()).collect()
    }
}

/// A snapshot whose structure has been checked: every record is whole and
/// names a service and a node of the snapshot's lists.
struct Parsed<'a> {
    services: Vec<String>,
    nodes: Vec<String>,
    records: &'a [u8],
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, Unusable> {
    let damaged = |what: &str| Unusable::Damaged(what.to_string());
    let mut r = Reader(bytes);
    if r.take(4) != Some(&MAGIC[..]) {
        return Err(damaged("not a route snapshot (no FEPR header)"));
    }
    let version = r.take(1).ok_or_else(|| damaged("no version"))?[0];
    if version > VERSION {
        return Err(Unusable::Newer {
            found: version.into(),
            supported: VERSION.into(),
        });
    }
    if version != VERSION {
        return Err(damaged(&format!("unknown format version {version}")));
    }
    let services = r
        .names()
        .ok_or_else(|| damaged("cut short in the service names"))?;
    let nodes = r
        .names()
        .ok_or_else(|| damaged("cut short in the node names"))?;
    let count = r
        .take(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| damaged("cut short before the route count"))?;
    let records = r
        .take(count.saturating_mul(RECORD))
        .ok_or_else(|| damaged(&format!("cut short: {count} routes announced")))?;
    if !r.0.is_empty() {
        return Err(damaged(&format!(
            "{} bytes after the last route",
            r.0.len()
        )));
    }
    for (i, rec) in records.chunks_exact(RECORD).enumerate() {
        let (s, n) = (
            u16::from_be_bytes([rec[0], rec[1]]),
            u16::from_be_bytes([rec[2], rec[3]]),
        );
        if usize::from(s) >= services.len() || usize::from(n) >= nodes.len() {
            return Err(damaged(&format!(
                "route {i} names service {s} and node {n} of {} and {}",
                services.len(),
                nodes.len()
            )));
        }
    }
    Ok(Parsed {
        services,
        nodes,
        records,
    })
}

/// Checks that `bytes` is a whole snapshot this fep can read.
pub fn check(bytes: &[u8]) -> Result<(), Unusable> {
    parse(bytes).map(drop)
}

/// Restores the routes in `bytes` whose service and node are still
/// configured; returns how many, or why the bytes are no snapshot.
pub fn decode_into(bytes: &[u8], dispatcher: &Dispatcher, now: u32) -> Result<usize, Unusable> {
    let Parsed {
        services,
        nodes,
        records,
    } = parse(bytes)?;
    let table = dispatcher.table();
    let rows = records.chunks_exact(RECORD).filter_map(|rec| {
        let service = &services[usize::from(u16::from_be_bytes([rec[0], rec[1]]))];
        let node = &nodes[usize::from(u16::from_be_bytes([rec[2], rec[3]]))];
        let mut client = [0u8; 16];
        client.copy_from_slice(&rec[4..20]);
        let port = u16::from_be_bytes([rec[20], rec[21]]);
        named_row(&table, service, node, client, port, rec[22], now)
    });
    Ok(dispatcher.routes().import(&table, rows))
}

/// The row of a route saved by names (service, node), last seen `now`, if
/// both are still configured.
pub(super) fn named_row(
    table: &TransferTable,
    service: &str,
    node: &str,
    client: Addr,
    client_port: u16,
    state: u8,
    now: u32,
) -> Option<Row> {
    let sid = table.service_id(service)?;
    let (bid, _) = table
        .service(sid)
        .live_backends()
        .find(|(_, b)| b.node == node)?;
    Some(Row {
        key: FlowKey {
            service: sid,
            client_port,
            client,
        },
        route: Route::from_parts(bid, state, now),
    })
}

/// Restores the saved route table, if there is one (fep checked it at the
/// start, see [`super::startup`]).
pub fn restore(dispatcher: &Dispatcher, state_dir: &Path, now: u32) -> usize {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(bytes) => match decode_into(&bytes, dispatcher, now) {
            Ok(n) => {
                tracing::info!("restored {n} route(s) from {}", p.display());
                n
            }
            Err(e) => {
                tracing::error!("{} {e}; starting with no routes", p.display());
                0
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::error!("cannot read {}: {e}; starting with no routes", p.display());
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use super::*;
    use crate::dispatcher::Worker;
    use crate::transfer_table::BackendId;

    /// A TCP segment from `src` to `dst` with `flags` (SYN, ACK, FIN bits).
    fn segment(
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        syn: bool,
        ack: bool,
        fin: bool,
    ) -> Vec<u8> {
        let mut b = etherparse::PacketBuilder::ipv4(src.0, dst.0, 64).tcp(src.1, dst.1, 1, 100);
        if syn {
            b = b.syn();
        }
        if ack {
            b = b.ack(1);
        }
        if fin {
            b = b.fin();
        }
        let mut p = Vec::new();
        b.write(&mut p, &[]).unwrap();
        p
    }

    #[test]
    fn a_snapshot_restores_every_route_by_name_with_its_state() {
        let cfg = FepConfig::parse(crate::testing::CONFIG).unwrap();
        let d = Dispatcher::new(&cfg);
        let mut w = Worker::new(Default::default());
        let vip = ([10, 0, 0, 100], 80);
        // Routes in four states: embryonic, answered, established, closing.
        for n in 0..50u8 {
            let client = ([192, 0, 2, n], 1000 + u16::from(n));
            let mut p = segment(client, vip, true, false, false);
            let crate::Verdict::Forward(len) = d.process(&mut p, 0, &mut w) else {
                panic!("SYN {n} not forwarded")
            };
            let be: [u8; 4] = p[16..20].try_into().unwrap();
            let be_port = u16::from_be_bytes([p[22], p[23]]);
            assert_eq!(len, p.len());
            if n % 4 >= 1 {
                let mut p = segment((be, be_port), client, true, true, false);
                assert!(matches!(
                    d.process(&mut p, 1, &mut w),
                    crate::Verdict::Forward(_)
                ));
            }
            if n % 4 >= 2 {
                let mut p = segment(client, vip, false, true, false);
                assert!(matches!(
                    d.process(&mut p, 2, &mut w),
                    crate::Verdict::Forward(_)
                ));
            }
            if n % 4 == 3 {
                let mut p = segment(client, vip, false, true, true);
                assert!(matches!(
                    d.process(&mut p, 3, &mut w),
                    crate::Verdict::Forward(_)
                ));
            }
        }
        let bytes = encode(&d);
        let saved: Vec<_> = d
            .routes()
            .export(|_| true)
            .into_iter()
            .map(|Row { key, route }| {
                (
                    key,
                    d.table().service(0).backends[usize::from(route.backend)]
                        .node
                        .clone(),
                    route.state(),
                )
            })
            .collect();
        assert_eq!(saved.len(), 50);
        let states: std::collections::BTreeSet<u8> = saved.iter().map(|r| r.2).collect();
        assert_eq!(states.len(), 4, "four different states saved: {states:?}");

        // A new fep whose config lists the nodes in the other order.
        let mut cfg2 = cfg.clone();
        cfg2.services[0].backends.reverse();
        let d2 = Dispatcher::new(&cfg2);
        assert_eq!(decode_into(&bytes, &d2, 5).unwrap(), 50);
        let restored: HashMap<FlowKey, (BackendId, u8)> = d2
            .routes()
            .export(|_| true)
            .into_iter()
            .map(|Row { key, route }| (key, (route.backend, route.state())))
            .collect();
        assert_eq!(restored.len(), 50);
        for (key, node, st) in saved {
            let (b, restored_state) = restored[&key];
            assert_eq!(d2.table().service(0).backends[usize::from(b)].node, node);
            assert_eq!(restored_state, st, "the state of {key:?}");
        }
        assert_eq!(
            d2.table()
                .service(0)
                .backends
                .iter()
                .map(|b| b.routes())
                .sum::<u32>(),
            50
        );
        // Garbage, truncation, extra bytes and a newer version are refused
        // with the reason, not a panic, and restore nothing.
        let d3 = Dispatcher::new(&cfg);
        assert!(matches!(
            decode_into(b"nonsense", &d3, 0),
            Err(Unusable::Damaged(_))
        ));
        for cut in 0..bytes.len() {
            assert!(
                matches!(
                    decode_into(&bytes[..cut], &d3, 0),
                    Err(Unusable::Damaged(_))
                ),
                "cut at {cut}"
            );
            assert_eq!(d3.routes().len(), 0, "cut at {cut} restored routes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode_into(&longer, &d3, 0).unwrap_err().to_string(),
            "is damaged: 1 bytes after the last route"
        );
        let mut newer = bytes.clone();
        newer[4] = VERSION + 1;
        assert_eq!(
            decode_into(&newer, &d3, 0).unwrap_err().to_string(),
            "was written by a newer fep (format version 2; this fep reads up to 1)"
        );
        assert_eq!(d3.routes().len(), 0);
        check(&bytes).unwrap();
    }
}
