//! `fepctl`: the operator's command line for a running fep, over its admin
//! socket (or its TCP admin port with a token). Every command takes `--json`
//! and `--socket PATH` (before or after the subcommand); exit status 0 on
//! success, 1 on failure, 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use fep_shared::api::{
    BackendAddArg, BackendRemoveArg, BackendView, ClusterView, Count, ExplainQuery, ExplainReason,
    ExplainView, FastPathState, GroupView, HttpServiceView, MoveArg, MoveReport, NodeAddArg,
    NodeArg, NodeState, NodeView, Pin, PinArg, PinState, RatioArg, RemoveArg, RouteQuery,
    RouteState, RouteView, ServiceView, SitesView, StatusView,
};
use fep_shared::{Affinity, Protocol, Scheduler, ServiceConfig, ServiceMode};
use fep_tools::admin_client::{get, post, post_for, AdminAddress};
use fep_tools::table::{
    Align::{Left, Right},
    Table,
};
use fep_tools::top;
use serde::Serialize;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "fepctl",
    override_usage = "fepctl [OPTIONS] <COMMAND>",
    version,
    about = "Operate a running fep: ratios, drains, pins, nodes, services, routes, status"
)]
struct Cli {
    /// fep's admin socket (its `control_socket`).
    #[arg(long, global = true, default_value = "/run/fep/fep.sock")]
    socket: PathBuf,
    /// Use fep's TCP admin port (`admin_listen`, HOST:PORT) instead of the socket.
    #[arg(long, global = true, requires = "token_file")]
    tcp: Option<String>,
    /// File holding the bearer token (fep's `admin_token_file`), with --tcp.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Write the man pages and shell completions to DIR, and exit (the
    /// package's build runs this).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    generate_docs: Option<PathBuf>,
    // Required but for `--generate-docs` (checked in `main`).
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum VipCmd {
    /// A planned move of a VIP group to front end FEP, no connection
    /// broken: reports its phases, routes copied, packets held and replayed.
    Move {
        group: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Services, nodes, routes and packet counters on one screen.
    Status,
    /// Every node: state, pins, routes, agent, ratios per service.
    Nodes,
    /// Every service: its back ends with ratios and shares.
    Services,
    /// This front end's VIP groups (master here or not, held or not,
    /// routes, last hold), its last planned moves, refused peer frames.
    Cluster,
    /// Several sites: per DNS name each site's addresses, whether this
    /// site's checks reach it, whether it has room, its hand-off share.
    Sites,
    /// VIP groups shared with other front ends.
    Vip {
        #[command(subcommand)]
        cmd: VipCmd,
    },
    /// The assigned routes.
    Routes {
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Which back end a packet from CLIENT:PORT to SERVICE would reach now,
    /// and why (its route, client affinity, or the scheduler's next choice
    /// on the current ratios). Sends no packet, changes nothing.
    Explain {
        service: String,
        /// The client's address and port (`[IPv6]:port` for IPv6).
        client: std::net::SocketAddr,
    },
    /// Set a node's ratio in a service (new routes follow; idle routes are pruned).
    Ratio {
        service: String,
        node: String,
        ratio: u32,
    },
    /// Drain a node: no new routes; drained once its routes are gone.
    Drain {
        node: String,
        /// Wait until the node is drained, showing the routes left.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 600, requires = "wait")]
        timeout: u64,
    },
    /// Put a drained or draining node back into rotation.
    Undrain { node: String },
    /// Pin a node's state, load or ratio (overrides agent reports until unpinned).
    Pin {
        node: String,
        #[arg(long)]
        state: Option<PinState>,
        #[arg(long)]
        load: Option<f64>,
        #[arg(long)]
        ratio: Option<u32>,
    },
    /// Release every pin of a node.
    Unpin { node: String },
    /// Add or remove a node.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Add or remove a node in a service's transfer table.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Add or remove a service.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Re-read fep's config file (as SIGHUP); an invalid file is refused with the reason.
    Reload,
    /// A live, refreshing view of services and nodes (q quits).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one frame as text and exit (for scripts and logs).
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Add a node (then `fepctl backend add` it to services).
    Add {
        name: String,
        address: std::net::IpAddr,
        /// Another address its agent may connect from (besides ADDRESS).
        #[arg(long)]
        agent_address: Option<std::net::IpAddr>,
    },
    /// Remove a node from fep and every service; refused unless drained.
    Remove {
        name: String,
        /// Remove even if not drained: its routes are deleted.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Add a node to a service.
    Add {
        service: String,
        node: String,
        #[arg(long)]
        ratio: u32,
        /// Back-end port when it differs from the service port.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Remove a node from a service; its live connections carry on until they end.
    Remove {
        service: String,
        node: String,
        /// Delete its routes now.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Add a service (then `fepctl backend add` its back ends).
    Add {
        name: String,
        #[arg(long)]
        vip: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "tcp")]
        protocol: Protocol,
        #[arg(long, default_value = "ratio")]
        scheduler: Scheduler,
        #[arg(long, default_value = "port")]
        affinity: Affinity,
        /// Share client affinity with the other services of this group
        /// (implies `--affinity client`).
        #[arg(long)]
        affinity_group: Option<String>,
        /// `http`: fep ends the clients' connections and dispatches request
        /// by request (with `[service.http]`'s defaults; TCP only).
        #[arg(long, default_value = "tcp")]
        mode: ServiceMode,
    },
    /// Remove a service; its live connections carry on until they end.
    Remove {
        name: String,
        /// Delete its routes now.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cmd = match (&cli.cmd, &cli.generate_docs) {
        (_, Some(dir)) => return fep_shared::cli_docs::generate(Cli::command(), dir),
        (Some(cmd), None) => cmd,
        (None, None) => Cli::command()
            .error(
                clap::error::ErrorKind::MissingSubcommand,
                "a command is required (fepctl --help lists them)",
            )
            .exit(),
    };
    match run(&cli, cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fepctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn endpoint(cli: &Cli) -> anyhow::Result<AdminAddress> {
    match (&cli.tcp, &cli.token_file) {
        (Some(addr), Some(file)) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?;
            Ok(AdminAddress::Tcp {
                addr: addr.clone(),
                token: token.trim().to_string(),
            })
        }
        _ => Ok(AdminAddress::Socket(cli.socket.clone())),
    }
}

/// The API's answer, as `--json` prints it.
fn json(v: &impl Serialize) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(v)?)
}

/// Posts a command; its answer as `--json` prints it.
fn command(to: &AdminAddress, path: &str, body: &impl Serialize) -> anyhow::Result<Value> {
    json(&post(to, path, body)?)
}

fn run(cli: &Cli, cmd: &Cmd) -> anyhow::Result<()> {
    let to = endpoint(cli)?;
    // Each arm returns the API's answer and the line a person reads.
    let (out, said): (Value, String) = match cmd {
        Cmd::Status => {
            let v: StatusView = get(&to, "/v1/status")?;
            (json(&v)?, status_text(&v))
        }
        Cmd::Nodes => {
            let v: Vec<NodeView> = get(&to, "/v1/nodes")?;
            (json(&v)?, nodes_text(&v))
        }
        Cmd::Services => {
            let v: Vec<ServiceView> = get(&to, "/v1/services")?;
            (json(&v)?, services_text(&v))
        }
        Cmd::Cluster => {
            let v: ClusterView = get(&to, "/v1/cluster")?;
            (json(&v)?, cluster_text(&v))
        }
        Cmd::Sites => {
            let v: SitesView = get(&to, "/v1/sites")?;
            (json(&v)?, sites_text(&v))
        }
        Cmd::Vip {
            cmd: VipCmd::Move { group, to: fep },
        } => {
            let arg = MoveArg { group: group.clone(), to: fep.clone() };
            let r: MoveReport = post_for(&to, "/v1/vip/move", &arg)?;
            (json(&r)?, move_text(&r))
        }
        Cmd::Routes { service, node, client, limit } => {
            let q = RouteQuery { service: service.clone(), node: node.clone(), client: *client, limit: Some(*limit) };
            routes(cli, &to, &q)?
        }
        Cmd::Explain { service, client } => {
            let q = ExplainQuery { service: service.clone(), client: client.ip(), port: client.port() };
            let v: ExplainView = get(&to, &format!("/v1/explain?{}", serde_urlencoded::to_string(&q)?))?;
            (json(&v)?, explain_text(&v))
        }
        Cmd::Ratio { service, node, ratio } => (
            command(&to, "/v1/ratio", &RatioArg { service: service.clone(), node: node.clone(), ratio: *ratio })?,
            format!("ratio of {node} in {service} set to {ratio}; new routes follow, idle routes are pruned"),
        ),
        Cmd::Drain { node, wait, timeout } => {
            let v = command(&to, "/v1/drain", &NodeArg { node: node.clone() })?;
            if *wait {
                return wait_drained(cli, &to, node, Duration::from_secs(*timeout));
            }
            (v, format!("draining {node}; `fepctl drain {node} --wait` waits until it is drained"))
        }
        Cmd::Undrain { node } => (command(&to, "/v1/undrain", &NodeArg { node: node.clone() })?, format!("{node} is back in rotation")),
        Cmd::Pin { node, state, load, ratio } => {
            let pin = Pin { state: *state, load: *load, ratio: *ratio };
            if pin.is_empty() {
                bail!("pin what? give --state up|down, --load X or --ratio N");
            }
            (command(&to, "/v1/pin", &PinArg { node: node.clone(), pin })?, format!("{node} pinned"))
        }
        Cmd::Unpin { node } => (command(&to, "/v1/unpin", &NodeArg { node: node.clone() })?, format!("{node} unpinned")),
        Cmd::Node(NodeCmd::Add { name, address, agent_address }) => (
            command(&to, "/v1/node/add", &NodeAddArg { name: name.clone(), address: *address, agent_address: *agent_address })?,
            format!("node {name} ({address}) added; `fepctl backend add SERVICE {name} --ratio N` puts it to work"),
        ),
        Cmd::Node(NodeCmd::Remove { name, force }) => (
            command(&to, "/v1/node/remove", &RemoveArg { name: name.clone(), force: *force })?,
            format!("node {name} removed"),
        ),
        Cmd::Backend(BackendCmd::Add { service, node, ratio, port }) => (
            command(&to, "/v1/backend/add", &BackendAddArg { service: service.clone(), node: node.clone(), ratio: *ratio, port: *port })?,
            format!("{node} added to {service} with ratio {ratio}"),
        ),
        Cmd::Backend(BackendCmd::Remove { service, node, force }) => (
            command(&to, "/v1/backend/remove", &BackendRemoveArg { service: service.clone(), node: node.clone(), force: *force })?,
            format!("{node} removed from {service}{}", if *force { "" } else { "; its live connections carry on until they end" }),
        ),
        Cmd::Service(ServiceCmd::Add { name, vip, port, protocol, scheduler, affinity, affinity_group, mode }) => {
            let svc = ServiceConfig { scheduler: *scheduler, affinity: *affinity, affinity_group: affinity_group.clone(), mode: *mode, ..ServiceConfig::new(name.clone(), *vip, *port, *protocol) };
            (command(&to, "/v1/service/add", &svc)?, format!("service {name} added; `fepctl backend add {name} NODE --ratio N` gives it back ends"))
        }
        Cmd::Service(ServiceCmd::Remove { name, force }) => (
            command(&to, "/v1/service/remove", &RemoveArg { name: name.clone(), force: *force })?,
            format!("service {name} removed"),
        ),
        Cmd::Reload => (command(&to, "/v1/reload", &serde_json::json!({}))?, "config file reloaded".to_string()),
        Cmd::Top { interval, once } => {
            return top::run(&to, Duration::from_secs_f64(interval.max(0.1)), *once);
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", said.trim_end());
    }
    Ok(())
}

/// `fepctl routes`: the listing, and when it was cut at the limit, how many
/// routes the table holds (a counter: no second listing).
fn routes(cli: &Cli, to: &AdminAddress, q: &RouteQuery) -> anyhow::Result<(Value, String)> {
    let v: Vec<RouteView> = get(
        to,
        &format!("/v1/routes?{}", serde_urlencoded::to_string(q)?),
    )?;
    let mut text = routes_text(&v);
    let limit = q.limit.unwrap_or(usize::MAX);
    if !cli.json && v.len() == limit {
        let status = get::<StatusView>(to, "/v1/status")?;
        let total = status.routes + status.closing;
        text += &format!(
            "the first {limit} shown; {total} route(s) in the table (--limit K for more)\n"
        );
    }
    Ok((json(&v)?, text))
}

/// Polls until the node is drained, printing the routes left when they change.
fn wait_drained(cli: &Cli, to: &AdminAddress, node: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let n = get::<Vec<NodeView>>(to, "/v1/nodes")?
            .into_iter()
            .find(|n| n.name == node)
            .with_context(|| format!("node '{node}' vanished"))?;
        // Lingering routes still carry a connection's last segments: the
        // node is drained once they are gone too.
        let routes = n.routes + n.closing;
        if n.state == NodeState::Drained {
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&n)?);
            } else {
                println!("{node} is drained: no routes left, safe to stop");
            }
            return Ok(());
        }
        if last != Some(routes) && !cli.json {
            println!("draining {node}: {routes} route(s) left");
        }
        last = Some(routes);
        if Instant::now() > deadline {
            bail!(
                "{node} is not drained after {} s: {routes} route(s) left",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn nodes_text(nodes: &[NodeView]) -> String {
    let mut t = Table::new(&[
        ("NODE", Left),
        ("ADDRESS", Left),
        ("STATE", Left),
        ("PINNED", Left),
        ("ROUTES", Right),
        ("CLOSING", Right),
        ("AGENT", Left),
        ("CPU", Right),
        ("RATIOS (service configured/effective)", Left),
    ]);
    for n in nodes {
        let agent = match (n.agent_connected, n.report_age_ms) {
            (true, Some(age)) => format!("{:.1}s ago", f64::from(age) / 1000.0),
            (true, None) => "connected".into(),
            (false, _) => "none".into(),
        };
        let ratios: Vec<String> = n
            .services
            .iter()
            .map(|x| format!("{} {}/{}", x.service, x.configured_ratio, x.effective_ratio))
            .collect();
        t.row(vec![
            n.name.clone(),
            n.address.to_string(),
            n.state.to_string(),
            pin_text(&n.pin),
            n.routes.to_string(),
            n.closing.to_string(),
            agent,
            n.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
            ratios.join(", "),
        ]);
    }
    t.render()
}

/// The values pinned on a node (`state=down,load=0.0,ratio=3`), or `no`.
fn pin_text(pin: &Pin) -> String {
    let pinned: Vec<String> = [
        pin.state.map(|s| format!("state={s}")),
        // As JSON writes it: a whole load keeps its `.0`.
        pin.load.map(|l| format!("load={l:?}")),
        pin.ratio.map(|r| format!("ratio={r}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if pinned.is_empty() {
        "no".into()
    } else {
        pinned.join(",")
    }
}

fn move_text(r: &MoveReport) -> String {
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|(p, ms)| format!("{p} {ms} ms"))
        .collect();
    format!(
        "moved {} from {} to {}: {}\n{} route(s) copied, {} packet(s) ({} bytes) held and replayed, held {} ms\n",
        r.group,
        r.from,
        r.to,
        phases.join(", "),
        r.routes_copied,
        r.packets_replayed,
        r.bytes_replayed,
        r.longest_hold_ms
    )
}

fn cluster_text(v: &ClusterView) -> String {
    let mut out = format!(
        "front end {}\n",
        v.fep.as_deref().unwrap_or("(no [cluster] name)")
    );
    out += &groups_text(&v.groups);
    for m in &v.moves {
        out += &move_text(m);
    }
    let refused: u64 = v.peer_rejects.values().sum();
    if refused > 0 {
        out += &format!("refused from peers: {:?}\n", v.peer_rejects);
    }
    for p in &v.peers {
        out += &format!("\nfront end {} at {}\n", p.name, p.address);
        out += &match &p.error {
            Some(e) => format!("not answering: {e}\n"),
            None => groups_text(&p.groups),
        };
    }
    out
}

fn sites_text(v: &SitesView) -> String {
    let mut out = format!("site {}\n", v.me);
    for name in &v.names {
        out += &format!(
            "\n{}\n{:<12} {:<5} {:<5} {:>7} {:>6}  {}\n",
            name.name, "SITE", "UP", "ROOM", "WEIGHT", "SHARE", "VIPS"
        );
        let yes = |b: bool| if b { "yes" } else { "no" };
        for s in &name.sites {
            let vips: Vec<String> = s.vips.iter().map(|a| a.to_string()).collect();
            out += &format!(
                "{:<12} {:<5} {:<5} {:>7} {:>5}%  {}\n",
                s.site,
                yes(s.up),
                yes(s.room),
                s.weight,
                s.share_percent,
                vips.join(", ")
            );
        }
    }
    out
}

fn groups_text(groups: &[GroupView]) -> String {
    if groups.is_empty() {
        return "no VIP groups (this fep has no [[vip_group]])\n".into();
    }
    let mut out = format!(
        "{:<16} {:<7} {:<8} {:>8}  {}\n",
        "GROUP", "ROLE", "MODE", "ROUTES", "LAST HOLD"
    );
    for g in groups {
        let last = g.last_hold.map_or("-".into(), |h| {
            format!("{} ms, {} packet(s) replayed", h.held_ms, h.packets)
        });
        out += &format!(
            "{:<16} {:<7} {:<8} {:>8}  {last}\n",
            g.name,
            if g.master { "master" } else { "backup" },
            if g.holding { "holding" } else { "normal" },
            g.routes
        );
    }
    out
}

/// `fepctl explain`: the answer, the reason, and the ratios it was read from.
fn explain_text(v: &ExplainView) -> String {
    let client = std::net::SocketAddr::new(v.client, v.client_port);
    let target = match (&v.node, v.backend_port) {
        (Some(node), Some(port)) => format!("{node}:{port}"),
        _ => "no back end".to_string(),
    };
    let why = match v.reason {
        ExplainReason::Route => {
            let (state, idle) = v.route.unwrap_or((RouteState::Open, 0));
            format!("its route ({state}, idle {:.1} s): a route stays with its back end for its life", f64::from(idle) / 1000.0)
        }
        ExplainReason::Affinity => format!(
            "no route; client affinity holds {} to this node while it has routes ({} now)",
            v.client,
            v.held_routes.unwrap_or(0)
        ),
        ExplainReason::Chooser => format!("no route; the {} scheduler would choose it now, on the effective ratios below", v.scheduler.as_str()),
        ExplainReason::ServiceFull => "no route, and a new one is refused: the service is at max_connections".into(),
        ExplainReason::TableFull => "no route; the table holds max_routes: a route is made only if a flood's unconfirmed route can be evicted for it".into(),
        ExplainReason::NoBackend => "no route, and a new one is refused: no back end has an effective ratio above 0".into(),
    };
    format!("{} {client} → {target}\n  why: {why}\n", v.service) + &backends_table(&v.backends)
}

/// A service's back ends under one header, as `services` and `explain` show them.
fn backends_table(backends: &[BackendView]) -> String {
    let mut t = Table::new(&[
        ("NODE", Left),
        ("RATIO", Right),
        ("EFF", Right),
        ("ROUTES", Right),
        ("CLOSING", Right),
        ("SHARE", Right),
        ("TARGET", Right),
        ("UP", Left),
        ("SPARE", Left),
        ("LOAD", Right),
        ("SHARE / TARGET", Left),
    ])
    .indent(2);
    for b in backends {
        t.row(vec![
            b.node.clone(),
            b.configured_ratio.to_string(),
            b.effective_ratio.to_string(),
            b.routes.to_string(),
            b.closing.to_string(),
            top::pct(b.share),
            top::pct(b.target_share),
            if b.up { "up" } else { "down" }.into(),
            b.spare.to_string(),
            b.load.map_or("-".into(), |l| format!("{l:.1}")),
            top::bar(b.share, b.target_share, 20),
        ]);
    }
    t.render()
}

fn services_text(services: &[ServiceView]) -> String {
    let mut out = String::new();
    for svc in services {
        out += &format!(
            "{} — {} live route(s), {} closing{}\n",
            svc.heading(),
            svc.routes,
            svc.closing,
            if svc.pruning {
                ", pruning idle routes"
            } else {
                ""
            }
        );
        out += &backends_table(&svc.backends);
        if let Some(http) = &svc.http {
            out += &http_lines(http, &svc.backends);
        }
    }
    out
}

/// An HTTP service's requests and each back end's pool.
fn http_lines(http: &HttpServiceView, backends: &[BackendView]) -> String {
    let refused: Vec<String> = http
        .refused
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(why, n)| format!("{why} {n}"))
        .collect();
    let mut out = format!(
        "  http: {:.1} req/s, {} request(s), {} client connection(s) open; refused: {}\n",
        http.requests_per_s,
        http.requests,
        http.connections,
        if refused.is_empty() {
            "none".into()
        } else {
            refused.join(", ")
        }
    );
    out += &format!(
        "  {:<12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>8}\n",
        "NODE", "REQUESTS", "POOL-IDLE", "POOL-BUSY", "CONNECTS", "REUSE", "RETRIES", "SESSIONS"
    );
    for b in backends {
        if let Some(h) = &b.http {
            out += &format!(
                "  {:<12} {:>9} {:>9} {:>9} {:>9} {:>7.1} {:>7} {:>8}\n",
                b.node,
                h.requests,
                h.pool_idle,
                h.pool_busy,
                h.connects,
                h.reuse,
                h.retries,
                h.sessions
            );
        }
    }
    out
}

fn routes_text(routes: &[RouteView]) -> String {
    let mut t = Table::new(&[
        ("SERVICE", Left),
        ("CLIENT", Left),
        ("NODE", Left),
        ("STATE", Left),
        ("IDLE", Right),
    ]);
    for r in routes {
        t.row(vec![
            r.service.to_string(),
            format!("{}:{}", r.client, r.client_port),
            format!("{}:{}", r.node, r.backend_port),
            r.state.to_string(),
            format!("{:.1}s", f64::from(r.idle_ms) / 1000.0),
        ]);
    }
    t.render()
}

fn status_text(v: &StatusView) -> String {
    let c = &v.counters;
    let mut out = format!(
        "routes {} live, {} closing   to back ends {} pkts / {} bytes   to clients {} pkts / {} bytes   routes created {}\n",
        v.routes, v.closing, c.to_backend_packets, c.to_backend_bytes, c.to_client_packets, c.to_client_bytes, c.get(Count::RoutesCreated)
    );
    let drops: Vec<String> = c
        .drops
        .iter()
        .filter(|(_, &n)| n != 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    out += &format!(
        "drops: {}\n",
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(" ")
        }
    );
    let io = &v.tun_workers;
    if io.blocking > 0 {
        // Worth a line only when it is not the norm: a worker that could not
        // batch pays a system call per packet.
        out += &format!(
            "TUN workers: {} batched, {} blocking (one system call per packet; see fep's log)\n",
            io.batched, io.blocking
        );
    }
    let fast = &v.fast_path;
    match fast.state {
        FastPathState::Off => {}
        FastPathState::Running => {
            out += &format!(
                "fast path: running on {}: {} routes in the kernel, {} packets ({} bytes) forwarded there, {} handed to the TUN path\n",
                fast.interfaces.join(", "),
                fast.routes,
                fast.packets,
                fast.bytes,
                fast.passed
            )
        }
        FastPathState::Unavailable => {
            out += &format!(
                "fast path: UNAVAILABLE ({}); every packet takes the TUN path\n",
                fast.reason.as_deref().unwrap_or("see fep's log")
            )
        }
    }
    let rejects: Vec<String> = v
        .agent_rejects
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if !rejects.is_empty() {
        out += &format!("rejected agent frames: {}\n", rejects.join(" "));
    }
    out + "\n" + &services_text(&v.services) + "\n" + &nodes_text(&v.nodes)
}
