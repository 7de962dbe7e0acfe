//! What an agent reports: CPU use and load average from /proc, and per
//! watched port whether it listens, its live connections and the packets it
//! received per second.

use std::collections::HashMap;
use std::time::Instant;

use fep_shared::protocol::{Report, ServiceLoad};

use fep_shared::cpu::CpuTimes;

use crate::sockdiag;

/// Remembers the previous sample so that rates can be computed.
#[derive(Default)]
pub struct Sampler {
    cpu: Option<CpuTimes>,
    /// Per TCP socket (inode): segments received at the last sample.
    segs: HashMap<u32, u32>,
    udp_in: Option<u64>,
    last: Option<Instant>,
}

impl Sampler {
    /// Takes a report of the watched ports now.
    pub fn sample(&mut self, ports: &[u16]) -> Report {
        let now = Instant::now();
        let secs = self
            .last
            .map(|t| now.duration_since(t).as_secs_f64())
            .filter(|&s| s > 0.0);
        self.last = Some(now);
        let cpu = self.cpu_percent();
        let tcp_live = sockdiag::tcp(sockdiag::live_tcp_states(), true).unwrap_or_else(|e| {
            tracing::warn!("sock_diag TCP dump failed: {e}");
            Vec::new()
        });
        let tcp_listen = listening_tcp_ports();
        let udp_bound: Vec<u16> = sockdiag::udp()
            .map(|v| v.iter().map(|s| s.local_port).collect())
            .unwrap_or_default();

        // Segments received since the last sample, per port; new sockets
        // count in full, closed ones drop out.
        let mut segs_now = HashMap::new();
        let mut rx: HashMap<u16, u64> = HashMap::new();
        for s in &tcp_live {
            if let Some(n) = s.segs_in {
                let before = self.segs.get(&s.inode).copied().unwrap_or(0);
                *rx.entry(s.local_port).or_default() += u64::from(n.wrapping_sub(before));
                segs_now.insert(s.inode, n);
            }
        }
        self.segs = segs_now;
        // UDP has no per-socket counter: the host's datagram rate is reported
        // for each watched UDP port.
        let udp_in = udp_in_datagrams();
        let udp_rate = match (self.udp_in, udp_in, secs) {
            (Some(a), Some(b), Some(s)) => b.saturating_sub(a) as f64 / s,
            _ => 0.0,
        };
        self.udp_in = udp_in;

        let services = ports
            .iter()
            .map(|&port| {
                let tcp = tcp_listen.contains(&port);
                let udp = udp_bound.contains(&port);
                let connections = tcp_live.iter().filter(|s| s.local_port == port).count() as u32;
                let rx_pps = if tcp {
                    secs.map_or(0.0, |s| rx.get(&port).copied().unwrap_or(0) as f64 / s)
                } else if udp {
                    udp_rate
                } else {
                    0.0
                };
                ServiceLoad {
                    port,
                    listening: tcp || udp,
                    connections,
                    rx_pps,
                }
            })
            .collect();
        Report {
            cpu_percent: cpu,
            load_avg: load_avg(),
            services,
        }
    }

    /// Busy share of all CPUs since the last call, from /proc/stat.
    fn cpu_percent(&mut self) -> f64 {
        let Some(now) = CpuTimes::read() else {
            return 0.0;
        };
        let pct = self.cpu.map_or(0.0, |then| now.busy_percent_since(&then));
        self.cpu = Some(now);
        pct
    }
}

/// Ports with a TCP listening socket.
pub fn listening_tcp_ports() -> Vec<u16> {
    use netlink_packet_sock_diag::inet::StateFlags;
    sockdiag::tcp(StateFlags::LISTEN, false)
        .map(|v| v.iter().map(|s| s.local_port).collect())
        .unwrap_or_default()
}

/// Which of `ports` have a TCP listener or a bound UDP socket.
pub fn listening(ports: &[u16]) -> Vec<bool> {
    let tcp = listening_tcp_ports();
    let udp: Vec<u16> = sockdiag::udp()
        .map(|v| v.iter().map(|s| s.local_port).collect())
        .unwrap_or_default();
    ports
        .iter()
        .map(|p| tcp.contains(p) || udp.contains(p))
        .collect()
}

fn load_avg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|x| x.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// `Udp: InDatagrams` from /proc/net/snmp (this network namespace).
fn udp_in_datagrams() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "InDatagrams")?;
    values.get(i)?.parse().ok()
}
