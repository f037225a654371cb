//! Send rings and send bundles (6.10): sends queued on a socket's provided ring leave in order,
//! as many buffers per `SEND` op as the ring holds; without bundles, each goes as a plain send.
//! The ring's state (its entries, queue and backlog) is in `crate::send_ring`.

use std::os::fd::AsRawFd;
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use crate::buf::SendBuf;
use crate::error::{Error, Result};
use crate::send_ring::{SendRing, SendRingShared};
use crate::sys;

use super::op::{errno_error, OpId, OpKind};
use super::send::{check_send_range, GiveBack};
use super::submit::OpCqe;
use super::{Completion, Driver, Event, Fd};

/// A send bundle: sends what `ring` holds on `fd`, in order.
pub(super) struct BundleOp {
    pub(super) fd: Fd,
    ring: Rc<SendRingShared>,
}

impl BundleOp {
    /// A bundle `SEND` selecting its buffers from the ring.
    pub(super) fn sqe(&self) -> squeue::Entry {
        let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
        let mut sqe = opcode::Send::new(types::Fd(self.fd.as_raw_fd()), std::ptr::null(), 0)
            .ioprio(sys::IORING_RECVSEND_BUNDLE)
            .flags(flags)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        // `buf_group` shares the SQE field of `buf_index`; the crate's `Send` lacks it.
        sys::sqe_set_buf_index(&mut sqe, self.ring.bgid);
        sqe
    }
}

impl Driver {
    /// A **send ring** of `entries` ring entries (a power of two, at most 32768) for one socket:
    /// sends queued on it with [`Driver::send_bundle`] leave in order, as many buffers per op as
    /// the ring holds (send bundles, 6.10+). Where the kernel lacks bundles (or `no-bundle` is
    /// forced), each queued send goes as a plain send, in order, with the same completions.
    ///
    /// # Errors
    /// [`Error::InvalidBufferCount`] for a bad size, [`Error::GroupIdsExhausted`].
    pub fn send_ring(&mut self, entries: u32) -> Result<SendRing> {
        if entries == 0 || !entries.is_power_of_two() || entries > sys::MAX_RING_ENTRIES {
            return Err(Error::InvalidBufferCount {
                count: entries,
                max: sys::MAX_RING_ENTRIES,
            });
        }
        let kernel = self.ladder.bundle;
        let bgid = if kernel { self.fresh_bgid()? } else { 0 };
        let shared = Rc::new(
            SendRingShared::new(bgid, entries as u16, kernel, self.ring_id)
                .map_err(Error::os("allocating a send ring"))?,
        );
        if kernel {
            // SAFETY: the ring memory is owned by `shared`, which the driver keeps in
            // `send_rings` until it unregisters the ring (or the driver and its ring are gone).
            unsafe {
                self.ring.submitter().register_buf_ring_with_flags(
                    shared.ring_addr(),
                    shared.entries(),
                    bgid,
                    0,
                )
            }
            .map_err(Error::os("registering a send ring"))?;
            self.bgid_used[bgid as usize] = true;
            self.send_rings.push(shared.clone());
        }
        Ok(SendRing { shared })
    }

    /// Queues `buf` on `ring` for socket `fd` and starts a send bundle if none is in flight:
    /// queued sends leave in order, several per op. Each completes with its own
    /// [`Event::Sent`] (`Ok(len)` once all of it was sent, its memory already gone home), in
    /// order. Do not mix with other sends on the same socket while some are queued: only the
    /// ring's own sends are ordered with each other. After a send error every queued send ends
    /// with it, and so does any later one. A ring sends on the socket of its first send only;
    /// `cancel_fd` on that socket ends every queued send (`cancel_token` does not reach them).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for another socket than the ring's, or a fixed range outside
    /// its buffer; [`Error::NotOurs`] for another driver's ring.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// use std::io::Read;
    /// let mut driver = Driver::new(Default::default())?;
    /// let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let sock = Fd::from(std::os::fd::OwnedFd::from(a));
    /// let ring = driver.send_ring(8)?;
    /// for (i, part) in [&b"one "[..], b"two ", b"three"].iter().enumerate() {
    ///     driver.send_bundle(&sock, &ring, part.to_vec(), i as u64)?;
    /// }
    /// let mut done = 0;
    /// while done < 3 {
    ///     driver.wait(None)?;
    ///     while let Some(c) = driver.pop() {
    ///         assert!(matches!(c.event, Event::Sent { result: Ok(_), .. }));
    ///         assert_eq!(c.token, done); // in order
    ///         done += 1;
    ///     }
    /// }
    /// let mut got = [0u8; 13];
    /// peer.read_exact(&mut got).unwrap();
    /// assert_eq!(&got, b"one two three");
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn send_bundle(
        &mut self,
        fd: &Fd,
        ring: &SendRing,
        buf: impl Into<SendBuf>,
        token: u64,
    ) -> Result<()> {
        let shared = &ring.shared;
        self.check_owner(shared.owner, "a send ring")?;
        let buf = buf.into();
        check_send_range(&buf)?;
        if !matches!(buf, SendBuf::Chain(_)) && buf.len() > u32::MAX as usize {
            // One ring entry holds one contiguous piece, whose length is 32 bits.
            return Err(Error::InvalidArgument {
                what: "a send ring entry holds at most 4 GiB: send larger memory in parts",
            });
        }
        // A ring sends on one socket: its bundles go where its first send went, so bytes meant
        // for another socket would leave on that one.
        let mut socket = shared.socket.borrow_mut();
        match &*socket {
            // (A `Weak` keeps the descriptor's allocation, so no later socket can share it.)
            Some(bound) if !std::rc::Weak::ptr_eq(bound, &Rc::downgrade(&fd.0)) => {
                return Err(Error::InvalidArgument {
                    what: "a send ring sends on one socket: this ring was first used with another",
                });
            }
            Some(_) => {}
            None => *socket = Some(Rc::downgrade(&fd.0)),
        }
        drop(socket);
        if !shared.kernel {
            self.start_send(fd, buf, None, false, GiveBack::Never, token)?;
            return Ok(());
        }
        if shared.failed.get() {
            self.ready.push_back(Completion {
                token,
                op: OpId::NONE,
                event: Event::Sent {
                    result: Err(Error::from_errno("send bundle", libc::EPIPE)),
                    buf: None,
                },
                more: false,
            });
            return Ok(());
        }
        shared.queue(buf, token);
        if !shared.in_flight.get() {
            self.start_bundle(fd.clone(), shared.clone());
        }
        Ok(())
    }

    /// Starts a send bundle op for what `ring` holds; completes empty sends at once.
    pub(super) fn start_bundle(&mut self, fd: Fd, ring: Rc<SendRingShared>) {
        if !ring.fill() {
            // Only empty sends were queued.
            let (_, done) = ring.consumed(0).unwrap_or_default();
            self.report_bundle(done);
            return;
        }
        ring.in_flight.set(true);
        self.stats.bundle_ops += 1;
        self.start(OpKind::SendBundle(BundleOp { fd, ring }), 0);
    }

    pub(super) fn report_bundle(&mut self, done: Vec<(u64, usize)>) {
        for (token, len) in done {
            self.ready.push_back(Completion {
                token,
                op: OpId::NONE,
                event: Event::Sent {
                    result: Ok(len),
                    buf: None,
                },
                more: false,
            });
        }
    }

    /// Unregisters send rings whose handle is gone and that have nothing in flight; their
    /// queued memory is dropped only after the kernel forgot the ring.
    pub(super) fn reap_send_rings(&mut self) {
        let mut i = 0;
        while i < self.send_rings.len() {
            let r = &self.send_rings[i];
            if Rc::strong_count(r) > 1 || r.in_flight.get() {
                i += 1;
                continue;
            }
            let r = self.send_rings.swap_remove(i);
            // Sends still queued (nothing in flight to carry them): they end as cancelled
            // rather than vanish with their buffers.
            for token in r.fail() {
                self.ready.push_back(Completion {
                    token,
                    op: OpId::NONE,
                    event: Event::Sent {
                        result: Err(Error::Cancelled),
                        buf: None,
                    },
                    more: false,
                });
            }
            if !self.forget_buf_ring(r.bgid) {
                self.kept_for_kernel.push(Box::new(r));
            }
        }
    }

    /// The CQE of a send bundle: the sends it completed are reported, and the next bundle goes
    /// if more is queued; after an error (or a cancel) every queued send ends with it.
    pub(super) fn complete_bundle(&mut self, c: OpCqe) {
        let OpKind::SendBundle(op) = &self.ops[c.key].kind else {
            unreachable!("complete_bundle on a send bundle")
        };
        let (fd, ring) = (op.fd.clone(), op.ring.clone());
        self.ops.remove(c.key);
        ring.in_flight.set(false);
        let stop = c.cancelled || self.dropping;
        match self.bundle_sent(&ring, c.res, stop) {
            Ok((pieces, done)) => {
                self.stats.bundle_buffers += pieces as u64;
                self.report_bundle(done);
                if !stop && (ring.fill() || !ring.sends.borrow().is_empty()) {
                    self.start_bundle(fd, ring);
                }
            }
            Err(e) => self.fail_bundle(c.id, &ring, &e),
        }
    }

    /// What a bundle that completed with `res` sent: the ring entries it consumed and the sends
    /// that are complete. A bundle cancelled (`stop`: cancel_fd, the driver going) that finished
    /// before the cancel reached it: what it sent is reported here, and the sends queued behind
    /// it end as cancelled (they stranded in the backlog, never completing).
    fn bundle_sent(
        &mut self,
        ring: &SendRingShared,
        res: i32,
        stop: bool,
    ) -> Result<(usize, Vec<(u64, usize)>)> {
        let sent = if res >= 0 {
            ring.consumed(res as usize).map_err(|()| {
                // The bytes end inside a buffer, which the kernel consumed whole.
                Error::from_errno("send bundle (short send)", libc::EIO)
            })
        } else {
            Err(if res == -libc::ECANCELED {
                Error::Cancelled
            } else {
                errno_error("send bundle", res)
            })
        };
        match sent {
            Ok((pieces, done)) if stop => {
                self.stats.bundle_buffers += pieces as u64;
                self.report_bundle(done);
                if ring.sends.borrow().is_empty() {
                    Ok((0, Vec::new()))
                } else {
                    Err(Error::Cancelled)
                }
            }
            other => other,
        }
    }

    /// A bundle failed with `e`: nothing more is sent. The kernel forgets the ring (no op of
    /// ours is in flight on it), then its queued buffers go home and every send queued on it
    /// ends with the error.
    fn fail_bundle(&mut self, id: OpId, ring: &Rc<SendRingShared>, e: &Error) {
        let raw = e.raw_os_error().unwrap_or(libc::EIO);
        if !self.forget_buf_ring(ring.bgid) {
            self.kept_for_kernel.push(Box::new(ring.clone()));
        }
        self.send_rings.retain(|r| !Rc::ptr_eq(r, ring));
        ring.in_ring.borrow_mut().clear();
        ring.backlog.borrow_mut().clear();
        for token in ring.fail() {
            self.ready.push_back(Completion {
                token,
                op: id,
                event: Event::Sent {
                    result: Err(if raw == libc::ECANCELED {
                        Error::Cancelled
                    } else {
                        Error::from_errno("send bundle", raw)
                    }),
                    buf: None,
                },
                more: false,
            });
        }
    }
}
