//! The packet core end to end: parse → decide → rewrite, on arbitrary bytes,
//! with routes accumulating across inputs and expiry run in between.
#![no_main]

use std::sync::OnceLock;

use fep::{Dispatcher, Verdict, Worker};
use fep_shared::FepConfig;
use libfuzzer_sys::fuzz_target;

fn dispatcher() -> &'static Dispatcher {
    static D: OnceLock<Dispatcher> = OnceLock::new();
    D.get_or_init(|| Dispatcher::new(&FepConfig::parse(fep::testing::CONFIG).expect("valid")))
}

fuzz_target!(|data: &[u8]| {
    let d = dispatcher();
    let mut worker = Worker::new(Default::default());
    let now = data.first().map_or(0, |&b| u32::from(b) * 1000);
    let mut buf = data.to_vec();
    if let Verdict::Forward(len) = d.process(&mut buf, now, &mut worker) {
        assert!(len <= buf.len());
        fep::testing::assert_forwardable(&buf[..len]);
    }
    d.expire(now);
});
