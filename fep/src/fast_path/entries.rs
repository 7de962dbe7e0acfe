//! What the kernel program's `routes` map holds for one route: an entry per
//! direction, keyed by the packet's own 5-tuple, saying which end to rewrite
//! and to what. The layouts are the C program's (`fep/bpf/fast_path.bpf.c`).

use std::net::IpAddr;

use crate::routes::{state, FlowKey};
use crate::transfer_table::{Backend, Service};
use crate::wire::{ip_from_addr, Addr};

/// `struct flow_key`: a packet's family, protocol, ports (network order)
/// and addresses (IPv4 in the first four bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct KernelKey {
    family: u8,
    protocol: u8,
    sport: [u8; 2],
    dport: [u8; 2],
    pad: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// `flow_action.direction`: rewrite the destination (client → back end).
const TO_BACKEND: u8 = 0;
/// `flow_action.direction`: rewrite the source (back end → client).
const TO_CLIENT: u8 = 1;

/// `struct flow_action`: the new address and port, and the monotonic time
/// of the route's last packet, which the kernel writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct KernelAction {
    addr: [u8; 16],
    port: [u8; 2],
    direction: u8,
    pad: [u8; 5],
    pub(crate) last_ns: u64,
}

// SAFETY: plain `repr(C)` data with no padding the compiler adds (the pads
// are fields), valid for any bytes.
unsafe impl aya::Pod for KernelKey {}
// SAFETY: as above.
unsafe impl aya::Pod for KernelAction {}

/// The two entries of a route of `svc` to `backend`: the client's packets
/// (to the VIP) and the back end's replies (to the client).
pub(crate) fn entries(
    key: &FlowKey,
    svc: &Service,
    backend: &Backend,
) -> [(KernelKey, KernelAction); 2] {
    let (family, client) = packed(&key.client);
    let (_, vip) = packed(&svc.vip);
    let (_, be) = packed(&backend.addr);
    let at = |saddr, sport: u16, daddr, dport: u16| KernelKey {
        family,
        protocol: svc.protocol,
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        pad: 0,
        saddr,
        daddr,
    };
    let action = |addr, port: u16, direction| KernelAction {
        addr,
        port: port.to_be_bytes(),
        direction,
        ..KernelAction::default()
    };
    [
        (
            at(client, key.client_port, vip, svc.port),
            action(be, backend.port, TO_BACKEND),
        ),
        (
            at(be, backend.port, client, key.client_port),
            action(vip, svc.port, TO_CLIENT),
        ),
    ]
}

/// Whether a route may be forwarded in the kernel: established and not
/// closing (its FIN or RST is the TUN path's), of a live TUN-path service
/// outside VIP groups (whose packets a hold must be able to store).
pub(crate) fn eligible(svc: &Service, backend: &Backend, route_state: u8) -> bool {
    let closing = state::FIN_FROM_CLIENT | state::FIN_FROM_BACKEND | state::RESET;
    !svc.removed
        && svc.http.is_none()
        && svc.group.is_none()
        && !backend.removed
        && !state::is_unconfirmed(route_state)
        && route_state & closing == 0
}

/// The family (4 or 6) and the address as the kernel program keys it.
fn packed(addr: &Addr) -> (u8, [u8; 16]) {
    match ip_from_addr(addr) {
        IpAddr::V4(v4) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&v4.octets());
            (4, out)
        }
        IpAddr::V6(v6) => (6, v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use fep_shared::FepConfig;

    use super::*;
    use crate::transfer_table::TransferTable;
    use crate::wire::addr_from_ip;

    #[test]
    fn layouts_are_the_c_programs() {
        assert_eq!(std::mem::size_of::<KernelKey>(), 40);
        assert_eq!(std::mem::size_of::<KernelAction>(), 32);
        assert_eq!(std::mem::offset_of!(KernelAction, last_ns), 24);
    }

    #[test]
    fn a_route_gives_one_entry_per_direction_with_the_other_end_to_write() {
        // testing::CONFIG: web 10.0.0.100:80 → be1 10.0.2.11:80, be2 :8080.
        let t = TransferTable::from_config(&FepConfig::parse(crate::testing::CONFIG).unwrap());
        let web = t.service(0);
        let be2 = &web.backends[1];
        let key = FlowKey {
            service: 0,
            client_port: 40000,
            client: addr_from_ip("192.0.2.7".parse().unwrap()),
        };
        let [(fk, fa), (rk, ra)] = entries(&key, web, be2);
        let v4 = |a: [u8; 4]| {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a);
            out
        };
        assert_eq!(
            fk,
            KernelKey {
                family: 4,
                protocol: 6,
                sport: 40000u16.to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                pad: 0,
                saddr: v4([192, 0, 2, 7]),
                daddr: v4([10, 0, 0, 100]),
            }
        );
        assert_eq!(
            (fa.addr, fa.port, fa.direction),
            (v4([10, 0, 2, 12]), 8080u16.to_be_bytes(), TO_BACKEND)
        );
        assert_eq!(
            (rk.saddr, rk.sport, rk.daddr, rk.dport),
            (
                v4([10, 0, 2, 12]),
                8080u16.to_be_bytes(),
                v4([192, 0, 2, 7]),
                40000u16.to_be_bytes()
            )
        );
        assert_eq!(
            (ra.addr, ra.port, ra.direction),
            (v4([10, 0, 0, 100]), 80u16.to_be_bytes(), TO_CLIENT)
        );
    }

    #[test]
    fn only_established_open_routes_of_plain_services_go_to_the_kernel() {
        let t = TransferTable::from_config(&FepConfig::parse(crate::testing::CONFIG).unwrap());
        let web = t.service(0);
        let be = &web.backends[0];
        assert!(eligible(web, be, state::ESTABLISHED | state::REPLIED));
        assert!(!eligible(web, be, state::REPLIED), "embryonic");
        for closing in [
            state::FIN_FROM_CLIENT,
            state::FIN_FROM_BACKEND,
            state::RESET,
        ] {
            assert!(!eligible(web, be, state::ESTABLISHED | closing));
        }
    }
}
