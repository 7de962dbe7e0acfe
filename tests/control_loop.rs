//! The control loop's promises end to end (README "The control loop"):
//! real agents on the back ends, real kernel TCP and UDP, fep driven with
//! fepctl; each test shows what an operator or a client sees.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fep_shared::api::{NodeState, PinState, Spare};
use fep_tests::{
    backend, echo, fepctl, http_names, node, nodes, open_echo, overload_be1, service, services,
    skip_without_root, start_for_agents, start_for_agents_edited, start_scale_out,
    start_with_agents, start_with_agents_after, tally, wait_for, wait_for_agents,
    write_route_snapshot, Running,
};
use fep_tools::lab::{self, VIP_V4};

/// Closes a held echo connection from the client's side, as a client that
/// is done does: FIN, then the server's FIN.
fn close(conn: BufReader<TcpStream>) {
    let mut stream = conn.into_inner();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = stream.read_to_end(&mut Vec::new());
}

/// Sets its flag when dropped: a helper thread looping until the flag is
/// set stops even when the test panics (a scope would wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Live routes of back end `node` in `service`.
fn routes(r: &Running, service: &str, node: &str) -> u64 {
    u64::from(backend(r, service, node).routes)
}

/// Whether service `name` is being pruned.
fn pruning(r: &Running, name: &str) -> bool {
    service(r, name).pruning
}

/// `n` connections held open from the gateway straight to back end `i`'s
/// port 80 (not through fep): load its agent reports.
fn hold_connections(r: &Running, i: usize, n: usize) -> Vec<TcpStream> {
    let addr = SocketAddr::new(lab::backend_v4(i).into(), 80);
    r.lab
        .gateway
        .enter(|| (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect())
        .unwrap()
}

#[test]
fn a_node_without_a_connected_agent_is_never_pruned() {
    if skip_without_root("a_node_without_a_connected_agent_is_never_pruned") {
        return;
    }
    // 200 idle routes of `web`, 100 on each node, whose connections no host
    // has; only be1 runs an agent.
    let mut r = start_for_agents(
        "cna",
        2,
        "route_idle_timeout_s = 600\n",
        &services(&[("be1", 1), ("be2", 1)], ""),
        |lab| write_route_snapshot(&lab.state_dir(), "web", &[0, 1], 200),
    );
    let agent = lab::workspace_bin("bep-agent").unwrap();
    r.lab.start_agent(0, &agent, &[80, 7000], 200, "").unwrap();
    wait_for(&r, "be1's agent connected", Duration::from_secs(10), |r| {
        node(r, "be1").agent_connected
    });
    assert!(!node(&r, "be2").agent_connected);
    assert_eq!(
        (routes(&r, "web", "be1"), routes(&r, "web", "be2")),
        (100, 100)
    );

    // Both above their target (ratio 0): be1's agent says its routes are
    // idle and they go; be2's are kept, however many rounds pass.
    for n in ["be1", "be2"] {
        assert_eq!(fepctl(&r, &["ratio", "web", n, "0"]).0, 0);
    }
    wait_for(
        &r,
        "be1's idle routes pruned through its agent",
        Duration::from_secs(20),
        |r| routes(r, "web", "be1") == 0,
    );
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(routes(&r, "web", "be2"), 100, "be2 has no agent to ask");
        assert!(pruning(&r, "web"), "be2 is still above its target");
    }
}

#[test]
fn a_cut_off_backend_loses_its_routes_while_the_routes_to_the_others_are_held() {
    if skip_without_root("a_cut_off_backend_loses_its_routes") {
        return;
    }
    let r = start_with_agents(
        "cbd",
        2,
        "node_dead_after_ms = 1500\n",
        &services(&[("be1", 1), ("be2", 1)], ""),
    );
    let conns: Vec<(BufReader<TcpStream>, String)> = (0..4).map(|_| open_echo(&r)).collect();
    let (mut on_be2, on_be1): (Vec<_>, Vec<_>) = conns.into_iter().partition(|c| c.1 == "be2");
    assert_eq!((on_be1.len(), on_be2.len()), (2, 2));

    // be1 cut off from the gateway (its connections are not closed: nothing
    // reaches it any more): health checks fail, its agent falls silent.
    let be1 = lab::backend_v4(0).to_string();
    r.lab
        .gateway
        .ip(&["route", "replace", "blackhole", &be1])
        .unwrap();
    wait_for(
        &r,
        "be1 down with its routes deleted",
        Duration::from_secs(15),
        |r| !backend(r, "echo", "be1").up && routes(r, "echo", "be1") == 0,
    );
    assert!(
        r.fep
            .log()
            .contains("node 'be1' is down for service 'echo': no new routes, 2 route(s) deleted"),
        "{}",
        r.fep.log()
    );
    assert_eq!(routes(&r, "echo", "be2"), 2, "be2's routes are held");
    for (conn, _) in &mut on_be2 {
        echo(conn, "be2 serves through be1's failure");
    }
    assert!(http_names(&r, VIP_V4.into(), 6).iter().all(|n| n == "be2"));

    // Back on the network: back into rotation.
    r.lab
        .gateway
        .ip(&["route", "replace", &be1, "dev", "b1"])
        .unwrap();
    wait_for(&r, "be1 back up", Duration::from_secs(45), |r| {
        backend(r, "web", "be1").effective_ratio == 1
    });
    assert!(http_names(&r, VIP_V4.into(), 6).contains(&"be1".to_string()));
    for (conn, _) in &mut on_be2 {
        echo(conn, "be2 still serves");
    }
    drop(on_be1);
}

#[test]
fn scheduler_load_sends_new_routes_to_the_smallest_reported_connections_per_ratio_and_pins_override(
) {
    if skip_without_root("scheduler_load_sends_new_routes_to_the_smallest_load_per_ratio") {
        return;
    }
    let r = start_with_agents(
        "csl",
        2,
        "",
        &services(
            &[("be1", 2), ("be2", 1)],
            "scheduler = \"load\"\nload_metric = \"connections\"",
        ),
    );
    let load = |r: &Running, n: &str| backend(r, "web", n).load;

    // be1: 6 connections ÷ 2 = 3 against be2's 0 ÷ 1.
    let _on_be1 = hold_connections(&r, 0, 6);
    wait_for(
        &r,
        "be1 reports 6 connections",
        Duration::from_secs(10),
        |r| load(r, "be1") == Some(6.0),
    );
    let names = http_names(&r, VIP_V4.into(), 10);
    assert!(names.iter().all(|n| n == "be2"), "{names:?}");

    // be2: 8 ÷ 1 = 8 against 3.
    let _on_be2 = hold_connections(&r, 1, 8);
    wait_for(
        &r,
        "be2 reports 8 connections",
        Duration::from_secs(10),
        |r| load(r, "be2") == Some(8.0),
    );
    let names = http_names(&r, VIP_V4.into(), 10);
    assert!(names.iter().all(|n| n == "be1"), "{names:?}");

    // Document 004, Fig. 7: be1 pinned stopped, load 0, ratio 3 — shown as
    // such whatever its agent reports, never chosen, until released.
    let (code, out) = fepctl(
        &r,
        &[
            "pin", "be1", "--state", "down", "--load", "0", "--ratio", "3",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (_, table) = fepctl(&r, &["nodes"]);
    let row = table.lines().find(|l| l.starts_with("be1 ")).unwrap();
    assert!(
        row.contains(" down ") && row.contains(" state=down,load=0.0,ratio=3 "),
        "{table}"
    );
    for _ in 0..3 {
        let n = node(&r, "be1");
        assert_eq!(n.state, NodeState::Down, "{n:?}");
        assert_eq!(n.pin.state, Some(PinState::Down));
        assert_eq!(n.pin.load, Some(0.0));
        assert_eq!(n.pin.ratio, Some(3));
        let b = backend(&r, "web", "be1");
        assert_eq!(b.load, Some(0.0), "{b:?}");
        assert!(!b.up, "{b:?}");
        assert_eq!(b.effective_ratio, 0, "{b:?}");
        let names = http_names(&r, VIP_V4.into(), 4);
        assert!(names.iter().all(|n| n == "be2"), "{names:?}");
        std::thread::sleep(Duration::from_millis(400)); // two more agent reports
    }
    assert_eq!(fepctl(&r, &["unpin", "be1"]).0, 0);
    assert_eq!(node(&r, "be1").state, NodeState::Up);
    wait_for(&r, "the agent's load again", Duration::from_secs(5), |r| {
        load(r, "be1") == Some(6.0)
    });
    let names = http_names(&r, VIP_V4.into(), 6);
    assert!(names.iter().all(|n| n == "be1"), "{names:?}");
}

#[test]
fn scheduler_load_with_load_metric_pps_avoids_the_backend_receiving_packets() {
    if skip_without_root("scheduler_load_with_load_metric_pps") {
        return;
    }
    let services = services(&[("be1", 1), ("be2", 1)], "").replace(
        "port = 7000\nprotocol = \"tcp\"\n",
        "port = 7000\nprotocol = \"tcp\"\nscheduler = \"load\"\nload_metric = \"pps\"\n",
    );
    let r = start_with_agents("csp", 2, "", &services);
    let pps = |r: &Running, n: &str| backend(r, "echo", n).load.unwrap_or(0.0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Lines echoed on a connection straight to be1's port 7000.
        let mut pump = r
            .lab
            .gateway
            .enter(|| TcpStream::connect("10.0.2.11:7000").unwrap())
            .unwrap();
        pump.set_read_timeout(Some(fep_tests::TIMEOUT)).unwrap();
        let stop = &stop;
        let pumping = s.spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                pump.write_all(b"load\n").unwrap();
                let _ = pump.read(&mut buf).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let stopping = StopOnDrop(stop);
        wait_for(&r, "be1 reports packets", Duration::from_secs(10), |r| {
            pps(r, "be1") > 20.0 && pps(r, "be1") > 4.0 * pps(r, "be2")
        });
        let names: Vec<String> = (0..6).map(|_| open_echo(&r).1).collect();
        let loads = (pps(&r, "be1"), pps(&r, "be2"));
        drop(stopping);
        pumping.join().unwrap();
        assert!(
            names.iter().all(|n| n == "be2"),
            "{names:?} (pps be1, be2: {loads:?})"
        );
    });
}

#[test]
fn a_spare_whose_start_fails_goes_back_to_idle_and_gets_no_routes() {
    if skip_without_root("a_spare_whose_start_fails_goes_back_to_idle") {
        return;
    }
    let r = start_scale_out("csf", 1, |_, _| {
        "[[service]]\nport = 80\nstart = \"echo cannot start >&2; exit 3\"\n".to_string()
    });
    let held = overload_be1(&r);
    wait_for(
        &r,
        "the spare's start reported failed",
        Duration::from_secs(15),
        |r| r.fep.log().contains("node 'be2': start of port 80 failed"),
    );
    drop(held);
    wait_for(
        &r,
        "be1 no longer overloaded",
        Duration::from_secs(10),
        |r| !backend(r, "web", "be1").overloaded,
    );
    for _ in 0..5 {
        let b = backend(&r, "web", "be2");
        assert_eq!(b.spare, Spare::Idle, "{b:?}");
        assert_eq!(b.effective_ratio, 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(http_names(&r, VIP_V4.into(), 6).iter().all(|n| n == "be1"));
}

#[test]
fn load_metric_cpu_is_the_cpu_use_each_agent_reports() {
    if skip_without_root("load_metric_cpu_is_the_cpu_use_each_agent_reports") {
        return;
    }
    let r = start_with_agents(
        "ccp",
        2,
        "",
        &services(&[("be1", 1), ("be2", 1)], "load_metric = \"cpu\""),
    );
    // The back ends share this host's CPUs, so both report about the same
    // use; what shows is that the service's load is the node's report (the
    // two listings are retried until no report came between them).
    wait_for(
        &r,
        "web's load equal to each node's reported CPU",
        Duration::from_secs(10),
        |r| {
            let nodes = nodes(r);
            let loads: Vec<_> = ["be1", "be2"]
                .iter()
                .map(|n| backend(r, "web", n).load)
                .collect();
            let cpus: Vec<_> = ["be1", "be2"]
                .iter()
                .map(|n| nodes.iter().find(|x| x.name == *n).unwrap().cpu_percent)
                .collect();
            loads == cpus && loads.iter().all(|l| l.is_some_and(|l| l > 0.0))
        },
    );
}

fep_tests::both_paths! {
    fn drain_wait_exits_1_on_timeout_then_0_once_drained_and_the_agent_runs_the_stop_commands() {
        if skip_without_root("drain_wait_exits_1_on_timeout_then_0_once_drained") {
            return;
        }
        let stop_when_drained = |cfg: String| {
            (0..2).fold(cfg, |cfg, i| {
                let addr = format!("address = \"{}\"\n", lab::backend_v4(i));
                cfg.replace(&addr, &format!("{addr}stop_when_drained = true\n"))
            })
        };
        let mut r = start_for_agents_edited(
            "cdw",
            2,
            "",
            &services(&[("be1", 1), ("be2", 1)], ""),
            |_| {},
            stop_when_drained,
        );
        // Each agent's stop commands leave a file saying which port they stopped.
        let marker = |r: &Running, i: usize, port: u16| {
            r.lab
                .dir()
                .join(format!("{}-stopped-{port}", lab::backend_name(i)))
        };
        let agent = lab::workspace_bin("bep-agent").unwrap();
        for i in 0..2 {
            let extra = format!(
                "[[service]]\nport = 80\nstop = \"touch {}\"\n[[service]]\nport = 7000\nstop = \"touch {}\"\n",
                marker(&r, i, 80).display(),
                marker(&r, i, 7000).display()
            );
            r.lab
                .start_agent(i, &agent, &[80, 7000], 200, &extra)
                .unwrap();
        }
        wait_for_agents(&r);
        let (mut conn, held) = open_echo(&r);
        let (held_i, other_i) = if held == "be1" { (0, 1) } else { (1, 0) };

        // A live connection keeps the node draining: --wait gives up with 1.
        let (code, out) = fepctl(&r, &["drain", &held, "--wait", "--timeout", "2"]);
        assert_eq!(code, 1, "drain --wait timing out: {out}");
        assert!(
            out.contains(&format!("{held} is not drained after 2 s: 1 route(s) left")),
            "{out}"
        );
        assert_eq!(node(&r, &held).state, NodeState::Draining);
        echo(&mut conn, "still served while draining");
        assert!(
            !marker(&r, held_i, 80).exists(),
            "not stopped before drained"
        );

        // Closed: drained, --wait exits 0, and the agent runs both stop commands.
        close(conn);
        let (code, out) = fepctl(&r, &["drain", &held, "--wait", "--timeout", "30"]);
        assert_eq!(code, 0, "drain --wait: {out}\n{}", r.fep.log());
        assert!(out.contains(&format!("{held} is drained")), "{out}");
        wait_for(
            &r,
            "the drained node's agent ran its stop commands",
            Duration::from_secs(10),
            |r| marker(r, held_i, 80).exists() && marker(r, held_i, 7000).exists(),
        );
        assert!(
            !marker(&r, other_i, 80).exists() && !marker(&r, other_i, 7000).exists(),
            "the node still serving was not stopped"
        );
        let other = lab::backend_name(other_i);
        assert!(http_names(&r, VIP_V4.into(), 5).iter().all(|n| *n == other));
    }

    fn pruning_deletes_idle_routes_until_the_shares_are_within_5_points_of_the_target() {
        if skip_without_root("pruning_deletes_idle_routes_until_the_shares_are_within_5_points") {
            return;
        }
        // `echo`: 10 idle routes on be1 and 1 on be2 (no host has their
        // connections), then 20 live connections, 10 on each.
        let dead: Vec<usize> = [vec![0; 10], vec![1]].concat();
        let r = start_with_agents_after(
            "cpf",
            2,
            "route_idle_timeout_s = 600\n",
            &services(&[("be1", 1), ("be2", 1)], ""),
            |lab| write_route_snapshot(&lab.state_dir(), "echo", &dead, 11),
        );
        let mut conns: Vec<(BufReader<TcpStream>, String)> = (0..20).map(|_| open_echo(&r)).collect();
        let names: Vec<String> = conns.iter().map(|c| c.1.clone()).collect();
        assert_eq!(tally(&names, 2), [10, 10]);
        assert_eq!(
            (routes(&r, "echo", "be1"), routes(&r, "echo", "be2")),
            (20, 11)
        );

        // Back to 1:1 after a detour through 2:1 (where nobody is above target):
        // be1 holds 65 % against 50 %, so its idle routes go; then be1 holds
        // 48 % and be2 52 %, within 5 points, and pruning stops with be2's idle
        // route left.
        assert_eq!(fepctl(&r, &["ratio", "echo", "be1", "2"]).0, 0);
        assert_eq!(fepctl(&r, &["ratio", "echo", "be1", "1"]).0, 0);
        wait_for(
            &r,
            "be1's idle routes pruned",
            Duration::from_secs(20),
            |r| routes(r, "echo", "be1") == 10,
        );
        wait_for(&r, "pruning stopped", Duration::from_secs(10), |r| {
            !pruning(r, "echo")
        });
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            (routes(&r, "echo", "be1"), routes(&r, "echo", "be2")),
            (10, 11)
        );
        assert!(!pruning(&r, "echo"));
        assert!(r
            .fep
            .log()
            .contains("service 'echo': route shares reached the target"));
        for (conn, name) in &mut conns {
            echo(conn, &format!("live on {name}"));
        }
    }

    fn a_udp_route_idle_5_s_is_pruned_and_a_busier_one_is_kept() {
        if skip_without_root("a_udp_route_idle_5_s_is_pruned_and_a_busier_one_is_kept") {
            return;
        }
        let dns = format!(
            "[[service]]\nname = \"dns\"\nvip = \"{VIP_V4}\"\nport = 5353\nprotocol = \"udp\"\n\
             backend = [{{ node = \"be1\", ratio = 1 }}, {{ node = \"be2\", ratio = 1 }}]\n"
        );
        // 10 UDP routes on be1 that no client uses any more.
        let mut r = start_with_agents_after(
            "cud",
            2,
            "route_idle_timeout_s = 600\n",
            &format!("{}\n{dns}", services(&[("be1", 1), ("be2", 1)], "")),
            |lab| write_route_snapshot(&lab.state_dir(), "dns", &[0], 10),
        );
        let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
        for i in 0..2 {
            r.lab
                .start_backend_server(i, &testsrv, &lab::testsrv_args(i, &[], &[5353]))
                .unwrap();
        }
        // A client flow that sends every 1.5 s: idle for a second at times
        // (a pruning candidate), never for 5.
        let sock = r
            .lab
            .client
            .enter(|| UdpSocket::bind("0.0.0.0:0").unwrap())
            .unwrap();
        sock.connect(SocketAddr::new(VIP_V4.into(), 5353)).unwrap();
        sock.set_read_timeout(Some(fep_tests::TIMEOUT)).unwrap();
        let ask = || {
            sock.send(b"who").unwrap();
            let mut buf = [0u8; 64];
            let n = sock.recv(&mut buf).expect("an answer over UDP");
            String::from_utf8_lossy(&buf[..n]).to_string()
        };
        let first = ask();
        assert_eq!(
            first, "be1",
            "the service's first new route (1:1, table order)"
        );
        assert_eq!(routes(&r, "dns", "be1"), 11);

        assert_eq!(fepctl(&r, &["ratio", "dns", "be1", "0"]).0, 0);
        let stop = AtomicBool::new(false);
        let answers = std::thread::scope(|s| {
            let flow = s.spawn(|| {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1500));
                    answers.push(ask());
                }
                answers
            });
            let stopping = StopOnDrop(&stop);
            wait_for(
                &r,
                "be1's idle UDP routes pruned (no agent is asked about UDP)",
                Duration::from_secs(30),
                |r| routes(r, "dns", "be1") <= 1,
            );
            // Many more rounds; the busier flow's route stays.
            std::thread::sleep(Duration::from_secs(4));
            assert_eq!(routes(&r, "dns", "be1"), 1, "{}", r.fep.log());
            assert!(pruning(&r, "dns"), "be1 still holds a route at ratio 0");
            drop(stopping);
            flow.join().unwrap()
        });
        assert!(answers.len() >= 3, "{answers:?}");
        assert!(
            answers.iter().all(|a| a == "be1"),
            "the flow stayed on its back end: {answers:?}"
        );
    }

    fn client_affinity_keeps_every_connection_of_a_client_on_the_backend_of_its_live_route() {
        if skip_without_root("client_affinity_keeps_every_connection_of_a_client") {
            return;
        }
        // `web` with client affinity, `echo` without.
        let r = start_with_agents(
            "caf",
            2,
            "",
            &services(&[("be1", 1), ("be2", 1)], "affinity = \"client\""),
        );
        let held = r
            .lab
            .client
            .enter(|| TcpStream::connect(SocketAddr::new(VIP_V4.into(), 80)).unwrap())
            .unwrap();
        wait_for(
            &r,
            "the held connection's route",
            Duration::from_secs(5),
            |r| fep_tests::routes(r, &["--service", "web"]).len() == 1,
        );
        let route = fep_tests::routes(&r, &["--service", "web"])[0].clone();
        let chosen = route.node.to_string();
        let names = http_names(&r, VIP_V4.into(), 10);
        assert!(
            names.iter().all(|n| *n == chosen),
            "every connection of the client on {chosen}: {names:?}"
        );
        // Port affinity spreads one client's connections.
        let echoes: Vec<String> = (0..4).map(|_| open_echo(&r).1).collect();
        assert_eq!(tally(&echoes, 2), [2, 2]);
        drop(held);
    }
}
