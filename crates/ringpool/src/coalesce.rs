//! Receive coalescing: when data streams in small pieces, hold the next wait for a moment so
//! every receive takes more bytes (see [`DriverConfig::receive_coalescing`]).
//!
//! Only the decision lives here, apart from the driver, so it can be tested without a kernel:
//! the driver reports the bytes its stream receives deliver ([`Coalescing::received`]) and each
//! wake-up ([`Coalescing::woke`]), and asks before it waits whether to hold first
//! ([`Coalescing::hold`]).
//!
//! [`DriverConfig::receive_coalescing`]: crate::DriverConfig::receive_coalescing

use std::time::{Duration, Instant};

/// A wake-up holds the next wait only if its stream receives took at least this much and less
/// than one buffer of their group (a full buffer means bulk data, which holding would only
/// delay), and it came less than [`BUSY_FACTOR`] delays after the wake-up before it.
const MIN_BYTES: usize = 4096;
/// How many delays apart two wake-ups may be for data to count as streaming in (farther apart:
/// a request now and then, which holding would only delay).
const BUSY_FACTOR: u32 = 4;

/// The coalescing state of one driver.
#[derive(Debug)]
pub(crate) struct Coalescing {
    delay: Duration,
    /// Bytes delivered by stream receives since the last wake-up.
    received: usize,
    /// The largest buffer size among the groups those receives used.
    buf_size: usize,
    last_wake: Option<Instant>,
    hold: bool,
}

impl Coalescing {
    /// Coalescing with `delay`, or `None` for a zero delay (off).
    pub(crate) fn new(delay: Duration) -> Option<Coalescing> {
        (!delay.is_zero()).then_some(Coalescing {
            delay,
            received: 0,
            buf_size: 0,
            last_wake: None,
            hold: false,
        })
    }

    /// A stream receive delivered `bytes` into buffers of `buf_size`.
    pub(crate) fn received(&mut self, bytes: usize, buf_size: usize) {
        self.received += bytes;
        self.buf_size = self.buf_size.max(buf_size);
    }

    /// A wait returned at `now`: decides whether the next one holds.
    pub(crate) fn woke(&mut self, now: Instant) {
        let busy = self
            .last_wake
            .is_some_and(|last| now.saturating_duration_since(last) < self.delay * BUSY_FACTOR);
        self.hold = busy && (MIN_BYTES..self.buf_size).contains(&self.received);
        self.last_wake = Some(now);
        self.received = 0;
        self.buf_size = 0;
    }

    /// How long the next wait should sleep (after submitting, before collecting), if at all.
    pub(crate) fn hold(&self) -> Option<Duration> {
        self.hold.then_some(self.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_micros(100);

    /// A state whose last wake-up was at `t0`, then a wake-up `after` later that received
    /// `bytes` into 64 KiB buffers.
    fn after_wake(bytes: usize, after: Duration) -> Coalescing {
        let mut c = Coalescing::new(DELAY).expect("non-zero delay");
        let t0 = Instant::now();
        c.woke(t0);
        if bytes > 0 {
            c.received(bytes, 65536);
        }
        c.woke(t0 + after);
        c
    }

    #[test]
    fn a_zero_delay_turns_coalescing_off() {
        assert!(Coalescing::new(Duration::ZERO).is_none());
    }

    #[test]
    fn small_receives_in_quick_succession_hold_the_next_wait() {
        let c = after_wake(12 * 1024, Duration::from_micros(150));
        assert_eq!(c.hold(), Some(DELAY));
    }

    #[test]
    fn a_full_buffer_does_not_hold() {
        assert_eq!(after_wake(65536, Duration::from_micros(150)).hold(), None);
        assert_eq!(after_wake(200_000, Duration::from_micros(150)).hold(), None);
    }

    #[test]
    fn little_data_does_not_hold() {
        assert_eq!(after_wake(100, Duration::from_micros(150)).hold(), None);
        assert_eq!(after_wake(0, Duration::from_micros(150)).hold(), None);
    }

    #[test]
    fn a_wake_up_after_a_pause_does_not_hold() {
        assert_eq!(after_wake(12 * 1024, DELAY * BUSY_FACTOR).hold(), None);
        assert_eq!(
            after_wake(12 * 1024, Duration::from_millis(50)).hold(),
            None
        );
    }

    #[test]
    fn the_first_wake_up_does_not_hold() {
        let mut c = Coalescing::new(DELAY).expect("non-zero delay");
        c.received(12 * 1024, 65536);
        c.woke(Instant::now());
        assert_eq!(c.hold(), None);
    }

    #[test]
    fn each_wake_up_decides_afresh() {
        let mut c = after_wake(12 * 1024, Duration::from_micros(150));
        assert!(c.hold().is_some());
        let later = c.last_wake.expect("woke") + Duration::from_micros(150);
        c.woke(later); // nothing received since
        assert_eq!(c.hold(), None);
    }
}
