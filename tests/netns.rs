//! End-to-end: real kernel TCP and UDP from a client namespace, through fep
//! on the gateway's TUN device, to back-end namespaces and back.

use std::io::{self, BufRead, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use fep_shared::api::{Count, ExplainReason, ExplainView};
use fep_tests::{
    counters, dropped, echo, expected_io, http, open_echo_to, pattern, sample, scrape,
    skip_without_root, start, start_with_top, status, tally, wait_for, Running, TIMEOUT,
};
use fep_tools::lab::{self, Lab, VIP_V4, VIP_V6};

/// The config key that turns the kernel fast path on.
const FAST_PATH: &str = "fast_path = \"tc-bpf\"\n";

const WEB_2_1_1: &str = r#"
[[service]]
name = "web"
vip = "VIP"
port = 80
protocol = "tcp"
backend = [{ node = "be1", ratio = 2 }, { node = "be2", ratio = 1 }, { node = "be3", ratio = 1 }]
"#;

/// Fetches `/` `n` times, each on a new connection, from the client; returns
/// the node names that answered.
fn get_names(r: &fep_tests::Running, vip: IpAddr, n: usize) -> Vec<String> {
    let addr = SocketAddr::new(vip, 80);
    r.lab
        .client
        .enter(|| {
            (0..n)
                .map(|i| {
                    let resp = http::get(addr, "/", TIMEOUT)
                        .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
                    assert_eq!(resp.status, 200);
                    resp.body_text()
                })
                .collect()
        })
        .unwrap()
}

/// The chooser is exact: `names`, the back ends of new routes in the order
/// they were made, hold be1 twice and be2 and be3 once in every window of
/// four (smooth round robin over 2:1:1).
fn assert_split_2_1_1(names: &[String]) {
    assert_eq!(
        tally(names, 3).iter().sum::<usize>(),
        names.len(),
        "every answer came from a back end: {names:?}"
    );
    for (i, window) in names.windows(4).enumerate() {
        assert_eq!(
            tally(window, 3),
            [2, 1, 1],
            "connections {i}–{}: {window:?} (counts of all {}: {:?})",
            i + 3,
            names.len(),
            tally(names, 3)
        );
    }
}

/// Routes fep created since its start.
fn routes_created(r: &fep_tests::Running) -> u64 {
    status(r)
        .counters
        .get(fep_shared::api::Count::RoutesCreated)
}

/// A 20 MB download through fep with the config keys `top`, whose workers
/// run in the I/O mode `io` (as `fepctl status` reports it).
fn download_byte_exact(tag: &str, top: &str, io: (&str, u64)) {
    let mut r = start_with_top(
        tag,
        3,
        false,
        &[80],
        &[],
        top,
        &WEB_2_1_1.replace("VIP", &VIP_V4.to_string()),
    );
    download(&r, VIP_V4.into(), 20_000_000);
    let workers = fep_tests::status(&r).tun_workers;
    let running = match io.0 {
        "batched" => workers.batched,
        "blocking" => workers.blocking,
        other => panic!("no I/O mode {other}"),
    };
    assert_eq!(running, io.1, "fep's workers: {workers:?}");
    assert!(r.fep.stop().unwrap().success());
}

/// Downloads `len` bytes of the test pattern from the VIP and checks every
/// byte.
fn download(r: &Running, vip: IpAddr, len: u64) {
    let (status, received, hash, mismatch) = r
        .lab
        .client
        .enter(|| {
            let mut received = 0u64;
            let mut hash = pattern::Fnv::default();
            let mut mismatch = None;
            let mut want = vec![0u8; 64 * 1024];
            let (status, _) = http::get_with(
                SocketAddr::new(vip, 80),
                &format!("/bytes/{len}"),
                TIMEOUT,
                |chunk| {
                    pattern::fill(received, &mut want[..chunk.len()]);
                    if mismatch.is_none() && chunk != &want[..chunk.len()] {
                        mismatch = Some(received);
                    }
                    hash.write(chunk);
                    received += chunk.len() as u64;
                    Ok(())
                },
            )
            .expect("download");
            (status, received, hash.finish(), mismatch)
        })
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(received, len);
    assert_eq!(
        mismatch, None,
        "first differing chunk starts at this offset"
    );
    assert_eq!(hash, pattern::expected_hash(len));
}

/// The kernel fast path: an established download's packets stop reaching
/// the TUN device, and its route leaves the kernel when the connection
/// closes.
#[test]
fn an_established_download_is_forwarded_in_the_kernel_until_it_closes() {
    if skip_without_root("an_established_download_is_forwarded_in_the_kernel_until_it_closes") {
        return;
    }
    kernel_download("ffk", false);
}

#[test]
fn an_established_ipv6_download_is_forwarded_in_the_kernel_until_it_closes() {
    if skip_without_root("an_established_ipv6_download_is_forwarded_in_the_kernel_until_it_closes")
    {
        return;
    }
    kernel_download("ff6", true);
}

fn kernel_download(tag: &str, v6: bool) {
    const LEN: u64 = 200_000_000;
    let vip: IpAddr = if v6 { VIP_V6.into() } else { VIP_V4.into() };
    let r = start_with_top(
        tag,
        3,
        v6,
        &[80],
        &[],
        &format!("{FAST_PATH}metrics_listen = \"127.0.0.1:9100\"\n"),
        &WEB_2_1_1.replace("VIP", &vip.to_string()),
    );
    download(&r, vip, LEN);
    let after = status(&r);
    let tun_bytes = after.counters.to_client_bytes + after.counters.to_backend_bytes;
    assert!(
        after.fast_path.bytes > LEN / 2 && tun_bytes < LEN / 2,
        "the kernel forwarded {} bytes, the TUN path {tun_bytes} of a {LEN}-byte download",
        after.fast_path.bytes
    );
    let metrics = scrape(&r, "127.0.0.1:9100");
    fep_tests::promtool_check(&metrics);
    assert_eq!(
        fep_tests::metric(&metrics, "fep_fast_path_state{state=\"running\"}"),
        Some(1.0)
    );
    assert!(
        fep_tests::metric(&metrics, "fep_fast_path_bytes_total")
            .is_some_and(|b| b > (LEN / 2) as f64),
        "{metrics}"
    );
    wait_for(
        &r,
        "the closed connection's route out of the kernel",
        TIMEOUT,
        |r| status(r).fast_path.routes == 0,
    );
}

/// UDP through the kernel fast path, IPv6 (no checksum to spare there): a
/// flow's datagrams after its confirmation are forwarded in the kernel,
/// both ways, and every one is answered.
#[test]
fn a_confirmed_ipv6_udp_flow_is_forwarded_in_the_kernel() {
    if skip_without_root("a_confirmed_ipv6_udp_flow_is_forwarded_in_the_kernel") {
        return;
    }
    let services = format!(
        "[[service]]\nname = \"dns\"\nvip = \"{VIP_V6}\"\nport = 5353\nprotocol = \"udp\"\n\
         backend = [{{ node = \"be1\", ratio = 1 }}]\n"
    );
    let r = start_with_top("ffu", 1, true, &[], &[5353], FAST_PATH, &services);
    let vip = SocketAddr::new(VIP_V6.into(), 5353);
    let answered = r
        .lab
        .client
        .enter(|| {
            let sock = UdpSocket::bind("[::]:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 64];
            let mut ask = |what: &str| {
                sock.send_to(what.as_bytes(), vip).unwrap();
                sock.recv_from(&mut buf).is_ok_and(|(_, from)| from == vip)
            };
            // The first exchange waits out IPv6 neighbour discovery.
            assert!(
                (0..3).any(|_| ask("hello")),
                "no answer to a first datagram"
            );
            (0..300)
                .filter(|i| {
                    // Room for the route's installation once confirmed.
                    if *i == 1 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    ask(&format!("q{i}"))
                })
                .count()
        })
        .unwrap();
    assert_eq!(answered, 300, "every datagram answered from the VIP");
    // The figures are read every few milliseconds.
    wait_for(
        &r,
        "the kernel's count of 2 × 297 datagrams",
        TIMEOUT,
        |r| status(r).fast_path.packets >= 2 * 297,
    );
}

/// A route fep deletes (here `fepctl backend remove --force`) leaves the
/// kernel too: its connection's next segment reaches the TUN path, which has
/// no route for it, instead of the back end.
#[test]
fn a_route_removed_by_fep_leaves_the_kernel_and_its_packets_stop() {
    if skip_without_root("a_route_removed_by_fep_leaves_the_kernel_and_its_packets_stop") {
        return;
    }
    let r = start_echo_lab("ffr", FAST_PATH);
    let addr = SocketAddr::new(VIP_V4.into(), 7000);
    let (mut conn, _) = open_echo_to(&r, addr);
    echo(&mut conn, "before");
    wait_for(&r, "the connection's route in the kernel", TIMEOUT, |r| {
        status(r).fast_path.routes == 1
    });
    let forwarded = status(&r).fast_path.packets;
    echo(&mut conn, "through the kernel");
    wait_for(&r, "the kernel's count of the echo", TIMEOUT, |r| {
        status(r).fast_path.packets >= forwarded + 2
    });
    let (code, out) = fep_tests::fepctl(&r, &["backend", "remove", "echo", "be1", "--force"]);
    assert_eq!(code, 0, "{out}");
    wait_for(&r, "the deleted route out of the kernel", TIMEOUT, |r| {
        status(r).fast_path.routes == 0
    });
    let forwarded = status(&r).fast_path.packets;
    conn.get_ref()
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    conn.get_mut().write_all(b"after\n").unwrap();
    let mut line = String::new();
    assert!(
        conn.read_line(&mut line).is_err() || line.is_empty(),
        "a deleted route still reached the back end: {line:?}"
    );
    assert_eq!(
        status(&r).fast_path.packets,
        forwarded,
        "nothing forwarded in the kernel"
    );
}

/// A connection whose every packet the kernel forwards stays alive past
/// `route_idle_timeout_s`: the kernel's last-packet times are carried back
/// to the route table, which alone expires routes.
#[test]
fn a_route_busy_only_in_the_kernel_does_not_idle_out() {
    if skip_without_root("a_route_busy_only_in_the_kernel_does_not_idle_out") {
        return;
    }
    let r = start_echo_lab("ffi", &format!("{FAST_PATH}route_idle_timeout_s = 2\n"));
    let (mut conn, _) = open_echo_to(&r, SocketAddr::new(VIP_V4.into(), 7000));
    echo(&mut conn, "first");
    wait_for(&r, "the connection's route in the kernel", TIMEOUT, |r| {
        status(r).fast_path.routes == 1
    });
    let tun = |r: &Running| {
        let c = status(r).counters;
        c.to_backend_packets + c.to_client_packets
    };
    let before = tun(&r);
    // Three idle timeouts' worth of echoes, each through the kernel.
    for i in 0..20 {
        echo(&mut conn, &format!("line {i}"));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(tun(&r), before, "the echoes took the TUN path");
    assert_eq!(status(&r).routes_expired, 0, "the busy route idled out");
    assert_eq!(status(&r).fast_path.routes, 1);
}

/// `fepctl explain`: the back end a packet would reach and why, read from
/// the tables without moving them — the scheduler's next choice is the one
/// the next new connection gets, and an open connection's port names its
/// route's back end.
#[test]
fn explain_names_the_route_or_the_next_choice_and_changes_nothing() {
    if skip_without_root("explain_names_the_route_or_the_next_choice_and_changes_nothing") {
        return;
    }
    let r = start(
        "fex",
        3,
        false,
        &[80],
        &[],
        &WEB_2_1_1.replace("VIP", &VIP_V4.to_string()),
    );
    let explain = |port: u16| -> ExplainView {
        fep_tests::fepctl_view(&r, &["explain", "web", &format!("10.0.1.2:{port}")])
    };
    for _ in 0..4 {
        let next = explain(40000);
        assert_eq!(next.reason, ExplainReason::Chooser, "{next:?}");
        assert_eq!(
            explain(40000).node,
            next.node,
            "asking twice changes nothing"
        );
        let got = get_names(&r, VIP_V4.into(), 1);
        assert_eq!(
            Some(&got[0]),
            next.node.as_ref(),
            "the next new connection's back end"
        );
    }
    let (code, text) = fep_tests::fepctl(&r, &["explain", "web", "10.0.1.2:40000"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("web 10.0.1.2:40000 → be")
            && text.contains("why: no route; the ratio scheduler"),
        "{text}"
    );
    // An open connection: its port has a route.
    let conn = r
        .lab
        .client
        .enter(|| TcpStream::connect((VIP_V4, 80)).unwrap())
        .unwrap();
    let port = conn.local_addr().unwrap().port();
    let route = fep_tests::routes(&r, &["--client", "10.0.1.2"])
        .into_iter()
        .find(|v| v.client_port == port)
        .expect("the open connection's route");
    let seen = explain(port);
    assert_eq!(seen.reason, ExplainReason::Route, "{seen:?}");
    assert_eq!(seen.node.as_deref(), Some(&*route.node));
    assert_eq!(seen.backends.len(), 3, "the ratios it was read from");
    let (code, out) = fep_tests::fepctl(&r, &["explain", "nosuch", "10.0.1.2:1"]);
    assert_ne!(code, 0);
    assert!(out.contains("no service 'nosuch'"), "{out}");
}

/// A lab whose one back end runs the echo server (its name, then every
/// byte back) on 7000, and fep with an `echo` service there limited to two
/// connections (`extra` adds keys to it), its metrics on 127.0.0.1:9100.
fn start_limited_echo(tag: &str, extra: &str) -> Running {
    echo_lab(
        tag,
        "metrics_listen = \"127.0.0.1:9100\"",
        &format!("max_connections = 2\n{extra}"),
    )
}

/// As [`start_limited_echo`], without the limit, with the top-level keys `top`.
fn start_echo_lab(tag: &str, top: &str) -> Running {
    echo_lab(tag, top, "")
}

fn echo_lab(tag: &str, top: &str, keys: &str) -> Running {
    let mut lab = Lab::new(tag, 1).expect("building the lab");
    let mut args = lab::testsrv_args(0, &[], &[]);
    args.extend(["--echo".to_string(), "7000".to_string()]);
    lab.start_backend_server(0, &lab::workspace_bin("fep-testsrv").unwrap(), &args)
        .expect("starting the echo server");
    let services = format!(
        "[[service]]\nname = \"echo\"\nvip = \"{VIP_V4}\"\nport = 7000\nprotocol = \"tcp\"\n\
         {keys}\nbackend = [{{ node = \"be1\", ratio = 1 }}]\n"
    );
    Running::start(lab, top, &services)
}

/// A connection attempt from the client to `addr` within `timeout`.
fn connect(r: &Running, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    r.lab
        .client
        .enter(|| TcpStream::connect_timeout(&addr, timeout))
        .unwrap()
}

fep_tests::both_paths! {
    fn http_connections_split_2_1_1_over_ipv4() {
        if skip_without_root("http_connections_split_2_1_1_over_ipv4") {
            return;
        }
        let mut r = start(
            "fh4",
            3,
            false,
            &[80],
            &[],
            &WEB_2_1_1.replace("VIP", &VIP_V4.to_string()),
        );
        let names = get_names(&r, VIP_V4.into(), 400);
        // Each connection a new route (no client port reused while its old
        // route lingered, which would send it to the same back end again).
        assert_eq!(routes_created(&r), 400);
        assert_split_2_1_1(&names);
        assert!(r.fep.stop().unwrap().success());
    }

    fn http_connections_split_2_1_1_over_ipv6() {
        if skip_without_root("http_connections_split_2_1_1_over_ipv6") {
            return;
        }
        let mut r = start(
            "fh6",
            3,
            true,
            &[80],
            &[],
            &WEB_2_1_1.replace("VIP", &VIP_V6.to_string()),
        );
        let names = get_names(&r, VIP_V6.into(), 400);
        // Each connection a new route (no client port reused while its old
        // route lingered, which would send it to the same back end again).
        assert_eq!(routes_created(&r), 400);
        assert_split_2_1_1(&names);
        assert!(r.fep.stop().unwrap().success());
    }

    fn a_20_mb_download_arrives_byte_exact() {
        if skip_without_root("a_20_mb_download_arrives_byte_exact") {
            return;
        }
        download_byte_exact("fdl", "", (expected_io(), 2));
    }

    fn a_20_mb_download_arrives_byte_exact_without_batching() {
        if skip_without_root("a_20_mb_download_arrives_byte_exact_without_batching") {
            return;
        }
        download_byte_exact("fdb", "tun_batching = false", ("blocking", 2));
    }

    fn udp_datagrams_stick_per_source_port_and_spread_over_ports() {
        if skip_without_root("udp_datagrams_stick_per_source_port_and_spread_over_ports") {
            return;
        }
        let services = format!(
            r#"
    [[service]]
    name = "dns"
    vip = "{VIP_V4}"
    port = 5353
    protocol = "udp"
    backend = [{{ node = "be1", ratio = 2 }}, {{ node = "be2", ratio = 1 }}, {{ node = "be3", ratio = 1 }}]
    "#
        );
        let mut r = start("fud", 3, false, &[], &[5353], &services);
        let vip = SocketAddr::new(VIP_V4.into(), 5353);
        let (fixed, spread) = r
            .lab
            .client
            .enter(|| {
                let ask = |sock: &UdpSocket| -> String {
                    let mut buf = [0u8; 64];
                    for _attempt in 0..3 {
                        sock.send_to(b"who?", vip).unwrap();
                        if let Ok((n, from)) = sock.recv_from(&mut buf) {
                            assert_eq!(from, vip, "the reply comes from the VIP");
                            return String::from_utf8_lossy(&buf[..n]).to_string();
                        }
                    }
                    panic!("no UDP answer from {vip} after 3 tries");
                };
                let bind = || {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    s
                };
                let one = bind();
                let fixed: Vec<String> = (0..50).map(|_| ask(&one)).collect();
                // Every socket kept open, so that no source port comes twice.
                let sockets: Vec<UdpSocket> = (0..400).map(|_| bind()).collect();
                let spread: Vec<String> = sockets.iter().map(ask).collect();
                (fixed, spread)
            })
            .unwrap();
        assert!(
            fixed.iter().all(|n| *n == fixed[0]),
            "one source port, one back end: {fixed:?}"
        );
        assert_eq!(routes_created(&r), 401, "a route per source port");
        assert_split_2_1_1(&spread);
        assert!(r.fep.stop().unwrap().success());
    }

    fn unknown_ports_are_not_forwarded_and_fep_exits_clean() {
        if skip_without_root("unknown_ports_are_not_forwarded_and_fep_exits_clean") {
            return;
        }
        let mut r = start(
            "fun",
            3,
            false,
            &[80, 81],
            &[81],
            &WEB_2_1_1.replace("VIP", &VIP_V4.to_string()),
        );
        // Set up as promised while running.
        let gw = &r.lab.gateway;
        let link = gw.ip_output(&["link", "show", "fep0"]).unwrap();
        assert!(
            link.contains("qlen 4096"),
            "tun_queue_len's default: {link}"
        );
        assert!(gw.ip_output(&["rule"]).unwrap().contains("lookup 100"));
        assert!(gw
            .ip_output(&["route", "show", "table", "100"])
            .unwrap()
            .contains("fep0"));

        let (tcp81, udp81) = r
            .lab
            .client
            .enter(|| {
                let tcp = std::net::TcpStream::connect_timeout(
                    &SocketAddr::new(VIP_V4.into(), 81),
                    Duration::from_secs(2),
                );
                let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                for _ in 0..3 {
                    sock.send_to(b"anyone?", SocketAddr::new(VIP_V4.into(), 81))
                        .unwrap();
                }
                let mut buf = [0u8; 64];
                (
                    tcp.is_ok(),
                    sock.recv_from(&mut buf).ok().map(|(_, from)| from),
                )
            })
            .unwrap();
        assert!(!tcp81, "a TCP connection to an unserved port got through");
        assert_eq!(
            udp81, None,
            "a datagram to an unserved port reached a back end"
        );

        let status = r.fep.stop().unwrap();
        let log = r.fep.log();
        assert!(status.success(), "fep exit {status}:\n{log}");
        let dropped: u64 = log
            .rsplit("unknown_flow=")
            .next()
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .filter(|_| log.contains("totals:"))
            .unwrap_or_else(|| panic!("no drop summary in fep's log:\n{log}"));
        assert!(
            dropped >= 4,
            "the SYN and 3 datagrams are counted as unknown_flow drops ({dropped}):\n{log}"
        );

        // The stop leaves the return path's hold for the next start (see
        // tests/reliability.rs); `fep --cleanup` removes everything: device,
        // VIP route, return-path table and rules.
        assert!(gw.ip_output(&["link", "show", "fep0"]).is_ok());
        let out = fep_tests::cleanup(&r);
        assert!(out.status.success(), "{out:?}");
        fep_tests::assert_nothing_left(gw);
    }

    fn a_full_tcp_service_refuses_a_new_connection_at_once_and_takes_one_again_when_there_is_room() {
        if skip_without_root("a_full_tcp_service_refuses_a_new_connection_at_once_and_takes_one_again_when_there_is_room") {
            return;
        }
        let mut r = start_limited_echo("frf", "");
        let vip = SocketAddr::new(VIP_V4.into(), 7000);
        let (mut first, name) = open_echo_to(&r, vip);
        assert_eq!(name, "be1");
        let (mut second, _) = open_echo_to(&r, vip);
        echo(&mut first, "one");
        echo(&mut second, "two");

        // Refused, not timed out: the RST comes back well within the 10 s.
        let third = connect(&r, vip, TIMEOUT).expect_err("a third connection got through");
        assert_eq!(
            third.kind(),
            io::ErrorKind::ConnectionRefused,
            "{third}\nfep log:\n{}",
            r.fep.log()
        );
        assert!(counters(&r).get(Count::SynRefused) >= 1);
        echo(&mut first, "still served");

        // One connection closes; once its route is gone (it lingers a few
        // seconds after the close), a new client is placed again.
        drop(second);
        let mut again = None;
        wait_for(
            &r,
            "a new connection accepted",
            Duration::from_secs(15),
            |r| match connect(r, vip, TIMEOUT) {
                Ok(conn) => {
                    again = Some(conn);
                    true
                }
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
                    std::thread::sleep(Duration::from_millis(200));
                    false
                }
            },
        );
        let conn = again.unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut conn = io::BufReader::new(conn);
        let mut hello = String::new();
        io::BufRead::read_line(&mut conn, &mut hello).unwrap();
        assert_eq!(hello.trim(), "be1");
        echo(&mut conn, "bytes after the refusals");
        echo(&mut first, "one more");

        let c = counters(&r);
        let refused = c.get(Count::SynRefused);
        assert!(refused >= 1, "{c:?}");
        assert_eq!(dropped(&c, "service_full"), 0, "refused, not dropped");
        let metrics = scrape(&r, "127.0.0.1:9100");
        assert!(
            sample(&metrics, "fep_syn_refused_total") >= refused as f64,
            "{metrics}"
        );
        assert!(r.fep.stop().unwrap().success());
    }

    fn a_full_tcp_service_that_does_not_refuse_lets_a_new_connection_time_out() {
        if skip_without_root("a_full_tcp_service_that_does_not_refuse_lets_a_new_connection_time_out") {
            return;
        }
        let mut r = start_limited_echo("frq", "refuse_when_full = false");
        let vip = SocketAddr::new(VIP_V4.into(), 7000);
        let (mut first, _) = open_echo_to(&r, vip);
        let (mut second, _) = open_echo_to(&r, vip);
        let third =
            connect(&r, vip, Duration::from_secs(1)).expect_err("a third connection got through");
        assert_eq!(third.kind(), io::ErrorKind::TimedOut, "{third}");
        echo(&mut first, "one");
        echo(&mut second, "two");
        let c = counters(&r);
        assert!(dropped(&c, "service_full") >= 1, "{c:?}");
        assert_eq!(c.get(Count::SynRefused), 0);
        let metrics = scrape(&r, "127.0.0.1:9100");
        assert!(
            sample(
                &metrics,
                "fep_dropped_packets_total{reason=\"service_full\"}"
            ) >= 1.0,
            "{metrics}"
        );
        assert!(r.fep.stop().unwrap().success());
    }

    /// iperf3's UDP test: a TCP control connection and a UDP stream, two
    /// services that an affinity group keeps on one node. The data service lists
    /// the nodes the other way round, so that without the group every test's
    /// stream would go to the other server (which never heard of it).
    fn iperf3_udp_tests_pass_through_an_affinity_group_over_two_back_ends() {
        if skip_without_root("iperf3_udp_tests_pass_through_an_affinity_group_over_two_back_ends") {
            return;
        }
        fep_tools::host::ensure(&[fep_tools::host::IPERF3]).expect("installing iperf3");
        let service = |name: &str, protocol: &str, order: [&str; 2]| {
            format!(
                "[[service]]\nname = \"{name}\"\nvip = \"{VIP_V4}\"\nport = 5201\nprotocol = \
                 \"{protocol}\"\naffinity_group = \"iperf\"\nbackend = [{{ node = \"{}\", ratio = 1 \
                 }}, {{ node = \"{}\", ratio = 1 }}]\n",
                order[0], order[1]
            )
        };
        let services = service("iperf-control", "tcp", ["be1", "be2"])
            + &service("iperf-data", "udp", ["be2", "be1"]);
        let mut lab = Lab::new("fig", 2).expect("building the lab");
        let logs: Vec<_> = (1..=2)
            .map(|i| lab.dir().join(format!("iperf3-be{i}.log")))
            .collect();
        for (i, log) in logs.iter().enumerate() {
            let server = lab.backends[i]
                .command("iperf3")
                .args(["-s", "-B", &lab::backend_v4(i).to_string(), "--logfile"])
                .arg(log)
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("starting iperf3 -s");
            lab.adopt(Some(i), server);
        }
        // A second client address: each client is held to its own node.
        let clients = [lab::CLIENT_V4, std::net::Ipv4Addr::new(10, 0, 1, 3)];
        lab.client
            .ip(&["addr", "add", "10.0.1.3/24", "dev", "eth0"])
            .unwrap();
        let r = Running::start(lab, "", &services);
        for i in 0..2 {
            wait_for(
                &r,
                &format!("iperf3 on be{} listening", i + 1),
                TIMEOUT,
                |r| {
                    r.lab.backends[i]
                        .command("ss")
                        .args(["-Hltn", "sport = :5201"])
                        .output()
                        .is_ok_and(|o| !o.stdout.is_empty())
                },
            );
        }
        for run in 0..4 {
            let (vip, from) = (VIP_V4.to_string(), clients[run % 2].to_string());
            let client = [
                "20", "iperf3", "-c", &vip, "-B", &from, "-u", "-b", "20M", "-t", "1",
            ];
            let out = r
                .lab
                .client
                .command("timeout")
                .args(client)
                .args(["-l", "1000", "--connect-timeout", "3000", "--json"])
                .output()
                .expect("running iperf3 -c");
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("run {run}: no JSON report ({e}), status {}", out.status));
            assert!(
                out.status.success() && report.get("error").is_none(),
                "run {run}: iperf3 failed ({}): {}",
                out.status,
                report["error"]
            );
            let sum = &report["end"]["sum"];
            let (packets, lost) = (sum["packets"].as_u64(), sum["lost_packets"].as_u64());
            assert!(
                packets.is_some_and(|p| p > 0) && lost.is_some_and(|l| l * 2 < packets.unwrap()),
                "run {run}: the server counted {lost:?} of {packets:?} datagrams lost"
            );
        }
        // Each client's tests ran on its own server.
        let accepted = |log: &std::path::Path| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches("Accepted connection")
                .count()
        };
        assert_eq!(
            logs.iter().map(|l| accepted(l)).collect::<Vec<_>>(),
            [2, 2],
            "tests per server"
        );
        // The views line up with service names of two lengths.
        let (_, routes) = fep_tests::fepctl(&r, &["routes"]);
        fep_tests::assert_aligned(&routes, &["SERVICE", "CLIENT", "NODE", "STATE"], &["IDLE"]);
        let (_, status) = fep_tests::fepctl(&r, &["status"]);
        fep_tests::assert_aligned(
            &status,
            &["NODE", "ADDRESS", "STATE", "PINNED", "AGENT"],
            &["ROUTES", "CPU"],
        );
        fep_tests::assert_aligned(
            &status,
            &["NODE", "UP", "SPARE"],
            &["RATIO", "EFF", "ROUTES", "SHARE", "TARGET", "LOAD"],
        );
    }
}
