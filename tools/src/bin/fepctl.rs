//! `fepctl`: the operator's command line for a running fep (over its admin
//! socket). Every command takes `--json` and `--socket PATH`; exit status 0
//! on success, 1 on failure, 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};
use fep_tools::admin_client::call;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    version,
    about = "Operate a running fep: ratios, drains, pins, routes, status"
)]
struct Cli {
    /// fep's admin socket (its `control_socket`).
    #[arg(long, global = true, default_value = "/run/fep/fep.sock")]
    socket: PathBuf,
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
}

#[derive(Clone, Copy, ValueEnum)]
enum PinState {
    Up,
    Down,
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

fn run(cli: &Cli) -> anyhow::Result<()> {
    let get = |path: &str| call(&cli.socket, "GET", path, None);
    let post = |path: &str, body: Value| call(&cli.socket, "POST", path, Some(body));
    let out = match &cli.cmd {
        Cmd::Status => {
            let v = get("/v1/status")?;
            if !cli.json {
                print_status(&v);
            }
            v
        }
        Cmd::Nodes => {
            let v = get("/v1/nodes")?;
            if !cli.json {
                print_nodes(&v);
            }
            v
        }
        Cmd::Services => {
            let v = get("/v1/services")?;
            if !cli.json {
                print_services(&v);
            }
            v
        }
        Cmd::Routes {
            service,
            node,
            client,
            limit,
        } => {
            let mut q = format!("/v1/routes?limit={limit}");
            for (k, v) in [
                ("service", service.clone()),
                ("node", node.clone()),
                ("client", client.map(|c| c.to_string())),
            ] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={v}"));
                }
            }
            let v = get(&q)?;
            if !cli.json {
                print_routes(&v);
            }
            v
        }
        Cmd::Ratio {
            service,
            node,
            ratio,
        } => {
            let v = post(
                "/v1/ratio",
                json!({"service": service, "node": node, "ratio": ratio}),
            )?;
            say(cli, &format!("ratio of {node} in {service} set to {ratio}; new routes follow, idle routes are pruned"));
            v
        }
        Cmd::Drain {
            node,
            wait,
            timeout,
        } => {
            let v = post("/v1/drain", json!({"node": node}))?;
            if *wait {
                return wait_drained(cli, node, Duration::from_secs(*timeout));
            }
            say(
                cli,
                &format!("draining {node}; `fepctl drain {node} --wait` waits until it is drained"),
            );
            v
        }
        Cmd::Undrain { node } => {
            let v = post("/v1/undrain", json!({"node": node}))?;
            say(cli, &format!("{node} is back in rotation"));
            v
        }
        Cmd::Pin {
            node,
            state,
            load,
            ratio,
        } => {
            if state.is_none() && load.is_none() && ratio.is_none() {
                bail!("pin what? give --state up|down, --load X or --ratio N");
            }
            let state = state.map(|s| match s {
                PinState::Up => "up",
                PinState::Down => "down",
            });
            let v = post(
                "/v1/pin",
                json!({"node": node, "state": state, "load": load, "ratio": ratio}),
            )?;
            say(cli, &format!("{node} pinned"));
            v
        }
        Cmd::Unpin { node } => {
            let v = post("/v1/unpin", json!({"node": node}))?;
            say(cli, &format!("{node} unpinned"));
            v
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn say(cli: &Cli, text: &str) {
    if !cli.json {
        println!("{text}");
    }
}

fn node_entry(cli: &Cli, node: &str) -> anyhow::Result<Value> {
    let nodes = call(&cli.socket, "GET", "/v1/nodes", None)?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == node))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("node '{node}' vanished"))
}

/// Polls until the node is drained, printing the routes left when they change.
fn wait_drained(cli: &Cli, node: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let n = node_entry(cli, node)?;
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

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn pct(v: &Value) -> String {
    format!("{:.1}%", v.as_f64().unwrap_or(0.0) * 100.0)
}

fn print_nodes(v: &Value) {
    println!(
        "{:<12} {:<28} {:<9} {:<6} {:>7} {:<10} {:>6}  RATIOS (service configured/effective)",
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
                    s(&x["service"]),
                    x["configured_ratio"],
                    x["effective_ratio"]
                )
            })
            .collect();
        println!(
            "{:<12} {:<28} {:<9} {:<6} {:>7} {:<10} {:>6}  {}",
            s(&n["name"]),
            s(&n["address"]),
            s(&n["state"]),
            if n["pinned"] == true { "yes" } else { "no" },
            n["routes"],
            agent,
            cpu,
            ratios.join(", ")
        );
    }
}

fn print_services(v: &Value) {
    for svc in v.as_array().into_iter().flatten() {
        println!(
            "{} {} {}:{} scheduler {} — {} route(s){}",
            s(&svc["name"]),
            s(&svc["protocol"]),
            s(&svc["vip"]),
            svc["port"],
            s(&svc["scheduler"]),
            svc["routes"],
            if svc["pruning"] == true {
                ", pruning idle routes"
            } else {
                ""
            }
        );
        println!(
            "  {:<12} {:>6} {:>6} {:>7} {:>7} {:>7}  {:<5} {:<8} LOAD",
            "NODE", "RATIO", "EFF", "ROUTES", "SHARE", "TARGET", "UP", "SPARE"
        );
        for b in svc["backends"].as_array().into_iter().flatten() {
            let bar = "█".repeat((b["share"].as_f64().unwrap_or(0.0) * 20.0).round() as usize);
            println!(
                "  {:<12} {:>6} {:>6} {:>7} {:>7} {:>7}  {:<5} {:<8} {:<8} {bar}",
                s(&b["node"]),
                b["configured_ratio"],
                b["effective_ratio"],
                b["routes"],
                pct(&b["share"]),
                pct(&b["target_share"]),
                if b["up"] == true { "up" } else { "down" },
                s(&b["spare"]),
                b["load"].as_f64().map_or("-".into(), |l| format!("{l:.1}")),
            );
        }
    }
}

fn print_routes(v: &Value) {
    println!(
        "{:<10} {:<40} {:<12} {:<8} {:>10}",
        "SERVICE", "CLIENT", "NODE", "STATE", "IDLE"
    );
    for r in v.as_array().into_iter().flatten() {
        let client = format!("{}:{}", s(&r["client"]), r["client_port"]);
        println!(
            "{:<10} {:<40} {:<12} {:<8} {:>9.1}s",
            s(&r["service"]),
            client,
            format!("{}:{}", s(&r["node"]), r["backend_port"]),
            s(&r["state"]),
            r["idle_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
}

fn print_status(v: &Value) {
    let c = &v["counters"];
    println!(
        "routes {}   to back ends {} pkts / {} bytes   to clients {} pkts / {} bytes   routes created {}",
        v["routes"], c["to_backend_packets"], c["to_backend_bytes"], c["to_client_packets"], c["to_client_bytes"], c["routes_created"]
    );
    let drops: Vec<String> = c["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64() != Some(0))
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    println!(
        "drops: {}",
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(" ")
        }
    );
    let rejects: Vec<String> = v["agent_rejects"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if !rejects.is_empty() {
        println!("rejected agent frames: {}", rejects.join(" "));
    }
    println!();
    print_services(&v["services"]);
    println!();
    print_nodes(&v["nodes"]);
}
