//! Several sites' metrics: the DNS server's answers, each site's state and
//! share as this site's answers see it, the exchange and the redirects.

use std::sync::atomic::Ordering;

use prometheus::{IntCounterVec, IntGaugeVec, Registry};

use super::{families, sync};
use crate::sites::Sites;

pub struct SiteMetrics {
    queries: IntCounterVec,
    dropped: IntCounterVec,
    up: IntGaugeVec,
    room: IntGaugeVec,
    share: IntGaugeVec,
    updates: IntCounterVec,
    rejects: IntCounterVec,
    redirects: IntCounterVec,
}

impl SiteMetrics {
    pub fn new(r: &Registry) -> Self {
        let ns = &["name", "site"][..];
        SiteMetrics {
            queries: families::counters(r, "fep_dns_queries_total", "DNS queries answered, by result (noerror, nodata, nxdomain, refused, formerr, notimp, badvers, truncated).", &["result"]),
            dropped: families::counters(r, "fep_dns_dropped_total", "DNS datagrams and messages not answered (no header, a response, oversized on TCP).", &[]),
            up: families::gauges(r, "fep_site_up", "1 while this site's checks reach the site's VIPs for the name.", ns),
            room: families::gauges(r, "fep_site_room", "1 while the site takes new clients for the name (not full, a healthy back end).", ns),
            share: families::gauges(r, "fep_site_share_percent", "The site's share of the name's first answers (its hand-off weight over the sum).", ns),
            updates: families::counters(r, "fep_site_updates_total", "Site-state updates, by direction (sent, triggered, received).", &["direction"]),
            rejects: families::counters(r, "fep_site_rejected_total", "Site-state connections and frames refused, by reason.", &["reason"]),
            redirects: families::counters(r, "fep_http_redirects_total", "New HTTP clients of a full service sent to another site (redirected), or refused at the hop limit (hop_limit).", &["result"]),
        }
    }

    pub fn sync(&self, sites: &Sites) {
        let s = &sites.stats;
        for (class, n) in s.answers() {
            sync(&self.queries.with_label_values(&[class.label()]), n);
        }
        sync(
            &self.dropped.with_label_values(&[] as &[&str]),
            s.dropped.load(Ordering::Relaxed),
        );
        for (dir, n) in [
            ("sent", &s.updates_sent),
            ("triggered", &s.triggered_sent),
            ("received", &s.updates_received),
        ] {
            sync(
                &self.updates.with_label_values(&[dir]),
                n.load(Ordering::Relaxed),
            );
        }
        for (why, n) in s.rejected() {
            sync(&self.rejects.with_label_values(&[why]), n);
        }
        sync(
            &self.redirects.with_label_values(&["redirected"]),
            s.redirects.load(Ordering::Relaxed),
        );
        sync(
            &self.redirects.with_label_values(&["hop_limit"]),
            s.redirects_refused.load(Ordering::Relaxed),
        );
        for name in sites.view().names {
            for site in &name.sites {
                let l = [name.name.as_str(), site.site.as_str()];
                self.up.with_label_values(&l).set(i64::from(site.up));
                self.room.with_label_values(&l).set(i64::from(site.room));
                self.share
                    .with_label_values(&l)
                    .set(i64::from(site.share_percent));
            }
        }
    }
}
