//! Zero-copy receive areas (zcrx), their state without the kernel: the area the kernel writes
//! received bytes into, the refill queue buffers go home through, and [`ZcrxBuf`], the user's
//! hold on one received buffer. The driver's side (registering, `RECV_ZC`, flushing the refill
//! queue, pausing on a full area) is in `driver/zcrx.rs`.
//!
//! Ownership: a buffer of the area belongs to the kernel until a `RECV_ZC` completion names it,
//! to the user's [`ZcrxBuf`] (or the `Bytes` made of it) from then on, and to the kernel again
//! once its entry is in the refill queue. The kernel never writes a buffer it handed out before
//! it is refilled, so a held buffer never changes. The area's memory stays mapped while the
//! driver or any buffer of it is alive.

use std::cell::{Cell, RefCell};
use std::ops::Deref;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::pool::CrossReturns;
use crate::sys::{self, Mmap, PageBacking, ZcrxRqe};

/// Size of one receive buffer of an area: the page size, the only size the device-less mode
/// takes (the kernel fills at most one page per completion).
pub const ZCRX_BUF_SIZE: usize = 4096;

/// Most buffers one area may have: the kernel's largest refill queue (32768 entries), which
/// must have room for every buffer of the area at once. 128 MiB of 4 KiB buffers.
pub const MAX_ZCRX_BUFFERS: usize = 1 << 15;

/// Why a zero-copy receive area could not be registered ([`Error::ZcrxUnavailable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ZcrxRefusal {
    /// The driver's ring was not set up for it: build it with
    /// [`DriverConfig::zero_copy_receive`](crate::DriverConfig::zero_copy_receive).
    RingNotSetUp,
    /// The ring has no `DEFER_TASKRUN` (before 6.1, or the `no-defer-taskrun` rung is forced).
    NoDeferTaskrun,
    /// The kernel lacks it: zero-copy receive came in 6.15, its device-less mode in 7.1.
    KernelTooOld {
        /// The running kernel.
        kernel: sys::KernelVersion,
        /// The kernel it needs.
        needs: &'static str,
    },
    /// The process lacks `CAP_NET_ADMIN`, which registering an area needs.
    NoCapNetAdmin,
    /// The `no-zcrx` rung is forced (`RINGPOOL_FORCE` or `DriverConfig::force`).
    Forced,
    /// No network interface of that name.
    NoSuchInterface {
        /// The name given.
        interface: String,
    },
    /// The device or its queue cannot do zero-copy receive (it needs header/data split, flow
    /// steering and a page-pool memory provider), or the queue is taken.
    DeviceCannot {
        /// The interface.
        interface: String,
        /// Its queue.
        queue: u32,
        /// The kernel's errno.
        errno: i32,
    },
    /// The area's memory would exceed the locked-memory limit (`RLIMIT_MEMLOCK`).
    Memlock {
        /// Bytes asked for.
        bytes: u64,
    },
    /// Another refusal of the kernel's (its errno).
    Kernel {
        /// The errno.
        errno: i32,
    },
}

impl std::fmt::Display for ZcrxRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ZcrxRefusal::RingNotSetUp => write!(f, "the driver's ring was not set up for it (DriverConfig::zero_copy_receive(true))"),
            ZcrxRefusal::NoDeferTaskrun => write!(f, "the ring has no DEFER_TASKRUN (kernel before 6.1, or the no-defer-taskrun rung is forced)"),
            ZcrxRefusal::KernelTooOld { kernel, needs } => write!(f, "kernel {kernel} lacks it (needs {needs})"),
            ZcrxRefusal::NoCapNetAdmin => write!(f, "registering an area needs CAP_NET_ADMIN (run as root or grant the capability)"),
            ZcrxRefusal::Forced => write!(f, "the no-zcrx rung is forced (RINGPOOL_FORCE or DriverConfig::force)"),
            ZcrxRefusal::NoSuchInterface { interface } => write!(f, "no network interface named {interface:?}"),
            ZcrxRefusal::DeviceCannot { interface, queue, errno } => write!(f, "{interface} queue {queue} cannot (errno {errno}): zero-copy receive needs a NIC with header/data split, flow steering and a free queue"),
            ZcrxRefusal::Memlock { bytes } => write!(f, "pinning {bytes} bytes exceeds the locked-memory limit (raise `ulimit -l`, or use a smaller area)"),
            ZcrxRefusal::Kernel { errno } => write!(f, "the kernel refused it (errno {errno})"),
        }
    }
}

/// Where a zero-copy receive area gets its bytes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZcrxSource {
    /// No device (7.1+): any TCP socket, the kernel copying each received byte into the area
    /// once (instead of into a buffer the application copies again). Needs `CAP_NET_ADMIN`.
    DeviceLess,
    /// A NIC's receive queue (6.15+): true zero copy, for flows the NIC steers to that queue.
    /// The NIC must split headers from payload and have the queue set up (ringpool does not
    /// configure the NIC). Needs `CAP_NET_ADMIN`.
    Nic {
        /// The interface's name (`eth0`).
        interface: String,
        /// Its receive queue.
        queue: u32,
    },
}

/// How to build a zero-copy receive area ([`Driver::zcrx_area`](crate::Driver::zcrx_area)).
///
/// # Examples
/// ```
/// let cfg = ringpool::ZcrxConfig::device_less(16 << 20);
/// assert_eq!(cfg.buffers(), 4096);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZcrxConfig {
    pub(crate) source: ZcrxSource,
    pub(crate) area_bytes: usize,
}

impl ZcrxConfig {
    /// An area of `area_bytes` (rounded up to whole 4 KiB buffers) fed without a device.
    pub fn device_less(area_bytes: usize) -> ZcrxConfig {
        ZcrxConfig {
            source: ZcrxSource::DeviceLess,
            area_bytes,
        }
    }

    /// An area of `area_bytes` fed by receive queue `queue` of `interface`.
    ///
    /// # Examples
    /// ```
    /// let cfg = ringpool::ZcrxConfig::nic("eth0", 3, 64 << 20);
    /// assert_eq!(cfg.buffers(), 16384);
    /// ```
    pub fn nic(interface: &str, queue: u32, area_bytes: usize) -> ZcrxConfig {
        ZcrxConfig {
            source: ZcrxSource::Nic {
                interface: interface.to_string(),
                queue,
            },
            area_bytes,
        }
    }

    /// The buffers the area will have.
    pub fn buffers(&self) -> usize {
        self.area_bytes.div_ceil(ZCRX_BUF_SIZE)
    }

    /// The area's buffer count, checked: at least one, at most [`MAX_ZCRX_BUFFERS`].
    pub(crate) fn checked_buffers(&self) -> Result<u32> {
        match self.buffers() {
            0 => Err(Error::InvalidArgument {
                what: "a zero-copy receive area needs at least one 4 KiB buffer",
            }),
            n if n > MAX_ZCRX_BUFFERS => Err(Error::InvalidArgument {
                what: "a zero-copy receive area holds at most 32768 buffers (128 MiB)",
            }),
            n => Ok(n as u32),
        }
    }
}

/// Counters of a zero-copy receive area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZcrxStats {
    /// Buffers in the area.
    pub total: u32,
    /// Buffers the user holds ([`ZcrxBuf`]s and `Bytes` made of them).
    pub in_user: u32,
    /// Buffers the kernel has (free, or filled and not yet completed).
    pub in_kernel: u32,
    /// Bytes received into the area.
    pub bytes_received: u64,
    /// Buffers handed back through the refill queue.
    pub refills: u64,
    /// Times the driver asked the kernel to take the refill queue's buffers back now.
    pub flushes: u64,
    /// Times a receive found the area full (every buffer out) and paused.
    pub full: u64,
    /// Times a paused receive was re-armed after buffers came back.
    pub rearms: u64,
    /// Whether the area is device-less (every byte copied once by the kernel).
    pub device_less: bool,
    /// What pages back the area.
    pub backing: PageBacking,
}

/// The refill queue: entries in memory the kernel reads, a tail we publish, a head it advances.
pub(crate) struct RefillQueue {
    /// The region (header and entries), mapped by us and pinned by the kernel: kept mapped
    /// while the queue lives.
    _mem: Mmap,
    head: *const AtomicU32,
    tail: *const AtomicU32,
    rqes: *mut ZcrxRqe,
    mask: u32,
    /// Our copy of the tail.
    local_tail: Cell<u32>,
}

impl RefillQueue {
    /// Bytes of region a queue of `entries` needs (page-rounded).
    pub(crate) fn region_len(entries: u32) -> usize {
        (sys::ZCRX_RQ_HEADER + entries as usize * std::mem::size_of::<ZcrxRqe>()).div_ceil(4096)
            * 4096
    }

    /// The queue laid out in `mem` as `offsets` say, of `entries` (a power of two).
    pub(crate) fn new(mem: Mmap, offsets: sys::ZcrxOffsets, entries: u32) -> Result<RefillQueue> {
        let fits = |off: u32, len: usize| {
            (off as usize)
                .checked_add(len)
                .is_some_and(|e| e <= mem.len())
        };
        let rqes_len = entries as usize * std::mem::size_of::<ZcrxRqe>();
        if !entries.is_power_of_two()
            || !fits(offsets.head, 4)
            || !fits(offsets.tail, 4)
            || !fits(offsets.rqes, rqes_len)
            || offsets.head % 4 != 0
            || offsets.tail % 4 != 0
            || offsets.rqes % 8 != 0
        {
            return Err(Error::InvalidArgument {
                what: "the kernel's refill queue layout does not fit its region",
            });
        }
        let base = mem.as_ptr();
        // SAFETY: each offset plus its length lies inside `mem` and is aligned for its type
        // (checked above); `AtomicU32` has `u32`'s layout, and the kernel accesses these words
        // atomically too.
        let (head, tail, rqes) = unsafe {
            (
                base.add(offsets.head as usize)
                    .cast::<AtomicU32>()
                    .cast_const(),
                base.add(offsets.tail as usize)
                    .cast::<AtomicU32>()
                    .cast_const(),
                base.add(offsets.rqes as usize).cast::<ZcrxRqe>(),
            )
        };
        // SAFETY: as above: a live, aligned u32 of the region.
        let local_tail = Cell::new(unsafe { &*tail }.load(Ordering::Relaxed));
        Ok(RefillQueue {
            _mem: mem,
            head,
            tail,
            rqes,
            mask: entries - 1,
            local_tail,
        })
    }

    /// Puts one buffer (its refill offset: area token | offset in the area) in the queue and
    /// publishes it; false (nothing written) if the queue is full. The queue has an entry for
    /// every buffer of the area, so it fills only where the kernel handed out one buffer in
    /// several completions (a NIC area) and has not taken the refills yet.
    pub(crate) fn push(&self, off: u64, len: u32) -> bool {
        if self.queued() > self.mask {
            return false;
        }
        let t = self.local_tail.get();
        // SAFETY: `t & mask` indexes one of the queue's `mask + 1` entries inside the region
        // (`new`); the kernel reads an entry only after the tail that covers it is published.
        unsafe {
            self.rqes
                .add((t & self.mask) as usize)
                .write(ZcrxRqe { off, len, pad: 0 })
        };
        let t = t.wrapping_add(1);
        self.local_tail.set(t);
        // SAFETY: a live, aligned u32 of the region (`new`). Release: the entry is visible
        // before the tail that covers it.
        unsafe { &*self.tail }.store(t, Ordering::Release);
        true
    }

    /// Entries published and not yet taken by the kernel.
    pub(crate) fn queued(&self) -> u32 {
        // SAFETY: a live, aligned u32 of the region (`new`).
        let head = unsafe { &*self.head }.load(Ordering::Acquire);
        self.local_tail.get().wrapping_sub(head)
    }

    #[cfg(test)]
    fn entry(&self, i: u32) -> ZcrxRqe {
        // SAFETY: `i & mask` indexes an entry inside the region (`new`).
        unsafe { self.rqes.add((i & self.mask) as usize).read() }
    }

    #[cfg(test)]
    fn set_head(&self, h: u32) {
        // SAFETY: a live, aligned u32 of the region (`new`).
        unsafe { &*self.head }.store(h, Ordering::Release);
    }
}

/// A registered area, shared by the driver, its receives and every buffer taken from it.
pub(crate) struct ZcrxShared {
    /// The driver that registered it (`ring_id`).
    pub(crate) owner: u64,
    /// Identifies the area in the queue of buffers coming home from other threads.
    pub(crate) serial: u64,
    /// The kernel's id of the instance (for `RECV_ZC` and flushes).
    pub(crate) id: u32,
    /// The area's memory (registered with the kernel, which writes received bytes into it).
    pub(crate) area: Arc<Mmap>,
    /// What the kernel or'ed into refill offsets for this area.
    pub(crate) token: u64,
    pub(crate) rq: RefillQueue,
    pub(crate) device_less: bool,
    pub(crate) backing: PageBacking,
    pub(crate) total: u32,
    /// The driver is gone, and with its ring the kernel's instance: buffers dropped now just
    /// leave (nothing reads the refill queue any more).
    pub(crate) orphaned: Cell<bool>,
    pub(crate) in_user: Cell<u32>,
    /// Buffers put in the refill queue since the last flush (device-less areas).
    pub(crate) unflushed: Cell<u32>,
    pub(crate) bytes_received: Cell<u64>,
    pub(crate) refills: Cell<u64>,
    pub(crate) flushes: Cell<u64>,
    pub(crate) full: Cell<u64>,
    pub(crate) rearms: Cell<u64>,
    /// Refill offsets that found the refill queue full, for the next flush.
    pub(crate) overflow: RefCell<Vec<u64>>,
    /// Buffers given back through `Bytes` on other threads.
    pub(crate) cross: Arc<CrossReturns>,
}

impl ZcrxShared {
    /// A completion named `len` bytes at `off` (the kernel's offset: area id in the top bits):
    /// the buffer, now the user's. `None` if the kernel named something outside the area.
    pub(crate) fn take(self: &Rc<Self>, off: u64, len: u32) -> Option<ZcrxBuf> {
        let offset = off & ((1u64 << sys::IORING_ZCRX_AREA_SHIFT) - 1);
        let in_area = (off >> sys::IORING_ZCRX_AREA_SHIFT) == 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.area.len() as u64)
            && len as usize <= ZCRX_BUF_SIZE
            && (offset as usize % ZCRX_BUF_SIZE) + len as usize <= ZCRX_BUF_SIZE;
        if !in_area {
            return None;
        }
        self.in_user.set(self.in_user.get() + 1);
        self.bytes_received
            .set(self.bytes_received.get() + len as u64);
        // SAFETY: `offset + len` lies inside the area (checked above), a live mapping.
        let ptr = unsafe { self.area.as_ptr().add(offset as usize) };
        Some(ZcrxBuf {
            area: self.clone(),
            ptr: NonNull::new(ptr).expect("area memory is never null"),
            offset: offset as u32,
            len,
        })
    }

    /// Buffer at `offset` is back from the user: into the refill queue (unless the kernel's
    /// instance is gone).
    pub(crate) fn give_back(&self, offset: u32) {
        self.in_user.set(self.in_user.get() - 1);
        if self.orphaned.get() {
            return;
        }
        let page = offset as u64 & !(ZCRX_BUF_SIZE as u64 - 1);
        if !self.rq.push(self.token | page, ZCRX_BUF_SIZE as u32) {
            // Full for now: the driver's next flush puts it in once the kernel took some.
            self.overflow.borrow_mut().push(self.token | page);
            return;
        }
        self.refills.set(self.refills.get() + 1);
        if self.device_less {
            // A NIC's queue takes its refills on its own; a device-less one when flushed.
            self.unflushed.set(self.unflushed.get() + 1);
        }
    }

    /// Refills that found the queue full, into the queue as far as it has room now.
    pub(crate) fn retry_overflow(&self) {
        let mut overflow = self.overflow.borrow_mut();
        while let Some(&off) = overflow.last() {
            if !self.rq.push(off, ZCRX_BUF_SIZE as u32) {
                return;
            }
            overflow.pop();
            self.refills.set(self.refills.get() + 1);
            if self.device_less {
                self.unflushed.set(self.unflushed.get() + 1);
            }
        }
    }

    pub(crate) fn stats(&self) -> ZcrxStats {
        ZcrxStats {
            total: self.total,
            in_user: self.in_user.get(),
            in_kernel: self.total - self.in_user.get(),
            bytes_received: self.bytes_received.get(),
            refills: self.refills.get(),
            flushes: self.flushes.get(),
            full: self.full.get(),
            rearms: self.rearms.get(),
            device_less: self.device_less,
            backing: self.backing,
        }
    }
}

/// A zero-copy receive area registered with a driver ([`Driver::zcrx_area`]): received bytes
/// land in its memory, and [`Driver::recv_zc`] hands them out as [`ZcrxBuf`]s. The handle is
/// for statistics and for starting receives; the area lives as long as its driver (the kernel
/// has no way to unregister one), and its memory as long as any buffer of it.
///
/// [`Driver::zcrx_area`]: crate::Driver::zcrx_area
/// [`Driver::recv_zc`]: crate::Driver::recv_zc
///
/// # Examples
/// ```no_run
/// use ringpool::{Driver, DriverConfig, ZcrxConfig};
/// let mut driver = Driver::new(DriverConfig::default().zero_copy_receive(true))?;
/// let area = driver.zcrx_area(ZcrxConfig::device_less(16 << 20))?;
/// assert_eq!(area.stats().in_user, 0);
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Clone)]
pub struct ZcrxArea {
    pub(crate) shared: Rc<ZcrxShared>,
}

impl std::fmt::Debug for ZcrxArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZcrxArea")
            .field("id", &self.shared.id)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ZcrxArea {
    /// The area's counters.
    pub fn stats(&self) -> ZcrxStats {
        self.shared.stats()
    }

    /// The kernel's id of the area's instance.
    pub fn id(&self) -> u32 {
        self.shared.id
    }
}

/// One buffer of received bytes in a zero-copy receive area: derefs to exactly the bytes the
/// kernel put there, never changes while held, and goes back to the kernel (through the refill
/// queue) when dropped. If the driver is gone by then, it just frees its hold; the area's
/// memory is unmapped after the last buffer.
///
/// # Examples
/// ```no_run
/// # fn use_it(buf: ringpool::ZcrxBuf) {
/// let first = buf.first().copied();
/// println!("{} bytes, the first {first:?}", buf.len());
/// drop(buf); // back to the kernel
/// # }
/// ```
#[must_use = "dropping a ZcrxBuf hands it back to the kernel at once"]
pub struct ZcrxBuf {
    area: Rc<ZcrxShared>,
    ptr: NonNull<u8>,
    offset: u32,
    len: u32,
}

impl std::fmt::Debug for ZcrxBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZcrxBuf")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl ZcrxBuf {
    /// Where the bytes are in the area.
    pub fn offset(&self) -> u32 {
        self.offset
    }

    /// The same bytes as [`bytes::Bytes`], without a copy: the `Bytes` (and its clones and
    /// slices, on any thread) keep the buffer out of the kernel's reach and the area mapped;
    /// the buffer goes back when the last of them is dropped (from another thread, through the
    /// driver's queue: its next wait or submit hands it back, and a waiting driver is woken).
    ///
    /// # Examples
    /// ```no_run
    /// # fn use_it(buf: ringpool::ZcrxBuf) {
    /// let bytes = buf.into_bytes();
    /// std::thread::spawn(move || println!("{} bytes", bytes.len())).join().unwrap();
    /// # }
    /// ```
    pub fn into_bytes(self) -> bytes::Bytes {
        let this = std::mem::ManuallyDrop::new(self);
        let area = &this.area;
        area.cross.lend();
        let owner = ZcrxHomeBound {
            _area: area.area.clone(),
            ptr: this.ptr,
            len: this.len,
            index: (this.offset as usize / ZCRX_BUF_SIZE) as u16,
            serial: area.serial,
            home: area.cross.clone(),
        };
        // SAFETY: `this` is never used again nor dropped (`ManuallyDrop`), so its area handle
        // is read out exactly once and released here; the buffer now belongs to `owner`, and
        // stays counted as the user's until it comes home.
        drop(unsafe { std::ptr::read(&this.area) });
        bytes::Bytes::from_owner(owner)
    }
}

impl Deref for ZcrxBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies inside the area (`ZcrxShared::take`), which `self.area`
        // keeps mapped; the kernel wrote it before the completion that named it and does not
        // write it again until `drop` puts it in the refill queue.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl Drop for ZcrxBuf {
    fn drop(&mut self) {
        self.area.give_back(self.offset);
    }
}

/// The owner behind a [`ZcrxBuf::into_bytes`]: the bytes, the area's memory (kept mapped), and
/// the queue the buffer goes home through, from any thread.
struct ZcrxHomeBound {
    _area: Arc<Mmap>,
    ptr: NonNull<u8>,
    len: u32,
    index: u16,
    serial: u64,
    home: Arc<CrossReturns>,
}

// SAFETY: the bytes `ptr..ptr+len` lie in `_area`, which this value keeps mapped; the kernel
// wrote them before the completion that handed them out and cannot get the buffer back before
// `drop` sends its index home. Only `&[u8]` is given out, and the home queue is thread-safe.
unsafe impl Send for ZcrxHomeBound {}

impl AsRef<[u8]> for ZcrxHomeBound {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see the `Send` impl: mapped, written once by the kernel, read-only since.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl Drop for ZcrxHomeBound {
    fn drop(&mut self) {
        self.home.push(self.serial, self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(entries: u32) -> RefillQueue {
        let mem = Mmap::anonymous(RefillQueue::region_len(entries)).unwrap();
        let offsets = sys::ZcrxOffsets {
            head: 0,
            tail: 64,
            rqes: 128,
            ..Default::default()
        };
        RefillQueue::new(mem, offsets, entries).unwrap()
    }

    #[test]
    fn refill_entries_are_published_in_order_and_wrap() {
        let q = queue(4);
        for i in 0..4u64 {
            assert!(q.push(i << 12, 4096));
        }
        assert_eq!(q.queued(), 4);
        assert!(!q.push(7 << 12, 4096), "full: nothing written");
        assert_eq!(q.queued(), 4);
        assert_eq!(q.entry(0).off, 0);
        assert_eq!(q.entry(3).off, 3 << 12);
        q.set_head(3); // the kernel took three
        assert!(q.push(9 << 12, 100));
        assert_eq!(q.queued(), 2);
        assert_eq!(
            q.entry(4).off,
            9 << 12,
            "the fifth entry reuses the first slot"
        );
        assert_eq!(q.entry(4).len, 100);
        assert_eq!(q.entry(4).pad, 0);
    }

    #[test]
    fn a_layout_outside_the_region_is_refused() {
        let mem = Mmap::anonymous(4096).unwrap();
        let offsets = sys::ZcrxOffsets {
            head: 0,
            tail: 64,
            rqes: 128,
            ..Default::default()
        };
        assert!(
            RefillQueue::new(mem, offsets, 1024).is_err(),
            "1024 entries need 16 KiB"
        );
        let mem = Mmap::anonymous(4096).unwrap();
        let odd = sys::ZcrxOffsets { head: 2, ..offsets };
        assert!(RefillQueue::new(mem, odd, 8).is_err(), "a misaligned head");
        let mem = Mmap::anonymous(4096).unwrap();
        assert!(
            RefillQueue::new(mem, offsets, 6).is_err(),
            "not a power of two"
        );
    }

    /// An area of `total` buffers whose queue has `entries` entries, as the driver builds one
    /// (the kernel is not asked: nothing reads the queue here).
    fn area(total: u32, entries: u32) -> Rc<ZcrxShared> {
        Rc::new(ZcrxShared {
            owner: 1,
            serial: 1,
            id: 0,
            area: Arc::new(Mmap::anonymous(total as usize * ZCRX_BUF_SIZE).unwrap()),
            token: 5 << 32,
            rq: queue(entries),
            device_less: true,
            backing: PageBacking::Normal,
            total,
            orphaned: Cell::new(false),
            in_user: Cell::new(0),
            unflushed: Cell::new(0),
            bytes_received: Cell::new(0),
            refills: Cell::new(0),
            flushes: Cell::new(0),
            full: Cell::new(0),
            rearms: Cell::new(0),
            overflow: RefCell::new(Vec::new()),
            cross: Arc::new(CrossReturns::new().unwrap()),
        })
    }

    #[test]
    fn a_completion_naming_bytes_outside_the_area_hands_out_nothing() {
        let a = area(4, 4);
        assert!(a.take(4 * 4096, 1).is_none(), "past the end");
        assert!(
            a.take(3 * 4096 + 100, 4000).is_none(),
            "across the last page's end"
        );
        assert!(
            a.take(4096 + 4000, 200).is_none(),
            "across a buffer boundary"
        );
        assert!(a.take(1 << 48, 10).is_none(), "another area's id");
        assert!(a.take(0, 4097).is_none(), "more than a buffer");
        assert_eq!(a.in_user.get(), 0);
        let b = a.take(2 * 4096 + 16, 100).expect("inside");
        assert_eq!((b.offset(), b.len()), (2 * 4096 + 16, 100));
        assert_eq!(a.in_user.get(), 1);
    }

    #[test]
    fn a_dropped_buffer_goes_into_the_refill_queue_once_with_the_areas_token() {
        let a = area(4, 4);
        let b = a.take(3 * 4096 + 8, 10).unwrap();
        drop(b);
        assert_eq!(a.in_user.get(), 0);
        assert_eq!(a.rq.queued(), 1);
        let e = a.rq.entry(0);
        assert_eq!(
            e.off,
            (5 << 32) | (3 * 4096),
            "the token and the buffer's page"
        );
        assert_eq!((a.refills.get(), a.unflushed.get()), (1, 1));
    }

    #[test]
    fn refills_that_find_the_queue_full_wait_for_room() {
        let a = area(8, 2);
        let bufs: Vec<_> = (0..3).map(|i| a.take(i * 4096, 1).unwrap()).collect();
        drop(bufs);
        assert_eq!(a.rq.queued(), 2);
        assert_eq!(a.overflow.borrow().len(), 1);
        a.retry_overflow();
        assert_eq!(a.overflow.borrow().len(), 1, "still no room");
        a.rq.set_head(1);
        a.retry_overflow();
        assert!(a.overflow.borrow().is_empty());
        assert_eq!(a.refills.get(), 3);
    }

    #[test]
    fn buffers_of_an_orphaned_area_just_leave() {
        let a = area(2, 2);
        let b = a.take(0, 1).unwrap();
        a.orphaned.set(true);
        drop(b);
        assert_eq!((a.in_user.get(), a.rq.queued()), (0, 0));
    }

    #[test]
    fn area_sizes_are_checked() {
        assert!(ZcrxConfig::device_less(0).checked_buffers().is_err());
        assert_eq!(ZcrxConfig::device_less(1).checked_buffers().unwrap(), 1);
        assert_eq!(
            ZcrxConfig::device_less(128 << 20)
                .checked_buffers()
                .unwrap(),
            32768
        );
        assert!(ZcrxConfig::device_less((128 << 20) + 1)
            .checked_buffers()
            .is_err());
    }
}
