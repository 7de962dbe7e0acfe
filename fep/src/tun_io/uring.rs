//! Batched TUN I/O with io_uring. One multishot read per queue fills
//! buffers from a provided-buffer ring as packets arrive; every packet to
//! forward goes back as a write submitted with the next wait. Under load one
//! `io_uring_enter` carries many reads and writes instead of two system
//! calls per packet, and a burst (a response and its FIN) leaves fep in one
//! go rather than with a wake-up of the receiver between its packets.
//!
//! A queue's order is kept: one read request takes its packets in turn, and
//! TUN writes complete inline, in submission order.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, Fd};
use io_uring::{cqueue, opcode, squeue, IoUring};

use super::{handle, IoErrors, MAX_READ};
use crate::clock::Clock;
use crate::dispatcher::{Dispatcher, Worker};

/// Buffers per queue (a power of two): the most packets one wake-up can
/// hand over.
const BUFFERS: u16 = 16;
const GROUP: u16 = 0;
/// `user_data` of the read; a write carries the id of its buffer.
const READ: u64 = u64::MAX;
/// Submission queue entries: room for a write per buffer and the read,
/// twice over (a submission cut short by a signal leaves some queued).
const QUEUE: u32 = BUFFERS as u32 * 4;

/// The provided-buffer ring: packet buffers the kernel reads into, handed
/// back once their packet is written or dropped.
struct BufRing {
    entries: *mut BufRingEntry,
    data: *mut u8,
    tail: u16,
}

impl BufRing {
    const ENTRIES: Layout =
        match Layout::from_size_align(BUFFERS as usize * std::mem::size_of::<BufRingEntry>(), 4096)
        {
            Ok(l) => l,
            Err(_) => panic!("ring layout"),
        };
    const DATA: Layout = match Layout::from_size_align(BUFFERS as usize * MAX_READ, 64) {
        Ok(l) => l,
        Err(_) => panic!("buffer layout"),
    };

    /// Allocates the buffers and registers them with `ring`, all provided.
    fn register(ring: &IoUring) -> io::Result<Self> {
        // SAFETY: both layouts have a non-zero size; what was allocated is
        // freed on failure.
        let entries = unsafe { alloc_zeroed(Self::ENTRIES) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let data = unsafe { alloc_zeroed(Self::DATA) };
        if data.is_null() {
            unsafe { dealloc(entries.cast(), Self::ENTRIES) };
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut bufs = BufRing {
            entries,
            data,
            tail: 0,
        };
        // SAFETY: `entries` is page-aligned, zeroed, BUFFERS entries long and
        // outlives the registration (see `Uring`).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, BUFFERS, GROUP, 0)?;
        }
        for bid in 0..BUFFERS {
            bufs.give(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Queues buffer `bid` for the kernel (seen after [`BufRing::publish`]).
    fn give(&mut self, bid: u16) {
        // SAFETY: the index is masked into the ring and the buffer address
        // is inside the data allocation.
        unsafe {
            let e = &mut *self.entries.add(usize::from(self.tail & (BUFFERS - 1)));
            e.set_addr(self.data.add(usize::from(bid) * MAX_READ) as u64);
            e.set_len(MAX_READ as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in entry 0; the kernel reads it with
        // acquire semantics.
        unsafe {
            let tail = BufRingEntry::tail(self.entries).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The buffer `bid`, which the kernel has handed over and not got back.
    fn buf(&mut self, bid: u16) -> &mut [u8] {
        // SAFETY: `bid` came from a completion and is not in the ring, so
        // nothing else refers to it until `give`.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.add(usize::from(bid) * MAX_READ), MAX_READ)
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `register` with these layouts.
        unsafe {
            dealloc(self.entries.cast(), Self::ENTRIES);
            dealloc(self.data, Self::DATA);
        }
    }
}

/// The ring and the buffers the kernel reads into. Fields drop in order:
/// the ring, and any read still armed on it, goes before the buffers.
struct Uring {
    ring: IoUring,
    bufs: BufRing,
}

/// Why the batched loop did not run: the caller falls back to blocking I/O.
#[derive(Debug, thiserror::Error)]
#[error("io_uring unavailable for TUN I/O: {0}")]
pub struct Unsupported(io::Error);

/// Serves one queue until `stop`; `Err` before the first packet if the
/// kernel (or a seccomp policy) refuses io_uring or multishot reads.
/// Moves the pending entries to the submission queue, in order; what does
/// not fit waits for the next round.
fn queue(ring: &mut IoUring, pending: &mut Vec<squeue::Entry>) {
    let mut sq = ring.submission();
    let mut pushed = 0;
    for e in pending.iter() {
        // SAFETY: a write's buffer stays out of the ring until its
        // completion.
        if unsafe { sq.push(e) }.is_err() {
            // Full (see QUEUE: it should not be).
            break;
        }
        pushed += 1;
    }
    pending.drain(..pushed);
}

/// A failed read completion: before the first packet, a sign that this
/// kernel or device cannot do multishot reads (fall back to blocking I/O);
/// after it, a read error counted and paced like any other.
fn read_failed(errno: i32, served: bool, errors: &mut IoErrors) -> Result<(), Unsupported> {
    let e = io::Error::from_raw_os_error(errno);
    match errno {
        // Every buffer is out: re-armed once writes give some back.
        libc::ENOBUFS => Ok(()),
        libc::EINVAL | libc::EOPNOTSUPP | libc::EBADFD if !served => Err(Unsupported(e)),
        _ => {
            errors.read_failed(&e);
            Ok(())
        }
    }
}

pub(super) fn run(
    fd: RawFd,
    hdr: usize,
    dispatcher: &Dispatcher,
    worker: &mut Worker,
    stop: &AtomicBool,
    clock: Clock,
) -> Result<(), Unsupported> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(QUEUE)
        .or_else(|_| IoUring::new(QUEUE))
        .map_err(Unsupported)?;
    let bufs = BufRing::register(&ring).map_err(Unsupported)?;
    let mut io = Uring { ring, bufs };
    let Uring { ring, bufs } = &mut io;
    worker.counters.batched.store(true, Ordering::Relaxed);
    let mut errors = IoErrors::new(worker.counters.clone());
    let read = opcode::ReadMulti::new(Fd(fd), 0, GROUP)
        .build()
        .user_data(READ);
    let mut served = false;
    let mut arm = true;
    let mut pending: Vec<squeue::Entry> = Vec::with_capacity(usize::from(BUFFERS) + 1);
    while !stop.load(Ordering::Relaxed) {
        if arm {
            pending.push(read.clone());
            arm = false;
        }
        bufs.publish();
        queue(ring, &mut pending);
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) if !served => return Err(Unsupported(e)),
            Err(e) => {
                // The worker cannot read: counted and paced as a read error.
                errors.read_failed(&e);
                continue;
            }
        }
        let now = clock.now_ms();
        for cqe in ring.completion() {
            let res = cqe.result();
            if cqe.user_data() != READ {
                let bid = cqe.user_data() as u16;
                if res < 0 {
                    errors.write_failed(&io::Error::from_raw_os_error(-res));
                }
                bufs.give(bid);
                continue;
            }
            if !cqueue::more(cqe.flags()) {
                arm = true;
            }
            if res < 0 {
                read_failed(-res, served, &mut errors)?;
                continue;
            }
            served = true;
            errors.read_ok();
            let Some(bid) = cqueue::buffer_select(cqe.flags()) else {
                continue;
            };
            let buf = bufs.buf(bid);
            match handle(buf, res as usize, hdr, dispatcher, worker, now) {
                Some(len) => pending.push(
                    opcode::Write::new(Fd(fd), buf.as_ptr(), len as u32)
                        .build()
                        .user_data(u64::from(bid)),
                ),
                None => bufs.give(bid),
            }
        }
    }
    Ok(())
}
