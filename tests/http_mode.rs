//! HTTP mode through a running fep: one client connection's requests spread
//! by ratio, pools that bound the server connections, drains and sessions
//! at request boundaries, bodies and upgrades streamed, bad input answered.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fep_shared::api::HttpServiceView;

use fep_tests::*;
use fep_tools::http::{self, KeepAlive};
use fep_tools::lab::{self, backend_name, Lab, VIP_V4};

/// The HTTP service's port on the VIP.
const PORT: u16 = 80;
/// The back ends' keep-alive HTTP/1.1 port.
const ORIGIN: u16 = 8080;

/// A lab whose back ends run the keep-alive origin on [`ORIGIN`] (idle
/// connections closed after `keepalive_ms`) and the echo server on 7000,
/// and fep with an HTTP service `web` on VIP:80 over them with `ratios`
/// (`http`: its `[service.http]` keys and rules) beside a TCP-mode service
/// `echo` on VIP:7000; metrics on the gateway's 127.0.0.1:9100.
fn start_http(tag: &str, ratios: &[u32], keepalive_ms: u64, http: &str) -> Running {
    let mut lab = Lab::new(tag, ratios.len()).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    for i in 0..ratios.len() {
        let args = [
            "--name".to_string(),
            backend_name(i),
            "--http".to_string(),
            ORIGIN.to_string(),
            "--keepalive-ms".to_string(),
            keepalive_ms.to_string(),
            "--echo".to_string(),
            "7000".to_string(),
        ];
        lab.start_backend_server(i, &testsrv, &args)
            .expect("starting the origin servers");
    }
    let backends = |port: u16| -> String {
        let list: Vec<String> = ratios
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "{{ node = \"{}\", port = {port}, ratio = {r} }}",
                    backend_name(i)
                )
            })
            .collect();
        list.join(", ")
    };
    let services = format!(
        "[[service]]\nname = \"echo\"\nvip = \"{VIP_V4}\"\nport = 7000\nprotocol = \"tcp\"\n\
         backend = [{}]\n\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = {PORT}\nprotocol = \"tcp\"\nmode = \"http\"\n\
         backend = [{}]\n\n[service.http]\n{http}\n",
        backends(7000),
        backends(ORIGIN)
    );
    Running::start(lab, "metrics_listen = \"127.0.0.1:9100\"", &services)
}

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP_V4), PORT)
}

/// A keep-alive connection to the VIP from the client.
fn connect(r: &Running) -> KeepAlive {
    r.lab
        .client
        .enter(|| KeepAlive::connect(vip(), TIMEOUT))
        .unwrap()
        .expect("connecting to the HTTP service")
}

/// `n` GETs of `path` on `conn`: the node names that answered.
fn names(r: &Running, conn: &mut KeepAlive, path: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let resp = conn.get(path).unwrap_or_else(|e| {
                panic!(
                    "request {i} of {n} failed: {e:#}\nfep log:\n{}",
                    r.fep.log()
                )
            });
            assert_eq!(resp.status, 200, "request {i}: {}", resp.body_text());
            resp.body_text()
        })
        .collect()
}

/// The origin's counts on back end `i`, asked directly (not through fep).
fn origin_stats(r: &Running, i: usize) -> (u64, u64) {
    let addr = SocketAddr::new(IpAddr::V4(lab::backend_v4(i)), ORIGIN);
    let text = r.lab.backends[i]
        .enter(|| http::get(addr, "/stats", TIMEOUT))
        .unwrap()
        .expect("asking the origin for its counts")
        .body_text();
    let count = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {text:?}"))
    };
    (count("connections"), count("requests"))
}

#[test]
fn one_keep_alive_connection_spreads_by_ratio() {
    if skip_without_root("one_keep_alive_connection_spreads_by_ratio") {
        return;
    }
    let rule = "[[service.http.rule]]\npath_prefix = \"/static/\"\nnodes = [\"be3\"]";
    let r = start_http("hk", &[2, 1, 1], 15_000, rule);
    // A TCP-mode service on the same VIP, another port, goes through the
    // TUN path as before.
    let (mut echo_conn, _) = open_echo(&r);
    echo(&mut echo_conn, "beside HTTP mode");

    let mut conn = connect(&r);
    // The back end sees who the client is; the client's peer is the VIP.
    let head = conn.get("/headers").unwrap().body_text();
    assert!(head.contains("x-forwarded-for: 10.0.1.2"), "{head}");
    let got = names(&r, &mut conn, "/", 400);
    let counts = tally(&got, 3);
    // Shares by ratio 2:1:1 of 400 requests: 200/100/100, each within 15%.
    for (i, (&n, want)) in counts.iter().zip([200, 100, 100]).enumerate() {
        assert!(
            n.abs_diff(want) <= want * 15 / 100,
            "{} served {n} of 400, want {want} ± 15% (all: {counts:?})",
            backend_name(i)
        );
    }
    // A content rule keeps its paths on its nodes, on the same connection.
    let statics = names(&r, &mut conn, "/static/logo.png", 20);
    assert!(statics.iter().all(|n| n == "be3"), "{statics:?}");
    echo(&mut echo_conn, "still there");

    let metrics = scrape(&r, "127.0.0.1:9100");
    let be1_2xx = r#"fep_http_requests_total{class="2xx",node="be1",service="web"}"#;
    assert!(sample(&metrics, be1_2xx) >= 180.0, "{be1_2xx}:\n{metrics}");
    for series in [
        "fep_http_request_duration_seconds_bucket",
        "fep_http_pool_connections",
        "fep_http_server_connects_total",
        "fep_http_retries_total",
        "fep_http_refused_total",
    ] {
        assert!(metrics.contains(series), "{series} is exported");
    }
    let count = r#"fep_http_request_duration_seconds_count{node="be3",service="web"}"#;
    assert!(sample(&metrics, count) >= 100.0, "{count}:\n{metrics}");
    promtool_check(&metrics);
}

/// The HTTP view of service `name`.
fn http_view(r: &Running, name: &str) -> HttpServiceView {
    service(r, name)
        .http
        .expect("an HTTP service has HTTP figures")
}

#[test]
fn pools_are_warm_and_bound_the_server_connections() {
    if skip_without_root("pools_are_warm_and_bound_the_server_connections") {
        return;
    }
    let (min_idle, max_idle, clients, per_client, threads) = (4u64, 8u64, 100, 10, 4);
    let r = start_http(
        "hp",
        &[1, 1, 1],
        15_000,
        &format!(
            "pool_min_idle = {min_idle}\npool_max_idle = {max_idle}\npool_idle_timeout_ms = 12000"
        ),
    );
    // Before any request, each back end has its pool's minimum open.
    wait_for(&r, "every pool at its minimum", TIMEOUT, |r| {
        (0..3).all(|i| origin_stats(r, i).0 >= min_idle)
    });
    let conns: Vec<KeepAlive> = (0..clients).map(|_| connect(&r)).collect();
    let mut groups: Vec<Vec<KeepAlive>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        groups[i % threads].push(c);
    }
    std::thread::scope(|scope| {
        for group in &mut groups {
            let r = &r;
            scope.spawn(move || {
                for _ in 0..per_client {
                    for conn in group.iter_mut() {
                        names(r, conn, "/", 1);
                    }
                }
            });
        }
    });
    let opened: Vec<u64> = (0..3).map(|i| origin_stats(&r, i).0).collect();
    let requests: Vec<u64> = (0..3).map(|i| origin_stats(&r, i).1).collect();
    assert_eq!(requests.iter().sum::<u64>(), (clients * per_client) as u64);
    // A pool holds at most pool_max_idle idle connections, and a request
    // in flight holds one more: 100 client connections (one server
    // connection each, without a pool) need no more than that.
    let bound = max_idle + threads as u64;
    for (i, &n) in opened.iter().enumerate() {
        assert!(
            n <= bound,
            "{} accepted {n} server connections for {} requests, want at most {bound} \
             (pool_max_idle {max_idle} + {threads} concurrent requests); all: {opened:?}",
            backend_name(i),
            requests[i]
        );
    }
    let view = service(&r, "web");
    let reuse: Vec<f64> = view
        .backends
        .iter()
        .map(|b| b.http.as_ref().unwrap().reuse)
        .collect();
    assert!(
        reuse.iter().all(|&x| x >= 20.0),
        "requests per server connection: {reuse:?}"
    );
    let (code, out) = fepctl(&r, &["services"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("web http") && out.contains("REUSE"),
        "fepctl services shows the pools: {out}"
    );
}

#[test]
fn a_drain_completes_while_persistent_clients_keep_sending() {
    if skip_without_root("a_drain_completes_while_persistent_clients_keep_sending") {
        return;
    }
    let r = start_http("hd", &[1, 1, 1], 15_000, "");
    let stop = AtomicBool::new(false);
    let conns: Vec<KeepAlive> = (0..20).map(|_| connect(&r)).collect();
    let served: Vec<(usize, Vec<String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let (r, stop) = (&r, &stop);
                scope.spawn(move || {
                    let mut got = Vec::new();
                    let mut errors = 0;
                    while !stop.load(Ordering::Relaxed) && got.len() < 2_000 {
                        match conn.get("/") {
                            Ok(resp) if resp.status == 200 => got.push(resp.body_text()),
                            Ok(resp) => {
                                eprintln!("status {}: {}", resp.status, resp.body_text());
                                errors += 1;
                            }
                            Err(e) => {
                                eprintln!("request failed: {e:#}\n{}", r.fep.log());
                                errors += 1;
                                break;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (errors, got)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let (code, out) = fepctl(&r, &["drain", "be1", "--wait", "--timeout", "20"]);
        assert_eq!(
            code, 0,
            "the drain completes while 20 clients stay connected: {out}"
        );
        let at_drain = origin_stats(&r, 0).1;
        std::thread::sleep(Duration::from_millis(1_000));
        assert_eq!(
            origin_stats(&r, 0).1,
            at_drain,
            "be1 got requests after it was drained"
        );
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for (i, (errors, got)) in served.iter().enumerate() {
        assert_eq!(*errors, 0, "client {i} saw errors");
        let last = &got[got.len().saturating_sub(10)..];
        assert!(
            !last.is_empty() && last.iter().all(|n| n != "be1"),
            "client {i} still reaches be1 on its connection after the drain: {last:?}"
        );
    }
}

#[test]
fn the_idle_close_race_never_reaches_a_client() {
    if skip_without_root("the_idle_close_race_never_reaches_a_client") {
        return;
    }
    // The origins close idle connections after 300 ms, long before the
    // pool's own 4 s: pooled connections are often closed under fep.
    let r = start_http("hr", &[1, 1], 300, "pool_idle_timeout_ms = 4000");
    let mut conn = connect(&r);
    let mut sent = 0;
    for burst in 0..50u64 {
        names(&r, &mut conn, "/", 20);
        sent += 20;
        // Gaps around the origins' timeout, so that some requests meet a
        // connection the origin is closing.
        std::thread::sleep(Duration::from_millis(250 + (burst * 37) % 120));
    }
    assert_eq!(sent, 1_000);
    let retries: u64 = service(&r, "web")
        .backends
        .iter()
        .map(|b| b.http.as_ref().unwrap().retries)
        .sum();
    eprintln!("1000 requests served; {retries} sent again after a pooled connection closed");
}

#[test]
fn bodies_stream_both_ways_byte_exact_and_websocket_echoes() {
    if skip_without_root("bodies_stream_both_ways_byte_exact_and_websocket_echoes") {
        return;
    }
    let r = start_http("hb", &[1, 1], 15_000, "");
    let mut conn = connect(&r);
    let len: u64 = 20 * 1024 * 1024;
    let want = format!("{len} {:x}", pattern::expected_hash(len));
    for (sized, framing) in [(true, "Content-Length"), (false, "chunked")] {
        let body = fep_tools::origin::PatternBody::new(len, sized);
        let body = http_body_util::BodyExt::boxed(body);
        let resp = conn.request("POST", "/upload", &[], body).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.body_text(),
            want,
            "a {framing} upload arrives byte-exact"
        );
    }
    for path in ["/bytes/", "/chunked/"] {
        let mut hash = pattern::Fnv::default();
        let mut got = 0u64;
        let (status, headers) = conn
            .request_with("GET", &format!("{path}{len}"), &[], http::empty(), |b| {
                got += b.len() as u64;
                hash.write(b);
                Ok(())
            })
            .unwrap();
        assert_eq!(status, 200);
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        assert_eq!(
            chunked,
            path == "/chunked/",
            "{path}: framing kept: {headers:?}"
        );
        assert_eq!(
            (got, hash.finish()),
            (len, pattern::expected_hash(len)),
            "{path}"
        );
    }
    // A body echoed in one exchange, with 100-continue.
    let echo = conn
        .request(
            "POST",
            "/echo",
            &[("expect", "100-continue")],
            http::full(b"ping".to_vec()),
        )
        .unwrap();
    assert_eq!(echo.body, b"ping");

    // A WebSocket: 101, then frames both ways for the connection's life,
    // on one back end (the upgrade pins it).
    let ws = connect(&r);
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let (head, mut io) = ws
        .upgrade(
            "/ws",
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", key),
            ],
        )
        .unwrap();
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some(fep_tools::websocket::accept_key(key).as_str())
    );
    let pinned = head.header("x-node").unwrap().to_string();
    let in_flight = |r: &Running| backend(r, "web", &pinned).routes;
    assert_eq!(in_flight(&r), 1, "the tunnel counts as a route of {pinned}");
    for i in 0..20u32 {
        let msg = format!("message {i}").repeat(1 + i as usize * 50);
        io.write_all(&fep_tools::websocket::encode(
            fep_tools::websocket::TEXT,
            msg.as_bytes(),
            Some([7, 1, 2, 3]),
        ))
        .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let frame = loop {
            if let Some((frame, _)) = fep_tools::websocket::decode(&buf).unwrap() {
                break frame;
            }
            let n = io.read(&mut chunk).unwrap();
            assert!(n > 0, "the tunnel closed");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert_eq!(frame.payload, msg.as_bytes(), "echo {i}");
    }
    drop(io);
    wait_for(&r, "the tunnel's route gone", TIMEOUT, |r| {
        in_flight(r) == 0
    });
}

#[test]
fn sessions_stay_on_one_back_end_from_start_to_end() {
    if skip_without_root("sessions_stay_on_one_back_end_from_start_to_end") {
        return;
    }
    let r = start_http(
        "hs",
        &[1, 1, 1],
        15_000,
        "session_start = \"/login\"\nsession_end = \"/logout\"",
    );
    // Each request on a new connection: the cookie, not the connection,
    // keeps the session.
    let once = |path: &str, cookie: Option<&str>| {
        let mut conn = connect(&r);
        let headers: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
        let resp = conn.request("GET", path, &headers, http::empty()).unwrap();
        assert_eq!(resp.status, 200);
        resp
    };
    let login = once("/login", None);
    let set = login
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    let owner = login.body_text();
    for i in 0..30 {
        assert_eq!(
            once("/page", Some(&cookie)).body_text(),
            owner,
            "request {i} of the session"
        );
    }
    let logout = once("/logout", Some(&cookie));
    assert_eq!(
        logout.body_text(),
        owner,
        "the end request is the session's too"
    );
    assert!(logout
        .header("set-cookie")
        .is_some_and(|c| c.contains("Max-Age=0")));
    let after: Vec<String> = (0..30)
        .map(|_| once("/page", Some(&cookie)).body_text())
        .collect();
    let counts = tally(&after, 3);
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "after the end path requests spread again: {counts:?}"
    );
}

#[test]
fn bad_input_gets_its_status_and_the_service_keeps_serving() {
    if skip_without_root("bad_input_gets_its_status_and_the_service_keeps_serving") {
        return;
    }
    let r = start_http(
        "hx",
        &[1, 1],
        15_000,
        "max_header_bytes = 4096\nheader_timeout_ms = 1000\nresponse_timeout_ms = 1500\n\
         max_connections_per_client = 40",
    );
    let raw = |bytes: &[u8], wait: Duration| -> String {
        r.lab
            .client
            .enter(|| {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect_timeout(&vip(), TIMEOUT).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.write_all(bytes).unwrap();
                std::thread::sleep(wait);
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                String::from_utf8_lossy(&out).to_string()
            })
            .unwrap()
    };
    let status = |answer: &str| answer.split(' ').nth(1).unwrap_or("none").to_string();
    let malformed = raw(
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        Duration::ZERO,
    );
    assert_eq!(status(&malformed), "400", "{malformed}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8192)
    );
    let oversized = raw(big.as_bytes(), Duration::ZERO);
    assert_eq!(status(&oversized), "431", "{oversized}");
    // Half a head, then nothing: 408 once header_timeout_ms has passed.
    let slow = raw(b"GET / HTTP/1.1\r\nHost: x\r\n", Duration::ZERO);
    assert_eq!(status(&slow), "408", "{slow}");

    let mut conn = connect(&r);
    let late = conn.get("/slow/5000").unwrap();
    assert_eq!(late.status, 504, "{}", late.body_text());
    let mut conn = connect(&r);
    // Over the per-client limit: the extra connections are closed at once.
    let held: Vec<_> = (0..45)
        .map(|_| {
            r.lab
                .client
                .enter(|| std::net::TcpStream::connect(vip()))
                .unwrap()
                .unwrap()
        })
        .collect();
    wait_for(&r, "5 connections refused", TIMEOUT, |r| {
        refused(&http_view(r, "web"), "too_many_from_client") >= 5
    });
    drop(held);
    // No back end left: 503 with a body that says so.
    for node in ["be1", "be2"] {
        assert_eq!(fepctl(&r, &["drain", node]).0, 0);
    }
    let none = conn.get("/").unwrap();
    assert_eq!(none.status, 503);
    assert!(
        none.body_text().contains("no back end"),
        "{}",
        none.body_text()
    );
    for node in ["be1", "be2"] {
        assert_eq!(fepctl(&r, &["undrain", node]).0, 0);
    }
    wait_for(&r, "serving again", TIMEOUT, |r| {
        service(r, "web")
            .backends
            .iter()
            .all(|b| b.effective_ratio > 0)
    });
    let again = names(&r, &mut connect(&r), "/", 10);
    assert_eq!(again.len(), 10);
    let view = http_view(&r, "web");
    for (reason, want) in [
        ("bad_request", 1),
        ("header_too_large", 1),
        ("header_timeout", 1),
        ("no_backend", 1),
    ] {
        assert!(
            refused(&view, reason) >= want,
            "{reason}: {:?}",
            view.refused
        );
    }
}

fn refused(view: &HttpServiceView, reason: &str) -> u64 {
    view.refused
        .iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn http_services_follow_runtime_changes_restarts_and_cleanup() {
    if skip_without_root("http_services_follow_runtime_changes_restarts_and_cleanup") {
        return;
    }
    let mut r = start_http("hc", &[1, 1], 15_000, "");
    // Added at run time: listening within the maintenance pass, its port
    // delivered locally, its back ends pooled.
    let vip = VIP_V4.to_string();
    for args in [
        &[
            "service", "add", "api", "--vip", &vip, "--port", "81", "--mode", "http",
        ][..],
        &[
            "backend",
            "add",
            "api",
            "be2",
            "--ratio",
            "1",
            "--port",
            &ORIGIN.to_string(),
        ],
    ] {
        let (code, out) = fepctl(&r, args);
        assert_eq!(code, 0, "fepctl {args:?}: {out}");
    }
    let api = SocketAddr::new(IpAddr::V4(VIP_V4), 81);
    let get_api = |r: &Running| {
        r.lab
            .client
            .enter(|| KeepAlive::connect(api, TIMEOUT).and_then(|mut c| c.get("/")))
            .unwrap()
    };
    wait_for(&r, "the new HTTP service answering", TIMEOUT, |r| {
        get_api(r).is_ok_and(|resp| resp.body_text() == "be2")
    });
    let (code, out) = fepctl(&r, &["service", "remove", "api"]);
    assert_eq!(code, 0, "{out}");
    wait_for(&r, "the removed service's port closed", TIMEOUT, |r| {
        get_api(r).is_err()
    });

    // A restart: the listener is back with the same service, the ratio set
    // at run time kept.
    assert_eq!(fepctl(&r, &["ratio", "web", "be1", "3"]).0, 0);
    r.restart();
    let got = names(&r, &mut connect(&r), "/", 40);
    assert_eq!(tally(&got, 2), [30, 10], "3:1 after the restart");

    // Stopped and cleaned up: nothing of HTTP mode's set-up is left.
    assert!(r.fep.stop().unwrap().success());
    let out = cleanup(&r);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&r.lab.gateway);
    let rules = r.lab.gateway.ip_output(&["rule"]).unwrap();
    assert!(
        !rules.contains("dport 80"),
        "HTTP mode's rule left behind: {rules}"
    );
}
