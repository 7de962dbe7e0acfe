//! Checks and a fixture shared by the unit tests, the property tests and the
//! fuzz targets: every checksum of a packet recomputed from scratch (not with
//! the incremental arithmetic under test), and a config with every kind of
//! service.

use etherparse::IpSlice;

/// Services over IPv4 and IPv6, TCP and UDP, port and client affinity, a
/// mapped back-end port, on back ends 10.0.2.11–12 and fd00:2::11–12.
pub const CONFIG: &str = r#"
max_routes = 10000
[[node]]
name = "be1"
address = "10.0.2.11"
[[node]]
name = "be2"
address = "10.0.2.12"
[[node]]
name = "be1v6"
address = "fd00:2::11"
[[node]]
name = "be2v6"
address = "fd00:2::12"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
backend = [{ node = "be1", ratio = 2 }, { node = "be2", ratio = 1, port = 8080 }]
[[service]]
name = "dns"
vip = "10.0.0.100"
port = 53
protocol = "udp"
affinity = "client"
backend = [{ node = "be1", ratio = 1 }, { node = "be2", ratio = 1 }]
[[service]]
name = "web6"
vip = "fd00::100"
port = 80
protocol = "tcp"
scheduler = "least-routes"
backend = [{ node = "be1v6", ratio = 1 }, { node = "be2v6", ratio = 1 }]
[[service]]
name = "dns6"
vip = "fd00::100"
port = 53
protocol = "udp"
backend = [{ node = "be1v6", ratio = 1 }]
"#;

/// The one's-complement sum of `data` on top of `sum`, folded and inverted:
/// 0 when the data includes a right checksum.
fn fold(mut sum: u32, data: &[u8]) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        if sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    !(sum as u16)
}

/// Checks the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6
/// checksum of a packet from scratch.
pub fn checksums_ok(bytes: &[u8]) -> Result<(), String> {
    let ip = IpSlice::from_slice(bytes).map_err(|e| format!("not an IP packet: {e}"))?;
    let p = ip.payload();
    let l4 = p.payload;
    let proto = p.ip_number.0;
    let mut pseudo = 0u32;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    match &ip {
        IpSlice::Ipv4(v4) => {
            let h = v4.header().slice();
            if fold(0, h) != 0 {
                return Err("IPv4 header checksum".into());
            }
            add(&bytes[12..20]);
            add(&[0, proto]);
            add(&(l4.len() as u16).to_be_bytes());
        }
        IpSlice::Ipv6(_) => {
            add(&bytes[8..40]);
            add(&(l4.len() as u32).to_be_bytes());
            add(&[0, 0, 0, proto]);
        }
    }
    let ok = match proto {
        6 | 58 => fold(pseudo, l4) == 0,
        17 => {
            (matches!(ip, IpSlice::Ipv4(_)) && l4.get(6..8) == Some(&[0, 0]))
                || fold(pseudo, l4) == 0
        }
        1 => fold(0, l4) == 0,
        _ => return Ok(()),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("protocol {proto} checksum"))
    }
}

/// What fep forwards must parse again as a packet it handles.
pub fn assert_forwardable(bytes: &[u8]) {
    let mut copy = bytes.to_vec();
    let flow = crate::wire::FlowPacket::new_checked(&mut copy).map(|_| ());
    let mut copy = bytes.to_vec();
    let icmp = crate::wire::icmp::IcmpPacket::new_checked(&mut copy).map(|_| ());
    assert!(
        flow.is_ok() || icmp.is_ok(),
        "fep forwarded a packet it cannot parse: {bytes:02x?}"
    );
}
