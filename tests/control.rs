//! The control loop end to end: real agents on the back ends, real kernel
//! TCP, fep driven with fepctl.

use std::io::Read;
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use fep_shared::api::{NodeState, Spare};
use fep_shared::protocol::{AgentMsg, Key, Report, ServiceLoad};
use fep_tests::{
    backend, echo, fepctl, harmful_report, http_names, node, nodes, open_echo, overload_be1,
    routes, services, skip_without_root, spare_server_start, start_scale_out, start_with_agents,
    start_with_agents_after, status, tally, wait_for, write_route_snapshot, RawAgent,
};
use fep_tools::lab::VIP_V4;

/// Waits for `n` more pruning rounds over `node`'s routes (fep with
/// `metrics_listen`), or until it has none left (then pruning stops).
/// Rounds are at least `prune_interval_ms` (300) apart, so six span 1.5 s:
/// a route last used before the wait has been a candidate (idle ≥ 1 s).
fn prune_rounds_pass(r: &fep_tests::Running, node_name: &str, n: f64) {
    let rounds = |r: &fep_tests::Running| {
        fep_tests::metric(
            &fep_tests::scrape(r, "127.0.0.1:9100"),
            "fep_prune_cycles_total",
        )
        .unwrap()
    };
    let start = rounds(r);
    wait_for(r, "pruning rounds", Duration::from_secs(20), |r| {
        rounds(r) >= start + n || node(r, node_name).routes == 0
    });
}

#[test]
fn a_loaded_node_gets_a_lower_effective_ratio_and_recovers() {
    if skip_without_root("a_loaded_node_gets_a_lower_effective_ratio_and_recovers") {
        return;
    }
    let r = start_with_agents(
        "fld",
        2,
        "",
        &services(
            &[("be1", 2), ("be2", 2)],
            "load_metric = \"connections\"\nhigh_load = 5\nlow_load = 2",
        ),
    );
    // Eight connections held open on be1 (straight from the gateway).
    let held: Vec<TcpStream> = r
        .lab
        .gateway
        .enter(|| {
            (0..8)
                .map(|_| TcpStream::connect("10.0.2.11:80").unwrap())
                .collect()
        })
        .unwrap();
    wait_for(
        &r,
        "be1's effective ratio halved",
        Duration::from_secs(5),
        |r| backend(r, "web", "be1").effective_ratio == 1,
    );
    assert_eq!(backend(&r, "web", "be1").configured_ratio, 2);
    assert!(backend(&r, "web", "be1").overloaded);
    assert_eq!(
        tally(&http_names(&r, VIP_V4.into(), 30), 2),
        [10, 20],
        "be1 gets fewer new routes"
    );

    drop(held);
    wait_for(&r, "be1's ratio restored", Duration::from_secs(5), |r| {
        backend(r, "web", "be1").effective_ratio == 2
    });
    assert_eq!(tally(&http_names(&r, VIP_V4.into(), 20), 2), [10, 10]);
}

#[test]
fn scale_out_starts_a_spare_which_gets_routes_only_once_it_listens() {
    if skip_without_root("scale_out_starts_a_spare") {
        return;
    }
    let r = start_scale_out("fso", 1, spare_server_start);
    assert!(
        http_names(&r, VIP_V4.into(), 10).iter().all(|n| n == "be1"),
        "the spare gets nothing yet"
    );
    assert_eq!(backend(&r, "web", "be2").spare, Spare::Idle);

    let held = overload_be1(&r);
    // Requests keep succeeding while the spare starts: none is sent to it
    // before it listens.
    let mut answered = Vec::new();
    wait_for(
        &r,
        "the spare active in the transfer table",
        Duration::from_secs(15),
        |r| {
            answered.extend(http_names(r, VIP_V4.into(), 2));
            let b = backend(r, "web", "be2");
            b.spare == Spare::Active && b.effective_ratio == 1
        },
    );
    // Every request made meanwhile was answered (`http_names` fails on a
    // request that is not), by be1 or, once active, the spare.
    assert!(!answered.is_empty());
    assert!(
        answered.iter().all(|n| n == "be1" || n == "be2"),
        "{answered:?}"
    );
    assert!(r
        .fep
        .log()
        .contains("asking spare node 'be2' to start port 80"));
    let after = http_names(&r, VIP_V4.into(), 10);
    assert!(
        after.iter().any(|n| n == "be2"),
        "the started spare receives routes: {after:?}"
    );
    drop(held);
}

#[test]
fn forged_and_replayed_agent_messages_change_nothing_and_are_counted() {
    if skip_without_root("forged_and_replayed_agent_messages_change_nothing") {
        return;
    }
    let lab = fep_tools::lab::Lab::new("ffg", 1).unwrap();
    let agent = fep_tools::lab::workspace_bin("bep-agent").unwrap();
    let key_path = lab.agent_key(&agent).unwrap();
    let key = Key::load(&key_path).unwrap();
    let mut lab = lab;
    lab.start_backend_servers(
        &fep_tools::lab::workspace_bin("fep-testsrv").unwrap(),
        &[80],
        &[],
    )
    .unwrap();
    let top = format!(
        "agent_listen = \"10.0.2.1:9441\"\nagent_key_file = \"{}\"\nnode_dead_after_ms = 60000\nhealth_check_interval_ms = 0\n",
        key_path.display()
    );
    let services = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{{ node = \"be1\", ratio = 1 }}]\n"
    );
    let fep = lab
        .start_fep(
            &fep_tools::lab::workspace_bin("fep").unwrap(),
            &lab.config(false, &top, &services),
        )
        .unwrap();
    let r = fep_tests::Running { lab, fep };

    // Forged: the right protocol under the wrong key.
    let wrong = Key::from_hex(&"ab".repeat(32)).unwrap();
    let mut forger = RawAgent::connect(&r.lab.backends[0], wrong);
    let f = forger
        .session
        .seal(&AgentMsg::Register { node: "be1".into() });
    forger.send(&f);
    let f = forger.session.seal(&harmful_report());
    forger.send(&f);
    assert!(forger.closed(), "fep hangs up on a forged frame");

    // Replayed within a connection: a genuine frame sent twice (from be1's
    // own address: an agent speaks for its node only from there).
    let mut agent = RawAgent::connect(&r.lab.backends[0], key.clone());
    let register = agent
        .session
        .seal(&AgentMsg::Register { node: "be1".into() });
    agent.send(&register);
    let report = agent.session.seal(&harmful_report());
    let replayed = report.clone();
    // Send a good (harmless) report first, then the recorded one again out of order.
    let good = agent.session.seal(&AgentMsg::Report(Report {
        cpu_percent: 1.0,
        load_avg: [0.0; 3],
        services: vec![ServiceLoad {
            port: 80,
            listening: true,
            connections: 0,
            rx_pps: 0.0,
        }],
    }));
    agent.send(&good);
    std::thread::sleep(Duration::from_millis(300));
    agent.send(&replayed);
    assert!(agent.closed(), "fep hangs up on a replayed frame");

    // Replayed into another connection: the recorded registration and report.
    let mut replayer = RawAgent::connect(&r.lab.backends[0], wrong_key_never_used());
    replayer.send(&register);
    replayer.send(&report);
    assert!(replayer.closed());

    // Garbled: an oversized length.
    let mut garbler = RawAgent::connect(&r.lab.client, key);
    garbler.send(&u32::MAX.to_be_bytes());
    assert!(garbler.closed());

    let rejects = status(&r).agent_rejects;
    // Each rejection ends its connection: the forger's and the replayer's
    // first frames fail the MAC, one replay, one oversized frame.
    assert_eq!(rejects.get("bad_mac"), Some(&2), "{rejects:?}");
    assert_eq!(rejects.get("replay"), Some(&1), "{rejects:?}");
    assert_eq!(rejects.get("oversized"), Some(&1), "{rejects:?}");
    let all: u64 = rejects.values().sum();
    assert_eq!(all, 4, "nothing else rejected: {rejects:?}");
    // Nothing changed: be1 is up, with its ratio, and serves.
    assert_eq!(backend(&r, "web", "be1").effective_ratio, 1);
    assert_eq!(node(&r, "be1").state, NodeState::Up);
    assert!(http_names(&r, VIP_V4.into(), 5).iter().all(|n| n == "be1"));
}

/// A key nobody holds: a replayer has only recorded frames.
fn wrong_key_never_used() -> Key {
    Key::from_hex(&Key::generate_hex()).unwrap()
}

#[test]
fn agents_and_health_checks_are_served_while_a_million_routes_are_listed() {
    if skip_without_root("agents_and_health_checks_are_served_while_a_million_routes_are_listed") {
        return;
    }
    const ROUTES: usize = 1_000_000;
    // Room above the 95 % mark where eviction starts; no idle expiry meanwhile.
    let top = "max_routes = 1200000\nroute_idle_timeout_s = 3600\n";
    let r = start_with_agents_after(
        "frl",
        2,
        top,
        &services(&[("be1", 1), ("be2", 1)], ""),
        |lab| write_route_snapshot(&lab.state_dir(), "web", &[0, 1], ROUTES as u32),
    );
    assert_eq!(status(&r).routes, ROUTES, "the snapshot was restored");
    let socket = r.lab.control_socket();
    let until = std::time::Instant::now() + Duration::from_secs(8);
    let (samples, listed) = std::thread::scope(|s| {
        // Listers, each asking again as soon as it is answered; each returns
        // how many answers it got and the first that was wrong.
        let lister = |what: &'static str, expect: fn(&str) -> bool| {
            let socket = &socket;
            s.spawn(move || {
                let (mut n, mut wrong) = (0, None);
                while std::time::Instant::now() < until {
                    let out = list(socket, what);
                    if !expect(&out) && wrong.is_none() {
                        wrong = Some(out.chars().take(300).collect::<String>());
                    }
                    n += 1;
                }
                (what, n, wrong)
            })
        };
        let listers = [
            // A header, the rows and what the table holds.
            lister("fepctl routes", |out| {
                out.lines().count() == 102
                    && out.ends_with("1000000 route(s) in the table (--limit K for more)\n")
            }),
            lister("fepctl routes --limit 10", |out| out.lines().count() == 12),
            lister("fepctl routes --node be2 --limit 50", |out| {
                out.lines().filter(|l| l.contains(" be2:80 ")).count() == 50
            }),
            // A filter no route matches: the whole table is looked through.
            lister("fepctl routes --client 192.0.2.1", |out| {
                out.lines().count() == 1
            }),
            // The API's default limit.
            lister("/v1/routes", |body| {
                body.matches("\"client_port\"").count() == 1000
            }),
            // The whole table, as JSON (about 150 MB).
            lister("/v1/routes?limit=2000000", |body| {
                body.starts_with('[') && body.matches("\"client_port\"").count() == ROUTES
            }),
        ];
        // Meanwhile: the age of every agent's last report, and node states.
        let mut samples = Vec::new();
        while std::time::Instant::now() < until {
            for n in nodes(&r) {
                let age = n.report_age_ms.expect("a report");
                samples.push((age, n.name, n.state));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let listed: Vec<_> = listers.into_iter().map(|l| l.join().unwrap()).collect();
        (samples, listed)
    });
    let worst = samples.iter().map(|s| s.0).max().unwrap_or(0);
    let answers: Vec<_> = listed.iter().map(|(what, n, _)| (*what, *n)).collect();
    let peak = std::fs::read_to_string(format!("/proc/{}/status", r.fep.pid().unwrap()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string());
    eprintln!(
        "answers: {answers:?}; {} samples, worst report age {worst} ms; fep's peak resident memory {peak:?} kB",
        samples.len()
    );
    let log = r.fep.log();
    let not_up: Vec<_> = samples.iter().filter(|s| s.2 != NodeState::Up).collect();
    assert!(
        not_up.is_empty(),
        "every node stays up: {not_up:?}\nfep log:\n{log}"
    );
    assert!(
        worst < 2000,
        "an agent's report waited {worst} ms while routes were listed (agents report every 200 ms)\nfep log:\n{log}"
    );
    assert!(!log.contains(" is down"), "no back end went down:\n{log}");
    assert!(
        !log.contains("health check of"),
        "no health check failed:\n{log}"
    );
    for (what, n, wrong) in &listed {
        assert!(*n > 0, "{what} was never answered");
        assert!(wrong.is_none(), "{what} answered wrongly: {wrong:?}");
    }
    assert_eq!(status(&r).routes, ROUTES, "no route was deleted");
}

/// One listing: `fepctl ARGS` (its table) or a GET of an API path (the body).
fn list(socket: &std::path::Path, what: &str) -> String {
    if let Some(args) = what.strip_prefix("fepctl ") {
        let out = std::process::Command::new(fep_tools::lab::workspace_bin("fepctl").unwrap())
            .arg("--socket")
            .arg(socket)
            .args(args.split(' '))
            .output()
            .expect("running fepctl");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8(out.stdout).unwrap();
    }
    let (status, body) = fep_tools::admin_client::request(&socket.into(), "GET", what, None)
        .unwrap_or_else(|e| panic!("GET {what}: {e:#}"));
    assert_eq!(status, 200, "GET {what}: {body}");
    body
}

fep_tests::both_paths! {
    fn a_live_connection_survives_a_ratio_change_and_a_drain_which_completes_once_it_closes() {
        if skip_without_root("a_live_connection_survives_a_ratio_change_and_a_drain") {
            return;
        }
        let r = start_with_agents(
            "fcd",
            2,
            "metrics_listen = \"127.0.0.1:9100\"\n",
            &services(&[("be1", 1), ("be2", 1)], ""),
        );
        let (mut conn, held) = open_echo(&r);
        let other = if held == "be1" { "be2" } else { "be1" };
        echo(&mut conn, "before");

        // Ratio 0: no new routes, the live one stays.
        let (code, out) = fepctl(&r, &["ratio", "echo", &held, "0"]);
        assert_eq!(code, 0, "{out}");
        prune_rounds_pass(&r, &held, 6.0);
        echo(&mut conn, "after the ratio change");

        // Drain: returns at once; the live route stays through several prune rounds.
        let (code, out) = fepctl(&r, &["drain", &held]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(node(&r, &held).state, NodeState::Draining);
        prune_rounds_pass(&r, &held, 6.0);
        echo(&mut conn, "while draining");
        let routes = routes(&r, &["--node", &held]);
        assert_eq!(routes.len(), 1, "the live route stays: {routes:?}");
        assert_eq!(node(&r, &held).state, NodeState::Draining);
        assert!(
            http_names(&r, VIP_V4.into(), 20).iter().all(|n| n == other),
            "new connections avoid the draining node"
        );

        // Closing the connection lets the drain complete within a few prune intervals.
        let mut stream = conn.into_inner();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = stream.read_to_end(&mut Vec::new());
        drop(stream);
        let started = std::time::Instant::now();
        let (code, out) = fepctl(&r, &["drain", &held, "--wait", "--timeout", "15"]);
        assert_eq!(code, 0, "drain --wait: {out}\n{}", r.fep.log());
        assert!(out.contains("is drained"), "{out}");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "drained after {:?}",
            started.elapsed()
        );
        assert_eq!(node(&r, &held).state, NodeState::Drained);

        // Back into rotation.
        assert_eq!(fepctl(&r, &["undrain", &held]).0, 0);
        assert_eq!(fepctl(&r, &["ratio", "echo", &held, "1"]).0, 0);
        assert!(http_names(&r, VIP_V4.into(), 10).contains(&held.to_string()));
    }

    fn a_dead_backend_is_routed_around_and_comes_back() {
        if skip_without_root("a_dead_backend_is_routed_around_and_comes_back") {
            return;
        }
        let mut r = start_with_agents(
            "fdd",
            3,
            "node_dead_after_ms = 1500\n",
            &services(&[("be1", 1), ("be2", 1), ("be3", 1)], ""),
        );
        assert_eq!(tally(&http_names(&r, VIP_V4.into(), 30), 3), [10, 10, 10]);

        r.lab.kill_backend(0);
        wait_for(&r, "be1 down", Duration::from_secs(15), |r| {
            node(r, "be1").state == NodeState::Down
        });
        let names = http_names(&r, VIP_V4.into(), 60);
        assert_eq!(
            tally(&names, 3),
            [0, 30, 30],
            "every new connection succeeds on the others"
        );

        // Back: server and agent restarted.
        let testsrv = fep_tools::lab::workspace_bin("fep-testsrv").unwrap();
        let agent = fep_tools::lab::workspace_bin("bep-agent").unwrap();
        let mut args = fep_tools::lab::testsrv_args(0, &[80], &[]);
        args.extend(["--echo".to_string(), "7000".to_string()]);
        r.lab.start_backend_server(0, &testsrv, &args).unwrap();
        r.lab.start_agent(0, &agent, &[80, 7000], 200, "").unwrap();
        wait_for(
            &r,
            "be1 back up with its ratio",
            Duration::from_secs(10),
            |r| backend(r, "web", "be1").effective_ratio == 1,
        );
        assert_eq!(node(&r, "be1").state, NodeState::Up);
        assert_eq!(
            tally(&http_names(&r, VIP_V4.into(), 30), 3),
            [10, 10, 10],
            "be1 is back in rotation with its share"
        );
    }

    fn pruning_deletes_the_routes_the_agent_says_are_idle_and_keeps_a_live_one() {
        if skip_without_root("pruning_deletes_the_routes_the_agent_says_are_idle_and_keeps_a_live_one")
        {
            return;
        }
        // Twenty routes restored from a snapshot, ten on each node, whose
        // connections the back ends do not have (as after a restart from an
        // old snapshot); established, and far from idling out: only pruning
        // can delete them.
        let top = "route_idle_timeout_s = 3600\nmetrics_listen = \"127.0.0.1:9100\"\n";
        let r = start_with_agents_after(
            "fpn",
            2,
            top,
            &services(&[("be1", 1), ("be2", 1)], ""),
            |lab| write_route_snapshot(&lab.state_dir(), "web", &[0, 1], 20),
        );
        assert_eq!(status(&r).routes, 20);
        // A live connection, left idle but open.
        let mut live = r
            .lab
            .client
            .enter(|| TcpStream::connect((VIP_V4, 80)).unwrap())
            .unwrap();
        live.set_read_timeout(Some(fep_tests::TIMEOUT)).unwrap();
        let mine = routes(&r, &["--client", "10.0.1.2"]);
        assert_eq!(mine.len(), 1, "{mine:?}");
        let held = mine[0].node.to_string();
        let other = if held == "be1" { "be2" } else { "be1" };
        // With the fast path, every one of them is installed in the kernel.
        let in_kernel = |n: u64| if fep_tools::lab::fast_path_on() { n } else { 0 };
        wait_for(&r, "the established routes in the kernel", fep_tests::TIMEOUT, |r| {
            status(r).fast_path.routes == in_kernel(21)
        });
        let before = fep_tests::scrape(&r, "127.0.0.1:9100");
        let pruned_before = fep_tests::metric(&before, "fep_routes_pruned_total");
        assert_eq!(pruned_before, Some(0.0), "nothing pruned before a trigger");
        // Idle for longer than a prune candidate must be, so that the round that
        // deletes the restored routes asks about the live one too.
        std::thread::sleep(Duration::from_millis(1500));

        // Ratio 0 puts the held node above its target share: pruning starts.
        let (code, out) = fepctl(&r, &["ratio", "web", &held, "0"]);
        assert_eq!(code, 0, "{out}");
        wait_for(
            &r,
            "the held node's restored routes pruned",
            Duration::from_secs(15),
            |r| node(r, &held).routes == 1,
        );
        let after = fep_tests::scrape(&r, "127.0.0.1:9100");
        assert_eq!(
            fep_tests::metric(&after, "fep_routes_pruned_total"),
            Some(10.0),
            "the ten restored routes of {held}, by pruning"
        );
        assert!(fep_tests::metric(&after, "fep_prune_cycles_total").unwrap() >= 1.0);
        wait_for(&r, "the pruned routes out of the kernel", fep_tests::TIMEOUT, |r| {
            status(r).fast_path.routes == in_kernel(11)
        });
        let status = status(&r);
        assert_eq!(status.routes_expired, 0, "none idled out or closed");
        assert_eq!(status.routes_evicted, 0);
        // The live one stays, on its node, and works; the other node, below its
        // target share, was not pruned at all.
        let left = routes(&r, &["--node", &held]);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].client, IpAddr::from([10, 0, 1, 2]));
        assert_eq!(node(&r, other).routes, 10);
        use std::io::Write;
        live.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        live.read_to_string(&mut reply).unwrap();
        assert!(
            reply.starts_with("HTTP/1.") && reply.trim_end().ends_with(held.as_str()),
            "the live connection still reaches {held}: {reply:?}"
        );
    }
}
