//! Leased buffers: one buffer, filled once by a **leader** op, lent read-only to a group of
//! **member** ops that use it in parallel (sends to many sockets, zero-copy or not, and writes to
//! many files). The buffer goes back to its owner when the last member is done *and* the last
//! zero-copy notification is in: a [`Lease`] is a reference-counted, read-only view, every
//! member op holds a clone until its final completion, and dropping the last clone returns the
//! buffer ([`Event::LeaseReturned`](crate::Event::LeaseReturned)).
//!
//! Upstream io_uring once proposed this as SQE groups (never merged); ringpool does it in user
//! space. See [`Driver::lease_group`](crate::Driver::lease_group) for the rules.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use crate::fixed::FixedBuf;

/// Buffers whose lease ended, with the token of their group: the driver turns them into
/// completions.
pub(crate) type ReturnQueue = Rc<RefCell<VecDeque<(u64, FixedBuf)>>>;

struct LeaseInner {
    buf: Option<FixedBuf>,
    len: usize,
    token: u64,
    returns: ReturnQueue,
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.returns.borrow_mut().push_back((self.token, buf));
        }
    }
}

/// A read-only lease on the bytes a leader op filled. Clones share the buffer; ops that send or
/// write it hold a clone until the kernel is done with the memory. No clone can write to it, so
/// any number of leases may read it at once, and nothing can take it back while one exists.
///
/// # Examples
/// ```no_run
/// # fn f(lease: ringpool::Lease) {
/// assert_eq!(&lease[..5], b"hello"); // derefs to exactly the bytes the leader read
/// println!("{} holders", lease.holders());
/// # }
/// ```
#[derive(Clone)]
pub struct Lease(Rc<LeaseInner>);

impl Lease {
    pub(crate) fn new(buf: FixedBuf, len: usize, token: u64, returns: ReturnQueue) -> Lease {
        debug_assert!(len <= buf.len());
        Lease(Rc::new(LeaseInner {
            buf: Some(buf),
            len,
            token,
            returns,
        }))
    }

    /// How many clones (the user's and the member ops') hold the buffer now.
    pub fn holders(&self) -> usize {
        Rc::strong_count(&self.0)
    }

    /// Start of the leased buffer, for the kernel to write into (read-in leases, whose `Lease`
    /// is never handed out, so no reference to the bytes exists meanwhile).
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.buf().as_ptr()
    }

    /// The fixed table slot of the leased memory, if registered.
    pub fn fixed_slot(&self) -> Option<u16> {
        self.buf().slot()
    }

    /// The slot for ops of a ring whose table is `table` ([`crate::fixed::slot_in`]).
    pub(crate) fn fixed_slot_in(&self, table: Option<usize>) -> Option<u16> {
        self.buf().slot_in(table)
    }

    fn buf(&self) -> &FixedBuf {
        self.0.buf.as_ref().expect("a live lease holds its buffer")
    }
}

impl std::ops::Deref for Lease {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf()[..self.0.len]
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("len", &self.0.len)
            .field("holders", &self.holders())
            .finish()
    }
}

/// What a lease group lends its members, chosen per group
/// ([`Driver::lease`](crate::Driver::lease), [`rt::lease`](crate::rt::lease)):
///
/// - **`Memory`**: the leader reads into a [`FixedBuf`] (registered memory: `READ_FIXED`), and
///   members send or write those bytes; the bytes can be looked at ([`Lease`]), zero-copy sends
///   name registered memory. Where the kernel copies zero-copy sends anyway (loopback, veth,
///   most virtual NICs) every member's send copies the chunk once more.
/// - **`Pages`**: the leader `SPLICE`s `len` bytes from a file (page-cache pages) or a socket into
///   a pipe, and each member gets the same **page references** by `TEE` into its own pipe and
///   `SPLICE`s them to its socket or file: no copy in user space and no user memory at all, so
///   nothing can read or change the bytes (read-only by construction); a file's pages are sent
///   by reference, so a write to that range of the file before they leave may show through, as
///   with `sendfile(2)`. `len` is bounded by `/proc/sys/fs/pipe-max-size`
///   ([`Error::LeaseTooLong`](crate::Error::LeaseTooLong)). Needs `IORING_OP_SPLICE` (5.7) and
///   `IORING_OP_TEE` (5.8).
///
/// # Examples
/// ```
/// use ringpool::{Driver, LeaseBacking};
/// let mut driver = Driver::new(Default::default())?;
/// let memory = LeaseBacking::Memory(driver.fixed_buf_or_plain(64 << 10)?);
/// let pages = LeaseBacking::Pages { len: 64 << 10 };
/// assert_eq!(memory.len(), pages.len());
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Debug)]
pub enum LeaseBacking {
    /// The leader reads into this buffer; members use its bytes.
    Memory(FixedBuf),
    /// The leader splices up to `len` bytes into a pipe; members get its page references.
    Pages {
        /// Bytes to splice from the leader's descriptor.
        len: usize,
    },
}

impl LeaseBacking {
    /// The most bytes the leader may read: the buffer's length, or the pages lease's `len`.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(ringpool::LeaseBacking::Pages { len: 4096 }.len(), 4096);
    /// ```
    pub fn len(&self) -> usize {
        match self {
            LeaseBacking::Memory(buf) => buf.len(),
            LeaseBacking::Pages { len } => *len,
        }
    }

    /// Whether the leader may read nothing at all (a zero length).
    ///
    /// # Examples
    /// ```
    /// assert!(ringpool::LeaseBacking::Pages { len: 0 }.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is a pages lease.
    ///
    /// # Examples
    /// ```
    /// assert!(ringpool::LeaseBacking::Pages { len: 1 }.is_pages());
    /// ```
    pub fn is_pages(&self) -> bool {
        matches!(self, LeaseBacking::Pages { .. })
    }
}

/// One member of a lease group: what it does with the leased bytes, and the token its own
/// completion carries.
///
/// There is deliberately no member that selects a buffer from a group or writes into the lease:
/// a member only reads the leased bytes, so the rules cannot be broken by construction.
///
/// # Examples
/// ```no_run
/// # fn f(sock: ringpool::Fd, file: ringpool::Fd) {
/// use ringpool::Member;
/// let members = vec![Member::send_zc(&sock, 10), Member::write(&file, 0, 11)];
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Member {
    pub(crate) kind: MemberKind,
    pub(crate) token: u64,
}

#[derive(Debug, Clone)]
pub(crate) enum MemberKind {
    /// A send of the leased bytes (`zc`: through the zero-copy policy).
    Send { fd: crate::Fd, zc: bool },
    /// A write of the leased bytes to `fd` at `offset`.
    Write { fd: crate::Fd, offset: u64 },
    /// A read from `fd` at `offset` into `range` of the buffer (a read-in lease).
    ReadInto {
        fd: crate::Fd,
        offset: u64,
        range: std::ops::Range<usize>,
    },
}

impl Member {
    pub(crate) fn fd(&self) -> &crate::Fd {
        match &self.kind {
            MemberKind::Send { fd, .. }
            | MemberKind::Write { fd, .. }
            | MemberKind::ReadInto { fd, .. } => fd,
        }
    }

    /// The completion of a member that never started (its leader failed or was cancelled).
    pub(crate) fn cancelled_event(&self) -> crate::Event {
        match self.kind {
            MemberKind::Send { .. } => crate::Event::Sent {
                result: Err(crate::Error::Cancelled),
                buf: None,
            },
            MemberKind::Write { .. } => crate::Event::Written {
                result: Err(crate::Error::Cancelled),
            },
            MemberKind::ReadInto { .. } => crate::Event::ReadInto {
                result: Err(crate::Error::Cancelled),
            },
        }
    }

    /// Reads from `fd` at `offset` (`u64::MAX`: the file position) **into** `range` of the
    /// leased buffer: a member of a **read-in lease**, in which every member writes into its own
    /// part of the buffer, in parallel, after the leader. Completes with
    /// [`Event::ReadInto`](crate::Event::ReadInto); a short read zeroes the rest of its range.
    /// A read-in group has only such members, with ranges inside the buffer that do not overlap
    /// (else [`Error::InvalidArgument`](crate::Error::InvalidArgument)), and nobody can read the
    /// buffer until it comes back in [`Event::LeaseReturned`](crate::Event::LeaseReturned).
    pub fn read_into(
        fd: &crate::Fd,
        offset: u64,
        range: std::ops::Range<usize>,
        token: u64,
    ) -> Member {
        Member {
            kind: MemberKind::ReadInto {
                fd: fd.clone(),
                offset,
                range,
            },
            token,
        }
    }

    pub(crate) fn is_read_into(&self) -> bool {
        matches!(self.kind, MemberKind::ReadInto { .. })
    }

    /// Sends the leased bytes on `fd` plainly; completes with [`Event::Sent`](crate::Event::Sent).
    pub fn send(fd: &crate::Fd, token: u64) -> Member {
        Member {
            kind: MemberKind::Send {
                fd: fd.clone(),
                zc: false,
            },
            token,
        }
    }

    /// Sends the leased bytes on `fd` with zero-copy where the policy says it pays (registered
    /// memory is named, so no page pinning); completes with [`Event::Sent`](crate::Event::Sent)
    /// (with `more` set) and, once the kernel let go of the memory, with
    /// [`Event::Returned`](crate::Event::Returned) carrying its clone of the lease.
    pub fn send_zc(fd: &crate::Fd, token: u64) -> Member {
        Member {
            kind: MemberKind::Send {
                fd: fd.clone(),
                zc: true,
            },
            token,
        }
    }

    /// Writes the leased bytes to `fd` at `offset` (`WRITE_FIXED` on registered memory);
    /// completes with [`Event::Written`](crate::Event::Written).
    pub fn write(fd: &crate::Fd, offset: u64, token: u64) -> Member {
        Member {
            kind: MemberKind::Write {
                fd: fd.clone(),
                offset,
            },
            token,
        }
    }
}
