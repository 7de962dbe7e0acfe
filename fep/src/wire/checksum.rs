//! Incremental Internet checksums (RFC 1624) and the one rewrite of a flow's
//! end that both the forwarded packets and the packets embedded in ICMP
//! errors go through.

use super::{addr_bytes, field, Addr, TCP, UDP};

pub(crate) fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

pub(crate) fn write_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// The folded one's-complement sum of `data` (16-bit big-endian words, an
/// odd last byte padded with 0) on top of `init`: for checksums computed
/// whole, where there is nothing to update incrementally.
pub(crate) fn ones_sum(init: u16, data: &[u8]) -> u16 {
    let mut sum = u32::from(init);
    for w in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The one's-complement difference between old and new 16-bit words, to be
/// folded into an Internet checksum (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ChecksumDelta(u32);

impl ChecksumDelta {
    /// Records that the even-length `old` bytes become `new`.
    pub(crate) fn replace(&mut self, old: &[u8], new: &[u8]) {
        debug_assert_eq!(old.len(), new.len());
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            self.0 += u32::from(!u16::from_be_bytes([o[0], o[1]]));
            self.0 += u32::from(u16::from_be_bytes([n[0], n[1]]));
        }
    }

    /// Adds another delta's changes to this one.
    pub(crate) fn merge(&mut self, other: ChecksumDelta) {
        self.0 += other.0;
    }

    /// Adds the change to a plain (not inverted) one's-complement sum, such
    /// as the pseudo-header sum of an offloaded checksum.
    pub(crate) fn add_to(self, sum: u16) -> u16 {
        let mut s = u32::from(sum) + self.0;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    pub(crate) fn apply(self, checksum: u16) -> u16 {
        let mut sum = u32::from(!checksum) + self.0;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
}

/// Which end of a flow a rewrite changes.
#[derive(Debug, Clone, Copy)]
pub(super) enum End {
    Source,
    Destination,
}

/// Where an IP packet's headers are in a buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Headers {
    /// Offset of the IP header.
    pub ip: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// End of what the buffer holds of the packet: an embedded packet may be
    /// cut short before its L4 checksum.
    pub len: usize,
    pub proto: u8,
    pub v4: bool,
}

/// What the L4 checksum field holds.
#[derive(Debug, Clone, Copy)]
pub(super) enum L4Checksum {
    /// The full checksum.
    Full,
    /// Only the pseudo-header sum, which the device finishes over the
    /// segment (checksum offload): ports are not in it, addresses are.
    Partial,
}

/// Rewrites one end's address and port, keeping the L4 checksum (where the
/// buffer holds it) and the IPv4 header checksum right. Returns the change
/// of every byte written, for a checksum that covers the whole packet (the
/// ICMP message an embedded packet sits in). Always inlined: where the
/// caller drops that record (every forwarded packet), its upkeep is dead
/// code the compiler removes — 8 % of a route hit's instructions otherwise.
#[inline(always)]
pub(super) fn rewrite_end(
    buf: &mut [u8],
    at: Headers,
    end: End,
    l4_checksum: L4Checksum,
    addr: &Addr,
    port: u16,
) -> ChecksumDelta {
    let (range, port_at) = match end {
        End::Source => (field::src(at.v4), field::SRC_PORT),
        End::Destination => (field::dst(at.v4), field::DST_PORT),
    };
    let range = at.ip + range.start..at.ip + range.end;
    let port_at = at.l4 + port_at;
    let new_addr = addr_bytes(addr, at.v4);
    let new_port = port.to_be_bytes();

    let mut addr_delta = ChecksumDelta::default();
    addr_delta.replace(&buf[range.clone()], new_addr);
    let mut l4_delta = addr_delta;
    l4_delta.replace(&buf[port_at..port_at + 2], &new_port);
    let mut written = l4_delta;

    let csum_at = at.l4
        + if at.proto == TCP {
            field::TCP_CHECKSUM
        } else {
            field::UDP_CHECKSUM
        };
    if csum_at + 2 <= at.len {
        let old = read_u16(buf, csum_at);
        let new = match l4_checksum {
            L4Checksum::Partial => Some(addr_delta.add_to(old)),
            // An IPv4 UDP checksum of 0 means "none"; it stays that way.
            L4Checksum::Full if at.proto == UDP && at.v4 && old == 0 => None,
            // A UDP checksum that comes out 0 is sent as all ones.
            L4Checksum::Full => Some(match l4_delta.apply(old) {
                0 if at.proto == UDP => 0xffff,
                sum => sum,
            }),
        };
        if let Some(new) = new {
            written.replace(&old.to_be_bytes(), &new.to_be_bytes());
            write_u16(buf, csum_at, new);
        }
    }
    if at.v4 {
        let csum_at = at.ip + field::V4_CHECKSUM.start;
        let old = read_u16(buf, csum_at);
        let new = addr_delta.apply(old);
        written.replace(&old.to_be_bytes(), &new.to_be_bytes());
        write_u16(buf, csum_at, new);
    }
    buf[range].copy_from_slice(new_addr);
    buf[port_at..port_at + 2].copy_from_slice(&new_port);
    written
}
