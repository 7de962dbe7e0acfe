//! What the front end (`fep`) and the back-end agent (`bep-agent`) agree on:
//! the configuration format and the names of the tables it fills.

pub mod config;

pub use config::{
    Affinity, BackendConfig, ConfigError, FepConfig, NodeConfig, Protocol, Scheduler, ServiceConfig,
};
