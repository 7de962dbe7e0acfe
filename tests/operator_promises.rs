//! README promises to the operator, end to end: IPv6 path MTU discovery,
//! eviction near `max_routes` and `max_routes` on reload, removals with and
//! without `--force`, reloads (restart-only keys, the three-way merge,
//! removed back ends and services whose connections carry on), the set-up
//! a restart takes over and `--cleanup` puts back, drains and pins across a
//! restart, the admin API's error answers, fepctl's flags, and a UDP route
//! idling out.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use fep_shared::api::{ApiError, Count, Done, NodeState};
use fep_shared::config::{Protocol, Scheduler};
use fep_tests::{
    backend, counters, dropped, echo, fepctl, http, node, open_echo, open_echo_to, sample, scrape,
    service, service_views, skip_without_root, start, start_with_top, status, sysctl, wait_for,
    Running, TIMEOUT,
};
use fep_tools::admin_client::{self, AdminAddress};
use fep_tools::lab::{self, Lab, VIP_V4, VIP_V6};

const METRICS: &str = "127.0.0.1:9100";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn ok(r: &Running, args: &[&str]) -> String {
    let (code, out) = fepctl(r, args);
    assert_eq!(code, 0, "fepctl {args:?}: {out}\nfep log:\n{}", r.fep.log());
    out
}

fn routes(r: &Running) -> u64 {
    status(r).routes as u64
}

/// `config` with the line of top-level `key` replaced by `key = value`.
fn with_key(config: &str, key: &str, value: &str) -> String {
    let mut found = false;
    let out: Vec<String> = config
        .lines()
        .map(|l| {
            if !found && l.split('=').next().is_some_and(|k| k.trim() == key) {
                found = true;
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "no `{key}` in the config:\n{config}");
    out.join("\n") + "\n"
}

fn config_path(r: &Running) -> std::path::PathBuf {
    r.lab.dir().join("fep.toml")
}

fn config_of(r: &Running) -> String {
    std::fs::read_to_string(config_path(r)).unwrap()
}

/// A TCP echo service `name` on `vip`:7000 with back ends `nodes` (ratio 1).
fn echo_service(name: &str, vip: &str, nodes: &[&str]) -> String {
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{{ node = \"{n}\", ratio = 1 }}"))
        .collect();
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 7000\nprotocol = \"tcp\"\nbackend = [{}]\n\n",
        list.join(", ")
    )
}

/// Three back ends serving HTTP on 80 and echo on 7000, no agents; fep with
/// every listener (metrics, TCP admin with a token, agent port), every
/// restart-only key written out, and `services`.
fn start_full(tag: &str, services: &str) -> Running {
    let mut lab = Lab::new(tag, 3).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    for i in 0..3 {
        let mut args = lab::testsrv_args(i, &[80], &[]);
        args.extend(["--echo".to_string(), "7000".to_string()]);
        lab.start_backend_server(i, &testsrv, &args).unwrap();
    }
    let token = lab.dir().join("admin.token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let key = lab
        .agent_key(&lab::workspace_bin("bep-agent").unwrap())
        .unwrap();
    let top = format!(
        "tun = \"fep0\"\nworkers = 2\npolicy_table = 100\ntun_queue_len = 4096\ntun_batching = true\nfast_path = \"off\"\n\
         metrics_listen = \"{METRICS}\"\nadmin_listen = \"127.0.0.1:9442\"\nadmin_token_file = \"{}\"\n\
         agent_listen = \"10.0.2.1:9441\"\nagent_key_file = \"{}\"\nprune_interval_ms = 300\n\
         health_check_interval_ms = 300\nhealth_check_timeout_ms = 1000\nhealth_check_fails = 2\n",
        token.display(),
        key.display()
    );
    Running::start(lab, &top, services)
}

/// True once the echo connection no longer answers (within 3 s).
fn broken(conn: &mut BufReader<TcpStream>) -> bool {
    conn.get_ref()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    if conn.get_mut().write_all(b"anyone there?\n").is_err() {
        return true;
    }
    let mut back = String::new();
    !matches!(conn.read_line(&mut back), Ok(n) if n > 0 && back.trim() == "anyone there?")
}

/// The routes `fepctl routes --json` lists with `filter` (e.g. `--node be2`).
fn listed(r: &Running, filter: &[&str]) -> usize {
    fep_tests::routes(r, filter).len()
}

/// `n` UDP flows from the client to the VIP's port 5353, one datagram each
/// (unconfirmed routes); the sockets are kept so their ports stay distinct.
fn udp_flows(r: &Running, n: usize) -> Vec<UdpSocket> {
    r.lab
        .client
        .enter(|| {
            (0..n)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.send_to(b"hello", (VIP_V4, 5353)).unwrap();
                    s
                })
                .collect()
        })
        .unwrap()
}

fn evicted_metric(r: &Running) -> f64 {
    sample(&scrape(r, METRICS), "fep_routes_evicted_total")
}

#[test]
fn routes_are_evicted_near_max_routes_which_a_reload_lowers_but_cannot_raise() {
    if skip_without_root("routes_are_evicted_near_max_routes") {
        return;
    }
    // 204 is exactly what a table sized for 204 holds (256 slots at 80 %).
    let services =
        "[[service]]\nname = \"dns\"\nvip = \"10.0.0.100\"\nport = 5353\nprotocol = \"udp\"\n\
                    backend = [{ node = \"be1\", ratio = 1 }, { node = \"be2\", ratio = 1 }]\n";
    let top = format!("max_routes = 204\nmetrics_listen = \"{METRICS}\"\n");
    let r = start_with_top("pev", 2, false, &[], &[5353], &top, services);
    assert_eq!(evicted_metric(&r), 0.0);

    // 200 routes: above 95 % (194), so the expiry pass evicts to 90 % (184).
    let _first = udp_flows(&r, 200);
    wait_for(&r, "the eviction warning", Duration::from_secs(10), |r| {
        r.fep.log().contains("route table near max_routes: evicted")
    });
    wait_for(
        &r,
        "the table back under 95 %",
        Duration::from_secs(10),
        |r| routes(r) <= 194,
    );
    let evicted = evicted_metric(&r);
    assert!(evicted >= 6.0, "fep_routes_evicted_total is {evicted}");

    // Lowered by a reload: in force at once, evicted down to 90 of 100.
    let config = config_of(&r);
    std::fs::write(config_path(&r), with_key(&config, "max_routes", "100")).unwrap();
    ok(&r, &["reload"]);
    wait_for(
        &r,
        "evictions down to 90 routes",
        Duration::from_secs(10),
        |r| routes(r) <= 95,
    );
    let after_lowering = evicted_metric(&r);
    assert!(
        after_lowering >= evicted + 80.0,
        "fep_routes_evicted_total went from {evicted} to {after_lowering}"
    );

    // Raised by a reload: it holds at what the table was sized for.
    std::fs::write(config_path(&r), with_key(&config, "max_routes", "1000")).unwrap();
    ok(&r, &["reload"]);
    assert!(
        r.fep.log().contains(
            "max_routes = 1000 is more than the route table was sized for at the start; \
             it holds 204 until fep restarts"
        ),
        "{}",
        r.fep.log()
    );
    let before = counters(&r);
    let _more = udp_flows(&r, 300);
    // 90 + 300 flows would fit under 1000; under 204 the table made room.
    wait_for(&r, "the new flows handled", Duration::from_secs(10), |r| {
        let c = counters(r);
        c.get(Count::RoutesCreated) + dropped(&c, "table_full")
            >= before.get(Count::RoutesCreated) + dropped(&before, "table_full") + 300
    });
    let n = routes(&r);
    assert!(n <= 204, "{n} routes under max_routes 204");
    let c = counters(&r);
    let made_room = c.get(Count::UnconfirmedEvicted) + dropped(&c, "table_full")
        - before.get(Count::UnconfirmedEvicted)
        - dropped(&before, "table_full");
    assert!(made_room >= 100, "the table was full: {c:?}");
}

#[test]
fn removals_with_force_delete_routes_and_without_let_connections_carry_on() {
    if skip_without_root("removals_with_force_delete_routes") {
        return;
    }
    let r = start_full(
        "pfr",
        &echo_service("echo", "10.0.0.100", &["be1", "be2", "be3"]),
    );
    // One connection on each back end (1:1:1 in table order).
    let mut conns: Vec<_> = (0..3).map(|_| open_echo(&r)).collect();
    let names: Vec<&str> = conns.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["be1", "be2", "be3"]);

    // A back end removed without --force: its connection carries on, new
    // ones go elsewhere.
    ok(&r, &["backend", "remove", "echo", "be1"]);
    echo(&mut conns[0].0, "be1 still serves its connection");
    for _ in 0..4 {
        assert_ne!(
            open_echo(&r).1,
            "be1",
            "no new connection to a removed back end"
        );
    }
    // With --force: its routes are deleted, the connection ends.
    assert!(listed(&r, &["--node", "be2"]) >= 1);
    ok(&r, &["backend", "remove", "echo", "be2", "--force"]);
    assert_eq!(listed(&r, &["--node", "be2"]), 0);
    assert!(
        broken(&mut conns[1].0),
        "a forced removal ends the connection"
    );
    echo(&mut conns[0].0, "be1 unaffected");

    // A node with routes: refused without --force (and the connection
    // carries on), deleted with it.
    let (code, out) = fepctl(&r, &["node", "remove", "be3"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("drain it first"), "{out}");
    echo(&mut conns[2].0, "be3 still serves");
    // be3 is the only back end left: new connections keep it busy.
    let extra = open_echo(&r);
    assert_eq!(extra.1, "be3");
    ok(&r, &["node", "remove", "be3", "--force"]);
    assert_eq!(listed(&r, &["--node", "be3"]), 0);
    assert!(broken(&mut conns[2].0));
    fep_tests::wait_rule_gone(&r, "10.0.2.13");

    // A service removed without --force: its connection carries on, no
    // new connection is accepted; with --force its routes go.
    for (name, vip) in [("keep", "10.0.0.101"), ("gone", "10.0.0.102")] {
        ok(
            &r,
            &["service", "add", name, "--vip", vip, "--port", "7000"],
        );
        ok(&r, &["backend", "add", name, "be2", "--ratio", "1"]);
    }
    let at = |vip: &str| SocketAddr::new(vip.parse().unwrap(), 7000);
    let (mut keep, _) = open_echo_to(&r, at("10.0.0.101"));
    let (mut gone, _) = open_echo_to(&r, at("10.0.0.102"));
    ok(&r, &["service", "remove", "keep"]);
    ok(&r, &["service", "remove", "gone", "--force"]);
    assert_eq!(listed(&r, &["--service", "gone"]), 0);
    assert!(broken(&mut gone));
    echo(&mut keep, "a removed service's connection carries on");
    let refused = r
        .lab
        .client
        .enter(|| TcpStream::connect_timeout(&at("10.0.0.101"), Duration::from_secs(2)))
        .unwrap();
    assert!(
        refused.is_err(),
        "a removed service takes no new connection"
    );
    echo(&mut conns[0].0, "be1 unaffected to the end");
}

/// A POST to the admin API over the socket: the status and the body, read
/// as the API's view `T`.
fn post<T: serde::de::DeserializeOwned>(r: &Running, path: &str, body: &str) -> (u16, T) {
    let (status, text) = admin_client::request(
        &AdminAddress::Socket(r.lab.control_socket()),
        "POST",
        path,
        Some(body),
    )
    .unwrap();
    let view = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{path} {body}: not {} ({e}): {text:?}",
            std::any::type_name::<T>()
        )
    });
    (status, view)
}

/// The request is answered `code` with `{"error": …}` containing `says`.
fn refused(r: &Running, path: &str, body: &str, code: u16, says: &str) {
    let (status, answer) = post::<ApiError>(r, path, body);
    assert_eq!(status, code, "{path} {body}: {answer:?}");
    assert!(answer.error.contains(says), "{path} {body}: {answer:?}");
}

#[test]
fn the_admin_api_answers_400_or_404_with_an_error_and_every_fepctl_flag_works() {
    if skip_without_root("the_admin_api_answers_400_or_404") {
        return;
    }
    let r = start_full("pap", &echo_service("echo", "10.0.0.100", &["be1", "be2"]));

    // Unknown names: 404, saying what exists.
    let no_node = "no node 'be9'; nodes: be1, be2, be3";
    refused(
        &r,
        "/v1/ratio",
        r#"{"service":"echo","node":"be9","ratio":1}"#,
        404,
        no_node,
    );
    refused(
        &r,
        "/v1/ratio",
        r#"{"service":"nope","node":"be1","ratio":1}"#,
        404,
        "no service 'nope'; services: echo",
    );
    refused(&r, "/v1/drain", r#"{"node":"be9"}"#, 404, no_node);
    refused(&r, "/v1/pin", r#"{"node":"be9","load":1}"#, 404, no_node);
    refused(&r, "/v1/node/remove", r#"{"name":"be9"}"#, 404, no_node);
    refused(
        &r,
        "/v1/backend/remove",
        r#"{"service":"echo","node":"be3"}"#,
        404,
        "not a back end or spare of service 'echo'",
    );
    refused(
        &r,
        "/v1/service/remove",
        r#"{"name":"nope"}"#,
        404,
        "no service",
    );
    // Refused changes: 400, saying why.
    refused(
        &r,
        "/v1/ratio",
        r#"{"service":"echo","node":"be1","ratio":2000000}"#,
        400,
        "above the maximum",
    );
    refused(
        &r,
        "/v1/node/add",
        r#"{"name":"be1","address":"10.0.2.19"}"#,
        400,
        "node 'be1' already exists",
    );
    refused(
        &r,
        "/v1/node/add",
        r#"{"name":"be4","address":"10.0.2.11"}"#,
        400,
        "invalid",
    );
    refused(
        &r,
        "/v1/node/remove",
        r#"{"name":"be1"}"#,
        400,
        "drain it first",
    );
    refused(
        &r,
        "/v1/backend/add",
        r#"{"service":"echo","node":"be1","ratio":1}"#,
        400,
        "already exists",
    );
    refused(
        &r,
        "/v1/backend/add",
        r#"{"service":"echo","node":"be3","ratio":2000000}"#,
        400,
        "",
    );
    // A request that is not what the path takes.
    refused(
        &r,
        "/v1/drain",
        r#"{"nod":"be1"}"#,
        400,
        "missing field `node`",
    );
    refused(&r, "/v1/ratio", "not json", 400, "JSON");
    // Nothing changed.
    assert_eq!(backend(&r, "echo", "be1").configured_ratio, 1);
    assert!(!node(&r, "be1").pinned);

    // fepctl: --json after a subcommand with arguments, and on a change.
    let (code, out) = fepctl(&r, &["ratio", "echo", "be2", "2", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert!(serde_json::from_str::<Done>(&out).unwrap().ok);
    assert_eq!(backend(&r, "echo", "be2").configured_ratio, 2);
    // pin --ratio and --load, one after the other: both stay pinned.
    ok(&r, &["pin", "be1", "--ratio", "3"]);
    ok(&r, &["pin", "be1", "--load", "1.5"]);
    let pin = &node(&r, "be1").pin;
    assert_eq!((pin.ratio, pin.load), (Some(3), Some(1.5)));
    assert_eq!(backend(&r, "echo", "be1").effective_ratio, 3);
    ok(&r, &["unpin", "be1"]);
    // drain (at once), --wait that times out (exit 1) on a live connection,
    // undrain.
    let (mut held, on) = open_echo(&r);
    ok(&r, &["drain", &on]);
    assert_eq!(node(&r, &on).state, NodeState::Draining);
    let (code, out) = fepctl(&r, &["drain", &on, "--wait", "--timeout", "1"]);
    assert_eq!(code, 1, "{out}");
    echo(&mut held, "a draining node keeps its connection");
    ok(&r, &["undrain", &on]);
    wait_for(&r, "back in rotation", Duration::from_secs(5), |r| {
        node(r, &on).state == NodeState::Up
    });
    // backend add --port, service add --protocol --scheduler --affinity.
    ok(
        &r,
        &[
            "service",
            "add",
            "alt",
            "--vip",
            "10.0.0.101",
            "--port",
            "8000",
            "--protocol",
            "tcp",
            "--scheduler",
            "least-routes",
            "--affinity",
            "client",
        ],
    );
    for be in ["be3", "be2"] {
        ok(
            &r,
            &["backend", "add", "alt", be, "--ratio", "1", "--port", "80"],
        );
    }
    // A connection held open: least-routes alone would send the next ones
    // to the other back end; client affinity keeps them all on its one.
    let alt_addr: SocketAddr = "10.0.0.101:8000".parse().unwrap();
    let _held = r
        .lab
        .client
        .enter(|| TcpStream::connect_timeout(&alt_addr, TIMEOUT))
        .unwrap()
        .unwrap();
    let names: Vec<String> = (0..4)
        .map(|_| {
            r.lab
                .client
                .enter(|| http::get(alt_addr, "/", TIMEOUT))
                .unwrap()
                .unwrap()
                .body_text()
        })
        .collect();
    assert!(
        names.iter().all(|n| *n == names[0]) && ["be2", "be3"].contains(&names[0].as_str()),
        "one back end (port 80) serves every connection of the client: {names:?}"
    );
    let alt = service(&r, "alt");
    assert_eq!(alt.scheduler, Scheduler::LeastRoutes, "{alt:?}");
    ok(
        &r,
        &[
            "service",
            "add",
            "dns",
            "--vip",
            "10.0.0.101",
            "--port",
            "53",
            "--protocol",
            "udp",
        ],
    );
    assert!(service_views(&r)
        .iter()
        .any(|s| s.name == "dns" && s.protocol == Protocol::Udp));
    // routes: the human listing says how many the table holds when cut.
    for _ in 0..3 {
        open_echo(&r);
    }
    let out = ok(&r, &["routes", "--limit", "1"]);
    assert!(
        out.contains("the first 1 shown; ") && out.contains(" route(s) in the table"),
        "{out}"
    );
    // --tcp and --token-file after the subcommand.
    let out = r
        .lab
        .gateway
        .command(lab::workspace_bin("fepctl").unwrap())
        .args(["nodes", "--json", "--tcp", "127.0.0.1:9442", "--token-file"])
        .arg(r.lab.dir().join("admin.token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"be3\""));
    // top --interval with --once: one frame.
    let top = ok(&r, &["top", "--interval", "0.2", "--once"]);
    assert!(top.contains("echo") && top.contains("be1"), "{top}");
}

#[test]
fn reloads_refuse_restart_only_keys_and_apply_what_the_file_changed() {
    if skip_without_root("reloads_refuse_restart_only_keys") {
        return;
    }
    let services = echo_service("echo", "10.0.0.100", &["be1", "be2", "be3"])
        + &echo_service("echo2", "10.0.0.101", &["be1"]);
    let r = start_full("prl", &services);
    let config = config_of(&r);
    let dir = r.lab.dir();
    let other = |name: &str, from: &str| {
        let path = dir.join(name);
        std::fs::copy(dir.join(from), &path).unwrap();
        format!("\"{}\"", path.display())
    };
    let restart_only = [
        ("tun", "\"fep9\"".to_string()),
        ("workers", "1".into()),
        ("policy_table", "101".into()),
        ("admin_listen", "\"127.0.0.1:9443\"".into()),
        ("metrics_listen", "\"127.0.0.1:9101\"".into()),
        ("agent_listen", "\"10.0.2.1:9444\"".into()),
        ("admin_token_file", other("admin2.token", "admin.token")),
        ("agent_key_file", other("agent2.key", "agent.key")),
        ("state_dir", format!("\"{}\"", dir.join("state2").display())),
        (
            "control_socket",
            format!("\"{}\"", dir.join("other.sock").display()),
        ),
        ("health_check_interval_ms", "400".into()),
        ("health_check_timeout_ms", "900".into()),
        ("prune_interval_ms", "400".into()),
        ("tun_queue_len", "1024".into()),
        ("tun_batching", "false".into()),
        ("fast_path", "\"tc-bpf\"".into()),
    ];
    for (key, value) in &restart_only {
        std::fs::write(config_path(&r), with_key(&config, key, value)).unwrap();
        let (code, out) = fepctl(&r, &["reload"]);
        assert_eq!(code, 1, "changing {key} by a reload: {out}");
        assert!(
            out.contains(&format!("changing `{key}` needs a restart of fep")),
            "{key}: {out}"
        );
    }
    std::fs::write(config_path(&r), &config).unwrap();
    ok(&r, &["reload"]);

    // Runtime changes, then a file that changes be1's ratio (which the
    // operator changed too), removes be2 and the service echo2.
    ok(&r, &["ratio", "echo", "be1", "3"]);
    ok(&r, &["ratio", "echo", "be3", "4"]);
    let mut on_be2 = None;
    for _ in 0..10 {
        let (conn, name) = open_echo(&r);
        if name == "be2" {
            on_be2 = Some(conn);
            break;
        }
    }
    let mut on_be2 = on_be2.expect("a connection on be2 within 10");
    let (mut on_echo2, _) = open_echo_to(&r, "10.0.0.101:7000".parse().unwrap());
    let changed = config
        .replace(
            "backend = [{ node = \"be1\", ratio = 1 }, { node = \"be2\", ratio = 1 }, { node = \"be3\", ratio = 1 }]",
            "backend = [{ node = \"be1\", ratio = 5 }, { node = \"be3\", ratio = 1 }]",
        )
        .replace(&echo_service("echo2", "10.0.0.101", &["be1"]), "");
    assert_ne!(changed, config);
    std::fs::write(config_path(&r), &changed).unwrap();
    ok(&r, &["reload"]);
    assert_eq!(
        backend(&r, "echo", "be1").configured_ratio,
        5,
        "the file wins for what it changed"
    );
    assert_eq!(
        backend(&r, "echo", "be3").configured_ratio,
        4,
        "the runtime value stays for what the file did not change"
    );
    let names: Vec<String> = service_views(&r).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["echo"]);
    // Their live connections carry on; no new one goes to them.
    echo(
        &mut on_be2,
        "a back end the file removed keeps its connection",
    );
    echo(
        &mut on_echo2,
        "a service the file removed keeps its connection",
    );
    for _ in 0..4 {
        assert_ne!(open_echo(&r).1, "be2");
    }
    let refused = r
        .lab
        .client
        .enter(|| {
            TcpStream::connect_timeout(&"10.0.0.101:7000".parse().unwrap(), Duration::from_secs(2))
        })
        .unwrap();
    assert!(
        refused.is_err(),
        "the removed service takes no new connection"
    );
}

#[test]
fn a_start_takes_over_a_killed_feps_set_up_and_cleanup_puts_the_sysctls_back() {
    if skip_without_root("a_start_takes_over_a_killed_feps_set_up") {
        return;
    }
    let mut lab = Lab::new("psy", 3).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    for i in 0..3 {
        let mut args = lab::testsrv_args(i, &[80], &[]);
        args.extend(["--echo".to_string(), "7000".to_string()]);
        lab.start_backend_server(i, &testsrv, &args).unwrap();
    }
    // Forwarding is off before fep's first start.
    let (v4, v6) = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding");
    assert_eq!(
        (sysctl(&lab.gateway, v4), sysctl(&lab.gateway, v6)),
        ("0".into(), "0".into())
    );
    let v6_service = format!(
        "[[node]]\nname = \"be1v6\"\naddress = \"{}\"\n\n[[service]]\nname = \"web6\"\nvip = \"{VIP_V6}\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{{ node = \"be1v6\", ratio = 1 }}]\n\n",
        lab::backend_v6(0)
    );
    let services = v6_service.clone() + &echo_service("echo", "10.0.0.100", &["be1", "be2", "be3"]);
    let config = lab.config(false, "", &services);
    let fep_bin = lab::workspace_bin("fep").unwrap();
    let fep = lab.start_fep(&fep_bin, &config).unwrap();
    let mut r = Running { lab, fep };
    let gw = &r.lab.gateway;
    assert_eq!((sysctl(gw, v4), sysctl(gw, v6)), ("1".into(), "1".into()));
    let (mut conn, on) = open_echo(&r);
    assert_eq!(on, "be1");
    ok(&r, &["drain", "be2"]);
    ok(&r, &["pin", "be1", "--load", "7"]);
    // The route is journaled within 50 ms.
    std::thread::sleep(Duration::from_millis(500));

    // kill -9, then a start with be3 gone from the file.
    r.fep.signal(libc::SIGKILL);
    let _ = r.fep.wait(Duration::from_secs(5));
    let rules = r.lab.gateway.ip_output(&["rule"]).unwrap();
    assert!(
        rules.contains("from 10.0.2.13"),
        "the killed fep left: {rules}"
    );
    let without_be3 = r.lab.config_with_nodes(
        2,
        false,
        "",
        &(v6_service + &echo_service("echo", "10.0.0.100", &["be1", "be2"])),
    );
    r.fep = r.lab.start_fep(&fep_bin, &without_be3).unwrap();
    let gw = &r.lab.gateway;
    fep_tests::wait_rule_gone(&r, "10.0.2.13");
    let rules = gw.ip_output(&["rule"]).unwrap();
    assert!(
        rules.contains("from 10.0.2.11") && rules.contains("from 10.0.2.12"),
        "the rules still needed stay: {rules}"
    );
    echo(
        &mut conn,
        "the connection survived the kill -9 and the take-over",
    );
    // The drain and the pin survived too.
    wait_for(&r, "be2 drained again", Duration::from_secs(5), |r| {
        node(r, "be2").state == NodeState::Drained
    });
    assert_eq!(node(&r, "be1").pin.load, Some(7.0));
    for _ in 0..3 {
        assert_eq!(open_echo(&r).1, "be1", "be2 is still drained");
    }

    // A clean stop leaves forwarding on; the clean-up puts back what was
    // there before the first start, across both starts.
    assert!(r.fep.stop().unwrap().success());
    assert_eq!(sysctl(gw, v4), "1");
    let out = fep_tests::cleanup(&r);
    assert!(out.status.success(), "{out:?}");
    assert_eq!((sysctl(gw, v4), sysctl(gw, v6)), ("0".into(), "0".into()));
    fep_tests::assert_nothing_left(gw);
}

fep_tests::both_paths! {
    fn ipv6_path_mtu_discovery_works_through_fep() {
        if skip_without_root("ipv6_path_mtu_discovery_works_through_fep") {
            return;
        }
        let services = format!(
            "[[service]]\nname = \"web6\"\nvip = \"{VIP_V6}\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{{ node = \"be1\", ratio = 1 }}]\n"
        );
        let r = start("pm6", 1, true, &[80], &[], &services);
        // IPv6's minimum MTU is 1280: the narrow hop toward the client is 1400,
        // the back end's link 1500.
        fep_tests::assert_download_through_narrow_link(&r, VIP_V6.into(), 1400);
    }

    fn a_udp_route_is_removed_after_route_idle_timeout_s() {
        if skip_without_root("a_udp_route_is_removed_after_route_idle_timeout_s") {
            return;
        }
        let services =
            "[[service]]\nname = \"dns\"\nvip = \"10.0.0.100\"\nport = 5353\nprotocol = \"udp\"\n\
                        backend = [{ node = \"be1\", ratio = 1 }]\n";
        let top = format!("route_idle_timeout_s = 2\nmetrics_listen = \"{METRICS}\"\n");
        let r = start_with_top("pui", 1, false, &[], &[5353], &top, services);
        let socket = &udp_flows(&r, 1)[0];
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).expect("the back end's answer");
        assert_eq!(
            (&buf[..n], from),
            (&b"be1"[..], SocketAddr::new(VIP_V4.into(), 5353))
        );
        // Confirmed (the client sends again after the reply), then silent.
        socket.send_to(b"again", (VIP_V4, 5353)).unwrap();
        socket.recv_from(&mut buf).expect("the second answer");
        assert_eq!(listed(&r, &["--service", "dns"]), 1);
        wait_for(
            &r,
            "the idle UDP route removed",
            Duration::from_secs(15),
            |r| listed(r, &["--service", "dns"]) == 0,
        );
        assert!(sample(&scrape(&r, METRICS), "fep_routes_expired_total") >= 1.0);
        // The next datagram of the flow opens a new route and is answered.
        socket.send_to(b"later", (VIP_V4, 5353)).unwrap();
        socket
            .recv_from(&mut buf)
            .expect("an answer after the expiry");
        assert_eq!(listed(&r, &["--service", "dns"]), 1);
    }
}
