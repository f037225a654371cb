//! The ring's registered ("fixed") buffer table, and [`FixedBuf`], memory registered in it.
//!
//! Registering memory pins its pages once, so ops that name it (`READ_FIXED`, `WRITE_FIXED`, the
//! vectored forms, `SEND_ZC` with `IORING_RECVSEND_FIXED_BUF`) skip the per-I/O page pinning.
//! The table is registered sparse (5.19) the first time it is needed and managed in slots:
//!
//! - a slot is taken by a registration update that carries a **tag**;
//! - a slot is released by an update that empties it; the kernel keeps the old registration
//!   alive while any op still uses it, and posts a CQE carrying the tag once it let go of it;
//! - only then is the slot free for reuse and its memory unmapped. A slot released while an op
//!   uses it therefore waits; it never corrupts.
//!
//! Tag CQEs carry [`TAG_KEY`] in the low 32 bits of their `user_data` (no op ever has that key)
//! and the slot in the high 32 bits.
//!
//! **Sharing.** Several rings of one thread can share one table
//! ([`Driver::share_fixed_table`](crate::Driver::share_fixed_table)): every registration is
//! made in the ring that asked for it (tagged) and mirrored into the others, by cloning the slot
//! (`IORING_REGISTER_CLONE_BUFFERS` with offsets, 6.13: the same pinned pages, nothing pinned or
//! accounted twice) or, where cloning is missing, by registering the same memory there too
//! (untagged). A release empties the slot in every ring; the registering ring's tag then says the
//! kernel let go (clones carry no tag, but no op of ours can still use a released buffer: ops own
//! the buffers they use, and the kernel holds its own page references for the rest). So a
//! [`FixedBuf`] registered through one ring is registered in all of them.

use std::cell::{Cell, RefCell};
use std::ops::{Deref, DerefMut};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::Error;
use crate::sys::{Memlock, Mmap};

/// Low 32 bits of a tag CQE's `user_data`: the driver's op slab never hands out this key.
pub(crate) const TAG_KEY: u64 = 0xffff_ffff;

/// Largest table the kernel accepts (`IORING_MAX_REG_BUFFERS`).
pub const MAX_FIXED_SLOTS: u32 = 1 << 14;

/// Largest single registration the kernel accepts (1 GiB).
pub const MAX_FIXED_LEN: usize = 1 << 30;

/// The tag of `slot`'s registration.
pub(crate) fn tag(slot: u16) -> u64 {
    TAG_KEY | (slot as u64) << 32
}

/// A ring the table is registered in. Its descriptor is valid while it is listed: a driver
/// delists its ring before the ring is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingRef {
    pub(crate) id: u64,
    pub(crate) fd: std::os::fd::RawFd,
}

enum Slot {
    Free,
    /// Registered (with a tag) by ring `origin` (`None` once that ring is gone), mirrored in
    /// the table's other rings; `iov` is the memory, for mirroring into a ring that joins later.
    Used {
        origin: Option<u64>,
        iov: (usize, usize),
    },
    /// Emptied in the kernel; the memory lives until the tag CQE says the kernel let go.
    Releasing {
        origin: u64,
        _memory: Option<Arc<Mmap>>,
    },
}

/// Counters of the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedStats {
    /// Slots in the table (0 until first used).
    pub slots: u32,
    /// Slots holding a registration.
    pub used: u32,
    /// Slots released and waiting for the kernel to let go of their memory.
    pub releasing: u32,
    /// Bytes registered now.
    pub registered_bytes: u64,
    /// Rings sharing the table ([`Driver::share_fixed_table`](crate::Driver::share_fixed_table)).
    pub rings: u32,
}

/// The table's state, shared by the driver and every [`FixedBuf`] (and registered group) so that
/// memory released after the driver is gone is simply freed.
pub(crate) struct FixedTable {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u16>>,
    /// Released by their owners, waiting for a driver to empty the slot.
    to_release: RefCell<Vec<(u16, Arc<Mmap>)>>,
    /// The rings the table is registered in (empty once every driver sharing it is gone).
    rings: RefCell<Vec<RingRef>>,
    registered_bytes: Cell<u64>,
}

impl FixedTable {
    pub(crate) fn new(slots: u32, ring: RingRef) -> FixedTable {
        FixedTable {
            slots: RefCell::new((0..slots).map(|_| Slot::Free).collect()),
            free: RefCell::new((0..slots as u16).rev().collect()),
            to_release: RefCell::new(Vec::new()),
            rings: RefCell::new(vec![ring]),
            registered_bytes: Cell::new(0),
        }
    }

    /// Names a table (shared between rings or not) for identity checks: its address.
    pub(crate) fn id(table: &Rc<FixedTable>) -> usize {
        Rc::as_ptr(table) as usize
    }

    /// Slots in the table.
    pub(crate) fn len(&self) -> u32 {
        self.slots.borrow().len() as u32
    }

    /// The rings the table is registered in.
    pub(crate) fn rings(&self) -> Vec<RingRef> {
        self.rings.borrow().clone()
    }

    /// A ring that now shares the table (its registrations were mirrored into it).
    pub(crate) fn add_ring(&self, ring: RingRef) {
        self.rings.borrow_mut().push(ring);
    }

    /// Ring `id` is going away. Slots it registered keep their mirrors in the other rings but
    /// no tag will confirm their release any more; slots waiting for its tag are free now (the
    /// ring's close lets go of them).
    pub(crate) fn remove_ring(&self, id: u64) {
        self.rings.borrow_mut().retain(|r| r.id != id);
        let mut slots = self.slots.borrow_mut();
        for (i, slot) in slots.iter_mut().enumerate() {
            match slot {
                Slot::Used { origin, .. } if *origin == Some(id) => *origin = None,
                Slot::Releasing { origin, .. } if *origin == id => {
                    *slot = Slot::Free;
                    self.free.borrow_mut().push(i as u16);
                }
                _ => {}
            }
        }
    }

    /// Registered slots and their memory, for mirroring into a ring that joins.
    pub(crate) fn used_slots(&self) -> Vec<(u16, libc::iovec)> {
        let slots = self.slots.borrow();
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Used { iov, .. } => Some((
                    i as u16,
                    libc::iovec {
                        iov_base: iov.0 as *mut libc::c_void,
                        iov_len: iov.1,
                    },
                )),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn stats(&self) -> FixedStats {
        let slots = self.slots.borrow();
        let mut s = FixedStats {
            slots: slots.len() as u32,
            registered_bytes: self.registered_bytes.get(),
            rings: self.rings.borrow().len() as u32,
            ..FixedStats::default()
        };
        for slot in slots.iter() {
            match slot {
                Slot::Free => {}
                Slot::Used { .. } => s.used += 1,
                Slot::Releasing { .. } => s.releasing += 1,
            }
        }
        s
    }

    /// Takes a free slot for ring `origin`'s registration of `len` bytes at `addr`.
    pub(crate) fn take(&self, origin: u64, addr: *mut u8, len: usize) -> Option<u16> {
        let slot = self.free.borrow_mut().pop()?;
        self.slots.borrow_mut()[slot as usize] = Slot::Used {
            origin: Some(origin),
            iov: (addr as usize, len),
        };
        self.registered_bytes
            .set(self.registered_bytes.get() + len as u64);
        Some(slot)
    }

    /// Gives back a slot whose registration failed (the kernel never saw it).
    pub(crate) fn untake(&self, slot: u16, len: usize) {
        self.slots.borrow_mut()[slot as usize] = Slot::Free;
        self.free.borrow_mut().push(slot);
        self.registered_bytes
            .set(self.registered_bytes.get() - len as u64);
    }

    /// The owner of `slot` let go of `mem`: a driver empties the slot at its next flush and
    /// frees `mem` once the kernel confirms. Without a ring the memory is simply unmapped: the
    /// kernel's registration holds its own references to the pinned pages until the ring's
    /// teardown releases them, so unmapping our view cannot let the kernel write into memory
    /// that has been handed to anyone else.
    pub(crate) fn release(&self, slot: u16, mem: Arc<Mmap>) {
        self.registered_bytes
            .set(self.registered_bytes.get() - mem.len() as u64);
        if !self.rings.borrow().is_empty() {
            self.to_release.borrow_mut().push((slot, mem));
        }
    }

    /// The slots to empty now, with their memory (they stay `Used` until the kernel took the
    /// update: see [`FixedTable::mark_releasing`]).
    pub(crate) fn take_releases(&self) -> Vec<(u16, Arc<Mmap>)> {
        std::mem::take(&mut *self.to_release.borrow_mut())
    }

    /// Every ring took the update emptying `slot`: its memory lives until the registering
    /// ring's tag CQE (or is freed now if that ring is gone: no op can use it any more).
    pub(crate) fn mark_releasing(&self, slot: u16, mem: Option<Arc<Mmap>>) {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[slot as usize];
        match s {
            Slot::Used {
                origin: Some(origin),
                ..
            } => {
                *s = Slot::Releasing {
                    origin: *origin,
                    _memory: mem,
                }
            }
            _ => {
                *s = Slot::Free;
                self.free.borrow_mut().push(slot);
            }
        }
    }

    /// Updates that could not be issued: retried at the next flush.
    pub(crate) fn requeue_releases(&self, rest: impl Iterator<Item = (u16, Arc<Mmap>)>) {
        self.to_release.borrow_mut().extend(rest);
    }

    /// Whether releases wait for the driver.
    pub(crate) fn has_releases(&self) -> bool {
        !self.to_release.borrow().is_empty()
    }

    /// The tag CQE of `slot` arrived: the kernel let go; free the memory and the slot.
    pub(crate) fn tag_done(&self, slot: u16) -> bool {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(slot as usize) {
            Some(s @ Slot::Releasing { .. }) => {
                *s = Slot::Free;
                self.free.borrow_mut().push(slot);
                true
            }
            _ => false,
        }
    }
}

/// Why a registration was refused, as a typed error: memlock names the limit and the size.
/// The slot of registered memory (`reg`: its slot and table) for ops of a ring whose table is
/// `table` ([`FixedTable::id`]): `None` unless it is that table. Memory registered in another
/// ring's table is plain memory here: its slot number would name other memory in this ring, or
/// none (the kernel's `EFAULT`), so ops on it take the unregistered opcodes, which work on any
/// memory.
pub(crate) fn slot_in(reg: Option<&(u16, Rc<FixedTable>)>, table: Option<usize>) -> Option<u16> {
    let (slot, t) = reg?;
    (Some(FixedTable::id(t)) == table).then_some(*slot)
}

pub(crate) fn registration_error(err: std::io::Error, asked: usize, registered: u64) -> Error {
    match err.raw_os_error() {
        Some(libc::ENOMEM) => Error::MemlockExceeded {
            asked: asked as u64,
            registered,
            limit: match Memlock::current() {
                Memlock::Unlimited => None,
                Memlock::Limited(bytes) => Some(bytes),
            },
        },
        _ => Error::Os {
            op: "registering buffers (IORING_REGISTER_BUFFERS_UPDATE)",
            source: err,
        },
    }
}

/// Page-aligned memory, registered in the driver's fixed buffer table where it could be (or
/// plain memory where the caller allowed the fallback): the buffer of `read_fixed`,
/// `write_fixed` and their vectored forms. Aligned for `O_DIRECT`.
///
/// It derefs to its whole length. An op takes it by value and gives it back in its completion
/// ([`Event::FixedIo`](crate::Event::FixedIo)), so it cannot be touched, freed or reused while
/// the kernel uses it. Dropping it releases its slot; its memory is unmapped only once the
/// kernel has let go of the registration.
///
/// # Examples
/// ```
/// use ringpool::{Driver, Event, Fd};
/// use std::io::Write;
/// let mut driver = Driver::new(Default::default())?;
/// let mut buf = driver.fixed_buf(4096)?;
/// buf[..5].copy_from_slice(b"hello");
/// let mut file = tempfile::tempfile().unwrap();
/// let fd = Fd::from(std::os::fd::OwnedFd::from(file.try_clone().unwrap()));
/// driver.write_fixed(&fd, buf, 0..5, 0, 1)?;
/// driver.wait(None)?;
/// let Event::FixedIo { buf, result } = driver.pop().unwrap().event else { panic!() };
/// assert_eq!(result?, 5);
/// assert!(buf.is_registered() || !driver.ladder().fixed);
/// # Ok::<(), ringpool::Error>(())
/// ```
pub struct FixedBuf {
    mem: Option<Mmap>,
    len: usize,
    /// The table slot and its table; `None` for plain (unregistered) memory.
    reg: Option<(u16, Rc<FixedTable>)>,
}

impl FixedBuf {
    pub(crate) fn new(mem: Mmap, len: usize, reg: Option<(u16, Rc<FixedTable>)>) -> FixedBuf {
        debug_assert!(len <= mem.len());
        FixedBuf {
            mem: Some(mem),
            len,
            reg,
        }
    }

    /// Whether the memory is registered (else ops on it use the unregistered opcodes).
    pub fn is_registered(&self) -> bool {
        self.reg.is_some()
    }

    /// The slot for ops of a ring whose table is `table` ([`slot_in`]).
    pub(crate) fn slot_in(&self, table: Option<usize>) -> Option<u16> {
        slot_in(self.reg.as_ref(), table)
    }

    /// The fixed table slot, if registered.
    pub fn slot(&self) -> Option<u16> {
        self.reg.as_ref().map(|(slot, _)| *slot)
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.mem.as_ref().expect("live until dropped").as_ptr()
    }
}

impl Deref for FixedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping holds at least `len` initialised (zero-filled) bytes and lives as
        // long as `self`. While a read or write op uses it, the op owns `self`, so no reference
        // exists; while it is leased, the kernel only reads it (sends, writes), which shared
        // references allow, and nobody can get `&mut` (a `Lease` has no way to it).
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl DerefMut for FixedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for FixedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBuf")
            .field("len", &self.len)
            .field("slot", &self.slot())
            .finish()
    }
}

impl Drop for FixedBuf {
    fn drop(&mut self) {
        if let (Some((slot, table)), Some(mem)) = (self.reg.take(), self.mem.take()) {
            table.release(slot, Arc::new(mem));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: RingRef = RingRef { id: 1, fd: -1 };

    fn take(t: &FixedTable, len: usize) -> Option<u16> {
        t.take(RING.id, std::ptr::null_mut(), len)
    }

    #[test]
    fn a_released_slot_is_reused_only_after_its_tag() {
        let t = FixedTable::new(2, RING);
        let a = take(&t, 4096).unwrap();
        let b = take(&t, 4096).unwrap();
        assert_eq!(take(&t, 1), None, "table full");
        t.release(a, Arc::new(Mmap::anonymous(4096).unwrap()));
        assert_eq!(take(&t, 1), None, "released but not yet emptied");
        let mut releases = t.take_releases();
        assert_eq!(releases.len(), 1);
        let (slot, mem) = releases.pop().unwrap();
        assert_eq!(slot, a);
        t.mark_releasing(slot, Some(mem));
        assert_eq!(t.stats().releasing, 1);
        assert_eq!(take(&t, 1), None, "emptied, the kernel may still use it");
        assert!(!t.tag_done(b), "a used slot ignores a stray tag");
        assert!(t.tag_done(a));
        assert_eq!(take(&t, 1), Some(a));
    }

    #[test]
    fn a_slot_whose_registering_ring_is_gone_is_free_once_emptied() {
        let other = RingRef { id: 2, fd: -1 };
        let t = FixedTable::new(2, RING);
        t.add_ring(other);
        let a = take(&t, 4096).unwrap();
        let b = take(&t, 4096).unwrap();
        t.release(b, Arc::new(Mmap::anonymous(4096).unwrap()));
        let (slot, mem) = t.take_releases().pop().unwrap();
        t.mark_releasing(slot, Some(mem));
        assert_eq!(t.stats().releasing, 1);
        // The registering ring closes: its pending tag will never come, nor any op of it.
        t.remove_ring(RING.id);
        assert_eq!((t.stats().releasing, t.stats().rings), (0, 1));
        assert_eq!(take(&t, 1), Some(b), "free without a tag");
        // A slot it registered is still mirrored in the other ring; emptied there, it is free.
        t.release(a, Arc::new(Mmap::anonymous(4096).unwrap()));
        let (slot, mem) = t.take_releases().pop().unwrap();
        t.mark_releasing(slot, Some(mem));
        assert_eq!(take(&t, 1), Some(a));
        // With no ring left, released memory is simply freed.
        t.remove_ring(other.id);
        t.release(a, Arc::new(Mmap::anonymous(4096).unwrap()));
        assert!(!t.has_releases());
    }

    #[test]
    fn tags_never_look_like_an_op() {
        for slot in [0u16, 1, u16::MAX] {
            assert_eq!(tag(slot) & 0xffff_ffff, TAG_KEY);
            assert_ne!(tag(slot), 0, "a zero tag disables tagging");
        }
    }
}
