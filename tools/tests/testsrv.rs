//! fep-testsrv on loopback: the answers the demo and the netns tests rely on.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use fep_tools::{http, pattern};

#[test]
fn answers_its_name_and_the_byte_pattern_over_http_and_udp() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fep-testsrv"))
        .args([
            "--name",
            "be7",
            "--tcp",
            &port.to_string(),
            "--udp",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");

    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let t = Duration::from_secs(5);
    let r = http::get(addr, "/", t).unwrap();
    assert_eq!(
        (r.status, r.body_text().as_str(), r.header("x-node")),
        (200, "be7", Some("be7"))
    );
    let r = http::get(addr, "/bytes/300000", t).unwrap();
    let mut want = vec![0u8; 300_000];
    pattern::fill(0, &mut want);
    assert!(r.body == want, "pattern bytes differ");

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(t)).unwrap();
    sock.send_to(b"who?", addr).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"be7"[..], addr));
    child.kill().unwrap();
    child.wait().unwrap();
}
