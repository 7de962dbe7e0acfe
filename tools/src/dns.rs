//! A minimal DNS stub for the demo: one A query over UDP, the answer's
//! addresses in order (wire format by hickory-proto).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

/// Asks `server` for `name`'s A records; the addresses in answer order.
pub fn query_a(server: SocketAddr, name: &str, timeout: Duration) -> anyhow::Result<Vec<IpAddr>> {
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let sock = UdpSocket::bind(match server {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    })?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(&q.to_vec()?, server)?;
    let mut buf = [0u8; 1500];
    let (n, _) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("no DNS answer from {server}"))?;
    let reply = Message::from_vec(&buf[..n])?;
    if reply.metadata.id != q.metadata.id {
        bail!("an answer to another query from {server}");
    }
    Ok(reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect())
}
