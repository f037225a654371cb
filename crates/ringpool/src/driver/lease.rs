//! Leased buffers: a leader read fills a buffer and lends it to its members, started in one
//! batch at the leader's completion; a failed leader cancels them.

use super::*;

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

    /// Refuses a buffer group or send ring made by another driver (`owner`): its bgid names
    /// another group here, or none, and the buffer ids this ring's completions carry would be
    /// taken from the wrong group, memory the other ring's kernel may be writing.
    pub(super) fn check_owner(&self, owner: u64, what: &'static str) -> Result<()> {
        if owner == self.ring_id {
            return Ok(());
        }
        Err(Error::NotOurs { what })
    }

    /// The leader of a lease group completed: lend its bytes to the members, or cancel them.
    pub(super) fn leader_done(
        &mut self,
        token: u64,
        id: OpId,
        result: Result<usize>,
        buf: FixedBuf,
        members: Vec<Member>,
    ) {
        let n = match result {
            Ok(n) => n,
            Err(e) => {
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
                return;
            }
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
                    let kind = OpKind::LeaseWrite {
                        fd,
                        lease: lease.clone(),
                        offset,
                    };
                    self.start(kind, m.token);
                }
                MemberKind::ReadInto { fd, offset, range } => {
                    let kind = OpKind::LeaseRead {
                        fd,
                        lease: lease.clone(),
                        offset,
                        range,
                    };
                    self.start(kind, m.token);
                }
            }
        }
    }
}

/// A read-in group has only `read_into` members whose ranges lie inside the buffer and do not
/// overlap; other groups have none.
pub(super) fn check_read_in(members: &[Member], len: usize) -> Result<()> {
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

/// Completions.
impl Driver {
    /// A lease's leader read completed: its members start, or are cancelled with it.
    pub(super) fn complete_leader(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            cancelled,
            res,
            ..
        } = done;
        let OpKind::Leader(op) = &mut self.ops[key].kind else {
            unreachable!("routed here by its kind");
        };
        let mut buf = op.buf.take().expect("a leader in flight owns its buffer");
        let members = std::mem::take(&mut op.members);
        self.ops.remove(key);
        let mut result = buf_result(&mut buf, res);
        if (cancelled || self.dropping) && result.is_ok() {
            // A cancelled group (or a driver going away) starts no members, even if
            // the read itself finished before the cancel reached it.
            result = Err(Error::Cancelled);
        }
        self.leader_done(token, id, result, buf, members);
    }

    /// A member's read into its range of a lease completed (a short read zeroes the rest of the range).
    pub(super) fn complete_lease_read(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            res,
            ..
        } = done;
        let OpKind::LeaseRead { lease, range, .. } = &mut self.ops[key].kind else {
            unreachable!("routed here by its kind");
        };
        if res >= 0 && (res as usize) < range.len() {
            // A short read: zero the rest of the range, so no stale byte comes back.
            let from = range.start + res as usize;
            // SAFETY: `from..range.end` lies inside the buffer (checked at submit); the
            // kernel is done with this range (its final CQE is here), other members
            // write only their own disjoint ranges, and a read-in lease is never handed
            // out, so no reference to these bytes exists.
            unsafe { lease.base_ptr().add(from).write_bytes(0, range.end - from) };
        }
        self.ops.remove(key);
        let result = match res {
            r if r >= 0 => Ok(r as usize),
            r if r == -libc::ECANCELED => Err(Error::Cancelled),
            r => Err(errno_error("read", r)),
        };
        self.ready.push_back(Completion {
            token,
            op: id,
            event: Event::ReadInto { result },
            more: false,
        });
    }

    /// A member's write from a lease completed.
    pub(super) fn complete_lease_write(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            res,
            ..
        } = done;
        self.ops.remove(key);
        let result = match res {
            r if r >= 0 => Ok(r as usize),
            r if r == -libc::ECANCELED => Err(Error::Cancelled),
            r => Err(errno_error("write", r)),
        };
        self.ready.push_back(Completion {
            token,
            op: id,
            event: Event::Written { result },
            more: false,
        });
    }
}

/// A lease's leader read, fixed where the buffer is in this ring's table.
pub(super) fn leader_sqe(kind: &mut OpKind, table: Option<usize>) -> squeue::Entry {
    let OpKind::Leader(op) = kind else {
        unreachable!("routed here by its kind");
    };

    let fd = types::Fd(op.fd.as_raw_fd());
    let buf = op.buf.as_ref().expect("a leader in flight owns its buffer");
    let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
    match buf.slot_in(table) {
        Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
            .offset(op.offset)
            .build(),
        None => opcode::Read::new(fd, ptr, len).offset(op.offset).build(),
    }
}

/// A member's write from the lease.
pub(super) fn lease_write_sqe(kind: &mut OpKind, table: Option<usize>) -> squeue::Entry {
    let OpKind::LeaseWrite { fd, lease, offset } = kind else {
        unreachable!("routed here by its kind");
    };

    let fd = types::Fd(fd.as_raw_fd());
    let (ptr, len) = (lease.as_ptr(), lease.len() as u32);
    match lease.fixed_slot_in(table) {
        Some(i) => opcode::WriteFixed::new(fd, ptr, len, i)
            .offset(*offset)
            .build(),
        None => opcode::Write::new(fd, ptr, len).offset(*offset).build(),
    }
}

/// A member's read into its range of the lease.
pub(super) fn lease_read_sqe(kind: &mut OpKind, table: Option<usize>) -> squeue::Entry {
    let OpKind::LeaseRead {
        fd,
        lease,
        offset,
        range,
    } = kind
    else {
        unreachable!("routed here by its kind");
    };

    let fd = types::Fd(fd.as_raw_fd());
    // Inside the buffer: `check_read_in` made sure of it.
    let ptr = lease.base_ptr().wrapping_add(range.start);
    let len = range.len() as u32;
    match lease.fixed_slot_in(table) {
        Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
            .offset(*offset)
            .build(),
        None => opcode::Read::new(fd, ptr, len).offset(*offset).build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Fd {
        Fd::from(std::os::fd::OwnedFd::from(
            std::fs::File::open("/dev/null").unwrap(),
        ))
    }

    fn into(fd: &Fd, range: std::ops::Range<usize>) -> Member {
        Member::read_into(fd, 0, range, 0)
    }

    #[test]
    fn read_in_ranges_inside_and_disjoint_are_accepted_in_any_order() {
        let fd = fd();
        let members = [into(&fd, 8..16), into(&fd, 0..8), into(&fd, 16..16)];
        assert!(check_read_in(&members, 16).is_ok());
        // No read-in member at all: nothing to check.
        assert!(check_read_in(&[Member::send(&fd, 1), Member::write(&fd, 0, 2)], 0).is_ok());
    }

    #[test]
    fn read_in_ranges_that_overlap_or_leave_the_buffer_are_refused() {
        let fd = fd();
        let refused = |members: &[Member], len| {
            matches!(
                check_read_in(members, len),
                Err(Error::InvalidArgument { what }) if what.contains("inside the buffer")
            )
        };
        assert!(refused(&[into(&fd, 0..9), into(&fd, 8..16)], 16), "overlap");
        assert!(refused(&[into(&fd, 0..17)], 16), "past the end");
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = into(&fd, 9..8);
        assert!(refused(&[backwards], 16), "start after end");
    }

    #[test]
    fn a_read_in_lease_has_no_other_members() {
        let fd = fd();
        let mixed = [into(&fd, 0..8), Member::send(&fd, 1)];
        assert!(matches!(
            check_read_in(&mixed, 16),
            Err(Error::InvalidArgument { what }) if what.contains("only read_into members")
        ));
    }
}
