//! Property tests over the same entry points the fuzz targets drive: the
//! packet core, the agent protocol decoder and the config parser.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;
use fep::testing::{assert_forwardable, checksums_ok, CONFIG};
use fep::{Dispatcher, Verdict, Worker};
use fep_shared::protocol::{AgentMsg, Key, Session};
use fep_shared::FepConfig;
use proptest::prelude::*;

fn dispatcher() -> Dispatcher {
    Dispatcher::new(&FepConfig::parse(CONFIG).unwrap())
}

/// A well-formed client packet toward one of CONFIG's services.
#[derive(Debug, Clone)]
struct ClientPacket {
    v6: bool,
    tcp: bool,
    client: u32,
    port: u16,
    flags: u8,
    payload: Vec<u8>,
}

fn client_packet() -> impl Strategy<Value = ClientPacket> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<u32>(),
        1u16..,
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..1400),
    )
        .prop_map(|(v6, tcp, client, port, flags, payload)| ClientPacket {
            v6,
            tcp,
            client,
            port,
            flags,
            payload,
        })
}

impl ClientPacket {
    fn bytes(&self) -> Vec<u8> {
        let service_port = if self.tcp { 80 } else { 53 };
        let b = if self.v6 {
            let mut c = [0xfdu8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c[12..].copy_from_slice(&self.client.to_be_bytes());
            PacketBuilder::ipv6(c, "fd00::100".parse::<Ipv6Addr>().unwrap().octets(), 64)
        } else {
            PacketBuilder::ipv4(self.client.to_be_bytes(), [10, 0, 0, 100], 64)
        };
        let mut out = Vec::new();
        if self.tcp {
            let mut t = b.tcp(self.port, service_port, 1, 1000);
            let f = self.flags;
            if f & 0x02 != 0 {
                t = t.syn();
            }
            if f & 0x10 != 0 {
                t = t.ack(5);
            }
            if f & 0x01 != 0 {
                t = t.fin();
            }
            if f & 0x04 != 0 {
                t = t.rst();
            }
            t.write(&mut out, &self.payload).unwrap();
        } else {
            b.udp(self.port, service_port)
                .write(&mut out, &self.payload)
                .unwrap();
        }
        out
    }
}

proptest! {
    #[test]
    fn any_bytes_are_handled_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600), now in any::<u32>()) {
        let d = dispatcher();
        let mut w = Worker::new(Default::default());
        let mut buf = bytes.clone();
        if let Verdict::Forward(len) = d.process(&mut buf, now, &mut w) {
            prop_assert!(len <= buf.len());
            assert_forwardable(&buf[..len]);
        }
        d.expire(now);
    }

    #[test]
    fn rewritten_packets_keep_every_checksum_right_both_ways(packets in proptest::collection::vec(client_packet(), 1..20)) {
        let d = dispatcher();
        let mut w = Worker::new(Default::default());
        // The flows (family, protocol, client, port) that have a route.
        let mut routed = std::collections::HashSet::new();
        for (i, p) in packets.iter().enumerate() {
            let mut buf = p.bytes();
            let flow = (p.v6, p.tcp, p.client, p.port);
            // A datagram opens a route, and so does a TCP SYN without ACK or
            // RST (the rest needs one already): CONFIG's table has room.
            let opens = !p.tcp || p.flags & 0x16 == 0x02;
            let forwarded = d.process(&mut buf, i as u32, &mut w);
            prop_assert_eq!(
                matches!(forwarded, Verdict::Forward(_)),
                opens || routed.contains(&flow),
                "client packet {} ({:?}): {:?}", i, p, forwarded
            );
            let Verdict::Forward(len) = forwarded else { continue };
            routed.insert(flow);
            prop_assert!(checksums_ok(&buf[..len]).is_ok(), "forward: {:?}", checksums_ok(&buf[..len]));
            // The back end answers: swap addresses and ports of what fep sent.
            let mut reply = buf[..len].to_vec();
            let (src, dst, l4) = if p.v6 { (8..24, 24..40, 40) } else { (12..16, 16..20, 20) };
            let (s, t) = (reply[src.clone()].to_vec(), reply[dst.clone()].to_vec());
            reply[src].copy_from_slice(&t);
            reply[dst].copy_from_slice(&s);
            let (sp, dp) = (reply[l4..l4 + 2].to_vec(), reply[l4 + 2..l4 + 4].to_vec());
            reply[l4..l4 + 2].copy_from_slice(&dp);
            reply[l4 + 2..l4 + 4].copy_from_slice(&sp);
            // Swapping keeps checksums valid (one's-complement sums commute).
            // Every reply on a route is forwarded.
            let back = d.process(&mut reply, i as u32, &mut w);
            let Verdict::Forward(len) = back else {
                return Err(TestCaseError::fail(format!("the reply to client packet {i} ({p:?}) was not forwarded: {back:?}")));
            };
            prop_assert!(checksums_ok(&reply[..len]).is_ok(), "reply: {:?}", checksums_ok(&reply[..len]));
            let vip_src = if p.v6 { reply[8..24].to_vec() } else { reply[12..16].to_vec() };
            let want = if p.v6 { "fd00::100".parse::<Ipv6Addr>().unwrap().octets().to_vec() } else { Ipv4Addr::new(10, 0, 0, 100).octets().to_vec() };
            prop_assert_eq!(vip_src, want, "the client sees the VIP");
        }
    }

    #[test]
    fn frames_not_sealed_with_the_key_never_open(frame in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut s = Session::new(Key::from_hex(&"42".repeat(32)).unwrap(), [1; 16], [2; 16]);
        prop_assert!(s.open::<AgentMsg>(&frame).is_err());
    }

    #[test]
    fn config_text_gives_a_config_or_an_error(cut in 0usize..CONFIG.len(), junk in ".{0,40}") {
        // Cut the sample config anywhere and append junk: never a panic, and
        // what parses builds a dispatcher.
        let mut end = cut;
        while !CONFIG.is_char_boundary(end) {
            end -= 1;
        }
        let text = format!("{}{junk}", &CONFIG[..end]);
        if let Ok(cfg) = FepConfig::parse(&text) {
            let _ = Dispatcher::new(&cfg);
        }
    }
}
