//! ICMP and ICMPv6 views: echo requests to a VIP (answered by fep) and
//! errors about a tracked flow (translated so that they reach the side that
//! can act on them — path MTU discovery works through the dispatcher).
//!
//! An error carries the IP header and the first 8+ bytes of the packet that
//! caused it. Translating rewrites the outer address and the embedded
//! packet's address and port, keeping the outer IPv4 header checksum, the
//! embedded IPv4 header and L4 checksums (where captured) and the ICMP
//! checksum right, all incrementally.

use etherparse::IpSlice;

use super::checksum::{rewrite_end, End, Headers, L4Checksum};
use super::{
    addr_bytes, field, read_addr, read_u16, write_u16, Addr, ChecksumDelta, ParseError, TCP, UDP,
};

pub const ICMPV4: u8 = 1;
pub const ICMPV6: u8 = 58;

/// What an ICMP message is to the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    EchoRequest,
    /// An error whose embedded TCP/UDP packet starts at `inner` (its IP header).
    Error {
        inner: usize,
        inner_l4: usize,
        inner_proto: u8,
    },
    /// Anything else (echo replies, router and neighbour messages …).
    Other,
}

/// A validated ICMP/ICMPv6 packet in a buffer.
#[derive(Debug)]
pub struct IcmpPacket<'a> {
    buf: &'a mut [u8],
    v4: bool,
    /// Offset of the ICMP header.
    icmp: usize,
    len: usize,
    kind: IcmpKind,
}

/// The embedded packet of an error, as addresses and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inner {
    pub protocol: u8,
    pub src: Addr,
    pub src_port: u16,
    pub dst: Addr,
    pub dst_port: u16,
}

const ICMP_CHECKSUM: usize = 2;

impl<'a> IcmpPacket<'a> {
    pub fn new_checked(buf: &'a mut [u8]) -> Result<Self, ParseError> {
        let (v4, icmp, len) = {
            let ip = IpSlice::from_slice(buf).map_err(|_| ParseError::Malformed)?;
            let p = ip.payload();
            if p.fragmented {
                return Err(ParseError::Fragment);
            }
            let v4 = matches!(ip, IpSlice::Ipv4(_));
            if p.ip_number.0 != if v4 { ICMPV4 } else { ICMPV6 } {
                return Err(ParseError::UnsupportedProtocol);
            }
            if p.payload.len() < 8 {
                return Err(ParseError::Malformed);
            }
            let icmp = p.payload.as_ptr() as usize - buf.as_ptr() as usize;
            (v4, icmp, icmp + p.payload.len())
        };
        let ty = buf[icmp];
        let is_error = if v4 {
            matches!(ty, 3 | 4 | 11 | 12)
        } else {
            matches!(ty, 1..=4)
        };
        let kind = if ty == if v4 { 8 } else { 128 } {
            IcmpKind::EchoRequest
        } else if is_error {
            inner_of(&buf[..len], icmp + 8, v4).unwrap_or(IcmpKind::Other)
        } else {
            IcmpKind::Other
        };
        Ok(IcmpPacket {
            buf,
            v4,
            icmp,
            len,
            kind,
        })
    }

    pub fn kind(&self) -> IcmpKind {
        self.kind
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn src_addr(&self) -> Addr {
        read_addr(&self.buf[self.src_range()], self.v4)
    }

    pub fn dst_addr(&self) -> Addr {
        read_addr(&self.buf[self.dst_range()], self.v4)
    }

    fn src_range(&self) -> std::ops::Range<usize> {
        field::src(self.v4)
    }

    fn dst_range(&self) -> std::ops::Range<usize> {
        field::dst(self.v4)
    }

    /// The embedded packet of an error.
    pub fn inner(&self) -> Option<Inner> {
        let IcmpKind::Error {
            inner,
            inner_l4,
            inner_proto,
        } = self.kind
        else {
            return None;
        };
        let (s, d) = (field::src(self.v4), field::dst(self.v4));
        Some(Inner {
            protocol: inner_proto,
            src: read_addr(&self.buf[inner + s.start..inner + s.end], self.v4),
            src_port: read_u16(self.buf, inner_l4 + field::SRC_PORT),
            dst: read_addr(&self.buf[inner + d.start..inner + d.end], self.v4),
            dst_port: read_u16(self.buf, inner_l4 + field::DST_PORT),
        })
    }

    /// Turns an echo request into its reply: addresses swapped, type set,
    /// hop limit fresh, checksums adjusted.
    pub fn make_echo_reply(&mut self) {
        let (s, d) = (self.src_range(), self.dst_range());
        let mut src = [0u8; 16];
        let n = s.len();
        src[..n].copy_from_slice(&self.buf[s.clone()]);
        self.buf.copy_within(d.clone(), s.start);
        self.buf[d].copy_from_slice(&src[..n]);
        let mut delta = ChecksumDelta::default();
        let old = [self.buf[self.icmp], self.buf[self.icmp + 1]];
        let reply = [if self.v4 { 0 } else { 129 }, old[1]];
        delta.replace(&old, &reply);
        self.buf[self.icmp] = reply[0];
        self.adjust_icmp_checksum(delta);
        if self.v4 {
            // TTL shares a 16-bit word with the protocol.
            let old = [self.buf[8], self.buf[9]];
            self.buf[8] = 64;
            let mut d = ChecksumDelta::default();
            d.replace(&old, &[64, old[1]]);
            let at = field::V4_CHECKSUM.start;
            let c = d.apply(read_u16(self.buf, at));
            write_u16(self.buf, at, c);
        } else {
            self.buf[7] = 64;
        }
    }

    /// Translates an error: the outer source and/or destination, the
    /// embedded source and/or destination (address and port).
    pub fn translate(
        &mut self,
        outer_src: Option<&Addr>,
        outer_dst: Option<&Addr>,
        inner_src: Option<(&Addr, u16)>,
        inner_dst: Option<(&Addr, u16)>,
    ) {
        let IcmpKind::Error {
            inner,
            inner_l4,
            inner_proto,
        } = self.kind
        else {
            return;
        };
        let v4 = self.v4;
        // Changes inside the ICMP message, for its checksum.
        let mut icmp_delta = ChecksumDelta::default();
        let embedded = Headers {
            ip: inner,
            l4: inner_l4,
            len: self.len,
            proto: inner_proto,
            v4,
        };
        for (new, end) in [(inner_src, End::Source), (inner_dst, End::Destination)] {
            let Some((addr, port)) = new else { continue };
            let written = rewrite_end(self.buf, embedded, end, L4Checksum::Full, addr, port);
            icmp_delta.merge(written);
        }
        let (s, d) = (field::src(v4), field::dst(v4));
        // The outer addresses: the IPv4 header checksum, or (IPv6) the
        // ICMPv6 checksum, whose pseudo-header holds them.
        let mut outer_delta = ChecksumDelta::default();
        for (new, range) in [(outer_src, s), (outer_dst, d)] {
            let Some(addr) = new else { continue };
            let new_addr = addr_bytes(addr, v4);
            outer_delta.replace(&self.buf[range.clone()], new_addr);
            self.buf[range].copy_from_slice(new_addr);
        }
        if v4 {
            let at = field::V4_CHECKSUM.start;
            let c = outer_delta.apply(read_u16(self.buf, at));
            write_u16(self.buf, at, c);
        } else {
            icmp_delta.merge(outer_delta);
        }
        self.adjust_icmp_checksum(icmp_delta);
    }

    fn adjust_icmp_checksum(&mut self, delta: ChecksumDelta) {
        let at = self.icmp + ICMP_CHECKSUM;
        let c = delta.apply(read_u16(self.buf, at));
        write_u16(self.buf, at, c);
    }
}

/// The embedded packet at `at`, if it is TCP/UDP with its ports captured.
fn inner_of(buf: &[u8], at: usize, v4: bool) -> Option<IcmpKind> {
    let ip = buf.get(at..)?;
    let (hlen, proto) = if v4 {
        let first = *ip.first()?;
        if first >> 4 != 4 || first & 0xf < 5 {
            return None;
        }
        (usize::from(first & 0xf) * 4, *ip.get(9)?)
    } else {
        if ip.first()? >> 4 != 6 {
            return None;
        }
        (40, *ip.get(6)?)
    };
    if !matches!(proto, TCP | UDP) || ip.len() < hlen + 8 {
        return None;
    }
    Some(IcmpKind::Error {
        inner: at,
        inner_l4: at + hlen,
        inner_proto: proto,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use etherparse::PacketBuilder;

    use super::*;
    use crate::wire::addr_from_ip;

    /// Checks every checksum of an ICMP packet from scratch, and the
    /// embedded IPv4 header's.
    pub(crate) fn assert_icmp_checksums(b: &[u8]) {
        crate::testing::checksums_ok(b).unwrap();
        if b[0] >> 4 == 4 {
            let inner = usize::from(b[0] & 0xf) * 4 + 8;
            if b.len() > inner + 20 && b[inner] >> 4 == 4 {
                let ihl = usize::from(b[inner] & 0xf) * 4;
                let header = etherparse::Ipv4HeaderSlice::from_slice(&b[inner..inner + ihl])
                    .unwrap()
                    .to_header();
                assert_eq!(
                    header.calc_header_checksum(),
                    header.header_checksum,
                    "inner IPv4 header checksum"
                );
            }
        }
    }

    pub(crate) fn v4(s: &str) -> [u8; 4] {
        s.parse::<std::net::Ipv4Addr>().unwrap().octets()
    }

    pub(crate) fn v6(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    /// An ICMP error from `from` to `to` about a TCP segment `isrc:isport →
    /// idst:idport` (its IP header and first 28 bytes, so the checksum field
    /// is captured).
    pub(crate) fn error_v4(
        from: &str,
        to: &str,
        isrc: &str,
        isport: u16,
        idst: &str,
        idport: u16,
    ) -> Vec<u8> {
        let mut inner = Vec::new();
        PacketBuilder::ipv4(v4(isrc), v4(idst), 63)
            .tcp(isport, idport, 7, 100)
            .ack(1)
            .write(&mut inner, &[0u8; 1400])
            .unwrap();
        inner.truncate(20 + 28);
        let mut out = Vec::new();
        // Type 3 code 4: fragmentation needed, next-hop MTU 1280 in bytes 6–7.
        PacketBuilder::ipv4(v4(from), v4(to), 64)
            .icmpv4_raw(3, 4, [0, 0, 0x05, 0x00])
            .write(&mut out, &inner)
            .unwrap();
        out
    }

    pub(crate) fn error_v6(
        from: &str,
        to: &str,
        isrc: &str,
        isport: u16,
        idst: &str,
        idport: u16,
    ) -> Vec<u8> {
        let mut inner = Vec::new();
        PacketBuilder::ipv6(v6(isrc), v6(idst), 63)
            .udp(isport, idport)
            .write(&mut inner, &[0u8; 1400])
            .unwrap();
        inner.truncate(40 + 8);
        let mut out = Vec::new();
        // Type 2: packet too big, MTU 1280.
        PacketBuilder::ipv6(v6(from), v6(to), 64)
            .icmpv6_raw(2, 0, [0, 0, 0x05, 0x00])
            .write(&mut out, &inner)
            .unwrap();
        out
    }

    fn a(s: &str) -> Addr {
        addr_from_ip(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn echo_requests_become_replies_with_correct_checksums() {
        let mut b = Vec::new();
        PacketBuilder::ipv4(v4("10.0.1.2"), v4("10.0.0.100"), 3)
            .icmpv4_echo_request(7, 1)
            .write(&mut b, b"ping!")
            .unwrap();
        let mut p = IcmpPacket::new_checked(&mut b).unwrap();
        assert_eq!(p.kind(), IcmpKind::EchoRequest);
        p.make_echo_reply();
        assert_eq!(
            (p.src_addr(), p.dst_addr()),
            (a("10.0.0.100"), a("10.0.1.2"))
        );
        assert_eq!((b[20], b[8]), (0, 64), "echo reply, fresh TTL");
        assert_icmp_checksums(&b);

        let mut b = Vec::new();
        PacketBuilder::ipv6(v6("fd00:1::2"), v6("fd00::100"), 3)
            .icmpv6_echo_request(7, 1)
            .write(&mut b, b"ping6")
            .unwrap();
        let mut p = IcmpPacket::new_checked(&mut b).unwrap();
        p.make_echo_reply();
        assert_eq!(p.src_addr(), a("fd00::100"));
        assert_eq!(b[40], 129);
        assert_icmp_checksums(&b);
    }

    #[test]
    fn errors_are_translated_with_every_checksum_kept_right() {
        let mut b = error_v4(
            "10.0.1.1",
            "10.0.0.100",
            "10.0.0.100",
            80,
            "10.0.1.2",
            40000,
        );
        assert_icmp_checksums(&b);
        let mut p = IcmpPacket::new_checked(&mut b).unwrap();
        let inner = p.inner().unwrap();
        assert_eq!(
            (inner.src, inner.src_port, inner.dst_port, inner.protocol),
            (a("10.0.0.100"), 80, 40000, TCP)
        );
        let be = a("10.0.2.11");
        p.translate(None, Some(&be), Some((&be, 8080)), None);
        let inner = p.inner().unwrap();
        assert_eq!((p.dst_addr(), inner.src, inner.src_port), (be, be, 8080));
        assert_icmp_checksums(&b);
        // The embedded TCP checksum moved with its pseudo-header and port:
        // recompute it over what the error carries of the segment, which
        // here is the full header (28 bytes) of a 1400-byte segment.
        let mut full = Vec::new();
        PacketBuilder::ipv4(v4("10.0.2.11"), v4("10.0.1.2"), 63)
            .tcp(8080, 40000, 7, 100)
            .ack(1)
            .write(&mut full, &[0u8; 1400])
            .unwrap();
        assert_eq!(
            &b[28 + 20 + 16..28 + 20 + 18],
            &full[20 + 16..20 + 18],
            "embedded TCP checksum"
        );

        let mut b = error_v6(
            "fd00:2::11",
            "fd00:1::2",
            "fd00:1::2",
            5000,
            "fd00:2::11",
            53,
        );
        let mut p = IcmpPacket::new_checked(&mut b).unwrap();
        let vip = a("fd00::100");
        p.translate(Some(&vip), None, None, Some((&vip, 5353)));
        assert_eq!(p.src_addr(), vip);
        assert_eq!(p.inner().unwrap().dst_port, 5353);
        assert_icmp_checksums(&b);
    }

    #[test]
    fn an_error_names_the_embedded_packet_in_full() {
        // A router's error to the client about the client's segment.
        let mut b = error_v4("10.0.9.9", "10.0.1.2", "10.0.1.2", 40000, "10.0.0.100", 80);
        let len = b.len();
        let p = IcmpPacket::new_checked(&mut b).unwrap();
        assert_eq!(p.len(), len);
        assert_eq!(
            p.inner(),
            Some(Inner {
                protocol: TCP,
                src: a("10.0.1.2"),
                src_port: 40000,
                dst: a("10.0.0.100"),
                dst_port: 80,
            })
        );
        let mut b = error_v6("fd00:9::9", "fd00:1::2", "fd00:1::2", 5000, "fd00::100", 53);
        let p = IcmpPacket::new_checked(&mut b).unwrap();
        let inner = p.inner().unwrap();
        assert_eq!(
            (inner.src, inner.src_port, inner.dst, inner.dst_port),
            (a("fd00:1::2"), 5000, a("fd00::100"), 53)
        );
    }

    #[test]
    fn an_icmp_message_needs_its_8_byte_header() {
        let mut b = Vec::new();
        PacketBuilder::ipv4(v4("10.0.1.2"), v4("10.0.0.100"), 3)
            .icmpv4_echo_request(7, 1)
            .write(&mut b, b"")
            .unwrap();
        assert_eq!(b.len(), 28);
        assert_eq!(
            IcmpPacket::new_checked(&mut b.clone()).unwrap().kind(),
            IcmpKind::EchoRequest
        );
        // Cut to 4 bytes of ICMP (total length and header checksum fixed).
        let mut cut = b[..24].to_vec();
        cut[3] = 24;
        let header = etherparse::Ipv4HeaderSlice::from_slice(&cut[..20])
            .unwrap()
            .to_header();
        let c = header.calc_header_checksum().to_be_bytes();
        cut[10..12].copy_from_slice(&c);
        assert_eq!(
            IcmpPacket::new_checked(&mut cut).unwrap_err(),
            ParseError::Malformed
        );
    }

    /// As [`error_v4`], carrying only the first `keep` bytes of the packet
    /// in error (the lengths of the error itself are right).
    fn error_v4_carrying(keep: usize) -> Vec<u8> {
        let whole = error_v4(
            "10.0.1.1",
            "10.0.0.100",
            "10.0.0.100",
            80,
            "10.0.1.2",
            40000,
        );
        let mut out = Vec::new();
        PacketBuilder::ipv4(v4("10.0.1.1"), v4("10.0.0.100"), 64)
            .icmpv4_raw(3, 4, [0, 0, 0x05, 0x00])
            .write(&mut out, &whole[28..28 + keep])
            .unwrap();
        out
    }

    #[test]
    fn truncated_or_odd_errors_are_not_translated_and_never_panic() {
        let be = a("10.0.2.11");
        // Less of the packet in error than its IP header and 8 bytes of
        // TCP (the ports): not an error fep can translate, left as it is.
        // From there on, translated, with the embedded TCP checksum only
        // once it is captured (20 + 18 bytes).
        for keep in 0..=48 {
            let mut b = error_v4_carrying(keep);
            let before = b.clone();
            let mut p = IcmpPacket::new_checked(&mut b).unwrap();
            let translatable = matches!(p.kind(), IcmpKind::Error { .. });
            assert_eq!(translatable, keep >= 28, "carrying {keep} bytes");
            p.translate(None, Some(&be), Some((&be, 8080)), None);
            if translatable {
                assert_eq!(p.inner().unwrap().src_port, 8080);
                assert_icmp_checksums(&b);
            } else {
                assert_eq!(b, before, "carrying {keep} bytes: not translated");
            }
        }
        // An error cut anywhere (its lengths no longer match) is refused.
        let good = error_v4_carrying(48);
        for cut in 0..good.len() {
            let mut b = good[..cut].to_vec();
            assert!(IcmpPacket::new_checked(&mut b).is_err(), "cut at {cut}");
        }
        // Odd embedded packets: not IPv4, an IHL below 5, not TCP or UDP.
        for (at, v) in [(28, 0x60), (28, 0x44), (28 + 9, 1), (28 + 9, 47)] {
            let mut b = good.clone();
            b[at] = v;
            let mut p = IcmpPacket::new_checked(&mut b).unwrap();
            assert_eq!(p.kind(), IcmpKind::Other, "byte {at} = {v:#x}");
            let before = p.buf.to_vec();
            p.translate(Some(&be), Some(&be), Some((&be, 1)), Some((&be, 2)));
            assert_eq!(p.buf.to_vec(), before, "byte {at} = {v:#x}: not translated");
        }
        // Any byte value anywhere: never a panic.
        for at in 0..good.len() {
            for v in 0..=255u8 {
                let mut b = good.clone();
                b[at] = v;
                if let Ok(mut p) = IcmpPacket::new_checked(&mut b) {
                    let _ = p.inner();
                    p.translate(Some(&be), Some(&be), Some((&be, 1)), Some((&be, 2)));
                    p.make_echo_reply();
                }
            }
        }
    }

    #[test]
    fn the_quoted_header_says_where_the_ports_are_and_whether_they_were_captured() {
        let error = |inner_l4, inner_proto| {
            Some(IcmpKind::Error {
                inner: 0,
                inner_l4,
                inner_proto,
            })
        };
        // IPv4 with no options, and with one option word: the ports follow
        // the header's own length, and need its 8 bytes after it.
        for (first, hlen) in [(0x45, 20), (0x46, 24), (0x4f, 60)] {
            let mut q = vec![0u8; hlen + 8];
            q[0] = first;
            q[9] = UDP;
            assert_eq!(inner_of(&q, 0, true), error(hlen, UDP), "{first:#x}");
            assert_eq!(inner_of(&q[..hlen + 7], 0, true), None, "{first:#x} cut");
        }
        // No IPv4 header shorter than 20 bytes, nor another version.
        for first in [0x40, 0x44, 0x55, 0x65] {
            let mut q = vec![0u8; 68];
            q[0] = first;
            q[9] = TCP;
            assert_eq!(inner_of(&q, 0, true), None, "{first:#x}");
        }
        // IPv6: a fixed 40 bytes, then the ports.
        let mut q = vec![0u8; 48];
        q[0] = 0x60;
        q[6] = TCP;
        assert_eq!(inner_of(&q, 0, false), error(40, TCP));
        assert_eq!(inner_of(&q[..47], 0, false), None);
        q[0] = 0x45;
        assert_eq!(inner_of(&q, 0, false), None);
    }

    #[test]
    fn an_embedded_ipv4_udp_checksum_of_0_means_none_and_stays_0() {
        let mut inner = Vec::new();
        PacketBuilder::ipv4(v4("10.0.0.100"), v4("10.0.1.2"), 63)
            .udp(53, 40000)
            .write(&mut inner, &[7u8; 100])
            .unwrap();
        inner.truncate(20 + 8);
        let checksum = 20 + 6;
        for zero in [true, false] {
            let mut quoted = inner.clone();
            if zero {
                quoted[checksum..checksum + 2].fill(0);
            }
            let mut b = Vec::new();
            PacketBuilder::ipv4(v4("10.0.1.1"), v4("10.0.0.100"), 64)
                .icmpv4_raw(3, 3, [0; 4])
                .write(&mut b, &quoted)
                .unwrap();
            let be = a("10.0.2.11");
            let mut p = IcmpPacket::new_checked(&mut b).unwrap();
            p.translate(None, Some(&be), Some((&be, 5353)), None);
            assert_icmp_checksums(&b);
            let at = 28 + checksum;
            let after = u16::from_be_bytes([b[at], b[at + 1]]);
            if zero {
                assert_eq!(after, 0, "no checksum: none after the rewrite");
            } else {
                let before = u16::from_be_bytes([inner[checksum], inner[checksum + 1]]);
                assert_ne!(after, before, "a real checksum follows the rewrite");
                assert_ne!(after, 0, "a real checksum is never sent as 0");
            }
        }
    }
}
