//! What the front end (`fep`) and the back-end agent (`bep-agent`) agree on:
//! the configuration formats and the agent protocol.

pub mod agent_config;
pub mod config;
pub mod protocol;

pub use agent_config::{AgentConfig, AgentService};
pub use config::{
    Affinity, BackendConfig, ConfigError, FepConfig, LoadMetric, NodeConfig, Protocol, Scheduler,
    ServiceConfig,
};
