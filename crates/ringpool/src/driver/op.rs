//! An op's life in the slot table: generations, starting an op, and internal ops.

use super::*;

/// What a CQE says about an op, as [`Driver::dispatch`] hands it to the op's capability.
#[derive(Clone, Copy)]
pub(super) struct Done {
    /// The op's slot.
    pub key: usize,
    /// The op's id (slot and generation) as the CQE names it.
    pub id: OpId,
    /// The user's token of the op.
    pub token: u64,
    /// Whether the op was asked to stop before this CQE.
    pub cancelled: bool,
    /// The CQE's result.
    pub res: i32,
    /// The CQE's flags.
    pub flags: u32,
    /// Whether more CQEs follow for this op (`IORING_CQE_F_MORE`).
    pub more: bool,
}

impl Driver {
    pub(super) fn next_gen(&mut self) -> u32 {
        self.gen = self.gen.wrapping_add(1);
        self.gen
    }

    pub(super) fn start(&mut self, kind: OpKind, token: u64) -> OpId {
        let gen = self.next_gen();
        let key = self.ops.insert(OpSlot {
            token,
            gen,
            kind,
            state: SlotState::InKernel,
            cancel: false,
        });
        self.arm(key);
        OpId::new(key, gen, self.ring_id)
    }

    /// Starts an op of the driver's own (not the user's); returns its user data.
    pub(super) fn start_internal(&mut self, kind: OpKind, sqe: squeue::Entry) -> u64 {
        let gen = self.next_gen();
        let key = self.ops.insert(OpSlot {
            token: 0,
            gen,
            kind,
            state: SlotState::InKernel,
            cancel: false,
        });
        self.internal += 1;
        let ud = user_data(key, gen);
        self.push(sqe.user_data(ud));
        ud
    }

    /// The final CQE of an internal op arrived.
    pub(super) fn finish_internal(&mut self, key: usize) {
        self.ops.remove(key);
        self.internal -= 1;
    }
}

/// Completions.
impl Driver {
    /// A wait's timeout fired or was removed.
    pub(super) fn complete_timeout(&mut self, done: Done) {
        let Done { key, id, .. } = done;
        self.cleanup_cqes += 1;
        if self.wait_timeout == Some(id.ud) {
            self.wait_timeout = None; // it fired: nothing to remove
        }
        self.finish_internal(key);
    }

    /// The cross-thread wake-up read completed; it is re-armed at the next flush.
    pub(super) fn complete_wake(&mut self, done: Done) {
        let Done { key, .. } = done;
        // Re-armed at the next flush (which also takes what came back).
        self.finish_internal(key);
        self.cross_armed = false;
    }
}
