//! Receives with buffer selection: `recv`/`read` from a buffer group, the buffers a completion
//! names, `-ENOBUFS` parking (backpressure) and the re-arm when the group has buffers again.

use super::*;

impl Driver {
    /// Starts a receive on `fd` into buffers the kernel selects from `group`.
    ///
    /// Completions: [`Event::Data`] per arrival, then [`Event::Eof`] or [`Event::Error`] as the
    /// last one (multishot), or a single one (once/bundle). A dry group is not an error: the
    /// receive pauses and resumes when buffers come back, with nothing lost.
    ///
    /// The op holds its own clone of `fd`: dropping the user's clones does not stop it (data
    /// that arrives is still delivered); [`Driver::cancel`] or [`Driver::cancel_fd`] does.
    pub fn recv(&mut self, fd: &Fd, group: &BufGroup, mode: RecvMode, token: u64) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        let kind = OpKind::Recv {
            fd: fd.clone(),
            group: group.shared.clone(),
            mode,
        };
        Ok(self.start(kind, token))
    }

    /// Reads from `fd` at `offset` (`u64::MAX`: the file position) into a buffer the kernel
    /// selects from `group`. One completion: [`Event::Data`], [`Event::Eof`] or [`Event::Error`].
    pub fn read(&mut self, fd: &Fd, group: &BufGroup, offset: u64, token: u64) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        let kind = OpKind::Read {
            fd: fd.clone(),
            group: group.shared.clone(),
            offset,
        };
        Ok(self.start(kind, token))
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

    /// A completion of an op that selected a buffer (recv, read).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn buffer_completion(
        &mut self,
        key: usize,
        id: OpId,
        token: u64,
        group: &Rc<GroupShared>,
        res: i32,
        flags: u32,
        rearm: bool,
    ) {
        let more = cqueue::more(flags);
        if res > 0 {
            let bid = cqueue::buffer_select(flags)
                .expect("a selected-buffer completion names its buffer");
            let mut parts = std::mem::take(&mut self.take_buf);
            parts.clear();
            group.take(
                bid,
                res as u32,
                flags & sys::IORING_CQE_F_BUF_MORE != 0,
                &mut parts,
            );
            if !self.unsettled.is_empty() {
                for &(b, _, _) in &parts {
                    self.settled_by_take(group, b);
                }
            }
            let bufs = parts
                .iter()
                // SAFETY: the kernel wrote these bytes before posting this CQE, and `take` marked
                // the buffers as in user hands, so nothing hands them out again before they drop.
                .map(|&(b, off, len)| unsafe { PooledBuf::new(group.clone(), b, off, len) })
                .collect();
            self.take_buf = parts;
            let event = Event::Data(BufChain::from_bufs(bufs));
            self.deliver(key, id, token, event, more, rearm);
            return;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.unused_buffer(group, bid, flags);
        }
        if res == -libc::ENOBUFS && !more {
            group.enobufs.set(group.enobufs.get() + 1);
            if self.ops[key].cancel {
                self.ops.remove(key);
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Error(Error::Cancelled),
                    more: false,
                });
                return;
            }
            if group.report_exhaustion {
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Error(Error::PoolExhausted { bgid: group.bgid }),
                    more: true,
                });
            }
            self.park(key, group);
            return;
        }
        if more {
            // A multishot op reported a passing condition and goes on.
            return;
        }
        let event = match res {
            0 => Event::Eof,
            r if r == -libc::ECANCELED => Event::Error(Error::Cancelled),
            r => Event::Error(errno_error("recv", r)),
        };
        self.ops.remove(key);
        self.ready.push_back(Completion {
            token,
            op: id,
            event,
            more: false,
        });
    }

    /// Whether parked receives wait to be re-armed on groups that have buffers for them.
    pub(super) fn rearm_pending(&self) -> bool {
        !self.parked.is_empty() && self.groups.iter().any(|g| g.refilled.get())
    }

    /// Delivers an event that carries received buffers. After the op's last CQE (`!more`), a
    /// receive that must go on (`rearm`: multishot mode on a single-shot rung) is armed again,
    /// any other is forgotten.
    pub(super) fn deliver(
        &mut self,
        key: usize,
        id: OpId,
        token: u64,
        event: Event,
        more: bool,
        rearm: bool,
    ) {
        let keep = more || rearm;
        self.ready.push_back(Completion {
            token,
            op: id,
            event,
            more: keep,
        });
        if !more {
            if keep {
                self.arm(key);
            } else {
                self.ops.remove(key);
            }
        }
    }

    /// The op's group ran dry: grow it if allowed, else wait for buffers to come back.
    pub(super) fn park(&mut self, key: usize, group: &Rc<GroupShared>) {
        self.ops[key].state = SlotState::Parked;
        self.parked.push(key);
        if let Ok(Some((first, n))) = group.grow() {
            group.fill(first, n);
        }
        // Buffers may have come back between the kernel's ENOBUFS and now; then re-arm at once.
        if group.stats().in_kernel > 0 {
            group.refilled.set(true);
        }
    }

    pub(super) fn finish_parked(&mut self, key: usize, event: Event) {
        self.parked.retain(|&k| k != key);
        let slot = self.ops.remove(key);
        self.ready.push_back(Completion {
            token: slot.token,
            op: OpId::new(key, slot.gen, self.ring_id),
            event,
            more: false,
        });
    }
}

/// Completions.
impl Driver {
    /// A receive from a buffer group completed: its buffers go to the user, or it parks on `-ENOBUFS`.
    pub(super) fn complete_recv(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            cancelled,
            res,
            flags,
            ..
        } = done;
        let OpKind::Recv { group, mode, .. } = &mut self.ops[key].kind else {
            unreachable!("routed here by its kind");
        };
        let (group, multishot) = (group.clone(), mode.multishot());
        if let (Some(c), true) = (&mut self.coalescing, res > 0) {
            c.received(res as usize, group.buf_size as usize);
        }
        self.buffer_completion(key, id, token, &group, res, flags, multishot && !cancelled);
    }

    /// A read from a buffer group completed.
    pub(super) fn complete_read(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            res,
            flags,
            ..
        } = done;
        let OpKind::Read { group, .. } = &mut self.ops[key].kind else {
            unreachable!("routed here by its kind");
        };
        let group = group.clone();
        self.buffer_completion(key, id, token, &group, res, flags, false);
    }
}

/// A receive selecting from its group: multishot and/or bundle where the ladder has them.
pub(super) fn recv_sqe(kind: &mut OpKind, ladder: Ladder) -> squeue::Entry {
    let OpKind::Recv { fd, group, mode } = kind else {
        unreachable!("routed here by its kind");
    };

    let fd = types::Fd(fd.as_raw_fd());
    let bundle = mode.bundle() && ladder.bundle && !is_incremental(group);
    let bgid = group.bgid;
    match (
        mode.multishot() && ladder.recv == MultishotRung::Kernel,
        bundle,
    ) {
        (true, true) => opcode::RecvMultiBundle::new(fd, bgid).build(),
        (true, false) => opcode::RecvMulti::new(fd, bgid).build(),
        (false, true) => opcode::RecvBundle::new(fd, bgid).build(),
        (false, false) => opcode::Recv::new(fd, std::ptr::null_mut(), group.buf_size)
            .buf_group(bgid)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT),
    }
}

/// A read selecting from its group.
pub(super) fn read_sqe(kind: &mut OpKind) -> squeue::Entry {
    let OpKind::Read { fd, group, offset } = kind else {
        unreachable!("routed here by its kind");
    };
    opcode::Read::new(
        types::Fd(fd.as_raw_fd()),
        std::ptr::null_mut(),
        group.buf_size,
    )
    .offset(*offset)
    .buf_group(group.bgid)
    .build()
    .flags(squeue::Flags::BUFFER_SELECT)
}
