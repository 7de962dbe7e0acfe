//! Copies of the UDP routes front ends assigned to this node. A UDP flow
//! leaves nothing in the socket table, so when a front end dies the one
//! that takes over its VIP group learns the flow's back end from here. The
//! copies outlive the connection to the front end that sent them (that is
//! their point) and are bounded: past [`MAX_COPIES`] new ones are refused
//! and counted, and the flows they stand for are re-chosen after a failover.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use fep_shared::protocol::ConnId;

/// Routes kept at most (some 64 bytes each).
pub const MAX_COPIES: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct RouteCopies {
    /// Per back-end port, the clients' (address, port).
    by_port: HashMap<u16, HashSet<(IpAddr, u16)>>,
    len: usize,
    /// Copies refused because the store was full, since the start.
    refused: u64,
}

impl RouteCopies {
    /// Keeps `conns`; how many were refused for want of room.
    pub fn keep(&mut self, conns: &[ConnId]) -> usize {
        let mut refused = 0;
        for c in conns {
            let known = self
                .by_port
                .get(&c.port)
                .is_some_and(|s| s.contains(&(c.client, c.client_port)));
            if known {
                continue;
            }
            if self.len >= MAX_COPIES {
                refused += 1;
                continue;
            }
            self.by_port
                .entry(c.port)
                .or_default()
                .insert((c.client, c.client_port));
            self.len += 1;
        }
        self.refused += refused as u64;
        refused
    }

    /// Drops `conns` (unknown ones are ignored: a front end forgets every
    /// UDP route it ends, kept or not).
    pub fn forget(&mut self, conns: &[ConnId]) {
        for c in conns {
            let Some(set) = self.by_port.get_mut(&c.port) else {
                continue;
            };
            if set.remove(&(c.client, c.client_port)) {
                self.len -= 1;
            }
            if set.is_empty() {
                self.by_port.remove(&c.port);
            }
        }
    }

    /// The kept routes on `ports`.
    pub fn on_ports(&self, ports: &[u16]) -> Vec<ConnId> {
        ports
            .iter()
            .filter_map(|p| self.by_port.get(p).map(|set| (*p, set)))
            .flat_map(|(port, set)| {
                set.iter().map(move |&(client, client_port)| ConnId {
                    client,
                    client_port,
                    port,
                })
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(n: u32, port: u16) -> ConnId {
        ConnId {
            client: IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (n >> 16))),
            client_port: n as u16,
            port,
        }
    }

    #[test]
    fn kept_routes_are_listed_by_port_until_forgotten() {
        let mut c = RouteCopies::default();
        assert_eq!(
            c.keep(&[conn(1, 53), conn(2, 53), conn(3, 5000), conn(1, 53)]),
            0
        );
        assert_eq!(c.len(), 3);
        let mut on = c.on_ports(&[53]);
        on.sort();
        assert_eq!(on, [conn(1, 53), conn(2, 53)]);
        assert_eq!(c.on_ports(&[5000, 9999]), [conn(3, 5000)]);
        c.forget(&[conn(1, 53), conn(7, 53), conn(3, 4000)]);
        assert_eq!(c.on_ports(&[53]), [conn(2, 53)]);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn past_the_bound_new_copies_are_refused_and_counted() {
        let mut c = RouteCopies::default();
        let all: Vec<ConnId> = (0..MAX_COPIES as u32).map(|n| conn(n, 53)).collect();
        assert_eq!(c.keep(&all), 0);
        assert_eq!(c.keep(&[conn(0, 53), conn(u32::MAX, 53), conn(1, 54)]), 2);
        assert_eq!((c.len(), c.refused()), (MAX_COPIES, 2));
        c.forget(&[conn(0, 53)]);
        assert_eq!(c.keep(&[conn(1, 54)]), 0);
    }
}
