//! The admin API's requests and views: what `fep` serializes and `fepctl`
//! and the tests read. The JSON field names are the ones operators' scripts
//! read; a name changes here or nowhere.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{Protocol, Scheduler};

/// Writes a unit enum variant under its serde name, so a state's name is
/// spelled once (in its `rename_all`) for the JSON, the CLI text and the errors.
macro_rules! display_as_serde {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.serialize(f)
            }
        }
    )*};
}

/// A pinned node state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum PinState {
    Up,
    Down,
}

/// Values an operator pinned; each overrides what agents and checks say.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PinState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<u32>,
}

impl Pin {
    pub fn is_empty(&self) -> bool {
        self.state.is_none() && self.load.is_none() && self.ratio.is_none()
    }
}

/// What operators see of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Down,
    Draining,
    Drained,
}

impl NodeState {
    /// Every state, as the metrics export one series each.
    pub const ALL: [NodeState; 4] = [
        NodeState::Up,
        NodeState::Down,
        NodeState::Draining,
        NodeState::Drained,
    ];
}

/// Where a spare node stands in scale-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spare {
    /// A regular back end.
    No,
    /// A spare not started.
    Idle,
    /// Asked to start; joins once its port listens.
    Starting,
    /// Started and in the transfer table.
    Active,
}

/// Where a route's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteState {
    Open,
    /// One side has sent its FIN.
    Closing,
    Closed,
}

/// Whether the kernel fast path forwards established routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathState {
    /// `fast_path = "off"`: every packet through the TUN device.
    #[default]
    Off,
    /// Attached and forwarding.
    Running,
    /// Asked for but not running (`reason` says why).
    Unavailable,
}

display_as_serde!(PinState, NodeState, Spare, RouteState, FastPathState);

/// The kernel fast path in `GET /v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastPathView {
    pub state: FastPathState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The interfaces its program is attached to.
    pub interfaces: Vec<String>,
    /// Routes installed in the kernel now.
    pub routes: u64,
    /// Packets (and their bytes) the kernel forwarded for them.
    pub packets: u64,
    pub bytes: u64,
    /// Packets of installed routes handed to the TUN path instead (SYN,
    /// FIN, RST, TTL, no neighbour entry or too big for the next hop).
    pub passed: u64,
}

/// `POST /v1/drain`, `/v1/undrain`, `/v1/unpin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeArg {
    pub node: String,
}

/// `POST /v1/ratio`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatioArg {
    pub service: String,
    pub node: String,
    pub ratio: u32,
}

/// `POST /v1/pin`: the node and the values to pin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinArg {
    pub node: String,
    #[serde(flatten)]
    pub pin: Pin,
}

/// `POST /v1/node/add`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAddArg {
    pub name: String,
    pub address: IpAddr,
    /// Another address its agent may connect from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_address: Option<IpAddr>,
}

/// `POST /v1/node/remove` and `/v1/service/remove`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveArg {
    pub name: String,
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/backend/add`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendAddArg {
    pub service: String,
    pub node: String,
    pub ratio: u32,
    #[serde(default)]
    pub port: Option<u16>,
}

/// `POST /v1/backend/remove`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendRemoveArg {
    pub service: String,
    pub node: String,
    #[serde(default)]
    pub force: bool,
}

/// The answer to a command that succeeded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
}

/// The answer to a refused request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /v1/routes` query: filters and how many to list at most.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouteQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl RouteQuery {
    /// Routes listed when the query gives no limit.
    pub const DEFAULT_LIMIT: usize = 1000;
}

/// One route of `GET /v1/routes`. Borrows its names while fep streams a
/// listing; owns them once read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteView<'a> {
    pub service: Cow<'a, str>,
    pub client: IpAddr,
    pub client_port: u16,
    pub node: Cow<'a, str>,
    pub backend_port: u16,
    pub state: RouteState,
    pub idle_ms: u32,
}

/// `GET /v1/explain`: where a packet from `client:port` to `service` would go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExplainQuery {
    pub service: String,
    pub client: IpAddr,
    pub port: u16,
}

/// Why [`ExplainView::node`] is where the packet would go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExplainReason {
    /// The client port has a route.
    Route,
    /// No route; client affinity holds the client to a node.
    Affinity,
    /// No route; the scheduler would choose this back end now.
    Chooser,
    /// No route and none would be made: the service is at `max_connections`.
    ServiceFull,
    /// The route table holds `max_routes`: a route is made only if a
    /// flood's unconfirmed route can be evicted for it.
    TableFull,
    /// No back end has an effective ratio above 0.
    NoBackend,
}

/// `fepctl explain`: which back end a packet would reach and why, from the
/// tables as they are (no packet is sent, nothing changes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExplainView {
    pub service: String,
    pub client: IpAddr,
    pub client_port: u16,
    pub reason: ExplainReason,
    /// The back end it would reach (none when it would be refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_port: Option<u16>,
    /// The existing route's state and idle time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<(RouteState, u32)>,
    /// Under client affinity: the client's routes in the scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_routes: Option<u32>,
    pub scheduler: Scheduler,
    /// The service's back ends and ratios, as the chooser reads them now.
    pub backends: Vec<BackendView>,
}

/// One back end of a service, as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub node: String,
    pub port: u16,
    pub configured_ratio: u32,
    pub effective_ratio: u32,
    /// Routes whose connection is open (HTTP mode: requests in flight).
    pub routes: u32,
    /// Routes of connections that are over, lingering for their last
    /// segments (counted apart from `routes`).
    #[serde(default)]
    pub closing: u32,
    /// Share of the service's live routes.
    pub share: f64,
    /// Share the effective ratios aim for.
    pub target_share: f64,
    pub up: bool,
    pub overloaded: bool,
    pub spare: Spare,
    pub load: Option<f64>,
    /// HTTP mode's figures, for a back end of an HTTP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpBackendView>,
}

/// An HTTP-mode back end's requests, pool and sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpBackendView {
    pub requests: u64,
    /// Pooled server connections idle now, and taken by a request.
    pub pool_idle: u64,
    pub pool_busy: u64,
    /// Server connections opened so far.
    pub connects: u64,
    /// Requests per server connection opened (Pingora's reuse figure).
    pub reuse: f64,
    pub retries: u64,
    pub sessions: u64,
}

/// An HTTP-mode service's client side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpServiceView {
    pub requests_per_s: f64,
    pub requests: u64,
    /// Client connections open now.
    pub connections: u64,
    /// Connections and requests refused, or answered by fep itself, by reason.
    pub refused: Vec<(String, u64)>,
}

/// A VIP group of `GET /v1/cluster`: whether this gateway is its master
/// (keepalived's word) and whether its packets are held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub master: bool,
    /// Its packets are stored while its routes come to this gateway.
    pub holding: bool,
    /// Routes of the group's services here, closing ones included (all
    /// move with the group).
    pub routes: u64,
    pub last_hold: Option<HoldView>,
}

/// `GET /v1/cluster`: this front end, its VIP groups, its last planned
/// moves, the fep-to-fep frames and connections it refused, and its peers'
/// groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub fep: Option<String>,
    pub groups: Vec<GroupView>,
    /// The last planned moves this front end drove, oldest first.
    pub moves: Vec<MoveReport>,
    pub peer_rejects: BTreeMap<String, u64>,
    /// Every configured peer, as it answered over the fep-to-fep channel.
    pub peers: Vec<PeerView>,
}

/// A peer front end's groups, or why it did not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub name: String,
    pub address: String,
    pub groups: Vec<GroupView>,
    /// Why it could not be asked (unreachable, refused, …); then `groups`
    /// is empty.
    pub error: Option<String>,
}

/// What a planned move of a VIP group did, phase by phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveReport {
    pub group: String,
    pub from: String,
    pub to: String,
    /// Each phase and the milliseconds it took, in order.
    pub phases: Vec<(String, u64)>,
    pub routes_copied: u64,
    pub packets_replayed: u64,
    pub bytes_replayed: u64,
    /// How long the group's packets were held on the receiving front end.
    pub longest_hold_ms: u64,
}

/// `POST /v1/vip/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveArg {
    pub group: String,
    pub to: String,
}

/// How a group's last hold went: how long it lasted, what it replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    pub held_ms: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// A service of `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    /// Its back ends' live routes.
    pub routes: u32,
    /// Its back ends' closing routes.
    #[serde(default)]
    pub closing: u32,
    pub pruning: bool,
    pub backends: Vec<BackendView>,
    /// HTTP mode's figures, for a service with `mode = "http"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpServiceView>,
}

impl ServiceView {
    /// `NAME PROTOCOL VIP:PORT scheduler SCHEDULER` (PROTOCOL `http` for
    /// HTTP mode), as `fepctl services` and `fepctl top` head a service.
    pub fn heading(&self) -> String {
        format!(
            "{} {} {}:{} scheduler {}",
            self.name,
            if self.http.is_some() {
                "http"
            } else {
                self.protocol.as_str()
            },
            self.vip,
            self.port,
            self.scheduler.as_str()
        )
    }
}

/// A node's ratios in one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeServiceView {
    pub service: String,
    pub configured_ratio: u32,
    pub effective_ratio: u32,
    /// Live routes (as [`BackendView::routes`]).
    pub routes: u32,
    #[serde(default)]
    pub closing: u32,
}

/// A node of `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub address: IpAddr,
    /// Another address its agent may connect from.
    pub agent_address: Option<IpAddr>,
    pub state: NodeState,
    pub pinned: bool,
    pub pin: Pin,
    /// Live routes, in every service.
    pub routes: u32,
    /// Closing routes, in every service.
    #[serde(default)]
    pub closing: u32,
    pub agent_connected: bool,
    pub report_age_ms: Option<u32>,
    pub cpu_percent: Option<f64>,
    pub services: Vec<NodeServiceView>,
}

/// An event the data path counts, one counter per worker; its serde name is
/// its key in [`CountersView`] and its name in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Count {
    RoutesCreated,
    /// Never-answered routes evicted to make room under a SYN flood.
    UnconfirmedEvicted,
    /// Routes made from a back end's SYN-ACK in the first minute after a
    /// start: handshakes the previous run forwarded but had not journaled.
    HandshakesAdopted,
    IcmpEchoReplies,
    IcmpErrorsTranslated,
    TunReadErrors,
    TunWriteErrors,
    /// Packets of a held VIP group stored for replay.
    PacketsHeld,
    /// SYNs answered with a RST: their TCP service was at `max_connections`
    /// or had no back end with a ratio above 0 (`refuse_when_full`).
    SynRefused,
}

impl Count {
    pub const ALL: [Count; 9] = [
        Count::RoutesCreated,
        Count::UnconfirmedEvicted,
        Count::HandshakesAdopted,
        Count::IcmpEchoReplies,
        Count::IcmpErrorsTranslated,
        Count::TunReadErrors,
        Count::TunWriteErrors,
        Count::PacketsHeld,
        Count::SynRefused,
    ];
}

display_as_serde!(Count);

/// The packet counters, summed over the workers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersView {
    pub to_backend_packets: u64,
    pub to_backend_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    /// Every [`Count`], each under its own key.
    #[serde(flatten)]
    pub events: BTreeMap<Count, u64>,
    /// Dropped packets by reason, every reason listed.
    pub drops: BTreeMap<String, u64>,
}

impl CountersView {
    pub fn get(&self, count: Count) -> u64 {
        self.events.get(&count).copied().unwrap_or(0)
    }
}

/// TUN workers by how they do their I/O.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunWorkersView {
    pub batched: u64,
    /// Pays a system call per packet.
    pub blocking: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// Routes whose connection is open.
    pub routes: usize,
    /// Routes of closed connections, lingering until they expire (the
    /// table holds `routes + closing`).
    #[serde(default)]
    pub closing: usize,
    pub routes_expired: usize,
    pub routes_evicted: usize,
    pub journal_overflow: u64,
    pub tun_workers: TunWorkersView,
    pub fast_path: FastPathView,
    pub counters: CountersView,
    /// Rejected agent frames by reason.
    pub agent_rejects: BTreeMap<String, u64>,
    pub services: Vec<ServiceView>,
    pub nodes: Vec<NodeView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_written_as_its_json_name() {
        assert_eq!(NodeState::Drained.to_string(), "drained");
        assert_eq!(
            serde_json::to_string(&NodeState::Draining).unwrap(),
            r#""draining""#
        );
        assert_eq!(Spare::Starting.to_string(), "starting");
        assert_eq!(RouteState::Closing.to_string(), "closing");
        assert_eq!(PinState::Down.to_string(), "down");
    }

    #[test]
    fn a_pin_request_flattens_the_pinned_values_and_omits_the_rest() {
        let arg = PinArg {
            node: "be1".into(),
            pin: Pin {
                state: Some(PinState::Down),
                load: None,
                ratio: Some(3),
            },
        };
        let json = serde_json::to_value(&arg).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"node": "be1", "state": "down", "ratio": 3})
        );
        let back: PinArg = serde_json::from_value(json).unwrap();
        assert_eq!(back.pin, arg.pin);
    }

    #[test]
    fn a_node_view_reads_back_what_it_wrote() {
        let view = NodeView {
            name: "be1".into(),
            address: "10.0.2.11".parse().unwrap(),
            agent_address: Some("10.9.0.11".parse().unwrap()),
            state: NodeState::Up,
            pinned: false,
            pin: Pin::default(),
            routes: 2,
            closing: 1,
            agent_connected: true,
            report_age_ms: None,
            cpu_percent: Some(12.5),
            services: vec![NodeServiceView {
                service: "web".into(),
                configured_ratio: 2,
                effective_ratio: 1,
                routes: 2,
                closing: 1,
            }],
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["address"], "10.0.2.11");
        assert_eq!(json["report_age_ms"], serde_json::Value::Null);
        assert_eq!(json["pin"], serde_json::json!({}));
        assert_eq!(serde_json::from_value::<NodeView>(json).unwrap(), view);
    }

    #[test]
    fn the_counters_view_keeps_each_event_under_its_own_key() {
        let view = CountersView {
            events: Count::ALL.iter().zip(1..).map(|(&e, n)| (e, n)).collect(),
            drops: BTreeMap::from([("malformed".to_string(), 7)]),
            ..CountersView::default()
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["routes_created"], 1);
        assert_eq!(json["unconfirmed_evicted"], 2);
        assert_eq!(json["handshakes_adopted"], 3);
        assert_eq!(json["icmp_echo_replies"], 4);
        assert_eq!(json["icmp_errors_translated"], 5);
        assert_eq!(json["tun_read_errors"], 6);
        assert_eq!(json["tun_write_errors"], 7);
        assert_eq!(json["packets_held"], 8);
        assert_eq!(json["syn_refused"], 9);
        assert_eq!(json["drops"]["malformed"], 7);
        assert_eq!(json["to_backend_packets"], 0);
        let back = serde_json::from_value::<CountersView>(json).unwrap();
        assert_eq!(back, view);
        assert_eq!(back.get(Count::TunWriteErrors), 7);
    }
}

/// `GET /sites`: this site and, per name, every site as the answers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SitesView {
    pub me: String,
    pub names: Vec<SiteNameView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteNameView {
    pub name: String,
    pub sites: Vec<SiteSlotView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteSlotView {
    pub site: String,
    pub vips: Vec<std::net::IpAddr>,
    /// This site's checks reach it.
    pub up: bool,
    /// It takes new clients.
    pub room: bool,
    /// Its hand-off total (or remaining-connection ratio in ‰ with three
    /// sites or fewer) and that as a share of the name's first answers.
    pub weight: u64,
    pub share_percent: u32,
}
