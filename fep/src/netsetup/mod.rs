//! The gateway's network set-up that fep does itself:
//!
//! - IPv4/IPv6 forwarding on; loose reverse-path filtering on the TUN device
//!   (rewritten client packets enter it with the client's source address);
//! - a route for each VIP into the TUN device;
//! - policy routing for the return path: a rule per back-end endpoint
//!   (`from ADDR ipproto P sport PORT`) sends back ends' replies to
//!   `policy_table`, whose default route is the TUN device, with a blackhole
//!   behind it;
//! - for an HTTP service, a rule (`to VIP ipproto tcp dport PORT`) to a
//!   local route for the VIP in the same table, so that its connections
//!   reach fep's listener while the VIP's other ports go into the TUN device.
//!
//! A stop leaves all of it in place (the TUN device is persistent): while no
//! fep reads the device, clients' packets to a VIP and back ends' replies are
//! dropped there, so a restart costs retransmissions, not connections; a
//! back end's reply that went straight to the client would be answered with
//! a reset. [`cleanup`] removes everything (`fep --cleanup`).
//!
//! [`NetSetup::reconcile`] brings the host to what a transfer table needs,
//! and keeps VIP routes and rules of removed services and back ends while
//! they still carry routes. What fep installed, and the sysctl values it
//! found, are kept in `state_dir/network.json`, so a start removes only what
//! is no longer needed (no gap in the return path) and a clean-up can put
//! the sysctls back. Uses the `ip` command of iproute2: each call reported
//! with the exact command on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::transfer_table::TransferTable;

mod plan;

use plan::{Change, Family, Local, ReturnRule, Wanted};

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

/// What fep has installed on the host, as `state_dir/network.json` holds it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Installed {
    tun: String,
    policy_table: u32,
    /// VIP routes and return-path rules (`vips`, `rules` in the file).
    #[serde(flatten)]
    host: Wanted,
    /// Sysctls fep changed, with the values it found before its first start.
    sysctls: BTreeMap<String, String>,
}

fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("network.json")
}

impl Installed {
    /// The record of an earlier fep, if there is one (a damaged one is
    /// reported and treated as absent: the start then removes every rule to
    /// the policy table before adding its own).
    fn load(state_dir: &Path) -> Option<Installed> {
        let path = record_path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::error!("cannot read {}: {e}", path.display());
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(
                    "{} is damaged ({e}); it is rebuilt, and sysctls fep changed before \
                     are no longer known to `fep --cleanup`",
                    path.display()
                );
                None
            }
        }
    }
}

/// What fep changed on the host.
#[derive(Debug)]
pub struct NetSetup {
    state_dir: PathBuf,
    tun: String,
    table: String,
    /// Families whose forwarding and return-path table are set up.
    families: BTreeSet<Family>,
    /// Installed by an earlier fep and not (yet) known to be needed: removed
    /// at the first reconcile unless the transfer table wants them.
    leftovers: Wanted,
    record: Installed,
}

impl NetSetup {
    /// Set-up around the TUN device `tun`, taking over what an earlier fep
    /// with the same state directory installed.
    pub fn new(tun: &str, policy_table: u32, state_dir: &Path) -> Self {
        let table = policy_table.to_string();
        let mut record = Installed {
            tun: tun.to_string(),
            policy_table,
            ..Installed::default()
        };
        let mut leftovers = Wanted::default();
        match Installed::load(state_dir) {
            Some(old) if old.tun == tun && old.policy_table == policy_table => {
                leftovers = old.host;
                record.sysctls = old.sysctls;
            }
            Some(old) => {
                tracing::warn!(
                    "the earlier fep used device {} and table {}: removing its set-up",
                    old.tun,
                    old.policy_table
                );
                remove_device_and_table(&old.tun, &old.policy_table.to_string());
                record.sysctls = old.sysctls;
            }
            // No record: rules to the table are an old fep's, or nobody's.
            None => {
                for fam in [Family::V4, Family::V6] {
                    remove_rules(fam, &table);
                }
            }
        }
        NetSetup {
            state_dir: state_dir.to_path_buf(),
            tun: tun.to_string(),
            table,
            families: BTreeSet::new(),
            leftovers,
            record,
        }
    }

    /// Brings VIP routes and return-path rules to what `table` needs:
    /// every configured service and back end, and removed ones that still
    /// carry routes. Does nothing when nothing changed.
    pub fn reconcile(&mut self, table: &TransferTable) -> Result<(), NetError> {
        let wanted = Wanted::of(table);
        for fam in wanted.families() {
            if !self.families.contains(&fam) {
                self.enable(fam)?;
            }
        }
        let leftovers = std::mem::take(&mut self.leftovers);
        let changes = plan::changes(&self.record.host, &leftovers, &wanted);
        for change in &changes {
            match *change {
                Change::AddVip(vip) => {
                    self.vip(vip, "replace")?;
                    self.record.host.vips.insert(vip);
                }
                Change::AddRule(rule) => {
                    self.rule(rule, "add")?;
                    self.record.host.rules.insert(rule);
                }
                Change::AddLocal(local) => {
                    self.local(local, "add", false)?;
                    self.record.host.locals.insert(local);
                }
                Change::DelLocal(local) => {
                    let vip_still_local = wanted.locals.iter().any(|l| l.0 == local.0);
                    self.local(local, "del", vip_still_local)?;
                    self.record.host.locals.remove(&local);
                }
                Change::DelRule(rule) => {
                    self.rule(rule, "del")?;
                    self.record.host.rules.remove(&rule);
                }
                Change::DelVip(vip) => {
                    self.vip(vip, "del")?;
                    self.record.host.vips.remove(&vip);
                }
            }
        }
        if !changes.is_empty() {
            self.save();
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
        // While no fep reads the device (a restart, or one killed), back
        // ends' replies are dropped rather than reaching clients directly,
        // which would reset their connections before fep is back.
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
            fam.name(),
            self.tun,
            self.table
        );
        Ok(())
    }

    fn vip(&self, vip: IpAddr, op: &str) -> Result<(), NetError> {
        let fam = Family::of(vip);
        let dst = format!("{vip}/{}", fam.host_prefix());
        run_ip(&[fam.flag(), "route", op, &dst, "dev", &self.tun]).or_else(absent_is_done(op))
    }

    fn rule(&self, (addr, proto, port): ReturnRule, op: &str) -> Result<(), NetError> {
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
        run_ip(&args).or_else(absent_is_done(op))
    }

    /// An HTTP listener's delivery: the VIP's local route in the table,
    /// then the rule for (VIP, port) to it; removed in the other order, the
    /// route only when no other port of the VIP stays local (`keep_route`).
    fn local(&self, (vip, port): Local, op: &str, keep_route: bool) -> Result<(), NetError> {
        let fam = Family::of(vip);
        let dst = format!("{vip}/{}", fam.host_prefix());
        let (prio, port) = (RULE_PRIORITY.to_string(), port.to_string());
        let table = self.table.as_str();
        let route = |op: &str| {
            run_ip(&[
                fam.flag(),
                "route",
                op,
                "local",
                &dst,
                "dev",
                "lo",
                "table",
                table,
            ])
            .or_else(absent_is_done(op))
        };
        let rule = |op: &str| {
            run_ip(&[
                fam.flag(),
                "rule",
                op,
                "priority",
                &prio,
                "to",
                &dst,
                "ipproto",
                "tcp",
                "dport",
                &port,
                "lookup",
                table,
            ])
            .or_else(absent_is_done(op))
        };
        if op == "add" {
            route("replace")?;
            rule("add")
        } else {
            rule("del")?;
            if keep_route {
                Ok(())
            } else {
                route("del")
            }
        }
    }

    /// Sets a sysctl, remembering the value found before fep's first start.
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
            self.record.sysctls.entry(full).or_insert(old);
            self.save();
        }
        Ok(())
    }

    fn save(&self) {
        let path = record_path(&self.state_dir);
        let bytes = serde_json::to_vec_pretty(&self.record).expect("the record serialises");
        if let Err(e) = crate::atomic_file::write(&self.state_dir, &path, &bytes) {
            tracing::error!(
                "cannot save {}: {e} (`fep --cleanup` will not know what to put back)",
                path.display()
            );
        }
    }
}

/// Removes everything fep sets up for `tun` and `policy_table`: the device
/// (and its VIP routes with it), every rule to the table and the table's
/// routes, and puts back the sysctls fep changed. Idempotent. The caller
/// makes sure no fep runs. Returns what it did, a line each.
pub fn cleanup(tun: &str, policy_table: u32, state_dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let record = Installed::load(state_dir);
    let mut devices = vec![tun.to_string()];
    let mut tables = vec![policy_table.to_string()];
    if let Some(r) = &record {
        devices.push(r.tun.clone());
        tables.push(r.policy_table.to_string());
    }
    devices.dedup();
    tables.dedup();
    for dev in &devices {
        if run_ip(&["link", "del", "dev", dev]).is_ok() {
            removed.push(format!("removed TUN device {dev} and its VIP routes"));
        }
    }
    for table in &tables {
        for fam in [Family::V4, Family::V6] {
            let n = remove_rules(fam, table);
            if n > 0 {
                removed.push(format!(
                    "removed {n} {} rule(s) to table {table}",
                    fam.name()
                ));
            }
            let _ = run_ip(&[fam.flag(), "route", "flush", "table", table]);
        }
    }
    if let Some(r) = record {
        // VIP routes outlive a device only if someone re-added them elsewhere.
        for vip in &r.host.vips {
            let fam = Family::of(*vip);
            let dst = format!("{vip}/{}", fam.host_prefix());
            let _ = run_ip(&[fam.flag(), "route", "del", &dst, "dev", &r.tun]);
        }
        for (path, old) in &r.sysctls {
            match std::fs::write(path, old) {
                Ok(()) => removed.push(format!("put {path} back to {old}")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot put {path} back to {old}: {e}"),
            }
        }
        let path = record_path(state_dir);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
    removed
}

/// Removes an earlier fep's device and the rules and routes of its table.
fn remove_device_and_table(tun: &str, table: &str) {
    let _ = run_ip(&["link", "del", "dev", tun]);
    for fam in [Family::V4, Family::V6] {
        remove_rules(fam, table);
        let _ = run_ip(&[fam.flag(), "route", "flush", "table", table]);
    }
}

/// Removes every rule to `table` (bounded: at most 10000); how many.
fn remove_rules(fam: Family, table: &str) -> usize {
    let mut removed = 0;
    while removed < 10_000 && run_ip(&[fam.flag(), "rule", "del", "lookup", table]).is_ok() {
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(
            "removed {removed} {} rule(s) to table {table} left by an earlier fep",
            fam.flag()
        );
    }
    removed
}

/// For `add`, a rule or route that exists already is done (an earlier fep's,
/// taken over); for `del`, one that is gone.
fn absent_is_done(op: &str) -> impl FnOnce(NetError) -> Result<(), NetError> + '_ {
    move |e| match &e {
        NetError::Command { detail, .. }
            if (op == "add" && detail.contains("File exists"))
                || (op == "del"
                    && (detail.contains("No such") || detail.contains("Cannot find"))) =>
        {
            Ok(())
        }
        _ => Err(e),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_its_file_format() {
        let text = r#"{"tun":"fep0","policy_table":100,"vips":["10.0.0.100"],
            "rules":[["10.0.2.11",1,null],["10.0.2.11",6,80]],
            "sysctls":{"/proc/sys/net/ipv4/ip_forward":"0"}}"#;
        let r: Installed = serde_json::from_str(text).unwrap();
        let be1: IpAddr = "10.0.2.11".parse().unwrap();
        assert_eq!(r.host.vips.len(), 1);
        assert!(r.host.rules.contains(&(be1, 6, Some(80))));
        assert!(r.host.rules.contains(&(be1, 1, None)));
        let again: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            again,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
    }
}
