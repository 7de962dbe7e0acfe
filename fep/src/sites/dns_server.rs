//! The DNS server's sockets: UDP and TCP on each `sites.dns.listen`
//! address, on threads of their own (never the workers' or the control
//! plane's). Bounded: one query per datagram up to [`MAX_QUERY`] bytes, at
//! most `max_tcp_connections` TCP connections (more wait in the listen
//! queue), each closed after `tcp_idle_timeout_ms` without a whole query.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use super::dns::MAX_QUERY;
use super::Sites;

/// UDP threads per address: recv and answer on one socket, in parallel.
const UDP_THREADS: usize = 2;
/// How often a blocked thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);

pub struct DnsServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds every address (failing if one cannot be bound) and serves.
    pub fn start(sites: Arc<Sites>) -> anyhow::Result<DnsServer> {
        let Some(dns) = sites.config().dns.clone() else {
            anyhow::bail!("no [sites.dns] table");
        };
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for &addr in &dns.listen {
            let udp = UdpSocket::bind(addr)
                .with_context(|| format!("cannot bind DNS UDP {addr} (sites.dns.listen)"))?;
            udp.set_read_timeout(Some(POLL))?;
            let tcp = TcpListener::bind(addr)
                .with_context(|| format!("cannot bind DNS TCP {addr} (sites.dns.listen)"))?;
            tcp.set_nonblocking(true)?;
            for _ in 0..UDP_THREADS {
                let (udp, sites, stop) = (udp.try_clone()?, sites.clone(), stop.clone());
                threads.push(spawn("fep-dns-udp", move || {
                    serve_udp(&udp, &sites, &stop)
                })?);
            }
            let (sites, stop, open) = (sites.clone(), stop.clone(), open.clone());
            let idle = Duration::from_millis(dns.tcp_idle_timeout_ms);
            let max = dns.max_tcp_connections;
            threads.push(spawn("fep-dns-tcp", move || {
                serve_tcp(&tcp, &sites, &stop, &open, max, idle)
            })?);
            tracing::info!("answering DNS for {} on {addr} (UDP and TCP)", dns.zone);
        }
        Ok(DnsServer { stop, threads })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .context("cannot start a DNS thread")
}

fn serve_udp(socket: &UdpSocket, sites: &Sites, stop: &AtomicBool) {
    let Some(zone) = sites.zone() else { return };
    // One byte more than a query may have, so an oversized one is seen.
    let mut buf = vec![0u8; MAX_QUERY + 1];
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("DNS UDP receive failed: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let (reply, outcome) = zone.answer(&buf[..len], from.ip(), false, sites);
        sites.stats.count(outcome);
        if let Some(reply) = reply {
            if let Err(e) = socket.send_to(&reply, from) {
                tracing::debug!("DNS UDP reply to {from} failed: {e}");
            }
        }
    }
}

fn serve_tcp(
    listener: &TcpListener,
    sites: &Arc<Sites>,
    stop: &Arc<AtomicBool>,
    open: &Arc<AtomicUsize>,
    max: usize,
    idle: Duration,
) {
    while !stop.load(Ordering::Relaxed) {
        if open.load(Ordering::Acquire) >= max {
            // Full: leave new connections in the listen queue.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let (stream, from) = match listener.accept() {
            Ok(a) => a,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                tracing::warn!("DNS TCP accept failed: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        open.fetch_add(1, Ordering::AcqRel);
        let (sites, stop, open) = (sites.clone(), stop.clone(), open.clone());
        let started = spawn("fep-dns-conn", move || {
            if let Err(e) = serve_connection(stream, from, &sites, &stop, idle) {
                tracing::debug!("DNS TCP {from}: {e}");
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
        if started.is_err() {
            tracing::warn!("no thread for a DNS TCP connection from {from}");
        }
    }
}

/// Length-prefixed queries (RFC 1035 4.2.2), answered in order.
fn serve_connection(
    mut stream: TcpStream,
    from: SocketAddr,
    sites: &Sites,
    stop: &AtomicBool,
    idle: Duration,
) -> std::io::Result<()> {
    let Some(zone) = sites.zone() else {
        return Ok(());
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    let mut buf = vec![0u8; MAX_QUERY];
    while !stop.load(Ordering::Relaxed) {
        let mut len = [0u8; 2];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_QUERY {
            sites.stats.count(super::dns::Reply::Dropped);
            return Ok(());
        }
        stream.read_exact(&mut buf[..len])?;
        let (reply, outcome) = zone.answer(&buf[..len], from.ip(), true, sites);
        sites.stats.count(outcome);
        let Some(reply) = reply else { return Ok(()) };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed)?;
    }
    Ok(())
}
