//! Stream receives and buffer-selecting reads: building their SQEs (multishot, bundle, or the
//! single-shot rungs), handing out the buffers their completions name, and `-ENOBUFS` as
//! backpressure: an op whose group ran dry parks, and is re-armed at a flush once buffers came
//! back, a group's share at a time.

use std::os::fd::AsRawFd;
use std::rc::Rc;

use io_uring::{cqueue, opcode, squeue, types};

use crate::buf::{BufChain, PooledBuf};
use crate::error::{Error, Result};
use crate::pool::{BufGroup, GroupShared};
use crate::probe::{Ladder, MultishotRung};
use crate::sys;

use super::group::is_incremental;
use super::op::{errno_error, OpId, OpKind, SlotState};
use super::submit::OpCqe;
use super::{Completion, Driver, Event, Fd};

/// How a receive selects its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvMode {
    /// One completion, one buffer.
    Once,
    /// One completion, one or more buffers (6.10 bundles; one buffer where missing): as many
    /// as the socket holds (the kernel retries a full bundle with what is waiting), bounded
    /// only by the group; [`Driver::recv_bundle_limited`] bounds it.
    Bundle,
    /// A stream of completions until end of stream, error or cancel (6.0 multishot; re-armed
    /// single shots where missing). Running out of buffers pauses it; it resumes by itself.
    Multishot,
    /// A multishot stream whose completions may each carry several buffers.
    MultishotBundle,
}

impl RecvMode {
    pub(super) fn multishot(self) -> bool {
        matches!(self, RecvMode::Multishot | RecvMode::MultishotBundle)
    }
    pub(super) fn bundle(self) -> bool {
        matches!(self, RecvMode::Bundle | RecvMode::MultishotBundle)
    }
}

/// A stream receive: its socket and the group the kernel selects from.
pub(super) struct RecvOp {
    pub(super) fd: Fd,
    pub(super) group: Rc<GroupShared>,
    pub(super) mode: RecvMode,
    /// A single-shot bundle takes at most this many buffers (`None`: what the kernel gives).
    pub(super) max_bufs: Option<u32>,
}

impl RecvOp {
    /// Multishot and bundle where the ladder has them (no bundles from an incremental ring),
    /// else a single receive selecting one buffer.
    pub(super) fn sqe(&self, ladder: &Ladder) -> squeue::Entry {
        let fd = types::Fd(self.fd.as_raw_fd());
        let group = &self.group;
        let bundle = self.mode.bundle() && ladder.bundle && !is_incremental(group);
        let bgid = group.bgid;
        match (
            self.mode.multishot() && ladder.recv == MultishotRung::Kernel,
            bundle,
        ) {
            (true, true) => opcode::RecvMultiBundle::new(fd, bgid).build(),
            (true, false) => opcode::RecvMulti::new(fd, bgid).build(),
            (false, true) => match self.max_bufs {
                None => opcode::RecvBundle::new(fd, bgid).build(),
                Some(1) => one_buffer_recv(fd, bgid, group.buf_size),
                Some(n) => opcode::Recv::new(
                    fd,
                    std::ptr::null_mut(),
                    limited_bundle_len(n, group.buf_size, ladder.exact_bundle_limit),
                )
                .ioprio(sys::IORING_RECVSEND_BUNDLE)
                .buf_group(bgid)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT),
            },
            (false, false) => one_buffer_recv(fd, bgid, group.buf_size),
        }
    }
}

/// A single receive selecting one buffer of `buf_size` bytes from group `bgid`.
fn one_buffer_recv(fd: types::Fd, bgid: u16, buf_size: u32) -> squeue::Entry {
    opcode::Recv::new(fd, std::ptr::null_mut(), buf_size)
        .buf_group(bgid)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
}

/// The `len` of a bundle receive that takes at most `max_bufs` (≥ 2) buffers of `buf_size`.
/// The kernel maps whole buffers up to `len` and cuts the one that would pass it; a full
/// bundle whose `len` is a whole number of buffers is retried with what the socket holds
/// (measured on 6.18: `3 × buf_size` took 31 buffers). Where a cut after the first buffer ends
/// the mapping and the retry (`exact`, [`Ladder::exact_bundle_limit`]), `max_bufs × buf_size +
/// 1` takes at most `max_bufs`; elsewhere `(max_bufs - 1) × buf_size + 1` does (`max_bufs - 1`
/// whole buffers, and at most one byte of one more on a kernel that keeps the cut piece). Past
/// `u32::MAX`, the cap is `u32::MAX` bytes (fewer buffers).
pub(super) fn limited_bundle_len(max_bufs: u32, buf_size: u32, exact: bool) -> u32 {
    let whole = if exact { max_bufs } else { max_bufs - 1 };
    whole
        .checked_mul(buf_size)
        .and_then(|l| l.checked_add(1))
        .unwrap_or(u32::MAX)
}

/// A read at `offset` into a buffer the kernel selects from `group`.
pub(super) struct ReadOp {
    pub(super) fd: Fd,
    pub(super) group: Rc<GroupShared>,
    pub(super) offset: u64,
}

impl ReadOp {
    pub(super) fn sqe(&self) -> squeue::Entry {
        opcode::Read::new(
            types::Fd(self.fd.as_raw_fd()),
            std::ptr::null_mut(),
            self.group.buf_size,
        )
        .offset(self.offset)
        .buf_group(self.group.bgid)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
    }
}

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
        self.start_recv(fd, group, mode, None, token)
    }

    /// A single receive (one completion, like [`RecvMode::Bundle`]) that takes at most
    /// `max_bufs` buffers of `group`: how a server bounds what one connection holds of a
    /// shared group and still moves many buffers per operation. Where bundles are missing (or
    /// the group is incremental), one buffer.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `max_bufs` 0; as [`Driver::recv`].
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(driver: &mut ringpool::Driver, group: &ringpool::BufGroup, sock: &ringpool::Fd) -> ringpool::Result<()> {
    /// use ringpool::Event;
    /// driver.recv_bundle_limited(sock, group, 8, 1)?;
    /// driver.wait(None)?;
    /// if let Some(c) = driver.pop() {
    ///     if let Event::Data(chain) = c.event {
    ///         assert!(chain.buf_count() <= 8);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_bundle_limited(
        &mut self,
        fd: &Fd,
        group: &BufGroup,
        max_bufs: u32,
        token: u64,
    ) -> Result<OpId> {
        if max_bufs == 0 {
            return Err(Error::InvalidArgument {
                what: "a bundle receive limited to 0 buffers",
            });
        }
        self.start_recv(fd, group, RecvMode::Bundle, Some(max_bufs), token)
    }

    /// The receive op of [`Driver::recv`] and [`Driver::recv_bundle_limited`], started.
    fn start_recv(
        &mut self,
        fd: &Fd,
        group: &BufGroup,
        mode: RecvMode,
        max_bufs: Option<u32>,
        token: u64,
    ) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        let kind = OpKind::Recv(RecvOp {
            fd: fd.clone(),
            group: group.shared.clone(),
            mode,
            max_bufs,
        });
        Ok(self.start(kind, token))
    }

    /// Reads from `fd` at `offset` (`u64::MAX`: the file position) into a buffer the kernel
    /// selects from `group`. One completion: [`Event::Data`], [`Event::Eof`] or [`Event::Error`].
    pub fn read(&mut self, fd: &Fd, group: &BufGroup, offset: u64, token: u64) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        let kind = OpKind::Read(ReadOp {
            fd: fd.clone(),
            group: group.shared.clone(),
            offset,
        });
        Ok(self.start(kind, token))
    }

    /// A CQE of a stream receive: it feeds receive coalescing, then hands out its buffers.
    pub(super) fn complete_recv(&mut self, c: OpCqe) {
        let OpKind::Recv(op) = &self.ops[c.key].kind else {
            unreachable!("complete_recv on a receive")
        };
        let (group, multishot) = (op.group.clone(), op.mode.multishot());
        if let (Some(co), true) = (&mut self.coalescing, c.res > 0) {
            co.received(c.res as usize, group.buf_size as usize);
        }
        self.buffer_completion(&c, &group, multishot && !c.cancelled);
    }

    /// The CQE of a buffer-selecting read.
    pub(super) fn complete_read(&mut self, c: OpCqe) {
        let OpKind::Read(op) = &self.ops[c.key].kind else {
            unreachable!("complete_read on a read")
        };
        let group = op.group.clone();
        self.buffer_completion(&c, &group, false);
    }

    /// A completion of an op that selected a buffer (recv, read; datagrams without one).
    pub(super) fn buffer_completion(&mut self, c: &OpCqe, group: &Rc<GroupShared>, rearm: bool) {
        let (res, flags, more) = (c.res, c.flags, c.more());
        if res > 0 {
            let event = Event::Data(self.take_received(group, res as u32, flags));
            self.deliver(c, event, more, rearm);
            return;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.unused_buffer(group, bid, flags);
        }
        if res == -libc::ENOBUFS && !more {
            self.ran_dry(c, group);
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
        self.ops.remove(c.key);
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event,
            more: false,
        });
    }

    /// The buffers a completion of `res` bytes filled (one, or a bundle's run of ring entries),
    /// taken out of `group` into the user's hands.
    fn take_received(&mut self, group: &Rc<GroupShared>, res: u32, flags: u32) -> BufChain {
        let bid =
            cqueue::buffer_select(flags).expect("a selected-buffer completion names its buffer");
        let mut parts = std::mem::take(&mut self.take_buf);
        parts.clear();
        group.take(
            bid,
            res,
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
            // SAFETY: the kernel wrote these bytes before posting the CQE that named them (`res`,
            // `flags`: reaped, so the kernel is done with them), and `take` marked the buffers
            // as in user hands, so nothing hands them out again before they drop.
            .map(|&(b, off, len)| unsafe { PooledBuf::new(group.clone(), b, off, len) })
            .collect();
        self.take_buf = parts;
        BufChain::from_bufs(bufs)
    }

    /// The op's last CQE said `-ENOBUFS`: a cancelled op ends; any other parks (telling the
    /// user first if the group reports exhaustion).
    fn ran_dry(&mut self, c: &OpCqe, group: &Rc<GroupShared>) {
        group.enobufs.set(group.enobufs.get() + 1);
        if self.ops[c.key].cancel {
            self.ops.remove(c.key);
            self.ready.push_back(Completion {
                token: c.token,
                op: c.id,
                event: Event::Error(Error::Cancelled),
                more: false,
            });
            return;
        }
        if group.report_exhaustion {
            self.ready.push_back(Completion {
                token: c.token,
                op: c.id,
                event: Event::Error(Error::PoolExhausted { bgid: group.bgid }),
                more: true,
            });
        }
        self.park(c.key, group);
    }

    /// Whether parked receives wait to be re-armed on groups that have buffers for them.
    pub(super) fn rearm_pending(&self) -> bool {
        !self.parked.is_empty() && self.groups.iter().any(|g| g.refilled.get())
    }

    /// Delivers an event that carries received buffers. After the op's last CQE (`!more`), a
    /// receive that must go on (`rearm`: multishot mode on a single-shot rung) is armed again,
    /// any other is forgotten.
    pub(super) fn deliver(&mut self, c: &OpCqe, event: Event, more: bool, rearm: bool) {
        let keep = more || rearm;
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event,
            more: keep,
        });
        if !more {
            if keep {
                self.arm(c.key);
            } else {
                self.ops.remove(c.key);
            }
        }
    }

    /// The op's group ran dry: grow it if allowed, else wait for buffers to come back.
    fn park(&mut self, key: usize, group: &Rc<GroupShared>) {
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

    /// Re-arms parked ops whose group got buffers back (at a flush, before entering the kernel).
    ///
    /// Snapshot (and clear) which groups got buffers back *before* re-arming: a refill noticed
    /// while we re-arm stays set for the next flush instead of being lost. Each refilled group
    /// re-arms at most as many parked ops as it has buffers for, oldest first: re-arming every
    /// parked op at each refill sent thousands of receives after a few buffers, nearly all of
    /// them to fail with ENOBUFS again (a busy loop under load, and no order among the
    /// waiting). If some must wait, the group stays refilled, so the next flush (after these
    /// ops' completions) re-arms the next ones.
    pub(super) fn rearm_parked(&mut self) {
        let mut budgets: Vec<(*const GroupShared, u32)> = self
            .groups
            .iter()
            .filter(|g| g.refilled.replace(false))
            .map(|g| (Rc::as_ptr(g), g.stats().in_kernel.max(1)))
            .collect();
        let parked = std::mem::take(&mut self.parked);
        for key in parked {
            let group = self.ops[key]
                .kind
                .selecting_group()
                .expect("only buffer-selecting ops park")
                .clone();
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

    /// A parked op ends without going back to the kernel (cancelled while parked).
    pub(super) fn finish_parked(&mut self, key: usize, event: Event) {
        self.parked.retain(|&k| k != key);
        self.zcrx_parked.retain(|&k| k != key);
        self.pages.splice_waiters.retain(|&k| k != key);
        let slot = self.ops.remove(key);
        self.ready.push_back(Completion {
            token: slot.token,
            op: OpId::new(key, slot.gen, self.ring_id),
            event,
            more: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::limited_bundle_len;

    #[test]
    fn a_limited_bundle_s_len_ends_one_byte_into_a_buffer_and_saturates() {
        assert_eq!(limited_bundle_len(3, 4096, true), 3 * 4096 + 1);
        assert_eq!(limited_bundle_len(3, 4096, false), 2 * 4096 + 1);
        assert_eq!(limited_bundle_len(2, 65536, false), 65537);
        assert_eq!(limited_bundle_len(70_000, 65536, true), u32::MAX);
        assert_eq!(limited_bundle_len(65_536, 65536, false), 65_535 * 65536 + 1);
    }
}
