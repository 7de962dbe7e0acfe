//! The `[service.http]` table of a service in HTTP mode: its pools of
//! server connections, sessions, content rules and client limits.
//!
//! Every key has a default, so `mode = "http"` alone is a working service.

use serde::{Deserialize, Serialize};

use crate::config::{check_range, ConfigError};

/// How a service carries its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// Packets rewritten on the TUN path; a client connection stays on one
    /// back end for its life.
    #[default]
    Tcp,
    /// fep ends the client's connection and dispatches request by request
    /// over pooled server connections.
    Http,
}

impl ServiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::Tcp => "tcp",
            ServiceMode::Http => "http",
        }
    }
}

/// Which header tells a back end the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarded {
    /// `X-Forwarded-For: CLIENT` (appended to one the client sent).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=CLIENT;by=VIP;proto=http`.
    Forwarded,
    /// Both headers.
    Both,
    /// Neither.
    None,
}

impl Forwarded {
    pub fn x_forwarded_for(self) -> bool {
        matches!(self, Forwarded::XForwardedFor | Forwarded::Both)
    }

    pub fn forwarded(self) -> bool {
        matches!(self, Forwarded::Forwarded | Forwarded::Both)
    }
}

/// A content rule: requests matching `host` (exact, case-insensitive, port
/// ignored) and `path_prefix` go only to `nodes`. The first matching rule
/// wins; a request no rule matches may go to any back end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Idle server connections each back end's pool opens ahead of demand.
    #[serde(default = "default_min_idle")]
    pub pool_min_idle: u32,
    /// Idle connections a pool keeps; a released one beyond is closed.
    #[serde(default = "default_max_idle")]
    pub pool_max_idle: u32,
    /// An idle pooled connection is closed after this long: set it below
    /// the back ends' own keep-alive timeout.
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout_ms: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// A back end that sends no response head in this time: 504.
    #[serde(default = "default_response_timeout")]
    pub response_timeout_ms: u64,
    /// A client's request head must be complete within this time (408 if
    /// it had started one); an idle keep-alive connection is closed after it.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// Largest request head (request line and headers); above it: 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Client connections at once over the service; one more is closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Client connections at once from one client address.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Attempts after the first when a pooled connection turns out closed
    /// (only for a request not yet sent, or idempotent without a body).
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub forwarded: Forwarded,
    /// A request to this path starts a session: the client's requests stay
    /// on the back end that served it (a cookie fep sets) …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_start: Option<String>,
    /// … until a request to this path, or `session_idle_timeout_s` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_end: Option<String>,
    #[serde(default = "default_session_idle")]
    pub session_idle_timeout_s: u64,
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<ContentRule>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        crate::config::from_toml("").expect("every key has a default")
    }
}

fn default_prefix() -> String {
    "/".into()
}
fn default_min_idle() -> u32 {
    4
}
fn default_max_idle() -> u32 {
    64
}
fn default_pool_idle_timeout() -> u64 {
    4000
}
fn default_connect_timeout() -> u64 {
    1000
}
fn default_response_timeout() -> u64 {
    30_000
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_max_header_bytes() -> usize {
    16 << 10
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_client() -> usize {
    256
}
fn default_retries() -> u32 {
    2
}
fn default_session_idle() -> u64 {
    600
}
fn default_max_sessions() -> usize {
    100_000
}

/// Largest accepted request head; hyper's read buffer holds it whole.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

impl HttpConfig {
    /// Checks ranges and that the rules name back ends of the service.
    pub(crate) fn validate(&self, key: &str, nodes: &[&str]) -> Result<(), ConfigError> {
        let k = |name: &str| format!("{key}.http.{name}");
        check_range(&k("pool_min_idle"), self.pool_min_idle, 0..=1024, "")?;
        check_range(&k("pool_max_idle"), self.pool_max_idle, 0..=4096, "")?;
        if self.pool_max_idle < self.pool_min_idle {
            return Err(ConfigError::invalid(
                k("pool_max_idle"),
                format!(
                    "{} is below pool_min_idle {}",
                    self.pool_max_idle, self.pool_min_idle
                ),
            ));
        }
        for (name, v, range) in [
            (
                "pool_idle_timeout_ms",
                self.pool_idle_timeout_ms,
                100..=3_600_000,
            ),
            ("connect_timeout_ms", self.connect_timeout_ms, 10..=60_000),
            (
                "response_timeout_ms",
                self.response_timeout_ms,
                10..=3_600_000,
            ),
            ("header_timeout_ms", self.header_timeout_ms, 10..=600_000),
            (
                "session_idle_timeout_s",
                self.session_idle_timeout_s,
                1..=86_400,
            ),
        ] {
            check_range(&k(name), v, range, "")?;
        }
        check_range(
            &k("max_header_bytes"),
            self.max_header_bytes,
            1024..=MAX_HEADER_BYTES,
            " bytes",
        )?;
        check_range(
            &k("max_connections"),
            self.max_connections,
            1..=1_000_000,
            "",
        )?;
        check_range(
            &k("max_connections_per_client"),
            self.max_connections_per_client,
            1..=1_000_000,
            "",
        )?;
        check_range(&k("retries"), self.retries, 0..=10, "")?;
        check_range(&k("max_sessions"), self.max_sessions, 1..=10_000_000, "")?;
        for (name, path) in [
            ("session_start", &self.session_start),
            ("session_end", &self.session_end),
        ] {
            if path.as_ref().is_some_and(|p| !p.starts_with('/')) {
                return Err(ConfigError::invalid(
                    k(name),
                    "must be a path starting with '/'",
                ));
            }
        }
        if self.session_end.is_some() && self.session_start.is_none() {
            return Err(ConfigError::invalid(
                k("session_end"),
                "needs session_start (sessions begin there)",
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let rk = format!("{key}.http.rule[{i}]");
            if !rule.path_prefix.starts_with('/') {
                return Err(ConfigError::invalid(
                    format!("{rk}.path_prefix"),
                    "must start with '/'",
                ));
            }
            if rule.nodes.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{rk}.nodes"),
                    "names no node: a rule sends its requests to at least one back end",
                ));
            }
            if let Some(n) = rule.nodes.iter().find(|n| !nodes.contains(&n.as_str())) {
                return Err(ConfigError::invalid(
                    format!("{rk}.nodes"),
                    format!("'{n}' is not a back end or spare of this service"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_pools_are_bounded() {
        let c = HttpConfig::default();
        assert_eq!((c.pool_min_idle, c.pool_max_idle), (4, 64));
        assert_eq!(c.forwarded, Forwarded::XForwardedFor);
        c.validate("service[0]", &[]).unwrap();
        let bad = HttpConfig {
            pool_min_idle: 8,
            pool_max_idle: 4,
            ..HttpConfig::default()
        };
        let e = bad.validate("service[0]", &[]).unwrap_err().to_string();
        assert!(e.contains("service[0].http.pool_max_idle"), "{e}");
    }

    #[test]
    fn rules_name_the_services_back_ends() {
        let c = HttpConfig {
            rules: vec![ContentRule {
                host: None,
                path_prefix: "/api".into(),
                nodes: vec!["be9".into()],
            }],
            ..HttpConfig::default()
        };
        let e = c.validate("service[0]", &["be1"]).unwrap_err().to_string();
        assert!(e.contains("rule[0].nodes") && e.contains("be9"), "{e}");
        c.validate("service[0]", &["be9"]).unwrap();
    }
}
