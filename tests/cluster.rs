//! Several front ends on keepalived: a client behind a router, two
//! gateways sharing a client-side and a back-end segment, keepalived
//! moving each VIP group's floating addresses between them (see
//! `fep_tools::cluster_lab`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fep_shared::api::{ClusterView, GroupView, MoveReport};
use fep_shared::peer::PeerRequest;
use fep_shared::protocol::{self, Key, Session};
use fep_tests::{fepctl_at, http, pattern, skip_without_root};
use fep_tools::cluster_lab::udp_ask;
use fep_tools::cluster_lab::{self, ClusterLab, ECHO, STREAM, WEB};
use fep_tools::lab::FepProcess;

/// Idle keep-alive connections that must work when next used.
const IDLE: usize = 20;
/// UDP flows (one client port each) through a failover.
const UDP_FLOWS: usize = 20;
/// How long balanced traffic must leave the controller still.
const BALANCED: Duration = Duration::from_secs(60);
/// Idle connections through a planned move.
const IDLE_MANY: usize = 200;

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

/// A running cluster lab (see [`ClusterLab::start`]).
fn start(tag: &str, holders: &[usize], cluster: &str) -> (ClusterLab, Vec<FepProcess>) {
    ClusterLab::start(tag, holders, cluster).expect("starting the cluster lab")
}

fn connect(lab: &ClusterLab, port: u16) -> BufReader<TcpStream> {
    connect_to(lab, 0, port)
}

/// A connection from the client to group `g`'s VIP.
fn connect_to(lab: &ClusterLab, g: usize, port: u16) -> BufReader<TcpStream> {
    let addr = SocketAddr::new(cluster_lab::vip(g).into(), port);
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
    let (mut lab, mut feps) = start("clf", &[0], "");
    let mut stream = connect(&lab, STREAM);
    let mut last = seq(&line(&mut stream).unwrap());
    let mut idle: Vec<_> = (0..IDLE).map(|_| connect(&lab, ECHO)).collect();
    for c in &mut idle {
        line(c).unwrap(); // the node's name
        c.get_mut().write_all(b"before\n").unwrap();
        assert_eq!(line(c).unwrap(), "before");
    }

    // UDP flows, each confirmed (a datagram after a reply), spread by the
    // round robin; their routes' copies reach the agents within a flush.
    let flows = lab.udp_flows(UDP_FLOWS).unwrap();
    let before: Vec<String> = flows
        .iter()
        .map(|f| (udp_ask(f).unwrap(), udp_ask(f).unwrap()).1)
        .collect();
    assert!(
        before.iter().any(|n| *n != before[0]),
        "the flows use both back ends: {before:?}"
    );
    std::thread::sleep(Duration::from_millis(500));

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

    // Each UDP flow stays on its back end: asked in reverse order, so that
    // a fresh round robin would have put every one elsewhere.
    let mut after: Vec<String> = flows.iter().rev().map(|f| udp_ask(f).unwrap()).collect();
    after.reverse();
    assert_eq!(after, before, "UDP flows rebuilt from the agents' copies");

    let cluster = view::<ClusterView>(&socket, &["cluster"]);
    let dead = &cluster.peers[0];
    assert!(
        dead.name == "gwa" && dead.error.is_some() && dead.groups.is_empty(),
        "the dead gateway is shown as not answering: {dead:?}"
    );
    let groups = cluster.groups;
    assert!(groups[0].master && !groups[0].holding, "{groups:?}");
    let hold = groups[0]
        .last_hold
        .expect("the arrival of G0 held its packets");
    assert!(
        groups[0].routes >= (IDLE + 1 + UDP_FLOWS) as u64,
        "{groups:?}"
    );
    eprintln!(
        "failover: stream resumed {} ms after the crash; G0 held {} ms, {} packet(s) replayed",
        resumed.as_millis(),
        hold.held_ms,
        hold.packets
    );
}

/// Reads the stream's lines until `stop`, checking their counters are
/// consecutive; returns how many and the longest gap between two.
fn follow(mut conn: BufReader<TcpStream>, stop: Arc<AtomicBool>) -> (u64, Duration) {
    let mut last = seq(&line(&mut conn).unwrap());
    let (mut n, mut gap, mut at) = (0, Duration::ZERO, Instant::now());
    while !stop.load(Ordering::Relaxed) {
        let next = seq(&line(&mut conn).expect("the stream goes on"));
        assert_eq!(next, last + 1, "no line lost or repeated");
        last = next;
        n += 1;
        gap = gap.max(at.elapsed());
        at = Instant::now();
    }
    (n, gap)
}

/// Bulk transfers go at this rate, so that they are in flight during a move.
const BULK_RATE: f64 = 10e6;

/// Sleeps until `bytes` is not ahead of [`BULK_RATE`] since `start`.
fn pace(start: Instant, bytes: u64) {
    let due = Duration::from_secs_f64(bytes as f64 / BULK_RATE);
    if let Some(ahead) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(ahead);
    }
}

/// Sends `len` bytes of the pattern through an echo connection (paced)
/// while reading them back; both directions must be byte-exact.
fn echo_bulk(mut conn: BufReader<TcpStream>, len: u64) {
    conn.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = conn.get_ref().try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let (mut off, start) = (0, Instant::now());
        while off < len {
            pace(start, off);
            let n = (len - off).min(buf.len() as u64) as usize;
            pattern::fill(off, &mut buf[..n]);
            w.write_all(&buf[..n]).unwrap();
            off += n as u64;
        }
    });
    let mut h = pattern::Fnv::default();
    let (mut got, mut buf) = (0u64, vec![0u8; 64 * 1024]);
    while got < len {
        let n = conn.read(&mut buf).expect("the echo goes on");
        assert!(n > 0, "the echo connection closed after {got} bytes");
        h.write(&buf[..n]);
        got += n as u64;
    }
    writer.join().unwrap();
    assert_eq!(
        h.finish(),
        pattern::expected_hash(len),
        "echoed bytes differ"
    );
}

#[test]
fn a_planned_move_breaks_no_connection_and_leaves_the_other_group_alone() {
    if skip_without_root("a_planned_move_breaks_no_connection_and_leaves_the_other_group_alone") {
        return;
    }
    let (lab, feps) = start("clm", &[0, 1], "");
    let (a, b) = (lab.control_socket(0), lab.control_socket(1));
    const BULK: u64 = 20_000_000;

    // Group 0 on gwa: a stream, a 20 MB upload + download through the
    // echo service, a 20 MB HTTP download, 200 idle connections. Group 1
    // on gwb: a stream of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = std::thread::spawn({
        let (conn, stop) = (connect(&lab, STREAM), stop.clone());
        move || follow(conn, stop)
    });
    let other = std::thread::spawn({
        let (conn, stop) = (connect_to(&lab, 1, STREAM), stop.clone());
        move || follow(conn, stop)
    });
    let mut echo = connect(&lab, ECHO);
    line(&mut echo).unwrap();
    let upload = std::thread::spawn(move || echo_bulk(echo, BULK));
    let web = SocketAddr::new(cluster_lab::vip(0).into(), WEB);
    let download = {
        let path = format!("/bytes/{BULK}");
        lab.client
            .spawn(move || {
                let mut h = pattern::Fnv::default();
                let (mut got, start) = (0u64, Instant::now());
                http::get_with(web, &path, Duration::from_secs(10), |c| {
                    h.write(c);
                    got += c.len() as u64;
                    pace(start, got);
                    Ok(())
                })
                .expect("the download goes on");
                assert_eq!((got, h.finish()), (BULK, pattern::expected_hash(BULK)));
            })
            .unwrap()
    };
    let mut idle: Vec<_> = (0..IDLE_MANY).map(|_| connect(&lab, ECHO)).collect();
    for c in &mut idle {
        line(c).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let g1_before = view::<ClusterView>(&b, &["cluster"]).groups[1].routes;

    // The move, asked of gwa (the holder), run by gwb.
    let (code, out) = fepctl_at(&a, &["--json", "vip", "move", "G0", "--to", "gwb"]);
    assert_eq!(
        code,
        0,
        "the move failed: {out}\n{}\n{}",
        feps[1].log(),
        feps[0].log()
    );
    let report: MoveReport = serde_json::from_str(&out).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let (lines, gap) = stream.join().expect("group 0's stream survived");
    let (other_lines, _) = other.join().expect("group 1's stream survived");
    upload
        .join()
        .expect("the 20 MB upload and its echo are byte-exact");
    download
        .join()
        .expect("the 20 MB download is byte-exact")
        .unwrap();
    for c in &mut idle {
        c.get_mut().write_all(b"after\n").unwrap();
        assert_eq!(
            line(c).unwrap(),
            "after",
            "an idle connection works after the move"
        );
    }
    assert!(lines > 0 && other_lines > 0);
    assert!(
        gap < Duration::from_millis(1200),
        "the stream stalled {gap:?} (lines come every 200 ms)"
    );
    assert!(report.routes_copied >= (IDLE_MANY + 3) as u64, "{report:?}");
    assert_eq!((report.from.as_str(), report.to.as_str()), ("gwa", "gwb"));

    let (va, vb) = (
        view::<ClusterView>(&a, &["cluster"]),
        view::<ClusterView>(&b, &["cluster"]),
    );
    assert!(
        !va.groups[0].master && va.groups[0].routes == 0,
        "gwa forgot G0: {va:?}"
    );
    assert!(vb.groups[0].master && !vb.groups[0].holding, "{vb:?}");
    assert_eq!(vb.groups[1].routes, g1_before, "group 1's routes untouched");
    assert_eq!(vb.moves.last(), Some(&report));
    // Each front end shows the other's groups as the other sees them.
    assert_eq!(va.peers.len(), 1, "{va:?}");
    assert_eq!(va.peers[0].name, "gwb");
    assert_eq!(va.peers[0].error, None);
    let roles = |groups: &[GroupView]| -> Vec<(String, bool, bool)> {
        groups
            .iter()
            .map(|g| (g.name.clone(), g.master, g.holding))
            .collect()
    };
    assert_eq!(
        roles(&va.peers[0].groups),
        roles(&vb.groups),
        "gwb seen from gwa"
    );
    assert_eq!(
        roles(&vb.peers[0].groups),
        roles(&va.groups),
        "gwa seen from gwb"
    );
    let (code, text) = fepctl_at(&a, &["cluster"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("front end gwb at "), "{text}");
    eprintln!(
        "planned move: {} route(s) copied, {} packet(s) held and replayed, hold {} ms, \
         longest stream stall {} ms; phases {:?}",
        report.routes_copied,
        report.packets_replayed,
        report.longest_hold_ms,
        gap.as_millis().saturating_sub(200),
        report.phases
    );

    // A move to an unknown front end is refused, naming the front ends.
    let (code, out) = fepctl_at(&a, &["vip", "move", "G1", "--to", "gwz"]);
    assert_ne!(code, 0);
    assert!(out.contains("gwa (this one), gwb"), "{out}");

    // Frames from a stranger, under a wrong key, and replayed, change
    // nothing on gwa and are counted.
    let peer = SocketAddr::new(lab.gateway_address(0).into(), cluster_lab::PEER_PORT);
    let right = Key::load(&lab.dir().join("cluster.key")).unwrap();
    let wrong = Key::from_hex(&Key::generate_hex()).unwrap();
    let hello = |key: &Key, twice: bool| {
        let mut s = TcpStream::connect_timeout(&peer, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (frame, nonce) = protocol::hello();
        s.write_all(&frame)?;
        let mut theirs = [0u8; protocol::HELLO_LEN];
        s.read_exact(&mut theirs)?;
        let theirs = protocol::parse_hello(&theirs).map_err(std::io::Error::other)?;
        let mut session = Session::new(key.clone(), nonce, theirs);
        let frame = session.seal(&PeerRequest::Hello { fep: "gwb".into() });
        s.write_all(&frame)?;
        if twice {
            s.write_all(&frame)?;
        }
        // gwa closes the connection of a refused frame.
        let _ = s.read(&mut [0u8; 64]);
        std::io::Result::Ok(())
    };
    let _ = lab
        .client
        .enter(|| TcpStream::connect_timeout(&peer, Duration::from_secs(5)));
    lab.gateways[1]
        .enter(|| hello(&wrong, false))
        .unwrap()
        .unwrap();
    lab.gateways[1]
        .enter(|| hello(&right, true))
        .unwrap()
        .unwrap();
    let after = view::<ClusterView>(&a, &["cluster"]);
    for reason in ["wrong_address", "bad_mac", "replay"] {
        assert_eq!(
            after.peer_rejects.get(reason),
            Some(&1),
            "{reason}: {after:?}"
        );
    }
    assert_eq!(after.groups, va.groups, "refused frames changed nothing");

    // A move to a front end that is down is refused, naming the front ends.
    let mut feps = feps;
    drop(feps.remove(1));
    let (code, out) = fepctl_at(&a, &["vip", "move", "G1", "--to", "gwb"]);
    assert_ne!(code, 0);
    assert!(
        out.contains("gwb") && out.contains("the front ends are"),
        "{out}"
    );
}

#[test]
fn the_controller_moves_one_of_two_busy_groups_off_a_gateway() {
    if skip_without_root("the_controller_moves_one_of_two_busy_groups_off_a_gateway") {
        return;
    }
    let (lab, feps) = start("clc", &[0, 0], "controller_interval_ms = 1000");
    let b = lab.control_socket(1);
    // Downloads through both groups, on gwa, until the controller has moved
    // one: every one of them byte-exact, across the move.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|g| {
            let stop = stop.clone();
            let vip = SocketAddr::new(cluster_lab::vip(g).into(), WEB);
            let len: u64 = 400_000 - 100_000 * g as u64;
            lab.client
                .spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let mut h = pattern::Fnv::default();
                        let r = http::get_with(
                            vip,
                            &format!("/bytes/{len}"),
                            Duration::from_secs(10),
                            |c| {
                                h.write(c);
                                Ok(())
                            },
                        )
                        .expect("every download succeeds");
                        assert_eq!((r.0, h.finish()), (200, pattern::expected_hash(len)));
                        n += 1;
                    }
                    n
                })
                .unwrap()
        })
        .collect();
    wait(
        "the controller to move one of the groups to gwb",
        Duration::from_secs(30),
        || {
            view::<ClusterView>(&b, &["cluster"])
                .groups
                .iter()
                .any(|g| g.master)
        },
        || format!("{}\n{}", feps[0].log(), feps[1].log()),
    );
    // Balanced now, one busy group on each gateway: no move for 60 s.
    let moves = || {
        let a = view::<ClusterView>(&lab.control_socket(0), &["cluster"]).moves;
        let b = view::<ClusterView>(&b, &["cluster"]).moves;
        (a.len(), b.len())
    };
    std::thread::sleep(Duration::from_millis(500));
    let after_move = moves();
    let balanced = Instant::now();
    while balanced.elapsed() < BALANCED {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            moves(),
            after_move,
            "a move {:?} into balanced traffic:\n{}\n{}",
            balanced.elapsed(),
            feps[0].log(),
            feps[1].log()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        assert!(l.join().unwrap().unwrap() > 0);
    }
    // One group on each gateway now, after one move and no flapping.
    let a = view::<ClusterView>(&lab.control_socket(0), &["cluster"]);
    let on_b = view::<ClusterView>(&b, &["cluster"]);
    let masters: Vec<(bool, bool)> = (0..2)
        .map(|g| (a.groups[g].master, on_b.groups[g].master))
        .collect();
    assert!(
        masters == [(true, false), (false, true)] || masters == [(false, true), (true, false)],
        "{masters:?}"
    );
    assert_eq!(
        on_b.moves.len(),
        1,
        "one move, no flapping: {:?}",
        on_b.moves
    );
    assert_eq!(on_b.moves[0].from, "gwa");
}
