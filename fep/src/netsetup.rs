//! The gateway's network set-up that fep does itself, and undoes on exit:
//!
//! - IPv4/IPv6 forwarding on; loose reverse-path filtering on the TUN device
//!   (rewritten client packets enter it with the client's source address);
//! - a route for each VIP into the TUN device;
//! - policy routing for the return path: a rule per back-end endpoint
//!   (`from ADDR ipproto P sport PORT`) sends back ends' replies to
//!   `policy_table`, whose default route is the TUN device.
//!
//! Uses the `ip` command of iproute2: a handful of calls at start and stop,
//! each with a message naming what failed. Everything applied is recorded and
//! removed in reverse order; rules a killed fep left behind are removed at
//! start.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use fep_shared::FepConfig;

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

#[derive(Debug)]
enum Undo {
    /// `ip <args>` that reverses a step.
    Ip(Vec<String>),
    /// A sysctl to put back to its old value.
    Sysctl { path: String, old: String },
}

/// What fep changed on the host; [`NetSetup::teardown`] reverts it.
#[derive(Debug, Default)]
pub struct NetSetup {
    undo: Vec<Undo>,
}

impl NetSetup {
    /// Applies the set-up for `cfg` around the existing TUN device. On error
    /// everything applied so far is reverted.
    pub fn apply(cfg: &FepConfig) -> Result<Self, NetError> {
        let mut setup = NetSetup::default();
        match setup.apply_steps(cfg) {
            Ok(()) => Ok(setup),
            Err(e) => {
                setup.teardown();
                Err(e)
            }
        }
    }

    fn apply_steps(&mut self, cfg: &FepConfig) -> Result<(), NetError> {
        let table = cfg.policy_table.to_string();
        let families: BTreeSet<Family> = cfg.services.iter().map(|s| Family::of(s.vip)).collect();
        for &fam in &families {
            remove_stale(fam, &table);
        }
        if families.contains(&Family::V4) {
            self.sysctl("net/ipv4/ip_forward", "1")?;
            self.sysctl(&format!("net/ipv4/conf/{}/rp_filter", cfg.tun), "2")?;
        }
        if families.contains(&Family::V6) {
            self.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        let vips: BTreeSet<IpAddr> = cfg.services.iter().map(|s| s.vip).collect();
        for vip in vips {
            let fam = Family::of(vip);
            let dst = format!("{vip}/{}", fam.host_prefix());
            self.ip(
                fam,
                &["route", "replace", &dst, "dev", &cfg.tun],
                &["route", "del", &dst, "dev", &cfg.tun],
            )?;
        }
        for &fam in &families {
            self.ip(
                fam,
                &[
                    "route", "replace", "default", "dev", &cfg.tun, "table", &table,
                ],
                &["route", "flush", "table", &table],
            )?;
        }
        let endpoints: BTreeSet<(IpAddr, &str, u16)> = cfg
            .services
            .iter()
            .flat_map(|s| {
                s.all_backends().map(move |(b, _)| {
                    let node = cfg
                        .node(&b.node)
                        .expect("validated config names only defined nodes");
                    (node.address, s.protocol.as_str(), s.backend_port(b))
                })
            })
            .collect();
        let prio = RULE_PRIORITY.to_string();
        for (addr, proto, port) in endpoints {
            let (addr, port) = (addr.to_string(), port.to_string());
            let selector = [
                "priority", &prio, "from", &addr, "ipproto", proto, "sport", &port, "lookup",
                &table,
            ];
            let mut add = vec!["rule", "add"];
            add.extend(selector);
            let mut del = vec!["rule", "del"];
            del.extend(selector);
            self.ip(
                Family::of(addr.parse().expect("formatted from an IpAddr")),
                &add,
                &del,
            )?;
        }
        tracing::info!(
            "network set-up done: forwarding on, VIP routes into {}, return-path rules to table {}",
            cfg.tun,
            cfg.policy_table
        );
        Ok(())
    }

    fn ip(&mut self, fam: Family, args: &[&str], undo: &[&str]) -> Result<(), NetError> {
        let mut full = vec![fam.flag()];
        full.extend_from_slice(args);
        run_ip(&full)?;
        let mut u: Vec<String> = vec![fam.flag().to_string()];
        u.extend(undo.iter().map(|s| s.to_string()));
        self.undo.push(Undo::Ip(u));
        Ok(())
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
            self.undo.push(Undo::Sysctl { path: full, old });
        }
        Ok(())
    }

    /// Reverts every step, newest first; failures are logged, not fatal.
    pub fn teardown(&mut self) {
        while let Some(step) = self.undo.pop() {
            match step {
                Undo::Ip(args) => {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    if let Err(e) = run_ip(&args) {
                        tracing::warn!("clean-up: {e}");
                    }
                }
                Undo::Sysctl { path, old } => {
                    if let Err(e) = std::fs::write(&path, &old) {
                        tracing::warn!("clean-up: cannot restore {path} to {old}: {e}");
                    }
                }
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
