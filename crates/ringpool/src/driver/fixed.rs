//! The fixed buffer table with the kernel: registered on first use (sparse, 5.19), a slot per
//! [`FixedBuf`] or registered region, registered with a tag and released with an empty update;
//! the tag's CQE (`complete_tag`) frees the slot. A table shared by the rings of a thread is
//! mirrored by cloning slots (6.13) or by registering the memory again. The table's own state
//! is in `crate::fixed`.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fixed::{self, FixedBuf, FixedStats, FixedTable, RingRef, MAX_FIXED_LEN};
use crate::probe::{Features, Force};
use crate::sys;

use super::op::OpId;
use super::Driver;

/// Page-aligned memory for a [`FixedBuf`] of `len` bytes.
fn fixed_mem(len: usize) -> Result<sys::Mmap> {
    if len == 0 || len > MAX_FIXED_LEN {
        return Err(Error::InvalidArgument {
            what: "a registered buffer must hold between 1 byte and 1 GiB",
        });
    }
    sys::Mmap::anonymous(len).map_err(Error::os("allocating registered memory"))
}

impl Driver {
    /// `len` bytes of page-aligned, zeroed memory registered in the ring's fixed buffer table:
    /// its pages are pinned once, not per I/O. The table (sparse, [`DriverConfig::fixed_slots`]
    /// slots) is registered on first use.
    ///
    /// # Errors
    /// [`Error::MemlockExceeded`] when the kernel refuses to pin more (it names the limit and the
    /// size), [`Error::FixedTableFull`], [`Error::Unsupported`] on kernels without a sparse
    /// table (before 5.19) or with the `no-fixed` rung forced, [`Error::InvalidArgument`] for 0
    /// or more than 1 GiB. [`Driver::fixed_buf_or_plain`] falls back to plain memory instead.
    ///
    /// # Examples
    /// ```
    /// let mut driver = ringpool::Driver::new(Default::default())?;
    /// match driver.fixed_buf(1 << 20) {
    ///     Ok(buf) => assert_eq!(buf.len(), 1 << 20),
    ///     Err(ringpool::Error::MemlockExceeded { limit, .. }) => println!("limit: {limit:?}"),
    ///     Err(e) => println!("no registered memory here: {e}"),
    /// }
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    ///
    /// [`DriverConfig::fixed_slots`]: crate::DriverConfig::fixed_slots
    pub fn fixed_buf(&mut self, len: usize) -> Result<FixedBuf> {
        let mem = fixed_mem(len)?;
        let slot = self.register_fixed(&mem)?;
        Ok(FixedBuf::new(mem, len, Some((slot, self.fixed_table()?))))
    }

    /// Like [`Driver::fixed_buf`], but where the memory cannot be registered (memlock, a full
    /// table, an old kernel, the `no-fixed` rung) it returns plain memory, on which the same ops
    /// work through the unregistered opcodes. [`FixedBuf::is_registered`] tells which.
    ///
    /// # Examples
    /// ```
    /// let mut driver = ringpool::Driver::new(Default::default())?;
    /// let buf = driver.fixed_buf_or_plain(4096)?;
    /// println!("registered: {}", buf.is_registered());
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn fixed_buf_or_plain(&mut self, len: usize) -> Result<FixedBuf> {
        match self.fixed_buf(len) {
            Err(e) if e.refused_registration() => Ok(FixedBuf::new(fixed_mem(len)?, len, None)),
            other => other,
        }
    }

    /// Counters of the fixed buffer table.
    ///
    /// # Examples
    /// ```
    /// let driver = ringpool::Driver::new(Default::default())?;
    /// assert_eq!(driver.fixed_stats().used, 0);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn fixed_stats(&self) -> FixedStats {
        self.fixed
            .as_ref()
            .map_or_else(FixedStats::default, |t| t.stats())
    }

    /// The table, registered (sparse) on first use.
    pub(super) fn fixed_table(&mut self) -> Result<Rc<FixedTable>> {
        if let Some(t) = &self.fixed {
            return Ok(t.clone());
        }
        self.fixed_available()?;
        self.ring
            .submitter()
            .register_buffers_sparse(self.fixed_slots)
            .map_err(Error::os("registering a sparse fixed buffer table"))?;
        let table = Rc::new(FixedTable::new(self.fixed_slots, self.ring_ref()));
        self.fixed = Some(table.clone());
        Ok(table)
    }

    /// Whether this ring may have a fixed buffer table: the kernel's, or the forced rung's, error.
    fn fixed_available(&self) -> Result<()> {
        if self.ladder.fixed {
            return Ok(());
        }
        let feature = "registered memory (a sparse fixed buffer table, 5.19)";
        Err(if Features::get().fixed_buffers {
            Error::RungForced {
                feature,
                rung: Force::NoFixed.name(),
            }
        } else {
            Error::Unsupported {
                feature,
                kernel: Features::get().kernel,
            }
        })
    }

    fn ring_ref(&self) -> RingRef {
        RingRef {
            id: self.ring_id,
            fd: self.ring.as_raw_fd(),
        }
    }

    /// Makes this ring share `other`'s fixed buffer table: everything registered through either
    /// ring (by [`Driver::fixed_buf`], registered regions, ...) is registered in both, so a
    /// [`FixedBuf`] of one can be used by ops of the other, without pinning its pages again.
    /// Registrations are mirrored by cloning the slot (`IORING_REGISTER_CLONE_BUFFERS`, 6.13:
    /// the same pinned pages, not accounted against memlock twice) or, where cloning is missing
    /// or the `no-clone` rung is forced, by registering the same memory in this ring too (pinned
    /// again). Both drivers live on this thread (a `Driver` is not `Send`), which is what lets
    /// either one update the other's ring. More rings can join the same table.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if this ring already has a fixed buffer table (share before
    /// registering memory here); the errors of [`Driver::fixed_buf`] when either ring cannot
    /// have a table or mirroring the existing registrations is refused (memlock).
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// let mut files = Driver::new(Default::default())?;
    /// let mut net = Driver::new(Default::default())?;
    /// net.share_fixed_table(&mut files)?;
    /// let mut buf = files.fixed_buf(4096)?; // registered once, usable by both rings
    /// buf[..4].copy_from_slice(b"data");
    /// let file = tempfile::tempfile().unwrap();
    /// let fd = Fd::from(std::os::fd::OwnedFd::from(file));
    /// net.write_fixed(&fd, buf, 0..4, 0, 1)?; // through the other ring
    /// net.wait(None)?;
    /// let Event::FixedIo { result, .. } = net.pop().unwrap().event else { panic!() };
    /// assert_eq!(result?, 4);
    /// assert_eq!(net.fixed_stats().rings, 2);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn share_fixed_table(&mut self, other: &mut Driver) -> Result<()> {
        if self.fixed.is_some() {
            return Err(Error::InvalidArgument {
                what: "this ring has a fixed buffer table of its own already: share before registering memory in it",
            });
        }
        self.fixed_available()?;
        let table = other.fixed_table()?;
        let slots = table.len();
        self.ring
            .submitter()
            .register_buffers_sparse(slots)
            .map_err(Error::os("registering a sparse fixed buffer table"))?;
        let mirrored = if self.ladder.clone_buffers {
            // SAFETY: both descriptors are live rings of this thread; the slots cloned hold
            // registrations the shared table keeps (and frees only after emptying them here).
            unsafe {
                sys::clone_buffers(self.ring.as_raw_fd(), other.ring.as_raw_fd(), 0, 0, slots)
            }
            .map_err(|e| fixed::registration_error(e, 0, table.stats().registered_bytes))
        } else {
            table.used_slots().into_iter().try_for_each(|(slot, iov)| {
                // SAFETY: the iovec is memory registered in the shared table, which keeps it
                // mapped until the slot was emptied in every ring of the table (this one
                // included once it joins below).
                unsafe { sys::update_buffer(self.ring.as_raw_fd(), slot as u32, &iov) }.map_err(
                    |e| fixed::registration_error(e, iov.iov_len, table.stats().registered_bytes),
                )
            })
        };
        if let Err(e) = mirrored {
            let _ = self.ring.submitter().unregister_buffers();
            return Err(e);
        }
        table.add_ring(self.ring_ref());
        self.fixed = Some(table);
        Ok(())
    }

    /// Registers `mem` in a free slot, tagged so that its release is confirmed.
    pub(crate) fn register_fixed(&mut self, mem: &sys::Mmap) -> Result<u16> {
        let table = self.fixed_table()?;
        if table.has_releases() {
            // Slots let go of since the last flush may be the ones we need.
            self.release_fixed()?;
        }
        let registered = table.stats().registered_bytes;
        let slot = match table.take(self.ring_id, mem.as_ptr(), mem.len()) {
            Some(slot) => slot,
            None => self.take_released_slot(&table, mem)?,
        };
        let iov = libc::iovec {
            iov_base: mem.as_ptr().cast(),
            iov_len: mem.len(),
        };
        // SAFETY: `mem` stays mapped until the slot's tag CQE: its owner hands it to the table
        // on release ([`FixedTable::release`]), which unmaps it only after the kernel confirmed
        // it let go. After the ring is gone it is unmapped at once, which is sound because the
        // registration holds its own references to the pinned pages until teardown.
        let res = unsafe {
            self.ring.submitter().register_buffers_update(
                slot as u32,
                &[iov],
                Some(&[fixed::tag(slot)]),
            )
        };
        if let Err(e) = res {
            table.untake(slot, mem.len());
            return Err(fixed::registration_error(e, mem.len(), registered));
        }
        // The table's other rings get the same registration.
        for ring in table.rings() {
            if ring.id == self.ring_id {
                continue;
            }
            let mirrored = if self.ladder.clone_buffers {
                // SAFETY: both are live rings of this thread (listed in the table); the slot
                // holds `mem`, which the table keeps until the slot is emptied in every ring.
                unsafe {
                    sys::clone_buffers(ring.fd, self.ring.as_raw_fd(), slot as u32, slot as u32, 1)
                }
            } else {
                // SAFETY: as above; the other ring registers the same memory.
                unsafe { sys::update_buffer(ring.fd, slot as u32, &iov) }
            };
            if let Err(e) = mirrored {
                // Take the registration back out of every ring; the slot is free again at our
                // tag (no op ever used it, and the kernel holds its own page references).
                let _ = self.empty_slot_everywhere(&table, slot);
                table.mark_releasing(slot, None);
                return Err(fixed::registration_error(e, mem.len(), registered));
            }
        }
        Ok(slot)
    }

    /// Empties `slot` in every ring of the table (best effort for the other rings: a failure
    /// there leaves a registration the kernel frees with that ring).
    fn empty_slot_everywhere(&mut self, table: &FixedTable, slot: u16) -> std::io::Result<()> {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty entry points at no memory.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(slot as u32, &[empty], None)
        }?;
        for ring in table.rings() {
            if ring.id != self.ring_id {
                // SAFETY: a live ring of this thread (listed in the table); an empty entry
                // points at no memory.
                let _ = unsafe { sys::update_buffer(ring.fd, slot as u32, &empty) };
            }
        }
        Ok(())
    }

    /// The table is full: if slots are being released, give the kernel a moment (50 ms at
    /// most) to confirm one whose last op is done.
    fn take_released_slot(&mut self, table: &Rc<FixedTable>, mem: &sys::Mmap) -> Result<u16> {
        let deadline = Instant::now() + Duration::from_millis(50);
        loop {
            if table.stats().releasing == 0 || Instant::now() >= deadline {
                return Err(Error::FixedTableFull {
                    slots: self.fixed_slots,
                });
            }
            self.enter(1, Some(Duration::from_millis(5)))?;
            self.reap();
            if let Some(slot) = table.take(self.ring_id, mem.as_ptr(), mem.len()) {
                return Ok(slot);
            }
        }
    }

    /// Empties the slots whose owners let go; their memory is freed at the tag CQE.
    pub(super) fn release_fixed(&mut self) -> Result<()> {
        let Some(table) = self.fixed.clone() else {
            return Ok(());
        };
        let mut pending = table.take_releases().into_iter();
        while let Some((slot, mem)) = pending.next() {
            match self.empty_slot_everywhere(&table, slot) {
                // The kernel confirms with the tag CQE; the memory lives until then.
                Ok(()) => table.mark_releasing(slot, Some(mem)),
                Err(e) => {
                    // Still registered: keep this one and the rest for the next flush.
                    table.requeue_releases(std::iter::once((slot, mem)).chain(pending));
                    return Err(Error::os("releasing a fixed buffer slot")(e));
                }
            }
        }
        Ok(())
    }

    /// A tag CQE: the kernel let go of a released fixed buffer slot (its number is in the high
    /// half of the `user_data`), which is free now.
    pub(super) fn complete_tag(&mut self, id: OpId) {
        let released = self
            .fixed
            .as_ref()
            .is_some_and(|t| t.tag_done(id.gen() as u16));
        if !released {
            self.stats.stray_cqes += 1;
        }
    }
}
