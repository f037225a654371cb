//! Provided buffer groups: memory the kernel picks a buffer from when data arrives.
//!
//! A group is either a **provided buffer ring** (5.19; incrementally consumed with
//! `IOU_PBUF_RING_INC`, 6.12) or a **legacy group** filled with `IORING_OP_PROVIDE_BUFFERS`
//! (5.7). Both look the same from outside: [`BufGroup`] is the user's handle, a selected buffer
//! arrives as a [`PooledBuf`](crate::PooledBuf) and goes back to the group when dropped.
//!
//! ```text
//!   buffer memory (chunks of `count` buffers, page aligned)      ring (entries = max_count)
//!   ┌──────┬──────┬──────┬──────┐                                ┌─────┬─────┬─────┬─────┐
//!   │bid 0 │bid 1 │bid 2 │bid 3 │  ◄── addr,len,bid ────────────  │ e0  │ e1  │ e2  │ e3  │
//!   └──────┴──────┴──────┴──────┘                                └─────┴─────┴─────┴─────┘
//!   kernel takes entries at its head; we add at `tail` and publish it with one Release store
//! ```
//!
//! The ring core is three small steps: write an entry at `tail & mask`, bump the local tail,
//! publish it. The order of entries is mirrored in `order`, because a bundle's buffers are the
//! consecutive ring entries after the first one the completion names.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::fixed::FixedTable;
use crate::sys::{self, BufRingEntry, Mmap, PageBacking};

/// Largest buffer a group accepts: the kernel's per-I/O limit (`MAX_RW_COUNT`) rounded down to
/// a power of two.
pub const MAX_BUF_SIZE: usize = 1 << 30;

/// How to build a buffer group.
///
/// # Examples
/// ```
/// use ringpool::{BufGroupConfig, Driver};
/// let mut driver = Driver::new(Default::default())?;
/// let group = driver.buf_group(BufGroupConfig::new(4096, 64).max_count(256))?;
/// assert_eq!(group.stats().total, 64);
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BufGroupConfig {
    pub(crate) buf_size: usize,
    pub(crate) count: u32,
    pub(crate) max_count: Option<u32>,
    pub(crate) bgid: Option<u16>,
    pub(crate) incremental: bool,
    pub(crate) report_exhaustion: bool,
    pub(crate) registration: Registration,
    pub(crate) huge_pages: bool,
}

/// Whether a group's memory is also registered in the ring's fixed buffer table (a **registered
/// region**), so that buffers the kernel picked for a receive can leave by zero-copy send
/// straight from where they landed, without per-I/O page pinning.
///
/// # Examples
/// ```
/// use ringpool::{BufGroupConfig, Registration};
/// let cfg = BufGroupConfig::new(4096, 256).registration(Registration::Preferred);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Registration {
    /// Plain memory (the default).
    #[default]
    Plain,
    /// Registered, or fail with a typed error ([`Error::MemlockExceeded`], ...).
    Required,
    /// Registered where possible; plain memory where memlock, the table or the kernel refuse.
    Preferred,
}

impl BufGroupConfig {
    /// `count` buffers of `buf_size` bytes each. `count` must be a power of two, at most 32768.
    pub fn new(buf_size: usize, count: u32) -> BufGroupConfig {
        BufGroupConfig {
            buf_size,
            count,
            max_count: None,
            bgid: None,
            incremental: false,
            report_exhaustion: false,
            registration: Registration::Plain,
            huge_pages: false,
        }
    }

    /// Back the buffers with huge pages where the system has them: reserved huge pages
    /// (`MAP_HUGETLB`) if any are free, else transparent huge pages, else normal pages
    /// ([`BufGroup::page_backing`] tells which). Fewer, larger pages to pin for a registered
    /// region, and fewer TLB misses.
    pub fn huge_pages(mut self, yes: bool) -> Self {
        self.huge_pages = yes;
        self
    }

    /// Register the group's memory as one fixed buffer ([`Registration`]). A registered group
    /// cannot grow, and holds at most 1 GiB.
    pub fn registration(mut self, registration: Registration) -> Self {
        self.registration = registration;
        self
    }

    /// Use this group id instead of the next free one (the driver hands ids out in turn, so a
    /// dropped group's id comes back only after all the others: on 6.1 a buffer ring
    /// registered again at once under an id just freed finds nothing to select; asking for
    /// such an id there brings that back).
    pub fn group_id(mut self, bgid: u16) -> Self {
        self.bgid = Some(bgid);
        self
    }

    /// Let the group grow, `count` buffers at a time, up to `max_count` (a power of two) when it
    /// runs dry, instead of waiting for buffers to come back.
    pub fn max_count(mut self, max_count: u32) -> Self {
        self.max_count = Some(max_count);
        self
    }

    /// Ask for an incrementally consumed ring (6.12): a buffer is shared by consecutive receives
    /// until it is full. Falls back to a plain ring where the kernel lacks it.
    pub fn incremental(mut self, yes: bool) -> Self {
        self.incremental = yes;
        self
    }

    /// Report a dry group to the user as [`Error::PoolExhausted`] (and still re-arm), instead of
    /// waiting silently for buffers to come back.
    pub fn report_exhaustion(mut self, yes: bool) -> Self {
        self.report_exhaustion = yes;
        self
    }

    pub(crate) fn validate(&self) -> Result<u32> {
        let max = sys::MAX_RING_ENTRIES;
        if self.count == 0 || !self.count.is_power_of_two() || self.count > max {
            return Err(Error::InvalidBufferCount {
                count: self.count,
                max,
            });
        }
        if self.buf_size == 0 || self.buf_size > MAX_BUF_SIZE {
            return Err(Error::InvalidBufferSize {
                size: self.buf_size,
                max: MAX_BUF_SIZE,
            });
        }
        let max_count = self.max_count.unwrap_or(self.count);
        if max_count < self.count || !max_count.is_power_of_two() || max_count > max {
            return Err(Error::InvalidGrowth {
                count: self.count,
                max_count,
            });
        }
        let bytes = self.buf_size as u128 * max_count as u128;
        if self.registration != Registration::Plain {
            if max_count != self.count {
                return Err(Error::InvalidArgument {
                    what: "a registered region cannot grow (no max_count)",
                });
            }
            if bytes > crate::fixed::MAX_FIXED_LEN as u128 {
                return Err(Error::InvalidArgument {
                    what: "a registered region holds at most 1 GiB",
                });
            }
        }
        if bytes > sys::physical_memory() as u128 {
            return Err(Error::OutOfMemory {
                bytes,
                reason: "larger than physical memory",
            });
        }
        Ok(max_count)
    }
}

/// A snapshot of a group's statistics.
///
/// # Examples
/// ```
/// use ringpool::{BufGroupConfig, Driver};
/// let mut driver = Driver::new(Default::default())?;
/// let group = driver.buf_group(BufGroupConfig::new(1024, 8))?;
/// let s = group.stats();
/// assert_eq!((s.total, s.in_kernel, s.in_user), (8, 8, 0));
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Buffers the group owns.
    pub total: u32,
    /// Buffers the kernel may pick from (in the ring or provided), or on their way back there.
    pub in_kernel: u32,
    /// Buffers handed out to the user and not yet dropped.
    pub in_user: u32,
    /// Times an operation found the group empty (`-ENOBUFS`).
    pub enobufs: u64,
    /// Times a stopped receive was re-armed after buffers came back.
    pub rearms: u64,
    /// Times the group grew.
    pub grows: u64,
    /// Bytes received into the group's buffers.
    pub bytes_received: u64,
}

/// How the kernel learns about free buffers.
pub(crate) enum Backing {
    Ring(RingState),
    /// Buffers returned by the user, waiting for the driver to provide them again.
    Legacy {
        pending: RefCell<Vec<u16>>,
        providing: Cell<u32>,
    },
}

pub(crate) struct RingState {
    mem: Mmap,
    mask: u16,
    /// Our copy of the tail (the kernel reads the published one).
    tail: Cell<u16>,
    /// `order[pos & mask]` is the bid we put at ring position `pos`.
    order: RefCell<Vec<u16>>,
    /// `pos_of[bid]` is the ring position where we last put `bid`.
    pos_of: RefCell<Vec<u16>>,
    pub(crate) incremental: bool,
    /// Incremental rings only: per bid, bytes the kernel has filled so far, slices the user
    /// holds, and whether the kernel has let go of it.
    inc: RefCell<Vec<IncState>>,
}

#[derive(Clone, Copy, Default)]
struct IncState {
    filled: u32,
    user_slices: u32,
    kernel_done: bool,
}

pub(crate) static NEXT_GROUP_SERIAL: AtomicU64 = AtomicU64::new(1);

/// Buffers that went home from other threads (a [`PooledBuf`](crate::PooledBuf) turned into
/// `bytes::Bytes` was dropped there), per driver. The driver's thread gives them back to their
/// groups at its next flush; the first return after a flush writes an eventfd that the driver
/// reads with an op of its own, so a driver waiting for buffers wakes up.
pub(crate) struct CrossReturns {
    /// (group serial, bid) of each buffer back.
    queue: Mutex<Vec<(u64, u16)>>,
    /// The queue holds something the driver has not taken yet.
    pending: AtomicBool,
    /// A buffer was turned into `Bytes`: the driver keeps a read armed on `wake`.
    in_use: AtomicBool,
    /// Buffers out as `Bytes` now (a driver with nothing else in flight waits for them only).
    outstanding: AtomicUsize,
    wake: OwnedFd,
}

impl CrossReturns {
    pub(crate) fn new() -> Result<CrossReturns> {
        let fd = sys::syscall!(eventfd(0, libc::EFD_CLOEXEC))
            .map_err(Error::os("creating an eventfd"))?;
        Ok(CrossReturns {
            queue: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            in_use: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            // SAFETY: eventfd returned a new descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Buffer `bid` of group `serial` is back (any thread).
    pub(crate) fn push(&self, serial: u64, bid: u16) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((serial, bid));
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.notify();
        }
    }

    /// Wakes the driver (any thread): its armed read of the eventfd completes.
    pub(crate) fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes we own to the eventfd we own. A full counter (EAGAIN) means
        // the driver has a wake-up coming anyway.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Keeps the driver's read of the eventfd armed from now on (see [`CrossReturns::notify`]).
    pub(crate) fn watch(&self) {
        self.in_use.store(true, Ordering::Relaxed);
    }

    /// What came back since the last call (the driver's thread).
    pub(crate) fn take(&self) -> Vec<(u64, u16)> {
        if !self.pending.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut *q)
    }

    /// A buffer goes out as `Bytes`.
    pub(crate) fn lend(&self) {
        self.in_use.store(true, Ordering::Relaxed);
        self.outstanding.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether buffers are out as `Bytes` (one may come home and wake the driver).
    pub(crate) fn outstanding(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) > 0
    }

    pub(crate) fn in_use(&self) -> bool {
        self.in_use.load(Ordering::Relaxed)
    }

    pub(crate) fn wake_fd(&self) -> std::os::fd::RawFd {
        self.wake.as_raw_fd()
    }
}

/// The state shared by a group's handle, its buffers and the ops selecting from it. It lives
/// until the last of them is gone, so a buffer never outlives its memory.
pub(crate) struct GroupShared {
    pub(crate) bgid: u16,
    pub(crate) buf_size: u32,
    pub(crate) backing: Backing,
    /// Shared (`Arc`) so that a buffer turned into `bytes::Bytes` keeps its memory mapped
    /// wherever it goes, even after the group is gone.
    chunks: RefCell<Vec<Arc<Mmap>>>,
    chunk_len: u32,
    /// Names the group in the driver's [`CrossReturns`] (bgids are reused, this never is).
    pub(crate) serial: u64,
    /// The ring (driver) that made the group: its bgid means this group only there.
    pub(crate) owner: u64,
    /// Where buffers dropped on other threads come home.
    pub(crate) cross: Arc<CrossReturns>,
    count: Cell<u32>,
    pub(crate) max_count: u32,
    pub(crate) report_exhaustion: bool,
    in_user: Cell<u32>,
    pub(crate) enobufs: Cell<u64>,
    pub(crate) rearms: Cell<u64>,
    grows: Cell<u64>,
    bytes_received: Cell<u64>,
    /// False once the kernel forgot the group: returned buffers are then just dropped.
    registered: Cell<bool>,
    /// False once the user's [`BufGroup`] is dropped.
    pub(crate) handle_alive: Cell<bool>,
    /// Buffers came back since the driver last looked (re-arm parked receives).
    pub(crate) refilled: Cell<bool>,
    /// Ops of the driver that select from this group and whose last completion has not been
    /// reaped: while there are any, a completion naming one of our bids may still be coming.
    pub(crate) selecting: Cell<u32>,
    /// The fixed table slot of the (single) chunk, for registered regions.
    fixed: RefCell<Option<(u16, Rc<FixedTable>)>>,
    huge_pages: bool,
    pub(crate) page_backing: PageBacking,
}

impl Drop for GroupShared {
    /// A registered region's memory goes to the fixed table, which frees it only once the
    /// kernel let go of the registration.
    fn drop(&mut self) {
        if let Some((slot, table)) = self.fixed.get_mut().take() {
            if let Some(chunk) = self.chunks.get_mut().pop() {
                table.release(slot, chunk);
            }
        }
    }
}

impl GroupShared {
    /// Allocates a group; the caller registers it with the kernel and then calls `fill`.
    pub(crate) fn new(
        cfg: &BufGroupConfig,
        bgid: u16,
        max_count: u32,
        ring: bool,
        incremental: bool,
        cross: Arc<CrossReturns>,
        owner: u64,
    ) -> Result<GroupShared> {
        let (chunk, page_backing) = alloc_chunk(cfg.buf_size, cfg.count, cfg.huge_pages)?;
        let backing = if ring {
            let mem = Mmap::anonymous(max_count as usize * std::mem::size_of::<BufRingEntry>())
                .map_err(Error::os("allocating a buffer ring"))?;
            Backing::Ring(RingState {
                mem,
                mask: (max_count - 1) as u16,
                tail: Cell::new(0),
                order: RefCell::new(vec![0; max_count as usize]),
                pos_of: RefCell::new(vec![0; max_count as usize]),
                incremental,
                inc: RefCell::new(if incremental {
                    vec![IncState::default(); max_count as usize]
                } else {
                    Vec::new()
                }),
            })
        } else {
            Backing::Legacy {
                pending: RefCell::new(Vec::new()),
                providing: Cell::new(0),
            }
        };
        Ok(GroupShared {
            bgid,
            buf_size: cfg.buf_size as u32,
            backing,
            chunks: RefCell::new(vec![Arc::new(chunk)]),
            chunk_len: cfg.count,
            serial: NEXT_GROUP_SERIAL.fetch_add(1, Ordering::Relaxed),
            owner,
            cross,
            count: Cell::new(cfg.count),
            max_count,
            report_exhaustion: cfg.report_exhaustion,
            in_user: Cell::new(0),
            enobufs: Cell::new(0),
            rearms: Cell::new(0),
            grows: Cell::new(0),
            bytes_received: Cell::new(0),
            registered: Cell::new(false),
            handle_alive: Cell::new(true),
            refilled: Cell::new(false),
            selecting: Cell::new(0),
            fixed: RefCell::new(None),
            huge_pages: cfg.huge_pages,
            page_backing,
        })
    }

    /// The ring memory's address and entry count, for `IORING_REGISTER_PBUF_RING`.
    pub(crate) fn ring_registration(&self) -> Option<(u64, u16)> {
        match &self.backing {
            Backing::Ring(r) => Some((r.mem.as_ptr() as u64, r.mask.wrapping_add(1))),
            Backing::Legacy { .. } => None,
        }
    }

    /// The memory of a group that cannot grow (one chunk), for registering it.
    pub(crate) fn region(&self) -> std::cell::Ref<'_, sys::Mmap> {
        std::cell::Ref::map(self.chunks.borrow(), |c| &*c[0])
    }

    /// Records the fixed table slot the group's memory is registered in.
    pub(crate) fn set_fixed(&self, slot: u16, table: Rc<FixedTable>) {
        *self.fixed.borrow_mut() = Some((slot, table));
    }

    /// The slot of a registered region for ops of a ring whose table is `table`
    /// ([`crate::fixed::slot_in`]).
    pub(crate) fn fixed_slot_in(&self, table: Option<usize>) -> Option<u16> {
        crate::fixed::slot_in(self.fixed.borrow().as_ref(), table)
    }

    /// The fixed table slot of a registered region.
    pub(crate) fn fixed_slot(&self) -> Option<u16> {
        self.fixed.borrow().as_ref().map(|(slot, _)| *slot)
    }

    /// Whether the kernel knows the group (false once it forgot it).
    pub(crate) fn registered(&self) -> bool {
        self.registered.get()
    }

    pub(crate) fn set_registered(&self, yes: bool) {
        self.registered.set(yes);
    }

    pub(crate) fn is_ring(&self) -> bool {
        matches!(self.backing, Backing::Ring(_))
    }

    pub(crate) fn count(&self) -> u32 {
        self.count.get()
    }

    /// The memory chunk holding buffer `bid` (kept alive by a buffer sent to another thread).
    pub(crate) fn chunk_of(&self, bid: u16) -> Arc<Mmap> {
        self.chunks.borrow()[(bid as u32 / self.chunk_len) as usize].clone()
    }

    /// Address of buffer `bid`.
    pub(crate) fn buf_ptr(&self, bid: u16) -> *mut u8 {
        let chunks = self.chunks.borrow();
        let chunk = &chunks[(bid as u32 / self.chunk_len) as usize];
        let index = (bid as u32 % self.chunk_len) as usize;
        // SAFETY: `index < chunk_len` and the chunk holds `chunk_len * buf_size` bytes, so the
        // offset stays inside the mapping.
        unsafe { chunk.as_ptr().add(index * self.buf_size as usize) }
    }

    /// Hands buffers `first..first+n` to the kernel for the first time (ring groups), or queues
    /// them for the driver to provide (legacy groups).
    pub(crate) fn fill(&self, first: u16, n: u32) {
        for bid in first as u32..first as u32 + n {
            self.push_free(bid as u16);
        }
        self.publish();
    }

    /// Adds one more chunk of buffers; returns the first new bid, or `None` at the maximum.
    pub(crate) fn grow(&self) -> Result<Option<(u16, u32)>> {
        let count = self.count.get();
        if count >= self.max_count {
            return Ok(None);
        }
        let (chunk, _) = alloc_chunk(self.buf_size as usize, self.chunk_len, self.huge_pages)?;
        self.chunks.borrow_mut().push(Arc::new(chunk));
        self.count.set(count + self.chunk_len);
        self.grows.set(self.grows.get() + 1);
        Ok(Some((count as u16, self.chunk_len)))
    }

    /// Queues `bid` as free without publishing (ring) / for providing (legacy).
    fn push_free(&self, bid: u16) {
        match &self.backing {
            Backing::Ring(r) => {
                let pos = r.tail.get();
                let idx = (pos & r.mask) as usize;
                let entry = r.mem.as_ptr().cast::<BufRingEntry>().wrapping_add(idx);
                // SAFETY: `idx <= mask < entries`, so `entry` is inside the ring mapping. The
                // kernel only reads entries between its head and the published tail; this one is
                // past the published tail, so we are its only user. We write the three data
                // fields and never `resv`, which in entry 0 is the shared tail.
                unsafe {
                    (&raw mut (*entry).addr).write_volatile(self.buf_ptr(bid) as u64);
                    (&raw mut (*entry).len).write_volatile(self.buf_size);
                    (&raw mut (*entry).bid).write_volatile(bid);
                }
                r.order.borrow_mut()[idx] = bid;
                r.pos_of.borrow_mut()[bid as usize] = pos;
                if r.incremental {
                    r.inc.borrow_mut()[bid as usize] = IncState::default();
                }
                r.tail.set(pos.wrapping_add(1));
            }
            Backing::Legacy { pending, .. } => pending.borrow_mut().push(bid),
        }
    }

    /// Makes pushed entries visible to the kernel: one `Release` store of the tail.
    fn publish(&self) {
        if let Backing::Ring(r) = &self.backing {
            // SAFETY: the tail is the u16 at byte 14 of the page-aligned ring mapping, so it is
            // aligned and in bounds; the kernel reads it with an acquire load, which pairs with
            // this release store so it sees the entries written before it.
            let tail = unsafe {
                &*r.mem
                    .as_ptr()
                    .add(sys::BUF_RING_TAIL_OFFSET)
                    .cast::<AtomicU16>()
            };
            tail.store(r.tail.get(), Ordering::Release);
        }
    }

    /// A buffer came back from the user.
    pub(crate) fn release(&self, bid: u16) {
        if let Backing::Ring(r) = &self.backing {
            if r.incremental {
                let mut inc = r.inc.borrow_mut();
                let st = &mut inc[bid as usize];
                st.user_slices -= 1;
                if st.user_slices > 0 {
                    return;
                }
                self.in_user.set(self.in_user.get() - 1);
                if !st.kernel_done {
                    // The kernel still fills the rest of this buffer; it stays in the ring.
                    return;
                }
                drop(inc);
                self.recycle(bid);
                return;
            }
        }
        self.in_user.set(self.in_user.get() - 1);
        self.recycle(bid);
    }

    /// Puts `bid` back where the kernel can pick it.
    fn recycle(&self, bid: u16) {
        if !self.registered.get() {
            return;
        }
        self.push_free(bid);
        self.publish();
        self.refilled.set(true);
    }

    /// Buffers named by a completion: `bid` first, then (bundles) the ring entries after it.
    /// Returns `(bid, offset, len)` for each, and marks them as in user hands.
    pub(crate) fn take(
        &self,
        bid: u16,
        bytes: u32,
        buf_more: bool,
        out: &mut Vec<(u16, u32, u32)>,
    ) {
        self.bytes_received
            .set(self.bytes_received.get() + bytes as u64);
        match &self.backing {
            Backing::Ring(r) if r.incremental => {
                let mut inc = r.inc.borrow_mut();
                let st = &mut inc[bid as usize];
                if st.user_slices == 0 {
                    self.in_user.set(self.in_user.get() + 1);
                }
                out.push((bid, st.filled, bytes));
                st.filled += bytes;
                st.user_slices += 1;
                st.kernel_done = !buf_more;
            }
            Backing::Ring(r) => {
                // The first buffer is the one the completion names, never the one our mirror
                // now has at its ring position: that slot may have been refilled since the
                // kernel consumed it. A read of a regular file the kernel cannot poll (tmpfs,
                // whose reads go to io-wq) consumes its buffer when it is issued and completes
                // later, after completions of ops issued behind it: their buffers came home
                // into the ring slot the read's buffer had
                // (`core_regression_tmpfs_a_late_file_read_is_handed_a_refilled_ring_slot`).
                let order = r.order.borrow();
                let pos_of = r.pos_of.borrow();
                let first = pos_of[bid as usize];
                let (mut b, mut pos, mut left) = (bid, first, bytes);
                loop {
                    let len = left.min(self.buf_size);
                    out.push((b, 0, len));
                    self.in_user.set(self.in_user.get() + 1);
                    left -= len;
                    if left == 0 {
                        break;
                    }
                    // A bundle: its further buffers are the ring entries after the first. The
                    // kernel consumes a receive bundle's entries when it completes, so their
                    // completion is reaped before any later one lets us refill those slots;
                    // if a slot was refilled all the same, the bid there is not the one the
                    // kernel filled, and handing it out would alias a buffer.
                    pos = pos.wrapping_add(1);
                    b = order[(pos & r.mask) as usize];
                    assert_eq!(
                        pos_of[b as usize], pos,
                        "bundle of group {}: ring position {pos} was refilled before its \
                         completion was reaped",
                        self.bgid
                    );
                }
            }
            Backing::Legacy { .. } => {
                out.push((bid, 0, bytes));
                self.in_user.set(self.in_user.get() + 1);
            }
        }
    }

    /// A completion that consumed a buffer but delivered no bytes (end of stream): the buffer
    /// goes straight back.
    /// Whether the kernel, whose ring head is at position `head`, still holds `bid` in the
    /// ring: the position where we last put it lies between that head and our tail. Ring
    /// groups only (legacy groups: false).
    pub(crate) fn ring_holds(&self, bid: u16, head: u16) -> bool {
        let Backing::Ring(r) = &self.backing else {
            return false;
        };
        let pos = r.pos_of.borrow()[bid as usize];
        pos.wrapping_sub(head) < r.tail.get().wrapping_sub(head)
    }

    /// A completion named `bid` without handing out bytes, and the kernel let go of it (the
    /// driver checked: [`GroupShared::ring_holds`]): it goes back to the kernel unless the user
    /// still holds slices of it (incremental rings).
    pub(crate) fn put_back_unused(&self, bid: u16) {
        if let Backing::Ring(r) = &self.backing {
            if r.incremental {
                // The kernel keeps the buffer unless it says it let go of it.
                let mut inc = r.inc.borrow_mut();
                inc[bid as usize].kernel_done = true;
                if inc[bid as usize].user_slices > 0 {
                    return;
                }
                drop(inc);
                self.recycle(bid);
                return;
            }
        }
        self.recycle(bid);
    }

    /// Legacy groups: the bids waiting to be provided, sorted, as runs of consecutive bids
    /// inside one chunk: `(first bid, count, address)`.
    /// Runs are at most `max_run` long (1: one buffer per provide, where the kernel does not
    /// say how many of a run it took).
    pub(crate) fn take_pending_runs(&self, max_run: u16) -> Vec<(u16, u16, *mut u8)> {
        let Backing::Legacy { pending, providing } = &self.backing else {
            return Vec::new();
        };
        let mut bids = std::mem::take(&mut *pending.borrow_mut());
        if bids.is_empty() {
            return Vec::new();
        }
        bids.sort_unstable();
        providing.set(providing.get() + bids.len() as u32);
        let mut runs: Vec<(u16, u16, *mut u8)> = Vec::new();
        for bid in bids {
            if let Some(last) = runs.last_mut() {
                let next = last.0 as u32 + last.1 as u32;
                if next == bid as u32 && bid as u32 % self.chunk_len != 0 && last.1 < max_run {
                    last.1 += 1;
                    continue;
                }
            }
            runs.push((bid, 1, self.buf_ptr(bid)));
        }
        runs
    }

    /// Legacy groups: a provide op for `n` buffers completed.
    pub(crate) fn provided(&self, n: u32) {
        if let Backing::Legacy { providing, .. } = &self.backing {
            providing.set(providing.get() - n);
        }
    }

    /// Legacy groups: a provide op failed; queue its buffers again.
    pub(crate) fn provide_failed(&self, first: u16, n: u32) {
        if let Backing::Legacy { pending, providing } = &self.backing {
            providing.set(providing.get() - n);
            pending
                .borrow_mut()
                .extend((first as u32..first as u32 + n).map(|b| b as u16));
        }
    }

    /// A snapshot of the statistics.
    pub(crate) fn stats(&self) -> GroupStats {
        let total = self.count.get();
        let in_user = self.in_user.get();
        GroupStats {
            total,
            in_kernel: total - in_user,
            in_user,
            enobufs: self.enobufs.get(),
            rearms: self.rearms.get(),
            grows: self.grows.get(),
            bytes_received: self.bytes_received.get(),
        }
    }

    /// Bytes of buffer memory the group holds (what a server pays for its receive buffers).
    pub(crate) fn buffer_bytes(&self) -> u64 {
        self.count.get() as u64 * self.buf_size as u64
    }
}

fn alloc_chunk(buf_size: usize, count: u32, huge: bool) -> Result<(Mmap, PageBacking)> {
    let bytes = buf_size as u128 * count as u128;
    let len = usize::try_from(bytes).map_err(|_| Error::OutOfMemory {
        bytes,
        reason: "larger than the address space",
    })?;
    let mapped = if huge {
        Mmap::anonymous_huge(len)
    } else {
        Mmap::anonymous(len).map(|m| (m, PageBacking::Normal))
    };
    mapped.map_err(|e| match e.raw_os_error() {
        Some(libc::ENOMEM) => Error::OutOfMemory {
            bytes,
            reason: "mmap refused it",
        },
        _ => Error::Os {
            op: "allocating buffer memory",
            source: e,
        },
    })
}

/// The user's handle to a buffer group. Cheap to clone; the group stays registered while a
/// handle exists, and its memory lives until the last buffer taken from it is dropped.
///
/// # Examples
/// ```
/// use ringpool::{BufGroupConfig, Driver};
/// let mut driver = Driver::new(Default::default())?;
/// let group = driver.buf_group(BufGroupConfig::new(4096, 16))?;
/// println!("group {} holds {} bytes", group.id(), group.buffer_bytes());
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Clone)]
pub struct BufGroup {
    pub(crate) shared: Rc<GroupShared>,
    pub(crate) _handle: Rc<HandleGuard>,
}

/// Marks the group as abandoned by the user when the last handle clone drops.
pub(crate) struct HandleGuard(pub(crate) Rc<GroupShared>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.0.handle_alive.set(false);
    }
}

impl BufGroup {
    /// The group id the kernel knows it by.
    pub fn id(&self) -> u16 {
        self.shared.bgid
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.shared.buf_size as usize
    }

    /// Current statistics.
    pub fn stats(&self) -> GroupStats {
        self.shared.stats()
    }

    /// Bytes of buffer memory the group holds.
    pub fn buffer_bytes(&self) -> u64 {
        self.shared.buffer_bytes()
    }

    /// Whether the group is a provided buffer ring (else a legacy group).
    pub fn is_ring(&self) -> bool {
        self.shared.is_ring()
    }

    /// Whether the group's memory is registered in the fixed buffer table (a registered region):
    /// zero-copy sends of its buffers then name it and skip per-I/O page pinning.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{BufGroupConfig, Driver, Registration};
    /// let mut driver = Driver::new(Default::default())?;
    /// let cfg = BufGroupConfig::new(4096, 16).registration(Registration::Preferred);
    /// let group = driver.buf_group(cfg)?;
    /// println!("registered region: {}", group.is_registered());
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn is_registered(&self) -> bool {
        self.shared.fixed_slot().is_some()
    }

    /// What backs the group's buffers (huge pages only if asked for and available).
    ///
    /// # Examples
    /// ```
    /// use ringpool::{BufGroupConfig, Driver};
    /// let mut driver = Driver::new(Default::default())?;
    /// let group = driver.buf_group(BufGroupConfig::new(65536, 64).huge_pages(true))?;
    /// println!("{:?}", group.page_backing());
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn page_backing(&self) -> PageBacking {
        self.shared.page_backing
    }

    /// Whether the group is an incrementally consumed ring.
    pub fn is_incremental(&self) -> bool {
        matches!(&self.shared.backing, Backing::Ring(r) if r.incremental)
    }
}

impl std::fmt::Debug for BufGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufGroup")
            .field("id", &self.id())
            .field("buf_size", &self.buf_size())
            .field("ring", &self.is_ring())
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cross() -> Arc<CrossReturns> {
        Arc::new(CrossReturns::new().unwrap())
    }

    #[test]
    fn validation_rejects_bad_shapes() {
        assert!(matches!(
            BufGroupConfig::new(4096, 0).validate(),
            Err(Error::InvalidBufferCount { .. })
        ));
        assert!(matches!(
            BufGroupConfig::new(4096, 3).validate(),
            Err(Error::InvalidBufferCount { .. })
        ));
        assert!(matches!(
            BufGroupConfig::new(4096, 65536).validate(),
            Err(Error::InvalidBufferCount { .. })
        ));
        assert!(matches!(
            BufGroupConfig::new(0, 8).validate(),
            Err(Error::InvalidBufferSize { .. })
        ));
        assert!(matches!(
            BufGroupConfig::new(MAX_BUF_SIZE + 1, 8).validate(),
            Err(Error::InvalidBufferSize { .. })
        ));
        assert!(matches!(
            BufGroupConfig::new(64, 8).max_count(4).validate(),
            Err(Error::InvalidGrowth { .. })
        ));
        assert!(matches!(
            BufGroupConfig::new(64, 8).max_count(24).validate(),
            Err(Error::InvalidGrowth { .. })
        ));
        assert!(matches!(
            BufGroupConfig::new(MAX_BUF_SIZE, 32768).validate(),
            Err(Error::OutOfMemory { .. })
        ));
        assert_eq!(
            BufGroupConfig::new(64, 8).max_count(32).validate().unwrap(),
            32
        );
    }

    #[test]
    fn legacy_runs_coalesce_within_chunks() {
        let cfg = BufGroupConfig::new(64, 4).max_count(8);
        let g = GroupShared::new(&cfg, 1, 8, false, false, cross(), 0).unwrap();
        g.set_registered(true);
        g.grow().unwrap();
        g.fill(0, 8);
        let runs: Vec<_> = g
            .take_pending_runs(u16::MAX)
            .iter()
            .map(|r| (r.0, r.1))
            .collect();
        // Chunks are separate mappings, so a run never crosses from bid 3 to bid 4.
        assert_eq!(runs, vec![(0, 4), (4, 4)]);
        g.provided(8);
        // Where the kernel does not count what it took, one buffer per provide.
        g.fill(0, 3);
        let single: Vec<_> = g.take_pending_runs(1).iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(single, vec![(0, 1), (1, 1), (2, 1)]);
        g.provided(3);
    }

    #[test]
    fn ring_bundle_follows_ring_order() {
        let cfg = BufGroupConfig::new(64, 4);
        let g = GroupShared::new(&cfg, 1, 4, true, false, cross(), 0).unwrap();
        g.set_registered(true);
        // Put the buffers in the ring in the order 2, 0, 3, 1.
        for bid in [2, 0, 3, 1] {
            g.push_free(bid);
        }
        g.publish();
        let mut out = Vec::new();
        g.take(0, 150, false, &mut out);
        assert_eq!(out, vec![(0, 0, 64), (3, 0, 64), (1, 0, 22)]);
        assert_eq!(g.stats().in_user, 3);
    }
}
