//! The `[sites]` table: the sites that serve the same names, how they check
//! and tell each other, and what this site's DNS server answers.
//!
//! Every site carries the same `[sites]` table except `me`, so the sites
//! compute the same hand-off tables from the same data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{check_range, ConfigError};

/// Ranks of the ordered hand-off weights a name may give.
pub const MAX_OHW_RANKS: usize = 16;
/// Sites one `[sites]` table may list.
pub const MAX_SITES: usize = 64;
/// Names one site may answer for.
pub const MAX_NAMES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitesConfig {
    /// This site's name, one of `[[sites.site]]`.
    pub me: String,
    /// File with the sites' shared key (64 hex characters) that
    /// authenticates the site-state exchange.
    pub key_file: PathBuf,
    /// Where the other sites' state updates arrive.
    pub listen: SocketAddr,
    /// A periodic state update to every other site this often; triggered
    /// updates go at once.
    #[serde(default = "default_update_interval")]
    pub update_interval_ms: u64,
    /// Every site's VIPs are checked this often, from the start.
    #[serde(default = "default_check_interval")]
    pub check_interval_ms: u64,
    #[serde(default = "default_check_timeout")]
    pub check_timeout_ms: u64,
    /// Consecutive failed checks after which a site's VIP is down.
    #[serde(default = "default_check_fails")]
    pub check_fails: u32,
    /// Weight of the newest check in the response-time average (percent).
    #[serde(default = "default_rtt_weight")]
    pub rtt_weight_percent: u32,
    /// A site's own report (remaining connections, room) is trusted this
    /// long after it arrived.
    #[serde(default = "default_report_max_age")]
    pub report_max_age_ms: u64,
    /// Answer HTTP requests to a full local VIP with a redirect to another
    /// site (HTTP-mode services).
    #[serde(default = "default_true")]
    pub redirect: bool,
    /// Redirects a client may have followed before fep stops redirecting
    /// (carried in the redirect's query string), so full sites do not bounce
    /// a client between them.
    #[serde(default = "default_redirect_hops")]
    pub redirect_hops: u32,
    /// The authoritative DNS server; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    #[serde(rename = "site")]
    pub sites: Vec<SiteConfig>,
    /// Address prefix → region, longest prefix first.
    #[serde(default, rename = "region")]
    pub regions: Vec<RegionConfig>,
    #[serde(default, rename = "name")]
    pub names: Vec<NameConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP and TCP on each.
    pub listen: Vec<SocketAddr>,
    /// The zone this site is authoritative for; every name is inside it.
    pub zone: String,
    /// The zone's name servers (NS records; the first is the SOA's MNAME).
    pub ns: Vec<String>,
    /// Addresses of the name servers inside the zone (A/AAAA answers and
    /// glue), e.g. `{ "ns1.example.com" = ["192.0.2.53"] }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ns_addresses: BTreeMap<String, Vec<IpAddr>>,
    /// The SOA's RNAME (the zone's contact, `hostmaster.example.com`).
    #[serde(default = "default_hostmaster")]
    pub hostmaster: String,
    /// Negative answers' TTL (the SOA's MINIMUM).
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl_s: u32,
    /// Open TCP connections at once; more wait in the listen queue.
    #[serde(default = "default_tcp_connections")]
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    /// Where the site listens for state updates; its updates must come
    /// from this address.
    pub exchange: SocketAddr,
    /// The site's region, for queries from that region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub prefix: IpNet,
    pub region: String,
}

/// What a name answers when no site is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllDown {
    /// The last list that had a site up: clients may still reach one.
    #[default]
    LastHealthy,
    /// No address (NOERROR, an empty answer).
    Empty,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameConfig {
    /// A name in the zone (`www.example.com`).
    pub name: String,
    /// The service port its VIPs serve: checked, and the local services on
    /// it are the ones whose room the site reports.
    pub port: u16,
    #[serde(default = "default_ttl")]
    pub ttl_s: u32,
    /// Ordered hand-off weights: rank 1 first.
    #[serde(default = "default_ohw")]
    pub ohw: Vec<u32>,
    #[serde(default)]
    pub when_all_down: WhenAllDown,
    /// An HTTP GET of this path must answer 2xx or 3xx; a TCP connect
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_path: Option<String>,
    /// Where the name is served.
    #[serde(rename = "at")]
    pub sites: Vec<NameSite>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameSite {
    pub site: String,
    pub vips: Vec<IpAddr>,
    /// Check this address instead of the first VIP (a VIP that only
    /// answers from outside, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_address: Option<IpAddr>,
}

impl NameSite {
    /// The address the health checks connect to.
    pub fn check_target(&self) -> Option<IpAddr> {
        self.check_address.or_else(|| self.vips.first().copied())
    }
}

fn default_true() -> bool {
    true
}
fn default_update_interval() -> u64 {
    5_000
}
fn default_check_interval() -> u64 {
    1_000
}
fn default_check_timeout() -> u64 {
    500
}
fn default_check_fails() -> u32 {
    2
}
fn default_rtt_weight() -> u32 {
    30
}
fn default_report_max_age() -> u64 {
    15_000
}
fn default_redirect_hops() -> u32 {
    2
}
fn default_hostmaster() -> String {
    "hostmaster".into()
}
fn default_negative_ttl() -> u32 {
    60
}
fn default_tcp_connections() -> usize {
    64
}
fn default_tcp_idle() -> u64 {
    5_000
}
fn default_ttl() -> u32 {
    60
}
fn default_ohw() -> Vec<u32> {
    vec![6, 4, 2, 1]
}

impl SitesConfig {
    pub fn site(&self, name: &str) -> Option<&SiteConfig> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// Checks names, ranges and that every reference resolves.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let k = |name: &str| format!("sites.{name}");
        check_range(&k("site"), self.sites.len(), 1..=MAX_SITES, " sites")?;
        check_range(&k("name"), self.names.len(), 0..=MAX_NAMES, " names")?;
        let mut seen = BTreeSet::new();
        for site in &self.sites {
            if site.name.is_empty() || !seen.insert(site.name.as_str()) {
                return Err(ConfigError::invalid(
                    k("site.name"),
                    format!("'{}' is empty or listed twice", site.name),
                ));
            }
        }
        let known = || {
            self.sites
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.site(&self.me).is_none() {
            return Err(ConfigError::invalid(
                k("me"),
                format!("no site '{}'; sites: {}", self.me, known()),
            ));
        }
        for (name, v, range) in [
            (
                "update_interval_ms",
                self.update_interval_ms,
                100..=7_200_000,
            ),
            ("check_interval_ms", self.check_interval_ms, 50..=600_000),
            ("check_timeout_ms", self.check_timeout_ms, 10..=60_000),
            (
                "report_max_age_ms",
                self.report_max_age_ms,
                100..=86_400_000,
            ),
        ] {
            check_range(&k(name), v, range, "")?;
        }
        check_range(&k("check_fails"), self.check_fails, 1..=100, "")?;
        check_range(
            &k("rtt_weight_percent"),
            self.rtt_weight_percent,
            1..=100,
            " %",
        )?;
        check_range(&k("redirect_hops"), self.redirect_hops, 0..=16, "")?;
        if let Some(dns) = &self.dns {
            dns.validate()?;
        }
        let zone = self.dns.as_ref().map(|d| normalise(&d.zone));
        let mut names = BTreeSet::new();
        for (i, name) in self.names.iter().enumerate() {
            let key = format!("sites.name[{i}]");
            let n = normalise(&name.name);
            if !names.insert(n.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("'{}' is listed twice", name.name),
                ));
            }
            if let Some(zone) = &zone {
                if !in_zone(&n, zone) {
                    return Err(ConfigError::invalid(
                        format!("{key}.name"),
                        format!("'{}' is not in the zone '{zone}'", name.name),
                    ));
                }
            }
            name.validate(&key, &self.sites, known)?;
        }
        Ok(())
    }
}

impl DnsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let k = |name: &str| format!("sites.dns.{name}");
        check_range(&k("listen"), self.listen.len(), 1..=16, " addresses")?;
        check_range(&k("ns"), self.ns.len(), 1..=16, " names")?;
        check_range(
            &k("max_tcp_connections"),
            self.max_tcp_connections,
            1..=10_000,
            "",
        )?;
        check_range(
            &k("tcp_idle_timeout_ms"),
            self.tcp_idle_timeout_ms,
            100..=600_000,
            "",
        )?;
        check_range(&k("negative_ttl_s"), self.negative_ttl_s, 0..=86_400, " s")?;
        if self.zone.trim_matches('.').is_empty() {
            return Err(ConfigError::invalid(k("zone"), "must name a zone"));
        }
        let zone = normalise(&self.zone);
        for (name, addrs) in &self.ns_addresses {
            let n = normalise(name);
            if !self.ns.iter().any(|ns| normalise(ns) == n) || !in_zone(&n, &zone) {
                return Err(ConfigError::invalid(
                    k("ns_addresses"),
                    format!("'{name}' is not one of `ns` inside the zone '{zone}'"),
                ));
            }
            check_range(&k("ns_addresses"), addrs.len(), 1..=16, " addresses")?;
        }
        Ok(())
    }
}

impl NameConfig {
    fn validate(
        &self,
        key: &str,
        sites: &[SiteConfig],
        known: impl Fn() -> String,
    ) -> Result<(), ConfigError> {
        let k = |name: &str| format!("{key}.{name}");
        check_range(&k("ohw"), self.ohw.len(), 1..=MAX_OHW_RANKS, " ranks")?;
        if let Some(w) = self.ohw.iter().find(|w| **w > 64) {
            return Err(ConfigError::invalid(
                k("ohw"),
                format!("weight {w} is above 64"),
            ));
        }
        // Document 002's TTL: 0–255 minutes.
        check_range(&k("ttl_s"), self.ttl_s, 0..=255 * 60, " s")?;
        if self.port == 0 {
            return Err(ConfigError::invalid(k("port"), "must not be 0"));
        }
        if self
            .check_path
            .as_ref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            return Err(ConfigError::invalid(
                k("check_path"),
                "must be a path starting with '/'",
            ));
        }
        check_range(&k("at"), self.sites.len(), 1..=MAX_SITES, " sites")?;
        let mut seen = BTreeSet::new();
        for at in &self.sites {
            if !sites.iter().any(|s| s.name == at.site) {
                return Err(ConfigError::invalid(
                    k("at.site"),
                    format!("no site '{}'; sites: {}", at.site, known()),
                ));
            }
            if !seen.insert(at.site.as_str()) {
                return Err(ConfigError::invalid(
                    k("at.site"),
                    format!("'{}' is listed twice", at.site),
                ));
            }
            check_range(&k("at.vips"), at.vips.len(), 1..=16, " addresses")?;
        }
        Ok(())
    }
}

/// A DNS name in lower case without its final dot, the form names are
/// compared in.
pub fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `name` is `zone` or below it (both [`normalise`]d).
pub fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || name
            .strip_suffix(zone)
            .is_some_and(|head| head.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_in_their_zone_only_at_a_label_boundary() {
        assert!(in_zone("www.example.test", "example.test"));
        assert!(in_zone("example.test", "example.test"));
        assert!(!in_zone("wwwexample.test", "example.test"));
        assert!(!in_zone("example.org", "example.test"));
        assert_eq!(normalise("WWW.Example.Test."), "www.example.test");
    }
}
