//! Times on the dispatcher's clock: milliseconds since the daemon started,
//! in a `u32` that wraps (about every 49 days). Workers stamp routes with
//! it; the control plane compares against it.

use std::time::Instant;

/// The clock itself: the core's notion of `now`.
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

/// Milliseconds from `then` to `now` on the wrapping clock; a `then` after
/// `now` counts as 0 (a reader that took `now` before a worker's latest
/// touch sees that touch in its future: idle 0, not a wrapped-around
/// eternity).
pub fn idle_since(then: u32, now: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if d > u32::MAX / 2 {
        0
    } else {
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_clock_is_the_longest_idleness() {
        assert_eq!(idle_since(0, u32::MAX / 2), u32::MAX / 2);
        assert_eq!(idle_since(0, u32::MAX / 2 + 1), 0);
    }
}
