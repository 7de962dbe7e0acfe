//! Memory per route, measured from the process's resident memory while the
//! assigned-route table grows to 1 M and 10 M routes (IPVS uses about 128
//! bytes per connection). `cargo bench -p fep --bench route_memory`.

use etherparse::PacketBuilder;
use fep::testing::CONFIG;
use fep::{Dispatcher, Verdict, Worker};
use fep_shared::FepConfig;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() {
    // `cargo bench` passes --bench; a filter argument selects nothing here.
    for routes in [1_000_000u32, 10_000_000] {
        let services = &CONFIG[CONFIG.find("[[node]]").expect("nodes")..];
        let cfg = FepConfig::parse(&format!("max_routes = {routes}\n{services}")).unwrap();
        let before = rss_bytes();
        let d = Dispatcher::new(&cfg);
        let mut w = Worker::new(Default::default());
        let mut buf = Vec::with_capacity(64);
        let started = std::time::Instant::now();
        for n in 0..routes {
            buf.clear();
            PacketBuilder::ipv4((0x0a00_0000 | (n >> 8)).to_be_bytes(), [10, 0, 0, 100], 64)
                .tcp(1024 + (n & 0xff) as u16, 80, 1, 1000)
                .syn()
                .write(&mut buf, &[])
                .unwrap();
            assert!(matches!(
                d.process(&mut buf, 0, &mut w),
                Verdict::Forward(_)
            ));
        }
        let secs = started.elapsed().as_secs_f64();
        let grown = rss_bytes().saturating_sub(before);
        println!(
            "{routes} routes: {:.0} bytes per route (resident memory grew {:.1} MB), inserted at {:.2} M routes/s",
            grown as f64 / f64::from(routes),
            grown as f64 / 1e6,
            f64::from(routes) / secs / 1e6
        );
        drop(d);
    }
}
