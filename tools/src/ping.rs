//! ICMP echo (IPv4 and IPv6) from a raw socket, so that the tests check
//! fep's echo replies without a `ping` binary. Needs root (raw sockets);
//! the socket lives in the network namespace of the calling thread.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use pnet_packet::icmp::{self, IcmpPacket, IcmpTypes};
use pnet_packet::icmpv6::Icmpv6Types;
use pnet_packet::ipv4::Ipv4Packet;

/// Distinguishes the echoes of concurrent callers in one namespace.
static NEXT_ID: AtomicU16 = AtomicU16::new(0);
const PAYLOAD: &[u8] = b"fep-tools echo..";

/// Sends one echo request to `dst` and waits up to `timeout` for the
/// matching reply (same identifier, sequence number and payload) from `dst`.
pub fn echo(dst: IpAddr, seq: u16, timeout: Duration) -> anyhow::Result<()> {
    let id = (std::process::id() as u16) ^ NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (family, protocol) = match dst {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        bail!(
            "raw ICMP socket: {} (needs root)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = request(dst.is_ipv6(), id, seq);
    crate::craft::send_to(&fd, &request, dst)
        .map_err(|e| anyhow::anyhow!("sending an echo request to {dst}: {e}"))?;

    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no echo reply from {dst} (sequence {seq}) within {timeout:?}");
        }
        set_receive_timeout(&fd, left)?;
        let (n, from) = match recv_from(&fd, &mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => bail!("receiving from the raw ICMP socket: {e}"),
        };
        if from == Some(dst) && is_reply(dst.is_ipv6(), &buf[..n], id, seq) {
            return Ok(());
        }
    }
}

/// An echo request; the kernel fills in the ICMPv6 checksum (RFC 3542).
fn request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 8 + PAYLOAD.len()];
    p[0] = if v6 {
        Icmpv6Types::EchoRequest.0
    } else {
        IcmpTypes::EchoRequest.0
    };
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..].copy_from_slice(PAYLOAD);
    if !v6 {
        let sum = icmp::checksum(&IcmpPacket::new(&p).expect("8 bytes or more"));
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// Whether `bytes` (with the IPv4 header on an IPv4 raw socket, without a
/// header on an IPv6 one) is the reply to request (`id`, `seq`).
fn is_reply(v6: bool, bytes: &[u8], id: u16, seq: u16) -> bool {
    let icmp = if v6 {
        bytes
    } else {
        match Ipv4Packet::new(bytes) {
            Some(ip) => &bytes[(usize::from(ip.get_header_length()) * 4).min(bytes.len())..],
            None => return false,
        }
    };
    let want = if v6 {
        Icmpv6Types::EchoReply.0
    } else {
        IcmpTypes::EchoReply.0
    };
    icmp.len() >= 8
        && icmp[0] == want
        && icmp[1] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && &icmp[8..] == PAYLOAD
}

fn set_receive_timeout(fd: &OwnedFd, t: Duration) -> anyhow::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        // At least 1 µs: a zero timeout would mean "block forever".
        tv_usec: t.subsec_micros().max(1) as libc::suseconds_t,
    };
    // SAFETY: a valid timeval for the call's duration.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One datagram and the address it came from.
fn recv_from(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<IpAddr>)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid buffers for the call's duration.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut from as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((n as usize, ip_of(&from)))
}

fn ip_of(s: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_has_a_valid_checksum_and_its_reply_matches() {
        let req = request(false, 0x1234, 7);
        // The one's-complement sum over a packet with a right checksum is 0xffff.
        let mut sum: u32 = req
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff, "the checksum verifies");
        let mut reply = req.clone();
        reply[0] = IcmpTypes::EchoReply.0;
        let mut ip = vec![0x45u8];
        ip.resize(20, 0);
        ip.extend_from_slice(&reply);
        assert!(is_reply(false, &ip, 0x1234, 7));
        assert!(!is_reply(false, &ip, 0x1234, 8));
        assert!(!is_reply(false, &req, 0x1234, 7), "a request is no reply");
        let mut reply6 = request(true, 9, 1);
        reply6[0] = Icmpv6Types::EchoReply.0;
        assert!(is_reply(true, &reply6, 9, 1));
        assert!(!is_reply(true, &reply6[..7], 9, 1));
    }
}
