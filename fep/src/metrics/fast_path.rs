//! The kernel fast path's metrics: its state, the routes installed in the
//! kernel and what the kernel forwarded for them.

use fep_shared::api::{FastPathState, FastPathView};
use prometheus::{IntCounterVec, IntGaugeVec, Registry};

use super::{families, sync};

/// Every state, for a series each (1 for the current one).
const STATES: [FastPathState; 3] = [
    FastPathState::Off,
    FastPathState::Running,
    FastPathState::Unavailable,
];

pub struct FastPathMetrics {
    state: IntGaugeVec,
    routes: IntGaugeVec,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    passed: IntCounterVec,
}

impl FastPathMetrics {
    pub fn new(r: &Registry) -> Self {
        FastPathMetrics {
            state: families::gauges(r, "fep_fast_path_state", "1 for the kernel fast path's state (off, running, unavailable: fep's log says why).", &["state"]),
            routes: families::gauges(r, "fep_fast_path_routes", "Established routes installed in the kernel fast path.", &[]),
            packets: families::counters(r, "fep_fast_path_packets_total", "Packets the kernel fast path forwarded (they never reach the TUN device).", &[]),
            bytes: families::counters(r, "fep_fast_path_bytes_total", "Bytes of the packets the kernel fast path forwarded.", &[]),
            passed: families::counters(r, "fep_fast_path_passed_total", "Packets of installed routes the kernel handed to the TUN path (SYN, FIN, RST, TTL, no neighbour entry, too big).", &[]),
        }
    }

    pub fn sync(&self, v: &FastPathView) {
        for s in STATES {
            self.state
                .with_label_values(&[&s.to_string()])
                .set(i64::from(s == v.state));
        }
        self.routes
            .with_label_values::<&str>(&[])
            .set(i64::try_from(v.routes).unwrap_or(i64::MAX));
        sync(&self.packets.with_label_values::<&str>(&[]), v.packets);
        sync(&self.bytes.with_label_values::<&str>(&[]), v.bytes);
        sync(&self.passed.with_label_values::<&str>(&[]), v.passed);
    }
}
