//! The DNS server's sockets: UDP and TCP on each `sites.dns.listen`
//! address, on threads of their own (never the workers' or the control
//! plane's). Each UDP thread has its own `SO_REUSEPORT` socket and takes
//! up to [`BATCH`] datagrams per `recvmmsg`, answering them with one
//! `sendmmsg`. Bounded: one query per datagram up to [`MAX_QUERY`] bytes,
//! at most `max_tcp_connections` TCP connections (more wait in the listen
//! queue), each closed after `tcp_idle_timeout_ms` without a whole query.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use super::dns::{Scratch, MAX_QUERY};
use super::Sites;

/// UDP threads (and sockets) per address: one per core fep may run on,
/// so no two of them take turns on one core (each turn a task switch).
fn udp_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_UDP_THREADS))
}
const MAX_UDP_THREADS: usize = 8;
/// Datagrams taken and answered per system call.
const BATCH: usize = 32;
/// Each UDP socket's receive buffer: room for bursts while its thread
/// waits for a core.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;
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
            let tcp = TcpListener::bind(addr)
                .with_context(|| format!("cannot bind DNS TCP {addr} (sites.dns.listen)"))?;
            tcp.set_nonblocking(true)?;
            for _ in 0..udp_threads() {
                let udp = bind_udp(addr)
                    .with_context(|| format!("cannot bind DNS UDP {addr} (sites.dns.listen)"))?;
                udp.set_read_timeout(Some(POLL))?;
                let (sites, stop) = (sites.clone(), stop.clone());
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

/// A UDP socket on `addr` that other threads' sockets share
/// (`SO_REUSEPORT`: the kernel spreads queriers over them).
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned by
    // the UdpSocket made from it at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    for (name, value) in [(libc::SO_REUSEPORT, 1), (libc::SO_RCVBUF, RECEIVE_BUFFER)] {
        // SAFETY: an int option on our descriptor, pointer valid for the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (storage, len) = to_sockaddr(addr);
    // SAFETY: bind(2) with a sockaddr of the length given.
    if unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The address in a sockaddr the kernel filled in.
fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<IpAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it holds a sockaddr_in.
            let sin: &libc::sockaddr_in =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            Some(IpAddr::V4(Ipv4Addr::from(
                sin.sin_addr.s_addr.to_ne_bytes(),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// One UDP thread's buffers: the datagrams in, their sources, the replies.
struct Batch {
    queries: Vec<u8>,
    lens: [usize; BATCH],
    sources: [libc::sockaddr_storage; BATCH],
    replies: Vec<Vec<u8>>,
    scratch: Scratch,
}

/// A query's slot in [`Batch::queries`]: one byte more than a query may
/// have, so an oversized one is seen.
const SLOT: usize = MAX_QUERY + 1;

impl Batch {
    fn new() -> Batch {
        Batch {
            queries: vec![0; BATCH * SLOT],
            lens: [0; BATCH],
            // SAFETY: all-zero sockaddr_storage values are valid.
            sources: unsafe { std::mem::zeroed() },
            replies: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            scratch: Scratch::default(),
        }
    }

    /// Waits for a datagram (up to the socket's read timeout) and takes
    /// what else is queued, up to [`BATCH`]; returns how many.
    fn receive(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        let base = self.queries.as_mut_ptr();
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            // SAFETY: slot i lies within `queries` (BATCH slots).
            iov_base: unsafe { base.add(i * SLOT) }.cast(),
            iov_len: SLOT,
        });
        // SAFETY: all-zero mmsghdr values are valid; each is then pointed
        // at its own iovec and source, which outlive the call.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut self.sources[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: BATCH valid headers; MSG_WAITFORONE blocks for the first
        // datagram only (bounded by SO_RCVTIMEO).
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, m) in self.lens.iter_mut().zip(&msgs[..n]) {
            *len = m.msg_len as usize;
        }
        Ok(n)
    }

    /// Sends the non-empty replies of the first `n` slots, as few calls as
    /// the kernel allows.
    fn send(&mut self, socket: &UdpSocket, n: usize) {
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|_| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        // SAFETY: as in `receive`.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut count = 0;
        for i in 0..n {
            if self.replies[i].is_empty() {
                continue;
            }
            iovs[count] = libc::iovec {
                iov_base: self.replies[i].as_mut_ptr().cast(),
                iov_len: self.replies[i].len(),
            };
            let m = &mut msgs[count].msg_hdr;
            m.msg_iov = &mut iovs[count];
            m.msg_iovlen = 1;
            m.msg_name = (&mut self.sources[i] as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = match libc::c_int::from(self.sources[i].ss_family) {
                libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
                _ => std::mem::size_of::<libc::sockaddr_in6>(),
            } as libc::socklen_t;
            count += 1;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: headers `sent..count` point at live replies and sources.
            let rc = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs[sent..].as_mut_ptr(),
                    (count - sent) as libc::c_uint,
                    0,
                )
            };
            if rc <= 0 {
                tracing::debug!(
                    "a DNS UDP reply failed: {}",
                    std::io::Error::last_os_error()
                );
                // Skip the one that failed; its querier asks again.
                sent += 1;
            } else {
                sent += rc as usize;
            }
        }
    }
}

fn serve_udp(socket: &UdpSocket, sites: &Sites, stop: &AtomicBool) {
    let Some(zone) = sites.zone() else { return };
    let mut b = Batch::new();
    while !stop.load(Ordering::Relaxed) {
        let n = match b.receive(socket) {
            Ok(n) => n,
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
        for i in 0..n {
            let query = &b.queries[i * SLOT..i * SLOT + b.lens[i]];
            let reply = &mut b.replies[i];
            reply.clear();
            let Some(from) = from_sockaddr(&b.sources[i]) else {
                continue;
            };
            let outcome = zone.answer_udp(query, from, sites, &mut b.scratch, reply);
            sites.stats.count(outcome);
        }
        b.send(socket, n);
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
