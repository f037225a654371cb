//! The events of a multishot receive, shared by the stream types of TCP
//! ([`RecvStream`](super::RecvStream)) and UDP ([`DatagramStream`](super::DatagramStream)):
//! the socket's leftovers first, then the op's own, and a receive that starts only once no
//! dropped receive of the socket is in the kernel.

use super::op::{Leftovers, Op};
use crate::{Error, Event, Result};

/// The events of a multishot receive, for its stream type: the socket's leftovers first, then
/// the op's own; end of stream and errors end it.
pub(super) struct MultishotEvents {
    /// The receive: started at once, or (a dropped receive of the socket still in the kernel)
    /// by the first `next` after that one ended.
    op: Result<Op, StartRecv>,
    ended: bool,
    leftovers: Leftovers,
}

/// Starts a stream's receive (its socket, group and mode are in the closure).
pub(super) type StartRecv = Box<dyn FnOnce() -> Result<Op>>;

impl MultishotEvents {
    /// The events of the receive `start` makes: started now, unless a dropped receive of the
    /// socket is still in the kernel. Two receives armed on one socket can hand out its bytes
    /// out of order (the later one takes a piece, the dropped one the next, and the dropped
    /// one's piece is handed out first as a leftover), so the new one waits for it.
    pub(super) fn new(leftovers: &Leftovers, start: StartRecv) -> Result<MultishotEvents> {
        let op = if leftovers.quiet() {
            Ok(start()?)
        } else {
            Err(start)
        };
        Ok(MultishotEvents {
            op,
            ended: false,
            leftovers: leftovers.clone(),
        })
    }

    /// Starts the receive if its time has come (`quiet`: no dropped receive of the socket is
    /// in the kernel); false while it must wait.
    fn started(&mut self, quiet: bool) -> Result<bool> {
        if self.op.is_err() {
            if !quiet {
                return Ok(false);
            }
            let start = std::mem::replace(&mut self.op, Err(Box::new(|| Err(Error::Cancelled))));
            let Err(start) = start else {
                unreachable!("checked above")
            };
            match start() {
                Ok(op) => self.op = Ok(op),
                Err(e) => {
                    self.ended = true;
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    pub(super) async fn next<T>(&mut self, item: fn(Event) -> Option<T>) -> Result<Option<T>> {
        if self.ended {
            return Ok(None);
        }
        if self.op.is_err() {
            std::future::poll_fn(|cx| self.leftovers.poll_quiet(cx)).await;
            if let Some(e) = self.leftovers.pop() {
                return self.item(e, item);
            }
        }
        self.started(true)?;
        let Ok(op) = &self.op else {
            unreachable!("started when quiet")
        };
        let event = std::future::poll_fn(|cx| op.poll_with(cx, &self.leftovers)).await;
        self.item(event, item)
    }

    pub(super) fn try_next<T>(&mut self, item: fn(Event) -> Option<T>) -> Result<Option<T>> {
        if self.ended {
            return Ok(None);
        }
        if let Some(e) = self.leftovers.pop() {
            return self.item(e, item);
        }
        let quiet = self.leftovers.quiet();
        if !self.started(quiet)? {
            return Ok(None);
        }
        let Ok(op) = &self.op else {
            unreachable!("started above")
        };
        match op.try_next() {
            Some(e) => self.item(e, item),
            None => Ok(None),
        }
    }

    fn item<T>(&mut self, event: Event, item: fn(Event) -> Option<T>) -> Result<Option<T>> {
        match event {
            Event::Eof => {
                self.ended = true;
                Ok(None)
            }
            Event::Error(e) => {
                self.ended = true;
                Err(e)
            }
            other => match item(other) {
                Some(t) => Ok(Some(t)),
                None => unreachable!("a receive stream got another op's event"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    fn connected(e: Event) -> Option<()> {
        matches!(e, Event::Connected).then_some(())
    }

    /// A start that counts its calls and fails (no runtime is needed to see when it is called).
    fn failing_start(calls: &Rc<Cell<u32>>) -> StartRecv {
        let calls = calls.clone();
        Box::new(move || {
            calls.set(calls.get() + 1);
            Err(Error::RuntimeGone)
        })
    }

    #[test]
    fn a_stream_starts_its_receive_only_once_no_dropped_receive_is_in_the_kernel() {
        let calls = Rc::new(Cell::new(0));
        let quiet = Leftovers::default();
        assert!(MultishotEvents::new(&quiet, failing_start(&calls)).is_err());
        assert_eq!(calls.get(), 1, "a quiet socket's stream starts at once");

        let leftovers = Leftovers::default();
        leftovers.add_orphan();
        let mut events = MultishotEvents::new(&leftovers, failing_start(&calls)).unwrap();
        assert!(matches!(events.try_next(connected), Ok(None)));
        leftovers.push([Event::Connected]); // what the dropped receive took comes first
        assert!(matches!(events.try_next(connected), Ok(Some(()))));
        assert_eq!(
            calls.get(),
            1,
            "not started while the dropped receive is in the kernel"
        );
        leftovers.orphan_done();
        assert!(matches!(
            events.try_next(connected),
            Err(Error::RuntimeGone)
        ));
        assert_eq!(calls.get(), 2);
        // A start that failed ended the stream: nothing more, and no second start.
        assert!(matches!(events.try_next(connected), Ok(None)));
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn end_of_stream_or_an_error_ends_a_stream_for_good() {
        let calls = Rc::new(Cell::new(0));
        for (last, err) in [(Event::Eof, false), (Event::Error(Error::Cancelled), true)] {
            let leftovers = Leftovers::default();
            leftovers.add_orphan();
            let mut events = MultishotEvents::new(&leftovers, failing_start(&calls)).unwrap();
            leftovers.push([last, Event::Connected]);
            leftovers.orphan_done();
            assert_eq!(events.try_next(connected).is_err(), err);
            assert!(matches!(events.try_next(connected), Ok(None)));
            assert!(!leftovers.is_empty(), "nothing after the end is handed out");
        }
        assert_eq!(calls.get(), 0);
    }
}
