//! HTTP mode's metrics: requests by service, node and status class, their
//! latency, the pools, server connections, retries and refused clients.

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{IntCounterVec, IntGaugeVec, Registry};
use std::sync::atomic::Ordering;

use super::{families, sync};
use crate::http_mode::stats::{Refusal, LATENCY_BUCKETS};
use crate::http_mode::HttpFront;
use crate::transfer_table::TransferTable;

const LATENCY_NAME: &str = "fep_http_request_duration_seconds";
const LATENCY_HELP: &str =
    "Time from a request's arrival to its back end's response head, by service and node.";

pub struct HttpMetrics {
    requests: IntCounterVec,
    pool: IntGaugeVec,
    connects: IntCounterVec,
    connect_failures: IntCounterVec,
    retries: IntCounterVec,
    client_connections: IntCounterVec,
    client_open: IntGaugeVec,
    refused: IntCounterVec,
    sessions: IntGaugeVec,
}

impl HttpMetrics {
    pub fn new(registry: &Registry) -> Self {
        let counters = |name: &str, help: &str, labels: &[&str]| {
            families::counters(registry, name, help, labels)
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            families::gauges(registry, name, help, labels)
        };
        let sn = &["service", "node"][..];
        HttpMetrics {
            requests: counters(
                "fep_http_requests_total",
                "HTTP-mode responses by service, node and status class (fep's own 502 and 504 included).",
                &["service", "node", "class"],
            ),
            pool: gauges(
                "fep_http_pool_connections",
                "Pooled server connections by service, node and state (idle, busy).",
                &["service", "node", "state"],
            ),
            connects: counters("fep_http_server_connects_total", "Server connections opened, by service and node.", sn),
            connect_failures: counters(
                "fep_http_server_connect_failures_total",
                "Server connections that could not be opened, by service and node.",
                sn,
            ),
            retries: counters(
                "fep_http_retries_total",
                "Requests sent again on another server connection after a pooled one was found closed.",
                sn,
            ),
            client_connections: counters("fep_http_client_connections_total", "Client connections accepted, by service.", &["service"]),
            client_open: gauges("fep_http_client_connections", "Client connections open, by service.", &["service"]),
            refused: counters(
                "fep_http_refused_total",
                "Client connections and requests refused or answered by fep itself, by service and reason.",
                &["service", "reason"],
            ),
            sessions: gauges("fep_http_sessions", "Sessions kept (from a start path to an end path), by service and node.", sn),
        }
    }

    /// Brings the series up to date and returns the latency histograms
    /// (built here from HTTP mode's own buckets), if any service has some.
    pub fn sync(&self, table: &TransferTable, http: &HttpFront) -> Option<MetricFamily> {
        let mut latency = Vec::new();
        for slot in http.slots() {
            let svc = table.service(slot);
            http.with_service(slot, |front, backends| {
                let s = &front.stats;
                let name = front.name.as_str();
                self.zero_series(name);
                sync(
                    &self.client_connections.with_label_values(&[name]),
                    s.connections.load(Ordering::Relaxed),
                );
                self.client_open
                    .with_label_values(&[name])
                    .set(s.open.load(Ordering::Relaxed) as i64);
                for (why, n) in s.refusals() {
                    sync(&self.refused.with_label_values(&[name, why.name()]), n);
                }
                for (i, snap) in backends.iter().enumerate() {
                    let (Some(snap), Some(be)) = (snap, svc.backends.get(i)) else {
                        continue;
                    };
                    let labels = [name, be.node.as_str()];
                    let b = snap.stats;
                    for (class, n) in b.by_class() {
                        sync(
                            &self.requests.with_label_values(&[name, &be.node, class]),
                            n,
                        );
                    }
                    for (state, n) in [("idle", &b.idle), ("busy", &b.busy)] {
                        self.pool
                            .with_label_values(&[name, &be.node, state])
                            .set(n.load(Ordering::Relaxed) as i64);
                    }
                    let counted: [(&IntCounterVec, u64); 3] = [
                        (&self.connects, b.connects.load(Ordering::Relaxed)),
                        (
                            &self.connect_failures,
                            b.connect_failures.load(Ordering::Relaxed),
                        ),
                        (&self.retries, b.retries.load(Ordering::Relaxed)),
                    ];
                    for (vec, n) in counted {
                        sync(&vec.with_label_values(&labels), n);
                    }
                    self.sessions
                        .with_label_values(&labels)
                        .set(snap.sessions as i64);
                    latency.push(histogram(&labels, b.latency(), b.requests()));
                }
            });
        }
        if latency.is_empty() {
            return None;
        }
        let mut family = MetricFamily::default();
        family.set_name(LATENCY_NAME.to_string());
        family.set_help(LATENCY_HELP.to_string());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(latency);
        Some(family)
    }

    /// The refusal series of `service` at 0, so that alerts work before the
    /// first refusal.
    fn zero_series(&self, service: &str) {
        for r in Refusal::ALL {
            self.refused.with_label_values(&[service, r.name()]);
        }
    }
}

/// One (service, node) histogram from cumulative bucket counts.
fn histogram(labels: &[&str; 2], (cumulative, sum): (Vec<u64>, f64), count: u64) -> Metric {
    let label = |name: &str, value: &str| {
        let mut l = LabelPair::default();
        l.set_name(name.to_string());
        l.set_value(value.to_string());
        l
    };
    let mut h = Histogram::default();
    h.set_bucket(
        LATENCY_BUCKETS
            .iter()
            .zip(&cumulative)
            .map(|(&bound, &n)| {
                let mut b = Bucket::default();
                b.set_upper_bound(bound);
                b.set_cumulative_count(n);
                b
            })
            .collect(),
    );
    h.set_sample_count(cumulative.last().copied().unwrap_or(count));
    h.set_sample_sum(sum);
    // In name order, as the registry's own series have theirs.
    let mut m = Metric::from_label(vec![label("node", labels[1]), label("service", labels[0])]);
    m.set_histogram(h);
    m
}
