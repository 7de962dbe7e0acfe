//! `fep-bench`: fep against plain kernel forwarding, nftables DNAT and
//! HAProxy, measured in the same run on the same namespace topology (a
//! client, a gateway, two back ends running nginx, iperf3 and fep-testsrv).
//!
//! Scenarios, interleaved over `--runs` repetitions, each on a fresh
//! topology (no TIME_WAIT left over from the one before):
//! - `route`: the gateway forwards to back end 1 (the ceiling);
//! - `nft`: nftables DNAT on the gateway (numgen round robin, as nftlb does);
//! - `haproxy`: HAProxy `mode tcp`, roundrobin, on the gateway;
//! - `fep`: this project, every packet through its TUN path;
//! - `fep-fast`: this project with the kernel fast path (`fast_path =
//!   "tc-bpf"`): established routes forwarded by its tc-BPF program.
//!
//! HTTP keep-alive scenarios, on the same topology with the back ends'
//! nginx keeping connections open on port 8080:
//! - `http-haproxy`: HAProxy `mode http`, `http-reuse safe`;
//! - `http-nginx`: nginx as a reverse proxy with upstream `keepalive`;
//! - `http-fep`: fep's HTTP mode.
//!
//! Figures: TCP bulk Gbit/s with 1 and 4 streams (iperf3), new connections
//! per second with one request each (wrk, `Connection: close`, against
//! nginx) over 64 connections with p50/p99 latency, and over 32, UDP 64-byte packets per second received
//! (iperf3), the whole system's CPU during the bulk test (all namespaces
//! share the cores), and a byte-exact check of a 64 MB transfer. Medians, and
//! fep's ratio to each peer, go to `BENCHMARKS.md` with the exact commands.
//! HTTP figures: requests per second with p50/p99 over 64 keep-alive
//! connections (wrk), and the new-client case (one request per client
//! connection), where a proxy's pool of open server connections saves the
//! server handshake.
//!
//! DNS scenarios (`fep-bench/dns.rs`), on a client, a gateway and one back
//! end: one authoritative server at a time on the gateway's 10.0.1.1:53,
//! the same zone, dnsperf's same load from the client (each on its own
//! CPUs):
//! - `dns-gdnsd`: gdnsd;
//! - `dns-fep`: fep's DNS server (`[sites.dns]`).
//!
//! Figures: queries per second, lost queries (and those the server's full
//! socket buffer dropped), average latency.
//! `--smoke`: 2-second measurements, one run (CI checks the tool works).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fep_shared::api::StatusView;
use fep_shared::cpu::CpuTimes;
use fep_tools::host::{self, Tool};
use fep_tools::lab::{self, FepProcess, Lab, VIP_V4};
use fep_tools::{http, netns, pattern};

#[path = "fep-bench/dns.rs"]
mod dns;

#[derive(Parser)]
struct Args {
    /// Short measurements, one run: checks that everything works.
    #[arg(long)]
    smoke: bool,
    /// Repetitions of every scenario (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Do not apt-get install missing tools.
    #[arg(long)]
    no_install: bool,
    /// Only these scenarios (route, nft, haproxy, fep, http-haproxy,
    /// http-nginx, http-fep, dns-gdnsd, dns-fep).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra top-level config keys for `fep` and `fep-fast`, `;`-separated
    /// (e.g. `workers = 1`), to measure a setting against the peers.
    #[arg(long, default_value = "")]
    fep_keys: String,
    /// Record a system-wide `perf` profile (with call graphs) of every fep
    /// measurement into this directory: `fep-<run>-<test>.data`, for
    /// `perf report -i`.
    #[arg(long)]
    profile: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Route,
    Nft,
    Haproxy,
    Fep,
    FepFast,
    HttpHaproxy,
    HttpNginx,
    HttpFep,
    DnsGdnsd,
    DnsFep,
}

/// Every scenario, in the order each run measures them.
const SCENARIOS: [Scenario; 10] = [
    Scenario::Route,
    Scenario::Nft,
    Scenario::Haproxy,
    Scenario::Fep,
    Scenario::FepFast,
    Scenario::HttpHaproxy,
    Scenario::HttpNginx,
    Scenario::HttpFep,
    Scenario::DnsGdnsd,
    Scenario::DnsFep,
];

/// The packet-path table's columns, and the HTTP table's.
const PACKET_SCENARIOS: [Scenario; 5] = [
    Scenario::Route,
    Scenario::Nft,
    Scenario::Haproxy,
    Scenario::Fep,
    Scenario::FepFast,
];
const HTTP_SCENARIOS: [Scenario; 3] = [
    Scenario::HttpHaproxy,
    Scenario::HttpNginx,
    Scenario::HttpFep,
];
const DNS_SCENARIOS: [Scenario; 2] = [Scenario::DnsGdnsd, Scenario::DnsFep];

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Route => "route",
            Scenario::Nft => "nft",
            Scenario::Haproxy => "haproxy",
            Scenario::Fep => "fep",
            Scenario::FepFast => "fep-fast",
            Scenario::HttpHaproxy => "http-haproxy",
            Scenario::HttpNginx => "http-nginx",
            Scenario::HttpFep => "http-fep",
            Scenario::DnsGdnsd => "dns-gdnsd",
            Scenario::DnsFep => "dns-fep",
        }
    }

    fn is_http(self) -> bool {
        HTTP_SCENARIOS.contains(&self)
    }

    fn is_dns(self) -> bool {
        DNS_SCENARIOS.contains(&self)
    }
}

/// One scenario's figures from one run; `None` where it does not apply.
#[derive(Debug, Default, Clone)]
struct Figures {
    bulk1_gbps: Option<f64>,
    bulk4_gbps: Option<f64>,
    conn_per_s: Option<f64>,
    conn32_per_s: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    udp_pps: Option<f64>,
    udp_lost_pct: Option<f64>,
    udp_rcvbuf_pct: Option<f64>,
    cpu_pct: Option<f64>,
    client_time_wait: Option<f64>,
    bytes_exact: Option<bool>,
    keepalive_rps: Option<f64>,
    keepalive_p50_ms: Option<f64>,
    keepalive_p99_ms: Option<f64>,
    new_client_rps: Option<f64>,
    new_client_p50_ms: Option<f64>,
    new_client_p99_ms: Option<f64>,
    dns_qps: Option<f64>,
    dns_lost_ppm: Option<f64>,
    dns_rcvbuf_ppm: Option<f64>,
    dns_in_flight: Option<f64>,
    dns_latency_ms: Option<f64>,
    dns_nxdomain_pct: Option<f64>,
}

const BULK_BYTES: u64 = 64 << 20;
const TOOLS: [Tool; 10] = [
    host::IPERF3,
    tool("wrk", "wrk"),
    tool("nginx", "nginx-light"),
    tool("haproxy", "haproxy"),
    host::NFT,
    tool("sysctl", "procps"),
    host::IP,
    host::DNSPERF,
    host::GDNSD,
    tool("taskset", "util-linux"),
];

const fn tool(program: &'static str, package: &'static str) -> Tool {
    Tool { program, package }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.runs = 1;
        args.seconds = 2;
    }
    if !netns::is_root() {
        eprintln!("fep-bench needs root: it builds network namespaces and runs fep.");
        std::process::exit(2);
    }
    install(args.no_install)?;
    let bins = Bins {
        fep: lab::workspace_bin("fep")?,
        testsrv: lab::workspace_bin("fep-testsrv")?,
        fep_keys: args.fep_keys.clone(),
    };
    if !args.smoke && bins.fep.to_string_lossy().contains("/debug/") {
        eprintln!("note: {} is a debug build; for figures that mean something run `cargo build --release --workspace` and target/release/fep-bench", bins.fep.display());
    }
    let mut results: Vec<(Scenario, Vec<Figures>)> = SCENARIOS
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name()))
        .map(|&s| (s, Vec::new()))
        .collect();
    for run in 1..=args.runs {
        for (s, figures) in results.iter_mut() {
            eprintln!("== run {run}/{}: {}", args.runs, s.name());
            let profile = args
                .profile
                .as_deref()
                .filter(|_| {
                    matches!(
                        *s,
                        Scenario::Fep | Scenario::FepFast | Scenario::HttpFep | Scenario::DnsFep
                    )
                })
                .map(|dir| dir.join(format!("fep-{run}")));
            let f = if s.is_http() {
                measure_http(*s, &bins, args.seconds, profile.as_deref())
            } else if s.is_dns() {
                dns::measure(*s, &bins, args.seconds, profile.as_deref())
            } else {
                measure(*s, &bins, args.seconds, profile.as_deref())
            }
            .with_context(|| format!("scenario {}", s.name()))?;
            eprintln!("   {f:?}");
            figures.push(f);
        }
    }
    let report = report(&results, &args, &bins);
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{report}");
    if results
        .iter()
        .any(|(_, fs)| fs.iter().any(|f| f.bytes_exact == Some(false)))
    {
        bail!("a bulk transfer arrived with different bytes");
    }
    Ok(())
}

struct Bins {
    fep: PathBuf,
    testsrv: PathBuf,
    /// `--fep-keys`: top-level config keys for both packet-path feps.
    fep_keys: String,
}

/// The packet-path feps' top-level keys: no health checks (the back ends
/// stay up), `mode`'s keys, then `--fep-keys`.
fn fep_keys(bins: &Bins, mode: &str) -> String {
    format!(
        "health_check_interval_ms = 0\n{mode}{}\n",
        bins.fep_keys.replace(';', "\n")
    )
}

fn install(skip: bool) -> anyhow::Result<()> {
    let missing = host::missing(&TOOLS);
    if skip && !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        bail!(
            "missing tools: install {} (or run without --no-install)",
            packages.join(" ")
        );
    }
    host::ensure(&TOOLS)
}

/// Builds a fresh topology for `s`, measures, and tears it down.
fn measure(
    s: Scenario,
    bins: &Bins,
    secs: u64,
    profile: Option<&std::path::Path>,
) -> anyhow::Result<Figures> {
    let mut lab = Lab::new("fb", 2)?;
    for i in 0..2 {
        start_backend(&mut lab, i, bins)?;
    }
    let target: IpAddr = if s == Scenario::Route {
        lab::backend_v4(0).into()
    } else {
        VIP_V4.into()
    };
    let fep = start_scenario(&mut lab, s, bins)?;
    for port in [80, 5201, 8000] {
        wait_port(&lab, SocketAddr::new(target, port))?;
    }
    let mut f = Figures::default();
    let perf = |test: &str| Perf::record(profile, test);
    let cpu = Cpu::start();
    let p = perf("bulk1")?;
    f.bulk1_gbps = Some(iperf_tcp(&lab, target, secs, 1)?);
    drop(p);
    f.cpu_pct = cpu.busy_percent();
    let p = perf("bulk4")?;
    f.bulk4_gbps = Some(iperf_tcp(&lab, target, secs, 4)?);
    drop(p);
    let p = perf("conn")?;
    let (conn, p50, p99) = wrk(&lab, &format!("http://{target}/"), 64, true, secs)?;
    drop(p);
    (f.conn_per_s, f.p50_ms, f.p99_ms) = (Some(conn), Some(p50), Some(p99));
    f.conn32_per_s = Some(wrk(&lab, &format!("http://{target}/"), 32, true, secs)?.0);
    f.client_time_wait = Some(time_wait(&lab)? as f64);
    if s != Scenario::Haproxy {
        let p = perf("udp")?;
        udp_figures(&lab, target, secs, &mut f)?;
        drop(p);
    }
    f.bytes_exact = Some(bulk_exact(&lab, target).map_err(|e| match &fep {
        Some(fep) => {
            let status =
                fep_tools::admin_client::get::<StatusView>(&lab.control_socket(), "/v1/status")
                    .map(|v| serde_json::to_string(&v.counters).unwrap_or_default())
                    .unwrap_or_default();
            e.context(format!(
                "fep's counters: {status}\nfep's log:\n{}",
                fep.log()
            ))
        }
        None => e,
    })?);
    Ok(f)
}

/// An HTTP keep-alive scenario on a fresh topology: 64 keep-alive client
/// connections, then one request per client connection.
fn measure_http(
    s: Scenario,
    bins: &Bins,
    secs: u64,
    profile: Option<&std::path::Path>,
) -> anyhow::Result<Figures> {
    let mut lab = Lab::new("fh", 2)?;
    for i in 0..2 {
        start_backend(&mut lab, i, bins)?;
    }
    let fep = start_scenario(&mut lab, s, bins)?;
    wait_port(&lab, SocketAddr::new(VIP_V4.into(), 80))?;
    let url = format!("http://{VIP_V4}/");
    // Every proxy's answers come from both back ends before measuring.
    let first = lab.client.enter(|| {
        (0..4)
            .map(|_| {
                http::get(
                    SocketAddr::new(VIP_V4.into(), 80),
                    "/",
                    Duration::from_secs(5),
                )
            })
            .map(|r| r.map(|r| r.body_text()))
            .collect::<anyhow::Result<Vec<String>>>()
    })?;
    let first = first.with_context(|| match &fep {
        Some(fep) => format!("fep's log:\n{}", fep.log()),
        None => String::new(),
    })?;
    if !first.iter().any(|n| n == "be1") || !first.iter().any(|n| n == "be2") {
        bail!("the proxy does not spread over both back ends: {first:?}");
    }
    let mut f = Figures::default();
    let p = Perf::record(profile, "http-keepalive")?;
    let (rps, p50, p99) = wrk(&lab, &url, 64, false, secs)?;
    drop(p);
    (f.keepalive_rps, f.keepalive_p50_ms, f.keepalive_p99_ms) = (Some(rps), Some(p50), Some(p99));
    let p = Perf::record(profile, "http-new-client")?;
    let (rps, p50, p99) = wrk(&lab, &url, 32, true, secs)?;
    drop(p);
    (f.new_client_rps, f.new_client_p50_ms, f.new_client_p99_ms) =
        (Some(rps), Some(p50), Some(p99));
    Ok(f)
}

/// Sets up the gateway for scenario `s`: plain forwarding, nftables DNAT,
/// haproxy on the VIP, or fep (returned, so its log can explain a failure).
fn start_scenario(lab: &mut Lab, s: Scenario, bins: &Bins) -> anyhow::Result<Option<FepProcess>> {
    Ok(match s {
        Scenario::Route => {
            sysctl_forward(lab)?;
            None
        }
        Scenario::Nft => {
            sysctl_forward(lab)?;
            let rules = lab.dir().join("bench.nft");
            std::fs::write(&rules, nft_rules())?;
            netns::run(lab.gateway.command("nft").arg("-f").arg(&rules))?;
            None
        }
        Scenario::Haproxy => {
            start_haproxy(lab, "haproxy.cfg", &haproxy_cfg())?;
            None
        }
        Scenario::Fep => Some(lab.start_fep(
            &bins.fep,
            &lab.config(false, &fep_keys(bins, ""), &fep_services()),
        )?),
        Scenario::FepFast => Some(lab.start_fep(
            &bins.fep,
            &lab.config(
                false,
                &fep_keys(bins, "fast_path = \"tc-bpf\"\n"),
                &fep_services(),
            ),
        )?),
        Scenario::HttpHaproxy => {
            start_haproxy(lab, "haproxy-http.cfg", &haproxy_http_cfg())?;
            None
        }
        Scenario::HttpNginx => {
            vip_on_gateway(lab)?;
            let dir = lab.dir().join("nginx-gw");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("nginx.conf"), nginx_proxy_cfg(&dir))?;
            let child = lab
                .gateway
                .command("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            lab.adopt(None, child);
            None
        }
        Scenario::HttpFep => Some(lab.start_fep(
            &bins.fep,
            &lab.config(
                false,
                "health_check_interval_ms = 0\n",
                &fep_http_services(),
            ),
        )?),
        Scenario::DnsGdnsd | Scenario::DnsFep => bail!("DNS scenarios start in dns::measure"),
    })
}
/// The VIP as an address of the gateway, for a proxy listening on it.
fn vip_on_gateway(lab: &Lab) -> anyhow::Result<()> {
    lab.gateway
        .ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])
}

/// HAProxy on the gateway's VIP with the config `text` (written to `file`
/// in the lab), in the foreground, stopped with the lab.
fn start_haproxy(lab: &mut Lab, file: &str, text: &str) -> anyhow::Result<()> {
    vip_on_gateway(lab)?;
    let cfg = lab.dir().join(file);
    std::fs::write(&cfg, text)?;
    let child = lab
        .gateway
        .command("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    lab.adopt(None, child);
    Ok(())
}

/// The UDP test's figures: datagrams per second, lost, and lost to the back
/// ends' full receive buffers (the load generator outrunning the server, not
/// the path).
fn udp_figures(lab: &Lab, target: IpAddr, secs: u64, f: &mut Figures) -> anyhow::Result<()> {
    let udp = iperf_udp(lab, target, secs)?;
    f.udp_pps = Some(udp.received / udp.seconds);
    f.udp_lost_pct = Some(100.0 * udp.lost / udp.sent.max(1.0));
    let mut overflowed = 0.0;
    for be in &lab.backends {
        overflowed += rcvbuf_errors(be)?;
    }
    f.udp_rcvbuf_pct = Some(100.0 * overflowed / udp.sent.max(1.0));
    Ok(())
}

/// The client's TIME_WAIT sockets (after the connection test): each is a
/// connection the client closed first, and each one more port that
/// `connect` has to search past.
fn time_wait(lab: &Lab) -> anyhow::Result<usize> {
    let out = netns::output(
        lab.client
            .command("ss")
            .args(["-Htan", "state", "time-wait"]),
    )?;
    Ok(out.lines().count())
}

fn start_backend(lab: &mut Lab, i: usize, bins: &Bins) -> anyhow::Result<()> {
    let dir = lab.dir().join(format!("nginx-{i}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {0}/nginx.pid;\nerror_log {0}/error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{ access_log off; keepalive_timeout 0;\n\
             server {{ listen 80 reuseport backlog=4096; location / {{ return 200 \"be{1}\\n\"; }} }}\n\
             server {{ listen {2} reuseport backlog=4096; keepalive_timeout 60s; keepalive_requests 1000000; location / {{ return 200 \"be{1}\\n\"; }} }} }}\n",
            dir.display(),
            i + 1,
            KEEPALIVE_PORT
        ),
    )?;
    let ns = &lab.backends[i];
    let nginx = ns
        .command("nginx")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let iperf = ns
        .command("iperf3")
        .args(["-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    lab.adopt(Some(i), nginx);
    lab.adopt(Some(i), iperf);
    lab.start_backend_server(i, &bins.testsrv, &lab::testsrv_args(i, &[8000], &[]))
}

fn sysctl_forward(lab: &Lab) -> anyhow::Result<()> {
    netns::run(
        lab.gateway
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]),
    )
}

fn nft_rules() -> String {
    let (b1, b2) = (lab::backend_v4(0), lab::backend_v4(1));
    format!(
        "table ip bench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n\
         \x20   ip daddr {VIP_V4} tcp dport 80 dnat to numgen inc mod 2 map {{ 0 : {b1}, 1 : {b2} }}\n\
         \x20   ip daddr {VIP_V4} tcp dport {{ 5201, 8000 }} dnat to {b1}\n\
         \x20   ip daddr {VIP_V4} udp dport 5201 dnat to {b1}\n  }}\n}}\n"
    )
}

fn haproxy_cfg() -> String {
    let (b1, b2) = (lab::backend_v4(0), lab::backend_v4(1));
    format!(
        "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend web\n  bind {VIP_V4}:80\n  default_backend web\nbackend web\n  balance roundrobin\n  server be1 {b1}:80\n  server be2 {b2}:80\n\
         frontend iperf\n  bind {VIP_V4}:5201\n  default_backend iperf\nbackend iperf\n  server be1 {b1}:5201\n\
         frontend bytes\n  bind {VIP_V4}:8000\n  default_backend bytes\nbackend bytes\n  server be1 {b1}:8000\n"
    )
}

/// The back ends' nginx port that keeps connections open (the HTTP
/// scenarios' upstream).
const KEEPALIVE_PORT: u16 = 8080;

/// HAProxy as an HTTP proxy on the VIP: keep-alive both sides, idle server
/// connections shared between clients where safe, two threads (as fep's
/// HTTP mode has).
fn haproxy_http_cfg() -> String {
    let (b1, b2) = (lab::backend_v4(0), lab::backend_v4(1));
    format!(
        "global\n  maxconn 8000\n  nbthread 2\ndefaults\n  mode http\n  option http-keep-alive\n  http-reuse safe\n\
         \x20 timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n\
         frontend web\n  bind {VIP_V4}:80\n  default_backend web\nbackend web\n  balance roundrobin\n\
         \x20 server be1 {b1}:{KEEPALIVE_PORT}\n  server be2 {b2}:{KEEPALIVE_PORT}\n"
    )
}

/// nginx as a reverse proxy on the VIP with a pool of upstream keep-alive
/// connections (`keepalive 64`), two workers.
fn nginx_proxy_cfg(dir: &std::path::Path) -> String {
    let (b1, b2) = (lab::backend_v4(0), lab::backend_v4(1));
    format!(
        "daemon off;\nworker_processes 2;\npid {0}/nginx.pid;\nerror_log {0}/error.log;\n\
         events {{ worker_connections 8192; }}\n\
         http {{ access_log off; keepalive_timeout 60s; keepalive_requests 1000000;\n\
         upstream app {{ server {b1}:{KEEPALIVE_PORT}; server {b2}:{KEEPALIVE_PORT}; keepalive 64; keepalive_requests 1000000; }}\n\
         server {{ listen {VIP_V4}:80 backlog=4096; location / {{ proxy_pass http://app; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n",
        dir.display()
    )
}

/// fep's HTTP mode on the VIP over both back ends' keep-alive port.
fn fep_http_services() -> String {
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nmode = \"http\"\n\
         backend = [{{ node = \"be1\", ratio = 1, port = {KEEPALIVE_PORT} }}, {{ node = \"be2\", ratio = 1, port = {KEEPALIVE_PORT} }}]\n\n\
         [service.http]\npool_idle_timeout_ms = 30000\n"
    )
}

/// HTTP round robin over both back ends; iperf3 (TCP and UDP) and the bulk
/// transfer to back end 1, as in the other scenarios.
fn fep_services() -> String {
    let svc = |name: &str, port: u16, proto: &str, backends: &str| {
        format!("[[service]]\nname = \"{name}\"\nvip = \"{VIP_V4}\"\nport = {port}\nprotocol = \"{proto}\"\nbackend = [{backends}]\n\n")
    };
    let both = "{ node = \"be1\", ratio = 1 }, { node = \"be2\", ratio = 1 }";
    let one = "{ node = \"be1\", ratio = 1 }";
    svc("web", 80, "tcp", both)
        + &svc("iperf", 5201, "tcp", one)
        + &svc("iperf-udp", 5201, "udp", one)
        + &svc("bytes", 8000, "tcp", one)
}

fn wait_port(lab: &Lab, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = lab.client.enter(|| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} does not answer from the client");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Output of a command run in the client namespace.
fn client_output(lab: &Lab, program: &str, args: &[String]) -> anyhow::Result<String> {
    netns::output(lab.client.command(program).args(args))
}

fn iperf_tcp(lab: &Lab, target: IpAddr, secs: u64, streams: u32) -> anyhow::Result<f64> {
    let args = format!("-c {target} -p 5201 -t {secs} -P {streams} -J");
    let out = client_output(lab, "iperf3", &split(&args))?;
    let bps = json_number(&out, "sum_received", "bits_per_second")
        .context("iperf3 gave no sum_received")?;
    Ok(bps / 1e9)
}

/// A system-wide `perf record` for the length of one test.
struct Perf(Option<std::process::Child>);

impl Perf {
    /// Starts recording to `<prefix>-<test>.data`; nothing without a prefix.
    fn record(prefix: Option<&std::path::Path>, test: &str) -> anyhow::Result<Perf> {
        let Some(prefix) = prefix else {
            return Ok(Perf(None));
        };
        if let Some(dir) = prefix.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let out = format!("{}-{test}.data", prefix.display());
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-q", "-o", &out])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf (install linux-perf, or run without --profile)")?;
        // perf needs a moment before it samples.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Perf(Some(child)))
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// An iperf3 UDP run as the receiving server saw it.
struct Udp {
    sent: f64,
    lost: f64,
    received: f64,
    seconds: f64,
}

fn iperf_udp(lab: &Lab, target: IpAddr, secs: u64) -> anyhow::Result<Udp> {
    let args = format!("-c {target} -p 5201 -u -l 64 -b 0 -t {secs} -J");
    let out = client_output(lab, "iperf3", &split(&args))?;
    // The server-side view of the whole run: packets sent, and lost on the
    // way (missing sequence numbers).
    let sent = json_number(&out, "\"sum\"", "packets").context("iperf3 gave no packets")?;
    let lost = json_number(&out, "\"sum\"", "lost_packets").unwrap_or(0.0);
    let seconds = json_number(&out, "\"sum\"", "seconds").unwrap_or(secs as f64);
    Ok(Udp {
        sent,
        lost,
        received: sent - lost,
        seconds: seconds.max(1e-3),
    })
}

/// Datagrams a back end dropped because the receiving socket's buffer was
/// full (the receiver did not get the CPU in time).
fn rcvbuf_errors(ns: &netns::Netns) -> anyhow::Result<f64> {
    let out = netns::output(ns.command("nstat").args(["-az", "UdpRcvbufErrors"]))?;
    Ok(out
        .lines()
        .find_map(|l| l.strip_prefix("UdpRcvbufErrors"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0))
}

/// Requests per second over `conns` connections (each closed after one
/// request with `close`: then also new connections per second), p50 and p99
/// latency in ms.
fn wrk(
    lab: &Lab,
    url: &str,
    conns: u32,
    close: bool,
    secs: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut args = split(&format!("-t 2 -c {conns} -d {secs}s --latency"));
    if close {
        args.push("-H".into());
        args.push("Connection: close".into());
    }
    args.push(url.into());
    let out = client_output(lab, "wrk", &args)?;
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("wrk gave no Requests/sec")?;
    let pct = |p: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(str::trim))
            .and_then(duration_ms)
            .unwrap_or(f64::NAN)
    };
    Ok((rps, pct("50%"), pct("99%")))
}

/// "1.23ms" / "456.00us" / "1.02s" in milliseconds.
fn duration_ms(v: &str) -> Option<f64> {
    let (num, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * factor)
}

/// A 64 MB download through the dispatcher, compared byte for byte.
fn bulk_exact(lab: &Lab, target: IpAddr) -> anyhow::Result<bool> {
    lab.client.enter(|| {
        let mut offset = 0u64;
        let mut same = true;
        let mut want = vec![0u8; 64 * 1024];
        http::get_with(
            SocketAddr::new(target, 8000),
            &format!("/bytes/{BULK_BYTES}"),
            Duration::from_secs(30),
            |chunk| {
                pattern::fill(offset, &mut want[..chunk.len()]);
                same &= chunk == &want[..chunk.len()];
                offset += chunk.len() as u64;
                Ok(())
            },
        )?;
        Ok(same && offset == BULK_BYTES)
    })?
}

fn split(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// The number after `"key":` inside the first object named `section`.
fn json_number(json: &str, section: &str, key: &str) -> Option<f64> {
    let start = json.rfind(section)?;
    let rest = &json[start..];
    let at = rest.find(&format!("\"{key}\""))?;
    let value = rest[at + key.len() + 2..].trim_start_matches([':', ' ', '\t']);
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'))?;
    value[..end].parse().ok()
}

/// The whole system's CPU use over an interval (every namespace shares the
/// cores, so this is the cost of the scenario as a whole).
struct Cpu {
    start: Option<CpuTimes>,
}

impl Cpu {
    fn start() -> Self {
        Cpu {
            start: CpuTimes::read(),
        }
    }

    fn busy_percent(&self) -> Option<f64> {
        Some(CpuTimes::read()?.busy_percent_since(self.start.as_ref()?))
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

type Get = fn(&Figures) -> Option<f64>;

/// The report's rows: name, figure, and which way is better.
const METRICS: [(&str, Get, &str); 11] = [
    ("TCP bulk, 1 stream (Gbit/s)", |f| f.bulk1_gbps, "higher"),
    ("TCP bulk, 4 streams (Gbit/s)", |f| f.bulk4_gbps, "higher"),
    (
        "new connections/s, 64 connections (1 request each)",
        |f| f.conn_per_s,
        "higher",
    ),
    (
        "new connections/s, 32 connections",
        |f| f.conn32_per_s,
        "higher",
    ),
    ("latency p50, 64 connections (ms)", |f| f.p50_ms, "lower"),
    ("latency p99, 64 connections (ms)", |f| f.p99_ms, "lower"),
    (
        "client TIME_WAIT sockets after it",
        |f| f.client_time_wait,
        "lower",
    ),
    ("UDP 64 B packets/s received", |f| f.udp_pps, "higher"),
    ("UDP datagrams lost (%)", |f| f.udp_lost_pct, "lower"),
    (
        "… dropped by the back end's full socket buffer (%)",
        |f| f.udp_rcvbuf_pct,
        "lower",
    ),
    (
        "system CPU during 1-stream bulk (%)",
        |f| f.cpu_pct,
        "lower",
    ),
];

/// The HTTP table's rows.
const HTTP_METRICS: [(&str, Get, &str); 6] = [
    (
        "keep-alive requests/s (64 connections)",
        |f| f.keepalive_rps,
        "higher",
    ),
    (
        "keep-alive latency p50 (ms)",
        |f| f.keepalive_p50_ms,
        "lower",
    ),
    (
        "keep-alive latency p99 (ms)",
        |f| f.keepalive_p99_ms,
        "lower",
    ),
    (
        "new-client requests/s (1 request per connection)",
        |f| f.new_client_rps,
        "higher",
    ),
    (
        "new-client latency p50 (ms)",
        |f| f.new_client_p50_ms,
        "lower",
    ),
    (
        "new-client latency p99 (ms)",
        |f| f.new_client_p99_ms,
        "lower",
    ),
];

/// The in-flight row's label names dnsperf's limit.
const _: () = assert!(dns::OUTSTANDING == 200);

/// The DNS table's rows.
const DNS_METRICS: [(&str, Get, &str); 6] = [
    ("queries/s", |f| f.dns_qps, "higher"),
    ("queries lost (per million)", |f| f.dns_lost_ppm, "lower"),
    (
        "… dropped by the server's full socket buffer (per million)",
        |f| f.dns_rcvbuf_ppm,
        "lower",
    ),
    ("average latency (ms)", |f| f.dns_latency_ms, "lower"),
    (
        "queries in flight (queries/s × latency; dnsperf allows 200)",
        |f| f.dns_in_flight,
        "–",
    ),
    (
        "NXDOMAIN answers (%, the same mix: 10)",
        |f| f.dns_nxdomain_pct,
        "same",
    ),
];

fn report(results: &[(Scenario, Vec<Figures>)], args: &Args, bins: &Bins) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `fep-bench{}` on {} ({} cores, kernel {}), {} run(s) of {} s per measurement, medians; \
         every scenario on a fresh namespace topology (client, gateway, two back ends, one veth each), interleaved.\n",
        if args.smoke { " --smoke" } else { "" },
        today(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        args.runs,
        args.seconds
    );
    let _ = writeln!(
        out,
        "fep binary: `{}`{}. Targets, where the time goes and what would close the gaps: `PERFORMANCE.md`.\n",
        bins.fep.display(),
        if args.fep_keys.is_empty() {
            String::new()
        } else {
            format!(", with `{}`", args.fep_keys)
        }
    );
    if results.iter().any(|(s, _)| PACKET_SCENARIOS.contains(s)) {
        packet_report(&mut out, results, args);
    }
    if results.iter().any(|(s, _)| s.is_http()) {
        http_report(&mut out, results, args);
    }
    if results.iter().any(|(s, _)| s.is_dns()) {
        dns_report(&mut out, results, args);
    }
    out
}

/// The packet-path section: its table, the byte-exact check, the commands
/// and every peer's config.
fn packet_report(out: &mut String, results: &[(Scenario, Vec<Figures>)], args: &Args) {
    out.push_str(&table(
        results,
        &PACKET_SCENARIOS,
        &METRICS,
        &[Scenario::Fep, Scenario::FepFast],
    ));
    let exact = results
        .iter()
        .all(|(_, fs)| fs.iter().all(|f| f.bytes_exact != Some(false)));
    let _ = writeln!(
        out,
        "\nByte-exact 64 MB transfer through every scenario: {}.\n",
        if exact { "yes" } else { "NO" }
    );
    let _ = writeln!(
        out,
        "Commands (from the client namespace, TARGET = the back end for `route`, the VIP otherwise):\n\n\
         ```\niperf3 -c TARGET -p 5201 -t {s} -P 1 -J\niperf3 -c TARGET -p 5201 -t {s} -P 4 -J\n\
         wrk -t 2 -c 64 -d {s}s --latency -H 'Connection: close' http://TARGET/\n\
         wrk -t 2 -c 32 -d {s}s --latency -H 'Connection: close' http://TARGET/\n\
         iperf3 -c TARGET -p 5201 -u -l 64 -b 0 -t {s} -J\nGET http://TARGET:8000/bytes/{BULK_BYTES} (compared with the pattern)\n```\n\n\
         nftables rules:\n\n```\n{}```\n\nHAProxy config:\n\n```\n{}```\n\nfep services (`fep-fast`: the same, with `fast_path = \"tc-bpf\"`):\n\n```toml\n{}```\n",
        nft_rules(),
        haproxy_cfg(),
        fep_services(),
        s = args.seconds
    );
}

/// The HTTP keep-alive section.
fn http_report(out: &mut String, results: &[(Scenario, Vec<Figures>)], args: &Args) {
    let _ = writeln!(
        out,
        "## HTTP keep-alive\n\nThe back ends' nginx keeps client connections open on port {KEEPALIVE_PORT}; each proxy \
         listens on the VIP's port 80 with two threads or workers.\n"
    );
    out.push_str(&table(
        results,
        &HTTP_SCENARIOS,
        &HTTP_METRICS,
        &[Scenario::HttpFep],
    ));
    let dir = std::path::Path::new("/tmp/nginx-gw");
    let _ = writeln!(
        out,
        "\nCommands (from the client namespace):\n\n```\nwrk -t 2 -c 64 -d {s}s --latency http://{VIP_V4}/\n\
         wrk -t 2 -c 32 -d {s}s --latency -H 'Connection: close' http://{VIP_V4}/\n```\n\n\
         HAProxy config:\n\n```\n{}```\n\nnginx config (gateway):\n\n```\n{}```\n\nfep services:\n\n```toml\n{}```\n",
        haproxy_http_cfg(),
        nginx_proxy_cfg(dir),
        fep_http_services(),
        s = args.seconds
    );
}

/// The DNS section: queries per second of fep's DNS server and gdnsd.
fn dns_report(out: &mut String, results: &[(Scenario, Vec<Figures>)], args: &Args) {
    let _ = writeln!(
        out,
        "## DNS\n\nAn authoritative server for `{zone}` on {server}:53 in the gateway namespace (a topology of a client, \
         a gateway and one back end, fresh for each measurement), one server at a time, gdnsd with two UDP threads, fep with one per core it may run on; dnsperf in the \
         client namespace with the same load for both{pin}. Queries: {mix}.\n",
        zone = dns::ZONE,
        server = dns::SERVER,
        mix = dns::query_mix(),
        pin = match dns::cpu_split() {
            (Some(client), Some(server)) => format!(
                "; dnsperf on CPU {client} and the server on CPU {server} (`taskset`), so neither takes the other's core"
            ),
            _ => String::new(),
        }
    );
    out.push_str(&table(
        results,
        &DNS_SCENARIOS,
        &DNS_METRICS,
        &[Scenario::DnsFep],
    ));
    let dir = std::path::Path::new("/tmp/gdnsd");
    let _ = writeln!(
        out,
        "\nCommand (from the client namespace):\n\n```\ndnsperf {}\n```\n\n\
         gdnsd {} (`gdnsd -c DIR start`, in the foreground), `DIR/config`:\n\n```\n{}```\n\n\
         `DIR/zones/{}`:\n\n```\n{}```\n\n\
         fep's service and `[sites]` table (with fep's usual top-level keys and node be1):\n\n```toml\n{}\n{}```\n",
        dns::dnsperf_args("queries.txt", args.seconds),
        program_version("gdnsd", "-V"),
        dns::gdnsd_config(dir),
        dns::ZONE,
        dns::gdnsd_zone(),
        dns::fep_service(),
        dns::fep_sites(std::path::Path::new("/tmp/sites.key")),
    );
}

/// The version line a program prints (e.g. `gdnsd version 3.8.1`), for the report.
fn program_version(program: &str, flag: &str) -> String {
    let out = Command::new(program)
        .arg(flag)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default();
    out.lines()
        .find_map(|l| l.split("version ").nth(1))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// A figures' table: each of `columns`' medians, then `fep`'s ratio to each
/// of the others (its peers in the same run).
fn table(
    results: &[(Scenario, Vec<Figures>)],
    columns: &[Scenario],
    metrics: &[(&str, Get, &str)],
    feps: &[Scenario],
) -> String {
    let med = |s: Scenario, get: Get| {
        results
            .iter()
            .find(|(x, _)| *x == s)
            .and_then(|(_, fs)| median(fs.iter().filter_map(get).collect()))
    };
    let peers: Vec<Scenario> = columns
        .iter()
        .copied()
        .filter(|&c| !feps.contains(&c) && c != Scenario::Route)
        .collect();
    let pairs: Vec<(Scenario, Scenario)> = feps
        .iter()
        .flat_map(|&f| peers.iter().map(move |&p| (f, p)))
        .collect();
    let mut out = String::new();
    let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
    let ratios: Vec<String> = pairs
        .iter()
        .map(|(f, p)| format!("{} ÷ {}", f.name(), p.name()))
        .collect();
    let _ = writeln!(
        out,
        "| metric | better | {} | {} |",
        names.join(" | "),
        ratios.join(" | ")
    );
    let _ = writeln!(
        out,
        "|---|---|{}",
        "---|".repeat(columns.len() + pairs.len())
    );
    for &(name, get, better) in metrics {
        let cells: Vec<String> = columns
            .iter()
            .map(|&s| med(s, get).map_or("n/a".to_string(), |v| format!("{v:.2}")))
            .collect();
        let ratios: Vec<String> = pairs
            .iter()
            .map(|&(fep, peer)| match (med(fep, get), med(peer, get)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "n/a".into(),
            })
            .collect();
        let _ = writeln!(
            out,
            "| {name} | {better} | {} | {} |",
            cells.join(" | "),
            ratios.join(" | ")
        );
    }
    out
}

fn today() -> String {
    netns::output(Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC"))
        .unwrap_or_default()
        .trim()
        .to_string()
}
