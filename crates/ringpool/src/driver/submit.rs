//! The ring loop: building SQEs for started ops (`arm`), the one place SQEs are pushed (`push`),
//! entering the kernel, waiting (with receive coalescing), reaping CQEs and routing each to its
//! capability (`dispatch`).

use super::*;

use super::fixed_io::fixed_io_sqe;
use super::lease::{leader_sqe, lease_read_sqe, lease_write_sqe};
use super::recv::{read_sqe, recv_sqe};
use super::send_ring::send_bundle_sqe;
use super::socket::{accept_sqe, connect_sqe};
use super::udp::recv_msg_sqe;

impl Driver {
    /// The next completion, if any is ready.
    pub fn pop(&mut self) -> Option<Completion> {
        if self.ready.is_empty() {
            self.collect_lease_returns();
        }
        self.ready.pop_front()
    }

    /// Leases whose last holder let go: their buffers go back to the user.
    pub(super) fn collect_lease_returns(&mut self) {
        let mut returns = self.lease_returns.borrow_mut();
        while let Some((token, buf)) = returns.pop_front() {
            self.ready.push_back(Completion {
                token,
                op: OpId::NONE,
                event: Event::LeaseReturned(buf),
                more: false,
            });
        }
    }

    /// Completions ready to be popped.
    pub fn ready(&self) -> usize {
        self.ready.len()
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

    /// A handle that wakes this driver from any thread ([`CrossReturns::notify`]): from now on
    /// the driver keeps a read of its eventfd armed, and a `wait` returns when it completes
    /// (the async layer's wakers, called on other threads).
    pub(crate) fn remote_waker(&mut self) -> Arc<CrossReturns> {
        self.cross.watch();
        self.cross.clone()
    }

    /// Ops the kernel may complete: not parked, and the eventfd read only while buffers are out
    /// as `Bytes` (else nothing but a remote wake-up completes it, and a driver whose ops are
    /// all parked must not sleep on it; a timed wait sleeps anyway).
    pub(super) fn in_kernel(&self) -> usize {
        let idle_wake = usize::from(self.cross_armed && !self.cross.outstanding());
        self.ops.len() - self.parked.len() - idle_wake
    }

    /// How long this `wait` holds for receive coalescing: the delay, within the timeout, if
    /// the last wake-up asked for it and the wait would block at all (no completion ready or
    /// posted, something in the kernel, a timeout that is not zero).
    pub(super) fn hold_for(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let delay = self.coalescing.as_ref()?.hold()?;
        let blocks =
            self.ready.is_empty() && self.ring.completion().is_empty() && self.in_kernel() > 0;
        let delay = delay.min(timeout.unwrap_or(Duration::MAX));
        (blocks && !delay.is_zero()).then_some(delay)
    }

    /// Submits queued work and dispatches CQEs that are already there, without waiting.
    pub fn submit(&mut self) -> Result<usize> {
        self.flush()?;
        self.enter(0, None)?;
        self.reap();
        Ok(self.ready.len())
    }

    /// Builds the op's SQE from its slot and pushes it.
    pub(super) fn arm(&mut self, key: usize) {
        if matches!(self.ops[key].kind, OpKind::Send(_)) {
            self.arm_send(key, false);
            return;
        }
        let ladder = self.ladder;
        // Registered memory of another ring's table goes as plain memory (`fixed::slot_in`).
        let table = self.fixed.as_ref().map(FixedTable::id);
        let slot = &mut self.ops[key];
        let ud = user_data(key, slot.gen);
        slot.state = SlotState::InKernel;
        if let Some(group) = selecting_group(&slot.kind) {
            group.selecting.set(group.selecting.get() + 1);
        }
        let kind = &mut slot.kind;
        let sqe = match kind {
            OpKind::Recv { .. } => recv_sqe(kind, ladder),
            OpKind::Read { .. } => read_sqe(kind),
            OpKind::RecvMsg { .. } => recv_msg_sqe(kind, ladder),
            OpKind::Accept { .. } => accept_sqe(kind, ladder),
            OpKind::Connect { .. } => connect_sqe(kind),
            OpKind::Fixed(_) => fixed_io_sqe(kind, ladder, table),
            OpKind::Leader(_) => leader_sqe(kind, table),
            OpKind::LeaseWrite { .. } => lease_write_sqe(kind, table),
            OpKind::SendBundle { .. } => {
                self.stats.bundle_ops += 1;
                send_bundle_sqe(kind)
            }
            OpKind::LeaseRead { .. } => lease_read_sqe(kind, table),
            OpKind::Send(_) => unreachable!("sends are armed by arm_send"),
            OpKind::Provide { .. }
            | OpKind::Remove { .. }
            | OpKind::Timeout { .. }
            | OpKind::Wake { .. } => {
                unreachable!("internal ops are pushed where they are built")
            }
        };
        self.push(sqe.user_data(ud));
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

    /// Pushes an SQE, submitting first if the queue is full.
    pub(super) fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every SQE pushed names only memory owned by an op slot (or none), and that
            // slot lives until the op's final CQE: the ownership rule of this module.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.stats.sqes += 1;
                return;
            }
            // The queue is full: hand what is there to the kernel and retry.
            self.submit_queued();
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

    /// Before entering the kernel: provide returned legacy buffers, re-arm parked receives whose
    /// group has buffers again, unregister abandoned groups.
    pub(super) fn flush(&mut self) -> Result<()> {
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
            // Snapshot (and clear) which groups got buffers back *before* re-arming: a refill
            // noticed while we re-arm stays set for the next flush instead of being lost. Each
            // refilled group re-arms at most as many parked ops as it has buffers for, oldest
            // first: re-arming every parked op at each refill sent thousands of receives after
            // a few buffers, nearly all of them to fail with ENOBUFS again (a busy loop under
            // load, and no order among the waiting). If some must wait, the group stays
            // refilled, so the next flush (after these ops' completions) re-arms the next ones.
            let mut budgets: Vec<(*const GroupShared, u32)> = self
                .groups
                .iter()
                .filter(|g| g.refilled.replace(false))
                .map(|g| (Rc::as_ptr(g), g.stats().in_kernel.max(1)))
                .collect();
            let parked = std::mem::take(&mut self.parked);
            for key in parked {
                let group = match &self.ops[key].kind {
                    OpKind::Recv { group, .. }
                    | OpKind::Read { group, .. }
                    | OpKind::RecvMsg { group, .. } => group.clone(),
                    _ => unreachable!("only buffer-selecting ops park"),
                };
                match budgets.iter_mut().find(|(g, _)| *g == Rc::as_ptr(&group)) {
                    Some((_, budget)) if *budget > 0 => {
                        *budget -= 1;
                        group.rearms.set(group.rearms.get() + 1);
                        self.arm(key);
                    }
                    Some(_) => {
                        group.refilled.set(true);
                        self.parked.push(key);
                    }
                    None => self.parked.push(key),
                }
            }
        }
        self.reap_groups();
        if !self.send_rings.is_empty() {
            self.reap_send_rings();
        }
        Ok(())
    }

    /// Gives buffers dropped on other threads back to their groups, and keeps the eventfd read
    /// armed so that the next such return wakes a waiting driver.
    pub(super) fn take_cross_returns(&mut self) {
        for (serial, bid) in self.cross.take() {
            // A group the driver has forgotten is not selected from any more: nothing to do.
            if let Some(g) = self.groups.iter().find(|g| g.serial == serial) {
                g.release(bid);
            }
        }
        if !self.cross_armed && !self.dropping {
            let mut counter = Box::new(0u64);
            let sqe = opcode::Read::new(
                types::Fd(self.cross.wake_fd()),
                (&raw mut *counter).cast::<u8>(),
                8,
            )
            .build();
            self.start_internal(OpKind::Wake { _counter: counter }, sqe);
            self.cross_armed = true;
        }
    }

    /// Dispatches every CQE in the completion queue.
    pub(super) fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqe_buf);
        cqes.clear();
        cqes.extend(self.ring.completion());
        self.stats.cqes += cqes.len() as u64;
        for cqe in &cqes {
            if cqe.user_data() == IGNORED {
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

    /// Decides, for each unsettled buffer, whether the kernel still holds it. The kernel's ring
    /// head is the witness: a buffer at or past it is in the ring and a later completion will
    /// name it. One before it was let go, unless an op of ours on the group is still in flight
    /// (it may have consumed the buffer after the completion that named it, and its own
    /// completion is still to come): then the buffer waits for the group's ops to end. A buffer
    /// never goes back twice; at worst it waits.
    pub(super) fn settle(&mut self) {
        let fd = self.ring.as_raw_fd();
        let mut pending = std::mem::take(&mut self.unsettled);
        pending.retain(|(group, bid)| {
            if !group.registered() {
                return false; // the kernel forgot the ring: nothing to give back
            }
            match sys::buf_ring_head(fd, group.bgid) {
                Ok(head) if group.ring_holds(*bid, head) => false,
                Ok(_) if group.selecting.get() == 0 => {
                    group.put_back_unused(*bid);
                    false
                }
                Ok(_) => true,
                // No witness: a kernel before 6.8. Those (and every kernel without incremental
                // rings before 6.12) consumed each buffer a completion named, at its selection
                // or its completion, so it is ours again.
                Err(_) => {
                    group.put_back_unused(*bid);
                    false
                }
            }
        });
        pending.append(&mut self.unsettled);
        self.unsettled = pending;
    }

    pub(super) fn dispatch(&mut self, cqe: &cqueue::Entry) {
        let id = OpId {
            ud: cqe.user_data(),
            driver: self.ring_id,
        };
        if id.ud & fixed::TAG_KEY == fixed::TAG_KEY {
            // The kernel let go of a released fixed buffer slot.
            let released = self
                .fixed
                .as_ref()
                .is_some_and(|t| t.tag_done(id.gen() as u16));
            if !released {
                self.stats.stray_cqes += 1;
            }
            return;
        }
        let key = id.key();
        let (res, flags) = (cqe.result(), cqe.flags());
        let more = cqueue::more(flags);
        let Some(slot) = self.ops.get_mut(key) else {
            // A notification the kernel posted after a result without F_MORE, for an op that
            // has ended (see `SendOp::notif_attempts`): nothing of ours is behind it.
            self.stats.stray_cqes += 1;
            return;
        };
        if let OpKind::Send(op) = &slot.kind {
            let known = if cqueue::notif(flags) {
                op.notif_attempts.contains(&id.gen())
            } else {
                op.cur_ud == id.ud && slot.state == SlotState::InKernel
            };
            if known {
                self.send_completion(key, id.gen(), res, flags);
            } else {
                self.stats.stray_cqes += 1;
            }
            return;
        }
        if slot.gen != id.gen() {
            self.stats.stray_cqes += 1;
            return;
        }
        let token = slot.token;
        let cancelled = slot.cancel;
        if !more {
            if let Some(group) = selecting_group(&slot.kind) {
                group.selecting.set(group.selecting.get() - 1);
            }
        }
        let done = Done {
            key,
            id,
            token,
            cancelled,
            res,
            flags,
            more,
        };
        match &slot.kind {
            OpKind::Recv { .. } => self.complete_recv(done),
            OpKind::Read { .. } => self.complete_read(done),
            OpKind::RecvMsg { .. } => self.complete_recv_msg(done),
            OpKind::Accept { .. } => self.complete_accept(done),
            OpKind::Connect { .. } => self.complete_connect(done),
            OpKind::Fixed(_) => self.complete_fixed_io(done),
            OpKind::Leader(_) => self.complete_leader(done),
            OpKind::SendBundle { .. } => self.complete_send_bundle(done),
            OpKind::LeaseRead { .. } => self.complete_lease_read(done),
            OpKind::LeaseWrite { .. } => self.complete_lease_write(done),
            OpKind::Send(_) => unreachable!("sends are dispatched above"),
            OpKind::Provide { .. } => self.complete_provide(done),
            OpKind::Remove { .. } => self.complete_remove(done),
            OpKind::Timeout { .. } => self.complete_timeout(done),
            OpKind::Wake { .. } => self.complete_wake(done),
        }
    }
}

/// An `io_uring_enter`'s outcome: timeouts, interruptions and a busy or full ring are not
/// errors (the caller's loop goes on).
pub(super) fn enter_result(res: std::io::Result<usize>) -> Result<()> {
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
