//! Typed views over IP packets in a byte buffer, after smoltcp's `wire`.
//!
//! [`FlowPacket::new_checked`] validates an IPv4/IPv6 TCP/UDP packet once
//! (with etherparse); after that no accessor can panic, and the setters
//! rewrite addresses and ports in place, updating the IPv4 header checksum and
//! the L4 checksum incrementally (RFC 1624) instead of recomputing them.

use std::net::{IpAddr, Ipv6Addr};

mod checksum;
pub mod icmp;

use etherparse::{IpSlice, TcpSlice, UdpSlice};

pub(crate) use checksum::{read_u16, write_u16, ChecksumDelta};
use checksum::{rewrite_end, End, Headers, L4Checksum};

/// An IP address in the 16-byte form the tables key on; IPv4 is stored
/// v4-mapped (`::ffff:a.b.c.d`), so one key type serves both families.
pub type Addr = [u8; 16];

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

pub(crate) mod field {
    use std::ops::Range;
    pub const V4_CHECKSUM: Range<usize> = 10..12;
    pub const V4_SRC: Range<usize> = 12..16;
    pub const V4_DST: Range<usize> = 16..20;
    pub const V6_SRC: Range<usize> = 8..24;
    pub const V6_DST: Range<usize> = 24..40;

    /// The source address field of an IP header of the given family.
    #[inline]
    pub fn src(v4: bool) -> Range<usize> {
        if v4 {
            V4_SRC
        } else {
            V6_SRC
        }
    }

    /// The destination address field of an IP header of the given family.
    #[inline]
    pub fn dst(v4: bool) -> Range<usize> {
        if v4 {
            V4_DST
        } else {
            V6_DST
        }
    }
    // Offsets from the start of the L4 header.
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECKSUM: usize = 16;
    pub const UDP_CHECKSUM: usize = 6;
}

pub fn addr_from_ip(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Inverse of [`addr_from_ip`]: v4-mapped addresses come back as IPv4.
pub fn ip_from_addr(addr: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Why a buffer is not a packet the dispatcher can handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not a well-formed IPv4/IPv6 packet with a complete TCP/UDP header.
    Malformed,
    /// A fragment: the ports of non-first fragments are unknown.
    Fragment,
    /// Neither TCP nor UDP nor ICMP.
    UnsupportedProtocol,
    /// ICMP or ICMPv6: see [`icmp::IcmpPacket`].
    Icmp,
}

/// A validated IPv4/IPv6 packet carrying TCP or UDP, viewed in place.
#[derive(Debug)]
pub struct FlowPacket<'a> {
    buf: &'a mut [u8],
    v4: bool,
    proto: u8,
    /// Offset of the TCP/UDP header.
    l4: usize,
    /// Length of the IP packet (the buffer may carry trailing bytes).
    len: usize,
    /// The L4 checksum field holds only the pseudo-header sum, to be
    /// finished by the device (virtio-net `NEEDS_CSUM`).
    partial: bool,
}

impl<'a> FlowPacket<'a> {
    /// Validates the IP header, extension headers, lengths and the L4 header.
    #[inline]
    pub fn new_checked(buf: &'a mut [u8]) -> Result<Self, ParseError> {
        let (v4, proto, l4, len) = {
            let ip = IpSlice::from_slice(buf).map_err(|_| ParseError::Malformed)?;
            let payload = ip.payload();
            if payload.fragmented {
                return Err(ParseError::Fragment);
            }
            let proto = payload.ip_number.0;
            match proto {
                TCP => {
                    TcpSlice::from_slice(payload.payload).map_err(|_| ParseError::Malformed)?;
                }
                UDP => {
                    UdpSlice::from_slice(payload.payload).map_err(|_| ParseError::Malformed)?;
                }
                icmp::ICMPV4 | icmp::ICMPV6 => return Err(ParseError::Icmp),
                _ => return Err(ParseError::UnsupportedProtocol),
            }
            let l4 = payload.payload.as_ptr() as usize - buf.as_ptr() as usize;
            (
                matches!(ip, IpSlice::Ipv4(_)),
                proto,
                l4,
                l4 + payload.payload.len(),
            )
        };
        Ok(FlowPacket {
            buf,
            v4,
            proto,
            l4,
            len,
            partial: false,
        })
    }

    /// Marks the L4 checksum as a partial (pseudo-header) sum, as a read
    /// from a TUN device with checksum offload delivers it.
    #[inline]
    pub fn with_partial_checksum(mut self, partial: bool) -> Self {
        self.partial = partial;
        self
    }

    /// IP protocol number: [`TCP`] or [`UDP`].
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.proto
    }

    /// Length of the IP packet, which is what gets written back.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn src_addr(&self) -> Addr {
        self.addr(field::src(self.v4))
    }

    #[inline]
    pub fn dst_addr(&self) -> Addr {
        self.addr(field::dst(self.v4))
    }

    #[inline]
    pub fn src_port(&self) -> u16 {
        read_u16(self.buf, self.l4 + field::SRC_PORT)
    }

    #[inline]
    pub fn dst_port(&self) -> u16 {
        read_u16(self.buf, self.l4 + field::DST_PORT)
    }

    /// TCP flags, or 0 for UDP.
    #[inline]
    pub fn tcp_flags(&self) -> u8 {
        if self.proto == TCP {
            self.buf[self.l4 + field::TCP_FLAGS]
        } else {
            0
        }
    }

    /// Rewrites the destination (forward direction: VIP → back end).
    #[inline]
    pub fn set_destination(&mut self, addr: &Addr, port: u16) {
        self.rewrite(End::Destination, addr, port);
    }

    /// Rewrites the source (reverse direction: back end → VIP).
    #[inline]
    pub fn set_source(&mut self, addr: &Addr, port: u16) {
        self.rewrite(End::Source, addr, port);
    }

    #[inline]
    fn rewrite(&mut self, end: End, addr: &Addr, port: u16) {
        let headers = Headers {
            ip: 0,
            l4: self.l4,
            len: self.len,
            proto: self.proto,
            v4: self.v4,
        };
        let l4_checksum = if self.partial {
            L4Checksum::Partial
        } else {
            L4Checksum::Full
        };
        rewrite_end(self.buf, headers, end, l4_checksum, addr, port);
    }

    #[inline]
    fn addr(&self, range: std::ops::Range<usize>) -> Addr {
        read_addr(&self.buf[range], self.v4)
    }
}

/// An address field (4 or 16 bytes) in the tables' 16-byte form.
///
/// Built in a register and stored whole: the route lookup that follows
/// reads the address back as wide words, which a CPU forwards from one wide
/// store but not from four narrow ones.
#[inline]
pub(crate) fn read_addr(bytes: &[u8], v4: bool) -> Addr {
    if v4 {
        let ip = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        (0xffff_u128 << 32 | u128::from(ip)).to_be_bytes()
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&bytes[..16]);
        a
    }
}

/// The bytes an address takes in a packet of its family.
pub(crate) fn addr_bytes(addr: &Addr, v4: bool) -> &[u8] {
    if v4 {
        &addr[12..]
    } else {
        &addr[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use std::net::Ipv4Addr;

    const CLIENT4: [u8; 4] = [10, 0, 1, 2];
    const VIP4: [u8; 4] = [10, 0, 0, 100];
    const BE4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 11);
    const CLIENT6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const VIP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    fn be6() -> Ipv6Addr {
        "fd00:2::11".parse().unwrap()
    }

    /// Serialises a packet built with etherparse (correct checksums).
    macro_rules! build {
        ($builder:expr, $payload:expr) => {{
            let mut out = Vec::new();
            $builder.write(&mut out, $payload).unwrap();
            out
        }};
    }

    fn tcp4(payload: &[u8]) -> Vec<u8> {
        build!(
            PacketBuilder::ipv4(CLIENT4, VIP4, 64)
                .tcp(40000, 80, 12345, 64240)
                .syn(),
            payload
        )
    }

    fn udp4(payload: &[u8]) -> Vec<u8> {
        build!(
            PacketBuilder::ipv4(CLIENT4, VIP4, 64).udp(40000, 53),
            payload
        )
    }

    fn tcp6(payload: &[u8]) -> Vec<u8> {
        build!(
            PacketBuilder::ipv6(CLIENT6, VIP6, 64)
                .tcp(40000, 80, 1, 64240)
                .ack(7),
            payload
        )
    }

    fn udp6(payload: &[u8]) -> Vec<u8> {
        build!(
            PacketBuilder::ipv6(CLIENT6, VIP6, 64).udp(40000, 53),
            payload
        )
    }

    fn assert_checksums_valid(bytes: &[u8]) {
        crate::testing::checksums_ok(bytes).unwrap();
    }

    #[test]
    fn rewrites_keep_checksums_correct_for_tcp_and_udp_over_v4_and_v6() {
        let payloads: [&[u8]; 3] = [b"", b"odd", b"GET / HTTP/1.0\r\n\r\n"];
        for payload in payloads {
            for (mut bytes, be) in [
                (tcp4(payload), IpAddr::V4(BE4)),
                (udp4(payload), IpAddr::V4(BE4)),
                (tcp6(payload), IpAddr::V6(be6())),
                (udp6(payload), IpAddr::V6(be6())),
            ] {
                assert_checksums_valid(&bytes);
                let mut p = FlowPacket::new_checked(&mut bytes).unwrap();
                p.set_destination(&addr_from_ip(be), 8080);
                assert_eq!(p.dst_addr(), addr_from_ip(be));
                assert_eq!(p.dst_port(), 8080);
                assert_checksums_valid(&bytes);

                let mut p = FlowPacket::new_checked(&mut bytes).unwrap();
                let client = p.src_addr();
                p.set_source(&addr_from_ip(be), 80);
                p.set_destination(&client, 40001);
                assert_eq!(p.src_port(), 80);
                assert_checksums_valid(&bytes);
            }
        }
    }

    /// What a device does with an offloaded checksum: sum the L4 bytes
    /// (the field holding the pseudo-header sum) and store the complement.
    fn finish_offloaded(bytes: &mut [u8], l4: usize, at: usize) {
        let sum = crate::testing::ones_sum(0, &bytes[l4..]);
        bytes[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
    }

    /// The pseudo-header sum an offloading sender leaves in the field.
    fn make_partial(bytes: &mut [u8], v4: bool, l4: usize, at: usize, proto: u8) {
        let sum = crate::testing::pseudo_header_sum(bytes, v4, bytes.len() - l4, proto);
        bytes[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn offloaded_partial_checksums_stay_right_after_a_rewrite() {
        for (mut bytes, v4, l4, at, proto, be) in [
            (tcp4(b"data!"), true, 20, 36, TCP, IpAddr::V4(BE4)),
            (udp4(b"data!"), true, 20, 26, UDP, IpAddr::V4(BE4)),
            (tcp6(b"data!"), false, 40, 56, TCP, IpAddr::V6(be6())),
            (udp6(b"data!"), false, 40, 46, UDP, IpAddr::V6(be6())),
        ] {
            make_partial(&mut bytes, v4, l4, at, proto);
            let p = FlowPacket::new_checked(&mut bytes).unwrap();
            let mut p = p.with_partial_checksum(true);
            p.set_destination(&addr_from_ip(be), 8080);
            finish_offloaded(&mut bytes, l4, at);
            assert_checksums_valid(&bytes);
        }
    }

    #[test]
    fn reads_addresses_ports_and_flags() {
        let mut bytes = tcp4(b"x");
        let p = FlowPacket::new_checked(&mut bytes).unwrap();
        assert_eq!(p.protocol(), TCP);
        assert_eq!(ip_from_addr(&p.src_addr()), IpAddr::from(CLIENT4));
        assert_eq!(ip_from_addr(&p.dst_addr()), IpAddr::from(VIP4));
        assert_eq!((p.src_port(), p.dst_port()), (40000, 80));
        assert_eq!(p.tcp_flags(), tcp_flags::SYN);
        assert_eq!(p.len(), 20 + 20 + 1);
    }

    #[test]
    fn ipv4_udp_without_checksum_stays_without() {
        let mut bytes = udp4(b"abc");
        bytes[20 + 6] = 0;
        bytes[20 + 7] = 0;
        let mut p = FlowPacket::new_checked(&mut bytes).unwrap();
        p.set_destination(&addr_from_ip(IpAddr::V4(BE4)), 53);
        assert_eq!(&bytes[26..28], &[0, 0]);
    }

    #[test]
    fn trailing_bytes_are_not_part_of_the_packet() {
        let mut bytes = udp4(b"abc");
        let len = bytes.len();
        bytes.extend_from_slice(&[0xee; 7]);
        assert_eq!(FlowPacket::new_checked(&mut bytes).unwrap().len(), len);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = tcp4(b"hello");
        // Every truncation of a valid packet.
        for cut in 0..good.len() - 5 {
            let mut b = good[..cut].to_vec();
            assert!(FlowPacket::new_checked(&mut b).is_err(), "cut at {cut}");
        }
        // IHL < 5.
        let mut b = good.clone();
        b[0] = 0x44;
        assert_eq!(
            FlowPacket::new_checked(&mut b).unwrap_err(),
            ParseError::Malformed
        );
        // Total length beyond the buffer.
        let mut b = good.clone();
        b[2] = 0xff;
        assert_eq!(
            FlowPacket::new_checked(&mut b).unwrap_err(),
            ParseError::Malformed
        );
        // TCP data offset below 5.
        let mut b = good.clone();
        b[20 + 12] = 0x40;
        assert_eq!(
            FlowPacket::new_checked(&mut b).unwrap_err(),
            ParseError::Malformed
        );
        // Not IP at all.
        let mut b = vec![0x00u8; 40];
        assert_eq!(
            FlowPacket::new_checked(&mut b).unwrap_err(),
            ParseError::Malformed
        );
        // ICMP.
        let mut b = good.clone();
        b[9] = 47;
        assert_eq!(
            FlowPacket::new_checked(&mut b).unwrap_err(),
            ParseError::UnsupportedProtocol
        );
        b[9] = 1;
        assert_eq!(
            FlowPacket::new_checked(&mut b).unwrap_err(),
            ParseError::Icmp
        );
        // A fragment (more-fragments bit).
        let mut b = udp4(b"abcdefgh");
        b[6] = 0x20;
        assert_eq!(
            FlowPacket::new_checked(&mut b).unwrap_err(),
            ParseError::Fragment
        );
        // Every byte value in every header position: no panic.
        for at in 0..40 {
            for v in 0..=255u8 {
                let mut b = good.clone();
                b[at] = v;
                if let Ok(mut p) = FlowPacket::new_checked(&mut b) {
                    let _ = (p.src_addr(), p.dst_port(), p.tcp_flags());
                    p.set_destination(&[0; 16], 1);
                }
            }
        }
    }

    #[test]
    fn an_ipv6_udp_packet_has_its_addresses_and_no_flags() {
        let mut bytes = udp6(b"x");
        let p = FlowPacket::new_checked(&mut bytes).unwrap();
        assert_eq!(p.tcp_flags(), 0, "UDP has no flags");
        assert_eq!(ip_from_addr(&p.src_addr()), IpAddr::from(CLIENT6));
    }

    #[test]
    fn a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() {
        // 0 would mean "no checksum" (IPv4) or be invalid (IPv6): the
        // payload word is chosen so that the rewritten checksum is zero.
        for (make, be) in [
            (udp4 as fn(&[u8]) -> Vec<u8>, IpAddr::V4(BE4)),
            (udp6, IpAddr::V6(be6())),
        ] {
            let mut probe = make(&[0, 0]);
            let mut p = FlowPacket::new_checked(&mut probe).unwrap();
            p.set_destination(&addr_from_ip(be), 53);
            let at = probe.len() - 4;
            let word = [probe[at], probe[at + 1]];
            let mut bytes = make(&word);
            let mut p = FlowPacket::new_checked(&mut bytes).unwrap();
            p.set_destination(&addr_from_ip(be), 53);
            assert_eq!(&bytes[at..at + 2], &[0xff, 0xff], "{be}");
            assert_checksums_valid(&bytes);
        }
    }

    #[test]
    fn a_sum_of_all_ones_folds_to_itself() {
        assert_eq!(ChecksumDelta::default().add_to(0xffff), 0xffff);
        let mut d = ChecksumDelta::default();
        d.replace(&[0, 1], &[0, 1]);
        assert_eq!(d.add_to(0), 0xffff);
        assert_eq!(d.apply(0), 0);
    }

    #[test]
    fn checksum_delta_matches_rfc1624_example() {
        // RFC 1624 §4: HC = 0xDD2F, m = 0x5555 → m' = 0x3285 gives HC' = 0x0000
        // with eqn. 3 (its one's-complement negative zero is avoided).
        let mut d = ChecksumDelta::default();
        d.replace(&[0x55, 0x55], &[0x32, 0x85]);
        assert_eq!(d.apply(0xDD2F), 0x0000);
    }
}
