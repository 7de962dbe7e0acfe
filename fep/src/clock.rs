//! The core's notion of `now`: milliseconds since the daemon started, which
//! the workers stamp routes with and the control plane compares against.

use std::time::Instant;

/// Milliseconds since the daemon started (wraps after 49 days; route ages
/// are compared with wrapping arithmetic).
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Clock(Instant::now())
    }

    pub fn now_ms(&self) -> u32 {
        self.0.elapsed().as_millis() as u32
    }
}
