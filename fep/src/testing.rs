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

/// The folded one's-complement sum of `data` (big-endian 16-bit words, an
/// odd last byte padded) on top of `init`: 0xffff over data that includes a
/// right checksum.
pub fn ones_sum(init: u16, data: &[u8]) -> u16 {
    let mut sum = u32::from(init);
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        if sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    sum as u16
}

/// The pseudo-header sum of an IPv4/IPv6 packet whose L4 part (protocol
/// `proto`) is `l4_len` bytes: what an offloading sender leaves in the L4
/// checksum field, and where a full checksum starts.
pub fn pseudo_header_sum(bytes: &[u8], v4: bool, l4_len: usize, proto: u8) -> u16 {
    if v4 {
        let s = ones_sum(0, &bytes[12..20]);
        let s = ones_sum(s, &[0, proto]);
        ones_sum(s, &(l4_len as u16).to_be_bytes())
    } else {
        let s = ones_sum(0, &bytes[8..40]);
        let s = ones_sum(s, &(l4_len as u32).to_be_bytes());
        ones_sum(s, &[0, 0, 0, proto])
    }
}

/// Checks the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6
/// checksum of a packet from scratch.
pub fn checksums_ok(bytes: &[u8]) -> Result<(), String> {
    let ip = IpSlice::from_slice(bytes).map_err(|e| format!("not an IP packet: {e}"))?;
    let p = ip.payload();
    let (l4, proto) = (p.payload, p.ip_number.0);
    let v4 = matches!(ip, IpSlice::Ipv4(_));
    if let IpSlice::Ipv4(v4) = &ip {
        if ones_sum(0, v4.header().slice()) != 0xffff {
            return Err("IPv4 header checksum".into());
        }
    }
    let pseudo = pseudo_header_sum(bytes, v4, l4.len(), proto);
    let ok = match proto {
        6 | 58 => ones_sum(pseudo, l4) == 0xffff,
        17 => (v4 && l4.get(6..8) == Some(&[0, 0])) || ones_sum(pseudo, l4) == 0xffff,
        1 => ones_sum(0, l4) == 0xffff,
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

/// HTTP mode's client side fed `input` as one connection's bytes, with the
/// limits of `cfg` (see `http_mode`): what the client would read back.
/// Nothing leaves the process (no back end is involved).
pub fn http_client_edge(cfg: &fep_shared::HttpConfig, input: &[u8]) -> Vec<u8> {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(crate::http_mode::client_edge(cfg, input)))
}

/// The DNS server's answers to `query` (UDP, from 192.0.2.1) for a zone
/// `example.test` with one name, `www.example.test`, at two sites: what
/// the querier would read from the server (empty: nothing), and from the
/// general path alone. No socket is involved.
pub fn dns_answers(query: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    use crate::sites::dns::Scratch;
    use crate::sites::dns::{Lookup, Zone};
    use fep_shared::sites_config::DnsConfig;
    use fep_shared::{NameConfig, NameSite, WhenAllDown};
    use std::net::IpAddr;
    use std::sync::OnceLock;

    struct TwoSites;
    impl Lookup for TwoSites {
        fn addresses(&self, _: usize, v6: bool, _: IpAddr, out: &mut Vec<IpAddr>) {
            let all: [IpAddr; 3] = [
                [10, 9, 1, 100].into(),
                [10, 9, 2, 100].into(),
                [0xfd00, 0, 0, 0, 0, 0, 0, 1].into(),
            ];
            out.extend(all.into_iter().filter(|a| a.is_ipv6() == v6));
        }
    }
    static ZONE: OnceLock<Zone> = OnceLock::new();
    let zone = ZONE.get_or_init(|| {
        let dns = DnsConfig {
            listen: Vec::new(),
            zone: "example.test".into(),
            ns: vec!["ns1.example.test".into()],
            ns_addresses: Default::default(),
            hostmaster: "hostmaster".into(),
            negative_ttl_s: 60,
            max_tcp_connections: 1,
            tcp_idle_timeout_ms: 1000,
        };
        let name = NameConfig {
            name: "www.example.test".into(),
            port: 80,
            ttl_s: 60,
            ohw: vec![4, 2, 1],
            when_all_down: WhenAllDown::LastHealthy,
            check_path: None,
            sites: vec![NameSite {
                site: "a".into(),
                vips: vec![[10, 9, 1, 100].into()],
                check_address: None,
            }],
        };
        Zone::new(&dns, &[name]).expect("a valid zone")
    });
    let src: IpAddr = [192, 0, 2, 1].into();
    let mut out = Vec::new();
    zone.answer_udp(query, src, &TwoSites, &mut Scratch::default(), &mut out);
    (out, zone.answer(query, src, false, &TwoSites).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_catches_a_wrong_checksum() {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 1, 2], [10, 0, 0, 100], 64)
            .tcp(40000, 80, 1, 1000)
            .write(&mut p, b"abc")
            .unwrap();
        assert_eq!(checksums_ok(&p), Ok(()));
        let last = p.len() - 1;
        p[last] ^= 1;
        assert_eq!(checksums_ok(&p), Err("protocol 6 checksum".into()));
        p[last] ^= 1;
        p[8] ^= 1; // TTL: the IPv4 header checksum
        assert_eq!(checksums_ok(&p), Err("IPv4 header checksum".into()));
    }
}
