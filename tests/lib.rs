//! Shared pieces of the integration tests: a lab with fep and the back-end
//! servers running, and the rule for machines without root (fail, or skip
//! when asked to).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use fep_shared::api::{
    BackendView, Count, CountersView, NodeView, RouteView, ServiceView, StatusView,
};
use fep_shared::protocol::{self, AgentMsg, FepMsg, Message, Report, ServiceLoad, Session};
use fep_tools::lab::VIP_V4;
use fep_tools::lab::{self, FepProcess, Lab};
use fep_tools::netns::{self, Netns};

pub use fep_tools::{http, pattern};

/// Defines each test twice: `NAME::tun_path`, every packet through the TUN
/// device, and `NAME::fast_path`, with the labs' configs turning the kernel
/// fast path on (starting fep then fails unless the fast path runs).
#[macro_export]
macro_rules! both_paths {
    ($($(#[$meta:meta])* fn $name:ident() $body:block)*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body() $body

            #[test]
            fn tun_path() {
                body()
            }

            #[test]
            fn fast_path() {
                fep_tools::lab::with_fast_path(body)
            }
        }
    )*};
}

/// Asserts that a table in fepctl's `text` lines up: the first line holding
/// every header starts the table, which runs while lines keep the header's
/// indentation, to the next blank line; in each
/// of its rows a `left` column's cell starts where its header starts and a
/// `right` column's cell ends where its header ends.
pub fn assert_aligned(text: &str, left: &[&str], right: &[&str]) {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| left.iter().chain(right).all(|h| l.contains(h)))
        .unwrap_or_else(|| panic!("no header line with {left:?} {right:?}:\n{text}"));
    let header = lines[at];
    let byte = |l: &str, i: usize| l.as_bytes().get(i).copied().unwrap_or(b' ');
    let indent = header.len() - header.trim_start().len();
    let rows: Vec<&str> = lines[at + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty() && l.len() - l.trim_start().len() == indent)
        .copied()
        .collect();
    assert!(!rows.is_empty(), "a table with no rows:\n{text}");
    for row in rows {
        for h in left {
            let i = header.find(h).unwrap();
            assert!(
                byte(row, i) != b' ' && (i == 0 || byte(row, i - 1) == b' '),
                "column {h} does not start at {i}:\n{header}\n{row}"
            );
        }
        for h in right {
            let end = header.find(h).unwrap() + h.len();
            assert!(
                byte(row, end - 1) != b' ' && byte(row, end) == b' ' || row.len() == end,
                "column {h} does not end at {end}:\n{header}\n{row}"
            );
        }
    }
}

/// Per-request timeout: generous, since debug builds and 2 shared cores are slow.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The variable that lets a run skip the network-namespace tests.
pub const SKIP_VAR: &str = "FEP_SKIP_NETNS";

/// Network-namespace tests this test binary skipped.
static SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// True when `test`, a network-namespace test, is to be skipped: only when
/// `FEP_SKIP_NETNS=1` asks for it. Otherwise a test that cannot run here
/// (it needs root for namespaces, veths and the TUN device) fails, so that a
/// run that tested nothing never looks like a pass. A skipped test still
/// counts as passed in cargo's summary (a test cannot ignore itself at run
/// time), so each skip is written to the terminal past the output capture,
/// and the binary ends with the number skipped.
pub fn skip_without_root(test: &str) -> bool {
    if std::env::var_os(SKIP_VAR).is_some_and(|v| v == "1") {
        note_skipped(test);
        return true;
    }
    assert!(
        netns::is_root(),
        "{test} needs root (network namespaces, veth and TUN): run `cargo test` as root, \
         or set {SKIP_VAR}=1 to skip the network-namespace tests"
    );
    false
}

/// Says on stderr, uncaptured, that `test` was skipped; the first skip
/// arranges the count at the binary's exit.
fn note_skipped(test: &str) {
    extern "C" fn report() {
        let n = SKIPPED.load(std::sync::atomic::Ordering::Relaxed);
        let _ = writeln!(
            std::io::stderr(),
            "{n} network-namespace test(s) SKIPPED ({SKIP_VAR}=1): counted as passed above, \
             they tested nothing"
        );
    }
    if SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
        // SAFETY: `report` is a plain function that only reads an atomic
        // and writes to stderr.
        unsafe { libc::atexit(report) };
    }
    // io::stderr() is not captured by the test harness (eprintln! is).
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: not run ({SKIP_VAR}=1)");
}

/// A lab with `backends` back ends serving HTTP on `tcp` and answering on
/// `udp`, and fep running `services` (TOML `[[service]]` tables).
pub struct Running {
    pub lab: Lab,
    pub fep: FepProcess,
}

impl Running {
    /// Starts fep in `lab` with the lab's IPv4 config plus `top` keys and
    /// `services`.
    pub fn start(lab: Lab, top: &str, services: &str) -> Running {
        let fep = lab
            .start_fep(
                &lab::workspace_bin("fep").unwrap(),
                &lab.config(false, top, services),
            )
            .expect("starting fep");
        Running { lab, fep }
    }

    /// Stops fep (cleanly) and starts it again on the same config file.
    pub fn restart(&mut self) {
        assert!(self.fep.stop().unwrap().success(), "fep stopped cleanly");
        let config = std::fs::read_to_string(self.lab.dir().join("fep.toml")).unwrap();
        self.fep = self
            .lab
            .start_fep(&lab::workspace_bin("fep").unwrap(), &config)
            .expect("starting fep again");
    }
}

/// Asserts that nothing of fep's set-up is left in `gw` (after a clean-up):
/// no device, no rule to the policy table, an empty table, no VIP route.
pub fn assert_nothing_left(gw: &fep_tools::netns::Netns) {
    assert!(
        gw.ip_output(&["link", "show", "fep0"]).is_err(),
        "TUN device left behind"
    );
    assert!(
        !gw.ip_output(&["rule"]).unwrap().contains("lookup 100"),
        "policy rules left behind"
    );
    assert!(gw
        .ip_output(&["route", "show", "table", "100"])
        .unwrap()
        .trim()
        .is_empty());
    assert!(!gw.ip_output(&["route"]).unwrap().contains("10.0.0.100"));
}

pub fn start(
    tag: &str,
    backends: usize,
    v6: bool,
    tcp: &[u16],
    udp: &[u16],
    services: &str,
) -> Running {
    start_with_top(tag, backends, v6, tcp, udp, "", services)
}

/// As [`start`], with `top` adding or overriding top-level config keys.
pub fn start_with_top(
    tag: &str,
    backends: usize,
    v6: bool,
    tcp: &[u16],
    udp: &[u16],
    top: &str,
    services: &str,
) -> Running {
    let mut lab = Lab::new(tag, backends).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    lab.start_backend_servers(&testsrv, tcp, udp)
        .expect("starting back-end servers");
    let fep_bin = lab::workspace_bin("fep").unwrap();
    let fep = lab
        .start_fep(&fep_bin, &lab.config(v6, top, services))
        .expect("starting fep");
    Running { lab, fep }
}

/// The TUN I/O mode fep's workers should run in here: batched, unless the
/// kernel has io_uring turned off (`kernel.io_uring_disabled`), when fep
/// falls back to blocking I/O.
pub fn expected_io() -> &'static str {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) if v.trim() != "0" => "blocking",
        _ => "batched",
    }
}

/// Counts how many of `names` are each back end's name, in back-end order.
pub fn tally(names: &[String], backends: usize) -> Vec<usize> {
    (0..backends)
        .map(|i| names.iter().filter(|n| **n == lab::backend_name(i)).count())
        .collect()
}

/// A lab whose back ends run `fep-testsrv` (HTTP on 80, echo on 7000) and
/// `bep-agent`, and fep with the agent server and fast control-loop timings
/// (`top` adds or overrides top-level keys).
pub fn start_with_agents(tag: &str, backends: usize, top: &str, services: &str) -> Running {
    start_with_agents_after(tag, backends, top, services, |_| {})
}

/// As [`start_with_agents`], with `prepare` run on the lab before fep
/// starts (e.g. to write a route snapshot into its state directory).
pub fn start_with_agents_after(
    tag: &str,
    backends: usize,
    top: &str,
    services: &str,
    prepare: impl FnOnce(&Lab),
) -> Running {
    let mut r = start_for_agents(tag, backends, top, services, prepare);
    let agent = lab::workspace_bin("bep-agent").unwrap();
    for i in 0..backends {
        r.lab
            .start_agent(i, &agent, &[80, 7000], 200, "")
            .expect("starting agents");
    }
    wait_for_agents(&r);
    r
}

/// Waits until every node's agent is connected and has reported.
pub fn wait_for_agents(r: &Running) {
    wait_for(r, "every agent connected", Duration::from_secs(10), |r| {
        nodes(r)
            .iter()
            .all(|n| n.agent_connected && n.report_age_ms.is_some())
    });
}

/// Runs `fep --config <lab's> --cleanup` in the gateway (what an operator
/// runs to decommission it): removes what a stopped fep leaves in place.
pub fn cleanup(r: &Running) -> std::process::Output {
    r.lab
        .gateway
        .command(lab::workspace_bin("fep").unwrap())
        .arg("--config")
        .arg(r.lab.dir().join("fep.toml"))
        .arg("--cleanup")
        .output()
        .expect("running fep --cleanup")
}

/// The lab of [`start_with_agents_after`] before any agent starts (a test
/// may play the agent itself): back-end servers, the agent key, and fep.
pub fn start_for_agents(
    tag: &str,
    backends: usize,
    top: &str,
    services: &str,
    prepare: impl FnOnce(&Lab),
) -> Running {
    start_for_agents_edited(tag, backends, top, services, prepare, |c| c)
}

/// As [`start_for_agents`], with fep's config text passed through `edit`
/// (e.g. to give a `[[node]]` a key of its own).
pub fn start_for_agents_edited(
    tag: &str,
    backends: usize,
    top: &str,
    services: &str,
    prepare: impl FnOnce(&Lab),
    edit: impl FnOnce(String) -> String,
) -> Running {
    let mut lab = Lab::new(tag, backends).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    for i in 0..backends {
        let mut args = lab::testsrv_args(i, &[80], &[]);
        args.extend(["--echo".to_string(), "7000".to_string()]);
        lab.start_backend_server(i, &testsrv, &args)
            .expect("starting back-end servers");
    }
    let key = lab
        .agent_key(&lab::workspace_bin("bep-agent").unwrap())
        .unwrap();
    let top = format!(
        "agent_listen = \"10.0.2.1:9441\"\nagent_key_file = \"{}\"\nprune_interval_ms = 300\n\
         health_check_interval_ms = 300\nhealth_check_fails = 2\n{top}",
        key.display()
    );
    prepare(&lab);
    let fep = lab
        .start_fep(
            &lab::workspace_bin("fep").unwrap(),
            &edit(lab.config(false, &top, services)),
        )
        .expect("starting fep");
    Running { lab, fep }
}

/// Writes `state_dir/routes.bin` (format in fep's `control/snapshot.rs`)
/// with `n` established routes of `service`, route `i` on back end
/// `backends[i % len]` (0 = be1), from clients in 198.18.0.0/15 that send
/// nothing: no host has their connections, and they stay until the idle
/// timeout or a prune.
pub fn write_route_snapshot(
    state_dir: &std::path::Path,
    service: &str,
    backends: &[usize],
    n: u32,
) {
    let nodes: Vec<String> = (0..=*backends.iter().max().unwrap())
        .map(lab::backend_name)
        .collect();
    let mut out = b"FEPR\x01".to_vec();
    let names: [Vec<&str>; 2] = [vec![service], nodes.iter().map(String::as_str).collect()];
    for names in names {
        out.extend_from_slice(&(names.len() as u16).to_be_bytes());
        for name in names {
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
    }
    out.extend_from_slice(&n.to_be_bytes());
    let established = 0x08 | 0x10; // REPLIED | ESTABLISHED
    for i in 0..n {
        let client = std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i / 50_000,
        );
        let backend = backends[i as usize % backends.len()];
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&(backend as u16).to_be_bytes());
        out.extend_from_slice(&client.to_ipv6_mapped().octets());
        out.extend_from_slice(&(10_000 + (i % 50_000) as u16).to_be_bytes());
        out.push(established);
    }
    std::fs::create_dir_all(state_dir).unwrap();
    std::fs::write(state_dir.join("routes.bin"), out).unwrap();
}

/// A long-lived connection to the echo service (VIP port 7000) from the
/// client, and the node that serves it (its first line).
pub fn open_echo(r: &Running) -> (BufReader<TcpStream>, String) {
    open_echo_to(r, std::net::SocketAddr::new(VIP_V4.into(), 7000))
}

/// As [`open_echo`], to the echo service at `addr`.
pub fn open_echo_to(r: &Running, addr: std::net::SocketAddr) -> (BufReader<TcpStream>, String) {
    let stream = r
        .lab
        .client
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut conn = BufReader::new(stream);
    let mut name = String::new();
    conn.read_line(&mut name).unwrap();
    (conn, name.trim().to_string())
}

/// Runs `fepctl --socket <lab's> ARGS`; returns the exit code and stdout.
pub fn fepctl(r: &Running, args: &[&str]) -> (i32, String) {
    fepctl_at(&r.lab.control_socket(), args)
}

/// Runs `fepctl --socket SOCKET ARGS`; returns the exit code and stdout.
pub fn fepctl_at(socket: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(lab::workspace_bin("fepctl").unwrap())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running fepctl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// Polls `cond` every 100 ms until it holds; panics with `what` and fep's
/// log after `limit`.
pub fn wait_for(r: &Running, what: &str, limit: Duration, mut cond: impl FnMut(&Running) -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond(r) {
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {limit:?} waiting for: {what}\nfep log:\n{}",
                r.fep.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of one sample line (`name{labels} value`) of `metrics`, if exported.
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `fepctl --json ARGS`, which must succeed, read as the API's view `T`
/// (every field the view has must be there, with its type).
pub fn fepctl_view<T: serde::de::DeserializeOwned>(r: &Running, args: &[&str]) -> T {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out) = fepctl(r, &all);
    assert_eq!(code, 0, "fepctl {args:?} failed: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "fepctl {args:?} printed no {} ({e}): {out}",
            std::any::type_name::<T>()
        )
    })
}

/// `fepctl status --json`.
pub fn status(r: &Running) -> StatusView {
    fepctl_view(r, &["status"])
}

/// The packet counters of `fepctl status --json`.
pub fn counters(r: &Running) -> CountersView {
    status(r).counters
}

/// The packets `counters` dropped for `reason` (every reason is listed).
pub fn dropped(counters: &CountersView, reason: &str) -> u64 {
    *counters
        .drops
        .get(reason)
        .unwrap_or_else(|| panic!("no drop reason {reason}: {:?}", counters.drops))
}

/// `fepctl nodes --json`.
pub fn nodes(r: &Running) -> Vec<NodeView> {
    fepctl_view(r, &["nodes"])
}

/// The entry of `node` in `fepctl nodes --json`.
pub fn node(r: &Running, name: &str) -> NodeView {
    nodes(r)
        .into_iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// `fepctl services --json`.
pub fn service_views(r: &Running) -> Vec<ServiceView> {
    fepctl_view(r, &["services"])
}

/// The entry of `service` in `fepctl services --json`.
pub fn service(r: &Running, name: &str) -> ServiceView {
    service_views(r)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// `fepctl routes --json` with `filter` (e.g. `["--node", "be2"]`).
pub fn routes(r: &Running, filter: &[&str]) -> Vec<RouteView<'static>> {
    let mut args = vec!["routes"];
    args.extend_from_slice(filter);
    fepctl_view(r, &args)
}

/// The entry of back end `node` in service `service` of `fepctl services --json`.
pub fn backend(r: &Running, service: &str, node: &str) -> BackendView {
    service_views(r)
        .into_iter()
        .find(|s| s.name == service)
        .expect("service")
        .backends
        .into_iter()
        .find(|b| b.node == node)
        .expect("backend")
}

/// `n` HTTP GETs to `vip:80` from the client, each a new connection; the
/// names that answered (a failed request panics).
pub fn http_names(r: &Running, vip: std::net::IpAddr, n: usize) -> Vec<String> {
    let addr = std::net::SocketAddr::new(vip, 80);
    r.lab
        .client
        .enter(|| {
            (0..n)
                .map(|i| {
                    http::get(addr, "/", TIMEOUT)
                        .unwrap_or_else(|e| {
                            panic!(
                                "request {i} of {n} failed: {e:#}\nfep log:\n{}",
                                r.fep.log()
                            )
                        })
                        .body_text()
                })
                .collect()
        })
        .unwrap()
}

/// An agent connection to fep's agent port (10.0.2.1:9441) from namespace
/// `ns`, speaking the protocol by hand: a forger, a replayer, or a fake agent.
pub struct RawAgent {
    pub stream: TcpStream,
    pub session: Session,
}

impl RawAgent {
    /// Connects and exchanges hellos, with `key` for the session.
    pub fn connect(ns: &Netns, key: protocol::Key) -> RawAgent {
        let mut stream = ns
            .enter(|| TcpStream::connect("10.0.2.1:9441").unwrap())
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (hello, nonce) = protocol::hello();
        stream.write_all(&hello).unwrap();
        let mut peer = [0u8; protocol::HELLO_LEN];
        stream.read_exact(&mut peer).unwrap();
        let session = Session::new(key, nonce, protocol::parse_hello(&peer).unwrap());
        RawAgent { stream, session }
    }

    /// Sends raw bytes (a frame, or garbage); errors are ignored, since fep
    /// may have closed the connection already.
    pub fn send(&mut self, frame: &[u8]) {
        let _ = self.stream.write_all(frame);
    }

    /// Seals and sends one message.
    pub fn say<T: Message + serde::Serialize>(&mut self, msg: &T) {
        let frame = self.session.seal(msg);
        self.send(&frame);
    }

    /// The next message from fep (within the read timeout).
    pub fn receive(&mut self) -> FepMsg {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).expect("a frame from fep");
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream
            .read_exact(&mut frame)
            .expect("a frame from fep");
        self.session.open(&frame).expect("fep's frame verifies")
    }

    /// True once fep has closed the connection (frames it sends before,
    /// such as its request for live connections, are read past); false if
    /// it stays open for the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }
}

/// A `web` service (HTTP, port 80) and an `echo` service (port 7000) on the
/// VIP, both with the back ends `ratios`; `extra` goes into `web`.
pub fn services(ratios: &[(&str, u32)], extra: &str) -> String {
    let list: Vec<String> = ratios
        .iter()
        .map(|(n, r)| format!("{{ node = \"{n}\", ratio = {r} }}"))
        .collect();
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n{extra}\nbackend = [{0}]\n\n\
         [[service]]\nname = \"echo\"\nvip = \"{VIP_V4}\"\nport = 7000\nprotocol = \"tcp\"\nbackend = [{0}]\n",
        list.join(", ")
    )
}

/// Sends a line on the long-lived echo connection and checks it comes back.
pub fn echo(conn: &mut BufReader<TcpStream>, line: &str) {
    conn.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let mut back = String::new();
    conn.read_line(&mut back)
        .unwrap_or_else(|e| panic!("echo of {line:?} failed: {e}"));
    assert_eq!(back.trim(), line, "the long-lived connection broke");
}

/// A report that would take be1's port 80 down if it were believed.
pub fn harmful_report() -> AgentMsg {
    AgentMsg::Report(Report {
        cpu_percent: 0.0,
        load_avg: [0.0; 3],
        services: vec![ServiceLoad {
            port: 80,
            listening: false,
            connections: 0,
            rx_pps: 0.0,
        }],
    })
}

/// A scale-out lab: be1 serves `web` (HTTP on the VIP's port 80, load =
/// connections, `high_load = 3`, scale-out after 500 ms) with an agent;
/// back ends 1 to `spares` (be2, …) are its spares, each with an agent
/// whose config gets `agent_extra(lab, i)` (its start command, e.g.
/// [`spare_server_start`]). Returns once every agent is connected.
pub fn start_scale_out(
    tag: &str,
    spares: usize,
    agent_extra: impl Fn(&Lab, usize) -> String,
) -> Running {
    let mut lab = Lab::new(tag, 1 + spares).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    let agent = lab::workspace_bin("bep-agent").unwrap();
    lab.start_backend_server(0, &testsrv, &lab::testsrv_args(0, &[80], &[]))
        .unwrap();
    let key = lab.agent_key(&agent).unwrap();
    let spare_list: Vec<String> = (1..=spares)
        .map(|i| format!("{{ node = \"{}\", ratio = 1 }}", lab::backend_name(i)))
        .collect();
    let services = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nload_metric = \"connections\"\n\
         high_load = 3\nscale_out_after_ms = 500\nbackend = [{{ node = \"be1\", ratio = 1 }}]\nspare = [{}]\n",
        spare_list.join(", ")
    );
    let top = format!(
        "agent_listen = \"10.0.2.1:9441\"\nagent_key_file = \"{}\"\nprune_interval_ms = 300\nhealth_check_interval_ms = 300\nhealth_check_fails = 2\n",
        key.display()
    );
    let fep = lab
        .start_fep(
            &lab::workspace_bin("fep").unwrap(),
            &lab.config(false, &top, &services),
        )
        .unwrap();
    lab.start_agent(0, &agent, &[80], 200, "").unwrap();
    for i in 1..=spares {
        let extra = agent_extra(&lab, i);
        lab.start_agent(i, &agent, &[80], 200, &extra).unwrap();
    }
    let r = Running { lab, fep };
    wait_for(&r, "agents connected", Duration::from_secs(10), |r| {
        nodes(r).iter().all(|n| n.agent_connected)
    });
    r
}

/// A spare agent's `[[service]]` whose start command runs `fep-testsrv` as
/// back end `i` on port 80 (detached; its pid file lets the lab kill it).
pub fn spare_server_start(lab: &Lab, i: usize) -> String {
    format!(
        "[[service]]\nport = 80\nstart = \"{} --name {name} --tcp 80 >/dev/null 2>&1 & echo $! > {}/{name}-spare.pid\"\n",
        lab::workspace_bin("fep-testsrv").unwrap().display(),
        lab.dir().display(),
        name = lab::backend_name(i),
    )
}

/// Six connections held open to be1's port 80 from the gateway: above a
/// `high_load` of 3 connections.
pub fn overload_be1(r: &Running) -> Vec<TcpStream> {
    r.lab
        .gateway
        .enter(|| {
            (0..6)
                .map(|_| TcpStream::connect("10.0.2.11:80").unwrap())
                .collect()
        })
        .unwrap()
}

/// fep's Prometheus metrics, scraped from inside the gateway at `addr`
/// (its `metrics_listen`).
pub fn scrape(r: &Running, addr: &str) -> String {
    r.lab
        .gateway
        .enter(|| {
            let resp = http::get(addr.parse().unwrap(), "/metrics", TIMEOUT).unwrap();
            String::from_utf8(resp.body).unwrap()
        })
        .unwrap()
}

/// The value of one sample line (`name{labels} value`) of scraped metrics, or 0.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metric(metrics, series).unwrap_or(0.0)
}

/// Path MTU discovery through fep: with the gateway's link to the client
/// narrowed to `mtu`, a 400 kB download from `vip`:80 arrives byte-exact —
/// the back end learns the narrower path only from the gateway's ICMP
/// error to the VIP, which fep must translate (and counts).
pub fn assert_download_through_narrow_link(r: &Running, vip: std::net::IpAddr, mtu: u32) {
    r.lab
        .gateway
        .ip(&["link", "set", "cl", "mtu", &mtu.to_string()])
        .unwrap();
    const LEN: u64 = 400_000;
    let body = r
        .lab
        .client
        .enter(|| {
            http::get(
                std::net::SocketAddr::new(vip, 80),
                &format!("/bytes/{LEN}"),
                TIMEOUT,
            )
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("download through a narrower link: {e:#}\n{}", r.fep.log()));
    let mut want = vec![0u8; LEN as usize];
    pattern::fill(0, &mut want);
    assert!(body.body == want, "bytes differ");
    let translated = status(r).counters.get(Count::IcmpErrorsTranslated);
    assert!(translated >= 1, "{translated}");
}

/// Waits until the gateway has no return-path rule `from ADDRESS` left.
pub fn wait_rule_gone(r: &Running, address: &str) {
    let from = format!("from {address} ");
    wait_for(
        r,
        &format!("the return-path rule {from}removed"),
        Duration::from_secs(5),
        |r| !r.lab.gateway.ip_output(&["rule"]).unwrap().contains(&from),
    );
}

/// A sysctl's value in `ns` (`path` under /proc/sys, e.g. `net/ipv4/ip_forward`).
pub fn sysctl(ns: &Netns, path: &str) -> String {
    ns.enter(|| std::fs::read_to_string(format!("/proc/sys/{path}")))
        .unwrap()
        .unwrap_or_else(|e| panic!("reading {path} in {}: {e}", ns.name()))
        .trim()
        .to_string()
}

/// `promtool check metrics` on scraped `metrics` (installing promtool where
/// missing): the exposition format is valid and follows the conventions.
pub fn promtool_check(metrics: &str) {
    use fep_tools::host;
    use std::io::Write as _;
    host::ensure(&[host::PROMTOOL]).expect("promtool, which checks the metrics format");
    let mut promtool = std::process::Command::new(host::PROMTOOL.program)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
