//! VIP groups whose packets are held (document 001's migration mode): when
//! a group arrives on this gateway its routes are not here yet, so its
//! packets — both directions — are stored in arrival order instead of being
//! dropped or answered, and replayed once the routes are back.
//!
//! The data path pays one relaxed load while no group is held. A held
//! packet takes its group's lock (never another group's, never on the
//! normal path). Storing never allocates: a group's buffer is reserved when
//! its hold starts. Order is kept across the end of a hold: the replayer
//! swaps the filled buffer out and replays it, and only when it finds the
//! buffer empty under the lock does the group become normal, so no packet
//! that came later is forwarded before one that was held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A VIP group's slot: its place in the config's `vip_group` list.
pub type GroupId = u16;

/// Each record in a hold buffer: the packet's length, then its bytes.
const LEN: usize = 4;

/// What became of a packet offered to [`Holds::store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Held,
    /// The group's buffer is full: the packet is dropped (and counted).
    Full,
    /// The hold ended meanwhile: process the packet as usual.
    NotHeld,
}

/// What one hold stored and replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Holds {
    /// Whether any group is held: the one load the normal path pays.
    any: AtomicBool,
    groups: Box<[Group]>,
    max_bytes: usize,
    /// Serialises starting and ending holds, so `any` is never cleared
    /// while a hold starts.
    control: Mutex<()>,
}

#[derive(Debug, Default)]
struct Group {
    held: AtomicBool,
    /// Records of held packets; reserved to `max_bytes` while held.
    buf: Mutex<Vec<u8>>,
}

impl Holds {
    /// `groups` slots, each holding up to `max_bytes` of packets (records
    /// included) at a time.
    pub fn new(groups: usize, max_bytes: usize) -> Self {
        Holds {
            any: AtomicBool::new(false),
            groups: (0..groups).map(|_| Group::default()).collect(),
            max_bytes,
            control: Mutex::new(()),
        }
    }

    /// Whether packets of `group` are to be held.
    #[inline]
    pub fn is_held(&self, group: GroupId) -> bool {
        self.any.load(Ordering::Relaxed)
            && self
                .groups
                .get(usize::from(group))
                .is_some_and(|g| g.held.load(Ordering::Acquire))
    }

    /// Whether any group is held.
    #[inline]
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Starts holding `group`'s packets; false if it already is held (or
    /// has no slot).
    pub fn hold(&self, group: GroupId) -> bool {
        let _control = lock(&self.control);
        let Some(g) = self.groups.get(usize::from(group)) else {
            return false;
        };
        let mut buf = lock(&g.buf);
        if g.held.load(Ordering::Acquire) {
            return false;
        }
        *buf = Vec::with_capacity(self.max_bytes);
        g.held.store(true, Ordering::Release);
        self.any.store(true, Ordering::Relaxed);
        true
    }

    /// Stores a packet of a held group (the data path, on a held verdict).
    pub fn store(&self, group: GroupId, packet: &[u8]) -> Stored {
        let Some(g) = self.groups.get(usize::from(group)) else {
            return Stored::NotHeld;
        };
        let mut buf = lock(&g.buf);
        if !g.held.load(Ordering::Acquire) {
            return Stored::NotHeld;
        }
        let len = u32::try_from(packet.len()).unwrap_or(u32::MAX);
        if buf.len() + LEN + packet.len() > self.max_bytes {
            return Stored::Full;
        }
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(packet);
        Stored::Held
    }

    /// Ends `group`'s hold: hands every stored packet to `replay` in
    /// arrival order, including those stored while the replay runs, and
    /// makes the group normal once none is left. Packets are handed over
    /// outside the group's lock, so the data path keeps storing meanwhile.
    pub fn release(&self, group: GroupId, mut replay: impl FnMut(&mut [u8])) -> Replayed {
        let _control = lock(&self.control);
        let mut done = Replayed::default();
        let Some(g) = self.groups.get(usize::from(group)) else {
            return done;
        };
        let mut spare = Vec::with_capacity(self.max_bytes);
        loop {
            {
                let mut buf = lock(&g.buf);
                if buf.is_empty() {
                    g.held.store(false, Ordering::Release);
                    *buf = Vec::new();
                    break;
                }
                std::mem::swap(&mut *buf, &mut spare);
            }
            let mut rest = &mut spare[..];
            while rest.len() >= LEN {
                let (head, tail) = rest.split_at_mut(LEN);
                let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
                let (packet, tail) = tail.split_at_mut(len.min(tail.len()));
                done.packets += 1;
                done.bytes += packet.len() as u64;
                replay(packet);
                rest = tail;
            }
            spare.clear();
        }
        let still = self.groups.iter().any(|g| g.held.load(Ordering::Acquire));
        self.any.store(still, Ordering::Relaxed);
        done
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_packets_come_back_in_arrival_order_then_the_group_is_normal() {
        let h = Holds::new(2, 1024);
        assert!(!h.any() && !h.is_held(0));
        assert!(h.hold(1));
        assert!(!h.hold(1), "already held");
        assert!(h.is_held(1) && !h.is_held(0), "only that group");
        assert_eq!(h.store(0, b"other"), Stored::NotHeld);
        for p in [&b"one"[..], b"two", b"three"] {
            assert_eq!(h.store(1, p), Stored::Held);
        }
        let mut seen = Vec::new();
        let done = h.release(1, |p| seen.push(p.to_vec()));
        assert_eq!(seen, [&b"one"[..], b"two", b"three"]);
        assert_eq!(
            done,
            Replayed {
                packets: 3,
                bytes: 11
            }
        );
        assert!(!h.any() && !h.is_held(1));
        assert_eq!(h.store(1, b"late"), Stored::NotHeld);
    }

    #[test]
    fn packets_stored_during_the_replay_are_replayed_after_the_earlier_ones() {
        let h = Holds::new(1, 1024);
        h.hold(0);
        h.store(0, b"a");
        let mut seen = Vec::new();
        let mut stored_more = false;
        h.release(0, |p| {
            seen.push(p.to_vec());
            if !stored_more {
                stored_more = true;
                // What a worker stores while the replay runs.
                assert_eq!(h.store(0, b"b"), Stored::Held);
            }
        });
        assert_eq!(seen, [b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn a_full_buffer_refuses_the_packet_and_keeps_what_it_has() {
        let h = Holds::new(1, 2 * (LEN + 10));
        h.hold(0);
        assert_eq!(h.store(0, &[1; 10]), Stored::Held);
        assert_eq!(h.store(0, &[2; 10]), Stored::Held);
        assert_eq!(h.store(0, &[3; 1]), Stored::Full);
        let mut seen = Vec::new();
        h.release(0, |p| seen.push(p[0]));
        assert_eq!(seen, [1, 2]);
    }

    #[test]
    fn a_group_without_a_slot_is_never_held() {
        let h = Holds::new(1, 1024);
        assert!(!h.hold(5));
        assert!(!h.is_held(5));
        assert_eq!(h.store(5, b"x"), Stored::NotHeld);
        assert_eq!(
            h.release(5, |_| panic!("nothing held")),
            Replayed::default()
        );
    }
}
