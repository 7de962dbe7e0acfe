//! What the front end (`fep`), the back-end agent (`bep-agent`) and
//! `fepctl` agree on: the configuration formats, the agent protocol and the
//! admin API's types; and the CPU reading the agent's load report and the
//! benchmark share.

pub mod agent_config;
pub mod api;
#[cfg(feature = "docs")]
pub mod cli_docs;
pub mod cluster_config;
pub mod config;
pub mod cpu;
pub mod http_config;
pub mod peer;
pub mod protocol;
pub mod sites;
pub mod sites_config;

/// Logs to stderr through `tracing`, at `info` unless `RUST_LOG` says
/// otherwise, with colours only on a terminal.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

pub use agent_config::{AgentConfig, AgentService};
pub use cluster_config::{ClusterConfig, PeerConfig, VipGroupConfig};
pub use config::{
    Affinity, BackendConfig, ConfigError, FastPath, FepConfig, LoadMetric, NodeConfig, Protocol,
    Scheduler, ServiceConfig,
};
pub use http_config::{ContentRule, Forwarded, HttpConfig, ServiceMode};
pub use sites_config::{NameConfig, NameSite, SiteConfig, SitesConfig, WhenAllDown};
