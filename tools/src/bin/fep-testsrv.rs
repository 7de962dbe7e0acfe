//! `fep-testsrv --name NODE [--tcp PORT]... [--udp PORT]... [--echo PORT]...`:
//! a back-end server for the demo and the tests. Over HTTP it answers `GET /`
//! with its node name and `GET /bytes/N` with N bytes of the deterministic
//! pattern; over UDP it answers every datagram with its node name; on an echo
//! port it sends its name and a newline, then echoes every byte until the
//! client closes (a long-lived connection); on a stream port it sends
//! `NAME N\n` with N = 0, 1, 2 … every 200 ms until the client closes (data
//! that flows server to client only); on an `--http` port it is a
//! keep-alive HTTP/1.1 origin server (`fep_tools::origin`). Listens on
//! `[::]` (IPv4 and IPv6); prints `ready` once every port is bound.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};

use anyhow::Context;
use clap::Parser;
use fep_tools::{origin, pattern};

#[derive(Parser)]
struct Args {
    /// Node name to answer with.
    #[arg(long)]
    name: String,
    /// TCP port to serve HTTP on (repeatable).
    #[arg(long)]
    tcp: Vec<u16>,
    /// UDP port to answer on (repeatable).
    #[arg(long)]
    udp: Vec<u16>,
    /// TCP port of the long-lived echo service (repeatable).
    #[arg(long)]
    echo: Vec<u16>,
    /// TCP port of the line-every-200-ms stream (repeatable).
    #[arg(long)]
    stream: Vec<u16>,
    /// TCP port of the keep-alive HTTP/1.1 server (repeatable).
    #[arg(long)]
    http: Vec<u16>,
    /// How long an idle `--http` connection is kept open.
    #[arg(long, default_value_t = 15_000)]
    keepalive_ms: u64,
    /// Every `--http` answer (but `/stats`) this late: a server far away.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

/// What serves one accepted TCP connection.
type Handler = fn(TcpStream, &str) -> std::io::Result<()>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut threads = Vec::new();
    let http = args.tcp.iter().map(|&p| (p, serve_http as Handler));
    let echo = args.echo.iter().map(|&p| (p, serve_echo as Handler));
    let stream = args.stream.iter().map(|&p| (p, serve_stream as Handler));
    for (port, serve) in http.chain(echo).chain(stream) {
        let listener =
            TcpListener::bind(("::", port)).with_context(|| format!("bind tcp {port}"))?;
        let name = args.name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &name);
                });
            }
        }));
    }
    if !args.http.is_empty() {
        let keepalive = std::time::Duration::from_millis(args.keepalive_ms);
        let delay = std::time::Duration::from_millis(args.delay_ms);
        threads.push(origin::serve(
            args.name.clone(),
            &args.http,
            keepalive,
            delay,
        )?);
    }
    for port in args.udp {
        let sock = UdpSocket::bind(("::", port)).with_context(|| format!("bind udp {port}"))?;
        let name = args.name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(name.as_bytes(), from);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve_http(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split(' ').nth(1).unwrap_or("/");
    let header = |len: u64| {
        format!("HTTP/1.0 200 OK\r\nContent-Length: {len}\r\nX-Node: {name}\r\nConnection: close\r\n\r\n")
    };
    match path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        Some(len) => {
            conn.write_all(header(len).as_bytes())?;
            let mut chunk = vec![0u8; 64 * 1024];
            let mut off = 0;
            while off < len {
                let n = (len - off).min(chunk.len() as u64) as usize;
                pattern::fill(off, &mut chunk[..n]);
                conn.write_all(&chunk[..n])?;
                off += n as u64;
            }
        }
        None => {
            let body = format!("{name}\n");
            conn.write_all(header(body.len() as u64).as_bytes())?;
            conn.write_all(body.as_bytes())?;
        }
    }
    conn.flush()
}

fn serve_echo(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    conn.write_all(format!("{name}\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

fn serve_stream(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    for n in 0u64.. {
        conn.write_all(format!("{name} {n}\n").as_bytes())?;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}
