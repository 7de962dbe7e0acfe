//! `fep-demo`: the whole dispatcher on one machine, in well under a minute.
//!
//! Builds network namespaces (a client, a gateway, three back ends each
//! running a small server that answers its node name, and `bep-agent`),
//! starts the real `fep` on the gateway, sends real traffic through it and
//! prints the live share of each node next to its ratio: first 2:1:1, then
//! after a ratio change, then during a drain that waits for a live
//! connection; then HTTP mode: requests of one keep-alive connection spread
//! by ratio, and a drain that completes while persistent clients keep
//! sending; then UDP stickiness. Removes everything again. Needs root.
//!
//! `fep-demo --cluster`: two gateways, each with keepalived and fep, and
//! two VIP groups; a live connection, 1000 idle ones and 20 UDP flows
//! survive a planned move of their group and then the crash of the gateway
//! it moved to, and the figures of both are printed.
//!
//! `fep-demo --sites`: four sites, each a gateway with fep and a back end,
//! answering DNS for `www.example.test`: the first answers follow the
//! hand-off shares, move away from a site that dies, and a full site
//! redirects a new client to another.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fep_shared::api::{
    ClusterView, Count, MoveArg, MoveReport, NodeArg, NodeState, NodeView, RatioArg, StatusView,
};
use fep_tools::admin_client::{get, post, post_for};
use fep_tools::cluster_lab::{self, udp_ask, ClusterLab};
use fep_tools::lab::{self, FepProcess, Lab, VIP_V4};
use fep_tools::{http, netns};

const TAG: &str = "fepdemo";

#[derive(Parser)]
struct Args {
    /// HTTP requests in the first phase, each on a new connection.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Show several front ends instead: a planned move and a failover.
    #[arg(long)]
    cluster: bool,
    /// Show several sites instead: DNS hand-off, a site's death, a redirect.
    #[arg(long)]
    sites: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// HTTP mode's service port on the VIP, and the back ends' origin port.
const APP_PORT: u16 = 8080;

/// The client's ratios for the three back ends, as configured at the start.
const RATIOS: [u32; 3] = [2, 1, 1];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!(
            "fep-demo needs root: it creates network namespaces, veth links and a TUN device."
        );
        std::process::exit(2);
    }
    let fep_bin = lab::workspace_bin("fep")?;
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    remove_stale_labs();
    if args.cluster {
        return cluster_demo();
    }
    if args.sites {
        return sites_demo(&fep_bin);
    }
    let (lab, mut fep) = start(&fep_bin)?;
    let socket = lab.control_socket();

    println!(
        "\n== {} HTTP requests to {VIP_V4}:80, each a new connection",
        args.requests
    );
    let counts = lab.client.enter(|| http_rounds(args.requests, &RATIOS))??;
    println!(
        "\n   final shares over {} connections:",
        counts.iter().sum::<usize>()
    );
    print_shares(&counts, &RATIOS);

    if !interrupted() {
        println!("\n== `fepctl ratio web be1 1`: new connections now split 1:1:1");
        let ratio = RatioArg {
            service: "web".into(),
            node: "be1".into(),
            ratio: 1,
        };
        post(&socket, "/v1/ratio", &ratio)?;
        lab.client.enter(|| http_rounds(300, &[1, 1, 1]))??;
    }

    if !interrupted() {
        drain_demo(&lab, &socket)?;
    }

    if !interrupted() {
        http_mode_demo(&lab, &socket)?;
    }

    if !interrupted() {
        println!("\n== UDP {VIP_V4}:5353: one source port sticks to one node; new ports follow the ratios 2:1:1");
        let (fixed, spread) = lab.client.enter(udp_demo)??;
        println!(
            "   20 datagrams from one port were answered by: {}",
            fixed.join(" ")
        );
        print_shares(&spread, &RATIOS);
    }
    stop_and_clean_up(&lab, &mut fep, &fep_bin)?;
    println!("== removing the lab");
    Ok(())
}

/// Builds the lab, starts the back ends' servers and agents and fep, and
/// waits until every agent reports.
fn start(fep_bin: &Path) -> anyhow::Result<(Lab, FepProcess)> {
    let testsrv = lab::workspace_bin("fep-testsrv")?;
    let agent = lab::workspace_bin("bep-agent")?;
    println!(
        "== building the lab: client 10.0.1.2, gateway (fep), back ends be1-be3 at 10.0.2.11-13"
    );
    let mut lab = Lab::new(TAG, 3)?;
    for i in 0..3 {
        let mut args = lab::testsrv_args(i, &[80], &[5353]);
        args.extend([
            "--echo".into(),
            "7000".into(),
            "--http".into(),
            APP_PORT.to_string(),
        ]);
        lab.start_backend_server(i, &testsrv, &args)?;
    }
    let key = lab.agent_key(&agent)?;
    let list: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "{{ node = \"{}\", ratio = {} }}",
                lab::backend_name(i),
                RATIOS[i]
            )
        })
        .collect();
    let service = |name: &str, port: u16, proto: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{VIP_V4}\"\nport = {port}\nprotocol = \"{proto}\"\nbackend = [{}]\n",
            list.join(", ")
        )
    };
    let app = format!("{}mode = \"http\"\n", service("app", APP_PORT, "tcp"));
    let services = [
        service("web", 80, "tcp"),
        service("echo", 7000, "tcp"),
        service("dns", 5353, "udp"),
        app,
    ]
    .join("\n");
    let top = format!(
        "agent_listen = \"10.0.2.1:9441\"\nagent_key_file = \"{}\"\nprune_interval_ms = 500\n",
        key.display()
    );
    let config = lab.config(false, &top, &services);
    println!("== fep config:\n{}", indent(&config));
    let fep = lab.start_fep(fep_bin, &config)?;
    for i in 0..3 {
        lab.start_agent(i, &agent, &[80, 7000, 5353], 500, "")?;
    }
    let socket = lab.control_socket();
    wait(Duration::from_secs(10), "agents to connect", || {
        let nodes: Vec<NodeView> = get(&socket, "/v1/nodes")?;
        Ok(nodes.iter().all(|n| n.agent_connected))
    })?;
    println!("== fep is serving and the three agents report to it");
    Ok((lab, fep))
}

/// Stops fep (which holds the TUN device and return-path rules for a
/// restart, so packets are dropped, not misrouted), then decommissions the
/// gateway with `fep --cleanup` and shows both.
fn stop_and_clean_up(lab: &Lab, fep: &mut FepProcess, fep_bin: &Path) -> anyhow::Result<()> {
    println!("\n== stopping fep (SIGTERM)");
    let status = fep.stop()?;
    let log = fep.log();
    if let Some(line) = log.lines().rev().find(|l| l.contains("totals:")) {
        println!(
            "   {}",
            line.split("fep::daemon:").last().unwrap_or(line).trim()
        );
    }
    if !status.success() {
        bail!("fep exited with {status}:\n{log}");
    }
    let held = || -> anyhow::Result<(bool, bool)> {
        Ok((
            lab.gateway.ip_output(&["link", "show", "fep0"]).is_ok(),
            lab.gateway.ip_output(&["rule"])?.contains("lookup 100"),
        ))
    };
    let (device, rules) = held()?;
    println!(
        "   fep exited 0; held for a restart (packets dropped, not misrouted): TUN device {device}, \
         return-path rules {rules}"
    );
    println!("\n== decommissioning: fep --cleanup");
    let out = lab
        .gateway
        .command(fep_bin)
        .arg("--config")
        .arg(lab.dir().join("fep.toml"))
        .arg("--cleanup")
        .output()?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    if !out.status.success() {
        bail!(
            "fep --cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (device, rules) = held()?;
    println!(
        "   TUN device gone: {}, policy rules gone: {}",
        !device, !rules
    );
    Ok(())
}

/// Holds a live connection, drains its node, shows that the connection keeps
/// working and new connections avoid the node, closes it, and waits for the
/// node to be drained.
fn drain_demo(lab: &Lab, socket: &Path) -> anyhow::Result<()> {
    let stream = lab.client.enter(|| TcpStream::connect((VIP_V4, 7000)))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut conn = BufReader::new(stream);
    let mut node = String::new();
    conn.read_line(&mut node)?;
    let node = node.trim().to_string();
    println!(
        "\n== a long-lived connection to {VIP_V4}:7000 landed on {node}; `fepctl drain {node}`"
    );
    let arg = NodeArg { node: node.clone() };
    post(socket, "/v1/drain", &arg)?;
    std::thread::sleep(Duration::from_millis(1500));
    conn.get_mut().write_all(b"still here?\n")?;
    let mut echo = String::new();
    conn.read_line(&mut echo)?;
    print_nodes(socket)?;
    println!(
        "   the connection still works (echoed {:?}); its route stays while it lives",
        echo.trim()
    );
    let names = lab.client.enter(|| {
        (0..30)
            .map(|_| {
                http::get(
                    SocketAddr::new(VIP_V4.into(), 80),
                    "/",
                    Duration::from_secs(5),
                )
                .map(|r| r.body_text())
            })
            .collect::<anyhow::Result<Vec<String>>>()
    })??;
    println!(
        "   30 new connections went to: {}",
        ["be1", "be2", "be3"]
            .iter()
            .map(|n| format!("{n} {}", names.iter().filter(|x| x == n).count()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("   closing the connection …");
    let mut stream = conn.into_inner();
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = stream.read_to_end(&mut Vec::new());
    let started = Instant::now();
    wait(Duration::from_secs(15), "the drain to complete", || {
        let nodes: Vec<NodeView> = get(socket, "/v1/nodes")?;
        Ok(nodes
            .iter()
            .any(|n| n.name == node && n.state == NodeState::Drained))
    })?;
    println!(
        "   {node} is drained {:.1} s after the close: safe to stop",
        started.elapsed().as_secs_f64()
    );
    print_nodes(socket)?;
    post(socket, "/v1/undrain", &arg)?;
    Ok(())
}

/// HTTP mode: one keep-alive connection's requests follow the ratios;
/// a drain completes while five persistent clients keep sending, none of
/// them sees an error, and their next requests go to the other nodes.
fn http_mode_demo(lab: &Lab, socket: &Path) -> anyhow::Result<()> {
    let addr = SocketAddr::new(VIP_V4.into(), APP_PORT);
    let timeout = Duration::from_secs(5);
    println!("\n== HTTP mode ({VIP_V4}:{APP_PORT}, mode = \"http\"): 200 requests on ONE keep-alive connection");
    let mut conn = lab
        .client
        .enter(|| http::KeepAlive::connect(addr, timeout))??;
    let mut counts = [0usize; 3];
    for _ in 0..200 {
        let name = conn.get("/")?.body_text();
        match (0..3).find(|&i| lab::backend_name(i) == name) {
            Some(i) => counts[i] += 1,
            None => bail!("unexpected answer {name:?}"),
        }
    }
    println!("   fep dispatches each request; in TCP mode all 200 would go to one node:");
    print_shares(&counts, &RATIOS);

    println!("\n== `fepctl drain be1` while 5 persistent clients keep sending");
    let clients: Vec<http::KeepAlive> = (0..5)
        .map(|_| {
            lab.client
                .enter(|| http::KeepAlive::connect(addr, timeout))?
        })
        .collect::<anyhow::Result<_>>()?;
    let stop = AtomicBool::new(false);
    let (drained_after, results) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let workers: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                let stop = &stop;
                scope.spawn(move || {
                    let (mut served, mut errors, mut last) = (0, 0, String::new());
                    while !stop.load(Ordering::Relaxed) && served < 10_000 {
                        match c.get("/") {
                            Ok(r) if r.status == 200 => {
                                served += 1;
                                last = r.body_text();
                            }
                            _ => errors += 1,
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (served, errors, last)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let arg = NodeArg { node: "be1".into() };
        post(socket, "/v1/drain", &arg)?;
        wait(Duration::from_secs(15), "be1 to drain", || {
            let nodes: Vec<NodeView> = get(socket, "/v1/nodes")?;
            Ok(nodes
                .iter()
                .any(|n| n.name == "be1" && n.state == NodeState::Drained))
        })?;
        let drained_after = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let results: Vec<(usize, usize, String)> = workers
            .into_iter()
            .map(|w| w.join().expect("client thread"))
            .collect();
        post(socket, "/v1/undrain", &arg)?;
        Ok((drained_after, results))
    })?;
    println!(
        "   be1 drained {:.1} s after the command, with all 5 clients still connected",
        drained_after.as_secs_f64()
    );
    for (i, (served, errors, last)) in results.iter().enumerate() {
        println!(
            "     client {}: {served} requests, {errors} errors, last one served by {last}",
            i + 1
        );
    }
    Ok(())
}

fn print_nodes(socket: &Path) -> anyhow::Result<()> {
    for n in get::<Vec<NodeView>>(socket, "/v1/nodes")? {
        println!(
            "     {:<4} {:<9} routes {:>3} live, {:>3} closing",
            n.name,
            n.state.to_string(),
            n.routes,
            n.closing
        );
    }
    Ok(())
}

/// Polls `cond` every 100 ms for up to `limit`.
fn wait(
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !cond()? {
        if Instant::now() > deadline || interrupted() {
            bail!("gave up waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Sends the requests in rounds of 100, printing the shares after each.
fn http_rounds(requests: usize, ratios: &[u32; 3]) -> anyhow::Result<[usize; 3]> {
    let addr = SocketAddr::new(VIP_V4.into(), 80);
    let mut counts = [0usize; 3];
    let started = Instant::now();
    let mut sent = 0;
    while sent < requests && !interrupted() {
        let round = (requests - sent).min(100);
        for _ in 0..round {
            let resp =
                http::get(addr, "/", Duration::from_secs(5)).context("HTTP request through fep")?;
            let name = resp.body_text();
            match (0..3).find(|&i| lab::backend_name(i) == name) {
                Some(i) => counts[i] += 1,
                None => bail!("unexpected answer {name:?}"),
            }
        }
        sent += round;
        println!(
            "\n   after {sent} connections ({:.0} conn/s):",
            sent as f64 / started.elapsed().as_secs_f64()
        );
        print_shares(&counts, ratios);
    }
    Ok(counts)
}

fn udp_demo() -> anyhow::Result<(Vec<String>, [usize; 3])> {
    let vip = SocketAddr::new(VIP_V4.into(), 5353);
    let ask = |sock: &UdpSocket| -> anyhow::Result<String> {
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            sock.send_to(b"who?", vip)?;
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).to_string());
            }
        }
        bail!("no UDP answer from {vip}")
    };
    let one = UdpSocket::bind("0.0.0.0:0")?;
    let fixed = (0..20)
        .map(|_| ask(&one))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut spread = [0usize; 3];
    for _ in 0..200 {
        let name = ask(&UdpSocket::bind("0.0.0.0:0")?)?;
        if let Some(i) = (0..3).find(|&i| lab::backend_name(i) == name) {
            spread[i] += 1;
        }
    }
    Ok((fixed, spread))
}

fn print_shares(counts: &[usize; 3], ratios: &[u32; 3]) {
    let total: usize = counts.iter().sum::<usize>().max(1);
    let ratio_sum: u32 = ratios.iter().sum();
    for i in 0..3 {
        let share = 100.0 * counts[i] as f64 / total as f64;
        let target = 100.0 * f64::from(ratios[i]) / f64::from(ratio_sum);
        let bar = "█".repeat((share / 2.0).round() as usize);
        println!(
            "   {}  {bar:<50} {:>5} ({share:5.1}%)   ratio {} → {target:.1}%",
            lab::backend_name(i),
            counts[i],
            ratios[i]
        );
    }
    let _ = std::io::stdout().flush();
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

/// Idle connections through the cluster demo's move and failover.
const IDLE: usize = 1000;
/// UDP flows through them.
const UDP_FLOWS: usize = 20;

/// A line of the stream through group G0, and when it came.
type Lines = Arc<Mutex<Vec<(Instant, u64)>>>;

/// The cluster demo (see the module comment).
fn cluster_demo() -> anyhow::Result<()> {
    println!("== building the cluster lab: client 10.0.1.2 behind a router; gateways gwa and gwb,");
    println!(
        "   each with keepalived and fep; group G0 (VIP {}, back ends be1, be2) on gwa,",
        cluster_lab::vip(0)
    );
    println!(
        "   group G1 (VIP {}, back ends be3, be4) on gwb",
        cluster_lab::vip(1)
    );
    let (mut lab, mut feps) = ClusterLab::start(TAG, &[0, 1], "")?;
    println!(
        "== gwa's keepalived config:\n{}",
        indent(&lab.keepalived_config(0, &[150, 100]))
    );
    let a = lab.control_socket(0);

    let addr = SocketAddr::new(cluster_lab::vip(0).into(), cluster_lab::STREAM);
    let conn = lab
        .client
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let lines: Lines = Arc::default();
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            let mut conn = BufReader::new(conn);
            let mut line = String::new();
            while conn.read_line(&mut line).is_ok_and(|n| n > 0) {
                let n = line.trim().rsplit(' ').next().and_then(|n| n.parse().ok());
                lines.lock().unwrap().push((Instant::now(), n.unwrap_or(0)));
                line.clear();
            }
        })
    };
    println!("== a connection streams a line every 200 ms from {addr}");
    let echo = SocketAddr::new(cluster_lab::vip(0).into(), cluster_lab::ECHO);
    let mut idle = lab.client.enter(|| {
        (0..IDLE)
            .map(|_| {
                let c = TcpStream::connect_timeout(&echo, Duration::from_secs(5))?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut c = BufReader::new(c);
                c.read_line(&mut String::new())?;
                Ok(c)
            })
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    println!("== and {IDLE} idle connections wait on {echo}");
    // UDP flows, each confirmed (a datagram after a reply).
    let flows = lab.udp_flows(UDP_FLOWS)?;
    let udp_before = flows
        .iter()
        .map(|f| udp_ask(f).and_then(|_| udp_ask(f)))
        .collect::<anyhow::Result<Vec<String>>>()?;
    println!(
        "== and {UDP_FLOWS} UDP flows to {}:{} answer, each from its back end",
        cluster_lab::vip(0),
        cluster_lab::UDP
    );
    std::thread::sleep(Duration::from_secs(1));

    println!("\n== `fepctl vip move G0 --to gwb` (asked of gwa)");
    let asked = Instant::now();
    let report: MoveReport = post_for(
        &a,
        "/v1/vip/move",
        &MoveArg {
            group: "G0".into(),
            to: "gwb".into(),
        },
    )?;
    let phases: Vec<String> = report
        .phases
        .iter()
        .map(|(p, ms)| format!("{p} {ms} ms"))
        .collect();
    println!("   phases: {}", phases.join(", "));
    std::thread::sleep(Duration::from_secs(1));
    let moved_stall = longest_gap(&lines, asked);
    let copy_ms = report
        .phases
        .iter()
        .find(|(p, _)| p == "copy")
        .map_or(0, |(_, ms)| *ms);

    println!("\n== gwb crashes: its keepalived and fep killed with SIGKILL");
    let before = lines.lock().unwrap().len();
    lab.kill_keepalived(1);
    let crashed = Instant::now();
    drop(feps.remove(1));
    wait(Duration::from_secs(10), "the stream to resume", || {
        Ok(lines.lock().unwrap().len() > before)
    })?;
    let resumed = lines.lock().unwrap()[before].0.duration_since(crashed);
    std::thread::sleep(Duration::from_secs(1));
    let mut echoed = 0;
    for c in &mut idle {
        let mut back = String::new();
        c.get_mut().write_all(b"still here\n")?;
        if c.read_line(&mut back).is_ok() && back == "still here\n" {
            echoed += 1;
        }
    }
    // In reverse order, so that a fresh round robin would move every one.
    let udp_kept = flows
        .iter()
        .zip(&udp_before)
        .rev()
        .filter(|(f, before)| udp_ask(f).is_ok_and(|now| now == **before))
        .count();
    let seqs: Vec<u64> = lines.lock().unwrap().iter().map(|(_, n)| *n).collect();
    let intact = seqs.windows(2).all(|w| w[1] == w[0] + 1);
    let status: StatusView = get(&a, "/v1/status")?;
    let held = status
        .counters
        .events
        .get(&Count::PacketsHeld)
        .copied()
        .unwrap_or(0);
    let full = status.counters.drops.get("hold_full").copied().unwrap_or(0);
    let view: ClusterView = get(&a, "/v1/cluster")?;

    println!("\n== figures");
    println!("   planned move: {} route(s) copied in {copy_ms} ms ({}/s), {} packet(s) held and replayed, held {} ms, longest stream stall {} ms",
        report.routes_copied,
        (report.routes_copied * 1000).checked_div(copy_ms).unwrap_or(report.routes_copied),
        report.packets_replayed, report.longest_hold_ms, moved_stall.as_millis().saturating_sub(200));
    println!(
        "   failover: first resumed byte {} ms after the crash; gwa held G0 {} ms",
        resumed.as_millis(),
        view.groups[0].last_hold.map_or(0, |h| h.held_ms)
    );
    println!("   gwa stored {held} packet(s) in all, dropped {full} for a full hold buffer");
    println!(
        "   the stream: {} lines, {}",
        seqs.len(),
        if intact {
            "none lost, none repeated"
        } else {
            "LINES MISSING"
        }
    );
    println!("   idle connections that still echo after both: {echoed} of {IDLE}");
    println!("   UDP flows answered by the same back end after both: {udp_kept} of {UDP_FLOWS}");
    drop(reader);
    println!("== removing the lab");
    drop(feps);
    drop(lab);
    if !intact || echoed != IDLE {
        bail!("a connection did not survive");
    }
    Ok(())
}

/// The longest gap between two stream lines after `since`.
fn longest_gap(lines: &Lines, since: Instant) -> Duration {
    let l = lines.lock().unwrap();
    l.windows(2)
        .filter(|w| w[1].0 > since)
        .map(|w| w[1].0.duration_since(w[0].0))
        .max()
        .unwrap_or_default()
}

/// Deletes namespaces an interrupted earlier demo left (its process is gone).
/// Sites in the sites demo, how far away each one's back end is, and the
/// HTTP service's connection limit at each.
const SITES: usize = 4;
const SITE_DELAYS_MS: [u64; SITES] = [5, 15, 25, 35];
const SITE_LIMIT: usize = 8;

fn sites_demo(fep_bin: &Path) -> anyhow::Result<()> {
    use fep_shared::api::SitesView;
    use fep_tools::sites_lab::{gateway, site_name, vip, SitesLab, NAME};
    println!("== building four sites on one segment: gateways 10.9.0.11-14, each with fep and a back end;");
    println!("   the back ends answer 5, 15, 25 and 35 ms late (how far away each site is)");
    let mut lab = SitesLab::new(TAG, SITES)?;
    lab.start_origins(&lab::workspace_bin("fep-testsrv")?, &SITE_DELAYS_MS)?;
    let http = format!("max_connections = {SITE_LIMIT}");
    for k in 0..SITES {
        let config = lab.fep_config(k, &http, "", "ohw = [4, 2, 1]\ncheck_path = \"/health\"")?;
        if k == 0 {
            println!("== s1's [sites] table (the same on every site but `me`):");
            let table = &config[config.find("[sites]").unwrap_or(0)..];
            let mut shown: Vec<&str> = Vec::new();
            for line in table.lines() {
                let region = line.contains("sites.region")
                    || line.starts_with("prefix")
                    || line.starts_with("region =");
                let repeated_blank = line.is_empty() && shown.last().is_some_and(|l| l.is_empty());
                if !(region || repeated_blank) {
                    shown.push(line);
                }
            }
            println!("{}", indent(&shown.join("\n")));
            println!("   (and document 002's Table VI as [[sites.region]] prefixes, deploy/regions-table-vi.toml)");
        }
        lab.start_fep(k, fep_bin, &config)?;
    }
    let view = |lab: &SitesLab, k: usize| -> anyhow::Result<SitesView> {
        get(&lab.control_socket(k), "/v1/sites")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !view(&lab, 0)?.names[0]
        .sites
        .iter()
        .all(|s| s.up && s.weight > 0)
    {
        if Instant::now() > deadline {
            bail!("the sites did not all come up:\n{}", lab.fep_log(0));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let print_view = |v: &SitesView| {
        for s in &v.names[0].sites {
            println!(
                "   {:<3} {:<15} up {:<3} room {:<3} weight {:>2} share {:>3} %",
                s.site,
                s.vips[0].to_string(),
                if s.up { "yes" } else { "no" },
                if s.room { "yes" } else { "no" },
                s.weight,
                s.share_percent
            );
        }
    };
    println!(
        "\n== `fepctl sites` on s1: each site ranks the others by its checks' response times;"
    );
    println!("   OHW 4, 2, 1 over the ranks gives the hand-off weights");
    print_view(&view(&lab, 0)?);
    let dns = SocketAddr::new(gateway(0).into(), 53);
    let firsts = |lab: &SitesLab, n: usize| -> anyhow::Result<Vec<usize>> {
        let mut count = vec![0; SITES];
        for _ in 0..n {
            let answer = lab
                .client
                .enter(|| fep_tools::dns::query_a(dns, NAME, Duration::from_secs(2)))??;
            if let Some(k) = answer
                .first()
                .and_then(|a| (0..SITES).position(|k| IpAddr::from(vip(k, SITES)) == *a))
            {
                count[k] += 1;
            }
        }
        Ok(count)
    };
    let show = |count: &[usize]| {
        let total: usize = count.iter().sum();
        for (k, c) in count.iter().enumerate() {
            println!(
                "   {} first in {c:>3} of {total} ({:.0} %)",
                site_name(k),
                *c as f64 * 100.0 / total.max(1) as f64
            );
        }
    };
    println!("\n== 280 queries to s1's DNS server for {NAME}: who is answered first");
    show(&firsts(&lab, 280)?);

    println!("\n== killing s2's fep (SIGKILL)");
    let killed = Instant::now();
    lab.kill_fep(1);
    let dead = IpAddr::from(vip(1, SITES));
    loop {
        let mut all_gone = true;
        for k in [0, 2, 3] {
            let server = SocketAddr::new(gateway(k).into(), 53);
            let a = lab
                .client
                .enter(|| fep_tools::dns::query_a(server, NAME, Duration::from_secs(2)))??;
            all_gone &= !a.contains(&dead);
        }
        if all_gone {
            break;
        }
        if killed.elapsed() > Duration::from_secs(10) {
            bail!("s2 is still answered 10 s after it died");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "   s2 was gone from every other site's answers {} ms after it died",
        killed.elapsed().as_millis()
    );
    print_view(&view(&lab, 0)?);
    println!("== 280 queries to s1 again");
    show(&firsts(&lab, 280)?);

    println!("\n== s1 full: {SITE_LIMIT} client connections held open (its max_connections)");
    let to = SocketAddr::new(vip(0, SITES).into(), 80);
    let mut held = Vec::new();
    for _ in 0..SITE_LIMIT {
        let mut c = lab
            .client
            .enter(|| http::KeepAlive::connect(to, Duration::from_secs(5)))??;
        c.get("/")?;
        held.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let first = lab
        .client
        .enter(|| http::get(to, "/demo?page=1", Duration::from_secs(5)))??;
    let location = first.header("location").unwrap_or("-").to_string();
    println!(
        "   a new client's GET /demo?page=1 at s1: {} Location: {location}",
        first.status
    );
    if let Some(rest) = location.strip_prefix("http://") {
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let next = SocketAddr::new(host.parse()?, 80);
        let second = lab
            .client
            .enter(|| http::get(next, path, Duration::from_secs(5)))??;
        println!(
            "   followed: {} from {}",
            second.status,
            second.body_text().trim()
        );
    }
    println!(
        "   s1 in the other sites' answers: room {}",
        if view(&lab, 2)?.names[0].sites[0].room {
            "yes"
        } else {
            "no (triggered update)"
        }
    );
    drop(held);
    println!("== removing the lab");
    Ok(())
}

fn remove_stale_labs() {
    let Ok(list) = netns::output(std::process::Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(TAG).and_then(|r| r.split('x').next()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = netns::ip(&["netns", "del", name]);
        }
    }
}
