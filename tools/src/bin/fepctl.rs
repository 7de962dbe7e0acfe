//! `fepctl`: the operator's command line for a running fep, over its admin
//! socket (or its TCP admin port with a token). Every command takes `--json`
//! and `--socket PATH` (before or after the subcommand); exit status 0 on
//! success, 1 on failure, 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use fep_tools::admin_client::{call, Endpoint};
use fep_tools::top;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
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
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Services, nodes, routes and packet counters on one screen.
    Status,
    /// Every node: state, pins, routes, agent, ratios per service.
    Nodes,
    /// Every service: its back ends with ratios and shares.
    Services,
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
    },
    /// Remove a service; its live connections carry on until they end.
    Remove {
        name: String,
        /// Delete its routes now.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PinState {
    Up,
    Down,
}

#[derive(Clone, Copy, ValueEnum)]
enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scheduler {
    Ratio,
    LeastRoutes,
    Load,
}

#[derive(Clone, Copy, ValueEnum)]
enum Affinity {
    Port,
    Client,
}

/// The value's command-line name (as the config file spells it).
fn name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .expect("no skipped values")
        .get_name()
        .to_string()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fepctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn endpoint(cli: &Cli) -> anyhow::Result<Endpoint> {
    match (&cli.tcp, &cli.token_file) {
        (Some(addr), Some(file)) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?;
            Ok(Endpoint::Tcp {
                addr: addr.clone(),
                token: token.trim().to_string(),
            })
        }
        _ => Ok(Endpoint::Socket(cli.socket.clone())),
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let to = endpoint(cli)?;
    let get = |path: &str| call(&to, "GET", path, None);
    let post = |path: &str, body: Value| call(&to, "POST", path, Some(body));
    // Each arm returns the API's answer and the line a person reads.
    let (out, said): (Value, String) = match &cli.cmd {
        Cmd::Status => {
            let v = get("/v1/status")?;
            let text = status_text(&v);
            (v, text)
        }
        Cmd::Nodes => {
            let v = get("/v1/nodes")?;
            let text = nodes_text(&v);
            (v, text)
        }
        Cmd::Services => {
            let v = get("/v1/services")?;
            let text = services_text(&v);
            (v, text)
        }
        Cmd::Routes { service, node, client, limit } => {
            let mut q = format!("/v1/routes?limit={limit}");
            let filters = [("service", service.clone()), ("node", node.clone()), ("client", client.map(|c| c.to_string()))];
            for (k, v) in filters {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={v}"));
                }
            }
            let v = get(&q)?;
            let mut text = routes_text(&v);
            if !cli.json && v.as_array().is_some_and(|a| a.len() == *limit) {
                // The table's size is a counter: no second listing.
                let total = &get("/v1/status")?["routes"];
                text += &format!("the first {limit} shown; {total} route(s) in the table (--limit K for more)\n");
            }
            (v, text)
        }
        Cmd::Ratio { service, node, ratio } => (
            post("/v1/ratio", json!({"service": service, "node": node, "ratio": ratio}))?,
            format!("ratio of {node} in {service} set to {ratio}; new routes follow, idle routes are pruned"),
        ),
        Cmd::Drain { node, wait, timeout } => {
            let v = post("/v1/drain", json!({"node": node}))?;
            if *wait {
                return wait_drained(cli, &to, node, Duration::from_secs(*timeout));
            }
            (v, format!("draining {node}; `fepctl drain {node} --wait` waits until it is drained"))
        }
        Cmd::Undrain { node } => (post("/v1/undrain", json!({"node": node}))?, format!("{node} is back in rotation")),
        Cmd::Pin { node, state, load, ratio } => {
            if state.is_none() && load.is_none() && ratio.is_none() {
                bail!("pin what? give --state up|down, --load X or --ratio N");
            }
            let body = json!({"node": node, "state": state.map(name), "load": load, "ratio": ratio});
            (post("/v1/pin", body)?, format!("{node} pinned"))
        }
        Cmd::Unpin { node } => (post("/v1/unpin", json!({"node": node}))?, format!("{node} unpinned")),
        Cmd::Node(NodeCmd::Add { name, address }) => (
            post("/v1/node/add", json!({"name": name, "address": address}))?,
            format!("node {name} ({address}) added; `fepctl backend add SERVICE {name} --ratio N` puts it to work"),
        ),
        Cmd::Node(NodeCmd::Remove { name, force }) => (
            post("/v1/node/remove", json!({"name": name, "force": force}))?,
            format!("node {name} removed"),
        ),
        Cmd::Backend(BackendCmd::Add { service, node, ratio, port }) => (
            post("/v1/backend/add", json!({"service": service, "node": node, "ratio": ratio, "port": port}))?,
            format!("{node} added to {service} with ratio {ratio}"),
        ),
        Cmd::Backend(BackendCmd::Remove { service, node, force }) => (
            post("/v1/backend/remove", json!({"service": service, "node": node, "force": force}))?,
            format!("{node} removed from {service}{}", if *force { "" } else { "; its live connections carry on until they end" }),
        ),
        Cmd::Service(ServiceCmd::Add { name: svc, vip, port, protocol, scheduler, affinity }) => {
            let body = json!({
                "name": svc, "vip": vip, "port": port, "protocol": name(*protocol),
                "scheduler": name(*scheduler), "affinity": name(*affinity),
            });
            (post("/v1/service/add", body)?, format!("service {svc} added; `fepctl backend add {svc} NODE --ratio N` gives it back ends"))
        }
        Cmd::Service(ServiceCmd::Remove { name, force }) => (
            post("/v1/service/remove", json!({"name": name, "force": force}))?,
            format!("service {name} removed"),
        ),
        Cmd::Reload => (post("/v1/reload", json!({}))?, "config file reloaded".to_string()),
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

/// Polls until the node is drained, printing the routes left when they change.
fn wait_drained(cli: &Cli, to: &Endpoint, node: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let nodes = call(to, "GET", "/v1/nodes", None)?;
        let n = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == node))
            .cloned()
            .with_context(|| format!("node '{node}' vanished"))?;
        let routes = n["routes"].as_u64().unwrap_or(0);
        if n["state"] == "drained" {
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

fn nodes_text(v: &Value) -> String {
    let mut out = format!(
        "{:<12} {:<28} {:<9} {:<26} {:>7} {:<10} {:>6}  RATIOS (service configured/effective)\n",
        "NODE", "ADDRESS", "STATE", "PINNED", "ROUTES", "AGENT", "CPU"
    );
    for n in v.as_array().into_iter().flatten() {
        let agent = match (n["agent_connected"].as_bool(), n["report_age_ms"].as_u64()) {
            (Some(true), Some(age)) => format!("{:.1}s ago", age as f64 / 1000.0),
            (Some(true), None) => "connected".into(),
            _ => "none".into(),
        };
        let cpu = n["cpu_percent"]
            .as_f64()
            .map_or("-".into(), |c| format!("{c:.0}%"));
        let ratios: Vec<String> = n["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                format!(
                    "{} {}/{}",
                    top::s(&x["service"]),
                    x["configured_ratio"],
                    x["effective_ratio"]
                )
            })
            .collect();
        out += &format!(
            "{:<12} {:<28} {:<9} {:<26} {:>7} {:<10} {:>6}  {}\n",
            top::s(&n["name"]),
            top::s(&n["address"]),
            top::s(&n["state"]),
            pin_text(&n["pin"]),
            n["routes"],
            agent,
            cpu,
            ratios.join(", ")
        );
    }
    out
}

/// The values pinned on a node (`state=down,load=0,ratio=3`), or `no`.
fn pin_text(pin: &Value) -> String {
    let pinned: Vec<String> = ["state", "load", "ratio"]
        .iter()
        .filter_map(|k| match &pin[k] {
            Value::Null => None,
            Value::String(v) => Some(format!("{k}={v}")),
            v => Some(format!("{k}={v}")),
        })
        .collect();
    if pinned.is_empty() {
        "no".into()
    } else {
        pinned.join(",")
    }
}

fn services_text(v: &Value) -> String {
    let mut out = String::new();
    for svc in v.as_array().into_iter().flatten() {
        out += &format!(
            "{} {} {}:{} scheduler {} — {} route(s){}\n",
            top::s(&svc["name"]),
            top::s(&svc["protocol"]),
            top::s(&svc["vip"]),
            svc["port"],
            top::s(&svc["scheduler"]),
            svc["routes"],
            if svc["pruning"] == true {
                ", pruning idle routes"
            } else {
                ""
            }
        );
        out += &format!(
            "  {:<12} {:>6} {:>6} {:>7} {:>7} {:>7}  {:<5} {:<8} {:<8} SHARE\n",
            "NODE", "RATIO", "EFF", "ROUTES", "SHARE", "TARGET", "UP", "SPARE", "LOAD"
        );
        for b in svc["backends"].as_array().into_iter().flatten() {
            out += &format!(
                "  {:<12} {:>6} {:>6} {:>7} {:>7} {:>7}  {:<5} {:<8} {:<8} {}\n",
                top::s(&b["node"]),
                b["configured_ratio"],
                b["effective_ratio"],
                b["routes"],
                top::pct(&b["share"]),
                top::pct(&b["target_share"]),
                if b["up"] == true { "up" } else { "down" },
                top::s(&b["spare"]),
                b["load"].as_f64().map_or("-".into(), |l| format!("{l:.1}")),
                top::bar(
                    b["share"].as_f64().unwrap_or(0.0),
                    b["target_share"].as_f64().unwrap_or(0.0),
                    20
                ),
            );
        }
    }
    out
}

fn routes_text(v: &Value) -> String {
    let mut out = format!(
        "{:<10} {:<40} {:<22} {:<8} {:>10}\n",
        "SERVICE", "CLIENT", "NODE", "STATE", "IDLE"
    );
    for r in v.as_array().into_iter().flatten() {
        out += &format!(
            "{:<10} {:<40} {:<22} {:<8} {:>9.1}s\n",
            top::s(&r["service"]),
            format!("{}:{}", top::s(&r["client"]), r["client_port"]),
            format!("{}:{}", top::s(&r["node"]), r["backend_port"]),
            top::s(&r["state"]),
            r["idle_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
    out
}

fn status_text(v: &Value) -> String {
    let c = &v["counters"];
    let mut out = format!(
        "routes {}   to back ends {} pkts / {} bytes   to clients {} pkts / {} bytes   routes created {}\n",
        v["routes"], c["to_backend_packets"], c["to_backend_bytes"], c["to_client_packets"], c["to_client_bytes"], c["routes_created"]
    );
    let drops: Vec<String> = c["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64() != Some(0))
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
    let io = &v["tun_workers"];
    if io["blocking"].as_u64().unwrap_or(0) > 0 {
        // Worth a line only when it is not the norm: a worker that could not
        // batch pays a system call per packet.
        out += &format!(
            "TUN workers: {} batched, {} blocking (one system call per packet; see fep's log)\n",
            io["batched"], io["blocking"]
        );
    }
    let rejects: Vec<String> = v["agent_rejects"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if !rejects.is_empty() {
        out += &format!("rejected agent frames: {}\n", rejects.join(" "));
    }
    out + "\n" + &services_text(&v["services"]) + "\n" + &nodes_text(&v["nodes"])
}
