//! Restarts and floods that must break no established connection: a stream
//! and an echo connection across SIGTERM + start and kill -9 + start (no
//! agent, no snapshot that knows them), on a gateway that forwarded before
//! fep started; a download across a restart; `fep --cleanup`; a UDP flood
//! against a full route table.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fep_shared::api::Count;
use fep_tests::{
    dropped, http, pattern, skip_without_root, status, sysctl, wait_for, Running, TIMEOUT,
};
use fep_tools::host;
use fep_tools::lab::{self, Lab, VIP_V4};
use fep_tools::netns::{self, Netns};

const STREAM: u16 = 7100;
const ECHO: u16 = 7000;
const UDP: u16 = 5353;

/// A lab with two back ends serving a stream, an echo service, HTTP and UDP,
/// no agents, and fep with those services (`top`: extra top-level keys);
/// the gateway forwards before fep starts, as every real gateway does.
fn start(tag: &str, top: &str) -> Running {
    let mut lab = Lab::new(tag, 2).expect("building the lab");
    set_sysctl(&lab.gateway, "net/ipv4/ip_forward", "1");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    for i in 0..2 {
        let mut args = lab::testsrv_args(i, &[80], &[UDP]);
        args.extend(["--echo", "7000", "--stream", "7100"].map(String::from));
        lab.start_backend_server(i, &testsrv, &args).unwrap();
    }
    let backends = r#"backend = [{ node = "be1", ratio = 1 }, { node = "be2", ratio = 1 }]"#;
    let services: String = [
        ("stream", STREAM, "tcp"),
        ("echo", ECHO, "tcp"),
        ("web", 80, "tcp"),
        ("dns", UDP, "udp"),
    ]
    .iter()
    .map(|(name, port, proto)| {
        format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{VIP_V4}\"\nport = {port}\nprotocol = \"{proto}\"\n{backends}\n\n"
        )
    })
    .collect();
    Running::start(lab, top, &services)
}

fn set_sysctl(ns: &Netns, path: &str, value: &str) {
    ns.enter(|| std::fs::write(format!("/proc/sys/{path}"), value))
        .unwrap()
        .unwrap_or_else(|e| panic!("setting {path} in {}: {e}", ns.name()));
}

/// A client's stream connection: `NAME N` lines, N counting up every 200 ms.
struct Stream {
    lines: BufReader<TcpStream>,
    node: String,
    next: u64,
}

impl Stream {
    fn open(r: &Running) -> Stream {
        let conn = r
            .lab
            .client
            .enter(|| TcpStream::connect((VIP_V4, STREAM)).unwrap())
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut s = Stream {
            lines: BufReader::new(conn),
            node: String::new(),
            next: 0,
        };
        let first = s.line();
        s.node = first.split(' ').next().unwrap().to_string();
        assert_eq!(first, format!("{} 0", s.node));
        s.next = 1;
        s
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        match self.lines.read_line(&mut line) {
            Ok(n) if n > 0 => line.trim_end().to_string(),
            Ok(_) => panic!("the stream was closed after line {}", self.next),
            Err(e) => panic!("the stream broke after line {}: {e}", self.next),
        }
    }

    /// Reads `n` more lines; each must be the next one, from the same node.
    fn follow(&mut self, n: u64) {
        for _ in 0..n {
            let want = format!("{} {}", self.node, self.next);
            assert_eq!(self.line(), want, "a line lost, repeated or from elsewhere");
            self.next += 1;
        }
    }
}

/// A client's echo connection: what it sends comes back byte for byte.
struct Echo {
    conn: TcpStream,
    sent: u64,
}

impl Echo {
    fn open(r: &Running) -> Echo {
        let mut conn = r
            .lab
            .client
            .enter(|| TcpStream::connect((VIP_V4, ECHO)).unwrap())
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut hello = [0u8; 4];
        conn.read_exact(&mut hello).unwrap();
        Echo { conn, sent: 0 }
    }

    fn round(&mut self) {
        let mut block = vec![0u8; 16 * 1024];
        pattern::fill(self.sent, &mut block);
        self.conn.write_all(&block).unwrap();
        let mut back = vec![0u8; block.len()];
        self.conn
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("the echo connection broke: {e}"));
        assert!(back == block, "echoed bytes differ");
        self.sent += block.len() as u64;
    }
}

fn config_of(r: &Running) -> String {
    std::fs::read_to_string(r.lab.dir().join("fep.toml")).unwrap()
}

#[test]
fn cleanup_removes_what_a_stop_leaves_and_is_idempotent() {
    if skip_without_root("cleanup_removes_what_a_stop_leaves_and_is_idempotent") {
        return;
    }
    let mut lab = Lab::new("rcl", 1).expect("building the lab");
    lab.start_backend_servers(&lab::workspace_bin("fep-testsrv").unwrap(), &[80], &[])
        .unwrap();
    let services = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{{ node = \"be1\", ratio = 1 }}]\n"
    );
    let mut r = Running::start(lab, "", &services);
    let gw = &r.lab.gateway;
    assert_eq!(sysctl(gw, "net/ipv4/ip_forward"), "1");
    let out = fep_tests::cleanup(&r);
    assert_eq!(out.status.code(), Some(1), "refused while fep runs");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{out:?}"
    );
    assert!(r.fep.stop().unwrap().success());
    // The stop leaves the hold: device, VIP route, rules, table, forwarding.
    assert!(gw.ip_output(&["link", "show", "fep0"]).is_ok());
    assert!(gw.ip_output(&["route"]).unwrap().contains("10.0.0.100"));
    assert!(gw.ip_output(&["rule"]).unwrap().contains("lookup 100"));
    assert!(gw
        .ip_output(&["route", "show", "table", "100"])
        .unwrap()
        .contains("blackhole"));
    let out = fep_tests::cleanup(&r);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("removed TUN device fep0"), "{said}");
    assert!(said.contains("ip_forward back to 0"), "{said}");
    fep_tests::assert_nothing_left(gw);
    assert_eq!(sysctl(gw, "net/ipv4/ip_forward"), "0");
    let out = fep_tests::cleanup(&r);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to remove"),
        "{out:?}"
    );
}

#[test]
fn a_handshake_in_flight_at_a_kill_9_completes_after_the_start() {
    if skip_without_root("a_handshake_in_flight_at_a_kill_9_completes_after_the_start") {
        return;
    }
    host::ensure(&[host::NFT]).expect("nftables, to hold back the handshake's last ACK");
    let mut r = start("fhs", "");
    // The client's last ACK of the handshake never reaches fep: the route
    // stays unconfirmed, so it is neither journaled nor, without a
    // snapshot, known after the kill; the back end keeps the connection
    // half-open and retries its SYN-ACK.
    let rules = r.lab.dir().join("drop-ack.nft");
    std::fs::write(
        &rules,
        format!(
            "table inet fhs {{\n  chain out {{\n    type filter hook output priority 0;\n    \
             ip daddr {VIP_V4} tcp dport {ECHO} tcp flags & (fin | syn | rst | psh | ack) == ack drop\n  }}\n}}\n"
        ),
    )
    .unwrap();
    netns::run(r.lab.client.command("nft").arg("-f").arg(&rules)).unwrap();
    let conn = r
        .lab
        .client
        .enter(|| TcpStream::connect((VIP_V4, ECHO)).unwrap())
        .unwrap();
    r.fep.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    let state = r.lab.dir().join("state");
    let _ = std::fs::remove_file(state.join("routes.bin"));
    let _ = std::fs::remove_file(state.join("routes.journal"));
    netns::run(
        r.lab
            .client
            .command("nft")
            .args(["delete", "table", "inet", "fhs"]),
    )
    .unwrap();
    let config = std::fs::read_to_string(r.lab.dir().join("fep.toml")).unwrap();
    r.fep = r
        .lab
        .start_fep(&lab::workspace_bin("fep").unwrap(), &config)
        .unwrap();
    // The back end's next SYN-ACK makes the route; the client's answer to
    // it completes the handshake, and the server's greeting and the echo
    // arrive.
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = BufReader::new(conn);
    let mut greeting = String::new();
    lines
        .read_line(&mut greeting)
        .expect("the server's greeting after the start");
    assert!(greeting.starts_with("be"), "{greeting:?}");
    lines.get_mut().write_all(b"still here\n").unwrap();
    let mut echo = String::new();
    lines.read_line(&mut echo).unwrap();
    assert_eq!(echo, "still here\n");
    let c = fep_tests::counters(&r);
    assert_eq!(c.get(Count::HandshakesAdopted), 1, "{c:?}");
}

fep_tests::both_paths! {
    fn a_stream_and_an_echo_connection_survive_a_sigterm_and_start() {
        if skip_without_root("a_stream_and_an_echo_connection_survive_a_sigterm_and_start") {
            return;
        }
        let mut r = start("rst", "");
        let mut stream = Stream::open(&r);
        let mut echo = Echo::open(&r);
        stream.follow(3);
        echo.round();
        // Segments sent while no fep runs (the stream's, every 200 ms) must not
        // reach the client past the return path: it would reset the connection.
        let down = Instant::now();
        assert!(r.fep.stop().unwrap().success());
        let stopping = down.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        let (gw, cfg) = (&r.lab.gateway, config_of(&r));
        assert!(
            gw.ip_output(&["rule"]).unwrap().contains("lookup 100"),
            "the return path stays while fep is stopped"
        );
        r.fep = r
            .lab
            .start_fep(&lab::workspace_bin("fep").unwrap(), &cfg)
            .unwrap();
        let serving = down.elapsed();
        stream.follow(1);
        eprintln!(
            "stop took {stopping:?}, serving again {serving:?} after SIGTERM, the stream's next \
             line {:?} after it",
            down.elapsed()
        );
        stream.follow(9);
        echo.round();
        let log = r.fep.log();
        assert!(log.contains("restored 2 route(s)"), "{log}");
    }

    fn connections_younger_than_any_snapshot_survive_a_kill_9_without_agents() {
        if skip_without_root("connections_younger_than_any_snapshot_survive_a_kill_9_without_agents") {
            return;
        }
        let mut r = start("rk9", "");
        let mut stream = Stream::open(&r);
        let mut echo = Echo::open(&r);
        stream.follow(2);
        echo.round();
        // Killed well before the first snapshot: only the journal knows them.
        r.fep.signal(libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(500));
        let state = r.lab.dir().join("state");
        assert!(
            !state.join("routes.bin").exists(),
            "a snapshot was taken: this test must kill fep before it"
        );
        let cfg = config_of(&r);
        r.fep = r
            .lab
            .start_fep(&lab::workspace_bin("fep").unwrap(), &cfg)
            .unwrap();
        let log = r.fep.log();
        assert!(
            log.contains("restored 2 route(s) from the route journal"),
            "{log}"
        );
        stream.follow(10);
        echo.round();
    }

    fn a_download_across_a_restart_arrives_byte_exact() {
        if skip_without_root("a_download_across_a_restart_arrives_byte_exact") {
            return;
        }
        const LEN: u64 = 8_000_000;
        let mut r = start("rdl", "");
        let cfg = config_of(&r);
        let Running { lab, fep } = &mut r;
        let lab: &Lab = lab;
        let addr = SocketAddr::new(VIP_V4.into(), 80);
        let (restarted_at, (status, received, mismatch, ended_at)) = std::thread::scope(|s| {
            // The restart, while the client reads slowly (about 2 MB/s).
            let restart = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(1500));
                assert!(fep.stop().unwrap().success());
                *fep = lab
                    .start_fep(&lab::workspace_bin("fep").unwrap(), &cfg)
                    .unwrap();
                Instant::now()
            });
            let download = lab
                .client
                .enter(|| {
                    let (mut received, mut mismatch) = (0u64, None);
                    let mut want = vec![0u8; 64 * 1024];
                    let (status, _) =
                        http::get_with(addr, &format!("/bytes/{LEN}"), TIMEOUT * 3, |chunk| {
                            pattern::fill(received, &mut want[..chunk.len()]);
                            if mismatch.is_none() && chunk != &want[..chunk.len()] {
                                mismatch = Some(received);
                            }
                            received += chunk.len() as u64;
                            std::thread::sleep(Duration::from_micros(chunk.len() as u64 / 2));
                            Ok(())
                        })
                        .expect("the download broke");
                    (status, received, mismatch, Instant::now())
                })
                .unwrap();
            (restart.join().unwrap(), download)
        });
        assert!(
            ended_at > restarted_at,
            "the download ended before fep was back: read slower"
        );
        assert_eq!(status, 200);
        assert_eq!(received, LEN);
        assert_eq!(mismatch, None, "first differing chunk at this offset");
    }

    fn a_udp_flood_on_a_full_table_evicts_no_established_connection() {
        if skip_without_root("a_udp_flood_on_a_full_table_evicts_no_established_connection") {
            return;
        }
        let r = start("rfl", "max_routes = 4000");
        let mut conns: Vec<Echo> = (0..40).map(|_| Echo::open(&r)).collect();
        for c in &mut conns {
            c.round();
        }
        std::thread::sleep(Duration::from_secs(3));
        let flows = 60_000u64;
        let started = Instant::now();
        let out = r
            .lab
            .client
            .command(lab::workspace_bin("fep-packets").unwrap())
            .args([
                "flood",
                "--dst",
                &format!("{VIP_V4}:{UDP}"),
                "--udp",
                "2",
                "--count",
                &(2 * flows).to_string(),
                "--seconds",
                "60",
                "--rate",
                "40000",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        eprintln!("{said} ({:.1} s)", started.elapsed().as_secs_f64());
        let after = status(&r);
        let c = &after.counters;
        eprintln!("after the flood: {after:?}");
        // The table came under pressure: full, and made room from the flood.
        let evicted = c.get(Count::UnconfirmedEvicted) + after.routes_evicted as u64;
        assert!(
            evicted >= 4000 && dropped(c, "table_full") > 0,
            "the table came under pressure: full, and the flood's routes evicted for each other"
        );
        for (i, c) in conns.iter_mut().enumerate() {
            c.conn
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut block = vec![0u8; 1024];
            pattern::fill(c.sent, &mut block);
            c.conn.write_all(&block).unwrap();
            let mut back = vec![0u8; block.len()];
            if let Err(e) = c.conn.read_exact(&mut back) {
                panic!(
                    "connection {i} of 40 broke after the flood: {e}\nfep log:\n{}",
                    r.fep.log()
                );
            }
            assert!(back == block);
        }
        // A status that reads is an answer.
        wait_for(&r, "fep still answers", Duration::from_secs(5), |r| {
            status(r);
            true
        });
    }
}
