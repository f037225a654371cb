//! Sends: plain and zero-copy, per-socket lanes that keep order, the adaptive zero-copy policy,
//! and the notification that hands a buffer home (one user completion per send).

use super::*;

impl Driver {
    /// Sends all of `buf` on `fd` with a plain send (the kernel copies), continuing short
    /// sends; one [`Event::Sent`] completion that returns `buf`.
    ///
    /// Sends on one socket complete in order, whatever their kind: they queue in the socket's
    /// lane and go out as linked chains. The result is `Ok(len)` only once all of `buf` left;
    /// a send that ends part-way (cancelled, or failed after some bytes went) is
    /// [`Error::ShortSend`] with the bytes that did.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// let mut driver = Driver::new(Default::default())?;
    /// let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let sock = Fd::from(std::os::fd::OwnedFd::from(ours));
    /// driver.send(&sock, b"hello".to_vec(), 1)?;
    /// driver.wait(None)?;
    /// let c = driver.pop().unwrap();
    /// assert!(matches!(c.event, Event::Sent { result: Ok(5), .. }));
    /// # drop(peer);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn send(&mut self, fd: &Fd, buf: impl Into<SendBuf>, token: u64) -> Result<OpId> {
        self.start_send(fd, buf.into(), None, false, GiveBack::InSent, token)
    }

    /// Sends all of `buf` on `fd` with zero-copy where the policy says it pays
    /// ([`ZcConfig`]), else plainly. One completion, [`Event::Sent`], as soon as the bytes are
    /// queued, so the next send can go at once; the buffer stays pinned until the kernel's
    /// notification and then goes home by itself (a pooled buffer to its group, owned bytes are
    /// freed). Sends on one socket complete in order.
    ///
    /// Zero-copy send is 6.0+ (`SENDMSG_ZC` 6.1+); older kernels send plainly.
    pub fn send_zc(&mut self, fd: &Fd, buf: impl Into<SendBuf>, token: u64) -> Result<OpId> {
        self.start_send(fd, buf.into(), None, true, GiveBack::Never, token)
    }

    /// Like [`Driver::send_zc`], but hands the buffer back in an [`Event::Returned`] completion
    /// (same token) once the kernel is done with it; the `Sent` completion then has `more` set.
    pub fn send_zc_returning(
        &mut self,
        fd: &Fd,
        buf: impl Into<SendBuf>,
        token: u64,
    ) -> Result<OpId> {
        self.start_send(fd, buf.into(), None, true, GiveBack::Later, token)
    }

    /// Like [`Driver::send_zc`], to `dest` (an unconnected datagram socket).
    pub fn send_zc_to(
        &mut self,
        fd: &Fd,
        buf: impl Into<SendBuf>,
        dest: std::net::SocketAddr,
        token: u64,
    ) -> Result<OpId> {
        self.start_send(
            fd,
            buf.into(),
            Some(sockaddr(dest)),
            true,
            GiveBack::Never,
            token,
        )
    }

    pub(super) fn start_send(
        &mut self,
        fd: &Fd,
        buf: SendBuf,
        dest: Option<(libc::sockaddr_storage, libc::socklen_t)>,
        zc: bool,
        give_back: GiveBack,
        token: u64,
    ) -> Result<OpId> {
        check_send_range(&buf)?;
        let lane_key = Rc::as_ptr(&fd.0) as usize;
        let backing_off = self.zc_backing_off;
        let gen = self.next_gen();
        if self.lanes.len() > self.lane_sweep_at {
            // Forget lanes of sockets that are gone (amortised: the bound doubles with the map).
            self.lanes
                .retain(|_, l| !(l.idle() && l.fd.strong_count() == 0));
            self.lane_sweep_at = (self.lanes.len() * 2).max(1024);
        }
        let policy = if backing_off {
            LanePolicy::backed_off()
        } else {
            LanePolicy::default()
        };
        let lane = match self.lanes.entry(lane_key) {
            Entry::Occupied(e) if e.get().fd.strong_count() > 0 => e.into_mut(),
            // A socket at the address of a gone one, whose lane is idle (its sends kept it alive
            // while they ran): start afresh.
            Entry::Occupied(mut e) => {
                e.insert(Lane::new(Rc::downgrade(&fd.0), policy));
                e.into_mut()
            }
            Entry::Vacant(e) => e.insert(Lane::new(Rc::downgrade(&fd.0), policy)),
        };
        let op = SendOp {
            fd: Some(fd.clone()),
            buf: Some(buf),
            sent: 0,
            iov: Vec::new(),
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            dest,
            zc,
            give_back,
            notif_attempts: Vec::new(),
            cur_ud: 0,
            reported: false,
            in_flight_zc: false,
            lane: lane_key,
        };
        let key = self.ops.insert(OpSlot {
            token,
            gen,
            kind: OpKind::Send(match self.spare_sends.pop() {
                Some(mut spare) => {
                    let iov = std::mem::take(&mut spare.iov);
                    *spare = SendOp { iov, ..op };
                    spare
                }
                None => Box::new(op),
            }),
            state: SlotState::Queued,
            cancel: false,
        });
        if lane.queue.is_empty() && lane.in_flight == 0 {
            self.dirty_lanes.push(lane_key);
        }
        lane.queue.push_back(key);
        Ok(OpId::new(key, gen, self.ring_id))
    }

    /// Zero-copy statistics.
    pub fn zc_stats(&self) -> ZcStats {
        self.zc_stats
    }

    /// Builds a send's SQE: plain, `SENDMSG_ZC` or `SEND_ZC` (one buffer), as the ladder and the
    /// lane's policy say. With `link`, the next SQE of the lane's chain waits for this one.
    /// Returns whether it linked: a `SEND_ZC` that covers only the first of several buffers
    /// ends the chain, so its continuation can go before anything newer.
    pub(super) fn arm_send(&mut self, key: usize, link: bool) -> bool {
        let (ladder, cfg) = (self.ladder, self.zc_cfg);
        // Registered memory of another ring's table goes as plain memory (`fixed::slot_in`).
        let table = self.fixed.as_ref().map(FixedTable::id);
        let attempt = self.next_gen();
        let slot = &mut self.ops[key];
        let ud = user_data(key, attempt);
        slot.state = SlotState::InKernel;
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("arm_send on a send")
        };
        let op = &mut **op;
        let buf = op.buf.as_ref().expect("a send in flight owns its buffer");
        buf.iovecs(op.sent, &mut op.iov);
        // An empty send goes plainly: SEND_ZC of nothing from a fixed buffer is EFAULT.
        let fixed_slot = if ladder.fixed && buf.len() > op.sent {
            buf.fixed_slot_in(table)
        } else {
            None
        };
        let remaining = buf.len() - op.sent;
        let lane = self
            .lanes
            .get_mut(&op.lane)
            .expect("a send's lane lives while it has sends");
        let zc = op.zc
            && remaining > 0
            && ladder.zc != ZcRung::Plain
            && lane
                .policy
                .wants_zc(&cfg, ladder.zc_report_usage, remaining);
        op.in_flight_zc = zc;
        op.cur_ud = ud;
        op.msg.msg_iov = op.iov.as_mut_ptr();
        op.msg.msg_iovlen = op.iov.len();
        if let Some((addr, len)) = &op.dest {
            op.msg.msg_name = (addr as *const libc::sockaddr_storage).cast_mut().cast();
            op.msg.msg_namelen = *len;
        }
        let (sqe, linked) = send_sqe(op, zc, fixed_slot, ladder, link, &mut self.zc_stats);
        let sqe = if linked {
            sqe.flags(squeue::Flags::IO_LINK)
        } else {
            sqe
        };
        self.push(sqe.user_data(ud));
        linked
    }

    /// Starts the next chain of every lane that is idle and has sends queued.
    pub(super) fn flush_lanes(&mut self) {
        /// Longest chain submitted at once.
        const MAX_CHAIN: usize = 64;
        let dirty = std::mem::take(&mut self.dirty_lanes);
        for lane_key in dirty {
            let Some(lane) = self.lanes.get_mut(&lane_key) else {
                continue;
            };
            if lane.in_flight > 0 {
                continue;
            }
            if lane.queue.is_empty() {
                continue;
            }
            // A link chain cannot span two submissions: the kernel ends a chain at the end of a
            // submit, and the rest would run beside it, out of order. Make room for the whole
            // chain first (and never build one longer than the queue).
            let capacity = self.ring.submission().capacity();
            let n = lane.queue.len().min(MAX_CHAIN).min(capacity);
            let chain: Vec<usize> = lane.queue.drain(..n).collect();
            // (A submit that found the completion queue full reaps, and what it dispatches may
            // push SQEs of its own: check the room again until the whole chain fits.)
            while capacity - self.ring.submission().len() < n {
                self.submit_queued();
            }
            for (i, &key) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                self.lanes.get_mut(&lane_key).expect("lane").in_flight += 1;
                if !self.arm_send(key, !last) && !last {
                    // The chain ends early: the rest waits for the next one, in order.
                    let lane = self.lanes.get_mut(&lane_key).expect("lane");
                    for &k in chain[i + 1..].iter().rev() {
                        lane.queue.push_front(k);
                    }
                    break;
                }
            }
        }
    }

    /// A send's result is final: tell the user, and free the slot unless notifications are
    /// still to come.
    pub(super) fn report_send(&mut self, key: usize, result: Result<usize>) {
        let slot = &mut self.ops[key];
        let (token, id) = (slot.token, OpId::new(key, slot.gen, self.ring_id));
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("report_send on a send")
        };
        op.reported = true;
        op.fd = None;
        let (give_back, notifs) = (op.give_back, op.notif_attempts.len());
        if notifs > 0 {
            slot.state = SlotState::Notif;
            self.internal += 1;
            let more = give_back == GiveBack::Later;
            self.ready.push_back(Completion {
                token,
                op: id,
                event: Event::Sent { result, buf: None },
                more,
            });
            return;
        }
        let buf = op.buf.take();
        self.free_send(key);
        match give_back {
            GiveBack::InSent => self.ready.push_back(Completion {
                token,
                op: id,
                event: Event::Sent { result, buf },
                more: false,
            }),
            GiveBack::Never => {
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Sent { result, buf: None },
                    more: false,
                });
                drop(buf);
            }
            GiveBack::Later => {
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Sent { result, buf: None },
                    more: true,
                });
                let buf = buf.expect("a send owns its buffer until it ends");
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Returned(buf),
                    more: false,
                });
            }
        }
    }

    /// Frees a finished send's slot and keeps its op for reuse.
    pub(super) fn free_send(&mut self, key: usize) {
        if let OpKind::Send(op) = self.ops.remove(key).kind {
            if self.spare_sends.len() < 1024 {
                self.spare_sends.push(op);
            }
        }
    }

    /// A CQE of a send: its result, or a zero-copy notification.
    pub(super) fn send_completion(&mut self, key: usize, attempt: u32, res: i32, flags: u32) {
        if cqueue::notif(flags) {
            self.send_notified(key, attempt, res);
        } else {
            self.send_result(key, attempt, res, flags);
        }
    }

    /// A zero-copy notification of attempt `attempt`: the kernel let go of the memory. The
    /// last one after the result frees the send (and hands a `GiveBack::Later` buffer back).
    fn send_notified(&mut self, key: usize, attempt: u32, res: i32) {
        let slot = &mut self.ops[key];
        let (token, id) = (slot.token, OpId::new(key, slot.gen, self.ring_id));
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("send_completion on a send")
        };
        let lane_key = op.lane;
        let copied = res as u32 & sys::IORING_NOTIF_USAGE_ZC_COPIED != 0;
        self.zc_stats.notifications += 1;
        self.zc_stats.zc_copied += copied as u64;
        if self.ladder.zc_report_usage {
            if let Some(lane) = self.lanes.get_mut(&lane_key) {
                lane.policy.notified(copied);
                self.zc_backing_off = lane.policy.backing_off();
            }
        }
        op.notif_attempts.retain(|&a| a != attempt);
        if op.notif_attempts.is_empty() && op.reported {
            self.internal -= 1;
            let buf = op.buf.take();
            let give_back = op.give_back;
            self.free_send(key);
            match (give_back, buf) {
                (GiveBack::Later, Some(buf)) => self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Returned(buf),
                    more: false,
                }),
                // Pooled buffers go home here; owned bytes are freed.
                (_, buf) => drop(buf),
            }
        }
    }

    /// The result of attempt `attempt`: a short send goes again in order, a broken chain
    /// shares its error, and a finished send is reported (its memory kept while a
    /// notification is still due).
    fn send_result(&mut self, key: usize, attempt: u32, res: i32, flags: u32) {
        let slot = &mut self.ops[key];
        let cancelled = slot.cancel;
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("send_completion on a send")
        };
        let lane_key = op.lane;
        if cqueue::more(flags) {
            op.notif_attempts.push(attempt);
        }
        if res > 0 {
            op.sent += res as usize;
            if op.in_flight_zc {
                self.zc_stats.zc_bytes += res as u64;
            } else if op.zc {
                self.zc_stats.plain_bytes += res as u64;
            }
        }
        let total = op.buf.as_ref().map_or(0, SendBuf::len);
        let lane = self
            .lanes
            .get_mut(&lane_key)
            .expect("a send's lane lives while it has sends");
        lane.in_flight -= 1;
        let outcome = if res >= 0 && op.sent < total && res > 0 && !cancelled {
            // A short send, or one buffer of several through SEND_ZC: the rest goes next.
            lane.requeue.push(key);
            None
        } else if res == -libc::ECANCELED && !cancelled {
            match lane.error {
                // The chain broke on a real error: this send shares it.
                Some(errno) => Some(Err(Error::from_errno("send", errno))),
                // The chain broke on a short send before us: run again, in order.
                None => {
                    lane.requeue.push(key);
                    None
                }
            }
        } else if res < 0 {
            if res != -libc::ECANCELED {
                lane.error = Some(-res);
            }
            if op.sent > 0 {
                // Earlier parts went: the caller must know how much, or its stream breaks.
                Some(Err(Error::ShortSend {
                    sent: op.sent,
                    len: total,
                }))
            } else {
                Some(Err(errno_error("send", res)))
            }
        } else if op.sent < total {
            // Cancelled part-way (the kernel reports the bytes it sent before the cancel), or a
            // send of no bytes: never `Ok`, which says all of it left.
            Some(Err(Error::ShortSend {
                sent: op.sent,
                len: total,
            }))
        } else {
            Some(Ok(op.sent))
        };
        if lane.in_flight == 0 {
            lane.chain_done();
            self.dirty_lanes.push(lane_key);
        }
        match outcome {
            Some(result) => self.report_send(key, result),
            None => self.ops[key].state = SlotState::Queued,
        }
    }
}

/// A fixed buffer's range must lie inside it (every send path checks before it queues).
pub(super) fn check_send_range(buf: &SendBuf) -> Result<()> {
    match buf {
        SendBuf::Fixed { buf, range } if range.start > range.end || range.end > buf.len() => {
            Err(Error::InvalidArgument {
                what: "send range outside the registered buffer",
            })
        }
        _ => Ok(()),
    }
}

/// The SQE of one attempt of a send: `SENDMSG` where zero-copy does not pay (or is forced off),
/// `SENDMSG_ZC` for several iovecs or plain memory where the kernel has it, else `SEND_ZC`
/// (registered memory by `buf_index`). Also says whether it may be linked to the next send of
/// its lane (a `SEND_ZC` of one buffer of several may not: its rest goes after it).
fn send_sqe(
    op: &mut SendOp,
    zc: bool,
    fixed_slot: Option<u16>,
    ladder: Ladder,
    link: bool,
    stats: &mut ZcStats,
) -> (squeue::Entry, bool) {
    let fd = types::Fd(
        op.fd
            .as_ref()
            .expect("a send owns its socket until its result")
            .as_raw_fd(),
    );
    let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
    let usage = if ladder.zc_report_usage {
        sys::IORING_SEND_ZC_REPORT_USAGE
    } else {
        0
    };
    let msg_ptr: *const libc::msghdr = &op.msg;
    let mut linked = link;
    let sqe = if !zc {
        stats.plain_sends += op.zc as u64;
        opcode::SendMsg::new(fd, msg_ptr)
            .flags(flags as u32)
            .build()
    } else if ladder.zc == ZcRung::SendmsgZc && (op.iov.len() > 1 || fixed_slot.is_none()) {
        stats.zc_sends += 1;
        // Registered iovecs in SENDMSG_ZC came with the vectored fixed ops (6.15).
        match fixed_slot.filter(|_| ladder.vectored_fixed) {
            Some(slot) => {
                stats.fixed_sends += 1;
                let mut sqe = opcode::SendMsgZc::new(fd, msg_ptr)
                    .ioprio(usage | sys::IORING_RECVSEND_FIXED_BUF)
                    .flags(flags as u32)
                    .build();
                sys::sqe_set_buf_index(&mut sqe, slot);
                sqe
            }
            None => opcode::SendMsgZc::new(fd, msg_ptr)
                .ioprio(usage)
                .flags(flags as u32)
                .build(),
        }
    } else {
        stats.zc_sends += 1;
        linked &= op.iov.len() <= 1;
        let (ptr, len) = op.iov.first().map_or((std::ptr::null(), 0), |v| {
            (v.iov_base as *const u8, v.iov_len as u32)
        });
        let mut b = opcode::SendZc::new(fd, ptr, len)
            .zc_flags(usage)
            .buf_index(fixed_slot)
            .flags(flags);
        stats.fixed_sends += fixed_slot.is_some() as u64;
        if let Some((addr, alen)) = &op.dest {
            b = b
                .dest_addr((addr as *const libc::sockaddr_storage).cast())
                .dest_addr_len(*alen);
        }
        b.build()
    };
    (sqe, linked)
}
