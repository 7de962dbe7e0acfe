//! The agent server: back-end agents connect, authenticate (see
//! `fep_shared::protocol`), register as a node, and then report load and
//! answer liveness queries. Rejected frames are counted and logged, and end
//! the connection; they never change state.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fep_shared::protocol::{io, AgentMsg, ConnId, FepMsg, Key, ProtocolError};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::{AgentLink, ControlPlane};
use crate::route_table::{state, FlowKey};
use crate::transfer_table::{NodeId, ServiceId};
use crate::wire::{addr_from_ip, Addr};

/// Both IPv4 (v4-mapped) or both IPv6.
fn family_matches(a: &Addr, b: &Addr) -> bool {
    let v4 = |x: &Addr| x[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    v4(a) == v4(b)
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
static GENERATION: AtomicU64 = AtomicU64::new(1);
static QUERY_ID: AtomicU64 = AtomicU64::new(1);

/// Accepts agents until the runtime stops.
pub async fn serve(cp: Arc<ControlPlane>, listen: SocketAddr, key: Key) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for agents on {listen} (agent_listen)"))?;
    tracing::info!("listening for agents on {listen}");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (cp, key) = (cp.clone(), key.clone());
                tokio::spawn(async move {
                    match connection(&cp, stream, key).await {
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
async fn connection(cp: &ControlPlane, mut stream: TcpStream, key: Key) -> Result<String, String> {
    let mut session = io::handshake(&mut stream, key, HANDSHAKE_TIMEOUT)
        .await
        .map_err(|e| match e {
            io::HandshakeError::Protocol(p) => rejected(cp, p),
            other => other.to_string(),
        })?;
    let (rd, mut wr) = stream.into_split();
    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = tokio::spawn(io::read_frames(rd, frames_tx));

    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, frames.recv())
        .await
        .map_err(|_| "no registration within 5 s".to_string())?
        .ok_or("closed before registering")?
        .map_err(|e| rejected(cp, e))?;
    let name = match session
        .open::<AgentMsg>(&first)
        .map_err(|e| rejected(cp, e))?
    {
        AgentMsg::Register { node } => node,
        other => return Err(format!("first message was not a registration: {other:?}")),
    };
    let Some(node) = cp.model().node_id(&name) else {
        cp.reject("unknown_node");
        return Err(format!(
            "agent registered as '{name}', which is not a node of this fep"
        ));
    };
    tracing::info!("agent of node '{name}' registered");
    let (tx, mut outgoing) = mpsc::unbounded_channel();
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    cp.agents().insert(
        node,
        AgentLink {
            generation,
            tx,
            pending: Default::default(),
        },
    );

    cp.ask_for_live_connections(node);

    let result = loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(bytes)) => match session.open::<AgentMsg>(&bytes) {
                    Ok(msg) => cp.on_agent_msg(node, msg),
                    Err(e) => break Err(rejected(cp, e)),
                },
                Some(Err(e)) => break Err(rejected(cp, e)),
                None => break Ok(name.clone()),
            },
            msg = outgoing.recv() => match msg {
                Some(msg) => {
                    if let Err(e) = wr.write_all(&session.seal(&msg)).await {
                        break Err(e.to_string());
                    }
                }
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
        agents.remove(&node);
    }
    result
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

    pub(crate) fn on_agent_msg(&self, node: NodeId, msg: AgentMsg) {
        match msg {
            AgentMsg::Register { .. } => {
                tracing::warn!("agent registered twice on one connection; ignored")
            }
            AgentMsg::Report(report) => {
                let now = self.now();
                self.model().nodes[usize::from(node)].report = Some((now, report));
                self.tick();
            }
            AgentMsg::Live { id, live } => {
                if let Some(waiter) = self
                    .agents()
                    .get_mut(&node)
                    .and_then(|a| a.pending.remove(&id))
                {
                    let _ = waiter.send(live);
                }
            }
            AgentMsg::LiveList { conns } => self.rebuild_routes(node, &conns),
            AgentMsg::Control {
                port,
                start,
                ok,
                message,
            } => {
                let name = self.model().nodes[usize::from(node)].name.clone();
                let what = if start { "start" } else { "stop" };
                if ok {
                    tracing::info!("node '{name}': {what} of port {port} done: {message}");
                } else {
                    tracing::warn!("node '{name}': {what} of port {port} failed: {message}");
                    if start {
                        self.model().spare_failed(node, port);
                    }
                }
                self.tick();
            }
        }
    }

    /// After a start, asks each node's agent once for its live connections,
    /// so that routes the snapshot missed (or all of them, without one) are
    /// rebuilt from the back ends' connection tables (document 001, var. 1).
    fn ask_for_live_connections(&self, node: NodeId) {
        if !self
            .rebuilt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node)
        {
            return;
        }
        let table = self.dispatcher().table();
        let mut ports: Vec<u16> = table
            .services()
            .iter()
            .filter(|s| !s.removed && s.is_tcp())
            .flat_map(|s| s.live_backends().map(|(_, b)| b))
            .filter(|b| b.node_id == node)
            .map(|b| b.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        if !ports.is_empty() {
            self.send(node, FepMsg::ListLive { ports });
        }
    }

    /// Restores a route for every live connection a node reports that has
    /// none, when exactly one service maps it to that node. Connections from
    /// this host (fep's own health checks) are not clients' and get none.
    fn rebuild_routes(&self, node: NodeId, conns: &[ConnId]) {
        let table = self.dispatcher().table();
        let now = self.now();
        let mut restored = 0;
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
                .filter(|(_, s)| !s.removed && s.is_tcp() && family_matches(&s.vip, &client))
                .flat_map(|(sid, s)| {
                    s.live_backends()
                        .filter(|(_, b)| b.node_id == node && b.port == c.port)
                        .map(move |(bid, _)| (sid as ServiceId, bid))
                });
            let (Some((service, backend)), None) = (matches.next(), matches.next()) else {
                continue;
            };
            let key = FlowKey {
                service,
                client_port: c.client_port,
                client,
            };
            if self.dispatcher().restore_route(
                key,
                backend,
                state::REPLIED | state::ESTABLISHED,
                now,
            ) {
                restored += 1;
            }
        }
        if restored > 0 {
            let name = self.model().nodes[usize::from(node)].name.clone();
            tracing::info!(
                "rebuilt {restored} route(s) from the live connections of node '{name}'"
            );
        }
    }

    /// Asks a node's agent which of `conns` are live; `None` when no agent is
    /// connected or it does not answer within the prune interval.
    pub async fn query_live(&self, node: NodeId, conns: Vec<ConnId>) -> Option<Vec<ConnId>> {
        let id = QUERY_ID.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut agents = self.agents();
            let link = agents.get_mut(&node)?;
            link.pending.insert(id, tx);
            link.tx.send(FepMsg::Query { id, conns }).ok()?;
        }
        let wait = Duration::from_millis(self.prune_interval_ms.max(500));
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
}

/// Whether `ip` is an address of this host: only those can be bound.
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_hosts_addresses_count_as_local() {
        assert!(is_local(IpAddr::from([127, 0, 0, 1])));
        // TEST-NET-1: never an address of this host (binding sends nothing).
        assert!(!is_local(IpAddr::from([192, 0, 2, 1])));
    }
}
