//! ICMP policy: echo requests to a VIP are answered; errors about a routed
//! flow are translated toward the side that sent the packet in error; the
//! rest is dropped and counted.

use super::{Dispatcher, Verdict};
use crate::counters::{Count, DropReason, WorkerCounters};
use crate::routes::{FlowKey, ReplyKey};
use crate::transfer_table::TransferTable;
use crate::wire::icmp::{IcmpKind, IcmpPacket};

impl Dispatcher {
    /// ICMP: echo requests to a VIP are answered; errors about a tracked
    /// flow are translated toward the side that sent the packet in error.
    pub(super) fn icmp(
        &self,
        table: &TransferTable,
        buf: &mut [u8],
        counters: &WorkerCounters,
    ) -> Verdict {
        let mut pkt = match IcmpPacket::new_checked(buf) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(e.into()),
        };
        match pkt.kind() {
            IcmpKind::EchoRequest if table.is_vip(&pkt.dst_addr()) => {
                pkt.make_echo_reply();
                counters.count(Count::IcmpEchoReplies);
                Verdict::Forward(pkt.len())
            }
            IcmpKind::Error { .. } => {
                let Some(inner) = pkt.inner() else {
                    return Verdict::Drop(DropReason::UnknownFlow);
                };
                // About a reply fep rewrote (VIP → client), sent to the VIP:
                // to the back end, from the VIP, as about its own packet.
                if table.is_vip(&pkt.dst_addr()) {
                    let Some((id, svc)) = table.lookup(inner.protocol, &inner.src, inner.src_port)
                    else {
                        return Verdict::Drop(DropReason::UnknownFlow);
                    };
                    let key = FlowKey {
                        service: id,
                        client_port: inner.dst_port,
                        client: inner.dst,
                    };
                    let Some(b) = self.routes.backend_of(&key) else {
                        return Verdict::Drop(DropReason::UnknownFlow);
                    };
                    let be = &svc.backends[usize::from(b)];
                    // From the VIP: the original sender (often this very
                    // gateway) would look like a spoofed local address.
                    pkt.translate(
                        Some(&svc.vip),
                        Some(&be.addr),
                        Some((&be.addr, be.port)),
                        None,
                    );
                } else {
                    // From the back-end side about a client's packet: to the
                    // client, as about its packet to the VIP.
                    let reply = ReplyKey {
                        protocol: inner.protocol,
                        backend_port: inner.dst_port,
                        client_port: inner.src_port,
                        backend: inner.dst,
                        client: inner.src,
                    };
                    let Some(key) = self.find_reply(table, &reply, |_| true) else {
                        return Verdict::Drop(DropReason::UnknownFlow);
                    };
                    let svc = table.service(key.service);
                    let from_backend = pkt.src_addr() == inner.dst;
                    pkt.translate(
                        from_backend.then_some(&svc.vip),
                        None,
                        None,
                        Some((&svc.vip, svc.port)),
                    );
                }
                counters.count(Count::IcmpErrorsTranslated);
                Verdict::Forward(pkt.len())
            }
            IcmpKind::EchoRequest => Verdict::Drop(DropReason::UnknownFlow),
            IcmpKind::Other => Verdict::Drop(DropReason::UnsupportedProtocol),
        }
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::super::rig::*;
    use super::*;

    #[test]
    fn icmp_echo_to_a_vip_is_answered_and_errors_about_routes_are_translated() {
        use crate::wire::icmp::tests::{assert_icmp_checksums, error_v4};
        let r = rig(GOLDEN);
        let mut ping = Vec::new();
        PacketBuilder::ipv4(client(9), VIP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, b"x")
            .unwrap();
        let (v, out) = r.run(ping.clone(), 0);
        assert!(matches!(v, Verdict::Forward(_)));
        assert_eq!((&out[12..16], &out[16..20]), (&VIP[..], &client(9)[..]));
        ping[16..20].copy_from_slice(&[10, 9, 9, 9]);
        assert_eq!(
            r.run(ping, 0).0,
            Verdict::Drop(DropReason::UnknownFlow),
            "not a VIP"
        );

        // A route: client(1):40000 → 8080 → A (10.0.2.1).
        r.send(client(1), 40000, 8080, SYN, 0).unwrap();
        // The gateway cannot pass the reply VIP:8080 → client on: its
        // error goes to the VIP, and fep hands it to A about A's own segment.
        let (v, out) = r.run(
            error_v4(
                "10.0.1.1",
                "10.0.0.100",
                "10.0.0.100",
                8080,
                "192.0.2.1",
                40000,
            ),
            1,
        );
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[16..20], &[10, 0, 2, 1], "to the back end");
        assert_eq!(
            &out[28 + 12..28 + 16],
            &[10, 0, 2, 1],
            "about its own packet"
        );
        assert_icmp_checksums(&out);
        // A itself reports a problem with the client's segment: to the
        // client, from the VIP, about its segment to the VIP.
        let (v, out) = r.run(
            error_v4(
                "10.0.2.1",
                "192.0.2.1",
                "192.0.2.1",
                40000,
                "10.0.2.1",
                8080,
            ),
            1,
        );
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!((&out[12..16], &out[28 + 16..28 + 20]), (&VIP[..], &VIP[..]));
        assert_icmp_checksums(&out);
        // About no known route: dropped.
        let (v, _) = r.run(
            error_v4(
                "10.0.1.1",
                "10.0.0.100",
                "10.0.0.100",
                8080,
                "192.0.2.77",
                1,
            ),
            1,
        );
        assert_eq!(v, Verdict::Drop(DropReason::UnknownFlow));
    }

    /// An IPv6 packet `src:sport → dst:dport`: a TCP segment with 1400
    /// bytes of data, or a UDP datagram.
    fn packet6(tcp: bool, src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        use crate::wire::icmp::tests::v6;
        let b = PacketBuilder::ipv6(v6(src), v6(dst), 63);
        let mut out = Vec::new();
        if tcp {
            b.tcp(sport, dport, 7, 100)
                .ack(1)
                .write(&mut out, &[0x5a; 1400])
                .unwrap();
        } else {
            b.udp(sport, dport).write(&mut out, b"query").unwrap();
        }
        out
    }

    /// An ICMPv6 error of type `ty` from `from` to `to` quoting `about`: its
    /// IPv6 header and up to 48 bytes (a whole TCP header and some data).
    fn error6(ty: u8, from: &str, to: &str, about: &[u8]) -> Vec<u8> {
        use crate::wire::icmp::tests::v6;
        let quoted = &about[..about.len().min(40 + 48)];
        let mut out = Vec::new();
        PacketBuilder::ipv6(v6(from), v6(to), 64)
            .icmpv6_raw(ty, 0, [0, 0, 0x05, 0x78])
            .write(&mut out, quoted)
            .unwrap();
        out
    }

    #[test]
    fn icmpv6_errors_are_translated_both_ways_with_inner_addresses_and_checksums() {
        use crate::wire::icmp::tests::{assert_icmp_checksums, v6};
        let r = rig(r#"
[[node]]
name = "b1"
address = "fd00:2::11"
[[service]]
name = "web6"
vip = "fd00::100"
port = 80
protocol = "tcp"
backend = [{ node = "b1", ratio = 1, port = 8080 }]
[[service]]
name = "dns6"
vip = "fd00::100"
port = 53
protocol = "udp"
backend = [{ node = "b1", ratio = 1, port = 5353 }]
"#);
        let (client, vip, be) = ("fd00:1::2", "fd00::100", "fd00:2::11");
        let mut syn = Vec::new();
        PacketBuilder::ipv6(v6(client), v6(vip), 64)
            .tcp(40000, 80, 1, 1000)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let (v, out) = r.run(syn, 0);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[24..40], &v6(be)[..]);
        let (v, _) = r.run(packet6(false, client, 5000, vip, 53), 0);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        // What an error carries after the outer IPv6 and ICMPv6 headers must
        // be, byte for byte, the start of `want`: addresses, ports and the
        // L4 checksum as if that packet had been sent.
        let quotes = |out: &[u8], want: &[u8]| {
            assert_eq!(&out[48..], &want[..out.len() - 48], "the quoted packet");
        };

        // "Packet too big" from a router toward the client, about the reply
        // VIP:80 → client: to the back end, from the VIP, about its own
        // segment be:8080 → client.
        let reply = packet6(true, vip, 80, client, 40000);
        let (v, out) = r.run(error6(2, "fd00:1::1", vip, &reply), 1);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!((&out[8..24], &out[24..40]), (&v6(vip)[..], &v6(be)[..]));
        assert_eq!(out[40], 2, "still packet too big");
        quotes(&out, &packet6(true, be, 8080, client, 40000));
        assert_icmp_checksums(&out);

        // The back end's "port unreachable" about the client's datagram
        // client → be:5353: to the client, from the VIP, about its datagram
        // to VIP:53.
        let datagram = packet6(false, client, 5000, be, 5353);
        let (v, out) = r.run(error6(1, be, client, &datagram), 1);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!((&out[8..24], &out[24..40]), (&v6(vip)[..], &v6(client)[..]));
        quotes(&out, &packet6(false, client, 5000, vip, 53));
        assert_icmp_checksums(&out);

        // A router between the back end and the gateway, about the client's
        // segment client → be:8080: to the client, its own source kept,
        // about the segment to VIP:80.
        let segment = packet6(true, client, 40000, be, 8080);
        let (v, out) = r.run(error6(1, "fd00:2::1", client, &segment), 1);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(
            (&out[8..24], &out[24..40]),
            (&v6("fd00:2::1")[..], &v6(client)[..])
        );
        quotes(&out, &packet6(true, client, 40000, vip, 80));
        assert_icmp_checksums(&out);

        // About a flow fep does not know: dropped.
        let stranger = packet6(true, vip, 80, client, 40001);
        let (v, _) = r.run(error6(2, "fd00:1::1", vip, &stranger), 1);
        assert_eq!(v, Verdict::Drop(DropReason::UnknownFlow));
        assert_eq!(r.counters().get(Count::IcmpErrorsTranslated), 3);
    }
}
