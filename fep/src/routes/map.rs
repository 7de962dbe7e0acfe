//! The route map: a concurrent hash table from [`FlowKey`] to a route, with
//! lookups that take no lock and write nothing shared.
//!
//! Open addressing with linear probing over fixed 32-byte slots, sized once
//! from `max_routes` (at most 80 % full, so a probe always ends at an empty
//! slot). Readers never block:
//! - an insert fills an empty slot's key, then publishes it with a release
//!   store of the slot's control word;
//! - a removal shifts the entries after it back (no tombstones, so probe
//!   runs stay short however long the process runs), inside a table-wide
//!   sequence count that readers check around each lookup and retry on;
//! - inserts and removals take one writer lock (the miss path only);
//! - every slot's control word carries a generation, bumped whenever the
//!   slot changes hands, so a reader holding a [`RouteRef`] from before a
//!   removal cannot set state bits on the route that moved into its slot.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::Cell;
use std::ops::ControlFlow;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use super::route::{state, FlowKey, Route};
use crate::transfer_table::BackendId;

/// Control word: generation (32) | used (8) | state (8) | back end (16).
const USED: u64 = 1 << 24;
const GEN_ONE: u64 = 1 << 32;

fn ctrl(gen: u64, state: u8, backend: BackendId) -> u64 {
    gen & !(GEN_ONE - 1) | USED | u64::from(state) << 16 | u64::from(backend)
}

fn ctrl_state(c: u64) -> u8 {
    (c >> 16) as u8
}

fn ctrl_backend(c: u64) -> BackendId {
    c as u16
}

#[repr(C, align(32))]
#[derive(Default)]
struct Slot {
    ctrl: AtomicU64,
    client_hi: AtomicU64,
    client_lo: AtomicU64,
    service_port: AtomicU32,
    last_seen: AtomicU32,
}

/// The key's words as a slot holds them.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Words {
    hi: u64,
    lo: u64,
    service_port: u32,
}

impl Words {
    fn of(key: &FlowKey) -> Self {
        let a = u128::from_ne_bytes(key.client);
        Words {
            hi: (a >> 64) as u64,
            lo: a as u64,
            service_port: u32::from(key.service) << 16 | u32::from(key.client_port),
        }
    }

    fn key(&self) -> FlowKey {
        FlowKey {
            service: (self.service_port >> 16) as u16,
            client_port: self.service_port as u16,
            client: (u128::from(self.hi) << 64 | u128::from(self.lo)).to_ne_bytes(),
        }
    }
}

impl Slot {
    #[inline]
    fn words(&self) -> Words {
        Words {
            hi: self.client_hi.load(Ordering::Relaxed),
            lo: self.client_lo.load(Ordering::Relaxed),
            service_port: self.service_port.load(Ordering::Relaxed),
        }
    }

    fn set_words(&self, w: Words) {
        self.client_hi.store(w.hi, Ordering::Relaxed);
        self.client_lo.store(w.lo, Ordering::Relaxed);
        self.service_port.store(w.service_port, Ordering::Relaxed);
    }
}

/// A live route found by [`RouteMap::get`]: its back end as found, and
/// updates that apply only while the slot still holds it.
pub struct RouteRef<'a> {
    slot: &'a Slot,
    ctrl: u64,
    /// Connections this reference's updates closed (1) or reopened (-1).
    closes: Cell<i8>,
}

impl RouteRef<'_> {
    pub fn backend(&self) -> BackendId {
        ctrl_backend(self.ctrl)
    }

    pub fn state(&self) -> u8 {
        ctrl_state(self.slot.ctrl.load(Ordering::Relaxed))
    }

    pub fn last_seen(&self) -> u32 {
        self.slot.last_seen.load(Ordering::Relaxed)
    }

    /// Whether this reference's updates closed the route's connection (1),
    /// reopened it (-1) or neither (0): exactly one update makes each such
    /// change, however many workers race, so counts kept from it are exact.
    pub fn closes(&self) -> i8 {
        self.closes.get()
    }

    /// Records a packet: its time and the state bits it sets. Writes only
    /// what changed, so a busy flow does not keep dirtying the cache line.
    /// False if the route left this slot meanwhile (look it up again).
    #[inline]
    pub fn touch(&self, now: u32, set: u8) -> bool {
        if self.slot.last_seen.load(Ordering::Relaxed) != now {
            self.slot.last_seen.store(now, Ordering::Relaxed);
        }
        if set == 0 {
            return true;
        }
        self.update(|c| c | u64::from(set) << 16)
    }

    /// A new connection on a client port whose previous connection ended:
    /// the route stays (same back end) with a fresh state.
    pub fn reopen(&self, now: u32) -> bool {
        self.slot.last_seen.store(now, Ordering::Relaxed);
        self.update(|c| c & !(0xff << 16))
    }

    /// Applies `f` to the control word while its generation is the one
    /// found; skips the write when nothing changes.
    fn update(&self, f: impl Fn(u64) -> u64) -> bool {
        let mut cur = self.slot.ctrl.load(Ordering::Relaxed);
        loop {
            if cur >> 32 != self.ctrl >> 32 || cur & USED == 0 {
                return false;
            }
            let new = f(cur);
            if new == cur {
                return true;
            }
            match self.slot.ctrl.compare_exchange_weak(
                cur,
                new,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let closed = |c| state::is_closed(ctrl_state(c));
                    let change = i8::from(closed(new)) - i8::from(closed(cur));
                    self.closes.set(self.closes.get() + change);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// What [`RouteMap::insert_with`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The key had a route already (another worker's, made meanwhile).
    Existing(BackendId),
    New(BackendId),
    /// `make` gave nothing, or the table had no room.
    Refused,
}

pub struct RouteMap {
    slots: *mut Slot,
    mask: usize,
    hasher: ahash::RandomState,
    /// Odd while a removal shifts entries; readers retry when it moved.
    moves: AtomicU64,
    writer: Mutex<()>,
    /// Tests crowd every key into a few home slots (one long probe run, so
    /// that every removal shifts entries under the readers).
    #[cfg(test)]
    homes: usize,
}

// SAFETY: the slots are only touched through atomics; the allocation is
// owned and freed in Drop.
unsafe impl Send for RouteMap {}
unsafe impl Sync for RouteMap {}

impl std::fmt::Debug for RouteMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMap")
            .field("slots", &(self.mask + 1))
            .finish()
    }
}

impl Drop for RouteMap {
    fn drop(&mut self) {
        // SAFETY: allocated in `with_room` with this layout.
        unsafe { dealloc(self.slots.cast(), Self::layout(self.mask + 1)) }
    }
}

impl RouteMap {
    fn layout(slots: usize) -> Layout {
        Layout::array::<Slot>(slots).expect("a slot count that fits the address space")
    }

    /// The slots for `routes` routes at most 80 % full. The memory is
    /// reserved zeroed, so pages become resident as routes reach them.
    pub fn with_room(routes: usize) -> Self {
        // room() is 4 of every 5 slots: 5 slots for every 4 routes (rounded
        // up) always hold them.
        let slots = (routes.div_ceil(4) * 5).next_power_of_two().max(16);
        // SAFETY: a non-zero layout; all-zero bytes are valid (empty) slots.
        let ptr = unsafe { alloc_zeroed(Self::layout(slots)) }.cast::<Slot>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout(slots));
        }
        RouteMap {
            slots: ptr,
            mask: slots - 1,
            hasher: ahash::RandomState::new(),
            moves: AtomicU64::new(0),
            writer: Mutex::new(()),
            #[cfg(test)]
            homes: usize::MAX,
        }
    }

    /// How many routes fit (80 % of the slots).
    pub fn room(&self) -> usize {
        (self.mask + 1) / 5 * 4
    }

    #[inline]
    fn slot(&self, i: usize) -> &Slot {
        // SAFETY: every index is masked into the allocation.
        unsafe { &*self.slots.add(i & self.mask) }
    }

    #[inline]
    fn home(&self, key: &FlowKey) -> usize {
        let h = self.hasher.hash_one(key) as usize;
        #[cfg(test)]
        let h = h % self.homes;
        h & self.mask
    }

    /// The route of `key`, without a lock.
    #[inline]
    pub fn get(&self, key: &FlowKey) -> Option<RouteRef<'_>> {
        let w = Words::of(key);
        let home = self.home(key);
        let mut waits = 0u32;
        loop {
            let seq = self.moves.load(Ordering::Acquire);
            if seq & 1 == 1 {
                wait_for_writer(&mut waits);
                continue;
            }
            let found = self.probe(home, &w).ok();
            fence(Ordering::Acquire);
            if self.moves.load(Ordering::Relaxed) == seq {
                return found.map(|(i, c)| RouteRef {
                    slot: self.slot(i),
                    ctrl: c,
                    closes: Cell::new(0),
                });
            }
        }
    }

    /// Looks `key` up and applies `f` (an update of the route), looking
    /// again if the route moved meanwhile (`f` says so by returning false);
    /// the back end, if the route exists.
    #[inline]
    pub fn get_and(&self, key: &FlowKey, f: impl Fn(&RouteRef<'_>) -> bool) -> Option<BackendId> {
        for _ in 0..8 {
            let r = self.get(key)?;
            if f(&r) {
                return Some(r.backend());
            }
        }
        // Moved eight times over by removals around it: forward anyway.
        self.get(key).map(|r| r.backend())
    }

    /// Walks from `home` to `w`'s slot (its index and control word), or to
    /// the first empty slot (`Err` with its index; `None` if there is none).
    #[inline]
    fn probe(&self, home: usize, w: &Words) -> Result<(usize, u64), Option<usize>> {
        for i in home..=home + self.mask {
            let s = self.slot(i);
            let c = s.ctrl.load(Ordering::Acquire);
            if c & USED == 0 {
                return Err(Some(i & self.mask));
            }
            if s.words() == *w {
                return Ok((i & self.mask, c));
            }
        }
        Err(None)
    }

    /// Records a route for `key` with the back end `make` chooses, unless
    /// the key has one already; `make` runs under the writer lock only when
    /// the key is absent.
    pub fn insert_with(
        &self,
        key: &FlowKey,
        now: u32,
        state: u8,
        make: impl FnOnce() -> Option<BackendId>,
    ) -> Inserted {
        let w = Words::of(key);
        let home = self.home(key);
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let empty = match self.probe(home, &w) {
            Ok((_, c)) => return Inserted::Existing(ctrl_backend(c)),
            Err(None) => return Inserted::Refused,
            Err(Some(i)) => i,
        };
        let Some(backend) = make() else {
            return Inserted::Refused;
        };
        let s = self.slot(empty);
        let c = s.ctrl.load(Ordering::Relaxed);
        s.set_words(w);
        s.last_seen.store(now, Ordering::Relaxed);
        s.ctrl
            .store(ctrl(c + GEN_ONE, state, backend), Ordering::Release);
        Inserted::New(backend)
    }

    /// Removes `key`'s route if `cond` holds for it; returns what it was.
    pub fn remove_if(&self, key: &FlowKey, cond: impl FnOnce(&Route) -> bool) -> Option<Route> {
        let w = Words::of(key);
        let home = self.home(key);
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (mut hole, c) = self.probe(home, &w).ok()?;
        let s = self.slot(hole);
        let route = Route::from_parts(
            ctrl_backend(c),
            ctrl_state(s.ctrl.load(Ordering::Relaxed)),
            s.last_seen.load(Ordering::Relaxed),
        );
        if !cond(&route) {
            return None;
        }
        let seq = self.moves.load(Ordering::Relaxed);
        self.moves.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        // Backward shift: each following entry whose home is not between
        // the hole and itself moves into the hole.
        let mut next = hole + 1;
        loop {
            let n = self.slot(next);
            let nc = n.ctrl.load(Ordering::Relaxed);
            if nc & USED == 0 {
                break;
            }
            let nw = n.words();
            let home = self.home(&nw.key());
            let dist_home = next.wrapping_sub(home) & self.mask;
            let dist_hole = next.wrapping_sub(hole) & self.mask;
            if dist_home >= dist_hole {
                // Claim the entry (bumping its generation) so a concurrent
                // touch either lands before the copy or fails and retries.
                let claimed = n.ctrl.fetch_add(GEN_ONE, Ordering::Relaxed) + GEN_ONE;
                let h = self.slot(hole);
                h.set_words(nw);
                h.last_seen
                    .store(n.last_seen.load(Ordering::Relaxed), Ordering::Relaxed);
                let hc = h.ctrl.load(Ordering::Relaxed);
                h.ctrl.store(
                    ctrl(hc + GEN_ONE, ctrl_state(claimed), ctrl_backend(claimed)),
                    Ordering::Relaxed,
                );
                hole = next & self.mask;
            }
            next += 1;
        }
        let h = self.slot(hole);
        let hc = h.ctrl.load(Ordering::Relaxed);
        h.ctrl
            .store((hc + GEN_ONE) & !(GEN_ONE - 1), Ordering::Relaxed);
        self.moves.store(seq + 2, Ordering::Release);
        Some(route)
    }

    /// Number of slots (a power of two).
    pub fn slots(&self) -> usize {
        self.mask + 1
    }

    /// Calls `f` with each route's key and what it holds, over `count`
    /// slots from slot `from` (wrapping around the end) or until `f` breaks:
    /// a pass that stops after what it needs costs only that much. Reads
    /// slot by slot without a lock: a route that a concurrent removal shifts
    /// across the scan can be missed or seen twice (the control plane's
    /// passes repeat). Returns the slot after the last one read.
    pub fn scan(
        &self,
        from: usize,
        count: usize,
        mut f: impl FnMut(FlowKey, Route) -> ControlFlow<()>,
    ) -> usize {
        let end = from + count.min(self.slots());
        let mut i = from;
        let mut waits = 0u32;
        while i < end {
            let seq = self.moves.load(Ordering::Acquire);
            if seq & 1 == 1 {
                wait_for_writer(&mut waits);
                continue;
            }
            let s = self.slot(i);
            let c = s.ctrl.load(Ordering::Acquire);
            let read = (c & USED != 0).then(|| {
                (
                    s.words().key(),
                    Route::from_parts(
                        ctrl_backend(c),
                        ctrl_state(c),
                        s.last_seen.load(Ordering::Relaxed),
                    ),
                )
            });
            fence(Ordering::Acquire);
            if self.moves.load(Ordering::Relaxed) != seq {
                continue;
            }
            i += 1;
            if let Some((k, r)) = read {
                if f(k, r).is_break() {
                    break;
                }
            }
        }
        i & self.mask
    }
}

/// A reader's wait while a removal shifts entries (a few hundred
/// nanoseconds): spins, then yields the core in case the writer was
/// preempted and needs it.
#[cold]
fn wait_for_writer(waits: &mut u32) {
    *waits += 1;
    if waits.is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    /// The unit tests' allocator: the system's, counting each thread's
    /// live bytes, so a test can see a map give back exactly what it took.
    struct Counting;

    thread_local! {
        static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    fn count(bytes: isize) {
        let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
    }

    // SAFETY: every call goes to the system allocator unchanged.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-(layout.size() as isize));
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            count(new as isize - layout.size() as isize);
            unsafe { std::alloc::System.realloc(ptr, layout, new) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    #[test]
    fn a_map_gives_back_all_it_took_and_says_its_size() {
        let m = RouteMap::with_room(8);
        assert_eq!(
            format!("{m:?}"),
            format!("RouteMap {{ slots: {} }}", m.slots())
        );
        drop(m); // and the hasher's seed, made once, is in place
        let before = LIVE.with(|l| l.get());
        let m = RouteMap::with_room(1000);
        let taken = LIVE.with(|l| l.get()) - before;
        assert!(
            taken >= (m.slots() * size_of::<Slot>()) as isize,
            "{taken} B"
        );
        drop(m);
        assert_eq!(LIVE.with(|l| l.get()), before, "freed");
    }

    fn key(n: u32) -> FlowKey {
        let mut client = [0u8; 16];
        client[10] = 0xff;
        client[11] = 0xff;
        client[12..].copy_from_slice(&n.to_be_bytes());
        FlowKey {
            service: (n % 3) as u16,
            client_port: (n % 1000) as u16,
            client,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u16),
        Remove(u32),
        Touch(u32, u8),
        Reopen(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..300u32, 0..8u16).prop_map(|(k, b)| Op::Insert(k, b)),
            (0..300u32).prop_map(Op::Remove),
            (0..300u32, 1..=255u8).prop_map(|(k, s)| Op::Touch(k, s)),
            (0..300u32).prop_map(Op::Reopen),
        ]
    }

    proptest! {
        /// Against a HashMap: what is found, with which back end and state,
        /// and what a scan sees, whatever inserts and removals (and the
        /// shifts they cause in a crowded table) came before.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec(op(), 1..400)) {
            let m = RouteMap::with_room(200);
            let mut model: HashMap<u32, (BackendId, u8)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, b) => {
                        if model.len() >= m.room() && !model.contains_key(&k) {
                            continue;
                        }
                        let got = m.insert_with(&key(k), 7, 0, || Some(b));
                        match model.get(&k) {
                            Some(&(old, _)) => prop_assert_eq!(got, Inserted::Existing(old)),
                            None => {
                                prop_assert_eq!(got, Inserted::New(b));
                                model.insert(k, (b, 0));
                            }
                        }
                    }
                    Op::Remove(k) => {
                        let got = m.remove_if(&key(k), |_| true);
                        let want = model.remove(&k);
                        prop_assert_eq!(got.map(|r| (r.backend, r.state())), want);
                    }
                    Op::Touch(k, set) => {
                        let got = m.get_and(&key(k), |r| r.touch(9, set));
                        if let Some((b, st)) = model.get_mut(&k) {
                            *st |= set;
                            prop_assert_eq!(got, Some(*b));
                        } else {
                            prop_assert_eq!(got, None);
                        }
                    }
                    Op::Reopen(k) => {
                        // A new connection on the port: same back end, no state.
                        let got = m.get(&key(k)).map(|r| (r.reopen(11), r.backend(), r.state()));
                        if let Some((b, st)) = model.get_mut(&k) {
                            *st = 0;
                            prop_assert_eq!(got, Some((true, *b, 0)));
                        } else {
                            prop_assert_eq!(got, None);
                        }
                    }
                }
            }
            for k in 0..300u32 {
                let got = m.get(&key(k)).map(|r| (r.backend(), r.state()));
                prop_assert_eq!(got, model.get(&k).copied());
            }
            let mut seen: Vec<FlowKey> = entries(&m).into_iter().map(|(k, _)| k).collect();
            let mut want: Vec<FlowKey> = model.keys().map(|&k| key(k)).collect();
            seen.sort_by_key(|k| (k.service, k.client_port, k.client));
            want.sort_by_key(|k| (k.service, k.client_port, k.client));
            prop_assert_eq!(seen, want);
        }
    }

    fn entries(m: &RouteMap) -> Vec<(FlowKey, Route)> {
        let mut out = Vec::new();
        m.scan(0, m.slots(), |k, r| {
            out.push((k, r));
            ControlFlow::Continue(())
        });
        out
    }

    #[test]
    fn a_scan_returns_the_slot_after_the_last_it_read_wrapping_at_the_end() {
        let m = RouteMap::with_room(8);
        let slots = m.slots();
        let none = |_, _| ControlFlow::Continue(());
        assert_eq!(m.scan(5, 3, none), 8);
        assert_eq!(m.scan(slots - 2, 5, none), 3, "wraps");
        assert_eq!(
            m.scan(0, slots, none),
            0,
            "a whole pass ends where it began"
        );
        for k in 0..3 {
            m.insert_with(&key(k), 0, 0, || Some(0));
        }
        let mut seen = 0;
        let stopped = m.scan(0, slots, |_, _| {
            seen += 1;
            ControlFlow::Break(())
        });
        assert_eq!(seen, 1);
        // The rest of the table, from there, holds the other two.
        let mut rest = 0;
        m.scan(stopped, slots - 1, |_, _| {
            rest += 1;
            ControlFlow::Continue(())
        });
        assert_eq!(rest, 2);
    }

    #[test]
    fn a_map_made_for_n_routes_holds_n_within_its_80_percent() {
        for n in 0..20_000 {
            let m = RouteMap::with_room(n);
            assert!(m.room() >= n, "room {} for {n}", m.room());
            assert!(m.room() * 5 <= m.slots() * 4);
            assert!(
                m.slots() < (n * 5 / 2 + 10).max(17),
                "{} slots for {n}",
                m.slots()
            );
        }
        for n in [1, 7, 12, 100, 819, 1000, 5000] {
            let m = RouteMap::with_room(n);
            assert!(m.room() >= n, "room {} for {n}", m.room());
            assert!(m.room() * 5 <= m.slots() * 4);
            for k in 0..n as u32 {
                assert_eq!(m.insert_with(&key(k), 0, 0, || Some(1)), Inserted::New(1));
            }
            assert_eq!(entries(&m).len(), n);
        }
    }

    #[test]
    fn a_scan_stops_where_its_callback_breaks() {
        let m = RouteMap::with_room(100);
        for k in 0..50 {
            m.insert_with(&key(k), 0, 0, || Some(1));
        }
        let mut seen = 0;
        m.scan(0, m.slots(), |_, _| {
            seen += 1;
            if seen == 10 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(seen, 10);
        assert_eq!(entries(&m).len(), 50);
    }

    #[test]
    fn a_reference_from_before_a_removal_does_not_touch_the_next_route_there() {
        let m = RouteMap::with_room(10);
        assert_eq!(m.insert_with(&key(1), 0, 0, || Some(1)), Inserted::New(1));
        let stale = m.get(&key(1)).unwrap();
        assert!(m.remove_if(&key(1), |_| true).is_some());
        assert_eq!(m.insert_with(&key(1), 0, 0, || Some(2)), Inserted::New(2));
        assert!(!stale.touch(5, state_bit()), "the slot changed hands");
        assert_eq!(m.get(&key(1)).unwrap().state(), 0);
        assert_eq!(m.get(&key(1)).unwrap().backend(), 2);
    }

    fn state_bit() -> u8 {
        super::super::route::state::FIN_FROM_CLIENT
    }

    /// Readers look up and touch routes that stay while writers insert and
    /// remove others around them in a crowded table: every lookup finds its
    /// route with its back end, and no touch is lost to a shift.
    #[test]
    fn lookups_never_miss_while_other_routes_come_and_go() {
        let mut m = RouteMap::with_room(1_000);
        m.homes = 16;
        let m = Arc::new(m);
        let stable: Vec<u32> = (0..200).collect();
        for &k in &stable {
            m.insert_with(&key(k), 0, 0, || Some((k % 7) as u16));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u32)
            .map(|w| {
                let (m, stop) = (m.clone(), stop.clone());
                std::thread::spawn(move || {
                    let churn: Vec<u32> = (0..300).map(|i| 10_000 + w * 10_000 + i).collect();
                    let mut rounds = 0;
                    while !stop.load(Ordering::Relaxed) && rounds < 2_000 {
                        for &k in &churn {
                            m.insert_with(&key(k), 0, 0, || Some(9));
                        }
                        for &k in &churn {
                            assert!(m.remove_if(&key(k), |_| true).is_some());
                        }
                        rounds += 1;
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2u8)
            .map(|r| {
                let (m, stable) = (m.clone(), stable.clone());
                std::thread::spawn(move || {
                    let bit = 1 << r;
                    for round in 0..300 {
                        for &k in &stable {
                            let got = m.get_and(&key(k), |route| route.touch(round, bit));
                            assert_eq!(got, Some((k % 7) as u16), "key {k} missed");
                        }
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        for &k in &stable {
            assert_eq!(
                m.get(&key(k)).unwrap().state(),
                0b11,
                "key {k} lost a touch"
            );
        }
        assert_eq!(entries(&m).len(), stable.len());
    }
}
