//! `fep-demo`: the whole dispatcher on one machine, in a minute.
//!
//! Builds network namespaces (a client, a gateway, three back ends running a
//! small HTTP server that answers its node name), starts the real `fep` on the
//! gateway, sends real traffic through it, prints the live share of each node
//! next to its configured ratio, and removes everything again. Needs root.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fep_tools::lab::{self, Lab, VIP_V4};
use fep_tools::{http, netns};

const TAG: &str = "fepdemo";
const RATIOS: [u32; 3] = [2, 1, 1];

#[derive(Parser)]
struct Args {
    /// HTTP requests to send, each on a new connection.
    #[arg(long, default_value_t = 400)]
    requests: usize,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!(
            "fep-demo needs root: it creates network namespaces, veth links and a TUN device."
        );
        std::process::exit(2);
    }
    let fep = lab::workspace_bin("fep")?;
    let testsrv = lab::workspace_bin("fep-testsrv")?;
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    remove_stale_labs();

    println!(
        "== building the lab: client 10.0.1.2, gateway (fep), back ends be1-be3 at 10.0.2.11-13"
    );
    let mut lab = Lab::new(TAG, 3)?;
    lab.start_backend_servers(&testsrv, &[80], &[5353])?;
    let backends: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "{{ node = \"{}\", ratio = {} }}",
                lab::backend_name(i),
                RATIOS[i]
            )
        })
        .collect();
    let services = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{0}]\n\n\
         [[service]]\nname = \"dns\"\nvip = \"{VIP_V4}\"\nport = 5353\nprotocol = \"udp\"\nbackend = [{0}]\n",
        backends.join(", ")
    );
    let config = lab.config(false, "", &services);
    println!("== fep config:\n{}", indent(&config));
    let mut fep = lab.start_fep(&fep, &config)?;
    println!(
        "== fep is serving; {} HTTP requests to {VIP_V4}:80 from the client, each a new connection",
        args.requests
    );

    let counts = lab.client.enter(|| http_rounds(args.requests))??;
    let total: usize = counts.iter().sum();
    if total > 0 {
        println!("\n== final shares over {total} connections (configured 2:1:1 → 50% / 25% / 25%)");
        print_shares(&counts);
    }

    if !INTERRUPTED.load(Ordering::Relaxed) {
        println!("\n== UDP {VIP_V4}:5353: one source port sticks to one node; new ports follow the ratios");
        let (fixed, spread) = lab.client.enter(udp_demo)??;
        println!(
            "   20 datagrams from one port were answered by: {}",
            fixed.join(" ")
        );
        print_shares(&spread);
    }

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
    let left = lab.gateway.ip_output(&["rule"])?;
    println!(
        "   fep exited 0; TUN device gone: {}, policy rules gone: {}",
        lab.gateway.ip_output(&["link", "show", "fep0"]).is_err(),
        !left.contains("lookup 100")
    );
    println!("== removing the lab");
    Ok(())
}

/// Sends the requests in rounds of 100, printing the shares after each.
fn http_rounds(requests: usize) -> anyhow::Result<[usize; 3]> {
    let addr = SocketAddr::new(VIP_V4.into(), 80);
    let mut counts = [0usize; 3];
    let started = Instant::now();
    let mut sent = 0;
    while sent < requests && !INTERRUPTED.load(Ordering::Relaxed) {
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
        print_shares(&counts);
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

fn print_shares(counts: &[usize; 3]) {
    let total: usize = counts.iter().sum::<usize>().max(1);
    let ratio_sum: u32 = RATIOS.iter().sum();
    for i in 0..3 {
        let share = 100.0 * counts[i] as f64 / total as f64;
        let target = 100.0 * f64::from(RATIOS[i]) / f64::from(ratio_sum);
        let bar = "█".repeat((share / 2.0).round() as usize);
        println!(
            "   {}  {bar:<50} {:>5} ({share:5.1}%)   ratio {} → {target:.1}%",
            lab::backend_name(i),
            counts[i],
            RATIOS[i]
        );
    }
    let _ = std::io::stdout().flush();
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

/// Deletes namespaces an interrupted earlier demo left (its process is gone).
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
