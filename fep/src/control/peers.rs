//! The other front ends, and planned moves of VIP groups between them
//! (document 001's order):
//!
//! 1. the receiving fep holds the group's packets (migration mode);
//! 2. it raises its keepalived track file for the group and asks the
//!    holder to lower its own, so keepalived moves the addresses: traffic
//!    arrives here, and is held;
//! 3. it takes every route of the group from the old holder (by service
//!    and node names, as a route snapshot), which forwards stragglers
//!    until then, and then has them deleted there;
//! 4. it replays what it held, in order, through the copied routes.
//!
//! Bounds of the channel: [`MAX_PEER_CONNECTIONS`] at a time, only from a
//! configured peer's address, a valid hello within [`AUTH_TIMEOUT`], frames
//! within the protocol's limit, and an idle connection closed after
//! [`IDLE_TIMEOUT`]. Refused frames and connections change nothing and are
//! counted by reason.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fep_shared::api::{GroupView, MoveReport};
use fep_shared::cluster_config::TRACK_HOLD;
use fep_shared::peer::{GroupTraffic, PeerReply, PeerRequest, ROUTES_PER_PART};
use fep_shared::protocol::{io, Key, ProtocolError, Session, MAX_FRAME, MAX_REGISTER_FRAME};
use fep_shared::{ClusterConfig, PeerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{snapshot, ControlPlane};
use crate::counters::{Totals, WorkerCounters};
use crate::holds::GroupId;

/// Peer connections served at once.
pub const MAX_PEER_CONNECTIONS: usize = 8;
/// From accepting a connection to its valid hello.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to a peer, and each of its answers.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long keepalived may take to move the addresses of a group.
const VRRP_TIMEOUT: Duration = Duration::from_secs(5);
/// Planned moves remembered for `fepctl cluster`.
const MOVES_KEPT: usize = 16;
/// Counter labels of refused peer connections and frames, besides
/// [`ProtocolError::KINDS`].
pub const REFUSALS: [&str; 4] = ["unknown_peer", "wrong_address", "auth_timeout", "busy"];

/// This front end's peers and what planned moves need: the key, the track
/// files, the record of refusals and moves.
pub struct Peers {
    me: String,
    key: Key,
    peers: Vec<PeerConfig>,
    track_dir: PathBuf,
    rejects: Mutex<BTreeMap<&'static str, u64>>,
    moves: Mutex<VecDeque<MoveReport>>,
    /// The workers' counters, for each group's traffic.
    counters: Vec<Arc<WorkerCounters>>,
}

impl Peers {
    /// From a cluster config with peers (`None` without them), the key file
    /// read and the track directory made, with a 0 file for each group that
    /// has none: a start never raises a group's priority.
    pub fn new(
        cfg: &ClusterConfig,
        groups: &[String],
        counters: Vec<Arc<WorkerCounters>>,
    ) -> anyhow::Result<Option<Peers>> {
        if !cfg.moves() {
            return Ok(None);
        }
        let (Some(me), Some(key_file), Some(track_dir)) =
            (&cfg.name, &cfg.key_file, &cfg.track_dir)
        else {
            bail!("cluster peers need cluster.name, key_file and track_dir");
        };
        let key = Key::load(key_file).map_err(anyhow::Error::msg)?;
        let peers = Peers {
            me: me.clone(),
            key,
            peers: cfg.peers.clone(),
            track_dir: track_dir.clone(),
            rejects: Mutex::default(),
            moves: Mutex::default(),
            counters,
        };
        for g in groups {
            if !peers.track_file(g).exists() {
                peers.write_track(g, false)?;
            }
        }
        Ok(Some(peers))
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn list(&self) -> &[PeerConfig] {
        &self.peers
    }

    /// The workers' counters, summed.
    pub fn totals(&self) -> Totals {
        Totals::sum(self.counters.iter().map(|c| &**c))
    }

    fn track_file(&self, group: &str) -> PathBuf {
        self.track_dir.join(group)
    }

    /// Sets the group's keepalived track file: [`TRACK_HOLD`] where this
    /// gateway is to hold the group, 0 where not.
    pub fn write_track(&self, group: &str, hold: bool) -> anyhow::Result<()> {
        let value = if hold { TRACK_HOLD } else { 0 };
        let path = self.track_file(group);
        crate::atomic_file::write(&self.track_dir, &path, format!("{value}\n").as_bytes())
            .with_context(|| format!("cannot write the track file {}", path.display()))
    }

    fn reject(&self, kind: &'static str) {
        *lock(&self.rejects).entry(kind).or_default() += 1;
    }

    /// Refused peer connections and frames, by reason.
    pub fn rejects(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.rejects).clone()
    }

    /// The last planned moves, oldest first.
    pub fn moves(&self) -> Vec<MoveReport> {
        lock(&self.moves).iter().cloned().collect()
    }

    fn record(&self, report: &MoveReport) {
        let mut moves = lock(&self.moves);
        if moves.len() == MOVES_KEPT {
            moves.pop_front();
        }
        moves.push_back(report.clone());
    }

    fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// Every front end's name, this one marked, for refusals.
    fn names(&self) -> String {
        std::iter::once(format!("{} (this one)", self.me))
            .chain(self.peers.iter().map(|p| p.name.clone()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection to a peer, its hello sent.
pub(super) struct Link {
    stream: TcpStream,
    session: Session,
    name: String,
}

/// How long a status request may take, connecting included (`fepctl
/// cluster` and the controller wait for it, also for a peer that is gone).
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// `peer`'s groups: their traffic (for the controller) and their view.
pub(super) async fn ask_status(
    peers: &Peers,
    peer: &PeerConfig,
) -> anyhow::Result<(Vec<GroupTraffic>, Vec<GroupView>)> {
    let ask = async {
        let mut link = Link::open(peers, peer).await?;
        match link.ask(&PeerRequest::Status, STATUS_TIMEOUT).await? {
            PeerReply::Status { groups, view } => Ok((groups, view)),
            other => bail!("fep '{}' answered {other:?} to a status request", peer.name),
        }
    };
    tokio::time::timeout(STATUS_TIMEOUT, ask)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "fep '{}' at {} did not answer within {STATUS_TIMEOUT:?}",
                peer.name,
                peer.address
            )
        })?
}

impl Link {
    pub(super) async fn open(peers: &Peers, peer: &PeerConfig) -> anyhow::Result<Link> {
        let what = || format!("fep '{}' at {}", peer.name, peer.address);
        let mut stream = tokio::time::timeout(ASK_TIMEOUT, TcpStream::connect(peer.address))
            .await
            .map_err(|_| anyhow::anyhow!("{} does not answer", what()))?
            .with_context(what)?;
        let session = io::handshake(&mut stream, peers.key.clone(), AUTH_TIMEOUT)
            .await
            .with_context(what)?;
        let mut link = Link {
            stream,
            session,
            name: peer.name.clone(),
        };
        link.send(&PeerRequest::Hello {
            fep: peers.me.clone(),
        })
        .await?;
        Ok(link)
    }

    async fn send(&mut self, req: &PeerRequest) -> anyhow::Result<()> {
        let frame = self.session.seal(req);
        tokio::time::timeout(ASK_TIMEOUT, self.stream.write_all(&frame))
            .await
            .map_err(|_| anyhow::anyhow!("fep '{}' takes no request", self.name))?
            .with_context(|| format!("sending to fep '{}'", self.name))
    }

    async fn reply(&mut self, wait: Duration) -> anyhow::Result<PeerReply> {
        let frame = tokio::time::timeout(wait, io::read_frame(&mut self.stream, MAX_FRAME))
            .await
            .map_err(|_| anyhow::anyhow!("fep '{}' did not answer within {wait:?}", self.name))??
            .with_context(|| format!("fep '{}' closed the connection", self.name))?;
        match self.session.open::<PeerReply>(&frame)? {
            PeerReply::Refused { error } => bail!("fep '{}' refused: {error}", self.name),
            reply => Ok(reply),
        }
    }

    pub(super) async fn ask(
        &mut self,
        req: &PeerRequest,
        wait: Duration,
    ) -> anyhow::Result<PeerReply> {
        self.send(req).await?;
        self.reply(wait).await
    }
}

/// Serves the peers' requests on `listen` until the runtime stops.
pub async fn serve(cp: Arc<ControlPlane>, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen for the other front ends on {listen} (cluster.listen)")
    })?;
    tracing::info!("listening for the other front ends on {listen}");
    let slots = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accepting a peer connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peers = cp.peers().expect("served only with peers");
        if !peers.peers.iter().any(|p| p.address.ip() == from.ip()) {
            peers.reject("wrong_address");
            tracing::warn!(
                "peer connection from {from} refused: no [[cluster.peer]] has that address"
            );
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            peers.reject("busy");
            continue;
        };
        let cp = cp.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(&cp, stream, from).await {
                tracing::warn!("peer connection from {from} ended: {e}");
            }
            drop(slot);
        });
    }
}

/// One peer connection: its hello, then requests until it closes.
async fn connection(
    cp: &Arc<ControlPlane>,
    mut stream: TcpStream,
    from: SocketAddr,
) -> anyhow::Result<()> {
    let peers = cp.peers().expect("served only with peers");
    let refuse = |e: ProtocolError| {
        peers.reject(e.kind());
        anyhow::anyhow!("rejected frame: {e}")
    };
    let hello = async {
        let mut session = io::handshake(&mut stream, peers.key.clone(), AUTH_TIMEOUT).await?;
        let frame = io::read_frame(&mut stream, MAX_REGISTER_FRAME)
            .await
            .map_err(refuse)?
            .context("closed before its hello")?;
        match session.open::<PeerRequest>(&frame).map_err(refuse)? {
            PeerRequest::Hello { fep } => anyhow::Ok((session, fep)),
            _ => {
                peers.reject("unsolicited");
                bail!("a first request that is not a hello")
            }
        }
    };
    let (mut session, name) = tokio::time::timeout(AUTH_TIMEOUT, hello)
        .await
        .map_err(|_| {
            peers.reject("auth_timeout");
            anyhow::anyhow!("no valid hello within {AUTH_TIMEOUT:?}")
        })??;
    match peers.peer(&name) {
        None => {
            peers.reject("unknown_peer");
            bail!("'{name}' is not a peer of this fep");
        }
        Some(p) if p.address.ip() != from.ip() => {
            peers.reject("wrong_address");
            bail!(
                "'{name}' connects from {}, its address is {}",
                from.ip(),
                p.address.ip()
            );
        }
        Some(_) => {}
    }
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, io::read_frame(&mut stream, MAX_FRAME))
            .await
        {
            Err(_) => return Ok(()),
            Ok(frame) => match frame.map_err(refuse)? {
                Some(f) => f,
                None => return Ok(()),
            },
        };
        let req = session.open::<PeerRequest>(&frame).map_err(refuse)?;
        tracing::info!("fep '{name}' asks: {}", describe(&req));
        for reply in cp.clone().answer(&name, req).await {
            stream.write_all(&session.seal(&reply)).await?;
        }
    }
}

fn describe(req: &PeerRequest) -> String {
    match req {
        PeerRequest::Hello { fep } => format!("hello from {fep}"),
        PeerRequest::Release { group } => format!("release {group}"),
        PeerRequest::TakeRoutes { group } => format!("the routes of {group}"),
        PeerRequest::Forget { group } => format!("forget the routes of {group}"),
        PeerRequest::Move { group } => format!("move {group} here"),
        PeerRequest::Status => "its status".into(),
    }
}

fn refused(e: impl std::fmt::Display) -> PeerReply {
    PeerReply::Refused {
        error: e.to_string(),
    }
}

impl ControlPlane {
    /// The replies to one peer request.
    async fn answer(self: Arc<Self>, from: &str, req: PeerRequest) -> Vec<PeerReply> {
        let group = match &req {
            PeerRequest::Hello { .. } => return vec![refused("a second hello")],
            PeerRequest::Status => {
                return vec![PeerReply::Status {
                    groups: self.group_traffic(),
                    view: self.groups_view(),
                }]
            }
            PeerRequest::Release { group }
            | PeerRequest::TakeRoutes { group }
            | PeerRequest::Forget { group }
            | PeerRequest::Move { group } => group.clone(),
        };
        let Some(id) = self.group_id(&group) else {
            return vec![refused(format!("no VIP group '{group}' here"))];
        };
        match req {
            PeerRequest::Release { .. } => vec![match self.release_group(id, &group) {
                Ok(()) => PeerReply::Done,
                Err(e) => refused(e),
            }],
            PeerRequest::TakeRoutes { .. } => {
                let cp = self.clone();
                tokio::task::spawn_blocking(move || cp.group_routes(id))
                    .await
                    .unwrap_or_else(|e| vec![refused(e)])
            }
            PeerRequest::Forget { .. } => {
                let cp = self.clone();
                let n = tokio::task::spawn_blocking(move || cp.dispatcher().forget_group(id))
                    .await
                    .unwrap_or(0);
                tracing::info!("VIP group '{group}': {n} route(s) deleted, copied by fep '{from}'");
                vec![PeerReply::Forgot { routes: n as u64 }]
            }
            PeerRequest::Move { .. } => vec![match self.move_in(id, &group).await {
                Ok(r) => PeerReply::Moved(r),
                Err(e) => refused(format!("{e:#}")),
            }],
            PeerRequest::Hello { .. } | PeerRequest::Status => unreachable!("answered above"),
        }
    }

    /// The holder's part of a move: stop holding the group (track file at
    /// 0), so that keepalived moves it to the asker.
    fn release_group(&self, id: GroupId, name: &str) -> anyhow::Result<()> {
        if !self.is_master(id) {
            bail!(
                "fep '{}' is not the master of '{name}'",
                self.peers().map_or("", |p| p.me())
            );
        }
        self.peers().expect("peers").write_track(name, false)
    }

    /// The group's routes as route-snapshot parts.
    fn group_routes(&self, id: GroupId) -> Vec<PeerReply> {
        let table = self.dispatcher().table();
        let rows = self.dispatcher().group_rows(id);
        let mut parts: Vec<PeerReply> = rows
            .chunks(ROUTES_PER_PART)
            .map(|chunk| PeerReply::Routes {
                snapshot: hex::encode(snapshot::encode_rows(&table, chunk.iter().copied())),
                done: false,
            })
            .collect();
        if parts.is_empty() {
            parts.push(PeerReply::Routes {
                snapshot: hex::encode(snapshot::encode_rows(&table, [])),
                done: true,
            });
        }
        if let Some(PeerReply::Routes { done, .. }) = parts.last_mut() {
            *done = true;
        }
        parts
    }

    /// Runs a planned move of the group to the front end `to`: here, or
    /// asked of that peer.
    pub async fn move_group(self: &Arc<Self>, group: &str, to: &str) -> anyhow::Result<MoveReport> {
        let peers = self
            .peers()
            .context("this fep has no [[cluster.peer]]: planned moves need peers")?;
        let id = self
            .group_id(group)
            .with_context(|| format!("no VIP group '{group}' (see fepctl cluster)"))?;
        if to == peers.me() {
            return self.move_in(id, group).await;
        }
        let Some(peer) = peers.peer(to) else {
            bail!("no front end '{to}': the front ends are {}", peers.names());
        };
        let mut link = Link::open(peers, peer)
            .await
            .with_context(|| format!("the front ends are {}", peers.names()))?;
        let wait = VRRP_TIMEOUT + ASK_TIMEOUT * 3;
        match link
            .ask(
                &PeerRequest::Move {
                    group: group.into(),
                },
                wait,
            )
            .await?
        {
            PeerReply::Moved(r) => Ok(r),
            other => bail!("fep '{to}' answered {other:?} to a move"),
        }
    }

    /// The receiving front end's part of a planned move (see the module
    /// comment).
    async fn move_in(self: &Arc<Self>, id: GroupId, group: &str) -> anyhow::Result<MoveReport> {
        let peers = self.peers().context("planned moves need peers")?;
        if self.is_master(id) {
            bail!("fep '{}' holds '{group}' already", peers.me());
        }
        let start = Instant::now();
        let mut phases = Vec::new();
        let mut phase = |name: &str, since: &mut Instant| {
            phases.push((name.to_string(), since.elapsed().as_millis() as u64));
            *since = Instant::now();
        };
        let mut since = Instant::now();
        if !self.begin_move_in(id) {
            bail!("'{group}' is held here already (a move or a failover in progress)");
        }
        let result = async {
            phase("hold", &mut since);
            peers.write_track(group, true)?;
            let mut from = None;
            let mut errors = Vec::new();
            for p in &peers.peers {
                match Link::open(peers, p).await {
                    Ok(mut link) => match link.ask(&PeerRequest::Release { group: group.into() }, ASK_TIMEOUT).await {
                        Ok(_) => {
                            from = Some(link);
                            break;
                        }
                        Err(e) => errors.push(format!("{e:#}")),
                    },
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            let mut link = from.with_context(|| {
                format!("no live front end holds '{group}': {}", errors.join("; "))
            })?;
            phase("release", &mut since);
            let deadline = Instant::now() + VRRP_TIMEOUT;
            while !self.is_master(id) {
                if Instant::now() > deadline {
                    bail!("keepalived did not make this gateway master of '{group}' within {VRRP_TIMEOUT:?} (is its instance tracking {}?)", peers.track_file(group).display());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            phase("vrrp", &mut since);
            link.send(&PeerRequest::TakeRoutes { group: group.into() }).await?;
            let mut copied = 0;
            loop {
                let PeerReply::Routes { snapshot, done } = link.reply(ASK_TIMEOUT).await? else {
                    bail!("fep '{}' sent something else than routes", link.name);
                };
                let bytes = hex::decode(&snapshot).context("a route part that is not hex")?;
                let cp = self.clone();
                copied += tokio::task::spawn_blocking(move || {
                    snapshot::decode_into(&bytes, cp.dispatcher(), cp.now())
                })
                .await?
                .map_err(|e| anyhow::anyhow!("a route part that does not decode: {e}"))?;
                if done {
                    break;
                }
            }
            phase("copy", &mut since);
            link.ask(&PeerRequest::Forget { group: group.into() }, ASK_TIMEOUT).await?;
            phase("forget", &mut since);
            anyhow::Ok((link.name.clone(), copied))
        }
        .await;
        let cp = self.clone();
        let done = tokio::task::spawn_blocking(move || cp.finish_hold(id)).await?;
        if let Err(e) = result {
            // Back as it was: this gateway does not push for the group.
            let _ = peers.write_track(group, self.is_master(id));
            return Err(e);
        }
        let (from, copied) = result.expect("checked");
        phase("replay", &mut since);
        let report = MoveReport {
            group: group.into(),
            from,
            to: peers.me().into(),
            phases,
            routes_copied: copied as u64,
            packets_replayed: done.map_or(0, |d| d.replayed.packets),
            bytes_replayed: done.map_or(0, |d| d.replayed.bytes),
            longest_hold_ms: done
                .map_or(start.elapsed().as_millis() as u64, |d| u64::from(d.held_ms)),
        };
        tracing::info!(
            "VIP group '{group}' moved here from fep '{}': {report:?}",
            report.from
        );
        peers.record(&report);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use etherparse::PacketBuilder;
    use fep_shared::FepConfig;

    use super::snapshot;
    use crate::dispatcher::{Dispatcher, Verdict, Worker};
    use crate::holds::GroupId;
    use crate::wire::ip_from_addr;

    /// Document 001's Figs. 5-10: external addresses 31a-IP-1, 31a-IP-2
    /// (on fep a), 31b-IP-1 (on fep b), each a VIP group with its server.
    const FIGS: &str = r#"
[cluster]
notify_fifo = "/run/x"
[[vip_group]]
name = "31a-IP-1"
vips = ["10.0.31.1"]
[[vip_group]]
name = "31a-IP-2"
vips = ["10.0.31.2"]
[[vip_group]]
name = "31b-IP-1"
vips = ["10.0.31.11"]
[[node]]
name = "51a"
address = "10.0.51.1"
[[node]]
name = "51b"
address = "10.0.51.2"
[[node]]
name = "51c"
address = "10.0.51.3"
[[service]]
name = "x1"
vip = "10.0.31.1"
port = 80
protocol = "tcp"
backend = [{ node = "51a", ratio = 1 }]
[[service]]
name = "x2"
vip = "10.0.31.2"
port = 21
protocol = "tcp"
backend = [{ node = "51b", ratio = 1 }]
[[service]]
name = "y1"
vip = "10.0.31.11"
port = 80
protocol = "tcp"
backend = [{ node = "51c", ratio = 1 }]
"#;
    const X1: GroupId = 0;

    fn segment(client: [u8; 4], port: u16, vip: [u8; 4], vport: u16, syn: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(client, vip, 64).tcp(port, vport, 1, 1000);
        b = if syn { b.syn() } else { b.ack(1) };
        let mut out = Vec::new();
        b.write(&mut out, b"x").unwrap();
        out
    }

    /// Sends a client segment through `d`; the server it went to.
    fn send(d: &Dispatcher, w: &mut Worker, pkt: &mut [u8]) -> Result<Ipv4Addr, Verdict> {
        match d.process(pkt, 0, w) {
            Verdict::Forward(_) => Ok(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19])),
            other => Err(other),
        }
    }

    /// The rows of `d`, as (client, client port, server) sorted.
    fn rows(d: &Dispatcher) -> Vec<(std::net::IpAddr, u16, String)> {
        let table = d.table();
        let mut out: Vec<_> = d
            .routes()
            .export(|_| true)
            .iter()
            .map(|r| {
                let be = table.backend(r.key.service, r.route.backend);
                (
                    ip_from_addr(&r.key.client),
                    r.key.client_port,
                    be.node.clone(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn modes(d: &Dispatcher) -> Vec<bool> {
        (0..3).map(|g| d.holds().is_held(g)).collect()
    }

    #[test]
    fn golden_figs_5_to_10_a_moved_address_takes_its_rows_and_nothing_else() {
        let cfg = FepConfig::parse(FIGS).unwrap();
        let (a, b) = (Dispatcher::new(&cfg), Dispatcher::new(&cfg));
        let (mut wa, mut wb) = (
            Worker::new(Default::default()),
            Worker::new(Default::default()),
        );
        let (c10a, c10b, c10c) = ([10, 0, 10, 1], [10, 0, 10, 2], [10, 0, 10, 3]);
        // Before (Fig. 5): a has the 10a and 10b rows, b the 10c row.
        send(
            &a,
            &mut wa,
            &mut segment(c10a, 1029, [10, 0, 31, 1], 80, true),
        )
        .unwrap();
        send(
            &a,
            &mut wa,
            &mut segment(c10b, 1028, [10, 0, 31, 2], 21, true),
        )
        .unwrap();
        send(
            &b,
            &mut wb,
            &mut segment(c10c, 1050, [10, 0, 31, 11], 80, true),
        )
        .unwrap();
        let before_a = rows(&a);
        assert_eq!(before_a.len(), 2);
        assert_eq!(modes(&b), [false, false, false], "all normal");

        // Step 1: b puts 31a-IP-1 in migration mode; its packets are stored.
        assert!(b.holds().hold(X1));
        assert_eq!(modes(&b), [true, false, false]);
        let mut held = segment(c10a, 1029, [10, 0, 31, 1], 80, false);
        assert_eq!(send(&b, &mut wb, &mut held.clone()), Err(Verdict::Hold(X1)));
        assert_eq!(b.holds().store(X1, &held), crate::holds::Stored::Held);
        // a still forwards it (step 2 not done yet).
        assert_eq!(
            send(&a, &mut wa, &mut held.clone()),
            Ok(Ipv4Addr::new(10, 0, 51, 1))
        );

        // Step 3: every row of 31a-IP-1 is copied to b, then deleted on a.
        let copy = snapshot::encode_rows(&a.table(), a.group_rows(X1));
        assert_eq!(snapshot::decode_into(&copy, &b, 0).unwrap(), 1);
        assert_eq!(a.forget_group(X1), 1);

        // Step 4: b sets it normal and replays the stored packet through the
        // copied row.
        let mut replayer = Worker::replayer(Default::default());
        let mut out = Vec::new();
        b.holds()
            .release(X1, |p| out.push(send(&b, &mut replayer, p)));
        assert_eq!(out, [Ok(Ipv4Addr::new(10, 0, 51, 1))]);
        assert_eq!(modes(&b), [false, false, false]);

        // After (Fig. 10): a holds only the 10b row; b the 10c and 10a rows.
        let ip = |c: [u8; 4]| std::net::IpAddr::from(c);
        assert_eq!(rows(&a), [(ip(c10b), 1028, "51b".to_string())]);
        assert_eq!(
            rows(&b),
            [
                (ip(c10a), 1029, "51a".to_string()),
                (ip(c10c), 1050, "51c".to_string())
            ]
        );
        // The 10a connection goes on through b.
        assert_eq!(
            send(&b, &mut wb, &mut held),
            Ok(Ipv4Addr::new(10, 0, 51, 1))
        );
        let _ = &mut held;
    }
}
