//! The kernel fast path (`fast_path = "tc-bpf"`), after Open vSwitch: the
//! TUN path alone chooses back ends, makes routes and handles anything
//! unusual; once a route is established, this module installs it (both
//! directions) into the map of a tc-BPF program on the gateway's
//! interfaces, which rewrites and forwards the route's packets in the kernel.
//!
//! The route table stays the one truth. A thread of its own keeps the
//! kernel's map a subset of it every [`TICK`]: it installs eligible routes
//! a tick after finding them (newly confirmed ones through the dispatcher's
//! queue, restored, imported and overflowed ones through a windowed scan of
//! the table), removes entries whose route
//! is gone, moved to another back end or closing (expiry, prune, drain,
//! `--force`, a FIN or RST seen on the TUN path), and moves each route's
//! last-seen time forward to the kernel's last packet, so that idle times,
//! expiry and pruning read as if every packet had passed through fep. The
//! program is attached with TCX links that end with the process: a fep that
//! dies leaves no kernel forwarding behind.

mod entries;

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType};
use fep_shared::api::{FastPathState, FastPathView};

use crate::clock::Clock;
use crate::dispatcher::Dispatcher;
use crate::routes::FlowKey;
use crate::transfer_table::{BackendId, TransferTable};
use entries::{eligible, entries, KernelAction, KernelKey};

/// The compiled program, when the build had clang and libbpf's headers.
#[cfg(fep_fast_path)]
const OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/fast_path.bpf.o"
)));
#[cfg(not(fep_fast_path))]
const OBJECT: Option<&[u8]> = None;

/// How often the kernel's map is brought in step with the route table.
const TICK: Duration = Duration::from_millis(10);
/// Route-table slots looked at per tick for routes to install that the
/// dispatcher's queue of newly confirmed ones did not bring (restored,
/// imported, or more than the queue held).
const SCAN_SLOTS: usize = 1 << 14;
/// Installed routes checked per tick (a route-table lookup and two kernel
/// map lookups each): with more installed, each is checked every few ticks.
const CHECKS_PER_TICK: usize = 2048;
/// The program's per-CPU counters (`stats` in the C program).
const STAT_FORWARDED: u32 = 0;
const STAT_BYTES: u32 = 1;
const STAT_PASSED: u32 = 2;
/// `BPF_NOEXIST`: insert only where the key has no entry.
const NO_EXIST: u64 = 1;

/// Why the fast path is not running.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error(
        "fep was built without the kernel fast path (clang or libbpf-dev was missing at build \
         time): install them (apt-get install clang libbpf-dev) and rebuild"
    )]
    NotBuilt,
    #[error("cannot load the fast path's BPF program ({0}): it needs root and a kernel with BPF")]
    Load(String),
    #[error("cannot attach the fast path to interface {interface} ({why})")]
    Attach { interface: String, why: String },
    #[error("no Ethernet interface to attach the fast path to")]
    NoInterface,
}

/// What the views and metrics show of the fast path.
#[derive(Debug, Default)]
pub struct FastPathStats {
    state: std::sync::Mutex<(FastPathState, Option<String>, Vec<String>)>,
    routes: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
    passed: AtomicU64,
}

impl FastPathStats {
    /// The view of a fast path in `state` (why, where it is attached).
    pub(crate) fn set_state(&self, s: FastPathState, why: Option<String>, interfaces: Vec<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (s, why, interfaces);
    }

    pub fn view(&self) -> FastPathView {
        let (state, reason, interfaces) =
            self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        FastPathView {
            state,
            reason,
            interfaces,
            routes: self.routes.load(Ordering::Relaxed),
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            passed: self.passed.load(Ordering::Relaxed),
        }
    }
}

/// Whether this build has the kernel program (see `fep/build.rs`).
pub fn built_in() -> bool {
    OBJECT.is_some()
}

/// The running fast path: its program, maps and sync thread.
pub(crate) struct FastPath {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl FastPath {
    /// Loads the program, attaches it to every Ethernet interface but the
    /// TUN device, and starts the sync thread.
    pub(crate) fn start(
        dispatcher: Arc<Dispatcher>,
        clock: Clock,
        max_routes: usize,
        stats: Arc<FastPathStats>,
    ) -> Result<Self, FastPathError> {
        let object = OBJECT.ok_or(FastPathError::NotBuilt)?;
        let interfaces = ethernet_interfaces();
        if interfaces.is_empty() {
            return Err(FastPathError::NoInterface);
        }
        let entries = u32::try_from(max_routes.saturating_mul(2).max(1024)).unwrap_or(u32::MAX);
        let mut ebpf = aya::EbpfLoader::new()
            .set_max_entries("routes", entries)
            .load(object)
            .map_err(|e| FastPathError::Load(e.to_string()))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut("fep_fast_path")
            .ok_or_else(|| FastPathError::Load("no program fep_fast_path".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| FastPathError::Load(e.to_string()))?;
        program
            .load()
            .map_err(|e| FastPathError::Load(format!("{e:?}")))?;
        for interface in &interfaces {
            program
                .attach(interface, TcAttachType::Ingress)
                .map_err(|e| FastPathError::Attach {
                    interface: interface.clone(),
                    why: e.to_string(),
                })?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| FastPathError::Load(format!("no map {name}")))
        };
        let routes = BpfHashMap::try_from(take("routes")?)
            .map_err(|e| FastPathError::Load(e.to_string()))?;
        let counters = PerCpuArray::try_from(take("stats")?)
            .map_err(|e| FastPathError::Load(e.to_string()))?;
        tracing::info!(
            "kernel fast path attached to {} (room for {} route entries)",
            interfaces.join(", "),
            entries
        );
        stats.set_state(FastPathState::Running, None, interfaces);
        let stop = Arc::new(AtomicBool::new(false));
        let mut sync = KernelSync {
            dispatcher,
            clock,
            kernel: routes,
            counters,
            installed: Vec::new(),
            members: HashSet::default(),
            check_at: 0,
            cursor: 0,
            waiting: Vec::new(),
            stats,
            // Kept for the links: dropping it detaches the program.
            _ebpf: ebpf,
        };
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("fep-fast-path".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sync.tick();
                        std::thread::sleep(TICK);
                    }
                    // The routes' last-seen times as of now, for the snapshot.
                    sync.tick();
                })
                .map_err(|e| FastPathError::Load(format!("cannot start its thread: {e}")))?
        };
        Ok(FastPath { stop, thread })
    }

    /// Detaches the program (packets take the TUN path again) after a last
    /// sync of the routes' last-seen times.
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the fast path's thread panicked");
        }
    }
}

/// A route in the kernel's map: its key and back end when installed, its
/// two kernel keys and the kernel's last packet time at the last read.
struct Installed {
    key: FlowKey,
    backend: BackendId,
    keys: [KernelKey; 2],
    last_ns: u64,
}

/// The sync thread's state: the kernel's map and what it holds.
struct KernelSync {
    dispatcher: Arc<Dispatcher>,
    clock: Clock,
    kernel: BpfHashMap<MapData, KernelKey, KernelAction>,
    counters: PerCpuArray<MapData, u64>,
    /// Checked in turn, [`CHECKS_PER_TICK`] a tick from `check_at`.
    installed: Vec<Installed>,
    members: HashSet<FlowKey, ahash::RandomState>,
    check_at: usize,
    /// Where the next scan window of the route table starts.
    cursor: usize,
    /// Routes found in the last tick, installed in this one if still eligible.
    waiting: Vec<FlowKey>,
    stats: Arc<FastPathStats>,
    _ebpf: aya::Ebpf,
}

impl Drop for KernelSync {
    /// A sync thread that panicked has dropped the program with it (every
    /// packet takes the TUN path again): the views say so.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.stats.set_state(
                FastPathState::Unavailable,
                Some(
                    "its sync thread stopped (see fep's log); the TUN path carries every packet"
                        .into(),
                ),
                Vec::new(),
            );
        }
    }
}

impl KernelSync {
    fn tick(&mut self) {
        let dispatcher = self.dispatcher.clone();
        let table = dispatcher.table();
        let routes = dispatcher.routes();
        let mut found = Vec::new();
        dispatcher.take_established(|key| found.push(key));
        self.cursor = routes.scan_window(self.cursor, SCAN_SLOTS, |key, _| {
            found.push(key);
            ControlFlow::Continue(())
        });
        // Installed a tick after they were found: a connection that closes
        // within one (a request and its answer) is not worth the kernel
        // map's two inserts and two removals.
        for key in std::mem::replace(&mut self.waiting, found) {
            if !self.members.contains(&key) {
                self.install(&table, key);
            }
        }
        self.check(&table);
        self.stats
            .routes
            .store(self.installed.len() as u64, Ordering::Relaxed);
        let sum = |i: u32| {
            self.counters
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        self.stats
            .packets
            .store(sum(STAT_FORWARDED), Ordering::Relaxed);
        self.stats.bytes.store(sum(STAT_BYTES), Ordering::Relaxed);
        self.stats.passed.store(sum(STAT_PASSED), Ordering::Relaxed);
    }

    /// Installs `key`'s route if it is eligible now.
    fn install(&mut self, table: &TransferTable, key: FlowKey) {
        let Some((backend, route_state)) = self.dispatcher.routes().refresh(&key, None) else {
            return;
        };
        let svc = table.service(key.service);
        let Some(be) = svc.backends.get(usize::from(backend)) else {
            return;
        };
        if !eligible(svc, be, route_state) {
            return;
        }
        let pair = entries(&key, svc, be);
        // An entry another route holds (two services on one back-end
        // endpoint, one client port) leaves this route on the TUN path.
        let fresh = pair
            .iter()
            .all(|(k, a)| self.kernel.insert(k, a, NO_EXIST).is_ok());
        if !fresh {
            for (k, _) in &pair {
                let _ = self.kernel.remove(k);
            }
            return;
        }
        self.members.insert(key);
        self.installed.push(Installed {
            key,
            backend,
            keys: [pair[0].0, pair[1].0],
            last_ns: 0,
        });
    }

    /// Checks up to [`CHECKS_PER_TICK`] installed routes: those no longer
    /// the same eligible route leave the kernel; the others' last-seen times
    /// move to the kernel's last packet.
    fn check(&mut self, table: &TransferTable) {
        let now_ms = self.clock.now_ms();
        let now_ns = monotonic_ns();
        let routes = self.dispatcher.routes();
        let mut i = self.check_at;
        for _ in 0..CHECKS_PER_TICK.min(self.installed.len()) {
            if i >= self.installed.len() {
                i = 0;
            }
            let inst = &mut self.installed[i];
            let last_ns = inst
                .keys
                .iter()
                .filter_map(|k| self.kernel.get(k, 0).ok())
                .map(|a| a.last_ns)
                .max()
                .unwrap_or(0);
            let mut seen = None;
            if last_ns > inst.last_ns {
                inst.last_ns = last_ns;
                let ago = (now_ns.saturating_sub(last_ns) / 1_000_000) as u32;
                seen = Some(now_ms.wrapping_sub(ago));
            }
            let svc = table.service(inst.key.service);
            let keep = routes.refresh(&inst.key, seen).is_some_and(|(backend, s)| {
                backend == inst.backend
                    && svc
                        .backends
                        .get(usize::from(backend))
                        .is_some_and(|b| eligible(svc, b, s))
            });
            if keep {
                i += 1;
                continue;
            }
            let gone = self.installed.swap_remove(i);
            for k in &gone.keys {
                let _ = self.kernel.remove(k);
            }
            self.members.remove(&gone.key);
        }
        self.check_at = i;
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The host's Ethernet interfaces (veths included; not loopback, not TUN).
fn ethernet_interfaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("type")).is_ok_and(|t| t.trim() == "1"))
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    out.sort();
    out
}
