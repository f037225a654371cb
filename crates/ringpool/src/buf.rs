//! Buffer types: what the kernel filled ([`PooledBuf`], [`BufChain`]) and what the user hands the
//! kernel to send ([`SendBuf`]).
//!
//! A `PooledBuf` is an owned lease on one buffer of a group: it derefs to exactly the bytes the
//! kernel wrote, and goes back to its group when dropped. If the group is gone by then, its memory
//! is freed when the last buffer taken from it is dropped: a buffer never dangles.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::fixed::FixedBuf;
use crate::lease::Lease;
use crate::pool::GroupShared;

/// One buffer the kernel picked from a group and filled; returns to the group on drop.
///
/// # Examples
/// ```no_run
/// # fn use_it(buf: ringpool::PooledBuf) {
/// println!("{} bytes in buffer {} of group {}", buf.len(), buf.bid(), buf.group_id());
/// let copy: Vec<u8> = buf.to_vec();
/// drop(buf); // back to the group
/// # }
/// ```
#[must_use = "dropping a PooledBuf returns it to its group at once"]
pub struct PooledBuf {
    group: Rc<GroupShared>,
    ptr: NonNull<u8>,
    len: u32,
    bid: u16,
}

// Two words of pointer, a length and a bid: a PooledBuf stays small enough to move freely.
const _: () = assert!(std::mem::size_of::<PooledBuf>() == 24);

impl PooledBuf {
    /// Takes ownership of `len` bytes at `offset` in buffer `bid`.
    ///
    /// # Safety
    /// The kernel must have finished writing those bytes (their completion was reaped), and they
    /// must not be handed out again until this value is dropped.
    pub(crate) unsafe fn new(group: Rc<GroupShared>, bid: u16, offset: u32, len: u32) -> PooledBuf {
        let base = group.buf_ptr(bid);
        // SAFETY: `offset + len <= buf_size` (the kernel never writes past a buffer), so the
        // pointer stays inside buffer `bid`, which is inside a live mapping.
        let ptr = unsafe { base.add(offset as usize) };
        PooledBuf {
            group,
            ptr: NonNull::new(ptr).expect("buffer address is never null"),
            len,
            bid,
        }
    }

    /// No bytes and no buffer: an empty datagram that a single-shot receive (kernels without
    /// multishot `RECVMSG`) delivered without consuming a buffer. Its [`bid`](PooledBuf::bid)
    /// is [`PooledBuf::NO_BUFFER`] and dropping it returns nothing.
    pub(crate) fn empty(group: Rc<GroupShared>) -> PooledBuf {
        let ptr = NonNull::new(group.buf_ptr(0)).expect("buffer address is never null");
        PooledBuf {
            group,
            ptr,
            len: 0,
            bid: PooledBuf::NO_BUFFER,
        }
    }

    /// The [`bid`](PooledBuf::bid) of an empty payload that came without a buffer (an empty
    /// datagram on a kernel without multishot `RECVMSG`). Real buffer ids are below 32768.
    pub const NO_BUFFER: u16 = u16::MAX;

    /// The buffer id the kernel reported ([`PooledBuf::NO_BUFFER`] for an empty datagram that
    /// came without a buffer).
    pub fn bid(&self) -> u16 {
        self.bid
    }

    /// The id of the group the buffer belongs to.
    pub fn group_id(&self) -> u16 {
        self.group.bgid
    }

    /// The same bytes as [`bytes::Bytes`], without a copy: the `Bytes` (and every clone or slice
    /// of it) keeps the buffer out of the kernel's reach and its memory mapped, on any thread;
    /// the buffer goes back to its group when the last of them is dropped (from another thread,
    /// through the driver's queue: the driver's next wait or submit puts it back, and a driver
    /// waiting for buffers is woken).
    ///
    /// # Examples
    /// ```
    /// use ringpool::{BufGroupConfig, Driver, Event, Fd, RecvMode};
    /// use std::io::Write;
    /// let mut driver = Driver::new(Default::default())?;
    /// let group = driver.buf_group(BufGroupConfig::new(4096, 4))?;
    /// let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    /// driver.recv(&Fd::from(std::os::fd::OwnedFd::from(a)), &group, RecvMode::Once, 1)?;
    /// b.write_all(b"hello world").unwrap();
    /// driver.wait(None)?;
    /// let Event::Data(chain) = driver.pop().unwrap().event else { panic!() };
    /// let bytes = chain.into_iter().next().unwrap().into_bytes();
    /// let world = bytes.slice(6..); // still the same buffer
    /// std::thread::spawn(move || assert_eq!(&world[..], b"world")).join().unwrap();
    /// drop(bytes);
    /// driver.submit()?; // the buffer is back
    /// assert_eq!(group.stats().in_user, 0);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn into_bytes(self) -> bytes::Bytes {
        if self.bid == PooledBuf::NO_BUFFER {
            return bytes::Bytes::new();
        }
        let this = ManuallyDrop::new(self);
        let group = &this.group;
        group.cross.lend();
        let owner = HomeBound {
            _chunk: group.chunk_of(this.bid),
            ptr: this.ptr,
            len: this.len,
            bid: this.bid,
            serial: group.serial,
            home: group.cross.clone(),
        };
        // SAFETY: `this` is never used again nor dropped (`ManuallyDrop`), so its group handle
        // is read out exactly once and released here; the buffer itself now belongs to `owner`.
        drop(unsafe { std::ptr::read(&this.group) });
        bytes::Bytes::from_owner(owner)
    }
}

/// The owner behind a [`PooledBuf::into_bytes`]: the buffer's bytes, its chunk of memory (kept
/// mapped), and the queue it goes home through when dropped on any thread.
struct HomeBound {
    _chunk: Arc<crate::sys::Mmap>,
    ptr: NonNull<u8>,
    len: u32,
    bid: u16,
    serial: u64,
    home: Arc<crate::pool::CrossReturns>,
}

// SAFETY: the bytes `ptr..ptr+len` lie in `_chunk`, which this value keeps mapped; the kernel
// finished writing them before the completion that handed them out and cannot get the buffer
// again until `drop` sends its bid home. Nothing writes them meanwhile (only `&[u8]` is given
// out), so reading them from any thread is sound; the home queue is thread-safe.
unsafe impl Send for HomeBound {}

impl AsRef<[u8]> for HomeBound {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see the `Send` impl: mapped, written once by the kernel, read-only since.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl Drop for HomeBound {
    fn drop(&mut self) {
        self.home.push(self.serial, self.bid);
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is inside the group's mapping, which `self.group` keeps alive;
        // the kernel wrote it before the completion we reaped and will not touch it again until
        // we give the buffer back in `drop` (see `PooledBuf::new`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference to these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if self.bid != PooledBuf::NO_BUFFER {
            self.group.release(self.bid);
        }
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf")
            .field("group", &self.group.bgid)
            .field("bid", &self.bid)
            .field("len", &self.len)
            .finish()
    }
}

/// The buffers of one completion, in the order the bytes arrived: one buffer for a plain recv,
/// several for a bundle.
///
/// # Examples
/// ```no_run
/// # fn use_it(chain: ringpool::BufChain) {
/// let total: usize = chain.iter().map(|b| b.len()).sum();
/// assert_eq!(total, chain.len());
/// let bytes: Vec<u8> = chain.to_vec();
/// # }
/// ```
#[derive(Debug)]
#[must_use = "dropping a BufChain returns its buffers to their group at once"]
pub struct BufChain {
    // One buffer inline: the common single-buffer completion allocates nothing.
    bufs: SmallVec<[PooledBuf; 1]>,
    len: usize,
}

impl BufChain {
    pub(crate) fn from_bufs(bufs: SmallVec<[PooledBuf; 1]>) -> BufChain {
        let len = bufs.iter().map(|b| b.len()).sum();
        BufChain { bufs, len }
    }

    /// Total bytes across all buffers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chain holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of buffers.
    pub fn buf_count(&self) -> usize {
        self.bufs.len()
    }

    /// The buffers, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, PooledBuf> {
        self.bufs.iter()
    }

    /// Copies the bytes out (the copying path, for code that needs a `Vec`).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for b in &self.bufs {
            v.extend_from_slice(b);
        }
        v
    }

    /// The fixed table slot all of the chain's buffers are registered in (they come from one
    /// registered region), if any: then a zero-copy send names it and skips page pinning.
    pub fn fixed_slot(&self) -> Option<u16> {
        self.common_slot(GroupShared::fixed_slot)
    }

    /// [`BufChain::fixed_slot`] for ops of a ring whose table is `table`
    /// ([`crate::fixed::slot_in`]).
    pub(crate) fn fixed_slot_in(&self, table: Option<usize>) -> Option<u16> {
        self.common_slot(|g| g.fixed_slot_in(table))
    }

    /// The slot `slot_of` gives every buffer's group, if it is one and the same for all.
    fn common_slot(&self, slot_of: impl Fn(&GroupShared) -> Option<u16>) -> Option<u16> {
        let slot = slot_of(&self.bufs.first()?.group)?;
        self.bufs[1..]
            .iter()
            .all(|b| slot_of(&b.group) == Some(slot))
            .then_some(slot)
    }

    /// The bytes as one [`bytes::Bytes`]: without a copy when the chain is one buffer (see
    /// [`PooledBuf::into_bytes`]), copied when it is several (a `Bytes` is contiguous; take the
    /// buffers one by one with `into_iter` and [`PooledBuf::into_bytes`] to avoid the copy).
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(chain: ringpool::BufChain) {
    /// let bytes: bytes::Bytes = chain.into_bytes();
    /// # }
    /// ```
    pub fn into_bytes(self) -> bytes::Bytes {
        match self.bufs.len() {
            0 => bytes::Bytes::new(),
            1 => self.into_iter().next().expect("one buffer").into_bytes(),
            _ => bytes::Bytes::from(self.to_vec()),
        }
    }

    /// Appends another chain's buffers (keeps the order: `self` first).
    pub fn append(&mut self, other: BufChain) {
        self.len += other.len;
        self.bufs.extend(other.bufs);
    }
}

impl IntoIterator for BufChain {
    type Item = PooledBuf;
    type IntoIter = smallvec::IntoIter<[PooledBuf; 1]>;
    fn into_iter(self) -> Self::IntoIter {
        self.bufs.into_iter()
    }
}

impl<'a> IntoIterator for &'a BufChain {
    type Item = &'a PooledBuf;
    type IntoIter = std::slice::Iter<'a, PooledBuf>;
    fn into_iter(self) -> Self::IntoIter {
        self.bufs.iter()
    }
}

/// One datagram received into a buffer the kernel picked ([`Driver::recv_from`]): its payload,
/// who sent it, and whether it was cut short.
///
/// [`Driver::recv_from`]: crate::Driver::recv_from
///
/// # Examples
/// ```no_run
/// # fn use_it(d: ringpool::Datagram) {
/// println!("{} bytes from {:?}{}", d.data.len(), d.from, if d.truncated { " (cut)" } else { "" });
/// drop(d); // the buffer goes back to its group
/// # }
/// ```
#[derive(Debug)]
#[must_use = "dropping a Datagram returns its buffer to its group at once"]
pub struct Datagram {
    /// The payload (derefs to exactly the bytes received; the buffer goes home on drop).
    pub data: PooledBuf,
    /// The sender's address (`None` when the kernel reported none, or one of another family).
    pub from: Option<std::net::SocketAddr>,
    /// The datagram was longer than the buffer's payload room; the rest is lost (as with
    /// `recvmsg` and `MSG_TRUNC`).
    pub truncated: bool,
}

/// Memory handed to the kernel for sending. The driver owns it until the op's last completion
/// and then gives it back in [`Event::Sent`](crate::Event::Sent).
///
/// # Examples
/// ```
/// use ringpool::SendBuf;
/// let buf = SendBuf::from(b"hello".to_vec());
/// assert_eq!(buf.len(), 5);
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum SendBuf {
    /// Plain owned bytes.
    Owned(Vec<u8>),
    /// Buffers received from a group, sent back out without a copy.
    Chain(BufChain),
    /// A byte range of registered memory.
    Fixed {
        /// The memory.
        buf: FixedBuf,
        /// The bytes to send.
        range: std::ops::Range<usize>,
    },
    /// Leased bytes (a member of a lease group, or a lease lent again).
    Leased(Lease),
    /// Buffers received into a zero-copy receive area, sent on from the same memory, in order.
    Zcrx(Vec<crate::zcrx::ZcrxBuf>),
}

impl SendBuf {
    /// Total bytes.
    pub fn len(&self) -> usize {
        match self {
            SendBuf::Owned(v) => v.len(),
            SendBuf::Chain(c) => c.len(),
            SendBuf::Fixed { range, .. } => range.len(),
            SendBuf::Leased(l) => l.len(),
            SendBuf::Zcrx(bufs) => bufs.iter().map(|b| b.len()).sum(),
        }
    }

    /// The fixed table slot the bytes are registered in, if any.
    pub fn fixed_slot(&self) -> Option<u16> {
        match self {
            SendBuf::Owned(_) | SendBuf::Zcrx(_) => None,
            SendBuf::Chain(c) => c.fixed_slot(),
            SendBuf::Fixed { buf, .. } => buf.slot(),
            SendBuf::Leased(l) => l.fixed_slot(),
        }
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many `iovec`s [`SendBuf::iovecs`] makes starting `skip` bytes in.
    pub(crate) fn iov_count(&self, mut skip: usize) -> usize {
        let mut count = |pieces: &mut dyn Iterator<Item = usize>| {
            pieces
                .filter(|&len| {
                    let past = skip >= len;
                    skip = skip.saturating_sub(len);
                    !past
                })
                .count()
        };
        match self {
            SendBuf::Chain(c) => count(&mut c.iter().map(|b| b.len())),
            SendBuf::Zcrx(bufs) => count(&mut bufs.iter().map(|b| b.len())),
            _ => usize::from(skip < self.len()),
        }
    }

    /// The slot for ops of a ring whose table is `table` ([`crate::fixed::slot_in`]).
    pub(crate) fn fixed_slot_in(&self, table: Option<usize>) -> Option<u16> {
        match self {
            SendBuf::Owned(_) | SendBuf::Zcrx(_) => None,
            SendBuf::Chain(c) => c.fixed_slot_in(table),
            SendBuf::Fixed { buf, .. } => buf.slot_in(table),
            SendBuf::Leased(l) => l.fixed_slot_in(table),
        }
    }

    /// The byte ranges, in order, as `iovec`s starting `skip` bytes in.
    pub(crate) fn iovecs(&self, skip: usize, out: &mut Vec<libc::iovec>) {
        out.clear();
        self.append_iovecs(skip, out);
    }

    /// [`SendBuf::iovecs`] added to the end of `out` (the iovecs of several sends that leave
    /// in one `sendmsg`).
    pub(crate) fn append_iovecs(&self, mut skip: usize, out: &mut Vec<libc::iovec>) {
        let mut push = |s: &[u8]| {
            if skip >= s.len() {
                skip -= s.len();
                return;
            }
            let s = &s[skip..];
            skip = 0;
            out.push(libc::iovec {
                iov_base: s.as_ptr() as *mut _,
                iov_len: s.len(),
            });
        };
        match self {
            SendBuf::Owned(v) => push(v),
            SendBuf::Chain(c) => c.iter().for_each(|b| push(b)),
            SendBuf::Fixed { buf, range } => push(&buf[range.clone()]),
            SendBuf::Leased(l) => push(l),
            SendBuf::Zcrx(bufs) => bufs.iter().for_each(|b| push(b)),
        }
    }
}

impl From<Vec<u8>> for SendBuf {
    fn from(v: Vec<u8>) -> Self {
        SendBuf::Owned(v)
    }
}

impl From<crate::zcrx::ZcrxBuf> for SendBuf {
    fn from(b: crate::zcrx::ZcrxBuf) -> Self {
        SendBuf::Zcrx(vec![b])
    }
}

impl From<Lease> for SendBuf {
    fn from(l: Lease) -> Self {
        SendBuf::Leased(l)
    }
}

impl From<BufChain> for SendBuf {
    fn from(c: BufChain) -> Self {
        SendBuf::Chain(c)
    }
}

impl From<PooledBuf> for SendBuf {
    fn from(b: PooledBuf) -> Self {
        SendBuf::Chain(BufChain::from_bufs(smallvec::smallvec![b]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovecs_skip_sent_bytes() {
        let buf = SendBuf::from(vec![1u8; 10]);
        let mut iov = Vec::new();
        buf.iovecs(4, &mut iov);
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_len, 6);
        buf.iovecs(10, &mut iov);
        assert!(iov.is_empty());
        assert_eq!(buf.iov_count(4), 1);
        assert_eq!(buf.iov_count(10), 0);
    }
}
