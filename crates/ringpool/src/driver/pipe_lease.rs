//! Pages leases on the ring ([`LeaseBacking::Pages`]): the leader `SPLICE`s from its
//! descriptor into the group pipe, each member `TEE`s the group pipe into its own pipe and
//! `SPLICE`s that on to its socket or file, looping until its whole share left. Every step is
//! one SQE of the op's slot, re-armed at its CQE (`EAGAIN` becomes a one-shot poll and the
//! step again), except a member's tee and its splice to a socket: the driver makes those
//! calls itself (`driver/inline.rs`) and hands their results to the same handler. The pipes,
//! their pool and the pure step decisions are in `crate::pages`.
//!
//! Ownership: these SQEs name no memory, only descriptors, and every descriptor they name is
//! held by the op's slot until the step's CQE: the source or sink `Fd`, the member's pipe, and
//! (through the op's `Rc` of its group) the group pipe. A pipe goes back to the pool (drained)
//! only after the final CQE of every op that named it, so no pipe is reused or closed while
//! the kernel may use it.
//!
//! Members of pages leases that splice to one descriptor take turns in the order they
//! started (their groups' leaders completed), so chunks leased one after another reach a
//! socket in order, whole; a member waiting for its turn (its tee done) is not an op.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use crate::error::{Error, Result};
use crate::lease::{LeaseBacking, Member, MemberKind};
use crate::pages::{self, LeaderNext, MemberNext, PagesGroup, PagesReturns, Pipe, PipePool};
use crate::probe::Features;
use crate::PipeStats;

use super::op::{errno_error, OpId, OpKind};
use super::submit::OpCqe;
use super::{Completion, Driver, Event, Fd};

/// The driver's pages-lease state.
#[derive(Default)]
pub(super) struct PagesState {
    pub(super) pool: PipePool,
    /// Groups whose last member let go ([`Event::PagesReturned`]).
    returns: PagesReturns,
    /// Per sink descriptor, its pages members in the order they started: the first splices,
    /// the others wait (parked there once their tee is done).
    sinks: HashMap<RawFd, VecDeque<SinkTurn>>,
    next_seq: u64,
    /// Splice streams (op keys) parked until a pipe comes home, in the order they asked.
    pub(super) splice_waiters: VecDeque<usize>,
    /// Ops (keys) whose step the driver runs itself next (`driver/inline.rs`), in order.
    pub(super) inline: VecDeque<usize>,
}

impl PagesState {
    /// The state of a driver whose pool holds at most `max` pipes at once.
    pub(super) fn with_max_pipes(max: usize) -> PagesState {
        PagesState {
            pool: PipePool::with_max(max),
            ..Default::default()
        }
    }
}

/// A member's place in its sink's line.
struct SinkTurn {
    seq: u64,
    /// The member, once its tee is done and it waits for its turn (not an op meanwhile).
    parked: Option<Box<PagesMemberOp>>,
}

/// A pages lease's op: the leader or one member.
pub(super) enum PagesOp {
    Leader(Box<PagesLeaderOp>),
    Member(Box<PagesMemberOp>),
}

impl PagesOp {
    /// The SQE of the op's current step.
    pub(super) fn sqe(&self) -> squeue::Entry {
        match self {
            PagesOp::Leader(op) => op.sqe(),
            PagesOp::Member(op) => op.sqe(),
        }
    }

    /// The descriptor the op works on: the leader's source, a member's sink.
    pub(super) fn fd(&self) -> &Fd {
        match self {
            PagesOp::Leader(op) => &op.fd,
            PagesOp::Member(op) => op.member.fd(),
        }
    }

    /// Whether the op's current step runs in the driver's thread (`driver/inline.rs`): a
    /// member's tee (pipe to pipe) and its splice to a socket, never the leader's splice
    /// from a file (it could wait for the disk) or a member's to a file.
    pub(super) fn runs_inline(&self) -> bool {
        let PagesOp::Member(op) = self else {
            return false;
        };
        op.inline
            && match op.step {
                Step::Tee => true,
                Step::Splice => matches!(op.member.kind, MemberKind::Send { .. }),
                Step::PollTee | Step::PollSink => false,
            }
    }

    /// Runs the current step now (`runs_inline`): its result as its CQE would give it.
    pub(super) fn run_step(&self) -> i32 {
        let PagesOp::Member(op) = self else {
            unreachable!("only members' steps run inline")
        };
        let pipe = op.pipe.as_ref().expect("a member in flight owns its pipe");
        match op.step {
            Step::Tee => pages::splice_now(op.group.read_fd(), pipe.write_fd(), op.share, true),
            _ => pages::splice_now(pipe.read_fd(), op.sink(), op.share - op.done, false),
        }
    }

    /// The members of a leader still splicing (not ops yet), for cancelling them.
    pub(super) fn waiting_members(&mut self) -> Option<&mut Vec<Member>> {
        match self {
            PagesOp::Leader(op) => Some(&mut op.members),
            PagesOp::Member(_) => None,
        }
    }
}

/// The leader: splices up to `want` bytes from `fd` into the group pipe.
pub(super) struct PagesLeaderOp {
    fd: Fd,
    /// Where in the file (`u64::MAX`: the file position, or a socket or pipe).
    offset: u64,
    /// A regular file: spliced until `want` or its end.
    regular: bool,
    pipe: Option<Pipe>,
    want: usize,
    got: usize,
    /// The current step is a poll for the source to become readable (after `EAGAIN`).
    polling: bool,
    members: Vec<Member>,
    /// One pipe per member, taken at the start so a lease that cannot get its pipes fails
    /// there; those of members cancelled meanwhile go back at the leader's completion.
    spares: Vec<Pipe>,
}

impl PagesLeaderOp {
    fn sqe(&self) -> squeue::Entry {
        let src = types::Fd(self.fd.as_raw_fd());
        if self.polling {
            return opcode::PollAdd::new(src, libc::POLLIN as u32).build();
        }
        let pipe = self
            .pipe
            .as_ref()
            .expect("a leader in flight owns its pipe");
        let off = match self.offset {
            u64::MAX => -1,
            o => (o + self.got as u64) as i64,
        };
        // `want` fits a pipe (`check_len`), far below 4 GiB.
        let len = (self.want - self.got) as u32;
        opcode::Splice::new(src, off, types::Fd(pipe.write_fd()), -1, len).build()
    }
}

/// A member's current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Duplicating the group pipe's pages into the member's pipe.
    Tee,
    /// Waiting for room in the member's pipe (a tee that said `EAGAIN`).
    PollTee,
    /// Moving the member's pipe to its sink.
    Splice,
    /// Waiting for room in the sink (a splice that said `EAGAIN`).
    PollSink,
}

/// A member: tees `share` bytes of its group's pipe into `pipe`, then splices them to its
/// sink until all of them left.
pub(super) struct PagesMemberOp {
    member: Member,
    group: Rc<PagesGroup>,
    pipe: Option<Pipe>,
    share: usize,
    done: usize,
    step: Step,
    /// Its tee has not ended yet (the group pipe is needed for it).
    teeing: bool,
    /// Its place in its sink's line.
    seq: u64,
    /// Its tee and its splice to a socket run in the driver's thread (`Ladder::inline_splice`;
    /// the socket was made non-blocking).
    inline: bool,
}

impl PagesMemberOp {
    fn sink(&self) -> RawFd {
        self.member.fd().as_raw_fd()
    }

    fn sqe(&self) -> squeue::Entry {
        let pipe = self
            .pipe
            .as_ref()
            .expect("a member in flight owns its pipe");
        let sink = types::Fd(self.sink());
        match self.step {
            Step::Tee => opcode::Tee::new(
                types::Fd(self.group.read_fd()),
                types::Fd(pipe.write_fd()),
                self.share as u32,
            )
            .build(),
            Step::PollTee => {
                opcode::PollAdd::new(types::Fd(pipe.write_fd()), libc::POLLOUT as u32).build()
            }
            Step::Splice => {
                let off = match self.member.kind {
                    MemberKind::Write { offset, .. } if offset != u64::MAX => {
                        (offset + self.done as u64) as i64
                    }
                    _ => -1,
                };
                let len = (self.share - self.done) as u32;
                opcode::Splice::new(types::Fd(pipe.read_fd()), -1, sink, off, len).build()
            }
            Step::PollSink => opcode::PollAdd::new(sink, libc::POLLOUT as u32).build(),
        }
    }

    /// The member after a splice of `res` (`stop`: it was asked to stop): the same step again,
    /// a poll for room in its sink, or its end.
    fn after_splice(&mut self, res: i32, stop: bool) -> AfterSplice {
        match pages::splice_next(res, self.done, self.share) {
            MemberNext::Done(n) => {
                self.done += n;
                AfterSplice::End(Ok(self.share))
            }
            MemberNext::Again(n) => {
                self.done += n;
                if stop {
                    AfterSplice::End(Err(self.stopped()))
                } else {
                    AfterSplice::Again
                }
            }
            MemberNext::Poll if !stop => {
                self.step = Step::PollSink;
                AfterSplice::Poll
            }
            _ if stop => AfterSplice::End(Err(self.stopped())),
            MemberNext::Failed(r) => {
                AfterSplice::End(Err(errno_error("splice (pages lease member)", r)))
            }
            MemberNext::Poll => unreachable!("stopped above"),
        }
    }

    /// Why a member that was asked to stop ended: a send that delivered part of its share is
    /// a short send (the stream has a gap), anything else is cancelled.
    fn stopped(&self) -> Error {
        match self.member.kind {
            MemberKind::Send { .. } if self.done > 0 => Error::ShortSend {
                sent: self.done,
                len: self.share,
            },
            _ => Error::Cancelled,
        }
    }
}

/// What a member does after one of its splices.
enum AfterSplice {
    /// More of its share is left: splice again.
    Again,
    /// The sink is full (`EAGAIN`): poll it for room (the step is `PollSink` now).
    Poll,
    /// The member ends with this.
    End(Result<usize>),
}

/// A member's completion: a send's (no buffer: the pages were never the user's) or a write's.
fn member_event(m: &Member, result: Result<usize>) -> Event {
    match m.kind {
        MemberKind::Send { .. } => Event::Sent { result, buf: None },
        _ => Event::Written { result },
    }
}

/// Whether the leader's descriptor is a regular file (read until the length or its end),
/// refusing what cannot splice and an offset on what has none.
fn leader_source(fd: &Fd, offset: u64) -> Result<bool> {
    let kind = match pages::file_type(fd.as_raw_fd(), "fstat (pages lease leader)")? {
        libc::S_IFREG => return Ok(true),
        libc::S_IFSOCK | libc::S_IFIFO | libc::S_IFCHR => None,
        libc::S_IFDIR => Some("a directory"),
        libc::S_IFLNK => Some("a symbolic link"),
        _ => Some("neither a file, a socket nor a pipe"),
    };
    if let Some(kind) = kind {
        return Err(Error::NotSpliceable {
            role: "leader",
            kind,
        });
    }
    if offset != u64::MAX {
        return Err(Error::InvalidArgument {
            what: "a pages lease from a socket or pipe has no offset: pass u64::MAX",
        });
    }
    Ok(false)
}

impl Driver {
    /// A **lease group** of either kind, chosen by `backing`: [`LeaseBacking::Memory`] is
    /// exactly [`Driver::lease_group`]; [`LeaseBacking::Pages`] lends page references in pipes
    /// instead of memory. The rules are the same for both:
    ///
    /// - Members start only after the leader succeeded, all at once as it completes
    ///   ([`Event::LeaseFilled`], with no `Lease` for pages: nothing exposes their bytes).
    /// - A failed leader cancels every member ([`Error::Cancelled`]) and the group ends at
    ///   once.
    /// - One member's failure does not touch the others; each reports under its own token
    ///   ([`Event::Sent`] for [`Member::send`] / [`Member::send_zc`], [`Event::Written`] for
    ///   [`Member::write`]).
    /// - A short leader read (a file shorter than asked; a socket gives what it has) lends
    ///   exactly the bytes read; a read of 0 bytes (the end) lends nothing, and members
    ///   complete with `Ok(0)`.
    /// - The group ends after its last member: [`Event::LeaseReturned`] with the buffer for
    ///   memory, [`Event::PagesReturned`] for pages (its pipes drained and back in the
    ///   driver's pool, [`Driver::pipe_stats`]).
    ///
    /// For **pages**, the leader splices from `fd` at `offset` (a regular file; `u64::MAX`:
    /// the file position) or from a socket or pipe (`offset` must be `u64::MAX`) until `len`
    /// bytes or the end of the file; every member tees them into its own pipe and splices
    /// them to its descriptor until its whole share left (a splice may move fewer bytes than
    /// asked; `EAGAIN` from a non-blocking descriptor is waited out with a poll, never taken
    /// for data). `send` and `send_zc` both splice (page references, nothing to notify);
    /// `write` splices to its file at its offset. Members of pages leases on one descriptor
    /// splice in the order they started, one at a time, so consecutive chunks arrive whole
    /// and in order; they are not ordered against other sends on that descriptor. A pages
    /// member's socket is made non-blocking (`O_NONBLOCK`): the driver runs its tees and its
    /// splices to sockets itself, as non-blocking calls ([`crate::Ladder::inline_splice`]; the
    /// kernel would run each such SQE in an io-wq worker); do not make it blocking again while
    /// the lease uses it (a full blocking socket would stall the driver). On the forced SQE path
    /// (`no-inline-splice`) it still is before 7.0: a splice into a blocking socket whose peer
    /// does not read sleeps in a kernel worker that some kernels (6.1) do not wake for a
    /// cancel.
    ///
    /// # Errors
    /// As [`Driver::lease_group`] for memory. For pages: [`Error::Unsupported`] without
    /// `IORING_OP_SPLICE`/`IORING_OP_TEE` (5.8); [`Error::NotSpliceable`] for a leader that
    /// is a directory (or another descriptor splice cannot read);
    /// [`Error::LeaseTooLong`] past the largest pipe; [`Error::InvalidArgument`] for a
    /// length of 0, an offset on a socket or pipe, or a [`Member::read_into`] member; an
    /// `Os` error when the pipes cannot be made (`F_SETPIPE_SZ`, descriptors).
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd, LeaseBacking, Member};
    /// use std::io::Read;
    /// let mut driver = Driver::new(Default::default())?;
    /// let file = Fd::from(std::os::fd::OwnedFd::from(std::fs::File::open("Cargo.toml").unwrap()));
    /// let (a, mut peer_a) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let (b, mut peer_b) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let (a, b) = (Fd::from(std::os::fd::OwnedFd::from(a)), Fd::from(std::os::fd::OwnedFd::from(b)));
    /// let members = vec![Member::send(&a, 1), Member::send(&b, 2)];
    /// driver.lease(&file, LeaseBacking::Pages { len: 16 }, 0, members, 9)?;
    /// let mut done = false;
    /// while !done {
    ///     driver.wait(None)?;
    ///     while let Some(c) = driver.pop() {
    ///         done |= matches!(c.event, Event::PagesReturned);
    ///     }
    /// }
    /// let (mut x, mut y) = ([0u8; 16], [0u8; 16]);
    /// peer_a.read_exact(&mut x).unwrap();
    /// peer_b.read_exact(&mut y).unwrap();
    /// assert_eq!(x, y); // the same 16 bytes of the page cache, spliced twice, never copied out
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn lease(
        &mut self,
        fd: &Fd,
        backing: LeaseBacking,
        offset: u64,
        members: Vec<Member>,
        token: u64,
    ) -> Result<OpId> {
        match backing {
            LeaseBacking::Memory(buf) => self.lease_group(fd, buf, offset, members, token),
            LeaseBacking::Pages { len } => self.pages_lease(fd, len, offset, members, token),
        }
    }

    /// How the pipes of pages leases are used: made, reused, held, idle.
    ///
    /// # Examples
    /// ```
    /// let driver = ringpool::Driver::new(Default::default())?;
    /// assert_eq!(driver.pipe_stats().in_use, 0);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn pipe_stats(&self) -> PipeStats {
        self.pages.pool.stats()
    }

    /// Starts a pages lease: checks, the pipes (the group's and one per member), the leader.
    fn pages_lease(
        &mut self,
        fd: &Fd,
        len: usize,
        offset: u64,
        members: Vec<Member>,
        token: u64,
    ) -> Result<OpId> {
        let f = Features::get();
        if !f.opcode(opcode::Splice::CODE) || !f.opcode(opcode::Tee::CODE) {
            return Err(Error::Unsupported {
                feature: "IORING_OP_SPLICE and IORING_OP_TEE (pages leases, 5.8)",
                kernel: f.kernel,
            });
        }
        if members.iter().any(Member::is_read_into) {
            return Err(Error::InvalidArgument {
                what: "a pages lease's members only pass pages on: read_into needs a memory lease",
            });
        }
        let regular = leader_source(fd, offset)?;
        if self.nonblocking_sinks() {
            for m in &members {
                if let crate::lease::MemberKind::Send { fd, .. } = &m.kind {
                    set_nonblocking(fd)?;
                }
            }
        }
        let page = pages::page_size();
        // Where the bytes start inside a page: at an unknown file position, assume the worst.
        let first = match offset {
            _ if !regular => 0,
            u64::MAX => page - 1,
            o => (o % page as u64) as usize,
        };
        let cap = pages::check_len(len, first, page, pages::pipe_max_size())?;
        let (pipe, pipes) = self.group_pipes(cap, members.len())?;
        let op = PagesLeaderOp {
            fd: fd.clone(),
            offset,
            regular,
            pipe: Some(pipe),
            want: len,
            got: 0,
            polling: false,
            members,
            spares: pipes,
        };
        Ok(self.start(OpKind::Pages(PagesOp::Leader(Box::new(op))), token))
    }

    /// A lease's pipes of at least `cap` bytes, all taken at its start (one that cannot have
    /// them fails there, holding none): the group pipe, and one for each of `members`. The
    /// group pipe is the smallest: every member's pipe then has a slot for each of its slots,
    /// so a tee duplicates all of them at once (a socket may fill slots partly).
    fn group_pipes(&mut self, cap: usize, members: usize) -> Result<(Pipe, Vec<Pipe>)> {
        let mut pipes = Vec::with_capacity(members + 1);
        for _ in 0..=members {
            match self.pages.pool.take(cap) {
                Ok(p) => pipes.push(p),
                Err(e) => {
                    pipes.into_iter().for_each(|p| self.pages.pool.put(p));
                    return Err(e);
                }
            }
        }
        let smallest = (0..pipes.len())
            .min_by_key(|&i| pipes[i].cap())
            .expect("at least the group pipe");
        Ok((pipes.swap_remove(smallest), pipes))
    }

    /// A CQE of a pages lease's op.
    pub(super) fn complete_pages(&mut self, c: OpCqe) {
        match &self.ops[c.key].kind {
            OpKind::Pages(PagesOp::Leader(_)) => self.complete_pages_leader(c),
            OpKind::Pages(PagesOp::Member(_)) => self.complete_pages_member(c),
            _ => unreachable!("complete_pages on a pages op"),
        }
    }

    /// A CQE of the leader: splice on, poll, or lend what the group pipe holds.
    fn complete_pages_leader(&mut self, c: OpCqe) {
        let stop = c.cancelled || self.dropping;
        let OpKind::Pages(PagesOp::Leader(op)) = &mut self.ops[c.key].kind else {
            unreachable!("a pages leader")
        };
        let next = if std::mem::take(&mut op.polling) {
            match c.res {
                r if r < 0 && op.got == 0 => LeaderNext::Failed(r),
                r if r < 0 => LeaderNext::Done(op.got),
                _ => LeaderNext::Again(op.got),
            }
        } else {
            pages::leader_next(c.res, op.got, op.want, op.regular)
        };
        let result = match next {
            LeaderNext::Again(got) if !stop => {
                op.got = got;
                return self.arm(c.key);
            }
            LeaderNext::Poll if !stop => {
                op.polling = true;
                self.pages.pool.count_poll();
                return self.arm(c.key);
            }
            // A cancelled group (or a driver going away) starts no members, even if the
            // splice itself finished before the cancel reached it.
            _ if stop => Err(Error::Cancelled),
            LeaderNext::Done(n) => Ok(n),
            LeaderNext::Failed(r) => Err(errno_error("splice (pages lease leader)", r)),
            LeaderNext::Again(_) | LeaderNext::Poll => unreachable!("stopped above"),
        };
        let OpKind::Pages(PagesOp::Leader(op)) = self.ops.remove(c.key).kind else {
            unreachable!("a pages leader")
        };
        self.pages_leader_done(c, *op, result);
    }

    /// The leader ended: members start on the group pipe's `n` bytes, or end at once.
    fn pages_leader_done(&mut self, c: OpCqe, op: PagesLeaderOp, result: Result<usize>) {
        let PagesLeaderOp {
            pipe,
            members,
            mut spares,
            ..
        } = op;
        let pipe = pipe.expect("a leader in flight owns its pipe");
        let n = match result {
            Ok(n) => n,
            Err(e) => {
                self.filled(&c, Err(e));
                for m in &members {
                    self.member_ended_early(m, m.cancelled_event());
                }
                return self.pages_group_over(c, pipe, spares);
            }
        };
        self.filled(&c, Ok(n));
        if n == 0 {
            // The end of the file: nothing to lend.
            for m in &members {
                self.member_ended_early(m, member_event(m, Ok(0)));
            }
            return self.pages_group_over(c, pipe, spares);
        }
        let returns = self.pages.returns.clone();
        let group = Rc::new(PagesGroup::new(c.token, pipe, members.len(), returns));
        for m in members {
            let pipe = spares.pop().expect("a pipe per member");
            self.start_pages_member(m, &group, pipe, n);
        }
        // Members cancelled while the leader spliced left their pipes.
        spares.into_iter().for_each(|p| self.pages.pool.put(p));
    }

    fn filled(&mut self, c: &OpCqe, result: Result<usize>) {
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event: Event::LeaseFilled {
                result,
                lease: None,
            },
            more: true,
        });
    }

    /// A member that never started ends with `event`.
    fn member_ended_early(&mut self, m: &Member, event: Event) {
        self.ready.push_back(Completion {
            token: m.token,
            op: OpId::NONE,
            event,
            more: false,
        });
    }

    /// A group that lent nothing ends: its pipes go back, then its completion.
    fn pages_group_over(&mut self, c: OpCqe, pipe: Pipe, spares: Vec<Pipe>) {
        self.pages.pool.put(pipe);
        spares.into_iter().for_each(|p| self.pages.pool.put(p));
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event: Event::PagesReturned,
            more: false,
        });
    }

    /// Starts one member's tee, and gives it its place in its sink's line.
    fn start_pages_member(&mut self, m: Member, group: &Rc<PagesGroup>, pipe: Pipe, n: usize) {
        let seq = self.pages.next_seq;
        self.pages.next_seq += 1;
        let sink = m.fd().as_raw_fd();
        let turn = SinkTurn { seq, parked: None };
        self.pages.sinks.entry(sink).or_default().push_back(turn);
        let token = m.token;
        let op = PagesMemberOp {
            member: m,
            group: group.clone(),
            pipe: Some(pipe),
            share: n,
            done: 0,
            step: Step::Tee,
            teeing: true,
            seq,
            inline: self.ladder.inline_splice,
        };
        self.start(OpKind::Pages(PagesOp::Member(Box::new(op))), token);
    }

    /// A CQE of a member's step: the next step, the same again, or its end.
    fn complete_pages_member(&mut self, c: OpCqe) {
        let stop = c.cancelled || self.dropping;
        let OpKind::Pages(PagesOp::Member(op)) = &mut self.ops[c.key].kind else {
            unreachable!("a pages member")
        };
        let end = match op.step {
            Step::PollTee | Step::PollSink if c.res < 0 => {
                let e = errno_error("poll (pages lease member)", c.res);
                Err(if stop { op.stopped() } else { e })
            }
            _ if stop && op.step != Step::Splice => Err(op.stopped()),
            Step::PollTee | Step::PollSink => {
                op.step = match op.step {
                    Step::PollTee => Step::Tee,
                    _ => Step::Splice,
                };
                return self.arm(c.key);
            }
            Step::Tee => match pages::tee_next(c.res, op.share) {
                MemberNext::Poll => {
                    op.step = Step::PollTee;
                    self.pages.pool.count_poll();
                    return self.arm(c.key);
                }
                MemberNext::Failed(r) => Err(errno_error("tee (pages lease member)", r)),
                MemberNext::Done(_) | MemberNext::Again(_) => {
                    op.teeing = false;
                    if let Some(p) = op.group.tee_ended() {
                        self.pages.pool.put(p);
                    }
                    return self.splice_in_turn(c.key);
                }
            },
            Step::Splice => match op.after_splice(c.res, stop) {
                AfterSplice::Again => return self.arm(c.key),
                AfterSplice::Poll => {
                    self.pages.pool.count_poll();
                    return self.arm(c.key);
                }
                AfterSplice::End(result) => result,
            },
        };
        let OpKind::Pages(PagesOp::Member(op)) = self.ops.remove(c.key).kind else {
            unreachable!("a pages member")
        };
        self.finish_pages_member(op, c.id, end, true);
    }

    /// A member whose tee is done splices now if it is first in its sink's line, else it
    /// leaves the table and waits there for its turn.
    fn splice_in_turn(&mut self, key: usize) {
        let OpKind::Pages(PagesOp::Member(op)) = &mut self.ops[key].kind else {
            unreachable!("a pages member")
        };
        op.step = Step::Splice;
        let (sink, seq) = (op.sink(), op.seq);
        let line = self
            .pages
            .sinks
            .get_mut(&sink)
            .expect("a member has its line");
        if line.front().is_some_and(|t| t.seq == seq) {
            return self.arm(key);
        }
        let OpKind::Pages(PagesOp::Member(op)) = self.ops.remove(key).kind else {
            unreachable!("a pages member")
        };
        let turn = line.iter_mut().find(|t| t.seq == seq);
        turn.expect("a member is in its sink's line").parked = Some(op);
    }

    /// A member ended: its pipe goes home, its completion is queued, its sink's next member
    /// gets its turn (when `in_line`: a member taken off the line already has none).
    fn finish_pages_member(
        &mut self,
        mut op: Box<PagesMemberOp>,
        id: OpId,
        result: Result<usize>,
        in_line: bool,
    ) {
        if std::mem::take(&mut op.teeing) {
            if let Some(p) = op.group.tee_ended() {
                self.pages.pool.put(p);
            }
        }
        if let Some(p) = op.pipe.take() {
            self.pages.pool.put(p);
        }
        self.ready.push_back(Completion {
            token: op.member.token,
            op: id,
            event: member_event(&op.member, result),
            more: false,
        });
        if in_line {
            // Before `op` (maybe the sink's last `Fd`) goes: the line is keyed by its number.
            self.leave_sink_line(op.sink(), op.seq);
        }
        // Dropping the last member's `Rc` of its group reports the group's end.
        drop(op);
    }

    /// Member `seq` leaves `sink`'s line; if it was first, the next one's turn begins.
    fn leave_sink_line(&mut self, sink: RawFd, seq: u64) {
        let Some(line) = self.pages.sinks.get_mut(&sink) else {
            return;
        };
        let was_first = line.front().is_some_and(|t| t.seq == seq);
        line.retain(|t| t.seq != seq);
        if was_first {
            self.next_turn(sink);
        } else if line.is_empty() {
            self.pages.sinks.remove(&sink);
        }
    }

    /// The first member of `sink`'s line splices, if its tee is done (else it will when it
    /// is). While the driver goes away, waiting members end cancelled instead.
    fn next_turn(&mut self, sink: RawFd) {
        loop {
            let Some(line) = self.pages.sinks.get_mut(&sink) else {
                return;
            };
            let Some(first) = line.front_mut() else {
                self.pages.sinks.remove(&sink);
                return;
            };
            let Some(op) = first.parked.take() else {
                return;
            };
            if !self.dropping {
                let token = op.member.token;
                self.start(OpKind::Pages(PagesOp::Member(op)), token);
                return;
            }
            line.pop_front();
            self.finish_pages_member(op, OpId::NONE, Err(Error::Cancelled), false);
        }
    }

    /// Members waiting for their sink's turn that `which` picks end cancelled (they are not
    /// ops: cancelling by token or descriptor reaches them here).
    pub(super) fn drop_parked_pages_members(&mut self, which: &impl Fn(&Member) -> bool) {
        let mut ended = Vec::new();
        for line in self.pages.sinks.values_mut() {
            for turn in line.iter_mut() {
                if turn.parked.as_ref().is_some_and(|op| which(&op.member)) {
                    ended.extend(turn.parked.take());
                }
            }
        }
        // A parked member is never first in its line (the first one splices), so leaving it
        // starts nobody.
        for op in ended {
            self.finish_pages_member(op, OpId::NONE, Err(Error::Cancelled), true);
        }
    }

    /// Closes the pool's idle pipes once none was used for a while (`PipePool::trim`).
    pub(super) fn trim_pipes(&mut self) {
        if self.pages.pool.has_spares() {
            self.pages.pool.trim(std::time::Instant::now());
        }
    }

    /// Pages groups whose last member let go: their pipes go home, their completions go out.
    pub(super) fn collect_pages_returns(&mut self) {
        loop {
            let Some((token, pipe)) = self.pages.returns.borrow_mut().pop_front() else {
                return;
            };
            if let Some(p) = pipe {
                self.pages.pool.put(p);
            }
            self.ready.push_back(Completion {
                token,
                op: OpId::NONE,
                event: Event::PagesReturned,
                more: false,
            });
        }
    }
}

impl Driver {
    /// Whether the sockets pages members and splice streams splice into are made
    /// non-blocking: always where the driver runs those splices itself
    /// ([`crate::Ladder::inline_splice`], the default: a splice into a blocking socket would
    /// stall the driver's thread); with them in io-wq, before 7.0 (6.1 needs it, below).
    pub(super) fn nonblocking_sinks(&self) -> bool {
        self.ladder.inline_splice || crate::probe::Features::get().kernel.major < 7
    }
}

/// Makes a pages member's (or a splice stream's) sink non-blocking. Where splices run in the
/// driver's thread, this keeps a full socket from stalling it. Where they are SQEs, the kernel runs every
/// splice in an io-wq worker; a splice into a blocking socket whose peer does not read sleeps
/// there, and on some kernels (6.1, seen in the kernel matrix) cancelling the op does not wake
/// it, so the lease (or stream) could never end. On a non-blocking socket the splice says `EAGAIN` instead, which the
/// member waits out with a poll, and a poll is always cancellable. (io_uring's own sends and
/// receives behave the same on blocking and non-blocking sockets.)
pub(super) fn set_nonblocking(fd: &Fd) -> Result<()> {
    let flags = crate::sys::syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))
        .map_err(Error::os("fcntl(F_GETFL) on a splice sink"))?;
    if flags & libc::O_NONBLOCK == 0 {
        crate::sys::syscall!(fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK
        ))
        .map_err(Error::os("fcntl(F_SETFL, O_NONBLOCK) on a splice sink"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd_of(f: std::fs::File) -> Fd {
        Fd::from(std::os::fd::OwnedFd::from(f))
    }

    #[test]
    fn a_leader_on_a_directory_is_refused_as_not_spliceable() {
        let dir = fd_of(std::fs::File::open(std::env::temp_dir()).unwrap());
        match leader_source(&dir, 0) {
            Err(Error::NotSpliceable { role, kind }) => {
                assert_eq!((role, kind), ("leader", "a directory"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_file_leader_reads_at_its_offset_a_socket_or_pipe_has_none() {
        let file = fd_of(tempfile::tempfile().unwrap());
        assert!(leader_source(&file, 4096).unwrap(), "a regular file");
        assert!(leader_source(&file, u64::MAX).unwrap());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let sock = Fd::from(std::os::fd::OwnedFd::from(a));
        assert!(!leader_source(&sock, u64::MAX).unwrap());
        assert!(matches!(
            leader_source(&sock, 0),
            Err(Error::InvalidArgument { .. })
        ));
        let (r, _w) = std::io::pipe().unwrap();
        let pipe = Fd::from(std::os::fd::OwnedFd::from(r));
        assert!(!leader_source(&pipe, u64::MAX).unwrap());
    }

    /// A member sending a share of 100 bytes on a socket (also returned), splicing.
    fn splicing_member() -> (PagesMemberOp, Fd) {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let sock = Fd::from(std::os::fd::OwnedFd::from(a));
        let mut pool = PipePool::default();
        let pipe = pool.take(4096).unwrap();
        let group = Rc::new(PagesGroup::new(1, pipe, 1, PagesReturns::default()));
        let op = PagesMemberOp {
            member: Member::send(&sock, 2),
            group,
            pipe: None,
            share: 100,
            done: 0,
            step: Step::Splice,
            teeing: false,
            seq: 0,
            inline: true,
        };
        (op, sock)
    }

    #[test]
    fn a_member_stopped_part_way_is_a_short_send_or_cancelled() {
        let (mut op, sock) = splicing_member();
        assert!(matches!(op.stopped(), Error::Cancelled));
        op.done = 40;
        assert!(matches!(
            op.stopped(),
            Error::ShortSend { sent: 40, len: 100 }
        ));
        op.member = Member::write(&sock, 0, 2);
        assert!(matches!(op.stopped(), Error::Cancelled));
    }

    #[test]
    fn a_member_s_splice_moves_it_on_waits_for_room_or_ends_it() {
        let (mut op, _sock) = splicing_member();
        assert!(matches!(op.after_splice(30, false), AfterSplice::Again));
        assert_eq!(op.done, 30);
        assert!(matches!(
            op.after_splice(-libc::EAGAIN, false),
            AfterSplice::Poll
        ));
        assert_eq!(op.step, Step::PollSink);
        op.step = Step::Splice;
        // Asked to stop: a splice that moved some ends it as a short send of what left.
        assert!(matches!(
            op.after_splice(20, true),
            AfterSplice::End(Err(Error::ShortSend { sent: 50, len: 100 }))
        ));
        assert!(matches!(
            op.after_splice(-libc::EAGAIN, true),
            AfterSplice::End(Err(Error::ShortSend { .. }))
        ));
        assert!(matches!(
            op.after_splice(50, false),
            AfterSplice::End(Ok(100))
        ));
        assert!(matches!(
            op.after_splice(-libc::EPIPE, false),
            AfterSplice::End(Err(_))
        ));
    }
}
