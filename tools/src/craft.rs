//! Crafting packets (pnet) for the flood generator and the hostile-packet
//! tool, and sending them from a raw socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::bail;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, MutableIpv4Packet};
use pnet_packet::ipv6::MutableIpv6Packet;
use pnet_packet::tcp::{self, MutableTcpPacket, TcpFlags};
use pnet_packet::udp::{self, MutableUdpPacket};

/// A raw socket that sends whole IP packets (IP_HDRINCL). The kernel still
/// fills in the IPv4 total length and header checksum.
pub struct RawSender {
    fd: OwnedFd,
}

impl RawSender {
    pub fn new(v6: bool) -> anyhow::Result<Self> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!(
                "raw socket: {} (needs root)",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a fresh fd we own.
        Ok(RawSender {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends one packet to `dst`; errors (e.g. EPERM for a packet the
    /// kernel refuses) are returned, not fatal.
    pub fn send(&self, packet: &[u8], dst: IpAddr) -> std::io::Result<()> {
        send_to(&self.fd, packet, dst)
    }
}

/// Sends one datagram on a raw socket to `dst`.
pub(crate) fn send_to(fd: &OwnedFd, packet: &[u8], dst: IpAddr) -> std::io::Result<()> {
    let addr = SocketAddr::new(dst, 0);
    let (storage, len) = sockaddr(&addr);
    // SAFETY: a valid buffer and sockaddr for the call's duration.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// What to put in a crafted IPv4 TCP packet.
#[derive(Debug, Clone)]
pub struct Tcp4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub ttl: u8,
    pub payload: Vec<u8>,
    /// IPv4 option bytes (padded with zeros to a multiple of 4).
    pub options: Vec<u8>,
    /// TCP data offset in 32-bit words (5 is a plain header).
    pub data_offset: u8,
    /// Leave the TCP checksum wrong.
    pub bad_checksum: bool,
}

impl Tcp4 {
    pub fn syn(src: Ipv4Addr, sport: u16, dst: SocketAddr) -> Self {
        let IpAddr::V4(d) = dst.ip() else {
            panic!("an IPv4 destination")
        };
        Tcp4 {
            src,
            dst: d,
            sport,
            dport: dst.port(),
            flags: TcpFlags::SYN,
            ttl: 64,
            payload: Vec::new(),
            options: Vec::new(),
            data_offset: 5,
            bad_checksum: false,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let opt_len = self.options.len().div_ceil(4) * 4;
        let ihl = 20 + opt_len;
        let tcp_len = 20 + self.payload.len();
        let mut buf = vec![0u8; ihl + tcp_len];
        {
            let mut ip = MutableIpv4Packet::new(&mut buf).expect("sized above");
            ip.set_version(4);
            ip.set_header_length((ihl / 4) as u8);
            ip.set_total_length((ihl + tcp_len) as u16);
            ip.set_ttl(self.ttl);
            ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
            ip.set_source(self.src);
            ip.set_destination(self.dst);
            ip.set_identification(0x1234);
        }
        buf[20..ihl].copy_from_slice(&padded(&self.options, opt_len));
        {
            let mut ip = MutableIpv4Packet::new(&mut buf).expect("sized above");
            let c = ipv4::checksum(&ip.to_immutable());
            ip.set_checksum(c);
        }
        {
            let mut t = MutableTcpPacket::new(&mut buf[ihl..]).expect("sized above");
            t.set_source(self.sport);
            t.set_destination(self.dport);
            t.set_sequence(0x0102_0304);
            t.set_data_offset(5);
            t.set_flags(self.flags);
            t.set_window(64240);
            t.set_payload(&self.payload);
            let c = tcp::ipv4_checksum(&t.to_immutable(), &self.src, &self.dst);
            t.set_checksum(if self.bad_checksum { c ^ 0x5a5a } else { c });
        }
        // A data offset other than 5 is written last: pnet would read past
        // the header with it.
        buf[ihl + 12] = (self.data_offset << 4) | (buf[ihl + 12] & 0x0f);
        buf
    }
}

/// An IPv4 packet with an arbitrary protocol number and payload.
pub fn ipv4_other(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + payload.len()];
    let mut ip = MutableIpv4Packet::new(&mut buf).expect("sized above");
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length((20 + payload.len()) as u16);
    ip.set_ttl(64);
    ip.set_next_level_protocol(pnet_packet::ip::IpNextHeaderProtocol(protocol));
    ip.set_source(src);
    ip.set_destination(dst);
    ip.set_payload(payload);
    let c = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(c);
    buf
}

fn padded(bytes: &[u8], len: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(len, 0);
    v
}

/// An IPv4 UDP datagram.
pub fn udp4(src: Ipv4Addr, sport: u16, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let IpAddr::V4(dst_ip) = dst.ip() else {
        panic!("udp4 to an IPv6 address")
    };
    let udp_len = 8 + payload.len();
    let mut buf = vec![0u8; 20 + udp_len];
    {
        let mut ip = MutableIpv4Packet::new(&mut buf).expect("sized above");
        ip.set_version(4);
        ip.set_header_length(5);
        ip.set_total_length((20 + udp_len) as u16);
        ip.set_ttl(64);
        ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
        ip.set_source(src);
        ip.set_destination(dst_ip);
        let c = ipv4::checksum(&ip.to_immutable());
        ip.set_checksum(c);
    }
    let mut u = MutableUdpPacket::new(&mut buf[20..]).expect("sized above");
    u.set_source(sport);
    u.set_destination(dst.port());
    u.set_length(udp_len as u16);
    u.set_payload(payload);
    let c = udp::ipv4_checksum(&u.to_immutable(), &src, &dst_ip);
    u.set_checksum(c);
    buf
}

/// An IPv6 UDP datagram, optionally behind a destination-options extension
/// header, with the given hop limit.
pub fn udp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    hop_limit: u8,
    ext: bool,
    payload: &[u8],
) -> Vec<u8> {
    let ext_len = if ext { 8 } else { 0 };
    let udp_len = 8 + payload.len();
    let mut buf = vec![0u8; 40 + ext_len + udp_len];
    {
        let mut ip = MutableIpv6Packet::new(&mut buf).expect("sized above");
        ip.set_version(6);
        ip.set_payload_length((ext_len + udp_len) as u16);
        ip.set_hop_limit(hop_limit);
        ip.set_source(src);
        ip.set_destination(dst);
        ip.set_next_header(if ext {
            IpNextHeaderProtocols::Ipv6Opts
        } else {
            IpNextHeaderProtocols::Udp
        });
    }
    if ext {
        // Destination options: next header UDP, length 0 (8 bytes), PadN.
        buf[40..48].copy_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    }
    let mut u = MutableUdpPacket::new(&mut buf[40 + ext_len..]).expect("sized above");
    u.set_source(sport);
    u.set_destination(dport);
    u.set_length(udp_len as u16);
    u.set_payload(payload);
    let c = udp::ipv6_checksum(&u.to_immutable(), &src, &dst);
    u.set_checksum(c);
    buf
}

/// Every hostile or unusual IPv4 packet class the tool sends toward a
/// TCP service at `dst`, with a name for each.
pub fn hostile_v4(src: Ipv4Addr, dst: SocketAddr) -> Vec<(String, Vec<u8>)> {
    let IpAddr::V4(vip) = dst.ip() else {
        panic!("an IPv4 destination")
    };
    let base = Tcp4::syn(src, 40000, dst);
    let mut out = Vec::new();
    let mut add = |name: &str, p: Tcp4| out.push((name.to_string(), p.build()));
    for flags in 0..=255u8 {
        add(
            &format!("tcp flags {flags:#04x}"),
            Tcp4 {
                flags,
                sport: 41000 + u16::from(flags),
                ..base.clone()
            },
        );
    }
    add(
        "tcp data offset 3",
        Tcp4 {
            data_offset: 3,
            ..base.clone()
        },
    );
    add(
        "tcp data offset 15 beyond the segment",
        Tcp4 {
            data_offset: 15,
            ..base.clone()
        },
    );
    add(
        "bad tcp checksum",
        Tcp4 {
            bad_checksum: true,
            ..base.clone()
        },
    );
    add(
        "zero-length payload ack",
        Tcp4 {
            flags: TcpFlags::ACK,
            ..base.clone()
        },
    );
    add(
        "odd-length payload",
        Tcp4 {
            flags: TcpFlags::ACK,
            payload: vec![0x41; 7],
            ..base.clone()
        },
    );
    add(
        "ttl 1",
        Tcp4 {
            ttl: 1,
            ..base.clone()
        },
    );
    add(
        "ipv4 options (record route)",
        Tcp4 {
            // Record route (type 7, length 7, pointer 4, one empty slot).
            options: vec![7, 7, 4, 0, 0, 0, 0],
            ..base.clone()
        },
    );
    let mut out2 = out;
    for proto in [0u8, 2, 47, 50, 132, 253, 255] {
        out2.push((
            format!("ip protocol {proto}"),
            ipv4_other(src, vip, proto, b"hello"),
        ));
    }
    out2.push((
        "udp to a tcp service".into(),
        ipv4_other(src, vip, 17, &[0x9c, 0x40, 0, 80, 0, 9, 0, 0, 0x41]),
    ));
    out2.push((
        "tcp header cut short".into(),
        ipv4_other(src, vip, 6, &[0x9c, 0x40, 0, 80, 1, 2]),
    ));
    out2
}

/// IPv6 classes toward a UDP service at `dst`: an extension header before
/// UDP, hop limit 1, both.
pub fn hostile_v6(src: Ipv6Addr, dst: SocketAddr) -> Vec<(String, Vec<u8>)> {
    let IpAddr::V6(vip) = dst.ip() else {
        panic!("an IPv6 destination")
    };
    vec![
        (
            "ipv6 destination options before udp".into(),
            udp6(src, vip, 40001, dst.port(), 64, true, b"x"),
        ),
        (
            "ipv6 hop limit 1".into(),
            udp6(src, vip, 40002, dst.port(), 1, false, b"x"),
        ),
        (
            "ipv6 hop limit 1 with options".into(),
            udp6(src, vip, 40003, dst.port(), 1, true, b""),
        ),
    ]
}
