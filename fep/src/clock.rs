//! Times on the dispatcher's clock: milliseconds in a `u32` that wraps
//! (about every 49 days), shared by the data path and the control plane.

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
