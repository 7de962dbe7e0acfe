//! Shared pieces of the integration tests: a lab with fep and the back-end
//! servers running, and the skip rule for machines without root.

use std::time::Duration;

use fep_tools::lab::{self, FepProcess, Lab};
use fep_tools::netns;

pub use fep_tools::{http, pattern};

/// Per-request timeout: generous, since debug builds and 2 shared cores are slow.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// True (after saying so) when the test cannot run here: it needs root for
/// namespaces, veths and the TUN device.
pub fn skip_without_root(test: &str) -> bool {
    if netns::is_root() {
        return false;
    }
    eprintln!(
        "skipping {test}: needs root (network namespaces, veth and TUN); run `cargo test` as root"
    );
    true
}

/// A lab with `backends` back ends serving HTTP on `tcp` and answering on
/// `udp`, and fep running `services` (TOML `[[service]]` tables).
pub struct Running {
    pub lab: Lab,
    pub fep: FepProcess,
}

pub fn start(
    tag: &str,
    backends: usize,
    v6: bool,
    tcp: &[u16],
    udp: &[u16],
    services: &str,
) -> Running {
    let mut lab = Lab::new(tag, backends).expect("building the lab");
    let testsrv = lab::workspace_bin("fep-testsrv").unwrap();
    lab.start_backend_servers(&testsrv, tcp, udp)
        .expect("starting back-end servers");
    let fep_bin = lab::workspace_bin("fep").unwrap();
    let fep = lab
        .start_fep(&fep_bin, &lab.config(v6, "", services))
        .expect("starting fep");
    Running { lab, fep }
}

/// Counts how many of `names` are each back end's name, in back-end order.
pub fn tally(names: &[String], backends: usize) -> Vec<usize> {
    (0..backends)
        .map(|i| names.iter().filter(|n| **n == lab::backend_name(i)).count())
        .collect()
}
