//! The agent port and the other listeners under attack: only a node's own
//! agent speaks for it, answers fep did not ask for are refused, floods of
//! connections that never authenticate cost a bounded number of
//! descriptors, lists of hundreds of thousands of connections go through in
//! parts, and an agent command that hangs does not stop scale-out.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fep_shared::api::{NodeState, Spare};
use fep_shared::protocol::{
    AgentMsg, ConnId, FepMsg, Key, Report, ServiceLoad, MAX_CONNS_PER_FRAME, MAX_FRAME,
};
use fep_tests::{
    backend, echo, fepctl, http_names, node, open_echo, overload_be1, routes, services,
    skip_without_root, spare_server_start, start_for_agents, start_scale_out, start_with_agents,
    start_with_agents_after, status, wait_for, RawAgent, Running,
};
use fep_tools::lab::{self, Lab, VIP_V4};

/// A report of `ports` all closed: believed, it would take the node out.
fn ports_closed(ports: &[u16]) -> AgentMsg {
    AgentMsg::Report(Report {
        cpu_percent: 0.0,
        load_avg: [0.0; 3],
        services: ports
            .iter()
            .map(|&port| ServiceLoad {
                port,
                listening: false,
                connections: 0,
                rx_pps: 0.0,
            })
            .collect(),
    })
}

/// How many agent frames or connections fep refused for `reason`.
fn refused(r: &Running, reason: &str) -> u64 {
    status(r).agent_rejects.get(reason).copied().unwrap_or(0)
}

fn lab_key(r: &Running) -> Key {
    Key::load(&r.lab.dir().join("agent.key")).unwrap()
}

/// The lab of [`start_with_agents`] without agents (the test plays the
/// agent itself), with `prepare` run before fep starts.
fn start_without_agents_after(
    tag: &str,
    backends: usize,
    services: &str,
    prepare: impl FnOnce(&Lab),
) -> Running {
    start_for_agents(tag, backends, "", services, prepare)
}

fn start_without_agents(tag: &str, backends: usize, services: &str) -> Running {
    start_without_agents_after(tag, backends, services, |_| {})
}

/// Writes a route snapshot of `n` routes of `echo` on be1 (see [`snapshot`]).
fn write_snapshot(lab: &Lab, n: usize) {
    let dir = lab.dir().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("routes.bin"), snapshot(n)).unwrap();
}

/// A fake agent of be1 (from be1's address) that has registered and taken
/// fep's request for its live connections; returns it with that request.
fn fake_be1(r: &Running) -> (RawAgent, FepMsg) {
    let mut fake = RawAgent::connect(&r.lab.backends[0], lab_key(r));
    fake.say(&AgentMsg::Register { node: "be1".into() });
    let asked = fake.receive();
    (fake, asked)
}

#[test]
fn a_rogue_agent_from_another_address_is_refused_and_the_nodes_live_connection_survives() {
    if skip_without_root("a_rogue_agent_from_another_address_is_refused") {
        return;
    }
    let r = start_with_agents("fra", 2, "", &services(&[("be1", 1), ("be2", 1)], ""));
    let (mut conn, held) = open_echo(&r);
    echo(&mut conn, "before");
    let other = if held == "be1" { 1 } else { 0 };

    // With the valid key, from the client and from the other back end: it
    // registers as the node holding the connection and reports its ports closed.
    for ns in [&r.lab.client, &r.lab.backends[other]] {
        let mut rogue = RawAgent::connect(ns, lab_key(&r));
        rogue.say(&AgentMsg::Register { node: held.clone() });
        rogue.say(&ports_closed(&[80, 7000]));
        assert!(rogue.closed(), "fep hangs up on a rogue agent");
    }
    std::thread::sleep(Duration::from_millis(1500));
    echo(&mut conn, "after the rogue agents");
    assert_eq!(refused(&r, "wrong_address"), 2);
    let n = node(&r, &held);
    assert_eq!(n.state, NodeState::Up, "{n:?}");
    assert!(n.agent_connected, "the real agent stays: {n:?}");
    assert_eq!(backend(&r, "echo", &held).effective_ratio, 1);
    let routes = routes(&r, &["--service", "echo"]);
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert!(
        r.fep.log().contains(&format!(
            "refused an agent registering as node '{held}' from 10.0.1.2"
        )),
        "the log names the node and the address"
    );
}

#[test]
fn a_second_registration_while_the_nodes_agent_is_live_is_refused() {
    if skip_without_root("a_second_registration_while_the_nodes_agent_is_live_is_refused") {
        return;
    }
    let r = start_with_agents("fdu", 1, "", &services(&[("be1", 1)], ""));
    let (mut conn, _) = open_echo(&r);
    echo(&mut conn, "before");

    // From be1's own address, with the valid key, while be1's agent reports.
    let mut second = RawAgent::connect(&r.lab.backends[0], lab_key(&r));
    second.say(&AgentMsg::Register { node: "be1".into() });
    second.say(&ports_closed(&[80, 7000]));
    assert!(second.closed(), "the second registration is refused");
    assert_eq!(refused(&r, "duplicate"), 1);

    std::thread::sleep(Duration::from_millis(1500));
    echo(&mut conn, "after the second registration");
    let n = node(&r, "be1");
    assert_eq!(n.state, NodeState::Up, "{n:?}");
    assert!(n.agent_connected, "{n:?}");
    assert!(
        n.report_age_ms.unwrap() < 1500,
        "the first agent still reports: {n:?}"
    );
    assert_eq!(backend(&r, "echo", "be1").effective_ratio, 1);
}

#[test]
fn answers_fep_did_not_ask_for_are_refused_and_counted() {
    if skip_without_root("answers_fep_did_not_ask_for_are_refused_and_counted") {
        return;
    }
    let r = start_without_agents("fun", 1, &services(&[("be1", 1)], ""));
    let (mut fake, asked) = fake_be1(&r);
    assert_eq!(
        asked,
        FepMsg::ListLive {
            ports: vec![80, 7000],
            udp_ports: vec![]
        },
        "after its start fep asks each node once for its live connections"
    );
    fake.say(&AgentMsg::LiveList {
        conns: Vec::new(),
        udp: false,
        done: true,
    });
    // Unasked: a list that would give fep a route.
    fake.say(&AgentMsg::LiveList {
        conns: vec![ConnId {
            client: lab::CLIENT_V4.into(),
            client_port: 40000,
            port: 7000,
        }],
        udp: false,
        done: true,
    });
    assert!(fake.closed(), "fep hangs up on an unsolicited live list");
    assert_eq!(refused(&r, "unsolicited"), 1);
    let routes = routes(&r, &[]);
    assert_eq!(routes.len(), 0, "{routes:?}");

    // An answer to a query fep never sent; and a start result never asked.
    let mut fake = RawAgent::connect(&r.lab.backends[0], lab_key(&r));
    fake.say(&AgentMsg::Register { node: "be1".into() });
    fake.say(&AgentMsg::Live {
        id: u64::MAX / 2,
        live: Vec::new(),
    });
    assert!(fake.closed());
    let mut fake = RawAgent::connect(&r.lab.backends[0], lab_key(&r));
    fake.say(&AgentMsg::Register { node: "be1".into() });
    fake.say(&AgentMsg::Control {
        port: 80,
        start: true,
        ok: false,
        message: "forged".into(),
    });
    assert!(fake.closed());
    assert_eq!(refused(&r, "unsolicited"), 3);
    assert!(http_names(&r, VIP_V4.into(), 3).iter().all(|n| n == "be1"));
}

#[test]
fn routes_are_rebuilt_from_a_live_list_of_200k_connections_in_parts() {
    if skip_without_root("routes_are_rebuilt_from_a_live_list_of_200k_connections") {
        return;
    }
    const N: usize = 200_000;
    let r = start_without_agents("frb", 1, &services(&[("be1", 1)], ""));
    let (mut fake, asked) = fake_be1(&r);
    assert!(matches!(asked, FepMsg::ListLive { .. }), "{asked:?}");
    // 4 client addresses × 50,000 ports, all on the echo port.
    let conns: Vec<ConnId> = (0..N)
        .map(|i| ConnId {
            client: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2 + (i / 50_000) as u8)),
            client_port: 10_000 + (i % 50_000) as u16,
            port: 7000,
        })
        .collect();
    assert!(
        serde_json::to_vec(&conns).unwrap().len() > MAX_FRAME,
        "as one frame the list would be over the limit"
    );
    let parts = conns.len().div_ceil(MAX_CONNS_PER_FRAME);
    for (i, part) in conns.chunks(MAX_CONNS_PER_FRAME).enumerate() {
        fake.say(&AgentMsg::LiveList {
            conns: part.to_vec(),
            udp: false,
            done: i + 1 == parts,
        });
    }
    wait_for(&r, "200k routes rebuilt", Duration::from_secs(60), |r| {
        status(r).routes == N
    });
    assert_eq!(node(&r, "be1").routes, N as u32);
    // The connection stayed up (nothing was refused) and the routes serve.
    fake.say(&AgentMsg::Report(Report {
        cpu_percent: 0.0,
        load_avg: [0.0; 3],
        services: vec![],
    }));
    assert!(!fake.closed(), "the fake agent's connection stays open");
    assert_eq!(refused(&r, "oversized"), 0);
}

/// A route snapshot (`state_dir/routes.bin`, see fep's control/snapshot.rs)
/// of `n` established routes of service `echo` on node `be1`.
fn snapshot(n: usize) -> Vec<u8> {
    let names = |list: &[&str]| {
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        for s in list {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    };
    let mut out = b"FEPR\x01".to_vec();
    out.extend(names(&["echo"]));
    out.extend(names(&["be1"]));
    out.extend_from_slice(&(n as u32).to_be_bytes());
    for i in 0..n {
        out.extend_from_slice(&[0, 0, 0, 0]); // service 0, node 0
        let client = Ipv4Addr::new(10, 0, 1, 2 + (i / 50_000) as u8).to_ipv6_mapped();
        out.extend_from_slice(&client.octets());
        out.extend_from_slice(&(10_000 + (i % 50_000) as u16).to_be_bytes());
        out.push(0x08 | 0x10); // replied, established
    }
    out
}

#[test]
fn a_node_with_200k_idle_routes_drains() {
    if skip_without_root("a_node_with_200k_idle_routes_drains") {
        return;
    }
    const N: usize = 200_000;
    let r = start_with_agents_after("fdr", 1, "", &services(&[("be1", 1)], ""), |lab| {
        write_snapshot(lab, N)
    });
    assert_eq!(node(&r, "be1").routes, N as u32, "{}", r.fep.log());
    // None of them has a connection on be1: the agent's answers (in parts)
    // let fep delete them all — well before they would idle out (the lab's
    // route_idle_timeout_s is 30).
    let (code, out) = fepctl(&r, &["drain", "be1", "--wait", "--timeout", "20"]);
    assert_eq!(code, 0, "drain --wait: {out}\n{}", r.fep.log());
    assert!(out.contains("is drained"), "{out}");
    assert_eq!(node(&r, "be1").routes, 0);
    assert!(node(&r, "be1").agent_connected);
    let pruned: usize = r
        .fep
        .log()
        .lines()
        .filter_map(|l| {
            l.split("pruned ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(pruned, N, "every route was pruned (none idled out)");
}

/// Open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sets process `pid`'s descriptor limit (soft and hard) to `limit`, or
/// with `raise_only` to at least `limit`.
fn set_nofile(pid: u32, limit: u64, raise_only: bool) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) reading into a valid rlimit.
    unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    if raise_only && old.rlim_cur >= limit {
        return;
    }
    let l = libc::rlimit {
        rlim_cur: limit,
        rlim_max: if raise_only {
            limit.max(old.rlim_max)
        } else {
            limit
        },
    };
    // SAFETY: prlimit(2) with a valid rlimit and no old-limit pointer.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &l,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Holds `n` connections to fep's agent port that never authenticate,
/// replacing each one fep closes at once, until `stop`; returns how many it
/// opened in all.
fn flood(n: usize, stop: &AtomicBool) -> usize {
    let addr: SocketAddr = "10.0.2.1:9441".parse().unwrap();
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut opened = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for slot in conns.iter_mut() {
            let open = slot.as_mut().is_some_and(|s| {
                let mut buf = [0u8; 64];
                match s.read(&mut buf) {
                    Ok(0) => false,
                    Ok(_) => true, // fep's hello
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            });
            if !open {
                *slot = TcpStream::connect_timeout(&addr, Duration::from_millis(300))
                    .ok()
                    .inspect(|s| s.set_nonblocking(true).unwrap());
                opened += usize::from(slot.is_some());
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    opened
}

#[test]
fn a_flood_of_connections_to_the_agent_port_holds_few_descriptors_while_fep_serves() {
    if skip_without_root("a_flood_of_connections_to_the_agent_port") {
        return;
    }
    // Health checks every 300 ms, 2 failures take a back end out; a
    // generous connect timeout, since 2 shared cores run the flood too (a
    // check fep cannot make for want of descriptors fails at once).
    let r = start_with_agents(
        "ffl",
        2,
        "health_check_timeout_ms = 3000\n",
        &services(&[("be1", 1), ("be2", 1)], ""),
    );
    let pid = r.fep.pid().unwrap();
    set_nofile(pid, 1024, false);
    // This process holds the flood's 2,000 sockets.
    set_nofile(std::process::id(), 8192, true);
    let stop = AtomicBool::new(false);
    let (mut max_fds, mut served) = (0, 0);
    let opened = std::thread::scope(|s| {
        let flooder = s.spawn(|| r.lab.client.enter(|| flood(2000, &stop)).unwrap());
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            max_fds = max_fds.max(descriptors(pid));
            served += http_names(&r, VIP_V4.into(), 2).len();
            std::thread::sleep(Duration::from_millis(250));
        }
        stop.store(true, Ordering::Relaxed);
        flooder.join().unwrap()
    });
    eprintln!("flood: {opened} connections opened, fep held at most {max_fds} descriptors, {served} requests served");
    assert!(
        opened > 2000,
        "fep closed flood connections: {opened} opened"
    );
    assert!(max_fds < 512, "fep held {max_fds} descriptors");
    assert!(served >= 20, "{served} requests served during the flood");
    assert!(refused(&r, "unauthenticated_cap") > 0);
    assert!(refused(&r, "auth_timeout") > 0);
    let log = r.fep.log();
    assert!(
        !log.contains("is down for service"),
        "a health check failed:\n{log}"
    );
    for n in ["be1", "be2"] {
        let v = node(&r, n);
        assert_eq!(v.state, NodeState::Up, "{v:?}");
        assert!(v.agent_connected, "{v:?}");
        assert_eq!(backend(&r, "web", n).effective_ratio, 1);
    }
}

/// Polls `conns` (non-blocking) until `limit`; how many fep has closed.
fn closed_by(conns: &mut [TcpStream], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut closed = vec![false; conns.len()];
    while Instant::now() < deadline && closed.iter().any(|c| !c) {
        for (s, c) in conns.iter_mut().zip(closed.iter_mut()) {
            let mut buf = [0u8; 512];
            *c = *c
                || match s.read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    closed.iter().filter(|c| **c).count()
}

#[test]
fn the_admin_and_metrics_ports_cap_connections_and_close_silent_ones() {
    if skip_without_root("the_admin_and_metrics_ports_cap_connections") {
        return;
    }
    let mut lab = Lab::new("fht", 1).unwrap();
    lab.start_backend_servers(&lab::workspace_bin("fep-testsrv").unwrap(), &[80], &[])
        .unwrap();
    let token = lab.dir().join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let top = format!(
        "metrics_listen = \"127.0.0.1:9100\"\nadmin_listen = \"127.0.0.1:9442\"\nadmin_token_file = \"{}\"\n",
        token.display()
    );
    let web = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{{ node = \"be1\", ratio = 1 }}]\n"
    );
    let fep = lab
        .start_fep(
            &lab::workspace_bin("fep").unwrap(),
            &lab.config(false, &top, &web),
        )
        .unwrap();
    let r = Running { lab, fep };
    for (port, request) in [
        (9442, "GET /v1/status HTTP/1.1\r\nHost: fep\r\nAuthorization: Bearer 0123456789abcdef0123456789abcdef\r\n\r\n"),
        (9100, "GET /metrics HTTP/1.1\r\nHost: fep\r\n\r\n"),
    ] {
        r.lab
            .gateway
            .enter(|| {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let connect = || {
                    let s = TcpStream::connect(addr).unwrap();
                    s.set_nonblocking(true).unwrap();
                    s
                };
                // 80 silent connections: the 16 over the cap of 64 are closed
                // at once, the rest once the header timeout (5 s) passes.
                let mut silent: Vec<TcpStream> = (0..80).map(|_| connect()).collect();
                let early = closed_by(&mut silent, Duration::from_secs(3));
                assert!((16..80).contains(&early), "port {port}: {early} of 80 closed within 3 s");
                assert_eq!(closed_by(&mut silent, Duration::from_secs(20)), 80, "port {port}");
                // Half a request header, then nothing: closed.
                let mut partial = vec![connect()];
                partial[0].write_all(b"GET /metrics HTTP/1.1\r\nHost: fep\r\n").unwrap();
                assert_eq!(closed_by(&mut partial, Duration::from_secs(20)), 1, "port {port}");
                // A full request is answered; the connection, left idle
                // (keep-alive), is closed after the timeout.
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.write_all(request.as_bytes()).unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out)
                    .unwrap_or_else(|e| panic!("port {port}: an idle connection stays open: {e}"));
                let out = String::from_utf8_lossy(&out);
                assert!(out.starts_with("HTTP/1.1 200"), "port {port}: {out}");
            })
            .unwrap();
    }
}

#[test]
fn a_start_command_that_hangs_times_out_and_scale_out_tries_the_next_spare() {
    if skip_without_root("a_start_command_that_hangs_times_out") {
        return;
    }
    // be2's start command never returns; be3's starts a server.
    let r = start_scale_out("fsh", 2, |lab, i| {
        if i == 1 {
            "command_timeout_s = 2\n[[service]]\nport = 80\nstart = \"sleep 600\"\n".into()
        } else {
            spare_server_start(lab, i)
        }
    });
    let held = overload_be1(&r);
    wait_for(&r, "be3 active", Duration::from_secs(30), |r| {
        let b = backend(r, "web", "be3");
        b.spare == Spare::Active && b.effective_ratio == 1
    });
    let log = r.fep.log();
    assert!(
        log.contains("asking spare node 'be2' to start port 80"),
        "{log}"
    );
    assert!(
        log.contains("node 'be2': start of port 80 failed: `sleep 600` did not return within 2 s"),
        "{log}"
    );
    assert_eq!(backend(&r, "web", "be2").spare, Spare::Idle);
    assert!(http_names(&r, VIP_V4.into(), 10).iter().any(|n| n == "be3"));
    drop(held);
}

#[test]
fn a_nodes_derived_key_speaks_for_that_node_only() {
    if skip_without_root("a_nodes_derived_key_speaks_for_that_node_only") {
        return;
    }
    let r = start_without_agents("fdk", 2, &services(&[("be1", 1), ("be2", 1)], ""));
    let agent = lab::workspace_bin("bep-agent").unwrap();
    let be1_key = r.lab.dir().join("be1.key");
    let out = std::process::Command::new(&agent)
        .arg("--derive-key")
        .arg(r.lab.dir().join("agent.key"))
        .arg(&be1_key)
        .args(["--node", "be1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let be1_key = Key::load(&be1_key).unwrap();

    // be1's key, from be2's address, registering as be2: refused.
    let mut thief = RawAgent::connect(&r.lab.backends[1], be1_key.clone());
    thief.say(&AgentMsg::Register { node: "be2".into() });
    assert!(thief.closed(), "be1's key does not speak for be2");
    assert_eq!(refused(&r, "bad_mac"), 1);

    // Under its own key be1's agent registers and is answered.
    let mut be1 = RawAgent::connect(&r.lab.backends[0], be1_key);
    be1.say(&AgentMsg::Register { node: "be1".into() });
    assert!(matches!(be1.receive(), FepMsg::ListLive { .. }));
    be1.say(&AgentMsg::LiveList {
        conns: Vec::new(),
        udp: false,
        done: true,
    });
    be1.say(&ports_closed(&[7000]));
    wait_for(&r, "be1's report taken", Duration::from_secs(5), |r| {
        backend(r, "echo", "be1").effective_ratio == 0
    });
    assert!(node(&r, "be1").agent_connected);
    assert_eq!(backend(&r, "echo", "be2").effective_ratio, 1);
}

#[test]
fn an_agent_that_stops_reading_is_dropped() {
    if skip_without_root("an_agent_that_stops_reading_is_dropped") {
        return;
    }
    // Small socket buffers on both sides, so that one query of 16,384
    // connections (about 850 KB) cannot be buffered away.
    let r = start_without_agents_after("fsl", 1, &services(&[("be1", 1)], ""), |lab| {
        for (ns, key) in [
            (&lab.gateway, "net.ipv4.tcp_wmem"),
            (&lab.backends[0], "net.ipv4.tcp_rmem"),
        ] {
            let out = ns
                .command("sysctl")
                .args(["-w", &format!("{key}=4096 16384 65536")])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        write_snapshot(lab, 20_000);
    });
    let (fake, _) = fake_be1(&r);
    assert!(node(&r, "be1").agent_connected);
    // Drained, be1's routes are asked about; the fake agent reads nothing.
    assert_eq!(fepctl(&r, &["drain", "be1"]).0, 0);
    wait_for(&r, "the agent dropped", Duration::from_secs(25), |r| {
        !node(r, "be1").agent_connected
    });
    assert_eq!(refused(&r, "slow_agent"), 1);
    assert!(
        r.fep.log().contains("the agent took no frame for 10 s"),
        "{}",
        r.fep.log()
    );
    // Nothing was deleted on a guess, and fep serves on.
    assert_eq!(node(&r, "be1").routes, 20_000);
    assert_eq!(fepctl(&r, &["undrain", "be1"]).0, 0);
    assert!(http_names(&r, VIP_V4.into(), 3).iter().all(|n| n == "be1"));
    drop(fake);
}
