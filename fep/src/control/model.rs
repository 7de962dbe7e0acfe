//! The control plane's model of the cluster: what each node's agent reported,
//! health-check results, pins, drains, overload and spares — and, derived
//! from them, each back end's effective ratio.
//!
//! Pure: no I/O, time passed in, so the unit tests replay failures, load
//! swings and drains step by step.

use crate::clock::idle_since;
use std::net::IpAddr;

pub use fep_shared::api::{NodeState, Pin, PinState, Spare};
use fep_shared::config::{NodeConfig, ServiceConfig};
use fep_shared::protocol::Report;
use fep_shared::{FepConfig, LoadMetric, Scheduler};

use crate::transfer_table::{Backend, BackendId, NodeId, Service, ServiceId, TransferTable};

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub address: IpAddr,
    /// Where its agent may connect from besides `address`.
    pub agent_address: Option<IpAddr>,
    pub stop_when_drained: bool,
    /// No longer configured (the slot stays).
    pub removed: bool,
    /// The last report and when it came (ms of the daemon clock).
    pub report: Option<(u32, Report)>,
    pub pin: Pin,
    pub draining: bool,
    pub drained: bool,
}

/// Why an agent's registration is refused (see [`Model::agent_node`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRefusal {
    UnknownNode,
    /// The agent connected from an address other than its node's.
    WrongAddress {
        allowed: String,
    },
}

/// The control plane's state of one transfer-table back end (the data
/// path's is [`crate::transfer_table::Backend`]).
#[derive(Debug, Clone)]
pub struct BackendState {
    pub service: ServiceId,
    pub index: BackendId,
    pub node: NodeId,
    pub port: u16,
    /// The configured ratio (of the live config: `fepctl ratio` changes it).
    pub configured: u32,
    pub spare: Spare,
    /// When its start last failed: scale-out tries spares that have not
    /// failed first, then the one that failed longest ago.
    pub spare_failed_at: Option<u32>,
    /// Consecutive failed health checks.
    pub health_fails: u32,
    /// Above the service's high-load mark (until it falls below the low one).
    pub overloaded: bool,
    /// Last computed down state, to see transitions.
    pub down: bool,
}

/// The control plane's state of one service: its load marks and whether it
/// is scaling out or being pruned.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub name: String,
    pub port: u16,
    pub tcp: bool,
    /// No longer configured (the slot stays).
    pub removed: bool,
    pub scheduler: Scheduler,
    pub metric: LoadMetric,
    pub high_load: Option<f64>,
    pub low_load: Option<f64>,
    pub scale_out_after_ms: u32,
    /// Since when every back end has been overloaded.
    pub overloaded_since: Option<u32>,
    /// Idle routes are being pruned until the shares reach the target.
    pub pruning: bool,
}

/// Something the I/O shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Delete the back end's routes so that clients' retries land elsewhere.
    BackendDown {
        service: ServiceId,
        backend: BackendId,
    },
    BackendUp {
        service: ServiceId,
        backend: BackendId,
    },
    /// Ask the node's agent to start the service on `port`.
    StartSpare { node: NodeId, port: u16 },
    /// The node holds no routes any more: safe to stop.
    NodeDrained { node: NodeId },
}

#[derive(Debug, Clone)]
pub struct Model {
    pub nodes: Vec<Node>,
    pub services: Vec<ServiceState>,
    pub backends: Vec<BackendState>,
    node_dead_after_ms: u32,
    health_fails: u32,
}

impl Node {
    /// Node `name` as configured (`None`: removed, its slot kept), with what
    /// the model knew of it before: reports, pins, drains.
    fn carried(name: &str, conf: Option<&NodeConfig>, old: Option<&Node>) -> Node {
        Node {
            name: name.to_string(),
            address: conf.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.address),
            agent_address: conf.and_then(|c| c.agent_address),
            stop_when_drained: conf.is_some_and(|c| c.stop_when_drained),
            removed: conf.is_none(),
            report: old.and_then(|o| o.report.clone()),
            pin: old.map(|o| o.pin.clone()).unwrap_or_default(),
            draining: old.is_some_and(|o| o.draining),
            drained: old.is_some_and(|o| o.drained),
        }
    }
}

impl ServiceState {
    /// The service in `slot` as configured (`None`: removed), keeping its
    /// overload clock and pruning from before.
    fn carried(slot: &Service, conf: Option<&ServiceConfig>, old: Option<&ServiceState>) -> Self {
        ServiceState {
            name: slot.name.clone(),
            port: slot.port,
            tcp: slot.is_tcp(),
            removed: conf.is_none(),
            scheduler: conf.map_or(Scheduler::Ratio, |c| c.scheduler),
            metric: conf.map_or(LoadMetric::Pps, |c| c.load_metric),
            high_load: conf.and_then(|c| c.high_load),
            low_load: conf.and_then(|c| c.low_load_mark()),
            scale_out_after_ms: conf
                .map_or(0, |c| c.scale_out_after_ms.min(u64::from(u32::MAX)) as u32),
            overloaded_since: old.and_then(|o| o.overloaded_since),
            pruning: old.is_some_and(|o| o.pruning),
        }
    }
}

impl BackendState {
    /// Back end `index` of service `service`, as `conf` configures it,
    /// keeping its health, overload and spare state from before (a spare
    /// that was starting or active stays so).
    fn carried(
        service: ServiceId,
        index: BackendId,
        be: &Backend,
        conf: &ServiceConfig,
        old: Option<&BackendState>,
    ) -> Self {
        let (b, is_spare) = conf
            .all_backends()
            .find(|(b, _)| b.node == be.node)
            .expect("table built from cfg");
        let spare = match (is_spare, old.map(|o| o.spare)) {
            (false, _) => Spare::No,
            (true, Some(s @ (Spare::Idle | Spare::Starting | Spare::Active))) => s,
            (true, _) => Spare::Idle,
        };
        BackendState {
            service,
            index,
            node: be.node_id,
            port: be.port,
            configured: b.ratio,
            spare,
            spare_failed_at: old.and_then(|o| o.spare_failed_at),
            health_fails: old.map_or(0, |o| o.health_fails),
            overloaded: old.is_some_and(|o| o.overloaded),
            down: old.is_some_and(|o| o.down),
        }
    }
}

impl Model {
    /// The model for `cfg` over `table`'s slots, carrying what `previous`
    /// knew (reports, pins, drains, health, overload, spares) by name.
    pub fn new(cfg: &FepConfig, table: &TransferTable, previous: Option<&Model>) -> Model {
        let nodes = table
            .node_names()
            .iter()
            .map(|name| {
                let old =
                    previous.and_then(|p| p.nodes.iter().find(|n| n.name == *name && !n.removed));
                Node::carried(name, cfg.node(name), old)
            })
            .collect();
        let mut services = Vec::new();
        let mut backends = Vec::new();
        for (sid, slot) in table.services().iter().enumerate() {
            let conf = cfg
                .services
                .iter()
                .find(|s| s.name == slot.name)
                .filter(|_| !slot.removed);
            let old = previous.and_then(|p| {
                p.services
                    .iter()
                    .find(|s| s.name == slot.name && !s.removed)
            });
            services.push(ServiceState::carried(slot, conf, old));
            let Some(conf) = conf else { continue };
            for (bid, be) in slot.live_backends() {
                let old = previous.and_then(|p| {
                    p.backends.iter().find(|o| {
                        p.services[usize::from(o.service)].name == slot.name
                            && p.nodes[usize::from(o.node)].name == be.node
                    })
                });
                backends.push(BackendState::carried(sid as ServiceId, bid, be, conf, old));
            }
        }
        Model {
            nodes,
            services,
            backends,
            node_dead_after_ms: cfg.node_dead_after_ms.min(u64::from(u32::MAX)) as u32,
            health_fails: cfg.health_check_fails,
        }
    }

    /// The model of a fresh start (tests, benchmarks).
    pub fn from_config(cfg: &FepConfig) -> Model {
        Model::new(cfg, &TransferTable::from_config(cfg), None)
    }

    /// The configured node `name` whose agent may connect from `peer`: only a
    /// node's own agent speaks for it. `Err` says why not.
    pub fn agent_node(&self, name: &str, peer: IpAddr) -> Result<NodeId, AgentRefusal> {
        let id = self
            .nodes
            .iter()
            .position(|n| n.name == name && !n.removed)
            .ok_or(AgentRefusal::UnknownNode)?;
        let n = &self.nodes[id];
        let peer = peer.to_canonical();
        if peer == n.address || Some(peer) == n.agent_address {
            Ok(id as NodeId)
        } else {
            Err(AgentRefusal::WrongAddress {
                allowed: n
                    .agent_address
                    .map_or(n.address.to_string(), |a| format!("{} or {a}", n.address)),
            })
        }
    }

    /// How long an agent may be silent before its node counts as down.
    pub fn node_dead_after_ms(&self) -> u32 {
        self.node_dead_after_ms
    }

    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .map(|i| i as NodeId)
    }

    /// The agent's last report, if it is recent enough to believe.
    pub fn live_report(&self, node: NodeId, now: u32) -> Option<&Report> {
        match &self.nodes[usize::from(node)].report {
            Some((at, r)) if idle_since(*at, now) < self.node_dead_after_ms => Some(r),
            _ => None,
        }
    }

    /// Up unless pinned down, or its agent reported once and then fell
    /// silent for `node_dead_after_ms`. A node without an agent counts as up.
    pub fn node_up(&self, node: NodeId, now: u32) -> bool {
        let n = &self.nodes[usize::from(node)];
        match n.pin.state {
            Some(PinState::Up) => true,
            Some(PinState::Down) => false,
            None => n.report.is_none() || self.live_report(node, now).is_some(),
        }
    }

    /// A back end is up when its node is, its health checks pass and its
    /// agent does not report the port closed; a node pinned up overrides the
    /// last two.
    pub fn backend_up(&self, b: &BackendState, now: u32) -> bool {
        if !self.node_up(b.node, now) {
            return false;
        }
        if self.nodes[usize::from(b.node)].pin.state == Some(PinState::Up) {
            return true;
        }
        let listening = self
            .live_report(b.node, now)
            .and_then(|r| r.services.iter().find(|s| s.port == b.port))
            .map(|s| s.listening);
        b.health_fails < self.health_fails && listening != Some(false)
    }

    /// The back end's load under its service's metric: pinned, or reported.
    pub fn load(&self, b: &BackendState, now: u32) -> Option<f64> {
        let node = &self.nodes[usize::from(b.node)];
        if let Some(l) = node.pin.load {
            return Some(l);
        }
        let report = self.live_report(b.node, now)?;
        let svc = report.services.iter().find(|s| s.port == b.port);
        match self.services[usize::from(b.service)].metric {
            LoadMetric::Pps => svc.map(|s| s.rx_pps),
            LoadMetric::Connections => svc.map(|s| f64::from(s.connections)),
            LoadMetric::Cpu => Some(report.cpu_percent),
        }
    }

    /// The ratio the chooser uses: 0 when down, draining or a spare not yet
    /// started; the pinned or configured ratio otherwise, halved (rounded up)
    /// while overloaded.
    pub fn effective_ratio(&self, b: &BackendState, now: u32) -> u32 {
        let node = &self.nodes[usize::from(b.node)];
        if node.draining || node.drained || !self.backend_up(b, now) {
            return 0;
        }
        if matches!(b.spare, Spare::Idle | Spare::Starting) {
            return 0;
        }
        let ratio = node.pin.ratio.unwrap_or(b.configured);
        let svc = &self.services[usize::from(b.service)];
        if b.overloaded && svc.scheduler != Scheduler::Load {
            ratio.div_ceil(2)
        } else {
            ratio
        }
    }

    pub fn node_state(&self, node: NodeId, now: u32) -> NodeState {
        let n = &self.nodes[usize::from(node)];
        if n.drained {
            NodeState::Drained
        } else if n.draining {
            NodeState::Draining
        } else if self.node_up(node, now) {
            NodeState::Up
        } else {
            NodeState::Down
        }
    }

    /// Records a health-check result for every back end on (node, port).
    pub fn health_result(&mut self, node: NodeId, port: u16, ok: bool) {
        for b in self
            .backends
            .iter_mut()
            .filter(|b| b.node == node && b.port == port)
        {
            b.health_fails = if ok {
                0
            } else {
                b.health_fails.saturating_add(1)
            };
        }
    }

    /// Starts a drain: no new routes; `tick` reports it drained once it
    /// holds no routes.
    pub fn drain(&mut self, node: NodeId) {
        let n = &mut self.nodes[usize::from(node)];
        n.draining = !n.drained;
    }

    pub fn undrain(&mut self, node: NodeId) {
        let n = &mut self.nodes[usize::from(node)];
        n.draining = false;
        n.drained = false;
    }

    /// Advances the state machines: down/up transitions, overload with
    /// hysteresis, scale-out, drain completion. `routes_of` counts a node's
    /// routes, closing ones included.
    pub fn tick(&mut self, now: u32, routes_of: impl Fn(NodeId) -> u32) -> Vec<Event> {
        let mut events = Vec::new();
        for i in 0..self.backends.len() {
            let up = self.backend_up(&self.backends[i], now);
            let load = self.load(&self.backends[i], now);
            let svc = &self.services[usize::from(self.backends[i].service)];
            let (high, low) = (svc.high_load, svc.low_load);
            let b = &mut self.backends[i];
            // A spare not started is expected to be closed: no news.
            if b.down == up && b.spare != Spare::Idle {
                let (service, backend) = (b.service, b.index);
                events.push(if up {
                    Event::BackendUp { service, backend }
                } else {
                    Event::BackendDown { service, backend }
                });
            }
            b.down = !up;
            b.overloaded = match (high, low, load) {
                (Some(h), _, Some(l)) if !b.overloaded => l > h,
                (Some(_), Some(lo), Some(l)) => l >= lo,
                _ => false,
            };
            if b.spare == Spare::Starting
                && self.nodes[usize::from(b.node)]
                    .report
                    .as_ref()
                    .and_then(|(_, r)| r.services.iter().find(|s| s.port == b.port))
                    .is_some_and(|s| s.listening)
            {
                b.spare = Spare::Active;
            }
        }
        for sid in 0..self.services.len() {
            if !self.services[sid].removed {
                events.extend(self.scale_out(sid as ServiceId, now));
            }
        }
        for (id, n) in self.nodes.iter_mut().enumerate() {
            if n.draining && !n.removed && routes_of(id as NodeId) == 0 {
                n.draining = false;
                n.drained = true;
                events.push(Event::NodeDrained { node: id as NodeId });
            }
        }
        events
    }

    /// Writes effective ratios and loads into `table` (what the data path's
    /// chooser reads); marks the services whose ratios changed for pruning
    /// and returns them.
    pub fn publish(&mut self, table: &TransferTable, now: u32) -> Vec<ServiceId> {
        let mut changed = Vec::new();
        for b in &self.backends {
            let be = table.backend(b.service, b.index);
            let ratio = self.effective_ratio(b, now);
            if be.ratio() != ratio {
                be.set_ratio(ratio);
                if !changed.contains(&b.service) {
                    changed.push(b.service);
                }
            }
            be.set_load(self.load(b, now).unwrap_or(0.0));
            be.set_overloaded(b.overloaded);
        }
        for &sid in &changed {
            self.services[usize::from(sid)].pruning = true;
        }
        changed
    }

    /// When every serving back end of a service has been overloaded for
    /// `scale_out_after_ms` (never without `high_load`), starts the first idle spare whose node is up.
    fn scale_out(&mut self, sid: ServiceId, now: u32) -> Option<Event> {
        let serving: Vec<&BackendState> = self
            .backends
            .iter()
            .filter(|b| {
                b.service == sid
                    && matches!(b.spare, Spare::No | Spare::Active)
                    && self.effective_ratio(b, now) > 0
            })
            .collect();
        let all_overloaded = !serving.is_empty() && serving.iter().all(|b| b.overloaded);
        let svc = &mut self.services[usize::from(sid)];
        if !all_overloaded {
            svc.overloaded_since = None;
            return None;
        }
        let since = *svc.overloaded_since.get_or_insert(now);
        if idle_since(since, now) < svc.scale_out_after_ms {
            return None;
        }
        let starting = self
            .backends
            .iter()
            .any(|b| b.service == sid && b.spare == Spare::Starting);
        if starting {
            return None;
        }
        let (i, _) = self
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                b.service == sid && b.spare == Spare::Idle && self.node_up(b.node, now)
            })
            .min_by_key(|(_, b)| {
                b.spare_failed_at
                    .map(|at| std::cmp::Reverse(idle_since(at, now)))
            })?;
        let b = &mut self.backends[i];
        b.spare = Spare::Starting;
        self.services[usize::from(sid)].overloaded_since = None;
        Some(Event::StartSpare {
            node: b.node,
            port: b.port,
        })
    }

    /// A spare's start command failed (at `now`): it goes back to idle, and
    /// the next scale-out tries another spare first.
    pub fn spare_failed(&mut self, node: NodeId, port: u16, now: u32) {
        for b in self
            .backends
            .iter_mut()
            .filter(|b| b.node == node && b.port == port && b.spare == Spare::Starting)
        {
            b.spare = Spare::Idle;
            b.spare_failed_at = Some(now);
        }
    }
}

/// Which back ends of a service hold more than their target share of live
/// routes (target = effective ratio ÷ sum, with 5 percentage points of
/// slack); a back end with effective ratio 0 is over as long as it has routes.
pub fn over_target(backends: &[(u32, u32)]) -> Vec<bool> {
    let total_ratio: u64 = backends.iter().map(|&(r, _)| u64::from(r)).sum();
    let total_routes: u64 = backends.iter().map(|&(_, n)| u64::from(n)).sum();
    backends
        .iter()
        .map(|&(ratio, routes)| {
            if routes == 0 {
                return false;
            }
            // A ratio above 0 makes the total above 0 too.
            if ratio == 0 {
                return true;
            }
            let actual = routes as f64 / total_routes as f64;
            let target = f64::from(ratio) / total_ratio as f64;
            actual > target + 0.05
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use fep_shared::protocol::ServiceLoad;

    use super::*;

    const CFG: &str = r#"
node_dead_after_ms = 3000
health_check_fails = 3
[[node]]
name = "be1"
address = "10.0.2.11"
[[node]]
name = "be2"
address = "10.0.2.12"
[[node]]
name = "be3"
address = "10.0.2.13"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
load_metric = "connections"
high_load = 100
low_load = 50
scale_out_after_ms = 5000
backend = [{ node = "be1", ratio = 4 }, { node = "be2", ratio = 2 }]
spare = [{ node = "be3", ratio = 2 }]
"#;

    fn model() -> Model {
        Model::from_config(&FepConfig::parse(CFG).unwrap())
    }

    fn report(conns: u32, listening: bool) -> Report {
        Report {
            cpu_percent: 10.0,
            load_avg: [0.0; 3],
            services: vec![ServiceLoad {
                port: 80,
                listening,
                connections: conns,
                rx_pps: 0.0,
            }],
        }
    }

    fn ratios(m: &Model, now: u32) -> Vec<u32> {
        m.backends
            .iter()
            .map(|b| m.effective_ratio(b, now))
            .collect()
    }

    #[test]
    fn a_node_without_an_agent_is_up_and_one_whose_agent_fell_silent_is_down() {
        let mut m = model();
        assert_eq!(ratios(&m, 0), [4, 2, 0]);
        m.nodes[0].report = Some((1000, report(0, true)));
        assert_eq!(ratios(&m, 3999), [4, 2, 0]);
        assert_eq!(ratios(&m, 4000), [0, 2, 0], "3000 ms without a report");
        let ev = m.tick(4000, |_| 0);
        assert_eq!(
            ev,
            [Event::BackendDown {
                service: 0,
                backend: 0
            }]
        );
        m.nodes[0].report = Some((5000, report(0, true)));
        assert_eq!(
            m.tick(5000, |_| 0),
            [Event::BackendUp {
                service: 0,
                backend: 0
            }]
        );
        assert_eq!(ratios(&m, 5000), [4, 2, 0]);
    }

    #[test]
    fn failed_health_checks_and_a_closed_port_take_a_backend_down() {
        let mut m = model();
        m.health_result(1, 80, false);
        m.health_result(1, 80, false);
        assert_eq!(ratios(&m, 0)[1], 2, "two failures are not enough");
        m.health_result(1, 80, false);
        assert_eq!(ratios(&m, 0)[1], 0);
        m.health_result(1, 80, true);
        assert_eq!(ratios(&m, 0)[1], 2);
        m.nodes[1].report = Some((0, report(0, false)));
        assert_eq!(ratios(&m, 10)[1], 0, "the agent says nothing listens");
    }

    #[test]
    fn pins_override_reports_until_released() {
        let mut m = model();
        m.nodes[0].report = Some((0, report(0, true)));
        m.nodes[0].pin.state = Some(PinState::Up);
        assert_eq!(
            ratios(&m, 60_000)[0],
            4,
            "pinned up although its agent is silent"
        );
        m.nodes[0].pin = Pin {
            state: Some(PinState::Down),
            ..Pin::default()
        };
        assert_eq!(ratios(&m, 0)[0], 0, "pinned down is never chosen");
        m.nodes[0].pin = Pin {
            ratio: Some(7),
            load: Some(1.0),
            ..Pin::default()
        };
        assert_eq!(ratios(&m, 0)[0], 7);
        assert_eq!(m.load(&m.backends[0], 0), Some(1.0));
        m.nodes[0].pin = Pin::default();
        assert_eq!(ratios(&m, 0)[0], 4);
    }

    #[test]
    fn overload_halves_the_ratio_with_hysteresis() {
        let mut m = model();
        let step = |m: &mut Model, conns: u32, t: u32| {
            m.nodes[0].report = Some((t, report(conns, true)));
            m.tick(t, |_| 0);
            ratios(m, t)[0]
        };
        assert_eq!(step(&mut m, 90, 0), 4);
        assert_eq!(step(&mut m, 101, 1), 2, "above high_load 100");
        assert_eq!(
            step(&mut m, 80, 2),
            2,
            "still above low_load 50: no flapping"
        );
        assert_eq!(step(&mut m, 99, 3), 2);
        assert_eq!(step(&mut m, 49, 4), 4, "below low_load");
        assert_eq!(step(&mut m, 99, 5), 4, "not above high_load again");
    }

    #[test]
    fn scale_out_starts_a_spare_after_sustained_overload_and_adds_it_once_listening() {
        let mut m = model();
        let overload = |m: &mut Model, t: u32| {
            for n in 0..2 {
                m.nodes[n].report = Some((t, report(500, true)));
            }
            m.tick(t, |_| 0)
        };
        assert_eq!(overload(&mut m, 0), []);
        assert_eq!(overload(&mut m, 4999), []);
        assert_eq!(
            overload(&mut m, 5000),
            [Event::StartSpare { node: 2, port: 80 }]
        );
        assert_eq!(m.backends[2].spare, Spare::Starting);
        assert_eq!(ratios(&m, 5000)[2], 0, "not before it listens");
        assert_eq!(overload(&mut m, 6000), [], "one start at a time");
        m.nodes[2].report = Some((6500, report(0, true)));
        overload(&mut m, 6500);
        assert_eq!(m.backends[2].spare, Spare::Active);
        assert_eq!(ratios(&m, 6500)[2], 2);
    }

    #[test]
    fn a_spare_whose_start_failed_is_tried_after_the_others() {
        let cfg = CFG
            .replace(
                "spare = [{ node = \"be3\", ratio = 2 }]",
                "spare = [{ node = \"be3\", ratio = 2 }, { node = \"be4\", ratio = 2 }]",
            )
            .replacen(
                "[[service]]",
                "[[node]]\nname = \"be4\"\naddress = \"10.0.2.14\"\n[[service]]",
                1,
            );
        let mut m = Model::from_config(&FepConfig::parse(&cfg).unwrap());
        let overload = |m: &mut Model, t: u32| {
            for n in 0..2 {
                m.nodes[n].report = Some((t, report(500, true)));
            }
            m.tick(t, |_| 0)
        };
        overload(&mut m, 0);
        assert_eq!(
            overload(&mut m, 5000),
            [Event::StartSpare { node: 2, port: 80 }]
        );
        m.spare_failed(2, 80, 5500);
        assert_eq!(m.backends[2].spare, Spare::Idle);
        overload(&mut m, 6000);
        assert_eq!(
            overload(&mut m, 11_000),
            [Event::StartSpare { node: 3, port: 80 }],
            "the next spare, not the one that just failed"
        );
        m.spare_failed(3, 80, 11_500);
        overload(&mut m, 12_000);
        assert_eq!(
            overload(&mut m, 17_000),
            [Event::StartSpare { node: 2, port: 80 }],
            "both failed: the one that failed longest ago"
        );
    }

    #[test]
    fn agents_may_register_only_from_their_nodes_addresses() {
        let cfg = CFG.replacen(
            "address = \"10.0.2.12\"",
            "address = \"10.0.2.12\"\nagent_address = \"192.168.1.12\"",
            1,
        );
        let m = Model::from_config(&FepConfig::parse(&cfg).unwrap());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(m.agent_node("be1", ip("10.0.2.11")), Ok(0));
        assert_eq!(m.agent_node("be1", ip("::ffff:10.0.2.11")), Ok(0));
        assert_eq!(m.agent_node("be2", ip("192.168.1.12")), Ok(1));
        assert_eq!(m.agent_node("be2", ip("10.0.2.12")), Ok(1));
        assert_eq!(
            m.agent_node("be2", ip("10.0.1.2")),
            Err(AgentRefusal::WrongAddress {
                allowed: "10.0.2.12 or 192.168.1.12".into()
            })
        );
        assert_eq!(
            m.agent_node("be1", ip("10.0.2.12")),
            Err(AgentRefusal::WrongAddress {
                allowed: "10.0.2.11".into()
            })
        );
        assert_eq!(
            m.agent_node("be9", ip("10.0.2.11")),
            Err(AgentRefusal::UnknownNode)
        );
    }

    #[test]
    fn a_drain_zeroes_the_ratio_and_completes_when_no_routes_are_left() {
        let mut m = model();
        m.drain(1);
        assert_eq!(ratios(&m, 0), [4, 0, 0]);
        assert_eq!(m.node_state(1, 0), NodeState::Draining);
        assert_eq!(m.tick(0, |n| if n == 1 { 3 } else { 0 }), []);
        assert_eq!(m.tick(1, |_| 0), [Event::NodeDrained { node: 1 }]);
        assert_eq!(m.node_state(1, 1), NodeState::Drained);
        assert_eq!(ratios(&m, 1), [4, 0, 0]);
        m.undrain(1);
        assert_eq!(ratios(&m, 1), [4, 2, 0]);
    }

    /// Document 004's hosts: `web` (scheduler `load`, load = packets per
    /// second) over host1 ratio 2, host2 ratio 1, host3 ratio 2.
    const FIG6: &str = r#"
[[node]]
name = "host1"
address = "10.0.2.11"
[[node]]
name = "host2"
address = "10.0.2.12"
[[node]]
name = "host3"
address = "10.0.2.13"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
scheduler = "load"
load_metric = "pps"
backend = [{ node = "host1", ratio = 2 }, { node = "host2", ratio = 1 }, { node = "host3", ratio = 2 }]
"#;

    /// The model and the real data path of [`FIG6`].
    fn fig6() -> (Model, crate::dispatcher::Dispatcher) {
        let cfg = FepConfig::parse(FIG6).unwrap();
        let d = crate::dispatcher::Dispatcher::new(&cfg);
        (Model::new(&cfg, &d.table(), None), d)
    }

    /// An agent report of port 80: listening (running) or not, and its load.
    fn pps_report(rx_pps: f64, running: bool) -> Report {
        Report {
            services: vec![ServiceLoad {
                port: 80,
                listening: running,
                connections: 0,
                rx_pps,
            }],
            ..report(0, running)
        }
    }

    /// A SYN from client `n` to the VIP through the dispatcher: the node
    /// its new route went to, or why none was made (the drop reason, or
    /// `refused` for the RST sent back to the client).
    fn new_route(d: &crate::dispatcher::Dispatcher, n: u8, now: u32) -> Result<String, String> {
        use crate::dispatcher::{Verdict, Worker};
        let mut pkt = Vec::new();
        etherparse::PacketBuilder::ipv4([192, 0, 2, n], [10, 0, 0, 100], 64)
            .tcp(40000, 80, 1, 1000)
            .syn()
            .write(&mut pkt, &[])
            .unwrap();
        match d.process(&mut pkt, now, &mut Worker::new(Default::default())) {
            Verdict::Forward(_) if pkt[16..20] == [192, 0, 2, n] => Err("refused".into()),
            Verdict::Forward(_) => {
                let dst = std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&pkt[16..20]).unwrap());
                let m = Model::from_config(&FepConfig::parse(FIG6).unwrap());
                Ok(m.nodes
                    .iter()
                    .find(|n| n.address == dst)
                    .unwrap()
                    .name
                    .clone())
            }
            Verdict::Drop(r) => Err(r.as_str().into()),
            Verdict::Hold(g) => panic!("held by group {g}"),
        }
    }

    #[test]
    fn golden_fig6_the_smallest_load_per_ratio_among_running_hosts_wins() {
        let (mut m, d) = fig6();
        // host1 load 20 ratio 2 running; host2 load 15 ratio 1 running;
        // host3 load 0 ratio 2 stopped (its agent: nothing listens on 80).
        m.nodes[0].report = Some((0, pps_report(20.0, true)));
        m.nodes[1].report = Some((0, pps_report(15.0, true)));
        m.nodes[2].report = Some((0, pps_report(0.0, false)));
        m.tick(0, |_| 0);
        m.publish(&d.table(), 0);
        assert_eq!(m.backends[2].configured, 2);
        // 20/2 = 10 < 15/1 = 15; the load is what agents report, so until
        // the next report every new route goes to host1.
        for n in 1..=5 {
            assert_eq!(new_route(&d, n, 1).as_deref(), Ok("host1"), "client {n}");
        }
        // Running, host3's 0/2 would win: its being stopped is what kept it out.
        m.nodes[2].report = Some((2, pps_report(0.0, true)));
        m.tick(2, |_| 0);
        m.publish(&d.table(), 2);
        assert_eq!(new_route(&d, 6, 3).as_deref(), Ok("host3"));
        // No running server: no server available, and the client is told so.
        for n in 0..3 {
            m.nodes[n].report = Some((4, pps_report(1.0, false)));
        }
        m.tick(4, |_| 0);
        m.publish(&d.table(), 4);
        assert_eq!(new_route(&d, 7, 5), Err("refused".into()));
    }

    #[test]
    fn golden_fig7_a_pinned_state_load_and_ratio_override_the_agent_until_released() {
        let (mut m, d) = fig6();
        let reports = |m: &mut Model, t: u32| {
            m.nodes[0].report = Some((t, pps_report(20.0, true)));
            m.nodes[1].report = Some((t, pps_report(15.0, true)));
            m.nodes[2].report = Some((t, pps_report(40.0, true)));
            m.tick(t, |_| 0);
            m.publish(&d.table(), t);
        };
        // The administrator's command: host2 stopped, load 0, ratio 3.
        m.nodes[1].pin = Pin {
            state: Some(PinState::Down),
            load: Some(0.0),
            ratio: Some(3),
        };
        for t in [0, 1000, 2000] {
            reports(&mut m, t);
            // Whatever its agent reports (running, load 15), host2 shows
            // stopped, load 0, ratio 3 …
            assert_eq!(m.node_state(1, t), NodeState::Down);
            assert!(!m.backend_up(&m.backends[1], t));
            assert_eq!(m.load(&m.backends[1], t), Some(0.0));
            assert_eq!(m.nodes[1].pin.ratio, Some(3));
            // … and is never chosen, although 0/3 is the smallest load per ratio.
            assert_eq!(ratios(&m, t), [2, 0, 2]);
            assert_eq!(new_route(&d, t as u8 / 100, t + 1).as_deref(), Ok("host1"));
        }
        // Pinned up with its ratio, load 0/3 wins.
        m.nodes[1].pin.state = Some(PinState::Up);
        reports(&mut m, 3000);
        assert_eq!(ratios(&m, 3000), [2, 3, 2]);
        assert_eq!(new_route(&d, 31, 3001).as_deref(), Ok("host2"));
        // Released: the agent's values again (15/1 > 20/2).
        m.nodes[1].pin = Pin::default();
        reports(&mut m, 4000);
        assert_eq!(m.node_state(1, 4000), NodeState::Up);
        assert_eq!(m.load(&m.backends[1], 4000), Some(15.0));
        assert_eq!(ratios(&m, 4000), [2, 1, 2]);
        assert_eq!(new_route(&d, 41, 4001).as_deref(), Ok("host1"));
    }

    #[test]
    fn the_load_is_the_services_metric_packets_connections_or_cpu() {
        let mut report = pps_report(120.0, true);
        report.cpu_percent = 37.5;
        report.services[0].connections = 9;
        for (metric, load) in [("pps", 120.0), ("connections", 9.0), ("cpu", 37.5)] {
            let cfg = FIG6.replace(
                "load_metric = \"pps\"",
                &format!("load_metric = \"{metric}\""),
            );
            let mut m = Model::from_config(&FepConfig::parse(&cfg).unwrap());
            m.nodes[0].report = Some((0, report.clone()));
            assert_eq!(m.load(&m.backends[0], 1), Some(load), "{metric}");
            assert_eq!(m.load(&m.backends[1], 1), None, "{metric}: no report");
        }
    }

    #[test]
    fn over_target_finds_backends_above_their_share() {
        assert_eq!(over_target(&[(1, 5), (1, 5)]), [false, false]);
        assert_eq!(over_target(&[(1, 8), (1, 2)]), [true, false]);
        assert_eq!(over_target(&[(0, 1), (1, 0)]), [true, false]);
        assert_eq!(over_target(&[(0, 0), (0, 3)]), [false, true]);
        // 5 points of slack: 54 % against a target of 50 % is on target, 56 % is over.
        assert_eq!(over_target(&[(1, 54), (1, 46)]), [false, false]);
        assert_eq!(over_target(&[(1, 56), (1, 44)]), [true, false]);
        assert_eq!(over_target(&[(3, 79), (1, 21)]), [false, false]);
        assert_eq!(over_target(&[(3, 69), (1, 31)]), [false, true]);
    }

    #[test]
    fn a_pin_is_empty_only_when_it_pins_nothing() {
        assert!(Pin::default().is_empty());
        let pins = [
            Pin {
                state: Some(PinState::Up),
                ..Pin::default()
            },
            Pin {
                load: Some(0.0),
                ..Pin::default()
            },
            Pin {
                ratio: Some(0),
                ..Pin::default()
            },
        ];
        for pin in pins {
            assert!(!pin.is_empty(), "{pin:?}");
        }
    }

    #[test]
    fn nodes_are_found_by_name_and_the_silence_limit_is_the_configured_one() {
        let m = model();
        assert_eq!(m.node_id("be1"), Some(0));
        assert_eq!(m.node_id("be3"), Some(2));
        assert_eq!(m.node_id("be9"), None);
        assert_eq!(m.node_dead_after_ms(), 3000);
    }

    #[test]
    fn a_health_check_counts_only_for_its_node_and_port() {
        let mut m = model();
        for _ in 0..3 {
            m.health_result(1, 8080, false);
            m.health_result(0, 80, false);
        }
        assert_eq!(ratios(&m, 0), [0, 2, 0], "be2 failed only on port 8080");
    }

    #[test]
    fn the_load_marks_themselves_neither_start_nor_end_an_overload() {
        let mut m = model();
        let step = |m: &mut Model, conns: u32, t: u32| {
            m.nodes[0].report = Some((t, report(conns, true)));
            m.tick(t, |_| 0);
            ratios(m, t)[0]
        };
        assert_eq!(step(&mut m, 100, 0), 4, "at high_load 100: not above");
        assert_eq!(step(&mut m, 101, 1), 2);
        assert_eq!(step(&mut m, 50, 2), 2, "at low_load 50: not below");
        assert_eq!(step(&mut m, 49, 3), 4);
    }

    #[test]
    fn overload_does_not_halve_a_ratio_under_the_load_scheduler() {
        let (mut m, _) = fig6();
        m.backends[0].overloaded = true;
        assert_eq!(ratios(&m, 0), [2, 1, 2], "the load itself steers it");
    }

    /// Reports `conns` connections on port 80 from each of `nodes` at `t`, then ticks.
    fn load_step(m: &mut Model, nodes: &[usize], conns: u32, t: u32) -> Vec<Event> {
        for &n in nodes {
            m.nodes[n].report = Some((t, report(conns, true)));
        }
        m.tick(t, |_| 0)
    }

    #[test]
    fn scale_out_counts_only_serving_backends() {
        // be2 drained: be1 alone serves, and its overload is the service's.
        let mut m = model();
        m.drain(1);
        m.tick(0, |_| 0);
        assert_eq!(load_step(&mut m, &[0], 500, 1), []);
        assert_eq!(
            load_step(&mut m, &[0], 500, 5001),
            [Event::StartSpare { node: 2, port: 80 }]
        );
        // Nothing serving at all is no overload.
        let mut m = model();
        m.drain(0);
        m.drain(1);
        m.tick(0, |_| 0);
        assert_eq!(load_step(&mut m, &[], 0, 1), []);
        assert_eq!(load_step(&mut m, &[], 0, 6000), []);
        // One back end below the mark: no scale-out, however long.
        let mut m = model();
        load_step(&mut m, &[0], 500, 0);
        m.nodes[1].report = Some((0, report(10, true)));
        assert_eq!(load_step(&mut m, &[0], 500, 1), []);
        m.nodes[1].report = Some((6000, report(10, true)));
        assert_eq!(load_step(&mut m, &[0], 500, 6000), []);
    }

    #[test]
    fn scale_out_never_starts_a_spare_on_a_node_that_is_down() {
        let mut m = model();
        m.nodes[2].pin.state = Some(PinState::Down);
        assert_eq!(
            load_step(&mut m, &[0, 1], 500, 0),
            [],
            "an idle spare going down is no news"
        );
        assert_eq!(load_step(&mut m, &[0, 1], 500, 5000), []);
        assert_eq!(m.backends[2].spare, Spare::Idle);
    }

    #[test]
    fn a_starting_spare_joins_only_once_its_own_port_listens() {
        let mut m = model();
        load_step(&mut m, &[0, 1], 500, 0);
        load_step(&mut m, &[0, 1], 500, 5000);
        assert_eq!(m.backends[2].spare, Spare::Starting);
        m.nodes[2].report = Some((5100, report(0, false)));
        load_step(&mut m, &[0, 1], 500, 5100);
        assert_eq!(m.backends[2].spare, Spare::Starting, "not listening yet");
        let mut other_port = report(0, true);
        other_port.services[0].port = 8080;
        m.nodes[2].report = Some((5200, other_port));
        load_step(&mut m, &[0, 1], 500, 5200);
        assert_eq!(m.backends[2].spare, Spare::Starting, "another port listens");
    }

    #[test]
    fn a_spare_starting_for_one_service_does_not_hold_back_another() {
        let cfg = format!(
            "{CFG}[[service]]\nname = \"api\"\nvip = \"10.0.0.100\"\nport = 81\n\
             protocol = \"tcp\"\nload_metric = \"cpu\"\nhigh_load = 50\n\
             scale_out_after_ms = 6000\nbackend = [{{ node = \"be1\", ratio = 1 }}]\n\
             spare = [{{ node = \"be3\", ratio = 1 }}]\n"
        );
        let mut m = Model::from_config(&FepConfig::parse(&cfg).unwrap());
        let busy = |m: &mut Model, t: u32| {
            for n in 0..2 {
                let mut r = report(500, true);
                r.cpu_percent = 90.0;
                m.nodes[n].report = Some((t, r));
            }
            m.tick(t, |_| 0)
        };
        busy(&mut m, 0);
        assert_eq!(
            busy(&mut m, 5000),
            [Event::StartSpare { node: 2, port: 80 }]
        );
        assert_eq!(
            busy(&mut m, 6000),
            [Event::StartSpare { node: 2, port: 81 }],
            "web's spare is still starting"
        );
    }

    #[test]
    fn a_failed_start_resets_only_the_spare_that_was_starting_on_that_port() {
        let mut m = model();
        load_step(&mut m, &[0, 1], 500, 0);
        load_step(&mut m, &[0, 1], 500, 5000);
        m.spare_failed(2, 8080, 5500);
        m.spare_failed(1, 80, 5500);
        assert_eq!(m.backends[2].spare, Spare::Starting, "another port");
        assert_eq!(m.backends[2].spare_failed_at, None);
        assert_eq!(m.backends[1].spare, Spare::No, "not a spare");
        assert_eq!(m.backends[1].spare_failed_at, None);
        m.spare_failed(2, 80, 5500);
        assert_eq!(m.backends[2].spare, Spare::Idle);
        assert_eq!(m.backends[2].spare_failed_at, Some(5500));
        m.spare_failed(2, 80, 6000);
        assert_eq!(
            m.backends[2].spare_failed_at,
            Some(5500),
            "an idle spare did not fail again"
        );
    }

    #[test]
    fn publish_returns_each_service_whose_ratios_changed_once_and_marks_it_for_pruning() {
        let (mut m, d) = fig6();
        assert_eq!(
            m.publish(&d.table(), 0),
            Vec::<ServiceId>::new(),
            "the table starts with the configured ratios"
        );
        assert!(!m.services[0].pruning);
        m.nodes[0].pin.state = Some(PinState::Down);
        m.nodes[1].pin.state = Some(PinState::Down);
        assert_eq!(m.publish(&d.table(), 1), [0]);
        assert!(m.services[0].pruning);
        assert!(m.publish(&d.table(), 2).is_empty());
    }

    #[test]
    fn over_target_with_a_zero_ratio_or_no_routes() {
        // Ratio 0 with few routes is still over: none of them should be there.
        assert_eq!(over_target(&[(0, 1), (1, 100)]), [true, false]);
        // At exactly target + 5 points (11 of 20 against 50 %) it is not over yet.
        assert_eq!(over_target(&[(1, 11), (1, 9)]), [false, false]);
        assert_eq!(over_target(&[(1, 12), (1, 8)]), [true, false]);
        assert_eq!(over_target(&[]), Vec::<bool>::new());
    }
}
