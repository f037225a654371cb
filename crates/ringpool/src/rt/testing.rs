//! What the unit tests of `rt`'s modules share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

/// How many times a waker made by [`counting_waker`] was woken.
pub(super) struct Wakes(Arc<AtomicUsize>);

impl Wakes {
    pub(super) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

struct Counter(Arc<AtomicUsize>);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A waker that counts its wake-ups, and the count.
pub(super) fn counting_waker() -> (Waker, Wakes) {
    let count = Arc::new(AtomicUsize::new(0));
    (Waker::from(Arc::new(Counter(count.clone()))), Wakes(count))
}
