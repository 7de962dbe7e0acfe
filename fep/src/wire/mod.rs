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

use checksum::{ones_sum, rewrite_end, End, Headers, L4Checksum};
pub(crate) use checksum::{read_u16, read_u32, write_u16, ChecksumDelta};

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
    pub const V4_TOTAL_LEN: usize = 2;
    pub const V4_TTL: usize = 8;
    pub const V4_CHECKSUM: Range<usize> = 10..12;
    pub const V6_PAYLOAD_LEN: usize = 4;
    pub const V6_NEXT_HEADER: usize = 6;
    pub const V6_HOP_LIMIT: usize = 7;
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
    pub const TCP_SEQ: usize = 4;
    pub const TCP_ACK: usize = 8;
    pub const TCP_DATA_OFFSET: usize = 12;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_WINDOW: usize = 14;
    pub const TCP_CHECKSUM: usize = 16;
    pub const TCP_URGENT: usize = 18;
    /// A TCP header without options.
    pub const TCP_HEADER_LEN: usize = 20;
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

    /// Turns a client's SYN into the RST|ACK that refuses it, in place, to
    /// be sent back the way it came: addresses and ports swapped; RFC 793's
    /// answer to a segment without ACK (seq 0, ack = SEG.SEQ + SEG.LEN, a
    /// SYN and a FIN counting one each); no options, no payload, window 0;
    /// TTL / hop limit 64. The IP header is rebuilt without IPv4 options or
    /// IPv6 extension headers, and every checksum is computed afresh (a
    /// rare path). Returns the reply's length.
    ///
    /// `None`, the packet untouched, for an offloaded read (see
    /// [`FlowPacket::with_partial_checksum`]) with IP options or extension
    /// headers: the device finishes the TCP checksum at the offset the read
    /// had, which the shorter header would move. Where the header stays,
    /// the reply is left partial too, for the device to finish.
    #[cold]
    pub fn make_rst_reply(&mut self) -> Option<usize> {
        let (old_l4, v4) = (self.l4, self.v4);
        let l4 = if v4 { 20 } else { 40 };
        if self.proto != TCP || (self.partial && l4 != old_l4) {
            return None;
        }
        let b = &mut *self.buf;
        let (sport, dport) = (
            read_u16(b, old_l4 + field::SRC_PORT),
            read_u16(b, old_l4 + field::DST_PORT),
        );
        let seq = read_u32(b, old_l4 + field::TCP_SEQ);
        let flags = b[old_l4 + field::TCP_FLAGS];
        let header = usize::from(b[old_l4 + field::TCP_DATA_OFFSET] >> 4) * 4;
        let payload = self.len - old_l4 - header;
        let counted = [tcp_flags::SYN, tcp_flags::FIN]
            .iter()
            .filter(|&&f| flags & f != 0)
            .count();
        let ack = seq.wrapping_add((payload + counted) as u32);

        let (src, dst) = (field::src(v4), field::dst(v4));
        let mut client = [0u8; 16];
        client[..src.len()].copy_from_slice(&b[src.clone()]);
        b.copy_within(dst.clone(), src.start);
        b[dst].copy_from_slice(&client[..src.len()]);
        let len = l4 + field::TCP_HEADER_LEN;
        if v4 {
            b[0] = 0x45; // version 4, no options
            write_u16(b, field::V4_TOTAL_LEN, len as u16);
            b[field::V4_TTL] = 64;
        } else {
            write_u16(b, field::V6_PAYLOAD_LEN, field::TCP_HEADER_LEN as u16);
            b[field::V6_NEXT_HEADER] = TCP;
            b[field::V6_HOP_LIMIT] = 64;
        }

        let tcp = &mut b[l4..len];
        tcp.fill(0);
        write_u16(tcp, field::SRC_PORT, dport);
        write_u16(tcp, field::DST_PORT, sport);
        tcp[field::TCP_ACK..field::TCP_ACK + 4].copy_from_slice(&ack.to_be_bytes());
        tcp[field::TCP_DATA_OFFSET] = (field::TCP_HEADER_LEN as u8 / 4) << 4;
        tcp[field::TCP_FLAGS] = tcp_flags::RST | tcp_flags::ACK;
        debug_assert_eq!(read_u16(tcp, field::TCP_WINDOW), 0);
        debug_assert_eq!(read_u16(tcp, field::TCP_URGENT), 0);

        // The pseudo header: addresses, protocol, TCP length.
        let addrs = if v4 { 12..20 } else { 8..40 };
        let mut pseudo = ones_sum(0, &b[addrs]);
        pseudo = ones_sum(pseudo, &[0, TCP]);
        pseudo = ones_sum(pseudo, &(field::TCP_HEADER_LEN as u16).to_be_bytes());
        let tcp_checksum = if self.partial {
            pseudo
        } else {
            !ones_sum(pseudo, &b[l4..len])
        };
        write_u16(b, l4 + field::TCP_CHECKSUM, tcp_checksum);
        if v4 {
            let at = field::V4_CHECKSUM.start;
            write_u16(b, at, 0);
            let sum = !ones_sum(0, &b[..20]);
            write_u16(b, at, sum);
        }
        self.l4 = l4;
        self.len = len;
        Some(len)
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

    /// A SYN with options (MSS, window scale, SACK permitted) and `payload`
    /// (TCP Fast Open data), seq 1000, from client port 40000 to 80.
    fn syn_with_options(v4: bool, payload: &[u8]) -> Vec<u8> {
        use etherparse::TcpOptionElement::*;
        let opts = [
            MaximumSegmentSize(1460),
            Noop,
            WindowScale(7),
            SelectiveAcknowledgementPermitted,
            Noop,
            Noop,
        ];
        if v4 {
            build!(
                PacketBuilder::ipv4(CLIENT4, VIP4, 9)
                    .tcp(40000, 80, 1000, 64240)
                    .syn()
                    .options(&opts)
                    .unwrap(),
                payload
            )
        } else {
            build!(
                PacketBuilder::ipv6(CLIENT6, VIP6, 9)
                    .tcp(40000, 80, 1000, 64240)
                    .syn()
                    .options(&opts)
                    .unwrap(),
                payload
            )
        }
    }

    /// Checks `bytes` is the RST|ACK refusing [`syn_with_options`] with
    /// `payload_len` bytes: from the VIP's port to the client's, every
    /// field as RFC 793 has it, every checksum right.
    fn assert_rst_reply(bytes: &[u8], v4: bool, payload_len: u32) {
        assert_checksums_valid(bytes);
        let p = etherparse::SlicedPacket::from_ip(bytes).unwrap();
        match p.net.unwrap() {
            etherparse::NetSlice::Ipv4(ip) => {
                assert!(v4);
                let h = ip.header();
                let want = (VIP4.into(), CLIENT4.into(), 64, 40, 5);
                let got = (
                    h.source_addr(),
                    h.destination_addr(),
                    h.ttl(),
                    h.total_len(),
                    h.ihl(),
                );
                assert_eq!(got, want);
            }
            etherparse::NetSlice::Ipv6(ip) => {
                assert!(!v4);
                let h = ip.header();
                assert_eq!((h.source(), h.destination()), (VIP6, CLIENT6));
                assert_eq!(
                    (h.hop_limit(), h.payload_length(), h.next_header().0),
                    (64, 20, TCP)
                );
            }
            other => panic!("{other:?}"),
        }
        let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP")
        };
        assert_eq!((t.source_port(), t.destination_port()), (80, 40000));
        assert_eq!(t.sequence_number(), 0);
        assert_eq!(
            t.acknowledgment_number(),
            1000 + 1 + payload_len,
            "SYN + data"
        );
        assert!(t.rst() && t.ack() && !t.syn() && !t.fin() && !t.psh() && !t.urg());
        assert_eq!(
            (t.data_offset(), t.window_size(), t.urgent_pointer()),
            (5, 0, 0)
        );
        assert!(t.payload().is_empty() && t.options().is_empty());
    }

    #[test]
    fn a_syn_with_options_and_data_becomes_the_rst_that_refuses_it() {
        for v4 in [true, false] {
            for payload in [&b""[..], b"fast open data"] {
                let mut bytes = syn_with_options(v4, payload);
                let mut p = FlowPacket::new_checked(&mut bytes).unwrap();
                let len = p.make_rst_reply().unwrap();
                assert_eq!(p.len(), len, "the view follows");
                assert_eq!(len, if v4 { 40 } else { 60 });
                assert_rst_reply(&bytes[..len], v4, payload.len() as u32);
            }
        }
        // A SYN|FIN counts both (SEG.LEN = 2 with no data).
        let mut bytes = tcp4(b"");
        bytes[20 + field::TCP_FLAGS] |= tcp_flags::FIN;
        let len = FlowPacket::new_checked(&mut bytes)
            .unwrap()
            .make_rst_reply();
        let t = etherparse::TcpSlice::from_slice(&bytes[20..len.unwrap()]).unwrap();
        assert_eq!(t.acknowledgment_number(), 12345 + 2);
        // UDP has no RST.
        let mut bytes = udp4(b"q");
        assert_eq!(
            FlowPacket::new_checked(&mut bytes)
                .unwrap()
                .make_rst_reply(),
            None
        );
    }

    /// `bytes` (a packet built by etherparse) with `ext` inserted after its
    /// fixed IP header: IPv4 options, or one IPv6 extension header (whose
    /// first byte, its next header, is fixed here).
    fn with_ip_extras(mut bytes: Vec<u8>, v4: bool, mut ext: Vec<u8>) -> Vec<u8> {
        let at = if v4 { 20 } else { 40 };
        if v4 {
            bytes[0] += (ext.len() / 4) as u8;
            let total = read_u16(&bytes, 2) + ext.len() as u16;
            write_u16(&mut bytes, 2, total);
        } else {
            ext[0] = bytes[6];
            bytes[6] = 60; // destination options
            let payload = read_u16(&bytes, 4) + ext.len() as u16;
            write_u16(&mut bytes, 4, payload);
        }
        bytes.splice(at..at, ext);
        if v4 {
            write_u16(&mut bytes, 10, 0);
            let ihl = usize::from(bytes[0] & 0xf) * 4;
            let sum = !crate::testing::ones_sum(0, &bytes[..ihl]);
            write_u16(&mut bytes, 10, sum);
        }
        bytes
    }

    #[test]
    fn ip_options_and_extension_headers_are_left_out_of_the_rst() {
        let cases = [
            (true, vec![1, 1, 1, 0]),              // NOP NOP NOP EOL
            (false, vec![0, 0, 1, 4, 0, 0, 0, 0]), // PadN
        ];
        for (v4, ext) in cases {
            let mut bytes = with_ip_extras(syn_with_options(v4, b"hi"), v4, ext);
            assert_checksums_valid(&bytes);
            let mut p = FlowPacket::new_checked(&mut bytes).unwrap();
            let len = p.make_rst_reply().unwrap();
            assert_rst_reply(&bytes[..len], v4, 2);
            // Offloaded, the device would finish the checksum where the
            // read had its TCP header: no reply.
            let mut bytes = with_ip_extras(syn_with_options(v4, b"hi"), v4, vec![0; 8]);
            let before = bytes.clone();
            let p = FlowPacket::new_checked(&mut bytes).unwrap();
            assert_eq!(p.with_partial_checksum(true).make_rst_reply(), None);
            assert_eq!(bytes, before, "untouched");
        }
    }

    #[test]
    fn an_offloaded_syns_rst_is_left_for_the_device_to_finish() {
        for (v4, l4) in [(true, 20), (false, 40)] {
            let mut bytes = syn_with_options(v4, b"data");
            let at = l4 + field::TCP_CHECKSUM;
            make_partial(&mut bytes, v4, l4, at, TCP);
            let p = FlowPacket::new_checked(&mut bytes).unwrap();
            let len = p.with_partial_checksum(true).make_rst_reply().unwrap();
            bytes.truncate(len);
            let partial = crate::testing::pseudo_header_sum(&bytes, v4, 20, TCP);
            assert_eq!(read_u16(&bytes, at), partial, "the pseudo-header sum");
            finish_offloaded(&mut bytes, l4, at);
            assert_rst_reply(&bytes, v4, 4);
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
