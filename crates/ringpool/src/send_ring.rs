//! Send bundles from a provided buffer ring (6.10+): buffers queued on a socket's **send ring**
//! leave in order, many per op (`IORING_OP_SEND` with buffer selection and
//! `IORING_RECVSEND_BUNDLE`): the kernel takes the entries from the ring's head, sends them as
//! one, and reports the bytes; the buffers it consumed are the ones from our head covering those
//! bytes, which go home in order.
//!
//! The ring holds no memory of its own: each entry points into a buffer the queue owns (a
//! received [`BufChain`]'s buffers, owned bytes, ...) until the kernel has sent it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU16, Ordering};

use crate::buf::{BufChain, PooledBuf, SendBuf};
use crate::sys::{self, BufRingEntry, Mmap};

/// One contiguous piece of queued memory, owned until the kernel sent it.
pub(crate) struct Piece {
    ptr: *const u8,
    len: usize,
    /// Owns the memory `ptr` points into (heap or mapped memory: it does not move with this).
    _owner: Owner,
}

enum Owner {
    Pooled { _buf: PooledBuf },
    Other { _buf: SendBuf },
}

impl Piece {
    fn bytes(&self) -> (*const u8, usize) {
        (self.ptr, self.len)
    }
}

/// The state of a send ring, shared by its handle and the driver's bundle ops.
pub(crate) struct SendRingShared {
    pub(crate) bgid: u16,
    mem: Mmap,
    mask: u16,
    /// Our tail (published to the kernel) and head (what the kernel consumed).
    tail: Cell<u16>,
    /// Pieces in the ring, from the kernel's head to our tail, in order.
    pub(crate) in_ring: RefCell<VecDeque<Piece>>,
    /// Pieces waiting for free entries.
    pub(crate) backlog: RefCell<VecDeque<Piece>>,
    /// Per queued send: its token and the bytes not yet sent, in order.
    pub(crate) sends: RefCell<VecDeque<(u64, usize, usize)>>,
    /// A bundle op is in the kernel.
    pub(crate) in_flight: Cell<bool>,
    /// Whether the kernel sends bundles; else each queued send goes as a plain send.
    pub(crate) kernel: bool,
    /// The ring failed (a send error): nothing more is sent.
    pub(crate) failed: Cell<bool>,
    /// The ring (driver) that made it: its bgid means this send ring only there.
    pub(crate) owner: u64,
    /// The socket the ring sends on, from its first send (not kept open by the ring).
    pub(crate) socket: RefCell<Option<std::rc::Weak<std::os::fd::OwnedFd>>>,
}

impl SendRingShared {
    pub(crate) fn new(
        bgid: u16,
        entries: u16,
        kernel: bool,
        owner: u64,
    ) -> std::io::Result<SendRingShared> {
        let mem = Mmap::anonymous(entries as usize * std::mem::size_of::<BufRingEntry>())?;
        Ok(SendRingShared {
            bgid,
            mem,
            mask: entries - 1,
            tail: Cell::new(0),
            in_ring: RefCell::new(VecDeque::new()),
            backlog: RefCell::new(VecDeque::new()),
            sends: RefCell::new(VecDeque::new()),
            in_flight: Cell::new(false),
            kernel,
            failed: Cell::new(false),
            owner,
            socket: RefCell::new(None),
        })
    }

    pub(crate) fn ring_addr(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    pub(crate) fn entries(&self) -> u16 {
        self.mask.wrapping_add(1)
    }

    /// Queues `buf` (one send of the caller, completing under `token`).
    pub(crate) fn queue(&self, buf: SendBuf, token: u64) {
        let len = buf.len();
        let mut backlog = self.backlog.borrow_mut();
        match buf {
            SendBuf::Chain(chain) => backlog.extend(chain_pieces(chain)),
            other if len > 0 => {
                // Owned bytes, a fixed range or a lease: one contiguous range.
                let mut iov = Vec::with_capacity(1);
                other.iovecs(0, &mut iov);
                backlog.push_back(Piece {
                    ptr: iov[0].iov_base as *const u8,
                    len,
                    _owner: Owner::Other { _buf: other },
                });
            }
            _ => {}
        }
        self.sends.borrow_mut().push_back((token, len, len));
    }

    /// Moves backlog pieces into free ring entries and publishes them. Returns whether the ring
    /// holds anything to send.
    pub(crate) fn fill(&self) -> bool {
        let mut ring = self.in_ring.borrow_mut();
        let mut backlog = self.backlog.borrow_mut();
        while ring.len() < self.entries() as usize {
            let Some(piece) = backlog.pop_front() else {
                break;
            };
            let (ptr, len) = piece.bytes();
            let pos = self.tail.get();
            let idx = (pos & self.mask) as usize;
            let entry = self.mem.as_ptr().cast::<BufRingEntry>().wrapping_add(idx);
            // SAFETY: `idx <= mask`, so `entry` is inside the ring mapping; the entry is past
            // the published tail, so the kernel does not read it yet; we never write `resv`
            // (entry 0's is the shared tail). The memory it points at is owned by `piece`,
            // which stays in `in_ring` until the kernel has sent it.
            unsafe {
                (&raw mut (*entry).addr).write_volatile(ptr as u64);
                (&raw mut (*entry).len).write_volatile(len as u32);
                (&raw mut (*entry).bid).write_volatile(idx as u16);
            }
            self.tail.set(pos.wrapping_add(1));
            ring.push_back(piece);
        }
        // SAFETY: the tail is the u16 at byte 14 of the page-aligned ring mapping; this release
        // store pairs with the kernel's acquire load, so it sees the entries written above.
        let tail = unsafe {
            &*self
                .mem
                .as_ptr()
                .add(sys::BUF_RING_TAIL_OFFSET)
                .cast::<AtomicU16>()
        };
        tail.store(self.tail.get(), Ordering::Release);
        !ring.is_empty()
    }

    /// The kernel sent `n` bytes from the head: drop the pieces they cover (their buffers go
    /// home) and return how many pieces that was and the sends that are now complete, in
    /// order. `Err` if `n` ends inside a piece (the kernel consumed it whole: its rest would be
    /// lost).
    pub(crate) fn consumed(&self, mut n: usize) -> Result<(usize, Vec<(u64, usize)>), ()> {
        let mut pieces = 0;
        let total = n;
        let mut ring = self.in_ring.borrow_mut();
        while n > 0 {
            let Some(piece) = ring.front() else {
                return Err(());
            };
            let len = piece.bytes().1;
            if len > n {
                return Err(());
            }
            n -= len;
            ring.pop_front();
            pieces += 1;
        }
        let mut done = Vec::new();
        let mut sends = self.sends.borrow_mut();
        let mut left = total;
        while let Some((token, len, rest)) = sends.front_mut() {
            let take = (*rest).min(left);
            *rest -= take;
            left -= take;
            if *rest == 0 {
                done.push((*token, *len));
                sends.pop_front();
            } else {
                break;
            }
        }
        Ok((pieces, done))
    }

    /// The ring failed: every queued send ends with the error; the queued memory is dropped by
    /// the caller only after the ring is unregistered.
    pub(crate) fn fail(&self) -> Vec<u64> {
        self.failed.set(true);
        self.sends
            .borrow_mut()
            .drain(..)
            .map(|(t, _, _)| t)
            .collect()
    }
}

fn chain_pieces(chain: BufChain) -> impl Iterator<Item = Piece> {
    chain.into_iter().filter(|b| !b.is_empty()).map(|b| Piece {
        ptr: b.as_ptr(),
        len: b.len(),
        _owner: Owner::Pooled { _buf: b },
    })
}

/// A socket's send ring: sends queued with [`Driver::send_bundle`](crate::Driver::send_bundle)
/// leave in order, as many per op as the ring holds (6.10+ send bundles). Each queued send
/// completes with its own [`Event::Sent`](crate::Event::Sent), in order.
///
/// # Examples
/// ```no_run
/// # fn f(driver: &mut ringpool::Driver, sock: &ringpool::Fd) -> ringpool::Result<()> {
/// let ring = driver.send_ring(64)?;
/// driver.send_bundle(sock, &ring, b"hello ".to_vec(), 1)?;
/// driver.send_bundle(sock, &ring, b"world".to_vec(), 2)?; // may leave in the same op
/// # Ok(()) }
/// ```
pub struct SendRing {
    pub(crate) shared: std::rc::Rc<SendRingShared>,
}

impl std::fmt::Debug for SendRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendRing")
            .field("bgid", &self.shared.bgid)
            .field("entries", &self.shared.entries())
            .finish()
    }
}
