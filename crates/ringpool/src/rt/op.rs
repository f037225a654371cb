//! The op guard: how a future owns a driver op under the ownership rule.
//!
//! Every op a future starts gets a token and an [`OpState`] in the runtime's op table;
//! [`Runtime::route`] hands each completion to its token's state and wakes the future. An
//! [`Op`] is the future's handle: dropping it before the op's final completion asks the driver
//! to cancel, and the driver keeps the op's memory until that completion comes. A stream's
//! receive has a sink ([`Leftovers`]): what it took off the socket and nobody took from it
//! (handed out before the drop, or arriving after it) becomes the stream's next data, and a new
//! receive of the stream waits until no dropped one is in the kernel. Other ops' late
//! completions are dropped by `route` (received buffers go home). An `Op` holds a `Weak` of the
//! runtime that made it and touches only that one ([`Runtime::shutdown`] settles its ops when
//! it ends).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::executor::{next_tokens, runtime, Runtime};
use crate::{Driver, Error, Event, OpId, Result, SendBuf};

/// Completions routed to the future that waits for them.
#[derive(Default)]
pub(super) struct OpState {
    pub(super) events: EventQueue,
    /// The op delivered its final completion.
    pub(super) finished: bool,
    pub(super) waker: Option<Waker>,
    /// Set when the op's future was dropped before the final completion and what it still
    /// receives must not be lost (a receive: the data is the stream's next bytes).
    orphan_sink: Option<Leftovers>,
    /// A stream's receive: where its untaken events go if the runtime ends before the op's
    /// holder takes them (it was returned out of `block_on`).
    stream: Option<Leftovers>,
}

/// An op's events not yet taken, in order. Most ops have one at a time, kept inline (no
/// allocation per op); a multishot op's backlog goes on in a deque.
#[derive(Default)]
pub(super) struct EventQueue {
    first: Option<Event>,
    rest: VecDeque<Event>,
}

impl EventQueue {
    fn push_back(&mut self, e: Event) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(e);
        } else {
            self.rest.push_back(e);
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<Event> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    /// Takes every event, in order.
    fn drain(&mut self) -> impl Iterator<Item = Event> + '_ {
        self.first.take().into_iter().chain(self.rest.drain(..))
    }
}

/// Events of a stream's receives whose futures were dropped: the next receive returns them
/// first, so cancelling a receive never loses data that had already been taken from the socket.
pub(super) type Leftovers = Rc<LeftoverQueue>;

#[derive(Default)]
pub(super) struct LeftoverQueue {
    events: RefCell<VecDeque<Event>>,
    /// The receive waiting on the stream, woken when leftovers arrive.
    waker: RefCell<Option<Waker>>,
    /// Dropped receives of the stream still in the kernel. A new receive waits for them: two
    /// receives in flight on one socket could hand out its bytes out of order (seen in the
    /// proxy bench: a receive started while a dropped one was still armed overtook it).
    orphans: Cell<usize>,
}

impl LeftoverQueue {
    pub(super) fn pop(&self) -> Option<Event> {
        self.events.borrow_mut().pop_front()
    }

    /// Ready when a new receive may start: leftovers wait to be handed out, or no dropped
    /// receive of the stream is still in the kernel.
    pub(super) fn poll_quiet(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.events.borrow().is_empty() || self.orphans.get() == 0 {
            return Poll::Ready(());
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Whether no dropped receive of the stream is in the kernel (a new one may start).
    pub(super) fn quiet(&self) -> bool {
        self.orphans.get() == 0
    }

    /// Whether no leftovers wait to be handed out.
    pub(super) fn is_empty(&self) -> bool {
        self.events.borrow().is_empty()
    }

    /// A receive of the stream was dropped while in the kernel.
    pub(super) fn add_orphan(&self) {
        self.orphans.set(self.orphans.get() + 1);
    }

    /// A dropped receive's final completion came.
    pub(super) fn orphan_done(&self) {
        self.orphans.set(self.orphans.get() - 1);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub(super) fn push(&self, events: impl IntoIterator<Item = Event>) {
        self.events.borrow_mut().extend(events);
        if !self.events.borrow().is_empty() {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

impl Runtime {
    /// Hands every completion to the op state of its token; completions of ops whose future
    /// was dropped are dropped here (their buffers go home).
    pub(super) fn route(&self) {
        loop {
            let c = self.driver.borrow_mut().pop();
            let Some(c) = c else { break };
            let mut ops = self.ops.borrow_mut();
            let Some(state) = ops.get_mut(&c.token) else {
                continue;
            };
            if let Some(sink) = &state.orphan_sink {
                // The cancel's own outcome is nobody's news; data (or EOF, or a real error)
                // taken off the socket before the cancel landed is the stream's.
                let sink = sink.clone();
                if !c.more {
                    ops.remove(&c.token);
                }
                drop(ops);
                if !matches!(c.event, Event::Error(Error::Cancelled)) {
                    sink.push([c.event]);
                }
                if !c.more {
                    sink.orphan_done();
                }
                continue;
            }
            state.finished |= !c.more;
            if let Some(event) = without_lease(c.event) {
                state.events.push_back(event);
            }
            if let Some(w) = state.waker.take() {
                w.wake();
            }
        }
    }

    fn token(&self) -> u64 {
        self.tokens(1)
    }

    /// `n` consecutive tokens (one op with several completion streams, such as a lease group
    /// and its members): the first of them. Tokens are unique across runtimes, so an op's
    /// token names nothing in any other runtime, whatever outlives its own.
    pub(super) fn tokens(&self, n: u64) -> u64 {
        let first = next_tokens(n);
        let mut ops = self.ops.borrow_mut();
        for t in first..first + n {
            ops.insert(t, OpState::default());
        }
        first
    }
}

impl Runtime {
    /// The end of `block_on`, after its tasks were dropped: ops whose holders outlive the
    /// runtime (returned out of it) are cancelled and their final completions collected, so
    /// what a stream's receive took off the socket goes to the stream (its next receive, in a
    /// later runtime, returns it first) and receives dropped earlier stop counting as in
    /// flight. Nothing a later runtime runs can reach these ops: their holders see
    /// [`Error::RuntimeGone`].
    pub(super) fn shutdown(&self) {
        if self.ops.borrow().values().any(|s| !s.finished) {
            self.driver.borrow_mut().cancel_all();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.ops.borrow().values().any(|s| !s.finished) && Instant::now() < deadline {
                if self
                    .driver
                    .borrow_mut()
                    .wait(Some(Duration::from_millis(50)))
                    .is_err()
                {
                    break;
                }
                self.route();
            }
        }
        // Finished ops too: a receive that completed with data its holder had not taken yet
        // (found by the model checker: those bytes died with the runtime's op map).
        let states: Vec<OpState> = self.ops.borrow_mut().drain().map(|(_, s)| s).collect();
        for mut state in states {
            if let Some(sink) = state.orphan_sink.take() {
                // Its final completion did not come in time: the driver keeps its memory.
                sink.orphan_done();
            } else if let Some(stream) = state.stream.take() {
                stream.push(
                    state
                        .events
                        .drain()
                        .filter(|e| !matches!(e, Event::Error(Error::Cancelled))),
                );
            }
        }
    }
}

/// `event` without the lease clone it may carry. The runtime hands out no [`Lease`]: dropping
/// the clones as they arrive sends a lease group's buffer home once its members are done,
/// whether or not anyone awaits their results. A zero-copy member's `Returned` says only that
/// it let go of the lease: its op state's `finished` records that, so nothing is queued.
///
/// [`Lease`]: crate::Lease
fn without_lease(event: Event) -> Option<Event> {
    match event {
        Event::Returned(SendBuf::Leased(_)) => None,
        Event::Sent {
            result,
            buf: Some(SendBuf::Leased(_)),
        } => Some(Event::Sent { result, buf: None }),
        Event::LeaseFilled {
            result,
            lease: Some(_),
        } => Some(Event::LeaseFilled {
            result,
            lease: None,
        }),
        event => Some(event),
    }
}

/// One driver op awaited by a future: yields its events; dropping it before the final
/// completion cancels the op (later completions are dropped by the runtime).
pub(super) struct Op {
    token: u64,
    id: Option<OpId>,
    /// Where late events go if this op is dropped unfinished (receives of a stream).
    sink: Option<Leftovers>,
    /// The runtime that started the op: the only one it ever touches (it may be held past
    /// that runtime's end, then dropped or polled in another).
    rt: Weak<Runtime>,
}

impl Op {
    /// Registers a new op started by `start` (which gets the token).
    pub(super) fn start(
        start: impl FnOnce(&mut Driver, u64) -> Result<Option<OpId>>,
    ) -> Result<Op> {
        let rt = runtime();
        let token = rt.token();
        let id = start(&mut rt.driver.borrow_mut(), token);
        match id {
            Ok(id) => Ok(Op {
                token,
                id,
                sink: None,
                rt: Rc::downgrade(&rt),
            }),
            Err(e) => {
                rt.ops.borrow_mut().remove(&token);
                Err(e)
            }
        }
    }

    /// Makes this op a receive of the stream whose leftovers are `leftovers`: what it took off
    /// the socket and its holder did not take goes there when it is dropped or its runtime
    /// ends.
    pub(super) fn set_stream(&mut self, leftovers: &Leftovers) {
        self.sink = Some(leftovers.clone());
        if let Some(rt) = self.rt.upgrade() {
            if let Some(state) = rt.ops.borrow_mut().get_mut(&self.token) {
                state.stream = Some(leftovers.clone());
            }
        }
    }

    /// The next event of this op.
    pub(super) fn next(&self) -> impl Future<Output = Event> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    /// The stream's leftovers first, then this op's next event.
    pub(super) fn poll_with(&self, cx: &mut Context<'_>, leftovers: &Leftovers) -> Poll<Event> {
        if let Some(e) = leftovers.pop() {
            return Poll::Ready(e);
        }
        let p = self.poll_next(cx);
        if p.is_pending() {
            *leftovers.waker.borrow_mut() = Some(cx.waker().clone());
        }
        p
    }

    /// This op's next event, registering the task to be woken while none has come;
    /// [`Error::RuntimeGone`] once its runtime ended.
    pub(super) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Event> {
        let Some(rt) = self.rt.upgrade() else {
            return Poll::Ready(Event::Error(Error::RuntimeGone));
        };
        let mut ops = rt.ops.borrow_mut();
        let state = ops.get_mut(&self.token).expect("a live op has its state");
        match state.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// This op's next event if one has come, without waiting; [`Error::RuntimeGone`] once its
    /// runtime ended.
    pub(super) fn try_next(&self) -> Option<Event> {
        let Some(rt) = self.rt.upgrade() else {
            return Some(Event::Error(Error::RuntimeGone));
        };
        let mut ops = rt.ops.borrow_mut();
        ops.get_mut(&self.token).and_then(|s| s.events.pop_front())
    }

    /// Whether the runtime that started this op has ended (its holder outlived it).
    pub(super) fn runtime_ended(&self) -> bool {
        self.rt.strong_count() == 0
    }

    /// The next event of this op, awaited without borrowing the op (its holder keeps it and
    /// may lend it elsewhere meanwhile); [`Error::Cancelled`] if the op is gone by then.
    pub(super) fn next_detached(&self) -> impl Future<Output = Event> + 'static {
        next_event(self.rt.clone(), self.token)
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        // Its runtime ended: it cancelled the op and collected (or kept) what was its.
        let Some(rt) = self.rt.upgrade() else {
            return;
        };
        let mut ops = rt.ops.borrow_mut();
        let finished = match (ops.get_mut(&self.token), &self.sink) {
            (Some(state), Some(sink)) => {
                // What it received and nobody took, and whatever it still receives, is the
                // stream's next data.
                sink.push(state.events.drain());
                if state.finished {
                    ops.remove(&self.token);
                    true
                } else {
                    state.orphan_sink = Some(sink.clone());
                    sink.add_orphan();
                    false
                }
            }
            _ => ops.remove(&self.token).is_none_or(|s| s.finished),
        };
        drop(ops);
        if !finished {
            if let Some(id) = self.id {
                rt.driver.borrow_mut().cancel(id);
            }
        }
    }
}

/// The next event of the op with `token` of runtime `rt` (the op stays owned by its holder).
async fn next_event(rt: Weak<Runtime>, token: u64) -> Event {
    std::future::poll_fn(move |cx| {
        let Some(rt) = rt.upgrade() else {
            return Poll::Ready(Event::Error(Error::RuntimeGone));
        };
        let mut ops = rt.ops.borrow_mut();
        let Some(state) = ops.get_mut(&token) else {
            return Poll::Ready(Event::Error(Error::Cancelled));
        };
        match state.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rt::testing::counting_waker;

    /// Events as tags, to compare orders.
    fn tag(e: Event) -> u8 {
        match e {
            Event::Eof => 0,
            Event::Connected => 1,
            Event::Error(_) => 2,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_event_queue_keeps_the_order_across_its_inline_slot_and_its_deque() {
        let mut q = EventQueue::default();
        q.push_back(Event::Eof);
        q.push_back(Event::Connected);
        assert_eq!(q.pop_front().map(tag), Some(0));
        q.push_back(Event::Error(Error::Cancelled)); // behind the one still queued
        assert_eq!(q.pop_front().map(tag), Some(1));
        q.push_back(Event::Eof);
        assert_eq!(q.drain().map(tag).collect::<Vec<_>>(), [2, 0]);
        assert!(q.pop_front().is_none());
        q.push_back(Event::Connected); // empty again: inline
        assert!(q.first.is_some() && q.rest.is_empty());
    }

    #[test]
    fn a_new_receive_waits_for_the_dropped_ones_in_the_kernel_unless_leftovers_wait() {
        let l = LeftoverQueue::default();
        let (waker, wakes) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(l.quiet() && l.poll_quiet(&mut cx).is_ready());
        l.add_orphan();
        l.add_orphan();
        assert!(!l.quiet() && l.poll_quiet(&mut cx).is_pending());
        l.orphan_done(); // each end wakes the waiter, which looks again
        assert_eq!(wakes.get(), 1);
        assert!(
            l.poll_quiet(&mut cx).is_pending(),
            "one is still in the kernel"
        );
        l.push([Event::Eof]); // what it took is handed out first, before any new receive
        assert_eq!(wakes.get(), 2);
        assert!(!l.quiet() && l.poll_quiet(&mut cx).is_ready());
        assert_eq!(l.pop().map(tag), Some(0));
        assert!(l.poll_quiet(&mut cx).is_pending());
        l.orphan_done();
        assert_eq!(wakes.get(), 3);
        assert!(l.quiet() && l.poll_quiet(&mut cx).is_ready());
    }

    #[test]
    fn leftovers_come_out_in_order_and_wake_the_waiter_only_when_there_are_some() {
        let l = LeftoverQueue::default();
        let (waker, wakes) = counting_waker();
        l.add_orphan();
        assert!(l.poll_quiet(&mut Context::from_waker(&waker)).is_pending());
        // A dropped receive whose only event was the cancel's own (filtered out).
        l.push(std::iter::empty());
        assert_eq!(wakes.get(), 0);
        l.push([Event::Connected, Event::Eof]);
        l.push([Event::Error(Error::Cancelled)]); // the waiter was woken already
        assert_eq!(wakes.get(), 1);
        assert!(!l.is_empty());
        let order: Vec<u8> = std::iter::from_fn(|| l.pop()).map(tag).collect();
        assert_eq!(order, [1, 0, 2]);
        assert!(l.is_empty());
    }

    #[test]
    fn the_runtime_lets_go_of_lease_clones_so_the_buffer_goes_home() {
        let returns = crate::lease::ReturnQueue::default();
        let buf = crate::FixedBuf::new(crate::sys::Mmap::anonymous(4096).unwrap(), 4096, None);
        let lease = crate::Lease::new(buf, 100, 7, returns.clone());
        let sent = without_lease(Event::Sent {
            result: Ok(100),
            buf: Some(SendBuf::Leased(lease.clone())),
        });
        assert!(matches!(
            sent,
            Some(Event::Sent {
                result: Ok(100),
                buf: None
            })
        ));
        let filled = without_lease(Event::LeaseFilled {
            result: Ok(100),
            lease: Some(lease.clone()),
        });
        assert!(matches!(
            filled,
            Some(Event::LeaseFilled {
                result: Ok(100),
                lease: None
            })
        ));
        // A zero-copy member's `Returned` only says it let go: nothing to queue.
        assert!(without_lease(Event::Returned(SendBuf::Leased(lease.clone()))).is_none());
        assert_eq!(
            lease.holders(),
            1,
            "every clone the events carried was dropped"
        );
        drop(lease);
        assert_eq!(returns.borrow().front().map(|(token, _)| *token), Some(7));
        // Everything else passes unchanged.
        assert!(matches!(without_lease(Event::Eof), Some(Event::Eof)));
    }
}
