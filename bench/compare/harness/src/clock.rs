//! CLOCK_MONOTONIC in nanoseconds, comparable between processes on one machine.
//!
//! `std::time::Instant` reads the same clock on Linux but hides its value; the backend and the
//! clients are separate processes and must subtract each other's timestamps.

use nix::time::{ClockId, clock_gettime};

/// Nanoseconds on CLOCK_MONOTONIC (0 if the clock cannot be read, which Linux never does).
pub fn mono_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_close_to_std_instant() {
        let a = mono_ns();
        let i = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = mono_ns();
        let d = i.elapsed().as_nanos() as u64;
        assert!(b > a);
        // Same clock: the two measured intervals agree to well under a millisecond.
        assert!((b - a).abs_diff(d) < 1_000_000, "{} vs {d}", b - a);
    }
}
