//! The `fep` configuration file (TOML): the nodes, the services and each
//! service's transfer table (which back-end nodes serve it, at what ratio).
//!
//! Loading validates everything a running dispatcher relies on, so that an
//! operator sees one message naming the key and the problem instead of a
//! half-configured gateway.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster_config::{ClusterConfig, VipGroupConfig};
use crate::http_config::{HttpConfig, ServiceMode};
use crate::sites_config::SitesConfig;

/// Largest ratio accepted; keeps the chooser's weight sums far from overflow.
pub const MAX_RATIO: u32 = 1_000_000;
/// Most services (and service slots over a run of fep, removed ones included).
pub const MAX_SERVICES: usize = 1024;

/// Longest node or service name, in bytes: names go into route snapshots
/// (with a 16-bit length), metrics labels and log lines.
pub const MAX_NAME_LEN: usize = 255;

/// The largest `max_routes`: the route table reserves its slots at the
/// start (about 4 GB of address space at this bound, resident as used).
pub const MAX_ROUTES: usize = 100_000_000;

/// A configuration that could not be read or does not describe a servable cluster.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file '{path}': {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file '{path}' is not valid TOML for fep: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number carried in IPv4 `protocol` / IPv6 `next header`.
    pub fn ip_number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// How a service picks the back end for a new route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Smooth weighted round robin over the ratios: the shares of new routes
    /// follow the ratios however short the connections are.
    #[default]
    Ratio,
    /// Lowest (routes ÷ ratio, closing ones included), ties by table order:
    /// steers the shares of routes toward the ratios, e.g. after a ratio
    /// change.
    LeastRoutes,
    /// Lowest (reported load ÷ ratio) among running nodes wins.
    Load,
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Ratio => "ratio",
            Scheduler::LeastRoutes => "least-routes",
            Scheduler::Load => "load",
        }
    }
}

/// Which agent-reported figure is a node's load for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadMetric {
    /// Packets received per second on the service port.
    #[default]
    Pps,
    /// Live connections on the service port.
    Connections,
    /// The node's CPU use, 0–100 %.
    Cpu,
}

/// Where established routes' packets are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FastPath {
    /// Every packet through the TUN device.
    #[default]
    #[serde(rename = "off")]
    Off,
    /// Established routes installed in a tc-BPF program on the gateway's
    /// interfaces, which forwards their packets in the kernel; the TUN path
    /// keeps first packets, closings and anything unusual.
    #[serde(rename = "tc-bpf")]
    TcBpf,
}

/// What identifies a client for stickiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// (client IP, client port): each client process may land on its own back end.
    #[default]
    Port,
    /// Client IP: every connection of a client goes where its live routes go
    /// (protocols with control and data connections need this).
    Client,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub address: IpAddr,
    /// Where the node's agent connects from, when not from `address` (an
    /// agent connecting from any other address is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_address: Option<IpAddr>,
    /// Once drained, ask the node's agent to stop the services' processes.
    #[serde(default)]
    pub stop_when_drained: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub node: String,
    pub ratio: u32,
    /// Back-end port when it differs from the service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub scheduler: Scheduler,
    #[serde(default)]
    pub affinity: Affinity,
    /// Services sharing this name share client affinity: a client's new
    /// route in any of them goes to the node the client already has a live
    /// route to in the group (iperf3's control and data, SIP and RTP).
    /// Implies `affinity = "client"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_group: Option<String>,
    /// `tcp`: packets rewritten on the TUN path; `http`: requests dispatched
    /// one by one over pooled server connections.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: ServiceMode,
    /// HTTP mode's pools, sessions, rules and limits (defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConfig>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Nodes that may be started for this service when all back ends stay
    /// overloaded (scale-out); they join the transfer table once listening.
    #[serde(default, rename = "spare")]
    pub spares: Vec<BackendConfig>,
    #[serde(default)]
    pub load_metric: LoadMetric,
    /// Above this load a back end's effective ratio is halved …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_load: Option<f64>,
    /// … until its load falls below this (default 80 % of `high_load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_load: Option<f64>,
    /// How long every back end must stay overloaded before a spare starts.
    #[serde(default = "default_scale_out_after")]
    pub scale_out_after_ms: u64,
    /// A TCP-mode service is full at this many routes (connections): a new
    /// client is refused, and the site counts its VIP as out of room.
    /// HTTP mode's limit is `[service.http] max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// A SYN the service cannot place (full, or no back end with a ratio
    /// above 0) is answered with a RST, so that the client gives up at once
    /// and tries elsewhere; `false` drops it silently.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub refuse_when_full: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FepConfig {
    #[serde(default = "default_tun")]
    pub tun: String,
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Packets each TUN queue holds for its worker: room for the bursts that
    /// arrive while a worker waits for a core.
    #[serde(default = "default_tun_queue_len")]
    pub tun_queue_len: u32,
    /// Batch TUN reads and writes through io_uring (fep falls back to one
    /// system call per packet by itself where io_uring is refused).
    #[serde(default = "default_true")]
    pub tun_batching: bool,
    /// `"tc-bpf"`: established routes forwarded in the kernel (where BPF is
    /// unavailable fep says why and runs with the TUN path alone).
    #[serde(default, skip_serializing_if = "is_default")]
    pub fast_path: FastPath,
    #[serde(default = "default_idle_timeout")]
    pub route_idle_timeout_s: u64,
    #[serde(default = "default_max_routes")]
    pub max_routes: usize,
    #[serde(default = "default_policy_table")]
    pub policy_table: u32,
    /// Where agents connect (`"0.0.0.0:9441"`); no agent server when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_listen: Option<SocketAddr>,
    /// File with the agents' master key (64 hex characters); each node's
    /// own key is derived from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_key_file: Option<PathBuf>,
    /// A node whose agent reported before is down after this long without a report.
    #[serde(default = "default_node_dead_after")]
    pub node_dead_after_ms: u64,
    /// How often idle routes are pruned while shares move toward their target.
    #[serde(default = "default_prune_interval")]
    pub prune_interval_ms: u64,
    /// Where runtime changes (ratios, pins, drains) are kept across restarts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The admin API's Unix socket (mode 0600).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Also serve the admin API on TCP (e.g. "127.0.0.1:9442"), with a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// File with the bearer token TCP admin requests must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Where Prometheus scrapes `/metrics` (e.g. "0.0.0.0:9100"); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Active TCP health checks of each back end's service port; 0 turns them off.
    #[serde(default = "default_health_interval")]
    pub health_check_interval_ms: u64,
    #[serde(default = "default_health_timeout")]
    pub health_check_timeout_ms: u64,
    /// Consecutive failed checks after which a back end is down.
    #[serde(default = "default_health_fails")]
    pub health_check_fails: u32,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// This gateway's part in a cluster of front ends; none for a single gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    #[serde(default, rename = "vip_group", skip_serializing_if = "Vec::is_empty")]
    pub vip_groups: Vec<VipGroupConfig>,
    /// This gateway as one of several sites serving the same names (DNS
    /// hand-off, redirects); none for a single site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sites: Option<SitesConfig>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn default_tun() -> String {
    "fep0".into()
}
fn default_workers() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn default_tun_queue_len() -> u32 {
    4096
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_max_routes() -> usize {
    1_000_000
}
fn default_policy_table() -> u32 {
    100
}
fn default_node_dead_after() -> u64 {
    3000
}
fn default_prune_interval() -> u64 {
    1000
}
fn default_state_dir() -> PathBuf {
    "/var/lib/fep".into()
}
fn default_control_socket() -> PathBuf {
    "/run/fep/fep.sock".into()
}
fn default_health_interval() -> u64 {
    2000
}
fn default_health_timeout() -> u64 {
    1000
}
fn default_health_fails() -> u32 {
    3
}
fn default_scale_out_after() -> u64 {
    10_000
}

/// Reads a TOML file and parses it with `parse`, naming the file in errors.
pub(crate) fn load_with<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        ConfigError::Parse { message, .. } => ConfigError::Parse {
            path: path.display().to_string(),
            message,
        },
        other => other,
    })
}

/// Deserialises TOML text, with the parser's message (it names the key).
pub(crate) fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: "<text>".into(),
        message: e.to_string().trim_end().to_string(),
    })
}

impl FepConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_with(path, Self::parse)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: FepConfig = from_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Looks a node up by name.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Checks every rule a running dispatcher relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_settings()?;
        self.validate_nodes()?;
        self.validate_services()?;
        if let Some(sites) = &self.sites {
            sites.validate()?;
            self.validate_local_vips(sites)?;
        }
        crate::cluster_config::validate(self.cluster.as_ref(), &self.vip_groups)
    }

    /// The single-valued keys: ranges, reserved values, keys that need another.
    fn validate_settings(&self) -> Result<(), ConfigError> {
        if self.tun.is_empty() || self.tun.len() > 15 || self.tun.contains(['/', ' ', '\t', ':']) {
            return Err(ConfigError::invalid(
                "tun",
                format!(
                    "'{}' is not a usable interface name (1 to 15 characters, no '/', ':' or spaces)",
                    self.tun
                ),
            ));
        }
        check_range("workers", self.workers, 1..=64, "")?;
        check_range("tun_queue_len", self.tun_queue_len, 16..=65_536, " packets")?;
        check_range(
            "route_idle_timeout_s",
            self.route_idle_timeout_s,
            1..=7 * 24 * 3600,
            " seconds",
        )?;
        check_range(
            "max_routes",
            self.max_routes,
            1..=MAX_ROUTES,
            "; the route table's memory, about 54 bytes a route, is reserved at the start",
        )?;
        if matches!(self.policy_table, 0 | 253..=255) {
            return Err(ConfigError::invalid(
                "policy_table",
                format!(
                    "{} is reserved (0 unspecified, 253 default, 254 main, 255 local); pick another table number",
                    self.policy_table
                ),
            ));
        }
        if self.admin_listen.is_some() && self.admin_token_file.is_none() {
            return Err(ConfigError::invalid(
                "admin_token_file",
                "is required with admin_listen: the TCP admin API refuses requests without the token",
            ));
        }
        if self.agent_listen.is_some() && self.agent_key_file.is_none() {
            return Err(ConfigError::invalid(
                "agent_key_file",
                "is required with agent_listen (a file with 64 hex characters; `bep-agent --gen-key` writes one)",
            ));
        }
        for (key, v, min) in [
            ("node_dead_after_ms", self.node_dead_after_ms, 100),
            ("prune_interval_ms", self.prune_interval_ms, 50),
            ("health_check_timeout_ms", self.health_check_timeout_ms, 10),
        ] {
            if v < min {
                return Err(ConfigError::invalid(
                    key,
                    format!("{v} is below the minimum {min}"),
                ));
            }
        }
        if self.health_check_interval_ms != 0 && self.health_check_interval_ms < 100 {
            return Err(ConfigError::invalid(
                "health_check_interval_ms",
                "must be 0 (off) or at least 100",
            ));
        }
        if self.health_check_fails == 0 {
            return Err(ConfigError::invalid(
                "health_check_fails",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// This site's VIPs in `[[sites.name.at]]` must be served here: their
    /// room is what the site reports and redirects by.
    fn validate_local_vips(&self, sites: &SitesConfig) -> Result<(), ConfigError> {
        for (i, name) in sites.names.iter().enumerate() {
            for at in name.sites.iter().filter(|a| a.site == sites.me) {
                for vip in &at.vips {
                    let served = self.services.iter().any(|s| {
                        s.vip == *vip && s.port == name.port && s.protocol == Protocol::Tcp
                    });
                    if !served {
                        return Err(ConfigError::invalid(
                            format!("sites.name[{i}].at"),
                            format!(
                                "this site ('{}') lists {vip} for '{}', but no TCP [[service]] \
                                 here serves {vip} port {}",
                                sites.me, name.name, name.port
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_nodes(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut addrs = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let key = format!("node[{i}]");
            check_name(&format!("{key}.name"), &node.name)?;
            if !names.insert(node.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("node '{}' is defined twice", node.name),
                ));
            }
            if !is_unicast(node.address) {
                return Err(ConfigError::invalid(
                    format!("{key}.address"),
                    format!("{} is not a unicast host address", node.address),
                ));
            }
            if let Some(other) = addrs.insert(node.address, node.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.address"),
                    format!("{} is already the address of node '{other}'", node.address),
                ));
            }
            if let Some(a) = node.agent_address.filter(|&a| !is_unicast(a)) {
                return Err(ConfigError::invalid(
                    format!("{key}.agent_address"),
                    format!("{a} is not a unicast host address"),
                ));
            }
        }
        Ok(())
    }

    fn validate_services(&self) -> Result<(), ConfigError> {
        if self.services.len() > MAX_SERVICES {
            return Err(ConfigError::invalid(
                "service",
                format!("at most {MAX_SERVICES} services"),
            ));
        }
        let mut names = HashSet::new();
        let mut endpoints = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let key = format!("service[{i}]");
            check_name(&format!("{key}.name"), &svc.name)?;
            if !names.insert(svc.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("service '{}' is defined twice", svc.name),
                ));
            }
            if !is_unicast(svc.vip) {
                return Err(ConfigError::invalid(
                    format!("{key}.vip"),
                    format!("{} is not a unicast address", svc.vip),
                ));
            }
            if let Some(node) = self.nodes.iter().find(|n| n.address == svc.vip) {
                return Err(ConfigError::invalid(
                    format!("{key}.vip"),
                    format!("{} is the address of node '{}'", svc.vip, node.name),
                ));
            }
            if svc.port == 0 {
                return Err(ConfigError::invalid(
                    format!("{key}.port"),
                    "must be 1 to 65535",
                ));
            }
            if let Some(other) =
                endpoints.insert((svc.vip, svc.port, svc.protocol), svc.name.as_str())
            {
                return Err(ConfigError::invalid(
                    format!("{key}.port"),
                    format!(
                        "{} {}:{} is already served by service '{other}'",
                        svc.protocol.as_str(),
                        svc.vip,
                        svc.port
                    ),
                ));
            }
            self.validate_service(&key, svc)?;
        }
        Ok(())
    }

    /// One service's back ends and spares.
    fn validate_service(&self, key: &str, svc: &ServiceConfig) -> Result<(), ConfigError> {
        self.validate_backends(key, svc, &svc.backends, "backend")?;
        self.validate_backends(key, svc, &svc.spares, "spare")?;
        if let Some(spare) = svc
            .spares
            .iter()
            .find(|s| svc.backends.iter().any(|b| b.node == s.node))
        {
            return Err(ConfigError::invalid(
                format!("{key}.spare"),
                format!(
                    "node '{}' is both a backend and a spare of service '{}'",
                    spare.node, svc.name
                ),
            ));
        }
        validate_load_marks(key, svc)?;
        self.validate_mode(key, svc)
    }

    /// HTTP mode's keys, and that no TCP service's return path would take
    /// the replies on an HTTP service's server connections (both match the
    /// back end's address and port).
    fn validate_mode(&self, key: &str, svc: &ServiceConfig) -> Result<(), ConfigError> {
        if let Some(group) = &svc.affinity_group {
            check_name(&format!("{key}.affinity_group"), group)?;
            if svc.mode == ServiceMode::Http {
                return Err(ConfigError::invalid(
                    format!("{key}.affinity_group"),
                    "is for mode = \"tcp\" services (HTTP mode keeps a client by its \
                     session cookie)",
                ));
            }
        }
        if svc.mode == ServiceMode::Tcp {
            if svc.http.is_some() {
                return Err(ConfigError::invalid(
                    format!("{key}.http"),
                    "is for mode = \"http\" services",
                ));
            }
            // UDP services too (a datagram is dropped when full);
            // `refuse_when_full` does nothing there, UDP having no RST.
            if svc.max_connections == Some(0) {
                return Err(ConfigError::invalid(
                    format!("{key}.max_connections"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
            return Ok(());
        }
        if svc.max_connections.is_some() {
            return Err(ConfigError::invalid(
                format!("{key}.max_connections"),
                "is for mode = \"tcp\" services; an HTTP service's limit is \
                 `[service.http] max_connections`",
            ));
        }
        if svc.protocol != Protocol::Tcp {
            return Err(ConfigError::invalid(
                format!("{key}.mode"),
                "\"http\" needs protocol = \"tcp\"",
            ));
        }
        let nodes: Vec<&str> = svc.all_backends().map(|(b, _)| b.node.as_str()).collect();
        svc.http_config().validate(key, &nodes)?;
        let endpoint = |s: &ServiceConfig, b: &BackendConfig| {
            (self.node(&b.node).map(|n| n.address), s.backend_port(b))
        };
        for (be, _) in svc.all_backends() {
            let mine = endpoint(svc, be);
            if let Some(other) = self.services.iter().find(|o| {
                o.mode == ServiceMode::Tcp
                    && o.protocol == Protocol::Tcp
                    && o.all_backends().any(|(b, _)| endpoint(o, b) == mine)
            }) {
                return Err(ConfigError::invalid(
                    format!("{key}.backend"),
                    format!(
                        "node '{}' port {} also serves TCP-mode service '{}': its return path \
                         would take the HTTP service's server replies; use another port",
                        be.node, mine.1, other.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_backends(
        &self,
        svc_key: &str,
        svc: &ServiceConfig,
        list: &[BackendConfig],
        what: &str,
    ) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (j, be) in list.iter().enumerate() {
            let key = format!("{svc_key}.{what}[{j}]");
            let Some(node) = self.node(&be.node) else {
                let known: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
                return Err(ConfigError::invalid(
                    format!("{key}.node"),
                    format!(
                        "no node '{}' (nodes: {})",
                        be.node,
                        if known.is_empty() {
                            "none defined".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            };
            if !seen.insert(be.node.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.node"),
                    format!(
                        "node '{}' is listed twice in service '{}'",
                        be.node, svc.name
                    ),
                ));
            }
            if node.address.is_ipv4() != svc.vip.is_ipv4() {
                return Err(ConfigError::invalid(
                    format!("{key}.node"),
                    format!(
                        "node '{}' has address {} but the VIP {} is of the other IP family",
                        node.name, node.address, svc.vip
                    ),
                ));
            }
            if be.ratio > MAX_RATIO {
                return Err(ConfigError::invalid(
                    format!("{key}.ratio"),
                    format!("{} is above the maximum {MAX_RATIO}", be.ratio),
                ));
            }
            if be.port == Some(0) {
                return Err(ConfigError::invalid(
                    format!("{key}.port"),
                    "must be 1 to 65535",
                ));
            }
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// A service with no back ends, every optional key at its default.
    pub fn new(name: String, vip: IpAddr, port: u16, protocol: Protocol) -> Self {
        ServiceConfig {
            name,
            vip,
            port,
            protocol,
            scheduler: Scheduler::default(),
            affinity: Affinity::default(),
            affinity_group: None,
            mode: ServiceMode::default(),
            http: None,
            backends: Vec::new(),
            spares: Vec::new(),
            load_metric: LoadMetric::default(),
            high_load: None,
            low_load: None,
            scale_out_after_ms: default_scale_out_after(),
            max_connections: None,
            refuse_when_full: true,
        }
    }

    /// The port a back end serves this service on.
    pub fn backend_port(&self, be: &BackendConfig) -> u16 {
        be.port.unwrap_or(self.port)
    }

    /// Back ends then spares, each with whether it is a spare: everything
    /// that may carry this service's traffic.
    pub fn all_backends(&self) -> impl Iterator<Item = (&BackendConfig, bool)> {
        let listed = self.backends.iter().map(|b| (b, false));
        listed.chain(self.spares.iter().map(|b| (b, true)))
    }

    /// The HTTP settings (the defaults where `[service.http]` is absent).
    pub fn http_config(&self) -> HttpConfig {
        self.http.clone().unwrap_or_default()
    }

    /// The load below which an overloaded back end gets its ratio back.
    pub fn low_load_mark(&self) -> Option<f64> {
        self.high_load.map(|h| self.low_load.unwrap_or(h * 0.8))
    }
}

impl FepConfig {
    /// The first key whose change needs a restart of fep (the device, the
    /// workers, the sockets it listens on), if `new` changes one.
    pub fn restart_key_changed(&self, new: &FepConfig) -> Option<&'static str> {
        let keys: [(&'static str, bool); 19] = [
            ("admin_listen", self.admin_listen != new.admin_listen),
            (
                "admin_token_file",
                self.admin_token_file != new.admin_token_file,
            ),
            ("metrics_listen", self.metrics_listen != new.metrics_listen),
            ("tun", self.tun != new.tun),
            ("workers", self.workers != new.workers),
            ("tun_queue_len", self.tun_queue_len != new.tun_queue_len),
            ("tun_batching", self.tun_batching != new.tun_batching),
            ("fast_path", self.fast_path != new.fast_path),
            ("policy_table", self.policy_table != new.policy_table),
            ("agent_listen", self.agent_listen != new.agent_listen),
            ("agent_key_file", self.agent_key_file != new.agent_key_file),
            ("state_dir", self.state_dir != new.state_dir),
            ("control_socket", self.control_socket != new.control_socket),
            (
                "health_check_interval_ms",
                self.health_check_interval_ms != new.health_check_interval_ms,
            ),
            (
                "health_check_timeout_ms",
                self.health_check_timeout_ms != new.health_check_timeout_ms,
            ),
            (
                "prune_interval_ms",
                self.prune_interval_ms != new.prune_interval_ms,
            ),
            ("cluster", self.cluster != new.cluster),
            ("vip_group", self.vip_groups != new.vip_groups),
            ("sites", self.sites != new.sites),
        ];
        keys.into_iter()
            .find(|(_, changed)| *changed)
            .map(|(k, _)| k)
    }

    /// Three-way merge for a reload: what the file changed since `base` (the
    /// file loaded before) wins; everything else keeps its `live` (runtime)
    /// value. Nodes, services and each service's back ends and spares merge
    /// item by item (by name, by node).
    pub fn merge(base: &FepConfig, file: &FepConfig, live: &FepConfig) -> FepConfig {
        let header = |s: &ServiceConfig| ServiceConfig {
            backends: Vec::new(),
            spares: Vec::new(),
            ..s.clone()
        };
        let headers = |c: &FepConfig| c.services.iter().map(header).collect::<Vec<_>>();
        let find = |c: &FepConfig, name: &str| c.services.iter().find(|s| s.name == name).cloned();
        let services = merge_keyed(&headers(base), &headers(file), &headers(live), |s| {
            s.name.clone()
        })
        .into_iter()
        .map(|h| {
            let (b, f, l) = (
                find(base, &h.name),
                find(file, &h.name),
                find(live, &h.name),
            );
            let list = |s: &Option<ServiceConfig>, spares: bool| {
                s.as_ref().map_or_else(Vec::new, |s| {
                    if spares {
                        s.spares.clone()
                    } else {
                        s.backends.clone()
                    }
                })
            };
            let by_node = |b: &BackendConfig| b.node.clone();
            ServiceConfig {
                backends: merge_keyed(
                    &list(&b, false),
                    &list(&f, false),
                    &list(&l, false),
                    by_node,
                ),
                spares: merge_keyed(&list(&b, true), &list(&f, true), &list(&l, true), by_node),
                ..h
            }
        })
        .collect();
        FepConfig {
            nodes: merge_keyed(&base.nodes, &file.nodes, &live.nodes, |n| n.name.clone()),
            services,
            ..file.clone()
        }
    }
}

/// Per key: the file's version where the file changed it since `base`
/// (added, removed or edited), else the live one. Live order first, then
/// what only the file has.
fn merge_keyed<T: Clone + PartialEq, K: PartialEq>(
    base: &[T],
    file: &[T],
    live: &[T],
    key: impl Fn(&T) -> K,
) -> Vec<T> {
    let get = |list: &[T], k: &K| list.iter().find(|x| key(x) == *k).cloned();
    let mut keys: Vec<K> = live.iter().map(&key).collect();
    for k in file.iter().map(&key) {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.iter()
        .filter_map(|k| {
            let (b, f) = (get(base, k), get(file, k));
            if b != f {
                f
            } else {
                get(live, k)
            }
        })
        .collect()
}

/// The high and low load marks of a service, which spares need.
fn validate_load_marks(key: &str, svc: &ServiceConfig) -> Result<(), ConfigError> {
    match (svc.high_load, svc.low_load) {
        (Some(h), _) if !(h.is_finite() && h > 0.0) => {
            return Err(ConfigError::invalid(
                format!("{key}.high_load"),
                "must be a number above 0",
            ));
        }
        (Some(h), Some(l)) if !(l.is_finite() && l >= 0.0 && l < h) => {
            return Err(ConfigError::invalid(
                format!("{key}.low_load"),
                format!("must be at least 0 and below high_load ({h})"),
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                format!("{key}.low_load"),
                "needs high_load",
            ));
        }
        (None, None) if !svc.spares.is_empty() => {
            return Err(ConfigError::invalid(
                format!("{key}.spare"),
                "needs high_load: spares start when every back end stays above it",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// `value` of `key` within `range`; `unit` follows the bounds in the message.
pub(crate) fn check_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    unit: &str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::invalid(
        key,
        format!(
            "{value} is out of range ({} to {}{unit})",
            range.start(),
            range.end()
        ),
    ))
}

/// A name at `key`: not empty, at most [`MAX_NAME_LEN`] bytes.
fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ConfigError::invalid(
            key,
            format!(
                "is {} bytes long; names are at most {MAX_NAME_LEN} bytes",
                name.len()
            ),
        ));
    }
    Ok(())
}

fn is_unicast(addr: IpAddr) -> bool {
    !(addr.is_unspecified()
        || addr.is_multicast()
        || addr.is_loopback()
        || matches!(addr, IpAddr::V4(v4) if v4.is_broadcast()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_service_is_the_table_that_gives_only_the_required_keys() {
        let table = "name = \"x\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"udp\"";
        assert_eq!(
            toml::from_str::<ServiceConfig>(table).unwrap(),
            ServiceConfig::new("x".into(), [10, 0, 0, 1].into(), 80, Protocol::Udp)
        );
    }

    const EXAMPLE: &str = r#"
tun = "fep0"
workers = 2
route_idle_timeout_s = 300
max_routes = 1000000
policy_table = 100

[[node]]
name = "be1"
address = "10.0.2.11"

[[node]]
name = "be2"
address = "10.0.2.12"

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"

[[service.backend]]
node = "be1"
ratio = 2

[[service.backend]]
node = "be2"
ratio = 1
port = 8080
"#;

    fn problem(text: &str) -> String {
        FepConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn example_from_the_issue_parses() {
        let cfg = FepConfig::parse(EXAMPLE).unwrap();
        assert_eq!(cfg.tun, "fep0");
        assert_eq!(cfg.services[0].backends.len(), 2);
        assert_eq!(cfg.services[0].scheduler, Scheduler::Ratio);
        assert_eq!(cfg.services[0].affinity, Affinity::Port);
        let svc = &cfg.services[0];
        assert_eq!(svc.backend_port(&svc.backends[0]), 80);
        assert_eq!(svc.backend_port(&svc.backends[1]), 8080);
    }

    #[test]
    fn unknown_node_names_the_key_and_the_known_nodes() {
        let text = EXAMPLE.replace("node = \"be2\"", "node = \"be9\"");
        assert_eq!(
            problem(&text),
            "config key `service[0].backend[1].node`: no node 'be9' (nodes: be1, be2)"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(problem(&EXAMPLE.replace("workers = 2", "workerz = 2")).contains("workerz"));
        assert!(problem(&EXAMPLE.replace("ratio = 2", "ratio = -1")).contains("ratio"));
        assert!(problem(&EXAMPLE.replace("\"tcp\"", "\"sctp\"")).contains("sctp"));
        assert!(problem(&EXAMPLE.replace("10.0.0.100", "10.0.0.300")).contains("vip"));
        assert!(
            problem(&EXAMPLE.replace("policy_table = 100", "policy_table = 254"))
                .starts_with("config key `policy_table`")
        );
        assert!(problem(&EXAMPLE.replace("workers = 2", "workers = 0"))
            .starts_with("config key `workers`"));
    }

    #[test]
    fn names_longer_than_a_snapshot_holds_are_rejected() {
        let longest = "n".repeat(MAX_NAME_LEN);
        let ok = EXAMPLE.replace("\"be2\"", &format!("\"{longest}\""));
        assert_eq!(FepConfig::parse(&ok).unwrap().nodes[1].name, longest);
        let node = EXAMPLE.replace("\"be2\"", &format!("\"{longest}x\""));
        assert_eq!(
            problem(&node),
            "config key `node[1].name`: is 256 bytes long; names are at most 255 bytes"
        );
        // Counted in bytes: 128 two-byte characters are 256 bytes.
        let service = EXAMPLE.replace("name = \"web\"", &format!("name = \"{}\"", "é".repeat(128)));
        assert_eq!(
            problem(&service),
            "config key `service[0].name`: is 256 bytes long; names are at most 255 bytes"
        );
    }

    #[test]
    fn a_node_may_name_the_address_its_agent_connects_from() {
        let with = EXAMPLE.replace(
            "address = \"10.0.2.12\"",
            "address = \"10.0.2.12\"\nagent_address = \"192.168.7.12\"",
        );
        let cfg = FepConfig::parse(&with).unwrap();
        assert_eq!(cfg.nodes[0].agent_address, None);
        assert_eq!(
            cfg.nodes[1].agent_address,
            Some("192.168.7.12".parse().unwrap())
        );
        assert_eq!(
            problem(&with.replace("192.168.7.12", "224.0.0.1")),
            "config key `node[1].agent_address`: 224.0.0.1 is not a unicast host address"
        );
    }

    #[test]
    fn mixed_families_and_duplicates_are_rejected() {
        let v6 = EXAMPLE.replace("10.0.2.12", "fd00::12");
        assert!(problem(&v6).contains("other IP family"));
        let dup = EXAMPLE.replace("node = \"be2\"", "node = \"be1\"");
        assert!(problem(&dup).contains("listed twice"));
        let same_addr = EXAMPLE.replace("10.0.2.12", "10.0.2.11");
        assert!(problem(&same_addr).contains("already the address of node 'be1'"));
    }

    #[test]
    fn an_affinity_group_is_a_name_on_tcp_mode_services() {
        let grouped = EXAMPLE.replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\naffinity_group = \"iperf\"\n",
        );
        let cfg = FepConfig::parse(&grouped).unwrap();
        assert_eq!(cfg.services[0].affinity_group.as_deref(), Some("iperf"));
        let empty = grouped.replace("\"iperf\"", "\"\"");
        assert_eq!(
            problem(&empty),
            "config key `service[0].affinity_group`: must not be empty"
        );
        let http = grouped.replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nmode = \"http\"\n",
        );
        assert!(problem(&http)
            .starts_with("config key `service[0].affinity_group`: is for mode = \"tcp\""));
    }

    #[test]
    fn merge_keeps_runtime_changes_and_takes_what_the_file_changed() {
        let base = FepConfig::parse(EXAMPLE).unwrap();
        // At runtime: be2's ratio set to 5, node be3 and a back end on it added.
        let mut live = base.clone();
        live.services[0].backends[1].ratio = 5;
        live.nodes.push(NodeConfig {
            name: "be3".into(),
            address: "10.0.2.13".parse().unwrap(),
            agent_address: None,
            stop_when_drained: false,
        });
        live.services[0].backends.push(BackendConfig {
            node: "be3".into(),
            ratio: 1,
            port: None,
        });
        // In the file: be1's ratio changed to 7, workers changed.
        let mut file = base.clone();
        file.services[0].backends[0].ratio = 7;
        file.max_routes = 5;
        let merged = FepConfig::merge(&base, &file, &live);
        merged.validate().unwrap();
        let ratios: Vec<(&str, u32)> = merged.services[0]
            .backends
            .iter()
            .map(|b| (b.node.as_str(), b.ratio))
            .collect();
        assert_eq!(ratios, [("be1", 7), ("be2", 5), ("be3", 1)]);
        assert_eq!(merged.nodes.len(), 3);
        assert_eq!(merged.max_routes, 5);
        // The file removes be2 from the service: removed, whatever runtime said.
        let mut file2 = file.clone();
        file2.services[0].backends.remove(1);
        let merged2 = FepConfig::merge(&file, &file2, &merged);
        let nodes: Vec<&str> = merged2.services[0]
            .backends
            .iter()
            .map(|b| b.node.as_str())
            .collect();
        assert_eq!(nodes, ["be1", "be3"]);
        assert_eq!(base.restart_key_changed(&merged2), None);
        let mut tun = merged2.clone();
        tun.tun = "fep9".into();
        assert_eq!(merged2.restart_key_changed(&tun), Some("tun"));
        let mut timeout = merged2.clone();
        timeout.health_check_timeout_ms += 1;
        assert_eq!(
            merged2.restart_key_changed(&timeout),
            Some("health_check_timeout_ms"),
            "the refusal names the key that changed"
        );
    }

    #[test]
    fn max_connections_is_at_least_1_and_for_tcp_mode_services_only() {
        let with = |keys: &str| EXAMPLE.replace("protocol = \"tcp\"", keys);
        let cfg = FepConfig::parse(&with("protocol = \"tcp\"\nmax_connections = 2")).unwrap();
        assert_eq!(cfg.services[0].max_connections, Some(2));
        assert!(cfg.services[0].refuse_when_full, "refusing is the default");
        let quiet = with("protocol = \"tcp\"\nmax_connections = 1\nrefuse_when_full = false");
        assert!(!FepConfig::parse(&quiet).unwrap().services[0].refuse_when_full);
        assert_eq!(
            problem(&with("protocol = \"tcp\"\nmax_connections = 0")),
            "config key `service[0].max_connections`: must be at least 1 (leave it out for no limit)"
        );
        assert!(
            problem(&with("protocol = \"tcp\"\nmax_connections = -1")).contains("max_connections")
        );
        // UDP: the limit applies (datagrams are dropped); refuse_when_full
        // is accepted and does nothing.
        let udp = with("protocol = \"udp\"\nmax_connections = 5\nrefuse_when_full = false");
        assert_eq!(
            FepConfig::parse(&udp).unwrap().services[0].max_connections,
            Some(5)
        );
        assert!(problem(&with("protocol = \"udp\"\nmax_connections = 0"))
            .starts_with("config key `service[0].max_connections`"));
        assert_eq!(
            problem(&with(
                "protocol = \"tcp\"\nmode = \"http\"\nmax_connections = 100"
            )),
            "config key `service[0].max_connections`: is for mode = \"tcp\" services; \
             an HTTP service's limit is `[service.http] max_connections`"
        );
    }

    /// A site `a` of two serving `www.example.test` from VIP 10.9.1.100:80.
    fn sites(extra_sites: &str, extra_name: &str) -> String {
        format!(
            "[[node]]\nname = \"be\"\naddress = \"10.30.0.11\"\n\
             [[service]]\nname = \"web\"\nvip = \"10.9.1.100\"\nport = 80\nprotocol = \"tcp\"\n\
             backend = [{{ node = \"be\", ratio = 1 }}]\n\
             [sites]\nme = \"a\"\nkey_file = \"/k\"\nlisten = \"10.9.0.11:7400\"\n{extra_sites}\n\
             [sites.dns]\nlisten = [\"10.9.0.11:53\"]\nzone = \"example.test\"\nns = [\"ns1.example.test\"]\n\
             [[sites.site]]\nname = \"a\"\nexchange = \"10.9.0.11:7400\"\n\
             [[sites.site]]\nname = \"b\"\nexchange = \"10.9.0.12:7400\"\n\
             [[sites.name]]\nname = \"www.example.test\"\nport = 80\n{extra_name}\n\
             [[sites.name.at]]\nsite = \"a\"\nvips = [\"10.9.1.100\"]\n\
             [[sites.name.at]]\nsite = \"b\"\nvips = [\"10.9.2.100\"]\n"
        )
    }

    #[test]
    fn a_sites_table_is_checked_for_names_references_ranges_and_local_services() {
        let cfg = FepConfig::parse(&sites("", "")).unwrap();
        let s = cfg.sites.as_ref().unwrap();
        assert_eq!(
            (s.names[0].ttl_s, s.names[0].ohw.clone()),
            (60, vec![6, 4, 2, 1])
        );
        assert!(s.redirect && s.redirect_hops == 2);
        let problem = |text: &str| FepConfig::parse(text).unwrap_err().to_string();
        assert_eq!(
            problem(&sites("", "").replace("\nme = \"a\"", "\nme = \"z\"")),
            "config key `sites.me`: no site 'z'; sites: a, b"
        );
        assert!(problem(&sites("", "ohw = [1, 65]")).contains("`sites.name[0].ohw`: weight 65"));
        assert!(problem(&sites("", &format!("ohw = {:?}", [1; 17]))).contains("17 is out of range"));
        assert!(problem(&sites("", "ttl_s = 20000")).contains("sites.name[0].ttl_s"));
        assert!(problem(&sites("check_fails = 0", "")).contains("sites.check_fails"));
        let outside =
            sites("", "").replace("name = \"www.example.test\"", "name = \"www.example.org\"");
        assert!(problem(&outside).contains("is not in the zone 'example.test'"));
        let unknown = sites("", "").replace("site = \"b\"", "site = \"c\"");
        assert!(problem(&unknown).contains("no site 'c'; sites: a, b"));
        let unserved = sites("", "").replace("vip = \"10.9.1.100\"", "vip = \"10.9.1.101\"");
        assert_eq!(
            problem(&unserved),
            "config key `sites.name[0].at`: this site ('a') lists 10.9.1.100 for \
             'www.example.test', but no TCP [[service]] here serves 10.9.1.100 port 80"
        );
        // Document 002's zero weights are accepted.
        assert!(FepConfig::parse(&sites("", "ohw = [4, 2, 1, 0, 0, 0]")).is_ok());
    }

    #[test]
    fn defaults_fill_optional_keys() {
        let cfg = FepConfig::parse("").unwrap();
        assert_eq!(cfg.tun, "fep0");
        assert_eq!(cfg.route_idle_timeout_s, 300);
        assert_eq!(cfg.max_routes, 1_000_000);
        assert_eq!(cfg.policy_table, 100);
    }
}
