//! Zero-copy receive (zcrx): registering an area with its refill queue, `RECV_ZC` multishot
//! receives and their completions, flushing the refill queue (a device-less area gets its
//! buffers back only so), and a full area as backpressure: the receive pauses (the kernel's
//! `-ENOMEM` ends it, the data waits in the socket) and is re-armed once buffers are back.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use crate::error::{Error, Result};
use crate::probe::{Features, ZcrxProbe, ZcrxRung};
use crate::sys::{self, Mmap};
use crate::zcrx::{
    RefillQueue, ZcrxArea, ZcrxConfig, ZcrxRefusal, ZcrxShared, ZcrxSource, ZCRX_BUF_SIZE,
};

use super::op::{errno_error, OpId, OpKind, SlotState};
use super::submit::OpCqe;
use super::{Completion, Driver, Event, Fd};

/// A multishot zero-copy receive: its socket and the area the kernel puts the bytes in.
pub(super) struct RecvZcOp {
    pub(super) fd: Fd,
    pub(super) area: Rc<ZcrxShared>,
    /// Bytes the receive may take in all (0: no limit), and the bytes it took so far.
    pub(super) limit: u32,
    pub(super) taken: u32,
}

impl RecvZcOp {
    /// `RECV_ZC`, multishot: as many bytes as come, or (a limited receive) the bytes left of
    /// its limit: the kernel then ends it with a 0 once it took them.
    pub(super) fn sqe(&self) -> squeue::Entry {
        let len = if self.limit == 0 {
            0
        } else {
            self.limit - self.taken
        };
        opcode::RecvZc::new(types::Fd(self.fd.as_raw_fd()), len)
            .ifq(self.area.id)
            .build()
    }

    /// Whether a limited receive took all it may.
    fn at_limit(&self) -> bool {
        self.limit != 0 && self.taken >= self.limit
    }
}

/// Whether `kind` (a zero-copy receive) took all its limit allows.
fn op_at_limit(kind: &OpKind) -> bool {
    matches!(kind, OpKind::RecvZc(op) if op.at_limit())
}

/// The refusal an errno of `IORING_REGISTER_ZCRX_IFQ` means for an area fed by `source`.
fn refusal(errno: i32, source: &ZcrxSource, bytes: u64) -> ZcrxRefusal {
    match (errno, source) {
        (libc::EPERM, _) => ZcrxRefusal::NoCapNetAdmin,
        (libc::ENOMEM, _) if sys::Memlock::current() != sys::Memlock::Unlimited => {
            ZcrxRefusal::Memlock { bytes }
        }
        (libc::EINVAL | libc::EOPNOTSUPP, ZcrxSource::Nic { interface, queue }) => {
            ZcrxRefusal::DeviceCannot {
                interface: interface.clone(),
                queue: *queue,
                errno,
            }
        }
        (errno, _) => ZcrxRefusal::Kernel { errno },
    }
}

/// The interface index and queue the kernel is to feed the area from (0, 0: none).
fn interface(source: &ZcrxSource) -> std::result::Result<(u32, u32), ZcrxRefusal> {
    match source {
        ZcrxSource::DeviceLess => Ok((0, 0)),
        ZcrxSource::Nic { interface, queue } => {
            let name = std::ffi::CString::new(interface.as_str()).map_err(|_| {
                ZcrxRefusal::NoSuchInterface {
                    interface: interface.clone(),
                }
            })?;
            // SAFETY: a NUL-terminated string that lives across the call.
            match unsafe { libc::if_nametoindex(name.as_ptr()) } {
                0 => Err(ZcrxRefusal::NoSuchInterface {
                    interface: interface.clone(),
                }),
                idx => Ok((idx, *queue)),
            }
        }
    }
}

impl Driver {
    /// Registers a zero-copy receive area: memory the kernel puts received bytes in, handed
    /// out by [`Driver::recv_zc`] as [`ZcrxBuf`](crate::ZcrxBuf)s that go back when dropped.
    /// The driver must have been built with
    /// [`DriverConfig::zero_copy_receive`](crate::DriverConfig::zero_copy_receive). The area
    /// lives as long as the driver (the kernel cannot unregister one).
    ///
    /// Device-less areas ([`ZcrxConfig::device_less`], 7.1+) take any TCP socket, the kernel
    /// copying each byte once into the area; NIC areas ([`ZcrxConfig::nic`], 6.15+) are true
    /// zero copy for the flows the NIC steers to their queue. Both need `CAP_NET_ADMIN`.
    ///
    /// # Errors
    /// [`Error::ZcrxUnavailable`] with the reason (no `CAP_NET_ADMIN`, kernel too old, the
    /// device cannot, the rung is forced off, the ring was not set up for it, memlock; what the
    /// kernel or the process cannot do is named before what the ring lacks);
    /// [`Error::InvalidArgument`] for an area of no buffers or more than
    /// [`MAX_ZCRX_BUFFERS`](crate::MAX_ZCRX_BUFFERS).
    ///
    /// # Examples
    /// ```no_run
    /// use ringpool::{Driver, DriverConfig, ZcrxConfig};
    /// let mut driver = Driver::new(DriverConfig::default().zero_copy_receive(true))?;
    /// let area = driver.zcrx_area(ZcrxConfig::device_less(4 << 20))?;
    /// assert_eq!(area.stats().total, 1024);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn zcrx_area(&mut self, config: ZcrxConfig) -> Result<ZcrxArea> {
        let unavailable = |reason| Error::ZcrxUnavailable { reason };
        let buffers = config.checked_buffers()?;
        self.zcrx_allowed(&config.source).map_err(unavailable)?;
        let (if_idx, if_rxq) = interface(&config.source).map_err(unavailable)?;
        let len = buffers as usize * ZCRX_BUF_SIZE;
        let (area, backing) =
            Mmap::anonymous_huge(len).map_err(Error::os("mapping a zero-copy receive area"))?;
        let entries = buffers.next_power_of_two();
        let region = Mmap::anonymous(RefillQueue::region_len(entries))
            .map_err(Error::os("mapping a refill queue"))?;
        let mut area_reg = sys::ZcrxAreaReg {
            addr: area.as_ptr() as u64,
            len: len as u64,
            ..Default::default()
        };
        let mut region_desc = sys::RegionDesc {
            user_addr: region.as_ptr() as u64,
            size: region.len() as u64,
            flags: sys::IORING_MEM_REGION_TYPE_USER,
            ..Default::default()
        };
        let device_less = config.source == ZcrxSource::DeviceLess;
        let mut reg = sys::ZcrxIfqReg {
            if_idx,
            if_rxq,
            rq_entries: entries,
            flags: if device_less { sys::ZCRX_REG_NODEV } else { 0 },
            area_ptr: &raw mut area_reg as u64,
            region_ptr: &raw mut region_desc as u64,
            ..Default::default()
        };
        // SAFETY: a live ring of ours; `area` and `region` are moved into the area's shared
        // state below (or kept for the driver's life if that fails), which the driver holds
        // until after its ring is closed, so both stay mapped as long as the kernel uses them.
        let registered = unsafe { sys::register_zcrx_ifq(self.ring.as_raw_fd(), &mut reg) };
        if let Err(e) = registered {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            return Err(unavailable(refusal(errno, &config.source, len as u64)));
        }
        let rq = if reg.rq_entries >= buffers {
            RefillQueue::new(region, reg.offsets, reg.rq_entries)
        } else {
            // A queue smaller than the area could overflow: refuse, and keep the memory.
            self.kept_for_kernel.push(Box::new(region));
            Err(Error::InvalidArgument {
                what: "the kernel made the refill queue smaller than the area",
            })
        };
        let rq = match rq {
            Ok(rq) => rq,
            Err(e) => {
                // Registered, so the kernel may use the area until the ring closes.
                self.kept_for_kernel.push(Box::new(area));
                return Err(e);
            }
        };
        let shared = Rc::new(ZcrxShared {
            owner: self.ring_id,
            serial: crate::pool::NEXT_GROUP_SERIAL
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            id: reg.zcrx_id,
            area: Arc::new(area),
            token: area_reg.rq_area_token,
            rq,
            device_less,
            backing,
            total: buffers,
            orphaned: Default::default(),
            in_user: Default::default(),
            unflushed: Default::default(),
            bytes_received: Default::default(),
            refills: Default::default(),
            flushes: Default::default(),
            full: Default::default(),
            rearms: Default::default(),
            overflow: Default::default(),
            cross: self.cross.clone(),
        });
        self.zcrx_areas.push(shared.clone());
        Ok(ZcrxArea { shared })
    }

    /// Whether this driver may register an area fed by `source`: its ring, its rung, and what
    /// the probe found.
    fn zcrx_allowed(&self, source: &ZcrxSource) -> std::result::Result<(), ZcrxRefusal> {
        let features = Features::get();
        if !self.ladder.defer_taskrun {
            return Err(ZcrxRefusal::NoDeferTaskrun);
        }
        // What the kernel or the process cannot do comes before what the ring lacks: a ring set
        // up for zero-copy receive would not help there, so "ring not set up" would mislead.
        match self.ladder.zcrx {
            ZcrxRung::Groups if features.zcrx => Err(ZcrxRefusal::Forced),
            ZcrxRung::Groups => Err(ZcrxRefusal::KernelTooOld {
                kernel: features.kernel,
                needs: "6.15 for zero-copy receive",
            }),
            ZcrxRung::NicOnly if *source == ZcrxSource::DeviceLess => {
                Err(match features.zcrx_device_less {
                    ZcrxProbe::NoCapNetAdmin => ZcrxRefusal::NoCapNetAdmin,
                    _ => ZcrxRefusal::KernelTooOld {
                        kernel: features.kernel,
                        needs: "7.1 for device-less zero-copy receive",
                    },
                })
            }
            _ if !self.ring.wide() || !self.zcrx_asked => Err(ZcrxRefusal::RingNotSetUp),
            _ => Ok(()),
        }
    }

    /// Starts a multishot zero-copy receive on the TCP socket `fd` into `area`.
    ///
    /// Completions: [`Event::ZcrxData`] per buffer of bytes, in order, then [`Event::Eof`] or
    /// [`Event::Error`] as the last. A full area (every buffer held) is not an error: the
    /// receive pauses and resumes once buffers are dropped, nothing lost. Like
    /// [`Driver::recv`], the op holds its own clone of `fd`; [`Driver::cancel`] or
    /// [`Driver::cancel_fd`] stop it.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(driver: &mut ringpool::Driver, area: &ringpool::ZcrxArea, sock: &ringpool::Fd) -> ringpool::Result<()> {
    /// use ringpool::Event;
    /// driver.recv_zc(sock, area, 1)?;
    /// driver.wait(None)?;
    /// while let Some(c) = driver.pop() {
    ///     if let Event::ZcrxData(buf) = c.event {
    ///         println!("{} bytes", buf.len()); // back to the kernel when dropped
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_zc(&mut self, fd: &Fd, area: &ZcrxArea, token: u64) -> Result<OpId> {
        self.start_recv_zc(fd, area, 0, token)
    }

    /// Like [`Driver::recv_zc`], but the receive takes at most `max_bytes` in all, then ends
    /// with [`Event::LimitReached`] (end of stream or an error before that end it as
    /// `recv_zc` does). A server bounds what one connection can take of a shared area this way
    /// (in bytes: each completion takes one 4 KiB buffer however few bytes it carries, so
    /// count buffers too, and cancel at a bound of them).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a limit of 0; as [`Driver::recv_zc`].
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(driver: &mut ringpool::Driver, area: &ringpool::ZcrxArea, sock: &ringpool::Fd) -> ringpool::Result<()> {
    /// driver.recv_zc_limited(sock, area, 64 << 10, 1)?; // at most 64 KiB, then LimitReached
    /// # Ok(()) }
    /// ```
    pub fn recv_zc_limited(
        &mut self,
        fd: &Fd,
        area: &ZcrxArea,
        max_bytes: u32,
        token: u64,
    ) -> Result<OpId> {
        if max_bytes == 0 {
            return Err(Error::InvalidArgument {
                what: "a limited zero-copy receive needs a limit above 0",
            });
        }
        self.start_recv_zc(fd, area, max_bytes, token)
    }

    fn start_recv_zc(&mut self, fd: &Fd, area: &ZcrxArea, limit: u32, token: u64) -> Result<OpId> {
        self.check_owner(area.shared.owner, "a zero-copy receive area")?;
        let kind = OpKind::RecvZc(RecvZcOp {
            fd: fd.clone(),
            area: area.shared.clone(),
            limit,
            taken: 0,
        });
        Ok(self.start(kind, token))
    }

    /// A CQE of a zero-copy receive: bytes in the area, a full area (pause), or the end.
    pub(super) fn complete_recv_zc(&mut self, c: OpCqe) {
        let OpKind::RecvZc(op) = &mut self.ops[c.key].kind else {
            unreachable!("complete_recv_zc on a zero-copy receive")
        };
        let area = op.area.clone();
        if c.res > 0 {
            op.taken = op.taken.saturating_add(c.res as u32);
            let (at_limit, more) = (op.at_limit(), c.more());
            match area.take(c.big[0], c.res as u32) {
                Some(buf) if at_limit && !more => {
                    // Its last bytes ended it: they, then the end.
                    self.deliver(&c, Event::ZcrxData(buf), true, false);
                    self.end_recv_zc_with(&c, Event::LimitReached);
                }
                Some(buf) => self.deliver(&c, Event::ZcrxData(buf), more, !c.cancelled),
                None => self.end_recv_zc(
                    &c,
                    Error::InvalidArgument {
                        what: "the kernel named bytes outside the zero-copy receive area",
                    },
                ),
            }
            return;
        }
        if c.more() {
            return; // a passing condition; the op goes on
        }
        if c.res == -libc::ENOMEM && !c.cancelled {
            area.full.set(area.full.get() + 1);
            self.ops[c.key].state = SlotState::Parked;
            self.zcrx_parked.push(c.key);
            return;
        }
        let event = match c.res {
            0 if op_at_limit(&self.ops[c.key].kind) => Event::LimitReached,
            0 => Event::Eof,
            r if r == -libc::ECANCELED || c.cancelled => Event::Error(Error::Cancelled),
            r => Event::Error(errno_error("recv_zc", r)),
        };
        self.end_recv_zc_with(&c, event);
    }

    /// The op's last completion: `event`.
    fn end_recv_zc_with(&mut self, c: &OpCqe, event: Event) {
        self.ops.remove(c.key);
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event,
            more: false,
        });
    }

    /// Ends a zero-copy receive with `error`: at once if this was its last CQE, else once the
    /// cancel asked for here brings the last one (reported then as cancelled).
    fn end_recv_zc(&mut self, c: &OpCqe, error: Error) {
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event: Event::Error(error),
            more: c.more(),
        });
        if c.more() {
            self.cancel(OpId::new(c.key, c.id.gen(), self.ring_id));
        } else {
            self.ops.remove(c.key);
        }
    }

    /// Before entering the kernel: hands device-less areas' refilled buffers to the kernel (a
    /// batch at a time, or at once when a receive waits for them), then re-arms paused
    /// receives of areas that have buffers again, at most one per free buffer, oldest first.
    pub(super) fn flush_zcrx(&mut self) {
        for area in &self.zcrx_areas {
            if !area.overflow.borrow().is_empty() {
                area.retry_overflow();
            }
            let unflushed = area.unflushed.get();
            let waiting = !self.zcrx_parked.is_empty();
            if !area.device_less
                || unflushed == 0
                || (unflushed < (area.total / 8).max(1) && !waiting)
            {
                continue;
            }
            // A refusal would leave the buffers in the queue for the next flush; the only ones
            // documented (a bad id or ring) cannot happen for an area this ring registered.
            if sys::zcrx_flush_rq(self.ring.as_raw_fd(), area.id).is_ok() {
                area.unflushed.set(0);
                area.flushes.set(area.flushes.get() + 1);
            }
        }
        if !self.zcrx_parked.is_empty() {
            self.rearm_zcrx();
        }
    }

    /// Re-arms paused zero-copy receives whose area has free buffers (each may fill many:
    /// one receive per free buffer at most, so a few buffers do not wake thousands).
    fn rearm_zcrx(&mut self) {
        let mut budgets: Vec<(*const ZcrxShared, u32)> = self
            .zcrx_areas
            .iter()
            .map(|a| {
                let waiting =
                    a.in_user.get() + a.unflushed.get() + a.overflow.borrow().len() as u32;
                (Rc::as_ptr(a), a.total.saturating_sub(waiting))
            })
            .collect();
        let parked = std::mem::take(&mut self.zcrx_parked);
        for key in parked {
            let OpKind::RecvZc(op) = &self.ops[key].kind else {
                unreachable!("only zero-copy receives park here")
            };
            let area = op.area.clone();
            match budgets.iter_mut().find(|(a, _)| *a == Rc::as_ptr(&area)) {
                Some((_, budget)) if *budget > 0 => {
                    *budget -= 1;
                    area.rearms.set(area.rearms.get() + 1);
                    self.arm(key);
                }
                _ => self.zcrx_parked.push(key),
            }
        }
    }
}
