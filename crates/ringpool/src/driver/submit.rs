//! The ring loop: the one place SQEs are pushed ([`Driver::push`], with the safety argument
//! every op relies on), `io_uring_enter`, waiting, the flush before each enter, reaping, and the
//! two routers: [`Driver::arm`] builds an op's SQE with its capability's builder, and
//! [`Driver::dispatch`] hands each CQE to its capability's handler. Neither knows what an op
//! does; each capability file (`recv.rs`, `send.rs`, ...) holds its ops' SQEs and completions.

use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};

use crate::error::{Error, Result};
use crate::fixed::{FixedTable, TAG_KEY};

use super::op::{user_data, OpId, OpKind, SlotState, IGNORED};
use super::ring::Cqe;
use super::socket::accept_sqe;
use super::{Completion, Driver};

/// How soon a wait comes back to re-arm parked receives whose group has buffers for them, when
/// the share it re-armed first does not complete.
const REARM_PACE: Duration = Duration::from_millis(1);

/// A CQE of a live op of ours, with what its slot said when it came: what every capability's
/// completion handler gets from [`Driver::dispatch`].
#[derive(Debug, Clone, Copy)]
pub(super) struct OpCqe {
    /// The op's slot.
    pub(super) key: usize,
    /// The op's id, for the user's completion.
    pub(super) id: OpId,
    /// The user's token.
    pub(super) token: u64,
    /// The CQE's result.
    pub(super) res: i32,
    /// The CQE's flags.
    pub(super) flags: u32,
    /// Whether the op was asked to stop before this CQE was dispatched.
    pub(super) cancelled: bool,
    /// The second half of a 32-byte CQE (zero-copy receive: where the bytes are), else zeros.
    pub(super) big: [u64; 2],
}

impl OpCqe {
    /// Whether the kernel will post more CQEs for this op (`IORING_CQE_F_MORE`).
    pub(super) fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// An `io_uring_enter`'s outcome: timeouts, interruptions and a busy or full ring are not
/// errors (the caller's loop goes on).
fn enter_result(res: std::io::Result<usize>) -> Result<()> {
    match res {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::Os {
            op: "io_uring_enter",
            source: e,
        }),
    }
}

impl Driver {
    /// Pushes an SQE, submitting first if the queue is full. The only place an SQE enters the
    /// ring: every capability's SQE gets here, through [`Driver::arm`], [`Driver::arm_send`] or
    /// [`Driver::start_internal`], or (cancels, timeout removals: no memory) directly.
    pub(super) fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every SQE pushed names only memory owned by an op slot (or none), and that
            // slot lives until the op's final CQE: the driver's ownership rule (`driver/mod.rs`).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.stats.sqes += 1;
                return;
            }
            // The queue is full: hand what is there to the kernel and retry.
            self.submit_queued();
        }
    }

    /// Hands the queued SQEs to the kernel without waiting or reaping.
    pub(super) fn submit_queued(&mut self) {
        self.stats.enters += 1;
        while let Err(e) = self.ring.submit() {
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The completion queue is full: make room, then submit again.
                Some(libc::EBUSY | libc::EAGAIN) => self.reap(),
                _ => panic!("io_uring_enter failed while submitting: {e}"),
            }
        }
    }

    /// Calls `io_uring_enter`: submits, runs deferred task work and waits for `want` CQEs.
    pub(super) fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<()> {
        self.stats.enters += 1;
        let res = match timeout {
            Some(t) if want > 0 && self.ladder.ext_arg => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            Some(t) if want > 0 => {
                // No timeout argument (before 5.11, or forced): a timeout op bounds the wait
                // (one per `wait`, however often it enters), removed when `wait` returns if
                // something else woke it first.
                if self.wait_timeout.is_none() {
                    let ts = Box::new(types::Timespec::from(t));
                    let sqe = opcode::Timeout::new(&*ts).build();
                    let ud = self.start_internal(OpKind::Timeout { _ts: ts }, sqe);
                    self.wait_timeout = Some(ud);
                }
                self.ring.submit_and_wait(want)
            }
            _ if want == 0 && self.ladder.defer_taskrun => {
                // Deferred task work runs only on an enter with GETEVENTS, even without waiting.
                let n = self.ring.submission().len() as u32;
                // SAFETY: no argument is passed; the SQEs in the queue obey the ownership rule.
                unsafe { self.ring.submitter().enter::<libc::sigset_t>(n, 0, 1, None) }
            }
            _ => self.ring.submit_and_wait(want),
        };
        enter_result(res)
    }

    /// Submits queued work and dispatches CQEs that are already there, without waiting.
    pub fn submit(&mut self) -> Result<usize> {
        self.flush()?;
        self.enter(0, None)?;
        self.reap();
        self.run_inline_steps();
        Ok(self.ready.len())
    }

    /// Submits queued work (re-arming receives whose groups were refilled, providing returned
    /// legacy buffers), waits until at least one CQE arrives or `timeout` passes (no waiting if
    /// completions are already ready), and dispatches every CQE. Returns the number of
    /// completions ready.
    ///
    /// When the kernel holds nothing of ours (every op finished or parked on a dry group), a
    /// `wait(None)` returns at once, so a loop that holds every buffer cannot hang here; a
    /// `wait(Some(t))` sleeps for `t` (nothing can complete sooner), so such a loop does not
    /// spin either.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.trim_pipes();
        if let Some(delay) = self.hold_for(timeout) {
            // Data streams in: queued sends and re-armed receives go now, but without GETEVENTS,
            // so that (with DEFER_TASKRUN) no receive runs before the sleep: each runs after it,
            // when the loop below collects, and takes what its socket holds by then.
            self.stats.held_waits += 1;
            self.flush()?;
            self.stats.enters += 1;
            enter_result(self.ring.submit())?;
            std::thread::sleep(delay);
        }
        let result = loop {
            self.flush()?;
            self.collect_lease_returns();
            let in_kernel = self.in_kernel();
            let want = if self.ready.is_empty() && (in_kernel > 0 || deadline.is_some()) {
                1
            } else {
                0
            };
            let meaningful = self.stats.cqes - self.cleanup_cqes;
            let mut left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if want == 1 && self.rearm_pending() {
                // Parked receives wait for their turn at buffers that are there (the flush
                // re-arms a group's share at a time): come back for them soon, even if the
                // ones just re-armed never complete (idle sockets).
                left = Some(left.map_or(REARM_PACE, |l| l.min(REARM_PACE)));
            }
            if let Err(e) = self.enter(want, left) {
                break Err(e);
            }
            self.reap();
            // Steps the CQEs armed that the driver runs itself (a poll said a socket is ready
            // for a splice): now, so their completions come with this wait's.
            self.run_inline_steps();
            self.collect_lease_returns();
            // Woken only by our own bookkeeping (a timeout op's removal, a cancel's result):
            // nothing happened for the caller, so wait on for the time left.
            let only_cleanup = self.stats.cqes - self.cleanup_cqes == meaningful;
            let time_left = deadline.is_none_or(|d| Instant::now() < d);
            if want == 0 || !self.ready.is_empty() || !only_cleanup || !time_left {
                break Ok(self.ready.len());
            }
        };
        if let Some(ud) = self.wait_timeout.take() {
            // The wait's timeout op has not fired: remove it (its CQE is bookkeeping).
            self.push(opcode::TimeoutRemove::new(ud).build().user_data(IGNORED));
        }
        if let Some(c) = &mut self.coalescing {
            c.woke(Instant::now());
        }
        result
    }

    /// How long this `wait` holds for receive coalescing: the delay, within the timeout, if
    /// the last wake-up asked for it and the wait would block at all (no completion ready or
    /// posted, something in the kernel, a timeout that is not zero).
    fn hold_for(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let delay = self.coalescing.as_ref()?.hold()?;
        let blocks = self.ready.is_empty() && self.ring.completions_empty() && self.in_kernel() > 0;
        let delay = delay.min(timeout.unwrap_or(Duration::MAX));
        (blocks && !delay.is_zero()).then_some(delay)
    }

    /// Ops the kernel may complete: not parked, and the eventfd read only while buffers are out
    /// as `Bytes` (else nothing but a remote wake-up completes it, and a driver whose ops are
    /// all parked must not sleep on it; a timed wait sleeps anyway).
    fn in_kernel(&self) -> usize {
        let idle_wake = usize::from(self.cross_armed && !self.cross.outstanding());
        self.ops.len()
            - self.parked.len()
            - self.zcrx_parked.len()
            - self.pages.splice_waiters.len()
            - idle_wake
    }

    /// Before entering the kernel: provide returned legacy buffers, re-arm parked receives whose
    /// group has buffers again, unregister abandoned groups.
    fn flush(&mut self) -> Result<()> {
        if self.cross.in_use() {
            self.take_cross_returns();
        }
        self.flush_provides()?;
        if self.fixed.as_ref().is_some_and(|t| t.has_releases()) {
            self.release_fixed()?;
        }
        if !self.dirty_lanes.is_empty() {
            self.flush_lanes();
        }
        if !self.parked.is_empty() {
            self.rearm_parked();
        }
        if !self.pages.splice_waiters.is_empty() {
            self.rearm_splice_waiters();
        }
        self.run_inline_steps();
        if !self.zcrx_areas.is_empty() {
            self.flush_zcrx();
        }
        self.reap_groups();
        if !self.send_rings.is_empty() {
            self.reap_send_rings();
        }
        Ok(())
    }

    /// Dispatches every CQE in the completion queue.
    pub(super) fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqe_buf);
        cqes.clear();
        self.ring.reap_into(&mut cqes);
        self.stats.cqes += cqes.len() as u64;
        for cqe in &cqes {
            if cqe.user_data == IGNORED {
                self.cleanup_cqes += 1;
            } else {
                self.dispatch(cqe);
            }
        }
        self.cqe_buf = cqes;
        if !self.unsettled.is_empty() {
            self.settle();
        }
    }

    /// Builds the op's SQE from its slot and pushes it. Routes each kind to its capability's
    /// builder; only the bookkeeping every op shares (its state, the group's count of ops
    /// selecting from it) is done here.
    pub(super) fn arm(&mut self, key: usize) {
        let ladder = self.ladder;
        // Registered memory of another ring's table goes as plain memory (`fixed::slot_in`).
        let table = self.fixed.as_ref().map(FixedTable::id);
        let slot = &mut self.ops[key];
        if slot.kind.runs_inline() {
            // A splice or tee the driver runs itself, before it next enters the kernel.
            slot.state = SlotState::Inline;
            self.pages.inline.push_back(key);
            return;
        }
        let ud = user_data(key, slot.gen);
        slot.state = SlotState::InKernel;
        if let Some(group) = slot.kind.selecting_group() {
            group.selecting.set(group.selecting.get() + 1);
        }
        let sqe = match &mut slot.kind {
            OpKind::Recv(op) => op.sqe(&ladder),
            OpKind::Read(op) => op.sqe(),
            OpKind::RecvMsg(op) => op.sqe(&ladder),
            OpKind::Accept { fd } => accept_sqe(fd, &ladder),
            OpKind::Connect(op) => op.sqe(),
            OpKind::Fixed(op) => op.sqe(&ladder, table),
            OpKind::Leader(op) => op.sqe(table),
            OpKind::LeaseWrite(op) => op.sqe(table),
            OpKind::LeaseRead(op) => op.sqe(table),
            OpKind::SendBundle(op) => op.sqe(),
            OpKind::RecvZc(op) => op.sqe(),
            OpKind::Pages(op) => op.sqe(),
            OpKind::Splice(op) => op.sqe(),
            // Made only by `start_send`, which queues them in their lane (`flush_lanes`).
            OpKind::Send(_) => unreachable!("sends are armed by arm_send"),
            OpKind::Provide(_)
            | OpKind::Remove { .. }
            | OpKind::Timeout { .. }
            | OpKind::Wake { .. } => {
                unreachable!("internal ops are pushed where they are built")
            }
        };
        self.push(sqe.user_data(ud));
    }

    /// Hands a CQE to its op's capability: tags of released fixed buffer slots to the table,
    /// sends (whose attempts and notifications carry their own generations) to `send.rs`,
    /// every other CQE of a live op to its kind's handler; stale CQEs are counted and dropped.
    fn dispatch(&mut self, cqe: &Cqe) {
        let id = OpId {
            ud: cqe.user_data,
            driver: self.ring_id,
        };
        let (res, flags) = (cqe.res, cqe.flags);
        if id.ud & TAG_KEY == TAG_KEY {
            self.complete_tag(id);
            return;
        }
        if matches!(self.ops.get(id.key()), Some(s) if matches!(s.kind, OpKind::Send(_))) {
            self.complete_send(id, res, flags);
            return;
        }
        let Some(c) = self.live_cqe(id, res, flags, cqe.big) else {
            self.stats.stray_cqes += 1;
            return;
        };
        match self.ops[c.key].kind {
            OpKind::Recv(_) => self.complete_recv(c),
            OpKind::Read(_) => self.complete_read(c),
            OpKind::RecvMsg(_) => self.complete_recvmsg(c),
            OpKind::Accept { .. } => self.complete_accept(c),
            OpKind::Connect(_) => self.complete_connect(c),
            OpKind::Fixed(_) => self.complete_fixed_io(c),
            OpKind::Leader(_) => self.complete_leader(c),
            OpKind::SendBundle(_) => self.complete_bundle(c),
            OpKind::LeaseRead(_) => self.complete_lease_read(c),
            OpKind::LeaseWrite(_) => self.complete_lease_write(c),
            OpKind::RecvZc(_) => self.complete_recv_zc(c),
            OpKind::Pages(_) => self.complete_pages(c),
            OpKind::Splice(_) => self.complete_splice(c),
            OpKind::Send(_) => unreachable!("sends are dispatched above"),
            OpKind::Provide(_) => self.complete_provide(c),
            OpKind::Remove { .. } => self.complete_remove(c),
            OpKind::Timeout { .. } => self.complete_timeout(c),
            OpKind::Wake { .. } => self.complete_wake(c),
        }
    }

    /// The CQE `id` names, if its op is live: with the slot's token and cancel flag. `None`
    /// for an op that has ended (a notification the kernel posted after a result without
    /// `F_MORE`, see `SendOp::notif_attempts`: nothing of ours is behind it) or a slot reused
    /// since. An op's last CQE ends its selection from its group.
    fn live_cqe(&mut self, id: OpId, res: i32, flags: u32, big: [u64; 2]) -> Option<OpCqe> {
        let slot = self.ops.get(id.key()).filter(|s| s.gen == id.gen())?;
        let c = OpCqe {
            key: id.key(),
            id,
            token: slot.token,
            res,
            flags,
            cancelled: slot.cancel,
            big,
        };
        if !c.more() {
            if let Some(group) = slot.kind.selecting_group() {
                group.selecting.set(group.selecting.get() - 1);
            }
        }
        Some(c)
    }

    /// A wait's timeout op fired (or was removed): bookkeeping, not a completion of the user's.
    fn complete_timeout(&mut self, c: OpCqe) {
        self.cleanup_cqes += 1;
        if self.wait_timeout == Some(c.id.ud) {
            self.wait_timeout = None; // it fired: nothing to remove
        }
        self.finish_internal(c.key);
    }

    /// The next completion, if any is ready.
    pub fn pop(&mut self) -> Option<Completion> {
        if self.ready.is_empty() {
            self.collect_lease_returns();
        }
        self.ready.pop_front()
    }

    /// Completions ready to be popped.
    pub fn ready(&self) -> usize {
        self.ready.len()
    }
}
