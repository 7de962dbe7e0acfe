//! The agent server: back-end agents connect, authenticate (see
//! `fep_shared::protocol`), register as a node, and then report load and
//! answer liveness queries. Rejected frames are counted and logged, and end
//! the connection; they never change state.
//!
//! Bounds: at most [`MAX_UNAUTHENTICATED`] connections wait for their
//! registration (more are closed at once and counted), each for at most
//! [`AUTH_TIMEOUT`]; a registration is accepted only from the node's own
//! address (or its `agent_address`), only under the shared key or that
//! node's derived key, and not while another agent of the node is live; an
//! agent's outgoing queue holds [`OUTGOING_QUEUE`] messages, and an agent
//! that stops reading is dropped.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fep_shared::protocol::{
    io, AgentMsg, ConnId, FepMsg, Key, ProtocolError, Session, MAX_CONNS_PER_FRAME,
    MAX_REGISTER_FRAME,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::model::AgentRefusal;
use super::ControlPlane;
use crate::clock::idle_since;
use crate::routes::{state, FlowKey, Route, Row};
use crate::transfer_table::{NodeId, ServiceId};
use crate::wire::{addr_from_ip, Addr};

/// Both IPv4 (v4-mapped) or both IPv6.
fn family_matches(a: &Addr, b: &Addr) -> bool {
    let v4 = |x: &Addr| x[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    v4(a) == v4(b)
}

/// Connections that have not registered yet, at most.
pub const MAX_UNAUTHENTICATED: usize = 64;
/// Time from accepting a connection to its valid registration.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued for one agent; one more and the agent is dropped.
pub const OUTGOING_QUEUE: usize = 32;
/// An agent that takes no frame for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Counter labels of refused connections, besides [`ProtocolError::KINDS`].
pub const REFUSALS: [&str; 6] = [
    "unknown_node",
    "wrong_address",
    "duplicate",
    "unauthenticated_cap",
    "auth_timeout",
    "slow_agent",
];
static GENERATION: AtomicU64 = AtomicU64::new(1);
static QUERY_ID: AtomicU64 = AtomicU64::new(1);

/// A connected agent: where to send it messages, what it was asked and has
/// not answered yet. Dropping the link ends its connection.
#[derive(Debug)]
pub(crate) struct AgentLink {
    /// Distinguishes a reconnection from the link it replaced.
    generation: u64,
    tx: mpsc::Sender<FepMsg>,
    pending: std::collections::HashMap<u64, oneshot::Sender<Vec<ConnId>>>,
    /// Daemon-clock ms of the agent's last frame.
    last_heard: Arc<AtomicU32>,
    /// Highest query id sent: an answer to a higher one was never asked.
    last_query: u64,
    /// Live lists asked for whose last part has not come.
    live_lists_asked: u32,
    /// Start (true) / stop commands sent, by port, not answered yet.
    commands: HashSet<(u16, bool)>,
    /// The connection's loop ends when this is dropped.
    _close: oneshot::Sender<()>,
}

impl AgentLink {
    /// Notes what `msg` asks for, so that only asked-for answers are taken.
    fn asked(&mut self, msg: &FepMsg) {
        match msg {
            FepMsg::Query { id, .. } => self.last_query = self.last_query.max(*id),
            FepMsg::ListLive { .. } => self.live_lists_asked += 1,
            FepMsg::Start { port } => {
                self.commands.insert((*port, true));
            }
            FepMsg::Stop { port } => {
                self.commands.insert((*port, false));
            }
            FepMsg::KeepRoutes { .. } | FepMsg::ForgetRoutes { .. } => {}
        }
    }

    /// Takes an answer if it was asked for; `Err` names what was not.
    fn answered(&mut self, msg: &AgentMsg) -> Result<(), ProtocolError> {
        let unsolicited = |what: String| Err(ProtocolError::Unsolicited(what));
        match msg {
            AgentMsg::Register { .. } => unsolicited("a second registration".into()),
            AgentMsg::Report(_) => Ok(()),
            AgentMsg::Live { id, .. } if *id == 0 || *id > self.last_query => {
                unsolicited(format!("an answer to query {id}, never sent"))
            }
            AgentMsg::Live { .. } => Ok(()),
            AgentMsg::LiveList { .. } if self.live_lists_asked == 0 => {
                unsolicited("a live-connection list the FEP did not ask for".into())
            }
            AgentMsg::LiveList { done, .. } => {
                self.live_lists_asked -= u32::from(*done);
                Ok(())
            }
            AgentMsg::Control { port, start, .. } => {
                if self.commands.remove(&(*port, *start)) {
                    Ok(())
                } else {
                    let what = if *start { "start" } else { "stop" };
                    unsolicited(format!("a {what} result for port {port}, never asked"))
                }
            }
        }
    }
}

/// Accepts agents until the runtime stops.
pub async fn serve(cp: Arc<ControlPlane>, listen: SocketAddr, key: Key) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for agents on {listen} (agent_listen)"))?;
    tracing::info!("listening for agents on {listen}");
    let unauthenticated = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
                    // Closed at once: a flood of idle connections holds no descriptors.
                    cp.reject("unauthenticated_cap");
                    tracing::debug!("agent connection from {peer} refused: {MAX_UNAUTHENTICATED} connections wait for registration already");
                    continue;
                };
                let (cp, key) = (cp.clone(), key.clone());
                tokio::spawn(async move {
                    match connection(&cp, stream, peer.ip(), key, permit).await {
                        Ok(node) => tracing::warn!("agent of node '{node}' at {peer} disconnected"),
                        Err(e) => tracing::warn!("agent connection from {peer} ended: {e}"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!("accepting an agent connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One agent connection; returns the node's name when it ends cleanly.
async fn connection(
    cp: &Arc<ControlPlane>,
    mut stream: TcpStream,
    peer: IpAddr,
    key: Key,
    permit: OwnedSemaphorePermit,
) -> Result<String, String> {
    let (mut session, name) =
        tokio::time::timeout(AUTH_TIMEOUT, authenticate(cp, &mut stream, key))
            .await
            .map_err(|_| {
                cp.reject("auth_timeout");
                format!("no valid registration within {} s", AUTH_TIMEOUT.as_secs())
            })??;
    let node = register(cp, &name, peer)?;
    drop(permit);
    let (rd, mut wr) = stream.into_split();
    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = tokio::spawn(io::read_frames(rd, frames_tx));
    let (tx, mut outgoing) = mpsc::channel(OUTGOING_QUEUE);
    let (close, mut closed) = oneshot::channel();
    let last_heard = Arc::new(AtomicU32::new(cp.now()));
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    let link = AgentLink {
        generation,
        tx,
        pending: Default::default(),
        last_heard: last_heard.clone(),
        last_query: 0,
        live_lists_asked: 0,
        commands: HashSet::new(),
        _close: close,
    };
    if let Err(e) = cp.link(node, &name, link) {
        reader.abort();
        return Err(e);
    }
    tracing::info!("agent of node '{name}' registered from {peer}");
    cp.ask_for_live_connections(node);

    let result = loop {
        tokio::select! {
            _ = &mut closed => break Err("the link was dropped (see above)".to_string()),
            frame = frames.recv() => match frame {
                Some(Ok(bytes)) => {
                    last_heard.store(cp.now(), Ordering::Relaxed);
                    let taken = session
                        .open::<AgentMsg>(&bytes)
                        .and_then(|msg| cp.on_agent_msg(node, generation, msg));
                    if let Err(e) = taken {
                        break Err(rejected(cp, e));
                    }
                }
                Some(Err(e)) => break Err(rejected(cp, e)),
                None => break Ok(name.clone()),
            },
            msg = outgoing.recv() => match msg {
                Some(msg) => match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&session.seal(&msg))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e.to_string()),
                    Err(_) => {
                        cp.reject("slow_agent");
                        break Err(format!("the agent took no frame for {} s", WRITE_TIMEOUT.as_secs()));
                    }
                },
                None => break Ok(name.clone()),
            },
        }
    };
    reader.abort();
    let mut agents = cp.agents();
    if agents
        .get(&node)
        .is_some_and(|a| a.generation == generation)
    {
        let unanswered = agents.remove(&node).is_some_and(|a| a.live_lists_asked > 0);
        drop(agents);
        // Asked over a connection that is gone (an agent that moved to
        // another gateway and back): asked again when it reconnects.
        if unanswered {
            cp.state().rebuilt.remove(&node);
        }
    }
    result
}

/// The hello exchange and the first frame: a registration under the shared
/// key or the registering node's derived key. Returns the node's name.
async fn authenticate(
    cp: &ControlPlane,
    stream: &mut TcpStream,
    key: Key,
) -> Result<(Session, String), String> {
    let mut session = io::handshake(stream, key.clone(), AUTH_TIMEOUT)
        .await
        .map_err(|e| match e {
            io::HandshakeError::Protocol(p) => rejected(cp, p),
            io::HandshakeError::Timeout => {
                cp.reject("auth_timeout");
                e.to_string()
            }
            other => other.to_string(),
        })?;
    let first = io::read_frame(stream, MAX_REGISTER_FRAME)
        .await
        .map_err(|e| rejected(cp, e))?
        .ok_or("closed before registering")?;
    let name = open_registration(&mut session, &key, &first).map_err(|e| rejected(cp, e))?;
    Ok((session, name))
}

/// Opens the first frame under the claimed node's derived key, else under
/// the shared key; the session keeps whichever verified it.
fn open_registration(
    session: &mut Session,
    master: &Key,
    frame: &[u8],
) -> Result<String, ProtocolError> {
    let mut opened = Err(ProtocolError::BadMac);
    if let Some(claimed) = Session::claimed_node(frame) {
        session.set_key(master.derive(&claimed));
        opened = session.open::<AgentMsg>(frame);
    }
    if opened == Err(ProtocolError::BadMac) {
        session.set_key(master.clone());
        opened = session.open::<AgentMsg>(frame);
    }
    match opened? {
        AgentMsg::Register { node } => Ok(node),
        other => Err(ProtocolError::Unsolicited(format!(
            "a first message that is not a registration: {}",
            kind_of(&other)
        ))),
    }
}

fn kind_of(msg: &AgentMsg) -> &'static str {
    match msg {
        AgentMsg::Register { .. } => "register",
        AgentMsg::Report(_) => "report",
        AgentMsg::Live { .. } => "live",
        AgentMsg::LiveList { .. } => "live_list",
        AgentMsg::Control { .. } => "control",
    }
}

/// The node an authenticated agent may speak for, from where it connected.
fn register(cp: &ControlPlane, name: &str, peer: IpAddr) -> Result<NodeId, String> {
    match cp.state().model.agent_node(name, peer) {
        Ok(node) => Ok(node),
        Err(AgentRefusal::UnknownNode) => {
            cp.reject("unknown_node");
            Err(format!(
                "agent registered as '{name}', which is not a node of this fep"
            ))
        }
        Err(AgentRefusal::WrongAddress { allowed }) => {
            cp.reject("wrong_address");
            Err(format!(
                "refused an agent registering as node '{name}' from {peer}: that node's agent connects from {allowed} (its address, or `agent_address` in its [[node]])"
            ))
        }
    }
}

/// Counts and describes a rejected frame.
fn rejected(cp: &ControlPlane, e: ProtocolError) -> String {
    cp.reject(e.kind());
    format!("rejected frame: {e}")
}

impl ControlPlane {
    pub(crate) fn agents(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<NodeId, AgentLink>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `link` the node's agent, unless another agent of the node is
    /// live (heard from within `node_dead_after_ms`): that registration is
    /// refused, not a silent replacement. A silent one is replaced (its
    /// connection ends as its link drops).
    fn link(&self, node: NodeId, name: &str, link: AgentLink) -> Result<(), String> {
        let (now, dead_after) = (self.now(), self.state().model.node_dead_after_ms());
        let mut agents = self.agents();
        if let Some(old) = agents.get(&node) {
            let silent = idle_since(old.last_heard.load(Ordering::Relaxed), now);
            if silent < dead_after {
                drop(agents);
                self.reject("duplicate");
                return Err(format!(
                    "refused a second agent for node '{name}': its agent is connected and was heard from {silent} ms ago"
                ));
            }
            tracing::warn!(
                "agent of node '{name}' silent for {silent} ms: replaced by a new connection"
            );
        }
        agents.insert(node, link);
        Ok(())
    }

    /// Takes one message of `node`'s agent (connection `generation`); an
    /// answer the FEP did not ask for is refused.
    pub(crate) fn on_agent_msg(
        self: &Arc<Self>,
        node: NodeId,
        generation: u64,
        msg: AgentMsg,
    ) -> Result<(), ProtocolError> {
        {
            let mut agents = self.agents();
            let Some(link) = agents.get_mut(&node).filter(|a| a.generation == generation) else {
                return Ok(()); // replaced: this connection is ending
            };
            link.answered(&msg)?;
            if let AgentMsg::Live { id, live } = msg {
                // None: it came after the query had timed out.
                if let Some(waiter) = link.pending.remove(&id) {
                    let _ = waiter.send(live);
                }
                return Ok(());
            }
        }
        match msg {
            AgentMsg::Register { .. } | AgentMsg::Live { .. } => {}
            AgentMsg::Report(report) => {
                let now = self.now();
                self.state().model.nodes[usize::from(node)].report = Some((now, report));
                self.tick();
            }
            AgentMsg::LiveList { conns, udp, done } => {
                // A local-address check and a service match for each of up
                // to MAX_CONNS_PER_FRAME connections: on the blocking pool.
                let cp = self.clone();
                tokio::task::spawn_blocking(move || {
                    cp.rebuild_routes(node, &conns, udp);
                    if done {
                        cp.node_reported(node);
                    }
                });
            }
            AgentMsg::Control {
                port,
                start,
                ok,
                message,
            } => {
                let name = self.state().model.nodes[usize::from(node)].name.clone();
                let what = if start { "start" } else { "stop" };
                if ok {
                    tracing::info!("node '{name}': {what} of port {port} done: {message}");
                } else {
                    tracing::warn!("node '{name}': {what} of port {port} failed: {message}");
                    if start {
                        self.state().model.spare_failed(node, port, self.now());
                    }
                }
                self.tick();
            }
        }
        Ok(())
    }

    /// After a start, asks each node's agent once for its live connections
    /// (and the UDP routes it keeps copies of), so that routes the snapshot
    /// missed (or all of them, without one) are rebuilt from the back ends:
    /// a restarted front end keeps every live connection on the back end
    /// that serves it. Asked again when a VIP group of the node arrives
    /// from another gateway.
    pub(super) fn ask_for_live_connections(&self, node: NodeId) {
        if !self.state().rebuilt.insert(node) {
            return;
        }
        let table = self.dispatcher().table();
        let ports = |tcp: bool| {
            let mut ports: Vec<u16> = table
                .services()
                .iter()
                .filter(|s| !s.removed && s.is_tcp() == tcp)
                .flat_map(|s| s.live_backends().map(|(_, b)| b))
                .filter(|b| b.node_id == node)
                .map(|b| b.port)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            ports
        };
        let (ports, udp_ports) = (ports(true), ports(false));
        if !ports.is_empty() || !udp_ports.is_empty() {
            self.send(node, FepMsg::ListLive { ports, udp_ports });
        }
    }

    /// Restores a route for every live connection (or kept UDP route, if
    /// `udp`) a node reports that has none, when exactly one service maps
    /// it to that node. Connections from this host (fep's own health
    /// checks) are not clients' and get none.
    fn rebuild_routes(&self, node: NodeId, conns: &[ConnId], udp: bool) {
        let table = self.dispatcher().table();
        let now = self.now();
        let mut rows = Vec::new();
        let mut local: std::collections::HashMap<IpAddr, bool> = Default::default();
        for c in conns {
            if *local.entry(c.client).or_insert_with(|| is_local(c.client)) {
                continue;
            }
            let client = addr_from_ip(c.client);
            let mut matches = table
                .services()
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.removed && s.is_tcp() != udp && family_matches(&s.vip, &client))
                .flat_map(|(sid, s)| {
                    s.live_backends()
                        .filter(|(_, b)| b.node_id == node && b.port == c.port)
                        .map(move |(bid, _)| (sid as ServiceId, bid))
                });
            let (Some((service, backend)), None) = (matches.next(), matches.next()) else {
                continue;
            };
            rows.push(Row {
                key: FlowKey {
                    service,
                    client_port: c.client_port,
                    client,
                },
                route: Route::from_parts(backend, state::REPLIED | state::ESTABLISHED, now),
            });
        }
        let restored = self.dispatcher().routes().import(&table, rows);
        if restored > 0 {
            let name = self.state().model.nodes[usize::from(node)].name.clone();
            tracing::info!(
                "rebuilt {restored} route(s) from the live connections of node '{name}'"
            );
        }
    }

    /// Asks a node's agent which of `conns` (at most
    /// [`MAX_CONNS_PER_FRAME`]) are live; `None` when no agent is connected
    /// or it does not answer within the prune interval (plus 50 µs a
    /// connection asked about).
    pub async fn query_live(&self, node: NodeId, conns: Vec<ConnId>) -> Option<Vec<ConnId>> {
        debug_assert!(conns.len() <= MAX_CONNS_PER_FRAME);
        // A full part takes time to encode, check and decode on both sides.
        let wait = Duration::from_millis(self.prune_interval_ms.max(500))
            + Duration::from_micros(50) * conns.len() as u32;
        let id = QUERY_ID.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Some(link) = self.agents().get_mut(&node) {
            link.pending.insert(id, tx);
        }
        if !self.send(node, FepMsg::Query { id, conns }) {
            return None;
        }
        let answer = tokio::time::timeout(wait, rx)
            .await
            .ok()
            .and_then(Result::ok);
        if answer.is_none() {
            if let Some(link) = self.agents().get_mut(&node) {
                link.pending.remove(&id);
            }
        }
        answer
    }

    /// Queues `msg` for a node's agent; false when none is connected. An
    /// agent whose queue is full has stopped reading: it is dropped.
    pub(crate) fn send(&self, node: NodeId, msg: FepMsg) -> bool {
        let mut agents = self.agents();
        let Some(link) = agents.get_mut(&node) else {
            return false;
        };
        link.asked(&msg);
        match link.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Closed(_)) => false,
            Err(TrySendError::Full(_)) => {
                agents.remove(&node);
                drop(agents);
                self.reject("slow_agent");
                let name = self.state().model.nodes[usize::from(node)].name.clone();
                tracing::warn!(
                    "agent of node '{name}' has {OUTGOING_QUEUE} messages queued and reads none: dropped (it reconnects)"
                );
                false
            }
        }
    }
}

/// Whether `ip` is an address of this host: only those can be bound.
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> AgentLink {
        AgentLink {
            generation: 1,
            tx: mpsc::channel(1).0,
            pending: Default::default(),
            last_heard: Default::default(),
            last_query: 0,
            live_lists_asked: 0,
            commands: HashSet::new(),
            _close: oneshot::channel().0,
        }
    }

    fn part(done: bool) -> AgentMsg {
        AgentMsg::LiveList {
            conns: Vec::new(),
            udp: false,
            done,
        }
    }

    #[test]
    fn every_live_list_asked_for_is_taken_and_no_more() {
        let mut l = link();
        assert!(l.answered(&part(true)).is_err(), "never asked");
        let ask = FepMsg::ListLive {
            ports: vec![80],
            udp_ports: vec![53],
        };
        l.asked(&ask);
        l.asked(&ask); // asked again (a VIP group arrived) before the answer
        for p in [part(false), part(true), part(true)] {
            assert!(l.answered(&p).is_ok());
        }
        assert!(l.answered(&part(true)).is_err(), "both answered");
    }

    #[test]
    fn only_this_hosts_addresses_count_as_local() {
        assert!(is_local(IpAddr::from([127, 0, 0, 1])));
        // TEST-NET-1: never an address of this host (binding sends nothing).
        assert!(!is_local(IpAddr::from([192, 0, 2, 1])));
    }
}
