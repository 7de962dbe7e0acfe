//! A lab of several front ends: a client behind an upstream router, two
//! gateways (`gwa`, `gwb`) on a shared client-side segment and a shared
//! back-end segment (bridges in a switch namespace), and back ends per VIP
//! group. keepalived on each gateway moves each group's two floating
//! addresses: the next hop the router sends the group's VIP to, and the
//! default gateway of the group's back ends.
//!
//! ```text
//! client 10.0.1.2 ─ router 10.0.3.254 ─┬─ gwa 10.0.3.252 ─┬─ 10.0.4.252 gwa ─┬─ be1 10.0.4.11 (group 0)
//!   (VIP of group g: 10.0.0.(100+g),   └─ gwb 10.0.3.253 ─┘   10.0.4.253 gwb └─ be2 10.0.4.12 …
//!    via 10.0.3.(1+g))                  back ends of group g: default via 10.0.4.(1+g)
//! ```
//!
//! Everything (processes, namespaces, files) goes away with the lab.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use fep_shared::api::{ClusterView, NodeView};

use crate::admin_client::get;

use crate::lab::{spawn_testsrv, AgentSpec, FepProcess};
use crate::netns::Netns;

/// The gateways' names, in order.
pub const GATEWAYS: [&str; 2] = ["gwa", "gwb"];
/// Each gateway's link to the client-side and to the back-end segment.
pub const CLIENT_SIDE: &str = "cli";
pub const BACKEND_SIDE: &str = "srv";
/// Where each fep listens for the other front ends (on its client-side address).
pub const PEER_PORT: u16 = 9443;
/// Where each fep listens for agents (on every address, the floating ones
/// included).
pub const AGENT_PORT: u16 = 9441;

/// The services' ports on every back end of a started cluster lab.
pub const WEB: u16 = 80;
pub const ECHO: u16 = 7000;
pub const STREAM: u16 = 7100;
pub const PORTS: [u16; 3] = [WEB, ECHO, STREAM];
/// The UDP service of every group: `fep-testsrv` answers with its name.
pub const UDP: u16 = 5300;

/// The VIP of group `g`.
pub fn vip(g: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 100 + g as u8)
}

/// Group `g`'s floating next hop on the client side.
pub fn next_hop(g: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 3, 1 + g as u8)
}

/// Group `g`'s floating gateway on the back-end side.
pub fn backend_gateway(g: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 4, 1 + g as u8)
}

/// The keepalived instance (and fep VIP group) name of group `g`.
pub fn group_name(g: usize) -> String {
    format!("G{g}")
}

pub struct ClusterLab {
    pub client: Netns,
    pub router: Netns,
    _switch: Netns,
    pub gateways: Vec<Netns>,
    pub backends: Vec<Netns>,
    groups: usize,
    per_group: usize,
    dir: PathBuf,
    /// Processes the lab started, with the gateway they belong to.
    children: Vec<(Option<usize>, Child)>,
}

impl ClusterLab {
    /// `groups` VIP groups with `per_group` back ends each; `tag` goes into
    /// the namespaces' names (`<tag><pid>x<n>-…`).
    pub fn new(tag: &str, groups: usize, per_group: usize) -> anyhow::Result<ClusterLab> {
        let (prefix, dir) = crate::lab::prepare(tag)?;
        crate::host::ensure(&[crate::host::KEEPALIVED])?;
        let ns = |n: &str| Netns::create(&format!("{prefix}-{n}"));
        let mut lab = ClusterLab {
            client: ns("cl")?,
            router: ns("rt")?,
            _switch: ns("sw")?,
            gateways: GATEWAYS.iter().map(|g| ns(g)).collect::<Result<_, _>>()?,
            backends: (0..groups * per_group)
                .map(|i| ns(&format!("b{}", i + 1)))
                .collect::<Result<_, _>>()?,
            groups,
            per_group,
            dir,
            children: Vec::new(),
        };
        lab.wire_up().context("wiring the cluster lab")?;
        Ok(lab)
    }

    fn wire_up(&mut self) -> anyhow::Result<()> {
        let sw = &self._switch;
        for br in ["brc", "brb"] {
            sw.ip(&["link", "add", br, "type", "bridge"])?;
            sw.ip(&["link", "set", br, "up"])?;
        }
        let plug = |ns: &Netns, name: &str, port: &str, bridge: &str| -> anyhow::Result<()> {
            ns.ip(&[
                "link",
                "add",
                name,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                sw.name(),
            ])?;
            sw.ip(&["link", "set", port, "master", bridge, "up"])?;
            ns.ip(&["link", "set", name, "up"])
        };
        let (cl, rt) = (&self.client, &self.router);
        rt.ip(&[
            "link",
            "add",
            "cl",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            cl.name(),
        ])?;
        rt.ip(&["addr", "add", "10.0.1.1/24", "dev", "cl"])?;
        rt.ip(&["link", "set", "cl", "up"])?;
        cl.ip(&["addr", "add", "10.0.1.2/24", "dev", "eth0"])?;
        cl.ip(&["link", "set", "eth0", "up"])?;
        cl.ip(&["route", "add", "default", "via", "10.0.1.1"])?;
        plug(rt, "ups", "rt", "brc")?;
        rt.ip(&["addr", "add", "10.0.3.254/24", "dev", "ups"])?;
        sysctl(rt, "net.ipv4.ip_forward", "1")?;
        for g in 0..self.groups {
            rt.ip(&[
                "route",
                "add",
                &format!("{}/32", vip(g)),
                "via",
                &next_hop(g).to_string(),
            ])?;
        }
        for (k, gw) in self.gateways.iter().enumerate() {
            plug(gw, CLIENT_SIDE, &format!("g{k}c"), "brc")?;
            plug(gw, BACKEND_SIDE, &format!("g{k}b"), "brb")?;
            gw.ip(&[
                "addr",
                "add",
                &format!("10.0.3.{}/24", 252 + k),
                "dev",
                CLIENT_SIDE,
            ])?;
            gw.ip(&[
                "addr",
                "add",
                &format!("10.0.4.{}/24", 252 + k),
                "dev",
                BACKEND_SIDE,
            ])?;
            gw.ip(&["route", "add", "10.0.1.0/24", "via", "10.0.3.254"])?;
            // Neighbours learn at once when a floating address arrives.
            sysctl(gw, "net.ipv4.conf.all.arp_notify", "1")?;
        }
        for (i, be) in self.backends.iter().enumerate() {
            plug(be, "eth0", &format!("e{}", i + 1), "brb")?;
            be.ip(&[
                "addr",
                "add",
                &format!("{}/24", self.backend(i)),
                "dev",
                "eth0",
            ])?;
            be.ip(&[
                "route",
                "add",
                "default",
                "via",
                &backend_gateway(i / self.per_group).to_string(),
            ])?;
        }
        Ok(())
    }

    /// A running cluster: VIP groups of two back ends each (`fep-testsrv`
    /// HTTP on [`WEB`], echo on [`ECHO`], a stream on [`STREAM`], its name
    /// on [`UDP`], and an agent), group g preferred by gateway `holders[g]` in keepalived (the
    /// gateways' keepalived started in turn, so that neither takes the
    /// other's group for a moment), fep on both gateways (`cluster`: extra
    /// `[cluster]` keys); returns once each group's gateway is its master,
    /// its hold over, its agents reporting to it.
    pub fn start(
        tag: &str,
        holders: &[usize],
        cluster: &str,
    ) -> anyhow::Result<(ClusterLab, Vec<FepProcess>)> {
        let groups = holders.len();
        let mut lab = ClusterLab::new(tag, groups, 2)?;
        let testsrv = crate::lab::workspace_bin("fep-testsrv")?;
        let agent = crate::lab::workspace_bin("bep-agent")?;
        let fep = crate::lab::workspace_bin("fep")?;
        for i in 0..groups * 2 {
            let mut args = crate::lab::testsrv_args(i, &[WEB], &[UDP]);
            args.extend(["--echo", "7000", "--stream", "7100"].map(String::from));
            lab.start_backend_server(i, &testsrv, &args)?;
        }
        lab.agent_key(&agent)?;
        for (k, gateway) in GATEWAYS.iter().enumerate() {
            let priority: Vec<u8> = holders
                .iter()
                .map(|&h| if h == k { 150 } else { 100 })
                .collect();
            lab.start_keepalived(k, &priority)?;
            for g in (0..groups).filter(|&g| holders[g] == k) {
                let says = format!("({}) Entering MASTER STATE", group_name(g));
                wait_until(Duration::from_secs(10), || {
                    Ok(lab.keepalived_log(k).contains(&says))
                })
                .with_context(|| {
                    format!(
                        "{}'s keepalived did not become master of {}:\n{}",
                        gateway,
                        group_name(g),
                        lab.keepalived_log(k)
                    )
                })?;
            }
        }
        let feps: Vec<FepProcess> = (0..GATEWAYS.len())
            .map(|k| lab.start_fep(k, &fep, &lab.fep_config(k, &PORTS, "", cluster)))
            .collect::<anyhow::Result<_>>()?;
        for i in 0..groups * 2 {
            lab.start_agent(i, &agent, &PORTS, 200)?;
        }
        for (g, &k) in holders.iter().enumerate() {
            let socket = lab.control_socket(k);
            let names: Vec<String> = lab.group_backends(g).map(|i| lab.backend_name(i)).collect();
            wait_until(Duration::from_secs(20), || {
                let c: ClusterView = get(&socket, "/v1/cluster")?;
                let nodes: Vec<NodeView> = get(&socket, "/v1/nodes")?;
                Ok(c.groups[g].master
                    && !c.groups[g].holding
                    && nodes
                        .iter()
                        .filter(|n| names.contains(&n.name))
                        .all(|n| n.agent_connected && n.report_age_ms.is_some()))
            })
            .with_context(|| {
                format!(
                    "{} did not become the ready master of {}:\n{}\n{}",
                    GATEWAYS[k],
                    group_name(g),
                    feps[k].log(),
                    lab.keepalived_log(k)
                )
            })?;
        }
        Ok((lab, feps))
    }

    /// UDP sockets of the client, each a flow (its own port) to group 0's
    /// [`UDP`] service.
    pub fn udp_flows(&self, n: usize) -> anyhow::Result<Vec<UdpSocket>> {
        self.client.enter(|| {
            (0..n)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0")?;
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    Ok(s)
                })
                .collect()
        })?
    }

    /// A scratch directory that goes away with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Back end `i`'s address (back ends of group g are g·per_group …).
    pub fn backend(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 4, 11 + i as u8)
    }

    /// Back end `i`'s node name: be1, be2, …
    pub fn backend_name(&self, i: usize) -> String {
        format!("be{}", i + 1)
    }

    /// The back ends of group `g`.
    pub fn group_backends(&self, g: usize) -> std::ops::Range<usize> {
        g * self.per_group..(g + 1) * self.per_group
    }

    /// Gateway `k`'s fixed client-side address (where its fep listens for peers).
    pub fn gateway_address(&self, k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 3, 252 + k as u8)
    }

    fn track_dir(&self, k: usize) -> PathBuf {
        self.dir.join(format!("{}-track", GATEWAYS[k]))
    }

    /// fep's admin socket on gateway `k`.
    pub fn control_socket(&self, k: usize) -> PathBuf {
        self.dir.join(format!("{}.sock", GATEWAYS[k]))
    }

    /// The fep config of gateway `k`: every back end a node, for each group
    /// a TCP service on its VIP per port of `ports` and a UDP one on [`UDP`]
    /// (named `g<G>-<PORT>`) and its VIP group, the agent port open, the other gateway its peer;
    /// `top` adds top-level keys, `cluster` keys of `[cluster]`.
    pub fn fep_config(&self, k: usize, ports: &[u16], top: &str, cluster: &str) -> String {
        let dir = self.dir.display();
        let name = GATEWAYS[k];
        let mut s = format!(
            "tun = \"fep0\"\nworkers = 2\nroute_idle_timeout_s = 60\n\
             control_socket = \"{}\"\nstate_dir = \"{dir}/{name}-state\"\n\
             agent_listen = \"0.0.0.0:{AGENT_PORT}\"\nagent_key_file = \"{dir}/agent.key\"\n\
             node_dead_after_ms = 1500\nhealth_check_interval_ms = 500\n{top}\n\
             [cluster]\nnotify_fifo = \"{dir}/{name}.fifo\"\nhold_max_ms = 3000\n\
             name = \"{name}\"\nlisten = \"{}:{PEER_PORT}\"\nkey_file = \"{dir}/cluster.key\"\n\
             track_dir = \"{}\"\n{cluster}\n",
            self.control_socket(k).display(),
            self.gateway_address(k),
            self.track_dir(k).display(),
        );
        for (j, peer) in GATEWAYS.iter().enumerate().filter(|(j, _)| *j != k) {
            s += &format!(
                "[[cluster.peer]]\nname = \"{peer}\"\naddress = \"{}:{PEER_PORT}\"\n",
                self.gateway_address(j)
            );
        }
        for g in 0..self.groups {
            s += &format!(
                "\n[[vip_group]]\nname = \"{}\"\nvips = [\"{}\"]\n",
                group_name(g),
                vip(g)
            );
        }
        for i in 0..self.backends.len() {
            s += &format!(
                "\n[[node]]\nname = \"{}\"\naddress = \"{}\"\n",
                self.backend_name(i),
                self.backend(i)
            );
        }
        for g in 0..self.groups {
            let services = ports.iter().map(|&p| (p, "tcp")).chain([(UDP, "udp")]);
            for (port, protocol) in services {
                s += &format!(
                    "\n[[service]]\nname = \"g{g}-{port}\"\nvip = \"{}\"\nport = {port}\nprotocol = \"{protocol}\"\n",
                    vip(g)
                );
                for i in self.group_backends(g) {
                    s += &format!(
                        "[[service.backend]]\nnode = \"{}\"\nratio = 1\n",
                        self.backend_name(i)
                    );
                }
            }
        }
        s
    }

    /// keepalived's config for gateway `k`: per group a VRRP instance
    /// (VRRPv3, 100 ms adverts) moving the group's two floating addresses,
    /// at `priority[g]` plus what fep writes to the group's track file,
    /// telling fep through its notify FIFO.
    pub fn keepalived_config(&self, k: usize, priority: &[u8]) -> String {
        let name = GATEWAYS[k];
        let mut s = format!(
            "global_defs {{\n  router_id {name}\n  vrrp_version 3\n  notify_fifo {}/{name}.fifo\n}}\n",
            self.dir.display()
        );
        for g in 0..self.groups {
            s += &format!(
                "track_file fep_{0} {{\n  file {1}/{0}\n  weight 1\n}}\n",
                group_name(g),
                self.track_dir(k).display()
            );
        }
        assert_eq!(priority.len(), self.groups, "a priority per group");
        for (g, prio) in priority.iter().enumerate() {
            s += &format!(
                "vrrp_instance {} {{\n  state BACKUP\n  interface {CLIENT_SIDE}\n  virtual_router_id {}\n  \
                 priority {}\n  advert_int 0.1\n  virtual_ipaddress {{\n    {}/24 dev {CLIENT_SIDE}\n    {}/24 dev {BACKEND_SIDE}\n  }}\n  \
                 track_file {{\n    fep_{0}\n  }}\n}}\n",
                group_name(g),
                50 + g,
                prio,
                next_hop(g),
                backend_gateway(g)
            );
        }
        s
    }

    /// Starts keepalived (VRRP only, in the foreground) on gateway `k`.
    pub fn start_keepalived(&mut self, k: usize, priority: &[u8]) -> anyhow::Result<()> {
        let name = GATEWAYS[k];
        // The track files at 0 before keepalived reads them (fep, started
        // later, leaves existing ones alone).
        std::fs::create_dir_all(self.track_dir(k))?;
        for g in 0..self.groups {
            let file = self.track_dir(k).join(group_name(g));
            if !file.exists() {
                std::fs::write(file, "0\n")?;
            }
        }
        let conf = self.dir.join(format!("keepalived-{name}.conf"));
        std::fs::write(&conf, self.keepalived_config(k, priority))?;
        let log = std::fs::File::create(self.dir.join(format!("keepalived-{name}.log")))?;
        let child = self.gateways[k]
            .command("keepalived")
            .args(["--vrrp", "--dont-fork", "--log-console", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(self.keepalived_pid(k, false))
            .arg("-r")
            .arg(self.keepalived_pid(k, true))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting keepalived")?;
        self.children.push((Some(k), child));
        Ok(())
    }

    fn keepalived_pid(&self, k: usize, vrrp: bool) -> PathBuf {
        let which = if vrrp { "vrrp" } else { "main" };
        self.dir
            .join(format!("keepalived-{}-{which}.pid", GATEWAYS[k]))
    }

    /// keepalived's log on gateway `k`.
    pub fn keepalived_log(&self, k: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("keepalived-{}.log", GATEWAYS[k])))
            .unwrap_or_default()
    }

    /// Starts fep on gateway `k` with `config` and waits until it serves.
    pub fn start_fep(&self, k: usize, fep: &Path, config: &str) -> anyhow::Result<FepProcess> {
        let mut p = FepProcess::spawn(&self.gateways[k], &self.dir, GATEWAYS[k], fep, config, &[])?;
        p.wait_serving()?;
        Ok(p)
    }

    /// Starts `fep-testsrv ARGS` on back end `i`.
    pub fn start_backend_server(
        &mut self,
        i: usize,
        testsrv: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
        let child = spawn_testsrv(&self.backends[i], &self.backend_name(i), testsrv, args)?;
        self.children.push((None, child));
        Ok(())
    }

    /// Starts `bep-agent` on back end `i`, reporting every `interval_ms`
    /// to its group's floating gateway address (whichever gateway holds it).
    pub fn start_agent(
        &mut self,
        i: usize,
        agent: &Path,
        watch: &[u16],
        interval_ms: u64,
    ) -> anyhow::Result<()> {
        let key = self.agent_key(agent)?;
        let fep = SocketAddr::new(backend_gateway(i / self.per_group).into(), AGENT_PORT);
        let spec = AgentSpec {
            node: &self.backend_name(i),
            fep: &fep.to_string(),
            key: &key,
            watch,
            interval_ms,
            extra: "",
        };
        let child = spec.spawn(&self.backends[i], &self.dir, agent)?;
        self.children.push((None, child));
        Ok(())
    }

    /// Writes the agents' key and the cluster's (before fep starts, which
    /// reads them), with `bep-agent --gen-key`.
    pub fn agent_key(&self, agent: &Path) -> anyhow::Result<PathBuf> {
        for name in ["cluster.key", "agent.key"] {
            let key = self.dir.join(name);
            if !key.exists() {
                crate::netns::run(Command::new(agent).arg("--gen-key").arg(&key))?;
            }
        }
        Ok(self.dir.join("agent.key"))
    }

    /// A host crash of gateway `k`, as far as the cluster sees it:
    /// keepalived (both its processes) killed with SIGKILL, so it sends no
    /// last advert and releases nothing. The caller kills fep.
    pub fn kill_keepalived(&mut self, k: usize) {
        self.kill_pidfile(&self.keepalived_pid(k, true));
        for (_, c) in self.children.iter_mut().filter(|(o, _)| *o == Some(k)) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.retain(|(o, _)| *o != Some(k));
        self.kill_pidfile(&self.keepalived_pid(k, false));
    }

    fn kill_pidfile(&self, path: &Path) {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) on a pid keepalived of this lab recorded.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        for k in 0..GATEWAYS.len() {
            self.kill_pidfile(&self.keepalived_pid(k, true));
        }
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces are deleted as the fields drop.
    }
}

/// The name of the back end that answers a datagram of `flow` (see
/// [`ClusterLab::udp_flows`]), from the VIP; 3 tries.
pub fn udp_ask(flow: &UdpSocket) -> anyhow::Result<String> {
    let vip = SocketAddr::new(vip(0).into(), UDP);
    let mut buf = [0u8; 64];
    for _attempt in 0..3 {
        flow.send_to(b"who?", vip)?;
        if let Ok((n, from)) = flow.recv_from(&mut buf) {
            anyhow::ensure!(
                from == vip,
                "a UDP reply from {from}, not from the VIP {vip}"
            );
            return Ok(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    anyhow::bail!("no UDP answer from {vip} after 3 tries")
}

/// Polls `cond` every 100 ms until it holds; an error after `limit`.
fn wait_until(
    limit: Duration,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !cond()? {
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Sets the sysctl `key` (dotted) to `value` inside `ns` (through
/// `/proc/sys`: no procps needed).
fn sysctl(ns: &Netns, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    crate::netns::run(
        ns.command("sh")
            .arg("-c")
            .arg(format!("echo {value} > {path}")),
    )
}
