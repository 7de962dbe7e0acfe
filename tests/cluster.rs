//! Several front ends on keepalived: a client behind a router, two
//! gateways sharing a client-side and a back-end segment, keepalived
//! moving each VIP group's floating addresses between them (see
//! `fep_tools::cluster_lab`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use fep_shared::api::{GroupView, NodeView};
use fep_tests::{fepctl_at, http, skip_without_root};
use fep_tools::cluster_lab::{self, ClusterLab};
use fep_tools::lab::{self, FepProcess};

const WEB: u16 = 80;
const ECHO: u16 = 7000;
const STREAM: u16 = 7100;
const PORTS: [u16; 3] = [WEB, ECHO, STREAM];
/// Idle keep-alive connections that must work when next used.
const IDLE: usize = 20;

fn view<T: serde::de::DeserializeOwned>(socket: &Path, args: &[&str]) -> T {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out) = fepctl_at(socket, &all);
    assert_eq!(code, 0, "fepctl {args:?} failed: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("fepctl {args:?}: {e}: {out}"))
}

/// Polls `cond` every 100 ms for up to `limit`; panics naming `what`.
fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One group of two back ends (HTTP, echo, stream, each with an agent),
/// keepalived on both gateways with gwa preferred, fep on both; returns
/// once gwa is the group's master and every agent reports to it.
fn start(tag: &str) -> (ClusterLab, Vec<FepProcess>) {
    let mut lab = ClusterLab::new(tag, 1, 2).expect("building the cluster lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    let agent = lab::workspace_bin("bep-agent").unwrap();
    let fep = lab::workspace_bin("fep").unwrap();
    for i in 0..2 {
        let mut args = lab::testsrv_args(i, &[WEB], &[]);
        args.extend(["--echo", "7000", "--stream", "7100"].map(String::from));
        lab.start_backend_server(i, &testsrv, &args).unwrap();
    }
    lab.agent_key(&agent).unwrap();
    // gwa first, master before gwb's keepalived starts (two starting
    // together may both be master for a moment).
    lab.start_keepalived(0, &[150]).unwrap();
    wait(
        "gwa's keepalived master of G0",
        Duration::from_secs(10),
        || lab.keepalived_log(0).contains("(G0) Entering MASTER STATE"),
        || lab.keepalived_log(0),
    );
    lab.start_keepalived(1, &[100]).unwrap();
    let feps: Vec<FepProcess> = (0..2)
        .map(|k| {
            lab.start_fep(k, &fep, &lab.fep_config(k, &PORTS, ""))
                .expect("starting fep")
        })
        .collect();
    for i in 0..2 {
        lab.start_agent(i, &agent, &PORTS, 200).unwrap();
    }
    let socket = lab.control_socket(0);
    let logs = || format!("{}\n{}", feps[0].log(), lab.keepalived_log(0));
    wait(
        "gwa master of G0, its hold over, both agents reporting to it",
        Duration::from_secs(20),
        || {
            let groups: Vec<GroupView> = view(&socket, &["cluster"]);
            let nodes: Vec<NodeView> = view(&socket, &["nodes"]);
            groups[0].master
                && !groups[0].holding
                && nodes
                    .iter()
                    .all(|n| n.agent_connected && n.report_age_ms.is_some())
        },
        logs,
    );
    (lab, feps)
}

fn connect(lab: &ClusterLab, port: u16) -> BufReader<TcpStream> {
    let addr = SocketAddr::new(cluster_lab::vip(0).into(), port);
    let s = lab
        .client
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    BufReader::new(s)
}

fn line(conn: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut l = String::new();
    conn.read_line(&mut l)?;
    if l.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(l.trim_end().to_string())
}

/// The counter of a stream line `NAME N`.
fn seq(l: &str) -> u64 {
    l.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{l:?}"))
}

#[test]
fn a_dead_gateways_connections_resume_on_the_other_one() {
    if skip_without_root("a_dead_gateways_connections_resume_on_the_other_one") {
        return;
    }
    let (mut lab, mut feps) = start("clf");
    let mut stream = connect(&lab, STREAM);
    let mut last = seq(&line(&mut stream).unwrap());
    let mut idle: Vec<_> = (0..IDLE).map(|_| connect(&lab, ECHO)).collect();
    for c in &mut idle {
        line(c).unwrap(); // the node's name
        c.get_mut().write_all(b"before\n").unwrap();
        assert_eq!(line(c).unwrap(), "before");
    }

    // gwa crashes: keepalived and fep killed, no last word from either.
    lab.kill_keepalived(0);
    let crashed = Instant::now();
    drop(feps.remove(0));
    let survivor = &feps[0];
    let socket = lab.control_socket(1);

    // The stream resumes where it was, within 3 s.
    stream
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let next = line(&mut stream).unwrap_or_else(|e| {
        panic!(
            "the stream did not resume within 3 s of the crash ({e})\n{}\n{}",
            survivor.log(),
            lab.keepalived_log(1)
        )
    });
    let resumed = crashed.elapsed();
    assert_eq!(seq(&next), last + 1, "no byte lost or repeated");
    last = seq(&next);
    for _ in 0..3 {
        let n = seq(&line(&mut stream).unwrap());
        assert_eq!(n, last + 1);
        last = n;
    }

    // New connections are served within 3 s of the crash.
    let web = SocketAddr::new(cluster_lab::vip(0).into(), WEB);
    let mut served = None;
    while served.is_none() && crashed.elapsed() < Duration::from_secs(3) {
        served = lab
            .client
            .enter(|| http::get(web, "/", Duration::from_millis(500)))
            .unwrap()
            .ok();
    }
    let served = served.unwrap_or_else(|| {
        panic!(
            "no new connection served within 3 s of the crash\n{}",
            survivor.log()
        )
    });
    assert!(
        served.body_text().starts_with("be"),
        "{}",
        served.body_text()
    );

    // The idle connections work when next used.
    for c in &mut idle {
        c.get_mut().write_all(b"after\n").unwrap();
        assert_eq!(line(c).unwrap(), "after");
    }

    let groups: Vec<GroupView> = view(&socket, &["cluster"]);
    assert!(groups[0].master && !groups[0].holding, "{groups:?}");
    let hold = groups[0]
        .last_hold
        .expect("the arrival of G0 held its packets");
    assert!(groups[0].routes >= (IDLE + 1) as u64, "{groups:?}");
    eprintln!(
        "failover: stream resumed {} ms after the crash; G0 held {} ms, {} packet(s) replayed",
        resumed.as_millis(),
        hold.held_ms,
        hold.packets
    );
}
