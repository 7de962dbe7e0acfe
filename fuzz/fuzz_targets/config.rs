//! The config parsers: arbitrary text must give a config or a clear error.
#![no_main]

use fep_shared::{AgentConfig, FepConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(mut cfg) = FepConfig::parse(text) {
            // A config that parses is one the dispatcher can be built from
            // (with a small route table: its memory is reserved up front).
            cfg.max_routes = cfg.max_routes.min(10_000);
            let _ = fep::Dispatcher::new(&cfg);
            let _ = fep::daemon::describe(&cfg);
        }
        let _ = AgentConfig::parse(text);
    }
});
