//! The unit tests' rig: a dispatcher for a config, a worker, and packets
//! built and read back as a client and a back end would.

use std::net::IpAddr;

use etherparse::PacketBuilder;

pub(super) use super::*;
use crate::wire::ip_from_addr;

/// SPEC.md's golden transfer table, with A–F on 10.0.2.1–6, VIP 10.0.0.100.
pub(super) const GOLDEN: &str = r#"
route_idle_timeout_s = 60
max_routes = 100
[[node]]
name = "A"
address = "10.0.2.1"
[[node]]
name = "B"
address = "10.0.2.2"
[[node]]
name = "C"
address = "10.0.2.3"
[[node]]
name = "D"
address = "10.0.2.4"
[[node]]
name = "E"
address = "10.0.2.5"
[[node]]
name = "F"
address = "10.0.2.6"
[[service]]
name = "s8080"
vip = "10.0.0.100"
port = 8080
protocol = "tcp"
backend = [{ node = "A", ratio = 1 }, { node = "B", ratio = 1 }]
[[service]]
name = "s8081"
vip = "10.0.0.100"
port = 8081
protocol = "tcp"
backend = [{ node = "C", ratio = 2 }, { node = "D", ratio = 1 }]
[[service]]
name = "s8082"
vip = "10.0.0.100"
port = 8082
protocol = "tcp"
backend = [{ node = "E", ratio = 1 }, { node = "F", ratio = 1 }]
"#;

pub(super) const VIP: [u8; 4] = [10, 0, 0, 100];

pub(super) struct Rig {
    pub(super) d: Dispatcher,
    pub(super) w: std::cell::RefCell<Worker>,
}

pub(super) fn rig(text: &str) -> Rig {
    Rig {
        d: Dispatcher::new(&FepConfig::parse(text).unwrap()),
        w: std::cell::RefCell::new(Worker::new(Arc::default())),
    }
}

pub(super) fn client(n: u8) -> [u8; 4] {
    [192, 0, 2, n]
}

pub(super) fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 1000);
    if flags & tcp_flags::SYN != 0 {
        b = b.syn();
    }
    if flags & tcp_flags::ACK != 0 {
        b = b.ack(1);
    }
    if flags & tcp_flags::FIN != 0 {
        b = b.fin();
    }
    if flags & tcp_flags::RST != 0 {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, b"data").unwrap();
    out
}

pub(super) const SYN: u8 = tcp_flags::SYN;
pub(super) const ACK: u8 = tcp_flags::ACK;
pub(super) const FIN_ACK: u8 = tcp_flags::FIN | tcp_flags::ACK;

impl Rig {
    pub(super) fn run(&self, mut pkt: Vec<u8>, now: u32) -> (Verdict, Vec<u8>) {
        let v = self.d.process(&mut pkt, now, &mut self.w.borrow_mut());
        (v, pkt)
    }

    /// Sends a client packet; returns the back end's node name it went to.
    pub(super) fn send(
        &self,
        client: [u8; 4],
        sport: u16,
        port: u16,
        flags: u8,
        now: u32,
    ) -> Result<String, DropReason> {
        match self.run(tcp(client, sport, VIP, port, flags), now) {
            (Verdict::Forward(_), out) => {
                let p = etherparse::SlicedPacket::from_ip(&out).unwrap();
                let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
                    panic!()
                };
                let dst = IpAddr::V4(ip.header().destination_addr());
                let table = self.d.table();
                let node = table
                    .services()
                    .iter()
                    .flat_map(|s| &s.backends)
                    .find(|b| ip_from_addr(&b.addr) == dst)
                    .unwrap();
                Ok(node.node.clone())
            }
            (Verdict::Drop(r), _) => Err(r),
            (Verdict::Hold(g), _) => panic!("held by group {g}"),
        }
    }

    /// Sends a back end's reply; returns the (source, source port) the client sees.
    pub(super) fn reply(
        &self,
        node_ip: [u8; 4],
        port: u16,
        client: [u8; 4],
        cport: u16,
        flags: u8,
        now: u32,
    ) -> Result<(IpAddr, u16), DropReason> {
        match self.run(tcp(node_ip, port, client, cport, flags), now) {
            (Verdict::Forward(_), out) => {
                let p = etherparse::SlicedPacket::from_ip(&out).unwrap();
                let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
                    panic!()
                };
                let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
                    panic!()
                };
                Ok((IpAddr::V4(ip.header().source_addr()), t.source_port()))
            }
            (Verdict::Drop(r), _) => Err(r),
            (Verdict::Hold(g), _) => panic!("held by group {g}"),
        }
    }

    pub(super) fn counters(&self) -> Arc<WorkerCounters> {
        self.w.borrow().counters.clone()
    }

    pub(super) fn routes(&self) -> usize {
        self.d.routes().len()
    }
}

/// GOLDEN with a UDP service on port 53 over A and B.
pub(super) fn with_udp() -> Rig {
    rig(&udp_config())
}

pub(super) fn udp_config() -> String {
    format!(
        "{GOLDEN}\n[[service]]\nname = \"s53\"\nvip = \"10.0.0.100\"\nport = 53\nprotocol = \"udp\"\n\
         backend = [{{ node = \"A\", ratio = 1 }}, {{ node = \"B\", ratio = 1 }}]\n"
    )
}

pub(super) fn udp_v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, b"q")
        .unwrap();
    out
}

impl Rig {
    /// A client datagram to VIP:53; the back end's address it went to.
    pub(super) fn udp(&self, client: [u8; 4], sport: u16, now: u32) -> Result<[u8; 4], DropReason> {
        match self.run(udp_v4(client, sport, VIP, 53), now) {
            (Verdict::Forward(_), out) => Ok(out[16..20].try_into().unwrap()),
            (Verdict::Drop(r), _) => Err(r),
            (Verdict::Hold(g), _) => panic!("held by group {g}"),
        }
    }

    pub(super) fn udp_reply(&self, be: [u8; 4], client: [u8; 4], cport: u16, now: u32) {
        let (v, _) = self.run(udp_v4(be, 53, client, cport), now);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
    }

    pub(super) fn confirmed(&self) -> Vec<Confirmed> {
        let mut all = Vec::new();
        self.d.take_confirmed(|c| all.push(c));
        all
    }

    /// A TCP connection through its handshake: confirmed.
    pub(super) fn connect(&self, client: [u8; 4], sport: u16, now: u32) {
        let be = self.send(client, sport, 8080, SYN, now).unwrap();
        let be_ip = if be == "A" {
            [10, 0, 2, 1]
        } else {
            [10, 0, 2, 2]
        };
        self.reply(be_ip, 8080, client, sport, SYN | ACK, now)
            .unwrap();
        self.send(client, sport, 8080, ACK, now).unwrap();
    }
}
