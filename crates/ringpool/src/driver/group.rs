//! Buffer groups as the kernel sees them: creating and registering a group (ring, incremental
//! ring, legacy `PROVIDE_BUFFERS`, registered region), providing legacy buffers again, buffers
//! given back on other threads (the eventfd read), settling buffers a completion named without
//! handing out bytes, and forgetting abandoned groups. The groups' own state (rings, bids,
//! growth) is in `crate::pool`.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types};

use crate::error::{Error, Result};
use crate::pool::{BufGroup, BufGroupConfig, CrossReturns, GroupShared, HandleGuard, Registration};
use crate::probe::GroupRung;
use crate::sys;

use super::op::OpKind;
use super::submit::OpCqe;
use super::Driver;

/// Internal: `n` buffers from bid `first` provided to a legacy group.
pub(super) struct ProvideOp {
    pub(super) group: Rc<GroupShared>,
    first: u16,
    n: u32,
}

/// Whether `g` is an incremental ring (the kernel fills a buffer over several completions).
pub(super) fn is_incremental(g: &GroupShared) -> bool {
    matches!(&g.backing, crate::pool::Backing::Ring(r) if r.incremental)
}

/// What a `PROVIDE_BUFFERS` of `n` buffers that completed with `res` did: how many of the run
/// (from its first bid) the kernel took, and what the result says of this kernel (`counts`:
/// whether results count the buffers taken). The kernel adds a run's buffers in order and
/// stops at the first it cannot allocate for; 5.x kernels return how many it added, later ones
/// 0 for "at least one". A 0 for a run of several is taken as all of it: the safe direction,
/// since a buffer provided twice could be handed to two receives at once, while one missing
/// only waits (runs are sent only to kernels that count, where a 0 does not happen).
fn provide_outcome(res: i32, n: u32, counts: Option<bool>) -> (u32, Option<bool>) {
    match res {
        r if r < 0 => (0, counts),
        0 => (n, if n == 1 { Some(false) } else { counts }),
        r => ((r as u32).min(n), Some(true)),
    }
}

impl Driver {
    /// Registers `shared`'s buffer ring with the kernel, if it is a ring group.
    fn register_group_ring(
        &mut self,
        shared: &GroupShared,
        bgid: u16,
        incremental: bool,
    ) -> Result<()> {
        if let Some((addr, entries)) = shared.ring_registration() {
            let flags = if incremental {
                sys::IOU_PBUF_RING_INC
            } else {
                0
            };
            // SAFETY: the ring memory is owned by `shared`, which the driver keeps in
            // `self.groups` until it unregisters the ring (or until the driver, and with it the
            // io_uring, is gone), so it stays valid for as long as the kernel may read it.
            unsafe {
                self.ring
                    .submitter()
                    .register_buf_ring_with_flags(addr, entries, bgid, flags)
            }
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => Error::GroupIdInUse { bgid },
                _ => Error::Os {
                    op: "registering a buffer ring",
                    source: e,
                },
            })?;
        }
        Ok(())
    }

    /// Creates a buffer group: a provided buffer ring where the kernel has them (incremental if
    /// asked and available), a legacy `PROVIDE_BUFFERS` group otherwise.
    ///
    /// # Errors
    /// A count that is not a power of two or exceeds 32768, a size of 0 or above
    /// [`MAX_BUF_SIZE`], a group id already in use, or memory that cannot be
    /// had.
    ///
    /// [`MAX_BUF_SIZE`]: crate::MAX_BUF_SIZE
    pub fn buf_group(&mut self, cfg: BufGroupConfig) -> Result<BufGroup> {
        let max_count = cfg.validate()?;
        let bgid = self.free_bgid(cfg.bgid)?;
        let (ring, incremental) = match self.ladder.groups {
            GroupRung::Ring { incremental } => (true, cfg.incremental && incremental),
            GroupRung::Legacy => (false, false),
        };
        let shared = self.new_group(&cfg, bgid, max_count, ring, incremental)?;
        if cfg.registration != Registration::Plain {
            self.register_region(&cfg, &shared, bgid)?;
        }
        shared.set_registered(true);
        self.bgid_used[bgid as usize] = true;
        shared.fill(0, shared.count());
        self.groups.push(shared.clone());
        if !ring {
            // Provide the initial buffers now, so the group is usable when this returns.
            self.flush_provides()?;
            while shared.stats().in_kernel != shared.count() || self.providing(&shared) {
                self.wait(Some(Duration::from_millis(100)))?;
            }
        }
        Ok(BufGroup {
            shared: shared.clone(),
            _handle: Rc::new(HandleGuard(shared)),
        })
    }

    /// The group id to use: `asked` if it is free, else [`Driver::fresh_bgid`].
    fn free_bgid(&mut self, asked: Option<u16>) -> Result<u16> {
        match asked {
            Some(id) if self.bgid_used[id as usize] => Err(Error::GroupIdInUse { bgid: id }),
            Some(id) => Ok(id),
            None => self.fresh_bgid(),
        }
    }

    /// A free group id, the first after the last one handed out (wrapping): an id goes round
    /// again only after all the others. On 6.1 a ring registered at once under a just-freed id
    /// had every selection fail with `ENOBUFS` while all its buffers were in it (believed: 6.1
    /// keeps an unregistered ring's head; the model checker, `core_regression_36c1ff9876`, 6.1
    /// guest).
    pub(super) fn fresh_bgid(&mut self) -> Result<u16> {
        let ids = self.bgid_used.len();
        let id = (0..ids)
            .map(|i| (self.bgid_next + i) % ids)
            .find(|&id| !self.bgid_used[id])
            .ok_or(Error::GroupIdsExhausted)?;
        self.bgid_next = (id + 1) % ids;
        Ok(id as u16)
    }

    /// A new group's state, its ring (if `ring`) registered with the kernel.
    fn new_group(
        &mut self,
        cfg: &BufGroupConfig,
        bgid: u16,
        max_count: u32,
        ring: bool,
        incremental: bool,
    ) -> Result<Rc<GroupShared>> {
        let shared = Rc::new(GroupShared::new(
            cfg,
            bgid,
            max_count,
            ring,
            incremental,
            self.cross.clone(),
            self.ring_id,
        )?);
        let Err(e) = self.register_group_ring(&shared, bgid, incremental) else {
            return Ok(shared);
        };
        // The kernel pins a buffer ring's own memory against RLIMIT_MEMLOCK; a legacy
        // group needs none, so a ring refused for locked memory steps down a rung.
        if e.raw_os_error() != Some(libc::ENOMEM)
            || sys::Memlock::current() == sys::Memlock::Unlimited
        {
            return Err(e);
        }
        Ok(Rc::new(GroupShared::new(
            cfg,
            bgid,
            max_count,
            false,
            false,
            self.cross.clone(),
            self.ring_id,
        )?))
    }

    /// Registers a registered region's memory as one fixed buffer. A `Preferred` registration
    /// the kernel refuses leaves the group plain; any other failure ends the group: its ring is
    /// forgotten (or, if the kernel refuses to forget it, kept with its id for the driver's
    /// life).
    fn register_region(
        &mut self,
        cfg: &BufGroupConfig,
        shared: &Rc<GroupShared>,
        bgid: u16,
    ) -> Result<()> {
        let registered = {
            let region = shared.region();
            self.register_fixed(&region)
        };
        match registered {
            Ok(slot) => shared.set_fixed(slot, self.fixed_table()?),
            Err(e) if e.refused_registration() && cfg.registration == Registration::Preferred => {}
            Err(e) => {
                if shared.is_ring() && !self.forget_buf_ring(bgid) {
                    self.bgid_used[bgid as usize] = true;
                    self.kept_for_kernel.push(Box::new(shared.clone()));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether a provide for `g` is in flight.
    fn providing(&self, g: &Rc<GroupShared>) -> bool {
        self.ops
            .iter()
            .any(|(_, s)| matches!(&s.kind, OpKind::Provide(op) if Rc::ptr_eq(&op.group, g)))
    }

    /// Refuses a buffer group or send ring made by another driver (`owner`): its bgid names
    /// another group here, or none, and the buffer ids this ring's completions carry would be
    /// taken from the wrong group, memory the other ring's kernel may be writing.
    pub(super) fn check_owner(&self, owner: u64, what: &'static str) -> Result<()> {
        if owner == self.ring_id {
            return Ok(());
        }
        Err(Error::NotOurs { what })
    }

    /// Asks the kernel to forget the provided buffer ring of `bgid`, and frees the id; true when
    /// the kernel holds no ring under it any more. Its only refusals (`ENOENT`, `EINVAL`) mean
    /// it had none there. Any other failure: the kernel may still read the ring and write into
    /// its buffers, so the id stays taken and the caller keeps the memory for the driver's life
    /// ([`Driver::kept_for_kernel`]).
    pub(super) fn forget_buf_ring(&mut self, bgid: u16) -> bool {
        match self.ring.submitter().unregister_buf_ring(bgid) {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => false,
            _ => {
                self.bgid_used[bgid as usize] = false;
                true
            }
        }
    }

    /// A handle that wakes this driver from any thread ([`CrossReturns::notify`]): from now on
    /// the driver keeps a read of its eventfd armed, and a `wait` returns when it completes
    /// (the async layer's wakers, called on other threads).
    pub(crate) fn remote_waker(&mut self) -> Arc<CrossReturns> {
        self.cross.watch();
        self.cross.clone()
    }

    /// Gives buffers dropped on other threads back to their groups, and keeps the eventfd read
    /// armed so that the next such return wakes a waiting driver.
    pub(super) fn take_cross_returns(&mut self) {
        for (serial, bid) in self.cross.take() {
            // A group the driver has forgotten is not selected from any more: nothing to do.
            if let Some(g) = self.groups.iter().find(|g| g.serial == serial) {
                g.release(bid);
            } else if let Some(a) = self.zcrx_areas.iter().find(|a| a.serial == serial) {
                a.give_back(bid as u32 * crate::zcrx::ZCRX_BUF_SIZE as u32);
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

    pub(super) fn flush_provides(&mut self) -> Result<()> {
        for gi in 0..self.groups.len() {
            let group = self.groups[gi].clone();
            let max_run = if self.provide_counts == Some(true) {
                u16::MAX
            } else {
                1
            };
            for (bid, n, addr) in group.take_pending_runs(max_run) {
                let sqe =
                    opcode::ProvideBuffers::new(addr, group.buf_size as i32, n, group.bgid, bid)
                        .build();
                let kind = OpKind::Provide(ProvideOp {
                    group: group.clone(),
                    first: bid,
                    n: n as u32,
                });
                self.start_internal(kind, sqe);
            }
        }
        Ok(())
    }

    /// Forgets groups whose handle is gone and that no op uses any more.
    pub(super) fn reap_groups(&mut self) {
        let mut i = 0;
        while i < self.groups.len() {
            let g = &self.groups[i];
            let in_use = !g.handle_alive.get()
                && self
                    .ops
                    .iter()
                    .any(|(_, s)| s.kind.group().is_some_and(|og| Rc::ptr_eq(og, g)));
            if g.handle_alive.get() || in_use {
                i += 1;
                continue;
            }
            let g = self.groups.swap_remove(i);
            g.set_registered(false);
            if g.is_ring() {
                // Nothing selects from the ring any more; the kernel forgets it synchronously.
                if !self.forget_buf_ring(g.bgid) {
                    self.kept_for_kernel.push(Box::new(g));
                }
            } else {
                // Take the provided buffers back before the memory or the id can be reused.
                let sqe = opcode::RemoveBuffers::new(g.count().min(u16::MAX as u32) as u16, g.bgid)
                    .build();
                self.start_internal(OpKind::Remove { group: g }, sqe);
            }
        }
    }

    /// The CQE of a provide: what the kernel did not take goes again at the next flush.
    pub(super) fn complete_provide(&mut self, c: OpCqe) {
        let OpKind::Provide(op) = &self.ops[c.key].kind else {
            unreachable!("complete_provide on a provide")
        };
        let (group, first, n) = (op.group.clone(), op.first, op.n);
        self.finish_internal(c.key);
        let (taken, counts) = provide_outcome(c.res, n, self.provide_counts);
        self.provide_counts = counts;
        if taken < n {
            // The kernel did not take these: queue them again for the next flush.
            group.provide_failed(first + taken as u16, n - taken);
        }
        if taken > 0 {
            group.provided(taken);
            group.refilled.set(true);
        }
    }

    /// The CQE of a forgotten legacy group's `REMOVE_BUFFERS`: its id is free again.
    pub(super) fn complete_remove(&mut self, c: OpCqe) {
        let OpKind::Remove { group } = &self.ops[c.key].kind else {
            unreachable!("complete_remove on a remove")
        };
        let bgid = group.bgid;
        self.finish_internal(c.key);
        self.bgid_used[bgid as usize] = false;
    }

    /// The eventfd read completed: buffers came back on another thread (or a remote wake-up).
    pub(super) fn complete_wake(&mut self, c: OpCqe) {
        // Re-armed at the next flush (which also takes what came back).
        self.finish_internal(c.key);
        self.cross_armed = false;
    }

    /// A completion named `bid` of `group` but handed out no bytes (end of file, an error).
    /// Whether the kernel let go of the buffer depends on the kernel and the file: a read on a
    /// pipe at end of file leaves it at the ring head (6.18 does not say so; later kernels set
    /// `F_BUF_MORE`), a read of a regular file consumed it when it started. A legacy group's
    /// buffer is always gone from the kernel; a ring's is settled by asking the kernel.
    pub(super) fn unused_buffer(&mut self, group: &Rc<GroupShared>, bid: u16, flags: u32) {
        if !group.is_ring() {
            group.put_back_unused(bid);
        } else if flags & sys::IORING_CQE_F_BUF_MORE == 0 {
            self.unsettled.push((group.clone(), bid));
        }
        // With `F_BUF_MORE` the kernel keeps the buffer and fills it further.
    }

    /// A completion handed out `bid` of `group`: the kernel had kept it, so it is settled.
    pub(super) fn settled_by_take(&mut self, group: &Rc<GroupShared>, bid: u16) {
        self.unsettled
            .retain(|(g, b)| !(Rc::ptr_eq(g, group) && *b == bid));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provide_results_count_what_the_kernel_took() {
        // Single buffers until the kernel tells its kind of result.
        assert_eq!(provide_outcome(0, 1, None), (1, Some(false)));
        assert_eq!(provide_outcome(1, 1, None), (1, Some(true)));
        // A counting kernel that ran out part-way: the rest is provided again.
        assert_eq!(provide_outcome(3, 8, Some(true)), (3, Some(true)));
        assert_eq!(provide_outcome(8, 8, Some(true)), (8, Some(true)));
        // Nothing taken.
        assert_eq!(
            provide_outcome(-libc::ENOMEM, 4, Some(true)),
            (0, Some(true))
        );
        assert_eq!(provide_outcome(-libc::ENOMEM, 1, None), (0, None));
        // An ambiguous 0 for a run is never taken as "none" (that would provide twice).
        assert_eq!(provide_outcome(0, 4, Some(true)), (4, Some(true)));
    }
}
