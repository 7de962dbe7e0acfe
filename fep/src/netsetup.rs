//! The gateway's network set-up that fep does itself, and undoes on exit:
//!
//! - IPv4/IPv6 forwarding on; loose reverse-path filtering on the TUN device
//!   (rewritten client packets enter it with the client's source address);
//! - a route for each VIP into the TUN device;
//! - policy routing for the return path: a rule per back-end endpoint
//!   (`from ADDR ipproto P sport PORT`) sends back ends' replies to
//!   `policy_table`, whose default route is the TUN device.
//!
//! [`NetSetup::reconcile`] brings the host to what a transfer table needs —
//! adding and removing VIP routes and rules as services and back ends come
//! and go — and keeps them for removed ones while they still carry routes.
//! Uses the `ip` command of iproute2: each call reported with the exact
//! command on failure. Rules a killed fep left behind are removed at start.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use crate::transfer_table::TransferTable;
use crate::wire::icmp::{ICMPV4, ICMPV6};
use crate::wire::ip_from_addr;

/// Priority of fep's policy rules: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{cmd}` failed: {detail} (fep needs root or CAP_NET_ADMIN, and iproute2's `ip`)")]
    Command { cmd: String, detail: String },
    #[error(
        "cannot set sysctl {path}: {source} (fep needs root, in the gateway's network namespace)"
    )]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// A return-path rule: a back end's (address, IP protocol number, source
/// port), the port absent for its ICMP errors.
type Endpoint = (IpAddr, u8, Option<u16>);

/// What fep changed on the host.
#[derive(Debug)]
pub struct NetSetup {
    tun: String,
    table: String,
    families: BTreeSet<Family>,
    vips: BTreeSet<IpAddr>,
    rules: BTreeSet<Endpoint>,
    /// Sysctls to put back, in the order they were changed.
    sysctls: Vec<(String, String)>,
}

impl NetSetup {
    /// Set-up around the TUN device `tun`; removes rules to `policy_table`
    /// that an fep killed without its clean-up left behind.
    pub fn new(tun: &str, policy_table: u32) -> Self {
        let table = policy_table.to_string();
        for fam in [Family::V4, Family::V6] {
            remove_stale(fam, &table);
        }
        NetSetup {
            tun: tun.to_string(),
            table,
            families: BTreeSet::new(),
            vips: BTreeSet::new(),
            rules: BTreeSet::new(),
            sysctls: Vec::new(),
        }
    }

    /// Brings VIP routes and return-path rules to what `table` needs:
    /// every configured service and back end, and removed ones that still
    /// carry routes. Does nothing when nothing changed.
    pub fn reconcile(&mut self, table: &TransferTable) -> Result<(), NetError> {
        let mut vips = BTreeSet::new();
        let mut rules = BTreeSet::new();
        for svc in table.services() {
            let carrying = |routes: u32| routes > 0;
            let backends: Vec<_> = svc
                .backends
                .iter()
                .filter(|b| (!b.removed && !svc.removed) || carrying(b.routes()))
                .collect();
            if svc.removed && backends.is_empty() {
                continue;
            }
            vips.insert(ip_from_addr(&svc.vip));
            for b in backends {
                let addr = ip_from_addr(&b.addr);
                rules.insert((addr, svc.protocol, Some(b.port)));
                // Its ICMP errors about clients' packets, to be translated.
                let icmp = if addr.is_ipv4() { ICMPV4 } else { ICMPV6 };
                rules.insert((addr, icmp, None));
            }
        }
        for fam in vips.iter().map(|v| Family::of(*v)).collect::<BTreeSet<_>>() {
            if !self.families.contains(&fam) {
                self.enable(fam)?;
            }
        }
        for vip in vips.difference(&self.vips.clone()) {
            self.vip(*vip, "replace")?;
            self.vips.insert(*vip);
        }
        for rule in rules.difference(&self.rules.clone()) {
            self.rule(*rule, "add")?;
            self.rules.insert(*rule);
        }
        for rule in self.rules.difference(&rules).copied().collect::<Vec<_>>() {
            self.rule(rule, "del")?;
            self.rules.remove(&rule);
        }
        for vip in self.vips.difference(&vips).copied().collect::<Vec<_>>() {
            self.vip(vip, "del")?;
            self.vips.remove(&vip);
        }
        Ok(())
    }

    /// Forwarding, reverse-path filtering and the return-path table for one
    /// IP family.
    fn enable(&mut self, fam: Family) -> Result<(), NetError> {
        match fam {
            Family::V4 => {
                self.sysctl("net/ipv4/ip_forward", "1")?;
                self.sysctl(&format!("net/ipv4/conf/{}/rp_filter", self.tun), "2")?;
            }
            Family::V6 => self.sysctl("net/ipv6/conf/all/forwarding", "1")?,
        }
        let (flag, table) = (fam.flag(), self.table.as_str());
        run_ip(&[
            flag, "route", "replace", "default", "dev", &self.tun, "table", table,
        ])?;
        // If fep dies without its clean-up (the device goes, its rules stay),
        // back ends' replies are dropped here rather than reaching clients
        // directly, which would reset their connections before fep is back.
        run_ip(&[
            flag,
            "route",
            "replace",
            "blackhole",
            "default",
            "metric",
            "4294967295",
            "table",
            table,
        ])?;
        self.families.insert(fam);
        tracing::info!(
            "{} forwarding on; replies from back ends return through {} via table {}",
            if fam == Family::V4 { "IPv4" } else { "IPv6" },
            self.tun,
            self.table
        );
        Ok(())
    }

    fn vip(&self, vip: IpAddr, op: &str) -> Result<(), NetError> {
        let fam = Family::of(vip);
        let dst = format!("{vip}/{}", fam.host_prefix());
        run_ip(&[fam.flag(), "route", op, &dst, "dev", &self.tun])
    }

    fn rule(&self, (addr, proto, port): Endpoint, op: &str) -> Result<(), NetError> {
        let (prio, from, proto) = (
            RULE_PRIORITY.to_string(),
            addr.to_string(),
            proto.to_string(),
        );
        let port = port.map(|p| p.to_string());
        let fam = Family::of(addr).flag();
        let mut args = vec![
            fam, "rule", op, "priority", &prio, "from", &from, "ipproto", &proto,
        ];
        if let Some(port) = &port {
            args.extend(["sport", port.as_str()]);
        }
        args.extend(["lookup", self.table.as_str()]);
        run_ip(&args)
    }

    fn sysctl(&mut self, path: &str, value: &str) -> Result<(), NetError> {
        let full = format!("/proc/sys/{path}");
        let err = |source| NetError::Sysctl {
            path: path.replace('/', "."),
            source,
        };
        let old = std::fs::read_to_string(&full)
            .map_err(err)?
            .trim()
            .to_string();
        if old != value {
            std::fs::write(&full, value).map_err(err)?;
            self.sysctls.push((full, old));
        }
        Ok(())
    }

    /// Removes every rule, route and sysctl change, newest first; failures
    /// are logged, not fatal.
    pub fn teardown(&mut self) {
        let warn = |r: Result<(), NetError>| {
            if let Err(e) = r {
                tracing::warn!("clean-up: {e}");
            }
        };
        for rule in std::mem::take(&mut self.rules) {
            warn(self.rule(rule, "del"));
        }
        for vip in std::mem::take(&mut self.vips) {
            warn(self.vip(vip, "del"));
        }
        for fam in std::mem::take(&mut self.families) {
            warn(run_ip(&[
                fam.flag(),
                "route",
                "flush",
                "table",
                &self.table,
            ]));
        }
        while let Some((path, old)) = self.sysctls.pop() {
            if let Err(e) = std::fs::write(&path, &old) {
                tracing::warn!("clean-up: cannot restore {path} to {old}: {e}");
            }
        }
    }
}

impl Drop for NetSetup {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes the rules and routes of `table` that an fep killed without its
/// clean-up left behind (bounded: at most 10000 rules).
fn remove_stale(fam: Family, table: &str) {
    let mut removed = 0;
    while removed < 10_000 && run_ip(&[fam.flag(), "rule", "del", "lookup", table]).is_ok() {
        removed += 1;
    }
    if removed > 0 {
        tracing::warn!(
            "removed {removed} stale {} rules to table {table} left by an earlier fep",
            fam.flag()
        );
    }
    let _ = run_ip(&[fam.flag(), "route", "flush", "table", table]);
}

fn run_ip(args: &[&str]) -> Result<(), NetError> {
    let cmd = format!("ip {}", args.join(" "));
    tracing::debug!("{cmd}");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Command {
            cmd: cmd.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            cmd,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
