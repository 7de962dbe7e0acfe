//! What the host should have for a transfer table, and the changes that get
//! it there from what is installed: pure, so that the order that leaves no
//! gap in the return path is tested without touching a host.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::transfer_table::TransferTable;
use crate::wire::icmp::{ICMPV4, ICMPV6};
use crate::wire::ip_from_addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub(crate) fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    pub(crate) fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// A return-path rule: a back end's (address, IP protocol number, source
/// port), the port absent for its ICMP errors.
pub(crate) type ReturnRule = (IpAddr, u8, Option<u16>);

/// An HTTP service's (VIP, port): delivered to fep's own listener by a
/// rule (`to VIP ipproto tcp dport PORT`) to a local route in the policy
/// table, while the VIP's other ports go into the TUN device.
pub(crate) type Local = (IpAddr, u16);

/// VIP routes into the TUN device, return-path rules and HTTP listeners'
/// local delivery.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Wanted {
    pub vips: BTreeSet<IpAddr>,
    pub rules: BTreeSet<ReturnRule>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub locals: BTreeSet<Local>,
}

impl Wanted {
    /// Every configured service and back end, and removed ones that still
    /// carry routes (their clients keep being served until they leave).
    pub(crate) fn of(table: &TransferTable) -> Self {
        let mut wanted = Wanted::default();
        for svc in table.services() {
            let backends: Vec<_> = svc
                .backends
                .iter()
                .filter(|b| (!b.removed && !svc.removed) || b.routes() > 0)
                .collect();
            if svc.removed && backends.is_empty() {
                continue;
            }
            wanted.vips.insert(ip_from_addr(&svc.vip));
            if svc.http.is_some() {
                // Its server connections are fep's own: no return path.
                if !svc.removed {
                    wanted.locals.insert((ip_from_addr(&svc.vip), svc.port));
                }
                continue;
            }
            for b in backends {
                let addr = ip_from_addr(&b.addr);
                wanted.rules.insert((addr, svc.protocol, Some(b.port)));
                // Its ICMP errors about clients' packets, to be translated.
                let icmp = if addr.is_ipv4() { ICMPV4 } else { ICMPV6 };
                wanted.rules.insert((addr, icmp, None));
            }
        }
        wanted
    }

    /// The IP families the VIPs are in: each needs forwarding and a table.
    pub(crate) fn families(&self) -> BTreeSet<Family> {
        self.vips.iter().map(|v| Family::of(*v)).collect()
    }
}

/// One change to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    AddVip(IpAddr),
    AddRule(ReturnRule),
    AddLocal(Local),
    DelLocal(Local),
    DelRule(ReturnRule),
    DelVip(IpAddr),
}

/// The changes from `installed` (what this fep added) and `leftovers` (what
/// an earlier fep added, which may or may not still be on the host) to
/// `wanted`. Additions come first, so that a rule replaced by another never
/// leaves a gap in the return path; a leftover still wanted is added again
/// (an existing one is taken over as it is), so one lost with a reboot comes
/// back.
pub(crate) fn changes(installed: &Wanted, leftovers: &Wanted, wanted: &Wanted) -> Vec<Change> {
    let mut out = Vec::new();
    out.extend(added(&installed.vips, &wanted.vips).map(Change::AddVip));
    out.extend(added(&installed.rules, &wanted.rules).map(Change::AddRule));
    out.extend(added(&installed.locals, &wanted.locals).map(Change::AddLocal));
    out.extend(removed(&installed.locals, &leftovers.locals, &wanted.locals).map(Change::DelLocal));
    out.extend(removed(&installed.rules, &leftovers.rules, &wanted.rules).map(Change::DelRule));
    out.extend(removed(&installed.vips, &leftovers.vips, &wanted.vips).map(Change::DelVip));
    out
}

fn added<'a, T: Ord + Copy>(
    installed: &'a BTreeSet<T>,
    wanted: &'a BTreeSet<T>,
) -> impl Iterator<Item = T> + 'a {
    wanted.difference(installed).copied()
}

fn removed<'a, T: Ord + Copy>(
    installed: &'a BTreeSet<T>,
    leftovers: &'a BTreeSet<T>,
    wanted: &'a BTreeSet<T>,
) -> impl Iterator<Item = T> + 'a {
    installed
        .union(leftovers)
        .filter(|x| !wanted.contains(x))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CONFIG;
    use fep_shared::FepConfig;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set<T: Ord + Copy>(items: &[T]) -> BTreeSet<T> {
        items.iter().copied().collect()
    }

    #[test]
    fn a_table_wants_its_vips_and_a_port_rule_and_an_icmp_rule_per_back_end() {
        let cfg = FepConfig::parse(CONFIG).unwrap();
        let wanted = Wanted::of(&TransferTable::build(&cfg, None));
        assert_eq!(wanted.vips, set(&[ip("10.0.0.100"), ip("fd00::100")]));
        assert_eq!(wanted.families(), set(&[Family::V4, Family::V6]));
        let be2 = ip("10.0.2.12");
        for rule in [
            (be2, 6, Some(8080)),
            (be2, 17, Some(53)),
            (be2, ICMPV4, None),
        ] {
            assert!(wanted.rules.contains(&rule), "{rule:?}");
        }
        assert!(wanted.rules.contains(&(ip("fd00:2::11"), ICMPV6, None)));
        // be1 (web 80, dns 53, icmp), be2 (8080, 53, icmp), be1v6 (80, 53,
        // icmp), be2v6 (80, icmp).
        assert_eq!(wanted.rules.len(), 11);
    }

    #[test]
    fn a_removed_service_is_wanted_while_it_carries_routes() {
        let cfg = FepConfig::parse(CONFIG).unwrap();
        let before = TransferTable::build(&cfg, None);
        let mut v6_removed = cfg.clone();
        v6_removed.services.retain(|s| !s.vip.is_ipv6());
        let after = TransferTable::build(&v6_removed, Some(&before));
        assert!(!Wanted::of(&after).vips.contains(&ip("fd00::100")));
        let web6 = after.services().iter().find(|s| s.name == "web6").unwrap();
        web6.backends[0].route_added();
        let wanted = Wanted::of(&after);
        assert!(wanted.vips.contains(&ip("fd00::100")));
        assert!(wanted.rules.contains(&(ip("fd00:2::11"), 6, Some(80))));
        assert!(!wanted.rules.contains(&(ip("fd00:2::12"), 6, Some(80))));
    }

    #[test]
    fn additions_come_before_removals_and_leftovers_still_wanted_are_added_again() {
        let (a, b, c) = (ip("10.0.2.11"), ip("10.0.2.12"), ip("10.0.2.13"));
        let installed = Wanted {
            vips: set(&[ip("10.0.0.1")]),
            rules: set(&[(a, 6, Some(80))]),
            ..Wanted::default()
        };
        let leftovers = Wanted {
            vips: set(&[ip("10.0.0.2")]),
            rules: set(&[(b, 6, Some(80)), (c, 6, Some(80))]),
            ..Wanted::default()
        };
        let wanted = Wanted {
            vips: set(&[ip("10.0.0.3")]),
            rules: set(&[(b, 6, Some(80))]),
            ..Wanted::default()
        };
        assert_eq!(
            changes(&installed, &leftovers, &wanted),
            vec![
                Change::AddVip(ip("10.0.0.3")),
                Change::AddRule((b, 6, Some(80))),
                Change::DelRule((a, 6, Some(80))),
                Change::DelRule((c, 6, Some(80))),
                Change::DelVip(ip("10.0.0.1")),
                Change::DelVip(ip("10.0.0.2")),
            ]
        );
        assert_eq!(changes(&wanted, &Wanted::default(), &wanted), vec![]);
    }
}
