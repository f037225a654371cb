//! Lease groups: a leader reads once into a [`FixedBuf`], and at its completion every member
//! starts on a `Lease` of the bytes read (sends, writes; or, for a read-in lease, reads into
//! disjoint ranges of the buffer). Members waiting for their leader are not ops yet: cancelling
//! them by token or descriptor ends them here. The lease's state (`Lease`, `Member`) is in
//! `crate::lease`.

use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};

use crate::buf::SendBuf;
use crate::error::{Error, Result};
use crate::fixed::FixedBuf;
use crate::lease::{Lease, Member, MemberKind};

use super::op::{errno_error, OpId, OpKind};
use super::send::GiveBack;
use super::submit::OpCqe;
use super::{Completion, Driver, Event, Fd};

/// A lease group's leader: reads into `buf`, then starts `members` on what it read.
pub(super) struct LeaderOp {
    pub(super) fd: Fd,
    buf: Option<FixedBuf>,
    offset: u64,
    pub(super) members: Vec<Member>,
}

impl LeaderOp {
    /// A read into the whole buffer: `READ_FIXED` where it is in this ring's table (`table`).
    pub(super) fn sqe(&self, table: Option<usize>) -> squeue::Entry {
        let fd = types::Fd(self.fd.as_raw_fd());
        let buf = self
            .buf
            .as_ref()
            .expect("a leader in flight owns its buffer");
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        match buf.slot_in(table) {
            Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
                .offset(self.offset)
                .build(),
            None => opcode::Read::new(fd, ptr, len).offset(self.offset).build(),
        }
    }
}

/// A lease member writing the leased bytes to `fd` at `offset`.
pub(super) struct LeaseWriteOp {
    pub(super) fd: Fd,
    lease: Lease,
    offset: u64,
}

impl LeaseWriteOp {
    pub(super) fn sqe(&self, table: Option<usize>) -> squeue::Entry {
        let fd = types::Fd(self.fd.as_raw_fd());
        let (ptr, len) = (self.lease.as_ptr(), self.lease.len() as u32);
        match self.lease.fixed_slot_in(table) {
            Some(i) => opcode::WriteFixed::new(fd, ptr, len, i)
                .offset(self.offset)
                .build(),
            None => opcode::Write::new(fd, ptr, len).offset(self.offset).build(),
        }
    }
}

/// A read-in lease member reading from `fd` at `offset` into its `range` of the buffer.
pub(super) struct LeaseReadOp {
    pub(super) fd: Fd,
    lease: Lease,
    offset: u64,
    range: std::ops::Range<usize>,
}

impl LeaseReadOp {
    pub(super) fn sqe(&self, table: Option<usize>) -> squeue::Entry {
        let fd = types::Fd(self.fd.as_raw_fd());
        // Inside the buffer: `check_read_in` made sure of it.
        let ptr = self.lease.base_ptr().wrapping_add(self.range.start);
        let len = self.range.len() as u32;
        match self.lease.fixed_slot_in(table) {
            Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
                .offset(self.offset)
                .build(),
            None => opcode::Read::new(fd, ptr, len).offset(self.offset).build(),
        }
    }
}

/// A read-in group has only `read_into` members whose ranges lie inside the buffer and do not
/// overlap; other groups have none.
fn check_read_in(members: &[Member], len: usize) -> Result<()> {
    let read_in = members.iter().filter(|m| m.is_read_into()).count();
    if read_in == 0 {
        return Ok(());
    }
    if read_in != members.len() {
        return Err(Error::InvalidArgument {
            what: "a read-in lease has only read_into members: nobody may read bytes being written",
        });
    }
    let mut ranges: Vec<_> = members
        .iter()
        .filter_map(|m| match &m.kind {
            MemberKind::ReadInto { range, .. } => Some(range.clone()),
            _ => None,
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let inside = ranges.iter().all(|r| r.start <= r.end && r.end <= len);
    let disjoint = ranges.windows(2).all(|w| w[0].end <= w[1].start);
    if !inside || !disjoint {
        return Err(Error::InvalidArgument {
            what: "read_into ranges must lie inside the buffer and must not overlap",
        });
    }
    Ok(())
}

/// A leader read's result; after a short read, zeroes the rest of `buf` so no stale bytes can
/// be seen through the lease.
fn buf_result(buf: &mut FixedBuf, res: i32) -> Result<usize> {
    if res < 0 {
        return Err(if res == -libc::ECANCELED {
            Error::Cancelled
        } else {
            errno_error("lease leader read", res)
        });
    }
    let n = res as usize;
    buf[n..].fill(0);
    Ok(n)
}

impl Driver {
    /// A **lease group**: the leader reads from `fd` at `offset` (`u64::MAX`: the file position)
    /// into `buf` (registered: `READ_FIXED`), then lends the bytes it read, read-only, to every
    /// member at once (sends to many sockets, writes to many files); the buffer comes back in
    /// [`Event::LeaseReturned`] (this call's token) after the last member and its last
    /// zero-copy notification.
    ///
    /// - Members start only after the leader succeeded, all in one batch as it completes (not
    ///   linked to it: a linked member would have to be sized before the read, and would send
    ///   stale bytes after a short read).
    /// - A failed leader cancels every member: each completes with [`Error::Cancelled`], and
    ///   the buffer comes back at once.
    /// - One member's failure does not cancel the others; each reports its own result under
    ///   its own token ([`Event::Sent`], [`Event::Written`]). A zero-copy send member then
    ///   reports, in [`Event::Returned`], when its notification came and it let go of the lease.
    /// - After a short read, members see only the bytes read, and the rest of the buffer is
    ///   zeroed before anyone can look at it, so no stale data leaks.
    /// - The leader completes with [`Event::LeaseFilled`], whose [`Lease`] may be lent again
    ///   (read-only leases share freely). No member selects a buffer (no member type can).
    /// - A **read-in lease** has only [`Member::read_into`] members, each writing its own part
    ///   of the buffer (disjoint ranges, checked); its lease is never handed out, so nobody can
    ///   read bytes being written, and a short member read zeroes the rest of its range.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd, Member};
    /// use std::io::Read;
    /// let mut driver = Driver::new(Default::default())?;
    /// let file = Fd::from(std::os::fd::OwnedFd::from(std::fs::File::open("Cargo.toml").unwrap()));
    /// let (a, mut peer_a) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let (b, mut peer_b) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let (a, b) = (Fd::from(std::os::fd::OwnedFd::from(a)), Fd::from(std::os::fd::OwnedFd::from(b)));
    /// let buf = driver.fixed_buf_or_plain(16)?;
    /// driver.lease_group(&file, buf, 0, vec![Member::send(&a, 1), Member::send_zc(&b, 2)], 9)?;
    /// let mut returned = None;
    /// while returned.is_none() {
    ///     driver.wait(None)?;
    ///     while let Some(c) = driver.pop() {
    ///         if let Event::LeaseReturned(buf) = c.event {
    ///             returned = Some(buf);
    ///         }
    ///     }
    /// }
    /// let (mut x, mut y) = ([0u8; 16], [0u8; 16]);
    /// peer_a.read_exact(&mut x).unwrap();
    /// peer_b.read_exact(&mut y).unwrap();
    /// assert_eq!(x, y); // both got the same 16 bytes, read from the file once
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn lease_group(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        offset: u64,
        members: Vec<Member>,
        token: u64,
    ) -> Result<OpId> {
        if buf.len() > u32::MAX as usize {
            return Err(Error::InvalidArgument {
                what: "a leased buffer holds at most 4 GiB",
            });
        }
        check_read_in(&members, buf.len())?;
        let kind = OpKind::Leader(Box::new(LeaderOp {
            fd: fd.clone(),
            buf: Some(buf),
            offset,
            members,
        }));
        Ok(self.start(kind, token))
    }

    /// The CQE of a lease group's leader: its members start on what it read, or end.
    pub(super) fn complete_leader(&mut self, c: OpCqe) {
        let OpKind::Leader(op) = &mut self.ops[c.key].kind else {
            unreachable!("complete_leader on a leader")
        };
        let mut buf = op.buf.take().expect("a leader in flight owns its buffer");
        let members = std::mem::take(&mut op.members);
        self.ops.remove(c.key);
        let mut result = buf_result(&mut buf, c.res);
        if (c.cancelled || self.dropping) && result.is_ok() {
            // A cancelled group (or a driver going away) starts no members, even if
            // the read itself finished before the cancel reached it.
            result = Err(Error::Cancelled);
        }
        self.leader_done(c.token, c.id, result, buf, members);
    }

    /// The leader of a lease group completed: lend its bytes to the members, or cancel them.
    fn leader_done(
        &mut self,
        token: u64,
        id: OpId,
        result: Result<usize>,
        buf: FixedBuf,
        members: Vec<Member>,
    ) {
        let n = match result {
            Ok(n) => n,
            Err(e) => return self.leader_failed(token, id, e, buf, members),
        };
        // A read-in lease's members write into the buffer: nobody may read it meanwhile.
        let read_in = members.iter().any(Member::is_read_into);
        let lease = Lease::new(buf, n, token, self.lease_returns.clone());
        self.ready.push_back(Completion {
            token,
            op: id,
            event: Event::LeaseFilled {
                result: Ok(n),
                lease: (!read_in).then(|| lease.clone()),
            },
            more: true,
        });
        for m in members {
            self.start_member(m, &lease);
        }
    }

    /// A failed (or cancelled) leader: every member ends cancelled, the buffer comes back.
    fn leader_failed(
        &mut self,
        token: u64,
        id: OpId,
        e: Error,
        buf: FixedBuf,
        members: Vec<Member>,
    ) {
        self.ready.push_back(Completion {
            token,
            op: id,
            event: Event::LeaseFilled {
                result: Err(e),
                lease: None,
            },
            more: true,
        });
        for m in members {
            self.ready.push_back(Completion {
                token: m.token,
                op: OpId::NONE,
                event: m.cancelled_event(),
                more: false,
            });
        }
        self.ready.push_back(Completion {
            token,
            op: id,
            event: Event::LeaseReturned(buf),
            more: false,
        });
    }

    /// Starts one member on its clone of `lease`.
    fn start_member(&mut self, m: Member, lease: &Lease) {
        match m.kind {
            MemberKind::Send { fd, zc } => {
                // Each member says when it let go of the lease: a plain send in its `Sent`
                // (which carries its clone), a zero-copy send in a later `Returned`, after
                // its notification. A server can tell which member still holds a lease.
                let give_back = if zc {
                    GiveBack::Later
                } else {
                    GiveBack::InSent
                };
                // A leased range is always inside its buffer: this cannot fail.
                let _ = self.start_send(
                    &fd,
                    SendBuf::Leased(lease.clone()),
                    None,
                    zc,
                    give_back,
                    m.token,
                );
            }
            MemberKind::Write { fd, offset } => {
                let kind = OpKind::LeaseWrite(LeaseWriteOp {
                    fd,
                    lease: lease.clone(),
                    offset,
                });
                self.start(kind, m.token);
            }
            MemberKind::ReadInto { fd, offset, range } => {
                let kind = OpKind::LeaseRead(LeaseReadOp {
                    fd,
                    lease: lease.clone(),
                    offset,
                    range,
                });
                self.start(kind, m.token);
            }
        }
    }

    /// The CQE of a read-in member: a short read zeroes the rest of its range.
    pub(super) fn complete_lease_read(&mut self, c: OpCqe) {
        let OpKind::LeaseRead(op) = &self.ops[c.key].kind else {
            unreachable!("complete_lease_read on a read-in member")
        };
        let (res, range) = (c.res, &op.range);
        if res >= 0 && (res as usize) < range.len() {
            // A short read: zero the rest of the range, so no stale byte comes back.
            let from = range.start + res as usize;
            // SAFETY: `from..range.end` lies inside the buffer (checked at submit); the
            // kernel is done with this range (this is the op's final CQE), other members
            // write only their own disjoint ranges, and a read-in lease is never handed
            // out, so no reference to these bytes exists.
            unsafe {
                op.lease
                    .base_ptr()
                    .add(from)
                    .write_bytes(0, range.end - from)
            };
        }
        self.ops.remove(c.key);
        let result = match res {
            r if r >= 0 => Ok(r as usize),
            r if r == -libc::ECANCELED => Err(Error::Cancelled),
            r => Err(errno_error("read", r)),
        };
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event: Event::ReadInto { result },
            more: false,
        });
    }

    /// The CQE of a write member.
    pub(super) fn complete_lease_write(&mut self, c: OpCqe) {
        self.ops.remove(c.key);
        let result = match c.res {
            r if r >= 0 => Ok(r as usize),
            r if r == -libc::ECANCELED => Err(Error::Cancelled),
            r => Err(errno_error("write", r)),
        };
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event: Event::Written { result },
            more: false,
        });
    }

    /// Members of lease groups whose leader is still reading are not ops yet: those `which`
    /// picks end here, with their cancelled completion.
    pub(super) fn drop_waiting_members(&mut self, which: impl Fn(&Member) -> bool) {
        let mut dropped = Vec::new();
        for (_, slot) in self.ops.iter_mut() {
            let members = match &mut slot.kind {
                OpKind::Leader(op) => &mut op.members,
                OpKind::Pages(op) => match op.waiting_members() {
                    Some(members) => members,
                    None => continue,
                },
                _ => continue,
            };
            members.retain(|m| {
                let drop = which(m);
                if drop {
                    dropped.push(m.clone());
                }
                !drop
            });
        }
        for m in dropped {
            self.ready.push_back(Completion {
                token: m.token,
                op: OpId::NONE,
                event: m.cancelled_event(),
                more: false,
            });
        }
        // Pages members waiting for their turn at a sink are not ops either.
        self.drop_parked_pages_members(&which);
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
        drop(returns);
        self.collect_pages_returns();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor for members that never run: the checks look at kinds and ranges only.
    fn fd() -> Fd {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Fd::from(std::os::fd::OwnedFd::from(a))
    }

    fn read_into(fd: &Fd, range: std::ops::Range<usize>) -> Member {
        Member::read_into(fd, 0, range, 1)
    }

    fn refusal(result: Result<()>) -> &'static str {
        match result {
            Err(Error::InvalidArgument { what }) => what,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn groups_without_read_in_members_are_not_checked() {
        let fd = fd();
        assert!(check_read_in(&[], 0).is_ok());
        let readers = [
            Member::send(&fd, 1),
            Member::send_zc(&fd, 2),
            Member::write(&fd, 0, 3),
        ];
        assert!(check_read_in(&readers, 0).is_ok());
    }

    #[test]
    fn disjoint_read_in_ranges_inside_the_buffer_pass_in_any_order() {
        let fd = fd();
        let members = [
            read_into(&fd, 8..16),
            read_into(&fd, 0..8),
            read_into(&fd, 16..16),
        ];
        assert!(check_read_in(&members, 16).is_ok());
        assert!(check_read_in(&[read_into(&fd, 0..16)], 16).is_ok());
    }

    #[test]
    fn overlapping_read_in_ranges_are_refused() {
        let fd = fd();
        for (a, b) in [(0..8, 7..9), (0..16, 4..8), (4..8, 4..8)] {
            let members = [read_into(&fd, b.clone()), read_into(&fd, a.clone())];
            let what = refusal(check_read_in(&members, 16));
            assert!(what.contains("must not overlap"), "{a:?} {b:?}: {what}");
        }
    }

    #[test]
    fn read_in_ranges_outside_the_buffer_are_refused() {
        let fd = fd();
        let reversed = std::ops::Range { start: 8, end: 4 };
        for range in [8..17, 16..17, reversed] {
            let what = refusal(check_read_in(&[read_into(&fd, range.clone())], 16));
            assert!(what.contains("inside the buffer"), "{range:?}: {what}");
        }
    }

    #[test]
    fn read_in_members_do_not_mix_with_readers() {
        let fd = fd();
        for other in [Member::send(&fd, 2), Member::write(&fd, 0, 2)] {
            let what = refusal(check_read_in(&[read_into(&fd, 0..8), other], 16));
            assert!(what.contains("only read_into members"), "{what}");
        }
    }

    #[test]
    fn a_short_leader_read_zeroes_the_rest_of_the_buffer() {
        let mem = crate::sys::Mmap::anonymous(4096).unwrap();
        let mut buf = FixedBuf::new(mem, 16, None);
        buf.fill(0xaa);
        assert_eq!(buf_result(&mut buf, 5).unwrap(), 5);
        assert!(buf[..5].iter().all(|&b| b == 0xaa));
        assert!(buf[5..].iter().all(|&b| b == 0));
        assert!(matches!(
            buf_result(&mut buf, -libc::ECANCELED),
            Err(Error::Cancelled)
        ));
        let e = buf_result(&mut buf, -libc::EIO).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }
}
