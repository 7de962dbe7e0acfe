//! The DNS scenarios: fep's authoritative DNS server (`[sites.dns]`)
//! against gdnsd, one at a time on the same address of the same namespace,
//! with the same zone, loaded by dnsperf from the client namespace.
//!
//! The topology is the lab with one back end: the client (10.0.1.2), the
//! gateway (10.0.1.1), where the server under test listens on port 53, and
//! be1 with fep-testsrv on port 80. fep serves the name's VIP (port 80, a
//! TCP service to be1: a site must serve the VIPs it lists) and its site
//! check connects to be1 directly (`check_address`), so that it finds its
//! site up (it answers the VIP only then); gdnsd's scenario has the same
//! idle back end.
//!
//! On a machine with two or more cores, dnsperf runs on the first half of
//! them and the server on the rest ([`cpu_split`]): the figure is what the
//! server answers on its cores, not a share of CPU it won from the load
//! generator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fep_tools::lab::{self, Lab, VIP_V4};
use fep_tools::netns;

use super::{Bins, Figures, Perf, Scenario};

/// The zone both servers are authoritative for, and its one name.
pub const ZONE: &str = "example.test";
pub const NAME: &str = "www.example.test";
/// The name's TTL, and the SOA's (and negative answers').
const TTL: u32 = 60;
/// Where the server under test answers (the gateway's client-side address).
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// dnsperf's load: simulated clients (sockets), threads, the most
/// queries in flight, the rate cap (far above either server), and the
/// time after which a query counts as lost.
pub const CLIENTS: u32 = 8;
pub const THREADS: u32 = 2;
pub const OUTSTANDING: u32 = 200;
pub const MAX_QPS: u32 = 1_000_000;
const TIMEOUT_S: u32 = 1;
/// Lines of the query file (dnsperf cycles through them).
const QUERY_LINES: usize = 100;

/// The query file: 80 % `www A`, 10 % `www AAAA` (the name has no IPv6
/// address: NODATA), 10 % names that do not exist (NXDOMAIN), interleaved.
pub fn queries() -> String {
    let mut s = String::new();
    for i in 0..QUERY_LINES {
        match i % 10 {
            4 => s.push_str(&format!("{NAME} AAAA\n")),
            9 => s.push_str(&format!("host{i}.{ZONE} A\n")),
            _ => s.push_str(&format!("{NAME} A\n")),
        }
    }
    s
}

/// The mix as the report describes it.
pub fn query_mix() -> String {
    format!(
        "{QUERY_LINES} lines cycled: 80 % `{NAME} A` (answered {VIP_V4}, AA, TTL {TTL}), \
         10 % `{NAME} AAAA` (NODATA) and 10 % `hostN.{ZONE} A`, names that do not exist (NXDOMAIN)"
    )
}

/// dnsperf's arguments against the server under test (`file` the queries).
pub fn dnsperf_args(file: &str, secs: u64) -> String {
    format!(
        "-s {SERVER} -p 53 -d {file} -l {secs} -c {CLIENTS} -T {THREADS} -q {OUTSTANDING} -Q {MAX_QPS} -t {TIMEOUT_S}"
    )
}

/// gdnsd's `config`: the same address, two UDP threads (fep takes one per
/// core it may run on; under the CPU split, one), run and
/// state directories inside `dir` (no systemd, nothing under /run).
pub fn gdnsd_config(dir: &Path) -> String {
    format!(
        "options => {{\n  listen => [ {SERVER}:53 ]\n  udp_threads => 2\n  tcp_threads => 1\n\
         \x20 run_dir => {0}/run\n  state_dir => {0}/state\n}}\n",
        dir.display()
    )
}

/// gdnsd's `zones/example.test`: the records fep answers from its config.
pub fn gdnsd_zone() -> String {
    format!(
        "$TTL 3600\n@ {TTL} SOA ns1 hostmaster 1 3600 600 86400 {TTL}\n@ NS ns1\nwww {TTL} A {VIP_V4}\n"
    )
}

/// fep's `[sites]` table: one site, DNS on the same address as gdnsd's.
pub fn fep_sites(key_file: &Path) -> String {
    format!(
        "[sites]\nme = \"a\"\nkey_file = \"{}\"\nlisten = \"{SERVER}:7400\"\n\n\
         [sites.dns]\nlisten = [\"{SERVER}:53\"]\nzone = \"{ZONE}\"\nns = [\"ns1.{ZONE}\"]\n\n\
         [[sites.site]]\nname = \"a\"\nexchange = \"{SERVER}:7400\"\n\n\
         [[sites.name]]\nname = \"{NAME}\"\nport = 80\nttl_s = {TTL}\n\
         [[sites.name.at]]\nsite = \"a\"\nvips = [\"{VIP_V4}\"]\ncheck_address = \"{}\"\n",
        key_file.display(),
        lab::backend_v4(0)
    )
}

/// fep's service for the name's VIP (the site's VIPs must be served here).
pub fn fep_service() -> String {
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
         backend = [{{ node = \"be1\", ratio = 1 }}]\n"
    )
}

/// A DNS scenario on a fresh topology: the server, a check that it answers
/// the name with the VIP, then dnsperf.
pub fn measure(
    s: Scenario,
    bins: &Bins,
    secs: u64,
    profile: Option<&Path>,
) -> anyhow::Result<Figures> {
    let mut lab = Lab::new("fd", 1)?;
    lab.start_backend_server(0, &bins.testsrv, &lab::testsrv_args(0, &[80], &[]))?;
    let file = lab.dir().join("queries.txt");
    std::fs::write(&file, queries())?;
    let (log, pid, fep) = match s {
        Scenario::DnsGdnsd => {
            let (log, pid) = start_gdnsd(&mut lab)?;
            (log, pid, None)
        }
        Scenario::DnsFep => {
            let key = lab.dir().join("sites.key");
            std::fs::write(&key, random_hex(32)?)?;
            let config = lab.config(
                false,
                "health_check_interval_ms = 0\n",
                &format!("{}\n{}", fep_service(), fep_sites(&key)),
            );
            let fep = lab.start_fep(&bins.fep, &config)?;
            let pid = fep.pid().context("fep stopped")?;
            (lab.dir().join("fep.log"), pid, Some(fep))
        }
        _ => bail!("{} is not a DNS scenario", s.name()),
    };
    wait_answer(&lab).with_context(|| {
        format!(
            "{}'s log:\n{}",
            s.name(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    let (client_cpus, server_cpus) = cpu_split();
    if let Some(cpus) = &server_cpus {
        // Every thread the server has (it answers: all are running); any
        // it starts later inherits it.
        netns::run(
            std::process::Command::new("taskset")
                .args(["-a", "-c", "-p", cpus])
                .arg(pid.to_string())
                .stdout(Stdio::null()),
        )
        .context("pinning the server's threads")?;
    }
    let mut dnsperf = match &client_cpus {
        Some(cpus) => {
            let mut c = lab.client.command("taskset");
            c.args(["-c", cpus, "dnsperf"]);
            c
        }
        None => lab.client.command("dnsperf"),
    };
    dnsperf.args(super::split(&dnsperf_args(&file.to_string_lossy(), secs)));
    let p = Perf::record(profile, "dns")?;
    let out = netns::output(&mut dnsperf)?;
    drop(p);
    let overflowed = super::rcvbuf_errors(&lab.gateway)?;
    drop(fep);
    let perf = parse_dnsperf(&out).with_context(|| format!("dnsperf said:\n{out}"))?;
    Ok(Figures {
        dns_qps: Some(perf.qps),
        dns_lost_ppm: Some(1e6 * perf.lost / perf.sent.max(1.0)),
        dns_rcvbuf_ppm: Some(1e6 * overflowed / perf.sent.max(1.0)),
        dns_latency_ms: Some(perf.latency_s * 1e3),
        // Little's law: fewer than dnsperf allows means dnsperf, not the
        // server, set the pace.
        dns_in_flight: Some(perf.qps * perf.latency_s),
        dns_nxdomain_pct: Some(100.0 * perf.nxdomain / perf.completed.max(1.0)),
        ..Figures::default()
    })
}

/// The CPUs for dnsperf and for the server under test (`taskset` lists):
/// the first half of the CPUs this process may use and the rest, so that
/// the load generator never takes the server's CPU (or the server the load
/// generator's); nothing with fewer than two.
pub fn cpu_split() -> (Option<String>, Option<String>) {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        return (None, None);
    }
    let list = |cpus: &[usize]| {
        cpus.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let (client, server) = cpus.split_at(cpus.len() / 2);
    (Some(list(client)), Some(list(server)))
}

/// The CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity(2) fills the set this function owns, of the size given.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set within CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Starts gdnsd in the foreground on the gateway (killed with the lab);
/// returns its log's path and its process id.
fn start_gdnsd(lab: &mut Lab) -> anyhow::Result<(PathBuf, u32)> {
    let dir = lab.dir().join("gdnsd");
    std::fs::create_dir_all(dir.join("zones"))?;
    std::fs::write(dir.join("config"), gdnsd_config(&dir))?;
    std::fs::write(dir.join("zones").join(ZONE), gdnsd_zone())?;
    let log = lab.dir().join("gdnsd.log");
    let child = lab
        .gateway
        .command("gdnsd")
        .arg("-c")
        .arg(&dir)
        .arg("start")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting gdnsd")?;
    // `ip netns exec` execs gdnsd: the child is gdnsd itself.
    let pid = child.id();
    lab.adopt(None, child);
    Ok((log, pid))
}

/// `n` random bytes as hex (the sites' shared key).
fn random_hex(n: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Asks `www A` from the client until the server answers it with the VIP,
/// authoritatively (fep does once its health check found the site up).
fn wait_answer(lab: &Lab) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let last = match lab
            .client
            .enter(|| ask_a(SocketAddr::new(SERVER.into(), 53)))?
        {
            Ok(addrs) if addrs.contains(&IpAddr::V4(VIP_V4)) => return Ok(()),
            Ok(addrs) => format!("answered {addrs:?}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{SERVER}:53 does not answer {NAME} A with {VIP_V4} within 15 s ({last})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One `NAME A` query over UDP: the A records of an authoritative NOERROR
/// answer.
fn ask_a(server: SocketAddr) -> anyhow::Result<Vec<IpAddr>> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let id: u16 = 0x4242;
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in NAME.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send_to(&q, server)?;
    let mut buf = [0u8; 1500];
    let (len, _) = socket.recv_from(&mut buf).context("no reply")?;
    let r = &buf[..len];
    if len < 12 || r[..2] != id.to_be_bytes() || r[2] & 0x80 == 0 {
        bail!("not a reply to the query");
    }
    if r[2] & 0x04 == 0 || r[3] & 0x0f != 0 {
        bail!(
            "not an authoritative NOERROR (flags {:#04x}{:02x})",
            r[2],
            r[3]
        );
    }
    let answers = u16::from_be_bytes([r[6], r[7]]);
    // The answers follow the question, which is the query's.
    let mut at = q.len();
    let mut addrs = Vec::new();
    for _ in 0..answers {
        at = skip_name(r, at).context("a truncated answer")?;
        let fixed = r.get(at..at + 10).context("a truncated answer")?;
        let (rtype, rdlen) = (
            u16::from_be_bytes([fixed[0], fixed[1]]),
            usize::from(u16::from_be_bytes([fixed[8], fixed[9]])),
        );
        let data = r
            .get(at + 10..at + 10 + rdlen)
            .context("a truncated answer")?;
        if rtype == 1 && rdlen == 4 {
            addrs.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            )));
        }
        at += 10 + rdlen;
    }
    Ok(addrs)
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(r: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *r.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

/// dnsperf's statistics.
#[derive(Debug, PartialEq)]
pub struct DnsPerf {
    pub sent: f64,
    pub completed: f64,
    pub lost: f64,
    pub nxdomain: f64,
    pub qps: f64,
    pub latency_s: f64,
}

/// Parses dnsperf's "Statistics:" block; fails on response codes other
/// than NOERROR and NXDOMAIN (a server that answers wrongly is not
/// measured).
pub fn parse_dnsperf(out: &str) -> anyhow::Result<DnsPerf> {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no '{name}'"))
    };
    let first = |name: &str| -> anyhow::Result<f64> {
        let v = field(name)?;
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("'{name} {v}' is not a number"))
    };
    let codes = field("Response codes:")?;
    let mut nxdomain = 0.0;
    for code in codes.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let mut parts = code.split_whitespace();
        match (
            parts.next(),
            parts.next().and_then(|n| n.parse::<f64>().ok()),
        ) {
            (Some("NOERROR"), Some(_)) => {}
            (Some("NXDOMAIN"), Some(n)) => nxdomain = n,
            _ => bail!("unexpected answers: {codes}"),
        }
    }
    Ok(DnsPerf {
        sent: first("Queries sent:")?,
        completed: first("Queries completed:")?,
        lost: first("Queries lost:")?,
        nxdomain,
        qps: first("Queries per second:")?,
        latency_s: first("Average Latency (s):")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dnsperf_statistics() {
        let out = "Statistics:\n\n  Queries sent:         98005\n  Queries completed:    98005 (100.00%)\n  \
                   Queries lost:         0 (0.00%)\n\n  Response codes:       NOERROR 65337 (66.67%), NXDOMAIN 32668 (33.33%)\n  \
                   Average packet size:  request 34, response 73\n  Run time (s):         2.004670\n  \
                   Queries per second:   48888.345713\n\n  Average Latency (s):  0.001167 (min 0.000014, max 0.103018)\n";
        let p = parse_dnsperf(out).unwrap();
        assert_eq!(p.sent, 98005.0);
        assert_eq!(p.completed, 98005.0);
        assert_eq!(p.lost, 0.0);
        assert_eq!(p.nxdomain, 32668.0);
        assert_eq!(p.qps, 48888.345713);
        assert_eq!(p.latency_s, 0.001167);
        let refused = out.replace("NXDOMAIN 32668", "REFUSED 32668");
        assert!(parse_dnsperf(&refused).is_err());
    }

    #[test]
    fn the_query_mix() {
        let q = queries();
        let lines: Vec<&str> = q.lines().collect();
        assert_eq!(lines.len(), QUERY_LINES);
        assert_eq!(
            lines.iter().filter(|l| **l == "www.example.test A").count(),
            80
        );
        assert_eq!(lines.iter().filter(|l| l.ends_with(" AAAA")).count(), 10);
        assert_eq!(lines.iter().filter(|l| l.starts_with("host")).count(), 10);
    }
}
