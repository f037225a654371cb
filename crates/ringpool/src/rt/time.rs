//! Timers: [`sleep`] and [`timeout`], over the runtime's [`Timers`] (the next deadline bounds
//! how long the runtime waits in the kernel; the timers due are fired after each wait).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::executor::{next_tokens, runtime, try_runtime};
use crate::{Error, Result};

/// A runtime's timers: (deadline, id) → the waker of the sleep waiting for it.
#[derive(Default)]
pub(super) struct Timers(RefCell<BTreeMap<(Instant, u64), Waker>>);

impl Timers {
    fn insert(&self, at: Instant, id: u64, waker: Waker) {
        self.0.borrow_mut().insert((at, id), waker);
    }

    fn remove(&self, at: Instant, id: u64) {
        self.0.borrow_mut().remove(&(at, id));
    }

    /// The earliest deadline, if any timer is set.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.0.borrow().keys().next().map(|(at, _)| *at)
    }

    /// Wakes (and removes) every timer whose deadline is not after `now`.
    pub(super) fn fire(&self, now: Instant) {
        let mut timers = self.0.borrow_mut();
        while let Some(entry) = timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            entry.remove().wake();
        }
    }
}

/// Completes after `d`.
///
/// # Examples
/// ```
/// ringpool::rt::block_on(async {
///     let t = std::time::Instant::now();
///     ringpool::rt::sleep(std::time::Duration::from_millis(20)).await;
///     assert!(t.elapsed() >= std::time::Duration::from_millis(20));
/// })?;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub async fn sleep(d: Duration) {
    let at = Instant::now() + d;
    let id = next_tokens(1); // any unique number
    /// Takes the timer out when the sleep ends or is dropped early (e.g. by `timeout`), so a
    /// dropped sleep leaves no entry to fire for nothing later.
    struct Unregister(Instant, u64);
    impl Drop for Unregister {
        fn drop(&mut self) {
            if let Some(rt) = try_runtime() {
                rt.timers.remove(self.0, self.1);
            }
        }
    }
    let _unregister = Unregister(at, id);
    std::future::poll_fn(|cx| {
        if Instant::now() >= at {
            runtime().timers.remove(at, id);
            return Poll::Ready(());
        }
        runtime().timers.insert(at, id, cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// `fut`, or [`Error::TimedOut`] if it does not complete within `d` (it is then dropped, which
/// cancels its op).
///
/// # Examples
/// ```
/// use std::time::Duration;
/// let r = ringpool::rt::block_on(async {
///     ringpool::rt::timeout(Duration::from_millis(10), ringpool::rt::sleep(Duration::from_secs(5))).await
/// })?;
/// assert!(matches!(r, Err(ringpool::Error::TimedOut)));
/// # Ok::<(), ringpool::Error>(())
/// ```
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(sleep(d));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::TimedOut)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rt::testing::counting_waker;

    #[test]
    fn timers_fire_in_deadline_order_up_to_and_including_now() {
        let timers = Timers::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (early, early_wakes) = counting_waker();
        let (due, due_wakes) = counting_waker();
        let (late, late_wakes) = counting_waker();
        timers.insert(t0 + ms(30), 1, late);
        timers.insert(t0 + ms(20), 2, due);
        timers.insert(t0 + ms(10), 3, early);
        assert_eq!(timers.next_deadline(), Some(t0 + ms(10)));
        timers.fire(t0 + ms(20)); // a deadline equal to now is due
        assert_eq!(
            (early_wakes.get(), due_wakes.get(), late_wakes.get()),
            (1, 1, 0)
        );
        assert_eq!(timers.next_deadline(), Some(t0 + ms(30)));
        timers.fire(t0 + ms(20)); // fired timers are gone: nothing twice
        assert_eq!((early_wakes.get(), due_wakes.get()), (1, 1));
        timers.remove(t0 + ms(30), 1);
        assert_eq!(timers.next_deadline(), None);
        timers.fire(t0 + ms(40)); // a removed timer never fires
        assert_eq!(late_wakes.get(), 0);
    }

    #[test]
    fn timers_with_one_deadline_are_kept_apart_by_their_ids() {
        let timers = Timers::default();
        let at = Instant::now();
        let (a, a_wakes) = counting_waker();
        let (b, b_wakes) = counting_waker();
        timers.insert(at, 1, a);
        timers.insert(at, 2, b);
        timers.remove(at, 1); // a dropped sleep takes out its own timer only
        timers.fire(at);
        assert_eq!((a_wakes.get(), b_wakes.get()), (0, 1));
    }
}
