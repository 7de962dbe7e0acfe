//! The `[cluster]` table and `[[vip_group]]` list of the `fep` config: a
//! gateway that shares VIP groups with other front ends, keepalived (VRRP)
//! moving each group's addresses between them.
//!
//! keepalived says which groups this gateway is master of (its
//! `notify_fifo`); when a group arrives, fep holds the group's packets until
//! the group's routes are back, then replays them in order.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Most VIP groups: a group's mode is one slot of a fixed table.
pub const MAX_VIP_GROUPS: usize = 256;
/// Smallest hold buffer: room for one 64 KB offloaded segment and its headers.
pub const MIN_HOLD_BYTES: usize = 128 * 1024;
/// Largest hold buffer per group (it is allocated twice while a group is held).
pub const MAX_HOLD_BYTES: usize = 1 << 30;
/// Longest hold: a client's TCP gives up long before.
pub const MAX_HOLD_MS: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// keepalived's `notify_fifo` (in its `global_defs`): the lines
    /// `INSTANCE "NAME" MASTER|BACKUP|FAULT|STOP PRIO` say which groups this
    /// gateway is master of.
    pub notify_fifo: PathBuf,
    /// Bytes of packets held per group while its routes come back; what
    /// does not fit is dropped and counted.
    #[serde(default = "default_hold_max_bytes")]
    pub hold_max_bytes: usize,
    /// Longest a group's packets are held: then they are replayed through
    /// whatever routes are back by then.
    #[serde(default = "default_hold_max_ms")]
    pub hold_max_ms: u64,
}

/// A set of VIPs that moves between gateways as one: the keepalived VRRP
/// instance (or sync group) of the same name moves its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipGroupConfig {
    pub name: String,
    pub vips: Vec<IpAddr>,
}

fn default_hold_max_bytes() -> usize {
    16 << 20
}
fn default_hold_max_ms() -> u64 {
    2000
}

/// Checks `[cluster]` and the VIP groups together: groups need a cluster,
/// names are keepalived instance names, and a VIP is in one group at most.
pub(crate) fn validate(
    cluster: Option<&ClusterConfig>,
    groups: &[VipGroupConfig],
) -> Result<(), ConfigError> {
    if let Some(c) = cluster {
        if !(MIN_HOLD_BYTES..=MAX_HOLD_BYTES).contains(&c.hold_max_bytes) {
            return Err(ConfigError::invalid(
                "cluster.hold_max_bytes",
                format!("must be between {MIN_HOLD_BYTES} and {MAX_HOLD_BYTES}"),
            ));
        }
        if !(1..=MAX_HOLD_MS).contains(&c.hold_max_ms) {
            return Err(ConfigError::invalid(
                "cluster.hold_max_ms",
                format!("must be between 1 and {MAX_HOLD_MS}"),
            ));
        }
    } else if !groups.is_empty() {
        return Err(ConfigError::invalid(
            "vip_group",
            "VIP groups need a [cluster] table with keepalived's notify_fifo",
        ));
    }
    if groups.len() > MAX_VIP_GROUPS {
        return Err(ConfigError::invalid(
            "vip_group",
            format!("{} groups; at most {MAX_VIP_GROUPS}", groups.len()),
        ));
    }
    let mut owner: HashMap<IpAddr, &str> = HashMap::new();
    for (i, g) in groups.iter().enumerate() {
        let key = format!("vip_group[{i}]");
        if g.name.is_empty()
            || g.name.len() > 64
            || !g
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ConfigError::invalid(
                format!("{key}.name"),
                format!(
                    "'{}' is not a keepalived instance name (1-64 letters, digits, '-', '_', '.')",
                    g.name
                ),
            ));
        }
        if groups[..i].iter().any(|o| o.name == g.name) {
            return Err(ConfigError::invalid(
                format!("{key}.name"),
                format!("group '{}' is defined twice", g.name),
            ));
        }
        if g.vips.is_empty() {
            return Err(ConfigError::invalid(
                format!("{key}.vips"),
                "a group needs at least one VIP",
            ));
        }
        for vip in &g.vips {
            if let Some(other) = owner.insert(*vip, &g.name) {
                return Err(ConfigError::invalid(
                    format!("{key}.vips"),
                    format!("{vip} is already in group '{other}': a VIP moves with one group"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::FepConfig;

    const CLUSTER: &str = "[cluster]\nnotify_fifo = \"/run/fep/keepalived.fifo\"\n";

    fn problem(text: &str) -> String {
        FepConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_group_takes_the_defaults_for_its_hold() {
        let cfg = FepConfig::parse(&format!(
            "{CLUSTER}[[vip_group]]\nname = \"G1\"\nvips = [\"10.0.0.100\", \"fd00::1\"]\n"
        ))
        .unwrap();
        let c = cfg.cluster.unwrap();
        assert_eq!((c.hold_max_bytes, c.hold_max_ms), (16 << 20, 2000));
        assert_eq!(cfg.vip_groups[0].vips.len(), 2);
    }

    #[test]
    fn groups_without_a_cluster_are_refused() {
        let e = problem("[[vip_group]]\nname = \"G1\"\nvips = [\"10.0.0.100\"]\n");
        assert!(e.contains("notify_fifo"), "{e}");
    }

    #[test]
    fn a_vip_in_two_groups_is_refused_naming_both() {
        let e = problem(&format!(
            "{CLUSTER}[[vip_group]]\nname = \"G1\"\nvips = [\"10.0.0.100\"]\n\
             [[vip_group]]\nname = \"G2\"\nvips = [\"10.0.0.100\"]\n"
        ));
        assert!(e.contains("vip_group[1].vips") && e.contains("'G1'"), "{e}");
    }

    #[test]
    fn names_keepalived_cannot_carry_and_bad_bounds_are_refused() {
        let e = problem(&format!(
            "{CLUSTER}[[vip_group]]\nname = \"G 1\"\nvips = [\"10.0.0.1\"]\n"
        ));
        assert!(e.contains("vip_group[0].name"), "{e}");
        let e = problem(&format!(
            "{CLUSTER}[[vip_group]]\nname = \"G1\"\nvips = [\"10.0.0.1\"]\n\
             [[vip_group]]\nname = \"G1\"\nvips = [\"10.0.0.2\"]\n"
        ));
        assert!(e.contains("defined twice"), "{e}");
        let e = problem(&format!("{CLUSTER}hold_max_bytes = 1000\n"));
        assert!(e.contains("cluster.hold_max_bytes"), "{e}");
        let e = problem(&format!("{CLUSTER}hold_max_ms = 0\n"));
        assert!(e.contains("cluster.hold_max_ms"), "{e}");
    }
}
