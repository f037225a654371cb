//! Splice streams ([`Driver::splice_stream`]): bytes move from one descriptor to another
//! through a pipe of the driver's pool, as page references, never through user memory. Each
//! chunk is a poll for data (no pipe held while the source is idle), a `SPLICE` of what is
//! there into a pipe taken from the pool, and `SPLICE`s of the pipe to the sink until it is
//! empty (an `EAGAIN` from a non-blocking sink waits for a poll); then the pipe goes home and
//! the next chunk begins. Every step is one SQE of the op's slot, re-armed at its CQE, or,
//! for a splice between a pipe and a socket or pipe, a call the driver makes itself
//! (`driver/inline.rs`) whose result comes to the same handler. A chunk still begins with a
//! poll even where its splice in runs in the driver's thread: each chunk's poll completion
//! is where streams take turns (at the driver's pipes, and at the driver's thread: a stream
//! whose source always has more would otherwise splice on without the driver reaping).
//!
//! Ownership: these SQEs name no memory, only descriptors: the source and sink `Fd`s and the
//! pipe, all held by the op's slot until the step's CQE. The pipe goes back to the pool
//! (drained) only after the CQE of the last splice that named it.

use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};

use crate::error::{Error, Result};
use crate::pages::{Pipe, PipePool};

use super::op::{errno_error, OpId, OpKind, SlotState};
use super::submit::OpCqe;
use super::{Completion, Driver, Event, Fd};

/// A splice stream's current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Waiting for the source to have data (or its end).
    PollIn,
    /// Moving what the source has into the pipe.
    In,
    /// Moving the pipe's bytes to the sink.
    Out,
    /// Waiting for room in the sink (a splice out that said `EAGAIN`).
    PollOut,
}

/// A splice stream in flight.
pub(super) struct SpliceOp {
    pub(super) from: Fd,
    to: Fd,
    /// Taken when the source has data, home again once it is empty.
    pipe: Option<Pipe>,
    /// The pipe size asked for.
    pipe_bytes: usize,
    /// Bytes in the pipe, still to go to the sink.
    held: usize,
    step: Step,
    /// The splice in (out) runs in the driver's thread (`driver/inline.rs`): the source
    /// (sink) is a socket or a pipe, made non-blocking, not a file that could wait for the disk.
    inline_in: bool,
    inline_out: bool,
}

impl SpliceOp {
    pub(super) fn sqe(&self) -> squeue::Entry {
        let (from, to) = (
            types::Fd(self.from.as_raw_fd()),
            types::Fd(self.to.as_raw_fd()),
        );
        let pipe = || self.pipe.as_ref().expect("a splice step owns its pipe");
        match self.step {
            Step::PollIn => opcode::PollAdd::new(from, libc::POLLIN as u32).build(),
            Step::PollOut => opcode::PollAdd::new(to, libc::POLLOUT as u32).build(),
            Step::In => {
                let p = pipe();
                // A pipe is at most /proc/sys/fs/pipe-max-size, far below 4 GiB.
                opcode::Splice::new(from, -1, types::Fd(p.write_fd()), -1, p.cap() as u32).build()
            }
            Step::Out => {
                let p = pipe();
                opcode::Splice::new(types::Fd(p.read_fd()), -1, to, -1, self.held as u32).build()
            }
        }
    }

    /// Whether the current step runs in the driver's thread (`driver/inline.rs`).
    pub(super) fn runs_inline(&self) -> bool {
        match self.step {
            Step::In => self.inline_in,
            Step::Out => self.inline_out,
            Step::PollIn | Step::PollOut => false,
        }
    }

    /// Runs the current step now (`runs_inline`): its result as its CQE would give it.
    pub(super) fn run_step(&self) -> i32 {
        let p = self.pipe.as_ref().expect("a splice step owns its pipe");
        match self.step {
            Step::In => {
                crate::pages::splice_now(self.from.as_raw_fd(), p.write_fd(), p.cap(), false)
            }
            _ => crate::pages::splice_now(p.read_fd(), self.to.as_raw_fd(), self.held, false),
        }
    }

    /// The sink, which a cancel by descriptor also reaches.
    pub(super) fn sink(&self) -> &Fd {
        &self.to
    }
}

/// What a splice stream's step result means.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Arm this step.
    Arm(Step),
    /// `n` bytes reached the sink (a progress completion), then arm the step.
    Moved(usize, Step),
    /// The source ended and everything it gave reached the sink.
    Eof,
    /// The stream failed: the errno, and which step.
    Failed(i32, &'static str),
}

/// The step after a result: a pure function of the step, the result and what the pipe
/// holds, so the rules have unit tests.
fn next(step: Step, res: i32, held: usize) -> Next {
    match step {
        // A poll's result is the ready mask; an error (or hang-up without data) shows in the
        // splice that follows.
        Step::PollIn if res >= 0 => Next::Arm(Step::In),
        Step::PollOut if res >= 0 => Next::Arm(Step::Out),
        Step::PollIn | Step::PollOut => Next::Failed(-res, "poll (splice stream)"),
        Step::In if res > 0 => Next::Arm(Step::Out),
        Step::In if res == 0 => Next::Eof,
        Step::In if res == -libc::EAGAIN => Next::Arm(Step::PollIn),
        Step::In => Next::Failed(-res, "splice from the source (splice stream)"),
        Step::Out if res > 0 && (res as usize) < held => Next::Moved(res as usize, Step::Out),
        Step::Out if res > 0 => Next::Moved(res as usize, Step::PollIn),
        Step::Out if res == -libc::EAGAIN => Next::Arm(Step::PollOut),
        // The pipe held bytes, so a splice of none means the sink took none and never will.
        Step::Out if res == 0 => Next::Failed(libc::EPIPE, "splice to the sink (splice stream)"),
        Step::Out => Next::Failed(-res, "splice to the sink (splice stream)"),
    }
}

impl Driver {
    /// Moves every byte `from` gives to `to` without copying it through user memory: through
    /// a pipe of the driver's pool of at least `pipe_bytes` (`SPLICE` in, `SPLICE` out: page
    /// references), until `from` ends. For a proxy between two sockets, one stream per
    /// direction. At least one of `from` and `to` must be a socket or a pipe (`splice(2)`).
    ///
    /// Completions: [`Event::Spliced`] each time bytes reached `to` (in order, `more` set),
    /// then [`Event::Eof`] once `from` ended and all of it reached `to`, or [`Event::Error`]
    /// ([`Error::Cancelled`] after [`Driver::cancel`], [`Driver::cancel_fd`] of either
    /// descriptor, or [`Driver::cancel_token`]; bytes taken from `from` that had not reached
    /// `to` by then are dropped: the `Spliced` completions say what arrived). The stream holds
    /// a pipe only while a chunk is on its way (an idle source holds a poll, no pipe and no
    /// kernel worker), and its own clones of both descriptors until its last completion.
    ///
    /// Sockets and pipes among `from` and `to` are made non-blocking (`O_NONBLOCK`): the
    /// driver runs their splices itself as non-blocking calls, polling on `EAGAIN`
    /// ([`crate::Ladder::inline_splice`]; the kernel would run each such SQE in an io-wq
    /// worker). A file's side stays an SQE. On the forced SQE path (`no-inline-splice`) the
    /// sink still is made non-blocking before 7.0: on some kernels (6.1) cancelling does not
    /// wake a splice sleeping on a full blocking socket (the same rule as pages leases' members).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a `pipe_bytes` of 0 or above the largest pipe
    /// (`/proc/sys/fs/pipe-max-size`, in [`Driver::pipe_stats`]). A chunk that finds no pipe
    /// waits for one while others are in use ([`DriverConfig::max_pipes`]); a pipe that cannot
    /// be had with none in use ends the stream with that error.
    ///
    /// [`DriverConfig::max_pipes`]: crate::DriverConfig::max_pipes
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(driver: &mut ringpool::Driver, client: &ringpool::Fd, upstream: &ringpool::Fd) -> ringpool::Result<()> {
    /// use ringpool::Event;
    /// driver.splice_stream(client, upstream, 64 << 10, 1)?;
    /// driver.splice_stream(upstream, client, 64 << 10, 2)?;
    /// driver.wait(None)?;
    /// while let Some(c) = driver.pop() {
    ///     match c.event {
    ///         Event::Spliced { bytes } => println!("{bytes} bytes forwarded ({})", c.token),
    ///         Event::Eof => println!("direction {} ended", c.token),
    ///         other => println!("{other:?}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn splice_stream(
        &mut self,
        from: &Fd,
        to: &Fd,
        pipe_bytes: usize,
        token: u64,
    ) -> Result<OpId> {
        if pipe_bytes == 0 || pipe_bytes > crate::pages::pipe_max_size() {
            return Err(Error::InvalidArgument {
                what: "a splice stream's pipe must hold 1 byte to /proc/sys/fs/pipe-max-size",
            });
        }
        let inline = self.ladder.inline_splice;
        let (inline_in, inline_out) = (
            inline && socket_or_pipe(from)?,
            inline && socket_or_pipe(to)?,
        );
        if inline_in {
            super::pipe_lease::set_nonblocking(from)?;
        }
        // (Always where the driver runs splices itself, so whenever `inline_out`.)
        if self.nonblocking_sinks() {
            super::pipe_lease::set_nonblocking(to)?;
        }
        let op = SpliceOp {
            from: from.clone(),
            to: to.clone(),
            pipe: None,
            pipe_bytes,
            held: 0,
            step: Step::PollIn,
            inline_in,
            inline_out,
        };
        Ok(self.start(OpKind::Splice(Box::new(op)), token))
    }

    /// A CQE of a splice stream's step: the next step, progress, or its end.
    pub(super) fn complete_splice(&mut self, c: OpCqe) {
        let stop = c.cancelled || self.dropping;
        let OpKind::Splice(op) = &mut self.ops[c.key].kind else {
            unreachable!("a splice stream")
        };
        if op.step == Step::In && c.res > 0 {
            // The bytes now in the pipe. A splice in is a stream receive for receive
            // coalescing: while chunks come in small, waits hold, so the next splices carry more.
            op.held = c.res as usize;
            if let (Some(co), Some(p)) = (&mut self.coalescing, &op.pipe) {
                co.received(op.held, p.cap());
            }
        }
        let end = match next(op.step, c.res, op.held) {
            Next::Moved(n, to) => {
                op.held -= n;
                self.ready.push_back(Completion {
                    token: c.token,
                    op: c.id,
                    event: Event::Spliced { bytes: n },
                    more: true,
                });
                if stop {
                    Err(Error::Cancelled)
                } else {
                    return self.splice_step(c, to);
                }
            }
            _ if stop => Err(Error::Cancelled),
            Next::Arm(to) => return self.splice_step(c, to),
            Next::Eof => Ok(()),
            Next::Failed(errno, what) => Err(errno_error(what, -errno)),
        };
        let event = match end {
            Ok(()) => Event::Eof,
            Err(e) => Event::Error(e),
        };
        self.finish_splice(c.key, event);
    }

    /// Arms the stream's next step: a pipe is taken for a splice in (and an empty one goes
    /// home before a poll for more); `EAGAIN` steps are counted as the pool's polls.
    fn splice_step(&mut self, c: OpCqe, to: Step) {
        let OpKind::Splice(op) = &mut self.ops[c.key].kind else {
            unreachable!("a splice stream")
        };
        op.step = to;
        match to {
            Step::PollIn => {
                if op.pipe.is_some() && op.held == 0 {
                    let p = op.pipe.take().expect("checked");
                    self.pages.pool.put(p);
                }
                if c.res == -libc::EAGAIN {
                    self.pages.pool.count_poll();
                }
            }
            Step::PollOut => self.pages.pool.count_poll(),
            Step::In if op.pipe.is_none() => match self.pages.pool.take(op.pipe_bytes) {
                Ok(p) => op.pipe = Some(p),
                Err(e) if waits_for_a_pipe(&self.pages.pool, &e) => {
                    self.pages.pool.count_wait();
                    self.ops[c.key].state = SlotState::Parked;
                    self.pages.splice_waiters.push_back(c.key);
                    return;
                }
                Err(e) => return self.finish_splice(c.key, Event::Error(e)),
            },
            Step::In | Step::Out => {}
        }
        self.arm(c.key)
    }

    /// Ends the stream in slot `key` with its last completion, `event`; its pipe goes home.
    fn finish_splice(&mut self, key: usize, event: Event) {
        let slot = self.ops.remove(key);
        let OpKind::Splice(mut op) = slot.kind else {
            unreachable!("a splice stream")
        };
        if let Some(p) = op.pipe.take() {
            self.pages.pool.put(p);
        }
        self.ready.push_back(Completion {
            token: slot.token,
            op: OpId::new(key, slot.gen, self.ring_id),
            event,
            more: false,
        });
    }

    /// Streams waiting for a pipe take the ones that came home, in the order they asked, and
    /// splice in (at `flush`, before the driver enters the kernel).
    pub(super) fn rearm_splice_waiters(&mut self) {
        while let Some(&key) = self.pages.splice_waiters.front() {
            let OpKind::Splice(op) = &self.ops[key].kind else {
                unreachable!("a waiting splice stream")
            };
            match self.pages.pool.take(op.pipe_bytes) {
                Ok(p) => {
                    self.pages.splice_waiters.pop_front();
                    let OpKind::Splice(op) = &mut self.ops[key].kind else {
                        unreachable!("a waiting splice stream")
                    };
                    op.pipe = Some(p);
                    self.arm(key);
                }
                Err(e) if waits_for_a_pipe(&self.pages.pool, &e) => return,
                Err(e) => {
                    self.pages.splice_waiters.pop_front();
                    self.finish_splice(key, Event::Error(e));
                }
            }
        }
    }
}

/// Whether `fd` is a socket or a pipe (whose splices can be made non-blocking), not a file.
fn socket_or_pipe(fd: &Fd) -> Result<bool> {
    let kind = crate::pages::file_type(fd.as_raw_fd(), "fstat (splice stream)")?;
    Ok(matches!(kind, libc::S_IFSOCK | libc::S_IFIFO))
}

/// Whether a chunk that could not have a pipe (`e`) waits for one: another stream's pipe comes
/// home, and the shortage is one that ends: the bound (`max_pipes`), descriptors (`EMFILE`,
/// `ENFILE`), or pipe memory (`ENOMEM`; `EPERM` from `F_SETPIPE_SZ` past the user's pipe
/// pages).
fn waits_for_a_pipe(pool: &PipePool, e: &Error) -> bool {
    let ends = matches!(e, Error::PipesExhausted { .. })
        || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EPERM)
        );
    pool.in_use() > 0 && ends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_leads_to_its_splice_and_a_failed_poll_ends_the_stream() {
        assert_eq!(next(Step::PollIn, 1, 0), Next::Arm(Step::In));
        assert_eq!(next(Step::PollOut, 4, 9), Next::Arm(Step::Out));
        assert_eq!(
            next(Step::PollIn, -libc::ECANCELED, 0),
            Next::Failed(libc::ECANCELED, "poll (splice stream)")
        );
    }

    #[test]
    fn a_splice_in_fills_the_pipe_ends_at_eof_and_waits_on_eagain() {
        assert_eq!(next(Step::In, 4096, 0), Next::Arm(Step::Out));
        assert_eq!(next(Step::In, 0, 0), Next::Eof);
        assert_eq!(next(Step::In, -libc::EAGAIN, 0), Next::Arm(Step::PollIn));
        assert!(matches!(
            next(Step::In, -libc::ECONNRESET, 0),
            Next::Failed(libc::ECONNRESET, _)
        ));
    }

    #[test]
    fn a_splice_out_goes_on_until_the_pipe_is_empty_and_none_taken_is_an_error() {
        assert_eq!(next(Step::Out, 100, 300), Next::Moved(100, Step::Out));
        assert_eq!(next(Step::Out, 300, 300), Next::Moved(300, Step::PollIn));
        assert_eq!(
            next(Step::Out, -libc::EAGAIN, 300),
            Next::Arm(Step::PollOut)
        );
        assert!(matches!(
            next(Step::Out, 0, 300),
            Next::Failed(libc::EPIPE, _)
        ));
        assert!(matches!(
            next(Step::Out, -libc::EPIPE, 300),
            Next::Failed(libc::EPIPE, _)
        ));
    }
}
