//! The whole machine's CPU time from `/proc/stat`: the agent's load report
//! and the benchmark's CPU figure are both a busy share between two reads.

/// Cumulative CPU time (clock ticks, all CPUs) at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    /// Reads the first (all-CPU) line of `/proc/stat`.
    pub fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<Self> {
        let v: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().sum();
        // idle and iowait
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Some(CpuTimes {
            busy: total - idle,
            total,
        })
    }

    /// Percentage of the CPU time since `earlier` that was busy (0 when no
    /// time has passed).
    pub fn busy_percent_since(&self, earlier: &CpuTimes) -> f64 {
        if self.total <= earlier.total {
            return 0.0;
        }
        100.0 * self.busy.saturating_sub(earlier.busy) as f64 / (self.total - earlier.total) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_share_between_two_reads() {
        let a = CpuTimes::parse("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        let b = CpuTimes::parse("cpu  200 0 200 900 100 0 0 0 0 0\n").unwrap();
        assert_eq!(b.busy_percent_since(&a), 50.0);
        assert_eq!(a.busy_percent_since(&b), 0.0);
        assert_eq!(CpuTimes::parse(""), None);
    }
}
