//! Buffer groups on the ring: registration (buffer rings, incremental rings, legacy
//! `PROVIDE_BUFFERS`), giving buffers back to the kernel, and reaping groups whose users left.

use super::*;

impl Driver {
    /// Registers `shared`'s buffer ring with the kernel, if it is a ring group.
    pub(super) fn register_group_ring(
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
    /// [`MAX_BUF_SIZE`](crate::MAX_BUF_SIZE), a group id already in use, or memory that cannot be
    /// had.
    pub fn buf_group(&mut self, cfg: BufGroupConfig) -> Result<BufGroup> {
        let max_count = cfg.validate()?;
        let bgid = match cfg.bgid {
            Some(id) if self.bgid_used[id as usize] => {
                return Err(Error::GroupIdInUse { bgid: id })
            }
            Some(id) => id,
            None => self
                .bgid_used
                .iter()
                .position(|u| !u)
                .ok_or(Error::GroupIdsExhausted)? as u16,
        };
        let (ring, incremental) = match self.ladder.groups {
            GroupRung::Ring { incremental } => (true, cfg.incremental && incremental),
            GroupRung::Legacy => (false, false),
        };
        let mut shared = Rc::new(GroupShared::new(
            &cfg,
            bgid,
            max_count,
            ring,
            incremental,
            self.cross.clone(),
            self.ring_id,
        )?);
        if let Err(e) = self.register_group_ring(&shared, bgid, incremental) {
            // The kernel pins a buffer ring's own memory against RLIMIT_MEMLOCK; a legacy
            // group needs none, so a ring refused for locked memory steps down a rung.
            if e.raw_os_error() != Some(libc::ENOMEM)
                || sys::Memlock::current() == sys::Memlock::Unlimited
            {
                return Err(e);
            }
            shared = Rc::new(GroupShared::new(
                &cfg,
                bgid,
                max_count,
                false,
                false,
                self.cross.clone(),
                self.ring_id,
            )?);
        }
        if cfg.registration != Registration::Plain {
            let registered = {
                let region = shared.region();
                self.register_fixed(&region)
            };
            match registered {
                Ok(slot) => shared.set_fixed(slot, self.fixed_table()?),
                Err(e)
                    if e.refused_registration() && cfg.registration == Registration::Preferred => {}
                Err(e) => {
                    if shared.is_ring() && !self.forget_buf_ring(bgid) {
                        self.bgid_used[bgid as usize] = true;
                        self.kept_for_kernel.push(Box::new(shared));
                    }
                    return Err(e);
                }
            }
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

    pub(super) fn providing(&self, g: &Rc<GroupShared>) -> bool {
        self.ops
            .iter()
            .any(|(_, s)| matches!(&s.kind, OpKind::Provide { group, .. } if Rc::ptr_eq(group, g)))
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
                let kind = OpKind::Provide {
                    group: group.clone(),
                    first: bid,
                    n: n as u32,
                };
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
                    .any(|(_, s)| op_group(&s.kind).is_some_and(|og| Rc::ptr_eq(og, g)));
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
}

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
pub(super) fn provide_outcome(res: i32, n: u32, counts: Option<bool>) -> (u32, Option<bool>) {
    match res {
        r if r < 0 => (0, counts),
        0 => (n, if n == 1 { Some(false) } else { counts }),
        r => ((r as u32).min(n), Some(true)),
    }
}

/// Completions.
impl Driver {
    /// A legacy `PROVIDE_BUFFERS` completed: what the kernel did not take is queued again.
    pub(super) fn complete_provide(&mut self, done: Done) {
        let Done { key, res, .. } = done;
        let OpKind::Provide { group, first, n } = &mut self.ops[key].kind else {
            unreachable!("routed here by its kind");
        };
        let (group, first, n) = (group.clone(), *first, *n);
        self.finish_internal(key);
        let (taken, counts) = provide_outcome(res, n, self.provide_counts);
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

    /// A legacy group's `REMOVE_BUFFERS` completed: its group id is free again.
    pub(super) fn complete_remove(&mut self, done: Done) {
        let Done { key, .. } = done;
        let OpKind::Remove { group } = &mut self.ops[key].kind else {
            unreachable!("routed here by its kind");
        };
        let bgid = group.bgid;
        self.finish_internal(key);
        self.bgid_used[bgid as usize] = false;
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
