//! Zero-copy send: per-socket send lanes (ordering) and the adaptive policy.
//!
//! The kernel's zero-copy send posts two CQEs: the result (`F_MORE` set when a notification
//! follows) and, once the network stack no longer needs the memory, a notification (`F_NOTIF`).
//! The driver shows the user one completion (the result) and keeps the memory until the
//! notification, so sends keep pipelining while buffers go home by themselves.
//!
//! **Ordering.** Sends on one socket go through its [`Lane`]: everything queued while the lane is
//! idle is submitted together as one `IOSQE_IO_LINK` chain, so the kernel runs them in order,
//! and the next chain starts when the previous one's *results* (not notifications) are in. A
//! short send breaks the chain; the driver re-queues the remainder and the sends the break
//! cancelled, in their order, ahead of anything newer.
//!
//! **Policy** ([`ZcMode::Auto`], the default). Zero-copy pays only when the kernel really avoids
//! the copy and the payload is large enough to amortise pinning and the notification. Below
//! [`ZcConfig::threshold`] bytes a send goes out plainly. Above it, the send asks the kernel to
//! report usage (`IORING_SEND_ZC_REPORT_USAGE`); after [`COPIED_STREAK`] notifications in a row
//! saying the kernel copied anyway (loopback, veth, NICs without scatter-gather), the lane sends
//! plainly for [`PLAIN_RUN`] sends and then tries zero-copy again. A new lane starts from what the
//! driver saw last, so a server on loopback does not pay the probe on every connection.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::rc::Weak;

/// Whether `send_zc` uses zero-copy.
///
/// # Examples
/// ```
/// use ringpool::{DriverConfig, ZcConfig, ZcMode};
/// let cfg = DriverConfig::default().zerocopy(ZcConfig::default().mode(ZcMode::On));
/// # let _ = cfg;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZcMode {
    /// Zero-copy where the policy says it pays (the default).
    Auto,
    /// Always zero-copy (where the kernel has it), whatever it costs.
    On,
    /// Never zero-copy: `send_zc` sends plainly.
    Off,
}

impl std::str::FromStr for ZcMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ZcMode::Auto),
            "on" => Ok(ZcMode::On),
            "off" => Ok(ZcMode::Off),
            other => Err(format!("unknown zero-copy mode {other:?} (auto, on, off)")),
        }
    }
}

/// Consecutive "the kernel copied" notifications after which a lane stops trying zero-copy.
pub const COPIED_STREAK: u32 = 4;
/// Plain sends a lane makes before it tries zero-copy again.
pub const PLAIN_RUN: u32 = 1024;
/// Default payload size below which `send_zc` sends plainly, in bytes. The kernel's
/// MSG_ZEROCOPY documentation puts the break-even around 10 KB; we round up to 16 KiB (see the
/// `send` benchmark for the cost of forced zero-copy at 4 KiB and 64 KiB on this machine).
pub const DEFAULT_THRESHOLD: usize = 16 * 1024;

/// Zero-copy settings of a driver.
///
/// # Examples
/// ```
/// use ringpool::{ZcConfig, ZcMode};
/// let cfg = ZcConfig::default().threshold(64 * 1024);
/// assert_eq!(cfg.mode_of(), ZcMode::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZcConfig {
    pub(crate) mode: ZcMode,
    pub(crate) threshold: usize,
}

impl Default for ZcConfig {
    fn default() -> Self {
        ZcConfig {
            mode: ZcMode::Auto,
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

impl ZcConfig {
    /// Sets the mode.
    pub fn mode(mut self, mode: ZcMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the payload size below which [`ZcMode::Auto`] sends plainly.
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// The mode in use.
    pub fn mode_of(&self) -> ZcMode {
        self.mode
    }
}

/// Zero-copy statistics of a driver.
///
/// # Examples
/// ```
/// let d = ringpool::Driver::new(Default::default()).unwrap();
/// assert_eq!(d.zc_stats().zc_sends, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZcStats {
    /// Zero-copy send ops issued.
    pub zc_sends: u64,
    /// Bytes sent by zero-copy ops.
    pub zc_bytes: u64,
    /// Zero-copy send ops whose memory was registered (a registered region or a
    /// [`FixedBuf`](crate::FixedBuf)): no per-I/O page pinning.
    pub fixed_sends: u64,
    /// Notifications saying the kernel copied after all.
    pub zc_copied: u64,
    /// Notifications received.
    pub notifications: u64,
    /// Plain send ops issued for `send_zc` (policy, size, or kernel).
    pub plain_sends: u64,
    /// Bytes sent by those plain ops.
    pub plain_bytes: u64,
}

/// Per-lane memory of what zero-copy did.
///
/// Notifications lag behind results (on loopback they come only once the receiver has read the
/// data), so a lane that has not yet seen zero-copy work is on probation: at most
/// [`COPIED_STREAK`] zero-copy sends may await their verdict at once, the others go plainly.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LanePolicy {
    copied_streak: u32,
    plain_left: u32,
    /// A notification said the kernel did not copy: zero-copy works on this route.
    verified: bool,
    /// Zero-copy sends issued on probation whose notification has not come.
    on_probation: u32,
}

impl LanePolicy {
    /// Whether the next send of `len` bytes should try zero-copy (and, if so, counts it).
    pub(crate) fn wants_zc(&mut self, cfg: &ZcConfig, report_usage: bool, len: usize) -> bool {
        match cfg.mode {
            ZcMode::Off => false,
            ZcMode::On => true,
            ZcMode::Auto if len < cfg.threshold => false,
            ZcMode::Auto if !report_usage => true,
            ZcMode::Auto if self.plain_left > 0 => {
                self.plain_left -= 1;
                false
            }
            ZcMode::Auto if self.verified => true,
            ZcMode::Auto if self.on_probation < COPIED_STREAK => {
                self.on_probation += 1;
                true
            }
            ZcMode::Auto => false,
        }
    }

    /// A notification arrived; `copied` says whether the kernel copied after all.
    pub(crate) fn notified(&mut self, copied: bool) {
        self.on_probation = self.on_probation.saturating_sub(1);
        if !copied {
            self.copied_streak = 0;
            self.verified = true;
            return;
        }
        self.copied_streak += 1;
        if self.copied_streak >= COPIED_STREAK {
            self.copied_streak = 0;
            self.verified = false;
            self.plain_left = PLAIN_RUN;
        }
    }

    /// Whether this lane currently sends plainly because zero-copy kept being copied.
    pub(crate) fn backing_off(&self) -> bool {
        self.plain_left > 0
    }

    /// A lane that starts out backing off (the driver's last lane found zero-copy copied).
    pub(crate) fn backed_off() -> LanePolicy {
        LanePolicy {
            plain_left: PLAIN_RUN,
            ..LanePolicy::default()
        }
    }
}

/// The sends of one socket, in order; keyed by the address of the socket's `Rc`.
pub(crate) struct Lane {
    /// The socket: an idle lane whose socket is gone is swept away. While the socket lives, the
    /// lane (and what its policy learned) stays.
    pub(crate) fd: Weak<OwnedFd>,
    /// Sends waiting for the lane to be idle (slot keys, oldest first).
    pub(crate) queue: VecDeque<usize>,
    /// Sends of the current chain whose result CQE has not arrived.
    pub(crate) in_flight: u32,
    /// Sends of the current chain to run again, in order, before `queue` (a short send's
    /// remainder and the sends its broken link cancelled).
    pub(crate) requeue: Vec<usize>,
    /// The error that broke the current chain, reported to the sends it cancelled.
    pub(crate) error: Option<i32>,
    pub(crate) policy: LanePolicy,
    /// Whether the socket is a stream socket (`SO_TYPE`), whose plain sends may leave together
    /// in one `sendmsg`; asked the first time two sends wait at once.
    pub(crate) stream: Option<bool>,
}

impl Lane {
    pub(crate) fn new(fd: Weak<OwnedFd>, policy: LanePolicy) -> Lane {
        Lane {
            fd,
            queue: VecDeque::new(),
            in_flight: 0,
            requeue: Vec::new(),
            error: None,
            policy,
            stream: None,
        }
    }

    /// Whether nothing is queued or in flight.
    pub(crate) fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0 && self.requeue.is_empty()
    }

    /// The chain finished: what must run again goes first.
    pub(crate) fn chain_done(&mut self) {
        for key in self.requeue.drain(..).rev() {
            self.queue.push_front(key);
        }
        self.error = None;
    }
}

/// Map from a socket's `Rc` address to its lane.
pub(crate) type LaneMap = crate::hash::IntMap<usize, Lane>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_sends_small_payloads_plainly() {
        let mut p = LanePolicy::default();
        let cfg = ZcConfig::default();
        assert!(!p.wants_zc(&cfg, true, 4096));
        assert!(p.wants_zc(&cfg, true, 64 * 1024));
        assert!(p.wants_zc(&cfg.mode(ZcMode::On), true, 1));
        assert!(!p.wants_zc(&cfg.mode(ZcMode::Off), true, 1 << 20));
    }

    #[test]
    fn auto_backs_off_after_a_copied_streak_and_retries() {
        let mut p = LanePolicy::default();
        let cfg = ZcConfig::default();
        for _ in 0..COPIED_STREAK - 1 {
            p.notified(true);
        }
        assert!(p.wants_zc(&cfg, true, 1 << 20), "not yet");
        p.notified(true);
        let plain = (0..PLAIN_RUN)
            .filter(|_| !p.wants_zc(&cfg, true, 1 << 20))
            .count();
        assert_eq!(plain as u32, PLAIN_RUN);
        assert!(
            p.wants_zc(&cfg, true, 1 << 20),
            "retries zero-copy after the plain run"
        );
    }

    #[test]
    fn probation_limits_unverified_zero_copy_sends_in_flight() {
        let mut p = LanePolicy::default();
        let cfg = ZcConfig::default().threshold(0);
        let zc = (0..100).filter(|_| p.wants_zc(&cfg, true, 1)).count();
        assert_eq!(
            zc as u32, COPIED_STREAK,
            "only a streak's worth awaits a verdict"
        );
        p.notified(false);
        assert!(
            (0..100).all(|_| p.wants_zc(&cfg, true, 1)),
            "verified: no limit"
        );
    }

    #[test]
    fn a_real_zero_copy_resets_the_streak() {
        let mut p = LanePolicy::default();
        for _ in 0..COPIED_STREAK - 1 {
            p.notified(true);
        }
        p.notified(false);
        p.notified(true);
        assert!(!p.backing_off());
    }

    #[test]
    fn requeued_sends_go_first_in_order() {
        let mut lane = Lane::new(Weak::new(), LanePolicy::default());
        lane.queue.extend([7, 8]);
        lane.requeue.extend([3, 4, 5]);
        lane.chain_done();
        assert_eq!(lane.queue, [3, 4, 5, 7, 8]);
    }
}
