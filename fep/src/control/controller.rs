//! The controller: which front end holds which VIP group, from each
//! group's traffic (document 001 leaves the algorithm open).
//!
//! Greedy by descending traffic: each group, busiest first (ties by name),
//! goes to the live front end with the least traffic assigned so far
//! (ties: the group's current holder, then the name). Hysteresis: the new
//! assignment is taken only if it lowers the busiest front end's traffic
//! by more than `hysteresis` (a fraction); then only the groups whose
//! computed holder differs move. Every front end computes the same plan
//! from the same figures; the live one with the lowest name acts. A group
//! no live front end holds is keepalived's to move (its failover), not the
//! controller's; nothing goes to a dead front end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use fep_shared::peer::GroupTraffic;

use super::peers::ask_status;
use super::ControlPlane;

/// One VIP group as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupLoad {
    pub name: String,
    /// The front end that holds it, if a live one does.
    pub holder: Option<String>,
    /// Its traffic over the last interval (bytes).
    pub traffic: u64,
}

/// The moves (group, to) that bring the assignment of the groups held by
/// live front ends to the computed one; none when it would not lower the
/// busiest front end's traffic by more than `hysteresis`.
pub fn plan(live: &[String], groups: &[GroupLoad], hysteresis: f64) -> Vec<(String, String)> {
    let held: Vec<&GroupLoad> = groups
        .iter()
        .filter(|g| g.holder.as_ref().is_some_and(|h| live.contains(h)))
        .collect();
    let mut order = held.clone();
    order.sort_by(|a, b| b.traffic.cmp(&a.traffic).then(a.name.cmp(&b.name)));
    let mut load: BTreeMap<&str, u64> = live.iter().map(|f| (f.as_str(), 0)).collect();
    let mut computed = HashMap::new();
    for g in order {
        let to = *load
            .iter()
            .min_by_key(|(f, l)| (**l, g.holder.as_deref() != Some(**f), **f))
            .map(|(f, _)| f)
            .expect("a live front end");
        *load.get_mut(to).expect("live") += g.traffic;
        computed.insert(g.name.as_str(), to);
    }
    let now = busiest(held.iter().map(|g| (g.holder.as_deref(), g.traffic)));
    let then = busiest(
        held.iter()
            .map(|g| (computed.get(g.name.as_str()).copied(), g.traffic)),
    );
    if (then as f64) >= now as f64 * (1.0 - hysteresis) {
        return Vec::new();
    }
    let mut moves: Vec<(String, String)> = held
        .iter()
        .filter_map(|g| {
            let to = computed[g.name.as_str()];
            (g.holder.as_deref() != Some(to)).then(|| (g.name.clone(), to.to_string()))
        })
        .collect();
    moves.sort();
    moves
}

/// The largest traffic one front end carries, from (holder, traffic) pairs.
fn busiest<'a>(assigned: impl Iterator<Item = (Option<&'a str>, u64)>) -> u64 {
    let mut per: HashMap<&str, u64> = HashMap::new();
    for (fep, traffic) in assigned {
        if let Some(f) = fep {
            *per.entry(f).or_default() += traffic;
        }
    }
    per.into_values().max().unwrap_or(0)
}

impl ControlPlane {
    /// This front end's groups: whether it holds each, and the bytes each
    /// carried here since the start.
    pub(crate) fn group_traffic(&self) -> Vec<GroupTraffic> {
        let Some(peers) = self.peers() else {
            return Vec::new();
        };
        let totals = peers.totals();
        let table = self.dispatcher().table();
        let state = self.state();
        state
            .groups
            .names()
            .enumerate()
            .map(|(i, (name, master))| GroupTraffic {
                name: name.to_string(),
                master,
                bytes: table
                    .services()
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.group == Some(i as u16))
                    .map(|(slot, _)| {
                        let t = &totals.services[slot];
                        t.to_backend_bytes + t.to_client_bytes
                    })
                    .sum(),
            })
            .collect()
    }

    /// Every `every`: when this is the live front end with the lowest name,
    /// gathers each one's group traffic, plans, and runs the moves.
    pub async fn run_controller(self: Arc<Self>, every: Duration, hysteresis: f64) {
        let mut last: HashMap<(String, String), u64> = HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(peers) = self.peers() else { return };
            let mut seen = vec![(peers.me().to_string(), self.group_traffic())];
            for p in peers.list() {
                if let Ok((groups, _)) = ask_status(peers, p).await {
                    seen.push((p.name.clone(), groups));
                }
            }
            let mut live: Vec<String> = seen.iter().map(|(f, _)| f.clone()).collect();
            live.sort();
            if live.first().map(String::as_str) != Some(peers.me()) {
                continue; // another front end acts
            }
            let mut loads: BTreeMap<String, GroupLoad> = BTreeMap::new();
            for (fep, groups) in &seen {
                for g in groups {
                    let before = last.insert((fep.clone(), g.name.clone()), g.bytes);
                    let e = loads.entry(g.name.clone()).or_insert_with(|| GroupLoad {
                        name: g.name.clone(),
                        holder: None,
                        traffic: 0,
                    });
                    e.traffic += g.bytes.saturating_sub(before.unwrap_or(g.bytes));
                    if g.master && e.holder.is_none() {
                        e.holder = Some(fep.clone());
                    }
                }
            }
            let groups: Vec<GroupLoad> = loads.into_values().collect();
            for (group, to) in plan(&live, &groups, hysteresis) {
                tracing::info!("controller: moving VIP group '{group}' to fep '{to}' ({groups:?})");
                match self.move_group(&group, &to).await {
                    Ok(r) => tracing::info!("controller: {r:?}"),
                    Err(e) => {
                        tracing::warn!("controller: moving '{group}' to '{to}' failed: {e:#}")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, holder: &str, traffic: u64) -> GroupLoad {
        GroupLoad {
            name: name.into(),
            holder: (!holder.is_empty()).then(|| holder.into()),
            traffic,
        }
    }

    fn feps(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn golden_document_001_only_the_address_whose_assignment_changes_moves() {
        // a holds 31a-IP-1 and 31a-IP-2, b holds 31b-IP-1; computed:
        // 31a-IP-2 -> a, {31a-IP-1, 31b-IP-1} -> b.
        let groups = [
            group("31a-IP-1", "a", 60),
            group("31a-IP-2", "a", 100),
            group("31b-IP-1", "b", 50),
        ];
        assert_eq!(
            plan(&feps(&["a", "b"]), &groups, 0.2),
            [("31a-IP-1".to_string(), "b".to_string())]
        );
    }

    #[test]
    fn both_groups_on_one_front_end_split_and_a_balanced_cluster_stays_for_a_minute() {
        let both = [group("G0", "gwa", 1000), group("G1", "gwa", 900)];
        assert_eq!(
            plan(&feps(&["gwa", "gwb"]), &both, 0.2),
            [("G1".to_string(), "gwb".to_string())]
        );
        // A minute of 1 s rounds of balanced traffic with ±15 % noise.
        for round in 0..60u64 {
            let wobble = |seed: u64| 1000 + (seed * 7919 % 300) - 150;
            let balanced = [
                group("G0", "gwa", wobble(round)),
                group("G1", "gwb", wobble(round + 31)),
            ];
            assert_eq!(
                plan(&feps(&["gwa", "gwb"]), &balanced, 0.2),
                [],
                "round {round}"
            );
        }
    }

    #[test]
    fn groups_without_a_live_holder_are_left_to_keepalived_and_nothing_goes_to_the_dead() {
        // gwc is dead: its group G2 and the unheld G1 are keepalived's to
        // move; the live groups balance over gwa and gwb only.
        let groups = [
            group("G0", "gwa", 800),
            group("G3", "gwa", 700),
            group("G1", "", 500),
            group("G2", "gwc", 900),
        ];
        assert_eq!(
            plan(&feps(&["gwa", "gwb"]), &groups, 0.2),
            [("G3".to_string(), "gwb".to_string())]
        );
        assert_eq!(plan(&[], &groups, 0.2), []);
    }
}
