//! Sends ([`Driver::send`], `send_zc`, `send_zc_returning`, `send_zc_to`, lease members):
//! every send queues in its socket's lane and leaves in order, as `IOSQE_IO_LINK` chains that
//! never split across submits (`flush_lanes`). Each attempt is plain `SENDMSG`, `SENDMSG_ZC` or
//! `SEND_ZC` as the ladder and the lane's zero-copy policy (`crate::zc`) say (`plan_chain`,
//! `arm_send`); on a stream socket, plain sends in a row share one `SENDMSG` (`riders`, the
//! result split back by `merged_completion`). A result (`send_completion`, `send_outcome`) ends
//! the send, or requeues its rest or a chain a short send broke; zero-copy notifications
//! (`send_notified`) teach the policy and free or return the memory after the last one.

use std::collections::hash_map::Entry;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use io_uring::{cqueue, opcode, squeue, types};

use crate::buf::SendBuf;
use crate::error::{Error, Result};
use crate::fixed::FixedTable;
use crate::probe::{Ladder, ZcRung};
use crate::sys;
use crate::zc::{Lane, LanePolicy, ZcConfig, ZcStats};

use super::op::{errno_error, user_data, OpId, OpKind, OpSlot, SlotState};
use super::udp::sockaddr;
use super::{Completion, Driver, Event, Fd};

/// Where a send's buffer goes once the kernel is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GiveBack {
    /// In the `Sent` completion (plain sends: the kernel is done at the result).
    InSent,
    /// In a later `Returned` completion, after the last notification.
    Later,
    /// Dropped after the last notification: pooled buffers go home, owned bytes are freed.
    Never,
}

/// A send in flight. Boxed, so the `msghdr`, iovecs and address the kernel reads stay put while
/// the op table grows.
pub(super) struct SendOp {
    /// The socket, until the result is in (the kernel holds its own reference after that, so
    /// a send waiting only for its notification does not keep the socket open).
    pub(super) fd: Option<Fd>,
    pub(super) buf: Option<SendBuf>,
    pub(super) sent: usize,
    pub(super) iov: Vec<libc::iovec>,
    pub(super) msg: libc::msghdr,
    pub(super) dest: Option<(libc::sockaddr_storage, libc::socklen_t)>,
    /// `send_zc`: the zero-copy policy applies.
    pub(super) zc: bool,
    pub(super) give_back: GiveBack,
    /// Generations of this op's zero-copy attempts whose notification may still come. Each
    /// attempt (first try, continuation, re-run after a broken chain) has its own `user_data`
    /// generation, so a notification is matched to its attempt, and one the kernel posts after
    /// a result without `F_MORE` (6.18 does, for a linked `SEND_ZC` its broken chain cancelled)
    /// finds no attempt and is ignored instead of landing on a reused slot.
    pub(super) notif_attempts: Vec<u32>,
    /// `user_data` of the SQE in flight (what `cancel` targets).
    pub(super) cur_ud: u64,
    /// The user has seen the result.
    pub(super) reported: bool,
    /// Whether the SQE in flight is a zero-copy one.
    pub(super) in_flight_zc: bool,
    pub(super) lane: usize,
    /// The sends after this one in its lane whose bytes ride in this attempt's `sendmsg`
    /// ([`Ladder::merge_sends`]), in order: its result is split over this send and them.
    pub(super) riders: Vec<usize>,
}

impl SendOp {
    /// Points the iovecs (and the `msghdr`, with the destination of an unconnected socket) at
    /// what is left to send, followed by `riders` (the iovecs of the sends merged into this
    /// one's `sendmsg`). Returns the buffer's slot in this ring's table (`table`: its id)
    /// where a fixed send may use it.
    fn prepare(
        &mut self,
        ladder: &Ladder,
        table: Option<usize>,
        riders: &[libc::iovec],
    ) -> Option<u16> {
        let buf = self.buf.as_ref().expect("a send in flight owns its buffer");
        buf.iovecs(self.sent, &mut self.iov);
        self.iov.extend_from_slice(riders);
        // An empty send goes plainly: SEND_ZC of nothing from a fixed buffer is EFAULT.
        let fixed_slot = if ladder.fixed && buf.len() > self.sent {
            buf.fixed_slot_in(table)
        } else {
            None
        };
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len();
        if let Some((addr, len)) = &self.dest {
            self.msg.msg_name = (addr as *const libc::sockaddr_storage).cast_mut().cast();
            self.msg.msg_namelen = *len;
        }
        fixed_slot
    }

    /// The attempt's SQE: plain `SENDMSG` unless `zc`; `SENDMSG_ZC` where the kernel has it,
    /// for several buffers or unregistered memory; else `SEND_ZC` of the first buffer, after
    /// which a chain cannot go on (the second value says whether it may link).
    fn sqe(
        &self,
        ladder: &Ladder,
        zc: bool,
        fixed_slot: Option<u16>,
        stats: &mut ZcStats,
    ) -> (squeue::Entry, bool) {
        let fd = types::Fd(
            self.fd
                .as_ref()
                .expect("a send owns its socket until its result")
                .as_raw_fd(),
        );
        let flags = (libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32;
        let usage = if ladder.zc_report_usage {
            sys::IORING_SEND_ZC_REPORT_USAGE
        } else {
            0
        };
        let msg_ptr: *const libc::msghdr = &self.msg;
        if !zc {
            stats.plain_sends += self.zc as u64;
            return (opcode::SendMsg::new(fd, msg_ptr).flags(flags).build(), true);
        }
        stats.zc_sends += 1;
        if ladder.zc == ZcRung::SendmsgZc && (self.iov.len() > 1 || fixed_slot.is_none()) {
            // Registered iovecs in SENDMSG_ZC came with the vectored fixed ops (6.15).
            let sqe = match fixed_slot.filter(|_| ladder.vectored_fixed) {
                Some(slot) => {
                    stats.fixed_sends += 1;
                    let mut sqe = opcode::SendMsgZc::new(fd, msg_ptr)
                        .ioprio(usage | sys::IORING_RECVSEND_FIXED_BUF)
                        .flags(flags)
                        .build();
                    sys::sqe_set_buf_index(&mut sqe, slot);
                    sqe
                }
                None => opcode::SendMsgZc::new(fd, msg_ptr)
                    .ioprio(usage)
                    .flags(flags)
                    .build(),
            };
            return (sqe, true);
        }
        let (ptr, len) = self.iov.first().map_or((std::ptr::null(), 0), |v| {
            (v.iov_base as *const u8, v.iov_len as u32)
        });
        let mut b = opcode::SendZc::new(fd, ptr, len)
            .zc_flags(usage)
            .buf_index(fixed_slot)
            .flags(flags as i32);
        stats.fixed_sends += fixed_slot.is_some() as u64;
        if let Some((addr, alen)) = &self.dest {
            b = b
                .dest_addr((addr as *const libc::sockaddr_storage).cast())
                .dest_addr_len(*alen);
        }
        (b.build(), self.iov.len() <= 1)
    }
}

/// Most iovecs one `sendmsg` takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Whether `op`'s next attempt, of its `remaining` bytes, goes zero-copy: a `send_zc`, where
/// the ladder has zero-copy sends and the lane's `policy` (which counts it) wants one.
fn wants_zc(
    op: &SendOp,
    remaining: usize,
    policy: &mut LanePolicy,
    ladder: &Ladder,
    cfg: &ZcConfig,
) -> bool {
    op.zc
        && remaining > 0
        && ladder.zc != ZcRung::Plain
        && policy.wants_zc(cfg, ladder.zc_report_usage, remaining)
}

/// The result of a merged `sendmsg`, split over its sends in order.
#[derive(Debug)]
struct MergedResult {
    /// Bytes not yet given to a send.
    left: usize,
    /// The `sendmsg`'s error, until the first send that got no bytes takes it.
    failure: Option<i32>,
    first: bool,
}

impl MergedResult {
    fn new(res: i32) -> MergedResult {
        MergedResult {
            left: res.max(0) as usize,
            failure: (res < 0).then_some(res),
            first: true,
        }
    }

    /// The next send's part, for its `remaining` bytes: the bytes it got, and the result its
    /// own SQE in a chain would have had. With bytes, their count; the first send without
    /// takes the error, or gets 0 if it is the first of all (a `sendmsg` that sent nothing
    /// ends its first send as short, as a lone send's would); any other is as a send whose
    /// chain broke before it (`ECANCELED`).
    fn next_part(&mut self, remaining: usize) -> (usize, i32) {
        let first = std::mem::replace(&mut self.first, false);
        let got = self.left.min(remaining);
        self.left -= got;
        let part = if got > 0 {
            got as i32
        } else {
            self.failure
                .take()
                .unwrap_or(if first { 0 } else { -libc::ECANCELED })
        };
        (got, part)
    }
}

/// What a send's result CQE (`res`, the send's `op` already counted the bytes) means for it:
/// `None` if it goes again (the rest of a short send, or a re-run after a chain broken by a
/// short send before it: `lane` requeues it), else its final result. A real error breaks the
/// lane's chain: the sends cancelled behind it share it.
fn send_outcome(
    op: &SendOp,
    lane: &mut Lane,
    key: usize,
    res: i32,
    cancelled: bool,
) -> Option<Result<usize>> {
    let total = op.buf.as_ref().map_or(0, SendBuf::len);
    if res >= 0 && op.sent < total && res > 0 && !cancelled {
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
    ///
    /// [`ZcConfig`]: crate::ZcConfig
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
        let gen = self.next_gen();
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
            riders: Vec::new(),
        };
        let op = self.boxed_send(op);
        let key = self.ops.insert(OpSlot {
            token,
            gen,
            kind: OpKind::Send(op),
            state: SlotState::Queued,
            cancel: false,
        });
        let lane = self.lane_for(fd);
        let idle = lane.queue.is_empty() && lane.in_flight == 0;
        lane.queue.push_back(key);
        if idle {
            self.dirty_lanes.push(lane_key);
        }
        Ok(OpId::new(key, gen, self.ring_id))
    }

    /// The lane of `fd`'s socket, made if it has none (or has the idle lane of a gone socket
    /// that had the same address). New lanes start with the zero-copy policy the last lane
    /// learned.
    fn lane_for(&mut self, fd: &Fd) -> &mut Lane {
        let lane_key = Rc::as_ptr(&fd.0) as usize;
        if self.lanes.len() > self.lane_sweep_at {
            // Forget lanes of sockets that are gone (amortised: the bound doubles with the map).
            self.lanes
                .retain(|_, l| !(l.idle() && l.fd.strong_count() == 0));
            self.lane_sweep_at = (self.lanes.len() * 2).max(1024);
        }
        let policy = if self.zc_backing_off {
            LanePolicy::backed_off()
        } else {
            LanePolicy::default()
        };
        match self.lanes.entry(lane_key) {
            Entry::Occupied(e) if e.get().fd.strong_count() > 0 => e.into_mut(),
            // A socket at the address of a gone one, whose lane is idle (its sends kept it alive
            // while they ran): start afresh.
            Entry::Occupied(mut e) => {
                e.insert(Lane::new(Rc::downgrade(&fd.0), policy));
                e.into_mut()
            }
            Entry::Vacant(e) => e.insert(Lane::new(Rc::downgrade(&fd.0), policy)),
        }
    }

    /// `op`, in the allocation of a finished send if one is spare (its iovec vector keeps its
    /// capacity).
    fn boxed_send(&mut self, op: SendOp) -> Box<SendOp> {
        match self.spare_sends.pop() {
            Some(mut spare) => {
                let iov = std::mem::take(&mut spare.iov);
                let mut riders = std::mem::take(&mut spare.riders);
                riders.clear();
                *spare = SendOp { iov, riders, ..op };
                spare
            }
            None => Box::new(op),
        }
    }

    #[doc(hidden)]
    pub fn debug_state(&self) -> String {
        let mut out = String::new();
        for (k, slot) in self.ops.iter() {
            if let OpKind::Send(op) = &slot.kind {
                out += &format!(
                    "[{k} tok {} {:?} sent {} notifs {:?} reported {} zc {} riders {:?}] ",
                    slot.token,
                    slot.state,
                    op.sent,
                    op.notif_attempts,
                    op.reported,
                    op.in_flight_zc,
                    op.riders
                );
            }
        }
        for (k, l) in &self.lanes {
            out += &format!(
                "lane {k}: q {:?} in_flight {} requeue {:?} err {:?}; ",
                l.queue, l.in_flight, l.requeue, l.error
            );
        }
        out += &format!("dirty {:?}", self.dirty_lanes);
        out
    }

    /// Zero-copy statistics.
    pub fn zc_stats(&self) -> ZcStats {
        self.zc_stats
    }

    /// Builds a send's SQE: plain `SENDMSG`, or with `zc` (decided by [`Driver::plan_chain`])
    /// `SENDMSG_ZC` or `SEND_ZC` (one buffer) as the ladder says; `riders` (plain sends after
    /// it that [`Driver::plan_chain`] merged into it) leave in its `SENDMSG`. With `link`, the
    /// next SQE of the lane's chain waits for this one. Returns whether it linked: a `SEND_ZC`
    /// that covers only the first of several buffers ends the chain, so its continuation can go
    /// before anything newer.
    pub(super) fn arm_send(&mut self, key: usize, link: bool, zc: bool, riders: &[usize]) -> bool {
        let ladder = self.ladder;
        // Registered memory of another ring's table goes as plain memory (`fixed::slot_in`).
        let table = self.fixed.as_ref().map(FixedTable::id);
        let attempt = self.next_gen();
        let ud = user_data(key, attempt);
        let mut rider_iov = std::mem::take(&mut self.merge_iov);
        rider_iov.clear();
        for &rider in riders {
            let slot = &mut self.ops[rider];
            slot.state = SlotState::InKernel;
            let OpKind::Send(op) = &mut slot.kind else {
                unreachable!("riders are sends")
            };
            // The kernel reads the rider's bytes through this SQE's iovecs: they stay the rider's
            // (its slot is `InKernel`, so neither a cancel nor a drop frees them) until this
            // SQE's CQE reports them (`merged_completion`). A cancel of a rider targets the
            // `sendmsg` it rides in.
            op.cur_ud = ud;
            op.in_flight_zc = false;
            let buf = op.buf.as_ref().expect("a send in flight owns its buffer");
            buf.append_iovecs(op.sent, &mut rider_iov);
            self.zc_stats.plain_sends += op.zc as u64;
        }
        self.stats.merged_sends += riders.len() as u64;
        let slot = &mut self.ops[key];
        slot.state = SlotState::InKernel;
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("arm_send on a send")
        };
        let op = &mut **op;
        let fixed_slot = op.prepare(&ladder, table, &rider_iov);
        self.merge_iov = rider_iov;
        op.riders.clear();
        op.riders.extend_from_slice(riders);
        debug_assert!(riders.is_empty() || !zc, "only plain sends merge");
        op.in_flight_zc = zc;
        op.cur_ud = ud;
        let (sqe, may_link) = op.sqe(&ladder, zc, fixed_slot, &mut self.zc_stats);
        let linked = link && may_link;
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
        /// Most SQEs in a chain submitted at once.
        const MAX_CHAIN: usize = 64;
        let dirty = std::mem::take(&mut self.dirty_lanes);
        for lane_key in dirty {
            match self.lanes.get(&lane_key) {
                Some(lane) if lane.in_flight == 0 && !lane.queue.is_empty() => {}
                _ => continue,
            }
            // A link chain cannot span two submissions: the kernel ends a chain at the end of a
            // submit, and the rest would run beside it, out of order. Make room for the whole
            // chain first.
            let capacity = self.ring.submission().capacity();
            let (keys, sqes) = self.plan_chain(lane_key, MAX_CHAIN.min(capacity));
            // (A submit that found the completion queue full reaps, and what it dispatches may
            // push SQEs of its own: check the room again until the whole chain fits.)
            while capacity - self.ring.submission().len() < sqes.len() {
                self.submit_queued();
            }
            let mut start = 0;
            for (i, &(end, zc)) in sqes.iter().enumerate() {
                let last = i + 1 == sqes.len();
                self.lanes.get_mut(&lane_key).expect("lane").in_flight += 1;
                let linked = self.arm_send(keys[start], !last, zc, &keys[start + 1..end]);
                debug_assert!(linked || last, "the plan ends a chain where it cannot link");
                start = end;
            }
        }
    }

    /// Takes the next chain from the front of the lane's queue, deciding each send's kind (the
    /// lane's zero-copy policy counts it): the sends in order, and per SQE (at most
    /// `max_sqes`) where its sends end and whether it is zero-copy. Where the socket is a
    /// stream socket ([`Ladder::merge_sends`]), plain sends in a row with bytes left and no
    /// destination of their own share one `SENDMSG`, up to [`IOV_MAX`] iovecs. A `SEND_ZC` of
    /// the first of several buffers cannot link, so the chain ends with it.
    fn plan_chain(&mut self, lane_key: usize, max_sqes: usize) -> (Vec<usize>, Vec<(usize, bool)>) {
        let (ladder, cfg) = (self.ladder, self.zc_cfg);
        let lane = self.lanes.get_mut(&lane_key).expect("lane");
        let merge = ladder.merge_sends
            && lane.queue.len() > 1
            && *lane.stream.get_or_insert_with(|| {
                lane.fd
                    .upgrade()
                    .is_some_and(|fd| sys::is_stream_socket(fd.as_raw_fd()))
            });
        let (mut keys, mut sqes) = (Vec::new(), Vec::<(usize, bool)>::new());
        // The iovecs of the plain SENDMSG at the chain's end, while more may join it.
        let mut open_run: Option<usize> = None;
        while let Some(&key) = lane.queue.front() {
            let OpKind::Send(op) = &self.ops[key].kind else {
                unreachable!("lanes hold sends")
            };
            let buf = op.buf.as_ref().expect("a queued send owns its buffer");
            let remaining = buf.len() - op.sent;
            let mut policy = lane.policy;
            let zc = wants_zc(op, remaining, &mut policy, &ladder, &cfg);
            let iovs = buf.iov_count(op.sent);
            let mergeable = merge && !zc && remaining > 0 && op.dest.is_none();
            match open_run {
                Some(run) if mergeable && run + iovs <= IOV_MAX => {
                    open_run = Some(run + iovs);
                    keys.push(key);
                    sqes.last_mut().expect("a run has its SQE").0 = keys.len();
                }
                _ if sqes.len() == max_sqes => break,
                _ => {
                    keys.push(key);
                    sqes.push((keys.len(), zc));
                    open_run = mergeable.then_some(iovs);
                }
            }
            // Taken: what the policy counted stands.
            lane.policy = policy;
            lane.queue.pop_front();
            if zc && iovs > 1 && ladder.zc != ZcRung::SendmsgZc {
                break;
            }
        }
        (keys, sqes)
    }

    /// Cancels a send waiting in its lane: it leaves the lane's queue and ends at once.
    pub(super) fn cancel_queued_send(&mut self, key: usize) {
        let OpKind::Send(send) = &self.ops[key].kind else {
            unreachable!("only sends queue")
        };
        let (lane_key, sent) = (send.lane, send.sent);
        let len = send.buf.as_ref().map_or(0, SendBuf::len);
        if let Some(lane) = self.lanes.get_mut(&lane_key) {
            lane.queue.retain(|&k| k != key);
            lane.requeue.retain(|&k| k != key);
        }
        // Between two parts of a send (short, or one buffer at a time): what left is
        // said, as for a send cancelled in the kernel.
        let result = if sent > 0 {
            Err(Error::ShortSend { sent, len })
        } else {
            Err(Error::Cancelled)
        };
        self.report_send(key, result);
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
    fn free_send(&mut self, key: usize) {
        if let OpKind::Send(op) = self.ops.remove(key).kind {
            if self.spare_sends.len() < 1024 {
                self.spare_sends.push(op);
            }
        }
    }

    /// A CQE of a send, from [`Driver::dispatch`]: handled if it belongs to the attempt in
    /// flight (a result) or to an attempt whose notification is due; anything else is stray.
    pub(super) fn complete_send(&mut self, id: OpId, res: i32, flags: u32) {
        let slot = &self.ops[id.key()];
        let OpKind::Send(op) = &slot.kind else {
            unreachable!("complete_send on a send")
        };
        let known = if cqueue::notif(flags) {
            op.notif_attempts.contains(&id.gen())
        } else {
            op.cur_ud == id.ud && slot.state == SlotState::InKernel
        };
        if known {
            self.send_completion(id.key(), id.gen(), res, flags);
        } else {
            self.stats.stray_cqes += 1;
        }
    }

    /// A CQE of a send: its result, or a zero-copy notification.
    fn send_completion(&mut self, key: usize, attempt: u32, res: i32, flags: u32) {
        if cqueue::notif(flags) {
            self.send_notified(key, attempt, res);
            return;
        }
        let cancelled = self.ops[key].cancel;
        let OpKind::Send(op) = &mut self.ops[key].kind else {
            unreachable!("send_completion on a send")
        };
        let lane_key = op.lane;
        if !op.riders.is_empty() {
            let riders = std::mem::take(&mut op.riders);
            self.merged_completion(key, &riders, res);
            return;
        }
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
        let lane = self
            .lanes
            .get_mut(&lane_key)
            .expect("a send's lane lives while it has sends");
        let outcome = send_outcome(op, lane, key, res, cancelled);
        self.lane_sqe_done(lane_key);
        match outcome {
            Some(result) => self.report_send(key, result),
            None => self.ops[key].state = SlotState::Queued,
        }
    }

    /// The result of a merged `sendmsg` (plain: no notification follows): its bytes are split
    /// over the first send and its `riders` in order, and each send's part is handled as the
    /// result of its own SQE in a chain would be. The bytes a send got decide it (done, or its
    /// rest goes again); the first send that got none takes the `sendmsg`'s error (or, after
    /// a short one, goes again), and those after it are as a broken chain's: they share the
    /// error or go again.
    fn merged_completion(&mut self, key: usize, riders: &[usize], res: i32) {
        let lane_key = match &self.ops[key].kind {
            OpKind::Send(op) => op.lane,
            _ => unreachable!("merged_completion on a send"),
        };
        let mut split = MergedResult::new(res);
        for k in std::iter::once(key).chain(riders.iter().copied()) {
            let slot = &mut self.ops[k];
            let cancelled = slot.cancel;
            let OpKind::Send(op) = &mut slot.kind else {
                unreachable!("riders are sends")
            };
            let remaining = op.buf.as_ref().map_or(0, SendBuf::len) - op.sent;
            let (got, part) = split.next_part(remaining);
            op.sent += got;
            if op.zc {
                self.zc_stats.plain_bytes += got as u64;
            }
            let lane = self
                .lanes
                .get_mut(&lane_key)
                .expect("a send's lane lives while it has sends");
            match send_outcome(op, lane, k, part, cancelled) {
                Some(result) => self.report_send(k, result),
                None => self.ops[k].state = SlotState::Queued,
            }
        }
        self.lane_sqe_done(lane_key);
    }

    /// One SQE of the lane's chain has its result (its sends' outcomes are in, so what must
    /// run again is in the lane's `requeue`): after the chain's last, that goes first and the
    /// lane may start its next chain.
    fn lane_sqe_done(&mut self, lane_key: usize) {
        let lane = self
            .lanes
            .get_mut(&lane_key)
            .expect("a send's lane lives while it has sends");
        lane.in_flight -= 1;
        if lane.in_flight == 0 {
            lane.chain_done();
            self.dirty_lanes.push(lane_key);
        }
    }

    /// A zero-copy notification of a send's `attempt`: the lane's policy learns whether the
    /// kernel copied, and after the last one the memory goes home (or back to the user).
    fn send_notified(&mut self, key: usize, attempt: u32, res: i32) {
        let slot = &mut self.ops[key];
        let (token, id) = (slot.token, OpId::new(key, slot.gen, self.ring_id));
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("send_notified on a send")
        };
        let copied = res as u32 & sys::IORING_NOTIF_USAGE_ZC_COPIED != 0;
        self.zc_stats.notifications += 1;
        self.zc_stats.zc_copied += copied as u64;
        if self.ladder.zc_report_usage {
            if let Some(lane) = self.lanes.get_mut(&op.lane) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixed::FixedBuf;

    fn fixed(len: usize, range: std::ops::Range<usize>) -> SendBuf {
        let mem = crate::sys::Mmap::anonymous(len).unwrap();
        SendBuf::Fixed {
            buf: FixedBuf::new(mem, len, None),
            range,
        }
    }

    #[test]
    fn a_fixed_send_range_must_lie_inside_its_buffer() {
        assert!(check_send_range(&fixed(4096, 0..4096)).is_ok());
        assert!(check_send_range(&fixed(4096, 100..200)).is_ok());
        assert!(check_send_range(&fixed(4096, 4096..4096)).is_ok());
        assert!(check_send_range(&fixed(4096, 0..4097)).is_err());
        assert!(check_send_range(&fixed(4096, 5000..5001)).is_err());
        let reversed = std::ops::Range { start: 9, end: 8 };
        assert!(check_send_range(&fixed(4096, reversed)).is_err());
        // Other memory has no range to check.
        assert!(check_send_range(&SendBuf::from(vec![1, 2, 3])).is_ok());
    }

    /// A send of `len` owned bytes of which `sent` went (the CQE's bytes already counted).
    fn send_of(len: usize, sent: usize) -> SendOp {
        SendOp {
            fd: None,
            buf: Some(SendBuf::from(vec![0; len])),
            sent,
            iov: Vec::new(),
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            dest: None,
            zc: false,
            give_back: GiveBack::InSent,
            notif_attempts: Vec::new(),
            cur_ud: 0,
            reported: false,
            in_flight_zc: false,
            lane: 0,
            riders: Vec::new(),
        }
    }

    fn parts(res: i32, remaining: &[usize]) -> Vec<(usize, i32)> {
        let mut split = MergedResult::new(res);
        remaining.iter().map(|&r| split.next_part(r)).collect()
    }

    #[test]
    fn a_merged_result_goes_to_its_sends_in_order() {
        let e = -libc::ECANCELED;
        assert_eq!(parts(12, &[4, 4, 4]), [(4, 4), (4, 4), (4, 4)]);
        // Short: the send it ends in got part (its rest goes again), those after it none.
        assert_eq!(parts(6, &[4, 4, 4]), [(4, 4), (2, 2), (0, e)]);
        assert_eq!(parts(4, &[4, 4, 4]), [(4, 4), (0, e), (0, e)]);
        // Nothing sent: the first send is short, as alone; the others go again.
        assert_eq!(parts(0, &[4, 4]), [(0, 0), (0, e)]);
        // An error: the first send takes it, the others are as cancelled by its broken chain.
        let p = -libc::EPIPE;
        assert_eq!(parts(p, &[4, 4, 4]), [(0, p), (0, e), (0, e)]);
        assert_eq!(parts(e, &[4, 4]), [(0, e), (0, e)]);
    }

    fn lane() -> Lane {
        Lane::new(std::rc::Weak::new(), LanePolicy::default())
    }

    #[test]
    fn a_short_send_goes_again_and_a_full_one_is_done() {
        let mut l = lane();
        assert!(send_outcome(&send_of(10, 4), &mut l, 7, 4, false).is_none());
        assert_eq!(l.requeue, [7]);
        let mut l = lane();
        assert!(matches!(
            send_outcome(&send_of(10, 10), &mut l, 7, 6, false),
            Some(Ok(10))
        ));
        assert!(l.requeue.is_empty());
    }

    #[test]
    fn a_send_that_ends_part_way_says_how_much_left() {
        // Cancelled after some bytes went: never `Ok`.
        let outcome = send_outcome(&send_of(10, 3), &mut lane(), 7, 3, true);
        assert!(matches!(
            outcome,
            Some(Err(Error::ShortSend { sent: 3, len: 10 }))
        ));
        // A result of no bytes for a send of some.
        let outcome = send_outcome(&send_of(10, 0), &mut lane(), 7, 0, false);
        assert!(matches!(
            outcome,
            Some(Err(Error::ShortSend { sent: 0, len: 10 }))
        ));
        // An error after earlier parts went.
        let mut l = lane();
        let outcome = send_outcome(&send_of(10, 4), &mut l, 7, -libc::EPIPE, false);
        assert!(matches!(
            outcome,
            Some(Err(Error::ShortSend { sent: 4, len: 10 }))
        ));
        assert_eq!(l.error, Some(libc::EPIPE));
    }

    #[test]
    fn a_broken_chain_reruns_after_a_short_send_and_shares_an_error() {
        // Cancelled by the kernel because a short send before it broke the chain: run again.
        let mut l = lane();
        assert!(send_outcome(&send_of(10, 0), &mut l, 7, -libc::ECANCELED, false).is_none());
        assert_eq!(l.requeue, [7]);
        // The chain broke on a real error: this send fails with it.
        let mut l = lane();
        let failed = send_outcome(&send_of(10, 0), &mut l, 7, -libc::EPIPE, false);
        let e = failed.unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
        let shared = send_outcome(&send_of(10, 0), &mut l, 8, -libc::ECANCELED, false);
        let e = shared.unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
        // Cancelled by the user: no rerun.
        let mut l = lane();
        let outcome = send_outcome(&send_of(10, 0), &mut l, 7, -libc::ECANCELED, true);
        assert!(matches!(outcome, Some(Err(Error::Cancelled))));
        assert!(l.requeue.is_empty() && l.error.is_none());
    }
}
