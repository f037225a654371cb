//! Steps the driver runs in its own thread instead of as SQEs: the splices and tees of pages
//! leases and splice streams between pipes and non-blocking sockets ([`Ladder::inline_splice`],
//! forced off by `no-inline-splice`).
//!
//! Why: the kernel runs every `IORING_OP_SPLICE` and `IORING_OP_TEE` in an io-wq worker (the
//! ops' prep sets `REQ_F_FORCE_ASYNC` in `io_uring/splice.c`, from 5.7 through 6.18 at
//! least), a hand-off to another thread and back per step. `splice(2)` and `tee(2)` with `SPLICE_F_NONBLOCK`, on descriptors that cannot
//! make them sleep, do the same work at once and say `EAGAIN` where the worker would wait.
//! An op's step that runs here is queued by [`Driver::arm`] (state `Inline`) and run before
//! the driver next enters the kernel or returns from a wait; its result goes to the op's
//! completion handler exactly as its CQE would, so one set of step rules serves both paths
//! (an `EAGAIN` becomes a poll SQE, whose CQE runs the step here again).
//!
//! Ownership: an inline step names only descriptors the op's slot holds, and only for the
//! call; nothing of it is in the kernel once the call returns. An op waiting here has no SQE
//! to cancel: [`Driver::cancel`] sets its flag, and its run ends it (`ECANCELED`, as a
//! cancelled SQE's CQE would) without making the call.
//!
//! [`Ladder::inline_splice`]: crate::Ladder::inline_splice

use super::op::{OpId, OpKind, SlotState};
use super::submit::OpCqe;
use super::Driver;

impl Driver {
    /// Runs every queued inline step, and the steps their results arm, until none is left;
    /// streams waiting for a pipe get the ones those steps sent home.
    pub(super) fn run_inline_steps(&mut self) {
        while let Some(key) = self.pages.inline.pop_front() {
            self.run_inline(key);
            if self.pages.inline.is_empty() && !self.pages.splice_waiters.is_empty() {
                self.rearm_splice_waiters();
            }
        }
    }

    /// Runs the step of the op in slot `key` and hands its result to the op's handler.
    fn run_inline(&mut self, key: usize) {
        let stop = self.dropping;
        let slot = &mut self.ops[key];
        debug_assert_eq!(slot.state, SlotState::Inline, "only queued steps run");
        slot.state = SlotState::InKernel;
        let res = if slot.cancel || stop {
            -libc::ECANCELED
        } else {
            self.stats.inline_steps += 1;
            match &slot.kind {
                OpKind::Pages(op) => op.run_step(),
                OpKind::Splice(op) => op.run_step(),
                _ => unreachable!("only splices and tees run inline"),
            }
        };
        let c = OpCqe {
            key,
            id: OpId::new(key, slot.gen, self.ring_id),
            token: slot.token,
            res,
            flags: 0,
            cancelled: slot.cancel,
            big: [0; 2],
        };
        match &slot.kind {
            OpKind::Pages(_) => self.complete_pages(c),
            _ => self.complete_splice(c),
        }
    }
}
