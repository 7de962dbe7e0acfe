//! The `[cluster]` table and `[[vip_group]]` list of the `fep` config: a
//! gateway that shares VIP groups with other front ends, keepalived (VRRP)
//! moving each group's addresses between them.
//!
//! keepalived says which groups this gateway is master of (its
//! `notify_fifo`); when a group arrives, fep holds the group's packets until
//! the group's routes are back, then replays them in order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// This front end's name among its peers (planned moves name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the other front ends reach this one (the fep-to-fep channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The cluster's shared key (64 hex characters, `bep-agent --gen-key`
    /// writes one), which every frame between front ends is signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Where fep writes one keepalived `track_file` per VIP group (named as
    /// the group): a planned move raises the receiver's to [`TRACK_HOLD`]
    /// and lowers the holder's to 0; nothing else writes them (a start
    /// creates missing ones at 0). Put it on a tmpfs (`/run`), so that a
    /// rebooted gateway comes back at 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dir: Option<PathBuf>,
    /// How often the controller weighs each front end's traffic and moves
    /// groups to even it out; 0 (the default) leaves groups where they are.
    #[serde(default)]
    pub controller_interval_ms: u64,
    /// How much lower (as a fraction) the busiest front end's traffic must
    /// become before the controller moves anything, so groups do not flap.
    #[serde(default = "default_hysteresis")]
    pub controller_hysteresis: f64,
    /// The other front ends.
    #[serde(default, rename = "peer", skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
}

/// Another front end of the cluster: its name and channel address (frames
/// from it must come from that IP address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    pub address: SocketAddr,
}

/// What fep writes to a group's track file where this gateway is to hold
/// it (keepalived adds it to the instance's priority, `weight 1`): base
/// priorities of the gateways must differ by less.
pub const TRACK_HOLD: i32 = 100;

impl ClusterConfig {
    /// Whether planned moves are set up: peers are configured (validation
    /// then requires a name, a channel, a key and track files).
    pub fn moves(&self) -> bool {
        !self.peers.is_empty()
    }
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
fn default_hysteresis() -> f64 {
    0.2
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
        if !(0.0..1.0).contains(&c.controller_hysteresis) {
            return Err(ConfigError::invalid(
                "cluster.controller_hysteresis",
                "must be at least 0 and below 1 (a fraction of the busiest front end's traffic)",
            ));
        }
        if c.controller_interval_ms > 0 && !c.moves() {
            return Err(ConfigError::invalid(
                "cluster.controller_interval_ms",
                "the controller moves groups between peers: configure [[cluster.peer]]",
            ));
        }
        if !(1..=MAX_HOLD_MS).contains(&c.hold_max_ms) {
            return Err(ConfigError::invalid(
                "cluster.hold_max_ms",
                format!("must be between 1 and {MAX_HOLD_MS}"),
            ));
        }
        if c.moves() {
            for (key, missing) in [
                ("cluster.name", c.name.is_none()),
                ("cluster.listen", c.listen.is_none()),
                ("cluster.key_file", c.key_file.is_none()),
                ("cluster.track_dir", c.track_dir.is_none()),
            ] {
                if missing {
                    return Err(ConfigError::invalid(
                        key,
                        "planned moves between peers need cluster.name, listen, key_file and track_dir",
                    ));
                }
            }
            for (i, p) in c.peers.iter().enumerate() {
                if Some(&p.name) == c.name.as_ref() || c.peers[..i].iter().any(|o| o.name == p.name)
                {
                    return Err(ConfigError::invalid(
                        format!("cluster.peer[{i}].name"),
                        format!("'{}' is this fep's name or another peer's", p.name),
                    ));
                }
            }
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
    fn peers_need_a_name_a_channel_a_key_and_track_files() {
        let e = problem(&format!(
            "{CLUSTER}[[cluster.peer]]\nname = \"gwb\"\naddress = \"10.0.3.253:9443\"\n"
        ));
        assert!(e.contains("cluster.name"), "{e}");
        let full = format!(
            "{CLUSTER}name = \"gwa\"\nlisten = \"0.0.0.0:9443\"\nkey_file = \"/k\"\ntrack_dir = \"/run/t\"\n\
             [[cluster.peer]]\nname = \"gwb\"\naddress = \"10.0.3.253:9443\"\n"
        );
        assert!(FepConfig::parse(&full).unwrap().cluster.unwrap().moves());
        let e = problem(&full.replace("\"gwb\"", "\"gwa\""));
        assert!(e.contains("cluster.peer[0].name"), "{e}");
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
