//! HTTP mode's counters: per service (client connections, refusals, bad
//! requests) and per back end (requests by status class, latency, pool,
//! server connections, retries). Atomics, written by the proxy's tasks and
//! read by the views and the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the request rate is averaged over.
const RATE_EVERY: Duration = Duration::from_secs(1);

/// Upper bounds of the latency histogram's buckets, in seconds (the last
/// bucket, +Inf, is implicit).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Why a client connection or request was refused or cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `max_connections`: closed at once.
    TooManyConnections,
    /// Over `max_connections_per_client`: closed at once.
    TooManyFromClient,
    /// A request hyper could not parse: 400.
    BadRequest,
    /// A request head over `max_header_bytes`: 431.
    HeaderTooLarge,
    /// A request head not complete within `header_timeout_ms`: 408.
    HeaderTimeout,
    /// No back end could take the request: 503.
    NoBackend,
}

impl Refusal {
    /// Every reason, in the order the counters hold them.
    pub const ALL: [Refusal; 6] = [
        Refusal::TooManyConnections,
        Refusal::TooManyFromClient,
        Refusal::BadRequest,
        Refusal::HeaderTooLarge,
        Refusal::HeaderTimeout,
        Refusal::NoBackend,
    ];

    /// The metrics label and view key.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyFromClient => "too_many_from_client",
            Refusal::BadRequest => "bad_request",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::NoBackend => "no_backend",
        }
    }
}

/// One service's client side.
#[derive(Debug, Default)]
pub struct ServiceStats {
    pub connections: AtomicU64,
    pub open: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    pub sessions_started: AtomicU64,
    pub sessions_ended: AtomicU64,
    /// A session start that found the table full: served without a session.
    pub sessions_refused: AtomicU64,
    /// Requests per second over the last [`RATE_EVERY`] (f64 bits).
    rate: AtomicU64,
    /// When the rate was last sampled, and the request count then.
    sampled: Mutex<Option<(Instant, u64)>>,
}

impl ServiceStats {
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Updates the request rate from the total `requests` at `now`, once
    /// per [`RATE_EVERY`].
    pub fn sample_rate(&self, now: Instant, requests: u64) {
        let mut sampled = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
        match *sampled {
            Some((at, _)) if now.duration_since(at) < RATE_EVERY => {}
            Some((at, count)) => {
                let per_s =
                    requests.saturating_sub(count) as f64 / now.duration_since(at).as_secs_f64();
                self.rate.store(per_s.to_bits(), Ordering::Relaxed);
                *sampled = Some((now, requests));
            }
            None => *sampled = Some((now, requests)),
        }
    }

    pub fn requests_per_s(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    pub fn refusals(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .iter()
            .map(|&r| (r, self.refused[r as usize].load(Ordering::Relaxed)))
    }
}

/// One back end's side of a service.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Responses by status class: index 0 is 1xx … 4 is 5xx (fep's own 502
    /// and 504 included).
    by_class: [AtomicU64; 5],
    /// Latency to the response head, per bucket of [`LATENCY_BUCKETS`] and +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    /// Server connections opened, and attempts that failed.
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Requests sent again on another connection after a pooled one closed.
    pub retries: AtomicU64,
    /// Pooled connections idle and taken by a request, now.
    pub idle: AtomicU64,
    pub busy: AtomicU64,
}

impl BackendStats {
    /// Counts a response with `status` whose head came after `latency`.
    pub fn response(&self, status: u16, latency: Duration) {
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Responses by class, "1xx" … "5xx".
    pub fn by_class(&self) -> [(&'static str, u64); 5] {
        let names = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        std::array::from_fn(|i| (names[i], self.by_class[i].load(Ordering::Relaxed)))
    }

    pub fn requests(&self) -> u64 {
        self.by_class
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Cumulative bucket counts (as Prometheus wants them) and the sum in seconds.
    pub fn latency(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, sum)
    }

    /// Requests per server connection opened (Pingora's reuse figure).
    pub fn reuse(&self) -> f64 {
        let connects = self.connects.load(Ordering::Relaxed);
        if connects == 0 {
            0.0
        } else {
            self.requests() as f64 / connects as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_land_in_their_class_and_bucket() {
        let s = BackendStats::default();
        s.response(200, Duration::from_micros(300));
        s.response(204, Duration::from_millis(3));
        s.response(503, Duration::from_secs(9));
        assert_eq!(s.by_class()[1], ("2xx", 2));
        assert_eq!(s.by_class()[4], ("5xx", 1));
        let (buckets, sum) = s.latency();
        assert_eq!(buckets[0], 1, "0.3 ms is in the 0.5 ms bucket");
        assert_eq!(buckets[3], 2, "3 ms is within 5 ms");
        assert_eq!(*buckets.last().unwrap(), 3, "+Inf holds everything");
        assert!((sum - 9.0033).abs() < 1e-6);
        s.connects.store(2, Ordering::Relaxed);
        assert_eq!(s.reuse(), 1.5);
    }

    #[test]
    fn the_rate_is_requests_over_the_last_interval() {
        let s = ServiceStats::default();
        let t0 = Instant::now();
        s.sample_rate(t0, 100);
        s.sample_rate(t0 + Duration::from_millis(500), 400);
        assert_eq!(
            s.requests_per_s(),
            0.0,
            "not sampled before an interval passed"
        );
        s.sample_rate(t0 + Duration::from_secs(2), 700);
        assert_eq!(s.requests_per_s(), 300.0);
    }
}
