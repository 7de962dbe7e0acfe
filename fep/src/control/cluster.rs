//! VIP groups arriving on this gateway. keepalived moves a group's
//! addresses and says so on its `notify_fifo`; when this gateway becomes a
//! group's master, the group's packets are held (see [`crate::holds`])
//! while its routes come back — each back-end node of the group reports its
//! live connections and the UDP routes it keeps copies of, and routes are
//! rebuilt from them — and then replayed in order. A hold ends when every
//! such node has reported, when keepalived takes the group away again, or
//! after `hold_max_ms`, whichever is first.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fep_shared::api::{ClusterView, GroupView, HoldView, PeerView};
use fep_shared::FepConfig;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::ControlPlane;
use crate::holds::{GroupId, Replayed};
use crate::transfer_table::NodeId;

/// Longest line keepalived writes (`INSTANCE "NAME" FAULT 255`, with room).
const MAX_LINE: u64 = 512;

/// What keepalived says of one of its VRRP instances or sync groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice<'a> {
    pub name: &'a str,
    pub master: bool,
}

/// One `notify_fifo` line: `INSTANCE "G1" MASTER 100` (or `GROUP`, for a
/// sync group); `None` for lines about anything else (`MASTER_RX_LOWER_PRI`,
/// a virtual server's checker).
pub fn parse_notice(line: &str) -> Option<Notice<'_>> {
    let mut words = line.split_whitespace();
    if !matches!(words.next()?, "INSTANCE" | "GROUP") {
        return None;
    }
    let name = words.next()?.strip_prefix('"')?.strip_suffix('"')?;
    let master = match words.next()? {
        "MASTER" => true,
        "BACKUP" | "FAULT" | "STOP" | "DELETED" => false,
        _ => return None,
    };
    Some(Notice { name, master })
}

/// The VIP groups as this gateway sees them.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    groups: Vec<Group>,
    hold_max_ms: u64,
}

#[derive(Debug)]
struct Group {
    name: String,
    /// keepalived made this gateway the group's master (last word heard).
    master: bool,
    hold: Option<Hold>,
    last: Option<HoldDone>,
}

#[derive(Debug)]
struct Hold {
    since: u32,
    /// A planned move drives this hold (and ends it), not keepalived.
    planned: bool,
    /// Nodes of the group whose live connections are still to come.
    waiting: HashSet<NodeId>,
}

/// How the last hold of a group went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldDone {
    pub held_ms: u32,
    pub replayed: Replayed,
}

impl Groups {
    pub(crate) fn new(cfg: &FepConfig) -> Self {
        Groups {
            groups: cfg
                .vip_groups
                .iter()
                .map(|g| Group {
                    name: g.name.clone(),
                    master: false,
                    hold: None,
                    last: None,
                })
                .collect(),
            hold_max_ms: cfg.cluster.as_ref().map_or(0, |c| c.hold_max_ms),
        }
    }

    /// Each group's name and whether this gateway is its master, in slot order.
    pub(crate) fn names(&self) -> impl Iterator<Item = (&str, bool)> {
        self.groups.iter().map(|g| (g.name.as_str(), g.master))
    }

    fn id(&self, name: &str) -> Option<GroupId> {
        self.groups
            .iter()
            .position(|g| g.name == name)
            .map(|i| i as GroupId)
    }

    /// Ends the wait for `node` in every hold; the groups left waiting for
    /// nobody.
    fn reported(&mut self, node: NodeId) -> Vec<GroupId> {
        let mut done = Vec::new();
        for (i, g) in self.groups.iter_mut().enumerate() {
            if let Some(h) = &mut g.hold {
                if h.waiting.remove(&node) && h.waiting.is_empty() {
                    done.push(i as GroupId);
                }
            }
        }
        done
    }
}

impl ControlPlane {
    /// This front end, its VIP groups, its last moves, its refusals, and
    /// each peer's groups as it answers (asked all at once).
    pub async fn cluster_view(self: &Arc<Self>) -> ClusterView {
        let mut asks = tokio::task::JoinSet::new();
        for (i, p) in self
            .peers()
            .map_or(&[][..], |p| p.list())
            .iter()
            .enumerate()
        {
            let (cp, p) = (self.clone(), p.clone());
            asks.spawn(async move {
                let peers = cp.peers().expect("peers are set once, before any view");
                let answer = super::peers::ask_status(peers, &p).await;
                (i, p, answer)
            });
        }
        let mut answers: Vec<_> = asks.join_all().await;
        answers.sort_by_key(|(i, ..)| *i);
        let peers = self.peers();
        ClusterView {
            fep: peers.map(|p| p.me().to_string()),
            groups: self.groups_view(),
            moves: peers.map(|p| p.moves()).unwrap_or_default(),
            peer_rejects: peers
                .map(|p| p.rejects())
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            peers: answers
                .into_iter()
                .map(|(_, p, answer)| {
                    let (groups, error) = match answer {
                        Ok((_, view)) => (view, None),
                        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
                    };
                    PeerView {
                        name: p.name,
                        address: p.address.to_string(),
                        groups,
                        error,
                    }
                })
                .collect(),
        }
    }

    /// Every VIP group: mastership, hold, route count, last hold.
    pub(super) fn groups_view(&self) -> Vec<GroupView> {
        let table = self.dispatcher().table();
        let holds = self.dispatcher().holds();
        let state = self.state();
        let vips = &state.configs.live.vip_groups;
        state
            .groups
            .groups
            .iter()
            .zip(vips)
            .enumerate()
            .map(|(i, (g, cfg))| GroupView {
                name: g.name.clone(),
                vips: cfg.vips.clone(),
                master: g.master,
                holding: holds.is_held(i as GroupId),
                routes: table
                    .services()
                    .iter()
                    .filter(|s| s.group == Some(i as GroupId))
                    .flat_map(|s| s.live_backends())
                    .map(|(_, b)| u64::from(b.routes()))
                    .sum(),
                last_hold: g.last.map(|d| HoldView {
                    held_ms: d.held_ms,
                    packets: d.replayed.packets,
                    bytes: d.replayed.bytes,
                }),
            })
            .collect()
    }

    /// Follows keepalived's `notify_fifo` (created if missing, so fep may
    /// start first). Lines keepalived wrote while no fep read are read
    /// first, in order: the last one says what this gateway is now.
    pub async fn follow_keepalived(self: Arc<Self>, fifo: PathBuf) -> anyhow::Result<()> {
        let fifo = fifo.as_path();
        make_fifo(fifo)?;
        // Read and write: the FIFO never reports end-of-file when
        // keepalived restarts and closes its end.
        let rx = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(fifo)
            .with_context(|| format!("cannot open keepalived's notify_fifo {}", fifo.display()))?;
        let mut rx = BufReader::new(rx);
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut rx)
                .take(MAX_LINE)
                .read_line(&mut line)
                .await
                .with_context(|| format!("reading {} failed", fifo.display()))?;
            if n == 0 {
                anyhow::bail!("{} was closed", fifo.display());
            }
            match parse_notice(&line) {
                Some(n) => self.keepalived_said(n.name, n.master),
                None => tracing::debug!("notify_fifo: ignored {:?}", line.trim_end()),
            }
        }
    }

    /// The slot of the VIP group `name`.
    pub(crate) fn group_id(&self, name: &str) -> Option<GroupId> {
        self.state().groups.id(name)
    }

    /// Whether keepalived made this gateway the group's master.
    pub(crate) fn is_master(&self, id: GroupId) -> bool {
        self.state().groups.groups[usize::from(id)].master
    }

    /// Starts holding the group for a planned move into this gateway;
    /// false if it is held already.
    pub(crate) fn begin_move_in(&self, id: GroupId) -> bool {
        let mut state = self.state();
        let g = &mut state.groups.groups[usize::from(id)];
        if g.hold.is_some() {
            return false;
        }
        g.hold = Some(Hold {
            since: self.now(),
            planned: true,
            waiting: HashSet::new(),
        });
        drop(state);
        self.forget_silent_agents(id);
        self.dispatcher().holds().hold(id)
    }

    /// The back-end nodes of the group's services.
    fn group_nodes(&self, id: GroupId) -> HashSet<NodeId> {
        self.dispatcher()
            .table()
            .services()
            .iter()
            .filter(|s| !s.removed && s.group == Some(id))
            .flat_map(|s| s.live_backends().map(|(_, b)| b.node_id))
            .collect()
    }

    /// A group arrives: its nodes whose agents are not connected here (they
    /// report to the gateway that held the group, and reconnect as its
    /// address moves) count as nodes without an agent until they do, not as
    /// nodes whose agent fell silent (down).
    fn forget_silent_agents(&self, id: GroupId) {
        let nodes = self.group_nodes(id);
        let connected: HashSet<NodeId> = self.agents().keys().copied().collect();
        let mut state = self.state();
        for n in nodes.difference(&connected) {
            state.model.nodes[usize::from(*n)].report = None;
        }
        drop(state);
        self.tick();
    }

    /// keepalived made this gateway master of the group `name`, or took it
    /// away.
    pub(crate) fn keepalived_said(self: &Arc<Self>, name: &str, master: bool) {
        let mut state = self.state();
        let Some(id) = state.groups.id(name) else {
            tracing::debug!("keepalived's instance '{name}' is no VIP group of this fep");
            return;
        };
        let g = &mut state.groups.groups[usize::from(id)];
        if g.master == master {
            return;
        }
        g.master = master;
        let planned = g.hold.as_ref().is_some_and(|h| h.planned);
        drop(state);
        tracing::info!(
            "VIP group '{name}': this gateway is {} (keepalived)",
            if master { "master" } else { "backup" }
        );
        if planned {
            return; // the move drives the hold
        }
        if !master {
            self.end_hold(id);
            return;
        }
        let mut state = self.state();
        if state.groups.groups[usize::from(id)].hold.is_some() {
            return;
        }
        // The group's back-end nodes, each asked (again) for its live
        // connections and kept UDP routes; agents not connected yet are
        // asked when they are.
        let waiting = self.group_nodes(id);
        for node in &waiting {
            state.rebuilt.remove(node);
        }
        let hold_max_ms = state.groups.hold_max_ms;
        let since = self.now();
        state.groups.groups[usize::from(id)].hold = Some(Hold {
            since,
            planned: false,
            waiting: waiting.clone(),
        });
        drop(state);
        self.dispatcher().holds().hold(id);
        self.forget_silent_agents(id);
        let connected: Vec<NodeId> = waiting
            .iter()
            .copied()
            .filter(|n| self.agents().contains_key(n))
            .collect();
        for node in connected {
            self.ask_for_live_connections(node);
        }
        if waiting.is_empty() {
            self.end_hold(id);
            return;
        }
        let cp = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(hold_max_ms)).await;
            let late = cp.state().groups.groups[usize::from(id)]
                .hold
                .as_ref()
                .is_some_and(|h| h.since == since);
            if late {
                tracing::warn!(
                    "VIP group '{}': not every back-end node reported its connections within hold_max_ms = {hold_max_ms}; replaying what is held",
                    cp.state().groups.groups[usize::from(id)].name
                );
                cp.end_hold(id);
            }
        });
    }

    /// A node's live connections are in: holds waiting only for it end.
    pub(crate) fn node_reported(self: &Arc<Self>, node: NodeId) {
        let done = self.state().groups.reported(node);
        for id in done {
            self.end_hold(id);
        }
    }

    /// Ends a group's hold, if it has one, on the blocking pool (see
    /// [`ControlPlane::finish_hold`]).
    fn end_hold(self: &Arc<Self>, id: GroupId) {
        let cp = self.clone();
        tokio::task::spawn_blocking(move || cp.finish_hold(id));
    }

    /// Ends a group's hold, if it has one: its packets are replayed (this
    /// blocks: the replay writes to the TUN device).
    pub(crate) fn finish_hold(&self, id: GroupId) -> Option<HoldDone> {
        let hold = self.state().groups.groups[usize::from(id)].hold.take()?;
        let replayed = self.replay(id);
        let held_ms = self.now().wrapping_sub(hold.since);
        let mut state = self.state();
        let g = &mut state.groups.groups[usize::from(id)];
        tracing::info!(
            "VIP group '{}': held {held_ms} ms, {} packet(s) ({} bytes) replayed",
            g.name,
            replayed.packets,
            replayed.bytes
        );
        let done = HoldDone { held_ms, replayed };
        g.last = Some(done);
        Some(done)
    }
}

/// Creates the FIFO keepalived writes to, mode 0600, unless it exists.
fn make_fifo(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(_) => anyhow::bail!(
            "{} exists and is not a FIFO: point cluster.notify_fifo and keepalived's notify_fifo at a free path",
            path.display()
        ),
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .context("notify_fifo path with a NUL byte")?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e).with_context(|| format!("cannot create the FIFO {}", path.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalived_lines_name_the_instance_and_whether_this_gateway_is_master() {
        assert_eq!(
            parse_notice("INSTANCE \"G1\" MASTER 100\n"),
            Some(Notice {
                name: "G1",
                master: true
            })
        );
        for state in ["BACKUP", "FAULT", "STOP"] {
            let line = format!("INSTANCE \"G1\" {state} 100");
            assert_eq!(parse_notice(&line).map(|n| n.master), Some(false), "{line}");
        }
        assert_eq!(
            parse_notice("GROUP \"SG\" MASTER").map(|n| n.name),
            Some("SG")
        );
        for other in [
            "",
            "INSTANCE G1 MASTER 100",
            "INSTANCE \"G1\" MASTER_RX_LOWER_PRI 100",
            "VS \"10.0.0.1:80\" UP",
            "garbage",
        ] {
            assert_eq!(parse_notice(other), None, "{other:?}");
        }
    }

    #[test]
    fn a_hold_ends_when_the_last_node_it_waits_for_reports() {
        let cfg = FepConfig::parse(
            "[cluster]\nnotify_fifo = \"/x\"\n[[vip_group]]\nname = \"G1\"\nvips = [\"10.0.0.1\"]\n\
             [[vip_group]]\nname = \"G2\"\nvips = [\"10.0.0.2\"]\n",
        )
        .unwrap();
        let mut g = Groups::new(&cfg);
        for (i, nodes) in [[1, 2], [2, 3]].iter().enumerate() {
            g.groups[i].hold = Some(Hold {
                since: 0,
                planned: false,
                waiting: nodes.iter().copied().collect(),
            });
        }
        assert_eq!(g.reported(2), Vec::<GroupId>::new());
        assert_eq!(
            g.reported(9),
            Vec::<GroupId>::new(),
            "no group waits for it"
        );
        assert_eq!(g.reported(3), vec![1]);
        assert_eq!(g.reported(1), vec![0]);
    }
}
