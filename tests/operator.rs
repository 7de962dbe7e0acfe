//! The operator surface end to end: every fepctl command against a running
//! fep with real traffic, the TCP admin API, Prometheus metrics, a restart
//! that keeps runtime changes, damaged state that stops fep, and reloads
//! good and bad.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use fep_shared::api::{NodeState, StatusView};
use fep_tests::{
    backend, fepctl, http, http_names, metric, node, nodes, promtool_check, routes, sample,
    skip_without_root, tally, wait_for, Running, TIMEOUT,
};
use fep_tools::lab::{self, Lab, VIP_V4};

const WEB_1_1: &str = r#"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
backend = [{ node = "be1", ratio = 1 }, { node = "be2", ratio = 1 }]
"#;

/// Three back ends serving HTTP on 80 and 8080; fep knows only be1 and be2,
/// with metrics and a TCP admin port on the gateway's loopback.
fn start(tag: &str) -> Running {
    let mut lab = Lab::new(tag, 3).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    lab.start_backend_servers(&testsrv, &[80, 8080], &[])
        .unwrap();
    let token = lab.dir().join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let key = lab
        .agent_key(&lab::workspace_bin("bep-agent").unwrap())
        .unwrap();
    let top = format!(
        "metrics_listen = \"127.0.0.1:9100\"\nadmin_listen = \"127.0.0.1:9442\"\nadmin_token_file = \"{}\"\nprune_interval_ms = 300\n\
         agent_listen = \"10.0.2.1:9441\"\nagent_key_file = \"{}\"\n",
        token.display(),
        key.display()
    );
    let config = lab.config_with_nodes(2, false, &top, WEB_1_1);
    let fep = lab
        .start_fep(&lab::workspace_bin("fep").unwrap(), &config)
        .unwrap();
    Running { lab, fep }
}

fn ok(r: &Running, args: &[&str]) -> String {
    let (code, out) = fepctl(r, args);
    assert_eq!(code, 0, "fepctl {args:?}: {out}\nfep log:\n{}", r.fep.log());
    out
}

fn get(r: &Running, vip: &str, port: u16) -> anyhow::Result<String> {
    let addr = SocketAddr::new(vip.parse().unwrap(), port);
    r.lab
        .client
        .enter(|| http::get(addr, "/", Duration::from_secs(2)).map(|r| r.body_text()))
        .unwrap()
}

#[test]
fn every_fepctl_command_against_a_running_fep() {
    if skip_without_root("every_fepctl_command_against_a_running_fep") {
        return;
    }
    let r = start("fop");
    let vip = VIP_V4.into();

    // Views, human and JSON (a node lacking a field of its view, such as
    // name, address, state, pinned, routes or services, does not read).
    let listed = nodes(&r);
    let be1 = &listed[0];
    assert_eq!(
        (be1.name.as_str(), be1.address, be1.state),
        ("be1", IpAddr::from([10, 0, 2, 11]), NodeState::Up)
    );
    assert!(!be1.pinned);
    assert_eq!(be1.services[0].configured_ratio, 1);
    assert_eq!(be1.services[0].effective_ratio, 1);
    assert!(ok(&r, &["status"]).contains("web tcp 10.0.0.100:80"));
    assert!(ok(&r, &["services"]).contains("be2"));
    assert!(ok(&r, &["nodes"]).contains("10.0.2.12"));
    // --json and --socket may come after the subcommand too.
    let socket = r.lab.control_socket();
    let (code, out) = fepctl(&r, &["status", "--json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str::<StatusView>(&out)
        .unwrap_or_else(|e| panic!("status --json printed no status view ({e}): {out}"));
    let direct = std::process::Command::new(lab::workspace_bin("fepctl").unwrap())
        .args(["nodes", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(direct.status.success());

    // ratio: new connections follow at once.
    ok(&r, &["ratio", "web", "be1", "0"]);
    assert_eq!(tally(&http_names(&r, vip, 20), 2), [0, 20]);
    ok(&r, &["ratio", "web", "be1", "1"]);

    // pin / unpin.
    ok(&r, &["pin", "be2", "--state", "down"]);
    assert!(node(&r, "be2").pinned);
    assert_eq!(tally(&http_names(&r, vip, 10), 2), [10, 0]);
    ok(&r, &["unpin", "be2"]);
    assert!(!node(&r, "be2").pinned);

    // routes with filters, over two connections held open (one per back end).
    let held: Vec<TcpStream> = r
        .lab
        .client
        .enter(|| {
            (0..2)
                .map(|_| TcpStream::connect_timeout(&SocketAddr::new(vip, 80), TIMEOUT).unwrap())
                .collect()
        })
        .unwrap();
    let mine = routes(&r, &["--service", "web", "--client", "10.0.1.2"]);
    assert!(mine.len() >= 2, "the held connections' routes: {mine:?}");
    assert!(mine
        .iter()
        .all(|x| x.client == IpAddr::from([10, 0, 1, 2]) && x.service == "web"));
    let none = routes(&r, &["--client", "10.0.1.99"]);
    assert_eq!(none.len(), 0, "{none:?}");
    assert_eq!(routes(&r, &["--limit", "1"]).len(), 1);
    for n in ["be1", "be2"] {
        let on = routes(&r, &["--node", n]);
        assert!(!on.is_empty(), "a held connection is on {n}");
        assert!(on.iter().all(|x| x.node == n), "{on:?}");
    }
    drop(held);

    // A node joins at runtime: its return path is set up and it gets its share.
    let (code, out) = fepctl(
        &r,
        &[
            "node",
            "add",
            "be3",
            "10.0.2.13",
            "--agent-address",
            "224.0.0.1",
        ],
    );
    assert!(code == 1 && out.contains("agent_address"), "{code}: {out}");
    ok(
        &r,
        &[
            "node",
            "add",
            "be3",
            "10.0.2.13",
            "--agent-address",
            "10.0.2.23",
        ],
    );
    assert_eq!(
        node(&r, "be3").agent_address,
        Some("10.0.2.23".parse().unwrap())
    );
    ok(&r, &["backend", "add", "web", "be3", "--ratio", "1"]);
    assert_eq!(tally(&http_names(&r, vip, 30), 3), [10, 10, 10]);
    assert!(r
        .lab
        .gateway
        .ip_output(&["rule"])
        .unwrap()
        .contains("from 10.0.2.13"));

    // ... and leaves: removed from the service, then refused until drained.
    ok(&r, &["backend", "remove", "web", "be3"]);
    assert_eq!(tally(&http_names(&r, vip, 10), 3)[2], 0);
    let (code, out) = fepctl(&r, &["node", "remove", "be3"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("drain it first"), "{out}");
    ok(&r, &["drain", "be3", "--wait", "--timeout", "15"]);
    ok(&r, &["node", "remove", "be3"]);
    let left: Vec<_> = nodes(&r).into_iter().map(|n| n.name).collect();
    assert_eq!(left, ["be1", "be2"]);
    fep_tests::wait_rule_gone(&r, "10.0.2.13");

    // A service comes and goes.
    ok(
        &r,
        &[
            "service",
            "add",
            "alt",
            "--vip",
            "10.0.0.101",
            "--port",
            "8080",
        ],
    );
    ok(&r, &["backend", "add", "alt", "be1", "--ratio", "1"]);
    assert_eq!(get(&r, "10.0.0.101", 8080).unwrap(), "be1");
    ok(&r, &["service", "remove", "alt"]);
    wait_for(
        &r,
        "alt's VIP route removed",
        Duration::from_secs(10),
        |r| {
            !r.lab
                .gateway
                .ip_output(&["route"])
                .unwrap()
                .contains("10.0.0.101")
        },
    );
    assert!(
        get(&r, "10.0.0.101", 8080).is_err(),
        "a removed service stops answering"
    );

    // The live view renders.
    let top = ok(&r, &["top", "--once"]);
    assert!(
        top.contains("fepctl top") && top.contains("web") && top.contains("be2"),
        "{top}"
    );
    assert!(
        top.lines().all(|l| l.chars().count() <= 80),
        "laid out for 80 columns: {top}"
    );

    // Errors say what exists; usage errors exit 2.
    let (code, out) = fepctl(&r, &["ratio", "web", "be9", "1"]);
    assert_eq!(code, 1);
    assert!(out.contains("no node 'be9'; nodes: be1, be2"), "{out}");
    let (code, out) = fepctl(&r, &["ratio", "nope", "be1", "1"]);
    assert_eq!(code, 1);
    assert!(out.contains("no service 'nope'; services: web"), "{out}");
    assert_eq!(fepctl(&r, &["frobnicate"]).0, 2);
    assert_eq!(fepctl(&r, &["ratio", "web"]).0, 2);
}

/// Scrapes fep's metrics from inside the gateway.
fn scrape(r: &Running) -> String {
    fep_tests::scrape(r, "127.0.0.1:9100")
}

/// As [`metric`]; the series must be there.
fn value(metrics: &str, series: &str) -> f64 {
    metric(metrics, series).unwrap_or_else(|| panic!("{series} not exported:\n{metrics}"))
}

#[test]
fn metrics_move_with_traffic_and_pass_promtool() {
    if skip_without_root("metrics_move_with_traffic_and_pass_promtool") {
        return;
    }
    let mut r = start("fme");
    // An agent on be1 (for its report age) and a pinned load on be2.
    r.lab
        .start_agent(0, &lab::workspace_bin("bep-agent").unwrap(), &[80], 200, "")
        .unwrap();
    wait_for(&r, "be1's agent reporting", Duration::from_secs(10), |r| {
        node(r, "be1").report_age_ms.is_some()
    });
    ok(&r, &["pin", "be2", "--load", "2.5"]);
    let before = scrape(&r);
    let names = http_names(&r, VIP_V4.into(), 30);
    assert_eq!(tally(&names, 2), [15, 15]);
    let after = scrape(&r);
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    let to_backend = delta(r#"fep_packets_total{direction="to_backend",service="web"}"#);
    let to_client = delta(r#"fep_packets_total{direction="to_client",service="web"}"#);
    // Each request: SYN, ACK, request, ACK, FIN, ACK at least toward the back end.
    assert!(
        to_backend >= 30.0 * 5.0,
        "to_backend packets moved by {to_backend}\n{after}"
    );
    assert!(
        to_client >= 30.0 * 4.0,
        "to_client packets moved by {to_client}"
    );
    assert!(delta(r#"fep_bytes_total{direction="to_client",service="web"}"#) > to_client * 40.0);
    for n in ["be1", "be2"] {
        let assigned = delta(&format!(
            r#"fep_route_assignments_total{{node="{n}",service="web"}}"#
        ));
        assert_eq!(assigned, 15.0, "route assignments of {n}");
    }
    assert_eq!(sample(&after, r#"fep_node_up{node="be1"}"#), 1.0);
    // One series per state, named as the API names it; the node's is 1.
    for (state, want) in [
        ("up", 1.0),
        ("down", 0.0),
        ("draining", 0.0),
        ("drained", 0.0),
    ] {
        let series = format!(r#"fep_node_state{{node="be1",state="{state}"}}"#);
        assert_eq!(sample(&after, &series), want, "{series}");
    }
    // be1's agent reports every 200 ms; be2 has no agent, and a pinned load.
    let age = value(&after, r#"fep_agent_report_age_seconds{node="be1"}"#);
    assert!((0.0..5.0).contains(&age), "be1's report age {age} s");
    assert!(
        !after.contains(r#"fep_agent_report_age_seconds{node="be2"}"#),
        "be2 has no agent, so no report age"
    );
    assert_eq!(
        value(&after, r#"fep_backend_load{node="be2",service="web"}"#),
        2.5,
        "be2's pinned load"
    );
    assert_eq!(
        sample(
            &after,
            r#"fep_backend_effective_ratio{node="be2",service="web"}"#
        ),
        1.0
    );
    assert!(after.contains("# TYPE fep_dropped_packets_total counter"));
    // Both workers run in the I/O mode this kernel allows.
    let io = fep_tests::expected_io();
    assert_eq!(
        sample(&after, &format!("fep_tun_workers{{io=\"{io}\"}}")),
        2.0
    );
    // Every metric the shipped Grafana dashboard draws is exported.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana-dashboard.json"
    ))
    .unwrap();
    for name in dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("fep_"))
    {
        assert!(
            after.contains(&format!("# TYPE {name} ")),
            "the dashboard uses {name}, which fep does not export"
        );
    }

    promtool_check(&after);
}

#[test]
fn a_restart_keeps_runtime_changes_and_reloads_apply_or_are_refused() {
    if skip_without_root("a_restart_keeps_runtime_changes_and_reloads_apply_or_are_refused") {
        return;
    }
    let mut r = start("frs");
    ok(&r, &["ratio", "web", "be1", "3"]);
    ok(&r, &["pin", "be2", "--load", "7"]);
    r.restart();
    let config = std::fs::read_to_string(r.lab.dir().join("fep.toml")).unwrap();
    assert_eq!(
        backend(&r, "web", "be1").configured_ratio,
        3,
        "the runtime ratio survived the restart"
    );
    assert_eq!(node(&r, "be2").pin.load, Some(7.0));
    assert_eq!(tally(&http_names(&r, VIP_V4.into(), 20), 2), [15, 5]);

    // A broken file is refused with the reason; the running config keeps serving.
    let path = r.lab.dir().join("fep.toml");
    std::fs::write(
        &path,
        config.replace(
            "ratio = 1 }, { node = \"be2\"",
            "ratio = 1 }, { node = \"be9\"",
        ),
    )
    .unwrap();
    let (code, out) = fepctl(&r, &["reload"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("reload refused") && out.contains("no node 'be9'"),
        "{out}"
    );
    assert_eq!(tally(&http_names(&r, VIP_V4.into(), 8), 2), [6, 2]);

    // A good change to the file, by SIGHUP: what the file changed applies;
    // the runtime ratio of be1 (which the file did not change) stays.
    std::fs::write(
        &path,
        config.replace(
            "{ node = \"be2\", ratio = 1 }",
            "{ node = \"be2\", ratio = 2 }",
        ),
    )
    .unwrap();
    r.fep.signal(libc::SIGHUP);
    wait_for(
        &r,
        "the reload to apply be2's new ratio",
        Duration::from_secs(5),
        |r| backend(r, "web", "be2").configured_ratio == 2,
    );
    assert_eq!(backend(&r, "web", "be1").configured_ratio, 3);
    assert!(r.fep.log().contains("reloaded"));
}

/// The mode bits of a file.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The files in `dir` whose name starts with `prefix`, with their bytes.
fn files_named(dir: &std::path::Path, prefix: &str) -> Vec<Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect()
}

/// Starts fep, which must refuse: exit status 2 before setting anything up,
/// with a message naming `file` and `--discard-state`; returns the message.
fn refused_start(r: &Running, config: &str, file: &std::path::Path) -> String {
    let mut fep = r
        .lab
        .spawn_fep(&lab::workspace_bin("fep").unwrap(), config, &[])
        .unwrap();
    let status = fep.wait(Duration::from_secs(15)).unwrap();
    let log = fep.log();
    assert_eq!(status.code(), Some(2), "fep must refuse to start:\n{log}");
    assert!(
        log.contains(&file.display().to_string()) && log.contains("--discard-state"),
        "the message names the file and what to do:\n{log}"
    );
    assert!(
        r.lab.gateway.ip(&["link", "show", "fep0"]).is_err(),
        "a refused start sets nothing up"
    );
    log
}

#[test]
fn damaged_state_stops_fep_until_the_operator_discards_it() {
    if skip_without_root("damaged_state_stops_fep_until_the_operator_discards_it") {
        return;
    }
    let mut r = start("fds");
    let state_dir = r.lab.dir().join("state");
    let (state, routes) = (state_dir.join("state.json"), state_dir.join("routes.bin"));
    ok(&r, &["ratio", "web", "be1", "0"]);
    assert_eq!(tally(&http_names(&r, VIP_V4.into(), 4), 2), [0, 4]);
    assert!(r.fep.stop().unwrap().success());
    // What the stop left for a restart goes, so a refused start shows it
    // sets nothing up.
    assert!(fep_tests::cleanup(&r).status.success());
    // They hold client addresses: root only.
    assert_eq!(mode(&state), 0o600, "state.json");
    assert_eq!(mode(&routes), 0o600, "routes.bin");

    // state.json cut in half: fep refuses to start and leaves it alone.
    let text = std::fs::read(&state).unwrap();
    let half = text[..text.len() / 2].to_vec();
    std::fs::write(&state, &half).unwrap();
    let config = std::fs::read_to_string(r.lab.dir().join("fep.toml")).unwrap();
    let log = refused_start(&r, &config, &state);
    assert!(log.contains("is damaged"), "{log}");
    assert_eq!(std::fs::read(&state).unwrap(), half, "not overwritten");

    // The operator gives up the saved changes: fep starts from the file
    // (be1 back in rotation) and keeps the damaged file aside.
    r.fep = r
        .lab
        .start_fep_with(
            &lab::workspace_bin("fep").unwrap(),
            &config,
            &["--discard-state"],
        )
        .unwrap();
    assert!(r.fep.log().contains("moved it to"), "{}", r.fep.log());
    assert_eq!(files_named(&state_dir, "state.json.discarded-"), [half]);
    assert_eq!(backend(&r, "web", "be1").configured_ratio, 1);
    assert_eq!(tally(&http_names(&r, VIP_V4.into(), 10), 2), [5, 5]);
    // Saved on the state writer's own thread: polled for.
    wait_for(&r, "a new state.json", Duration::from_secs(10), |_| {
        state.exists()
    });
    assert_eq!(mode(&state), 0o600, "the new state.json");

    // A longer name than fep can keep in its snapshot is refused at runtime too.
    let (code, out) = fepctl(&r, &["node", "add", &"n".repeat(256), "10.0.2.13"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("names are at most 255 bytes"), "{out}");

    // A route snapshot from a newer fep is not overwritten either.
    assert!(r.fep.stop().unwrap().success());
    assert!(fep_tests::cleanup(&r).status.success());
    let mut newer = std::fs::read(&routes).unwrap();
    newer[4] = 9;
    std::fs::write(&routes, &newer).unwrap();
    let log = refused_start(&r, &config, &routes);
    assert!(log.contains("written by a newer fep"), "{log}");
    assert_eq!(std::fs::read(&routes).unwrap(), newer);
}

#[test]
fn the_admin_api_refuses_tcp_requests_without_the_token_and_the_socket_is_private() {
    if skip_without_root("the_admin_api_refuses_tcp_requests_without_the_token") {
        return;
    }
    let r = start("ftk");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(r.lab.control_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is for root only");

    let raw = |auth: &str| {
        r.lab
            .gateway
            .enter(|| {
                use std::io::{Read, Write};
                let mut s = TcpStream::connect("127.0.0.1:9442").unwrap();
                write!(
                    s,
                    "GET /v1/nodes HTTP/1.1\r\nHost: fep\r\nConnection: close\r\n{auth}\r\n"
                )
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
            .unwrap()
    };
    assert!(raw("").starts_with("HTTP/1.1 401"), "no token");
    assert!(
        raw("Authorization: Bearer wrong-token-wrong-token\r\n").starts_with("HTTP/1.1 401"),
        "wrong token"
    );
    assert!(
        raw("Authorization: Bearer 0123456789abcdef0123456789abcdef\r\n")
            .starts_with("HTTP/1.1 200")
    );

    // fepctl over TCP, from inside the gateway.
    let out = r
        .lab
        .gateway
        .command(lab::workspace_bin("fepctl").unwrap())
        .args(["--tcp", "127.0.0.1:9442", "--token-file"])
        .arg(r.lab.dir().join("admin.token"))
        .args(["--json", "nodes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"be1\""));
}

const ECHO_1_1: &str = r#"
[[service]]
name = "echo"
vip = "10.0.0.100"
port = 7000
protocol = "tcp"
backend = [{ node = "be1", ratio = 1 }, { node = "be2", ratio = 1 }]
"#;

#[test]
fn a_closed_connections_lingering_route_is_counted_apart_from_live_ones_in_every_view() {
    if skip_without_root(
        "a_closed_connections_lingering_route_is_counted_apart_from_live_ones_in_every_view",
    ) {
        return;
    }
    let r = fep_tests::start_for_agents(
        "fcl",
        2,
        "metrics_listen = \"127.0.0.1:9100\"\n",
        ECHO_1_1,
        |_| {},
    );
    let (first, closed) = fep_tests::open_echo(&r);
    let (mut second, open) = fep_tests::open_echo(&r);
    assert_ne!(closed, open, "ratio 1:1 places the two apart");
    let status = || fep_tests::status(&r);
    assert_eq!((status().routes, status().closing), (2, 0));

    // The client closes the first; the back end closes too: the route
    // lingers (about 4 s) for the last ACKs, no longer a connection.
    drop(first);
    wait_for(&r, "the first route closing", Duration::from_secs(3), |r| {
        fep_tests::status(r).closing == 1
    });
    let s = status();
    assert_eq!((s.routes, s.closing), (1, 1), "{s:?}");
    let svc = fep_tests::service(&r, "echo");
    assert_eq!((svc.routes, svc.closing), (1, 1));
    let of = |node: &str| backend(&r, "echo", node);
    assert_eq!((of(&closed).routes, of(&closed).closing), (0, 1));
    assert_eq!((of(&open).routes, of(&open).closing), (1, 0));
    assert_eq!(
        (of(&closed).share, of(&open).share),
        (0.0, 1.0),
        "shares are of open connections, not leftovers"
    );
    assert_eq!(
        (node(&r, &closed).routes, node(&r, &closed).closing),
        (0, 1)
    );
    let metrics = scrape(&r);
    for (n, state, want) in [
        (&closed, "live", 0.0),
        (&closed, "closing", 1.0),
        (&open, "live", 1.0),
        (&open, "closing", 0.0),
    ] {
        let series = format!(r#"fep_routes{{node="{n}",service="echo",state="{state}"}}"#);
        assert_eq!(value(&metrics, &series), want, "{series}");
    }
    let text = ok(&r, &["status"]);
    assert!(text.contains("routes 1 live, 1 closing"), "{text}");
    fep_tests::assert_aligned(
        &text,
        &["NODE", "ADDRESS", "STATE", "AGENT"],
        &["ROUTES", "CLOSING", "CPU"],
    );
    let text = ok(&r, &["services"]);
    assert!(
        text.contains("echo tcp 10.0.0.100:7000 scheduler ratio — 1 live route(s), 1 closing"),
        "{text}"
    );
    fep_tests::assert_aligned(
        &text,
        &["NODE", "UP"],
        &["RATIO", "ROUTES", "CLOSING", "SHARE", "TARGET"],
    );
    let text = ok(&r, &["nodes"]);
    fep_tests::assert_aligned(&text, &["NODE", "STATE"], &["ROUTES", "CLOSING"]);
    let text = ok(&r, &["top", "--once"]);
    assert!(text.contains("1 live routes, 1 closing"), "{text}");

    // Once it has lingered, the route goes; the open connection still works.
    wait_for(&r, "the closed route gone", Duration::from_secs(15), |r| {
        fep_tests::status(r).closing == 0
    });
    assert_eq!(status().routes, 1);
    second.get_mut().write_all(b"still here\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut second, &mut line).unwrap();
    assert_eq!(line, "still here\n");
}
