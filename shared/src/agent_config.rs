//! The `bep-agent` configuration file (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{check_range, from_toml, load_with, ConfigError};

/// Server-process control for one service port: the agent starts and stops
/// the server when the front end asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentService {
    pub port: u16,
    /// Shell command that starts the service's server process.
    #[serde(default)]
    pub start: Option<String>,
    /// Shell command that stops it.
    #[serde(default)]
    pub stop: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name in the FEP's config.
    pub node: String,
    /// The FEP's agent address (its `agent_listen`).
    pub fep: SocketAddr,
    /// File with the node's derived key or the master key (64 hex characters).
    pub key_file: PathBuf,
    #[serde(default = "default_report_interval")]
    pub report_interval_ms: u64,
    /// Service ports whose load and connections are reported.
    #[serde(default)]
    pub watch_ports: Vec<u16>,
    #[serde(default, rename = "service")]
    pub services: Vec<AgentService>,
    /// A start or stop command still running after this long is killed and
    /// reported failed (so scale-out can try another spare).
    #[serde(default = "default_command_timeout")]
    pub command_timeout_s: u64,
}

fn default_report_interval() -> u64 {
    1000
}

fn default_command_timeout() -> u64 {
    60
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_with(path, Self::parse)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = from_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node.is_empty() {
            return Err(ConfigError::invalid("node", "must not be empty"));
        }
        check_range(
            "report_interval_ms",
            self.report_interval_ms,
            50..=60_000,
            "",
        )?;
        check_range("command_timeout_s", self.command_timeout_s, 1..=86_400, "")?;
        if let Some(i) = self.watch_ports.iter().position(|&p| p == 0) {
            return Err(ConfigError::invalid(
                format!("watch_ports[{i}]"),
                "must be 1 to 65535",
            ));
        }
        for (i, s) in self.services.iter().enumerate() {
            if !self.watch_ports.contains(&s.port) {
                return Err(ConfigError::invalid(
                    format!("service[{i}].port"),
                    format!("{} is not in watch_ports {:?}", s.port, self.watch_ports),
                ));
            }
        }
        Ok(())
    }

    /// The control commands for a port.
    pub fn service(&self, port: u16) -> Option<&AgentService> {
        self.services.iter().find(|s| s.port == port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let cfg = AgentConfig::parse(
            "node = \"be1\"\nfep = \"10.0.2.1:9441\"\nkey_file = \"/etc/fep/agent.key\"\nwatch_ports = [80]\n\
             [[service]]\nport = 80\nstart = \"nginx\"\n",
        )
        .unwrap();
        assert_eq!(cfg.report_interval_ms, 1000);
        assert_eq!(cfg.command_timeout_s, 60);
        assert_eq!(
            AgentConfig::parse(
                "node = \"be1\"\nfep = \"10.0.2.1:9441\"\nkey_file = \"k\"\ncommand_timeout_s = 0\n"
            )
            .unwrap_err()
            .to_string(),
            "config key `command_timeout_s`: 0 is out of range (1 to 86400)"
        );
        assert_eq!(cfg.service(80).unwrap().start.as_deref(), Some("nginx"));
        let bad = AgentConfig::parse(
            "node = \"be1\"\nfep = \"10.0.2.1:9441\"\nkey_file = \"k\"\n[[service]]\nport = 81\n",
        );
        assert_eq!(
            bad.unwrap_err().to_string(),
            "config key `service[0].port`: 81 is not in watch_ports []"
        );
        assert!(
            AgentConfig::parse("node = \"be1\"\nfep = \"nowhere\"\nkey_file = \"k\"\n")
                .unwrap_err()
                .to_string()
                .contains("fep")
        );
    }
}
