//! The I/O shell around the core: one worker thread per queue of a
//! multi-queue TUN device. The kernel spreads flows over the queues by flow
//! hash, so a flow stays on one worker.
//!
//! A worker serves its queue with io_uring ([`uring`]: batched reads and
//! writes) where the kernel allows it, else with a blocking read and a
//! write per packet. Either way each packet goes through
//! [`Dispatcher::process_offloaded`] in a reused buffer: no allocation and no
//! lock of its own per packet.

mod uring;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tun_rs::{DeviceBuilder, SyncDevice};

use crate::clock::Clock;
use crate::counters::{Count, DropReason, WorkerCounters};
use crate::dispatcher::{Dispatcher, Verdict, Worker};
use crate::holds::{GroupId, Replayed, Stored};

/// Room for the largest read: a 64 KB offloaded segment, its headers and
/// the virtio-net header.
const MAX_READ: usize = 65_536 + 512;
/// The signal that interrupts a worker's wait at stop, a blocking read or
/// `io_uring_enter` (its handler does nothing; it is installed without
/// `SA_RESTART`).
const WAKE_SIGNAL: libc::c_int = libc::SIGUSR1;

/// The queues of the TUN device, and whether they carry the virtio-net
/// header (checksum and segmentation offload).
pub struct Queues {
    pub devices: Vec<SyncDevice>,
    pub offload: bool,
}

/// Size of the virtio-net header before every packet read or written with
/// offload on.
const VNET_HDR: usize = 10;
/// virtio-net header flag: the L4 checksum holds only the pseudo-header sum.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

/// Creates the TUN device `name` with `queues` queues, up, with TCP checksum
/// and segmentation offload (a read or write moves up to 64 KB instead of
/// one MTU-sized packet) if the kernel allows it; or attaches to it if an
/// earlier fep left it. The device is persistent: it outlives fep, with its
/// routes, so that packets are dropped there (not misrouted) until the next
/// start (`fep --cleanup` deletes it).
pub fn open_queues(name: &str, queues: usize, queue_len: u32) -> io::Result<Queues> {
    match open(name, queues, queue_len, true) {
        Ok(devices) => Ok(Queues {
            devices,
            offload: true,
        }),
        Err(e) => {
            tracing::warn!("TUN offload unavailable ({e}); one packet per read and write");
            Ok(Queues {
                devices: open(name, queues, queue_len, false)?,
                offload: false,
            })
        }
    }
}

fn open(name: &str, queues: usize, queue_len: u32, offload: bool) -> io::Result<Vec<SyncDevice>> {
    let first = DeviceBuilder::new()
        .name(name)
        .multi_queue(true)
        .tx_queue_len(queue_len)
        .offload(offload)
        .enable(true)
        .build_sync()?;
    first.persist()?;
    let mut all = Vec::with_capacity(queues);
    for _ in 1..queues {
        all.push(first.try_clone()?);
    }
    all.insert(0, first);
    Ok(all)
}

/// The running worker threads.
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Vec<Arc<WorkerCounters>>,
}

impl Workers {
    /// Starts one worker per queue, batching its I/O if `batching`; and
    /// makes the replayer of held packets, for the control plane.
    pub fn spawn(
        queues: Queues,
        dispatcher: Arc<Dispatcher>,
        clock: Clock,
        batching: bool,
    ) -> io::Result<(Self, Replayer)> {
        install_wake_handler()?;
        let offload = queues.offload;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let replayer_counters = Arc::new(WorkerCounters::replayer());
        let first = queues
            .devices
            .first()
            .ok_or_else(|| io::Error::other("no TUN queue"))?;
        let replayer = Replayer {
            fd: first.as_fd().try_clone_to_owned()?,
            hdr: if offload { VNET_HDR } else { 0 },
            dispatcher: dispatcher.clone(),
            worker: Worker::replayer(replayer_counters.clone()),
            clock,
        };
        let mut counters = vec![replayer_counters];
        for (i, queue) in queues.devices.into_iter().enumerate() {
            let c = Arc::new(WorkerCounters::default());
            counters.push(c.clone());
            let (d, s) = (dispatcher.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fep-worker-{i}"))
                    .spawn(move || {
                        serve(queue, offload, batching, &d, Worker::new(c), &s, clock)
                    })?,
            );
        }
        Ok((
            Workers {
                stop,
                threads,
                counters,
            },
            replayer,
        ))
    }

    /// Every worker's counters, the replayer's first.
    pub fn counters(&self) -> &[Arc<WorkerCounters>] {
        &self.counters
    }

    /// Stops every worker and waits for it; the queues close with them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            // Repeated: a signal that lands just before the read starts is
            // not seen by it.
            while !t.is_finished() {
                // SAFETY: the thread is alive (not finished) and joinable.
                unsafe { libc::pthread_kill(t.as_pthread_t(), WAKE_SIGNAL) };
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// One worker: batched I/O if asked for and io_uring serves, else blocking
/// I/O.
fn serve(
    queue: SyncDevice,
    offload: bool,
    batching: bool,
    dispatcher: &Dispatcher,
    mut worker: Worker,
    stop: &AtomicBool,
    clock: Clock,
) {
    let hdr = if offload { VNET_HDR } else { 0 };
    if batching {
        match uring::run(queue.as_raw_fd(), hdr, dispatcher, &mut worker, stop, clock) {
            Ok(()) => return,
            Err(e) => {
                worker.counters.batched.store(false, Ordering::Relaxed);
                tracing::warn!(
                    "{e}; this worker reads and writes one packet per system call (set tun_batching = false to say so up front)"
                );
            }
        }
    }
    run_blocking(&queue, hdr, dispatcher, &mut worker, stop, clock);
}

/// The packet read into `buf[..n]`, processed in place: the length to write
/// back from `buf`'s start, if it is forwarded.
#[inline]
fn handle(
    buf: &mut [u8],
    n: usize,
    hdr: usize,
    dispatcher: &Dispatcher,
    worker: &mut Worker,
    now: u32,
) -> Option<usize> {
    if n < hdr {
        worker.counters.count(Count::TunReadErrors);
        return None;
    }
    // The virtio-net header goes back out as it came: the kernel finishes
    // the checksum and segments as it asked to.
    let partial = hdr > 0 && buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    loop {
        match dispatcher.process_offloaded(&mut buf[hdr..n], partial, now, worker) {
            Verdict::Forward(len) => return Some(hdr + len),
            Verdict::Drop(_) => return None,
            // Held as read, the virtio-net header with it, so the replay
            // handles it as this read would have. The packet is untouched
            // (a held verdict comes before any rewrite).
            Verdict::Hold(group) => match dispatcher.holds().store(group, &buf[..n]) {
                Stored::Held => {
                    worker.counters.count(Count::PacketsHeld);
                    return None;
                }
                Stored::Full => {
                    worker.counters.dropped(DropReason::HoldFull);
                    return None;
                }
                // The hold ended since the verdict: process it as usual.
                // (Holds start and end on an operator's or keepalived's
                // word, not per packet: this repeats once, not forever.)
                Stored::NotHeld => {}
            },
        }
    }
}

/// Replays a VIP group's held packets when its hold ends: through its own
/// [`Worker`] (whose counters join the workers'), written to the TUN device
/// on a descriptor of its own.
pub struct Replayer {
    fd: OwnedFd,
    hdr: usize,
    dispatcher: Arc<Dispatcher>,
    worker: Worker,
    clock: Clock,
}

impl Replayer {
    /// Ends `group`'s hold (see [`Holds::release`](crate::holds::Holds::release)).
    pub fn release(&mut self, group: GroupId) -> Replayed {
        let Replayer {
            fd,
            hdr,
            dispatcher,
            worker,
            clock,
        } = self;
        let mut errors = IoErrors::new(worker.counters.clone());
        let d: &Dispatcher = dispatcher;
        d.holds().release(group, |packet| {
            let n = packet.len();
            if let Some(len) = handle(packet, n, *hdr, d, worker, clock.now_ms()) {
                // SAFETY: writes `len` initialised bytes from a live slice
                // to a descriptor this replayer owns.
                let written = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), len) };
                if written < 0 {
                    errors.write_failed(&io::Error::last_os_error());
                }
            }
        })
    }
}

fn run_blocking(
    queue: &SyncDevice,
    hdr: usize,
    dispatcher: &Dispatcher,
    worker: &mut Worker,
    stop: &AtomicBool,
    clock: Clock,
) {
    let mut errors = IoErrors::new(worker.counters.clone());
    let mut buf = vec![0u8; MAX_READ];
    while !stop.load(Ordering::Relaxed) {
        // A blocking read: one system call per packet. `Workers::stop`
        // interrupts it with WAKE_SIGNAL.
        let n = match queue.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                errors.read_failed(&e);
                continue;
            }
        };
        errors.read_ok();
        if let Some(len) = handle(&mut buf, n, hdr, dispatcher, worker, clock.now_ms()) {
            if let Err(e) = queue.send(&buf[..len]) {
                errors.write_failed(&e);
            }
        }
    }
}

extern "C" fn wake(_: libc::c_int) {}

/// Makes WAKE_SIGNAL interrupt blocking system calls instead of killing the
/// process or restarting the call.
fn install_wake_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with a handler that does nothing is valid.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = wake as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A worker's TUN I/O errors: counted, the first few logged, and errors
/// that do not go away (the device deleted under fep) paced so that the
/// worker sleeps instead of spinning a core.
struct IoErrors {
    counters: Arc<WorkerCounters>,
    logged: u32,
    reads_in_a_row: u32,
}

impl IoErrors {
    fn new(counters: Arc<WorkerCounters>) -> Self {
        IoErrors {
            counters,
            logged: 0,
            reads_in_a_row: 0,
        }
    }

    fn read_failed(&mut self, e: &io::Error) {
        self.counters.count(Count::TunReadErrors);
        self.log("read", e);
        self.reads_in_a_row += 1;
        if self.reads_in_a_row > 3 {
            std::thread::sleep(Duration::from_millis(u64::from(
                self.reads_in_a_row.min(100),
            )));
        }
    }

    #[inline]
    fn read_ok(&mut self) {
        self.reads_in_a_row = 0;
    }

    fn write_failed(&mut self, e: &io::Error) {
        self.counters.count(Count::TunWriteErrors);
        self.log("write", e);
    }

    /// Logs the first few errors, then only counts them.
    fn log(&mut self, op: &str, e: &io::Error) {
        if self.logged < 10 {
            self.logged += 1;
            tracing::warn!(
                "TUN {op} failed: {e} (counted; only the first 10 per worker are logged)"
            );
        }
    }
}
