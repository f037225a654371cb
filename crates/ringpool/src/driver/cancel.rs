//! Cancelling ops: by id, descriptor, token, or all of them. A cancel only asks: an op in the
//! kernel gets an `ASYNC_CANCEL` and is freed at its final CQE; a parked receive or a send still
//! in its lane ends at once; lease members waiting for their leader end here.

use io_uring::opcode;

use crate::error::Error;

use super::op::{OpId, OpKind, OpSlot, SlotState, IGNORED};
use super::{Driver, Event, Fd};

impl Driver {
    /// Asks the kernel to stop `op`. Its final completion still comes (usually
    /// `Error(Cancelled)`), and its memory is released only then. Stale ids, and ids of another
    /// driver's ops, are ignored.
    pub fn cancel(&mut self, op: OpId) {
        if op.driver != self.ring_id {
            return; // another driver's op (or none): its key may name an op of ours
        }
        let Some(slot) = self.ops.get_mut(op.key()) else {
            return;
        };
        if slot.gen != op.gen() || slot.cancel {
            return;
        }
        slot.cancel = true;
        match slot.state {
            SlotState::Parked => self.finish_parked(op.key(), Event::Error(Error::Cancelled)),
            // Nothing in the kernel: the step's run sees the flag and ends the op instead.
            SlotState::Notif | SlotState::Inline => {}
            SlotState::Queued => self.cancel_queued_send(op.key()),
            SlotState::InKernel => {
                // A send's SQE carries the generation of its current attempt.
                let target = match &slot.kind {
                    OpKind::Send(send) => send.cur_ud,
                    _ => op.ud,
                };
                let sqe = opcode::AsyncCancel::new(target).build().user_data(IGNORED);
                self.push(sqe);
            }
        }
    }

    /// Cancels every op using `fd` (for closing a connection with receives in flight).
    pub fn cancel_fd(&mut self, fd: &Fd) {
        self.drop_waiting_members(|m| m.fd().same(fd));
        self.cancel_where(|s| s.kind.uses_fd(fd));
    }

    /// Cancels every op whose slot `which` picks, as [`Driver::cancel`] does.
    pub(super) fn cancel_where(&mut self, which: impl Fn(&OpSlot) -> bool) {
        let ids: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, s)| which(s))
            .map(|(k, s)| OpId::new(k, s.gen, self.ring_id))
            .collect();
        for id in ids {
            self.cancel(id);
        }
    }

    /// Cancels every op started with `token`, as [`Driver::cancel`] does, including lease
    /// members with that token whose leader is still reading (they complete at once with
    /// [`Error::Cancelled`], and will not start). For ops whose [`OpId`] is not known yet, such
    /// as the members of a [`Driver::lease_group`]. Looks at every op in flight: meant for
    /// teardown, not for every op.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(driver: &mut ringpool::Driver, file: ringpool::Fd, sock: ringpool::Fd, buf: ringpool::FixedBuf) -> ringpool::Result<()> {
    /// use ringpool::Member;
    /// driver.lease_group(&file, buf, 0, vec![Member::send_zc(&sock, 7)], 1)?;
    /// driver.cancel_token(7); // the member ends with `Error::Cancelled`, wherever it is
    /// # Ok(()) }
    /// ```
    pub fn cancel_token(&mut self, token: u64) {
        self.drop_waiting_members(|m| m.token == token);
        // Driver-internal ops have no descriptor (and token 0): never the user's.
        // Bundle ops carry many sends (and token 0): `cancel_fd` stops them.
        self.cancel_where(|s| {
            s.token == token && s.kind.fd().is_some() && !matches!(s.kind, OpKind::SendBundle(_))
        });
    }

    /// Cancels every op of the user's, as [`Driver::cancel`] does (an `rt` runtime's end).
    pub(crate) fn cancel_all(&mut self) {
        self.drop_waiting_members(|_| true);
        self.cancel_where(|s| s.kind.fd().is_some());
    }
}
