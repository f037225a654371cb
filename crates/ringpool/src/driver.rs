//! The ring driver: owns one io_uring, an op table, and every byte of memory the kernel may touch.
//!
//! # The ownership rule
//! From the moment an SQE that names memory is pushed until the op's **last** CQE (the one without
//! `IORING_CQE_F_MORE`), that memory is owned by the op's slot in the driver's table, not by the
//! user. Cancelling an op only asks the kernel to stop: the slot, and what it owns, is freed when
//! the final CQE arrives. Dropping the driver cancels everything and waits for those CQEs; memory
//! whose CQE never came is leaked, never freed under the kernel.
//!
//! # Completion loop
//! The driver is a completion loop in the manner of liburing: start ops (each gets a user token),
//! call [`Driver::wait`], then take [`Completion`]s with [`Driver::pop`]. It needs no async
//! runtime; the async layer is built on top of it.
//!
//! ```
//! use ringpool::{BufGroupConfig, Driver, Event, Fd, RecvMode};
//! use std::io::Write;
//! let mut driver = Driver::new(Default::default())?;
//! let group = driver.buf_group(BufGroupConfig::new(4096, 8))?;
//! let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
//! let a = Fd::from(std::os::fd::OwnedFd::from(a));
//! driver.recv(&a, &group, RecvMode::Multishot, 7)?;
//! b.write_all(b"hello").unwrap();
//! let mut got = Vec::new();
//! while got.len() < 5 {
//!     driver.wait(None)?;
//!     while let Some(c) = driver.pop() {
//!         assert_eq!(c.token, 7);
//!         if let Event::Data(chain) = c.event { got.extend(chain.to_vec()); }
//!     }
//! }
//! assert_eq!(got, b"hello");
//! # Ok::<(), ringpool::Error>(())
//! ```

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use smallvec::SmallVec;

use crate::buf::{BufChain, Datagram, PooledBuf, SendBuf};
use crate::coalesce::Coalescing;
use crate::error::{Error, Result};
use crate::fixed::{
    self, FixedBuf, FixedStats, FixedTable, RingRef, MAX_FIXED_LEN, MAX_FIXED_SLOTS,
};
use crate::lease::{Lease, Member, MemberKind, ReturnQueue};
use crate::pool::{BufGroup, BufGroupConfig, CrossReturns, GroupShared, HandleGuard, Registration};
use crate::probe::{Features, Force, GroupRung, Ladder, MultishotRung, ZcRung};
use crate::send_ring::{SendRing, SendRingShared};
use crate::sys;
use crate::zc::{Lane, LaneMap, LanePolicy, ZcConfig, ZcStats};

/// User data of CQEs nobody waits for (cancel requests, timeout removals). Such SQEs name no
/// memory. Its low half equals the fixed table's tag key: `reap` drops these CQEs before
/// `dispatch` looks for tags.
const IGNORED: u64 = u64::MAX;

/// Ops whose memory a dropped driver had to leak because the kernel never posted their final
/// CQE within the drop's deadline (process-wide). Zero in a healthy program.
static LEAKED_OPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many ops' memory dropped drivers leaked on purpose, rather than free it while the kernel
/// might still write to it. Zero in a healthy program; tests assert it.
///
/// # Examples
/// ```
/// drop(ringpool::Driver::new(Default::default()).unwrap());
/// assert_eq!(ringpool::leaked_ops(), 0);
/// ```
pub fn leaked_ops() -> usize {
    LEAKED_OPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// How to build a [`Driver`].
///
/// # Examples
/// ```
/// use ringpool::{Driver, DriverConfig, Force};
/// let driver = Driver::new(DriverConfig::default().entries(512).force(Force::LegacyProvide))?;
/// assert_eq!(driver.ladder().groups, ringpool::GroupRung::Legacy);
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DriverConfig {
    zc: ZcConfig,
    entries: u32,
    cq_entries: Option<u32>,
    force: Vec<Force>,
    ignore_env: bool,
    fixed_slots: u32,
    coalesce: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            zc: ZcConfig::default(),
            entries: 256,
            cq_entries: None,
            force: Vec::new(),
            ignore_env: false,
            fixed_slots: 1024,
            coalesce: Duration::ZERO,
        }
    }
}

impl DriverConfig {
    /// Submission queue size: a power of two from 1 to 32768 (default 256).
    pub fn entries(mut self, entries: u32) -> Self {
        self.entries = entries;
        self
    }

    /// Completion queue size (default: 8 × `entries`, so multishot streams rarely overflow).
    pub fn cq_entries(mut self, cq_entries: u32) -> Self {
        self.cq_entries = Some(cq_entries);
        self
    }

    /// Forces a lower rung of the fallback ladder (adds to `RINGPOOL_FORCE`).
    pub fn force(mut self, rung: Force) -> Self {
        self.force.push(rung);
        self
    }

    /// Zero-copy send settings (default: the adaptive policy).
    pub fn zerocopy(mut self, zc: ZcConfig) -> Self {
        self.zc = zc;
        self
    }

    /// Slots of the fixed buffer table, registered the first time registered memory is asked
    /// for (default 1024, at most [`MAX_FIXED_SLOTS`]). Each [`FixedBuf`] and each registered
    /// group takes one.
    pub fn fixed_slots(mut self, slots: u32) -> Self {
        self.fixed_slots = slots;
        self
    }

    /// Receive coalescing (default: off). A server that is faster than its peers wakes for
    /// every few KiB that arrive, and pays per wake-up and per op rather than per byte. With a
    /// `delay`, a [`wait`](Driver::wait) holds when, since the previous `wait` returned, stream
    /// receives ([`Driver::recv`], all sockets together) took from 4 KiB to less than one buffer
    /// (of the largest group they used), and that return came less than 4 delays after the one
    /// before: it submits what is queued, sleeps `delay` in user space, and only then collects
    /// completions. Receives whose data arrives during the sleep then take everything their
    /// socket holds by then (with `DEFER_TASKRUN` the kernel runs them only when the driver
    /// collects), so every receive, and every send of what it received, carries more bytes.
    /// Bulk transfers (full buffers) and request/response traffic (pauses) never hold. A wait
    /// never holds past its timeout, nor at all when completions are ready, nothing is in the
    /// kernel, or the timeout is zero. The cost is latency: up to `delay` per wake-up while a
    /// stream is busy. `ringpool proxy` uses 100 µs.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// let cfg = ringpool::DriverConfig::default().receive_coalescing(Duration::from_micros(100));
    /// let driver = ringpool::Driver::new(cfg)?;
    /// # drop(driver);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn receive_coalescing(mut self, delay: Duration) -> Self {
        self.coalesce = delay;
        self
    }

    /// Ignores `RINGPOOL_FORCE` (for tests that pin their own rungs).
    pub fn ignore_env(mut self) -> Self {
        self.ignore_env = true;
        self
    }
}

/// A file descriptor shared between the user and the ops using it: the descriptor is closed when
/// the user's last clone and the last op using it are gone, so a parked op can never be re-armed
/// on a descriptor number that was closed and reused.
///
/// # Examples
/// ```
/// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
/// let fd = ringpool::Fd::from(std::os::fd::OwnedFd::from(a));
/// use std::os::fd::AsRawFd;
/// assert!(fd.as_raw_fd() >= 0);
/// ```
#[derive(Debug, Clone)]
pub struct Fd(Rc<OwnedFd>);

impl From<OwnedFd> for Fd {
    fn from(fd: OwnedFd) -> Fd {
        Fd(Rc::new(fd))
    }
}

impl From<std::net::TcpStream> for Fd {
    fn from(s: std::net::TcpStream) -> Fd {
        Fd::from(OwnedFd::from(s))
    }
}

impl From<std::net::TcpListener> for Fd {
    fn from(s: std::net::TcpListener) -> Fd {
        Fd::from(OwnedFd::from(s))
    }
}

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Fd {
    /// A new, unconnected TCP socket of `addr`'s family (close-on-exec), for [`Driver::connect`].
    pub fn tcp_socket(addr: std::net::SocketAddr) -> Result<Fd> {
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = sys::syscall!(socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0))
            .map_err(Error::os("socket"))?;
        // SAFETY: socket returned a fresh descriptor that we now own.
        Ok(Fd::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Whether `self` and `other` are clones of the same descriptor.
    pub fn same(&self, other: &Fd) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }
}

/// Identifies one op of one driver, for [`Driver::cancel`]. Stale ids (of finished ops) and ids
/// of another driver's ops are recognised and ignored: an id never reaches an op it does not
/// name.
///
/// # Examples
/// ```
/// use ringpool::{BufGroupConfig, Driver, Fd, RecvMode};
/// let (mut a, mut b) = (Driver::new(Default::default())?, Driver::new(Default::default())?);
/// let (ga, gb) = (a.buf_group(BufGroupConfig::new(512, 2))?, b.buf_group(BufGroupConfig::new(512, 2))?);
/// let (x, _px) = std::os::unix::net::UnixStream::pair().unwrap();
/// let (y, _py) = std::os::unix::net::UnixStream::pair().unwrap();
/// let (x, y) = (Fd::from(std::os::fd::OwnedFd::from(x)), Fd::from(std::os::fd::OwnedFd::from(y)));
/// let id_a = a.recv(&x, &ga, RecvMode::Multishot, 1)?;
/// let id_b = b.recv(&y, &gb, RecvMode::Multishot, 1)?;
/// assert_ne!(id_a, id_b);
/// b.cancel(id_a); // not b's op: nothing happens
/// assert_eq!(b.in_flight(), 1);
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId {
    /// The `user_data` of the op's SQEs: slab key and generation.
    ud: u64,
    /// The driver's `ring_id` (never 0 for a real op).
    driver: u64,
}

impl OpId {
    /// The id of completions that belong to no op of the user's (lease members that never
    /// started): it names nothing in any driver.
    const NONE: OpId = OpId {
        ud: u64::MAX,
        driver: 0,
    };

    fn new(key: usize, gen: u32, driver: u64) -> OpId {
        OpId {
            ud: user_data(key, gen),
            driver,
        }
    }
    fn key(self) -> usize {
        (self.ud & 0xffff_ffff) as usize
    }
    fn gen(self) -> u32 {
        (self.ud >> 32) as u32
    }
}

/// The `user_data` of an op's SQEs: its slab key in the low half, its generation in the high.
fn user_data(key: usize, gen: u32) -> u64 {
    key as u64 | (gen as u64) << 32
}

/// How a receive selects its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvMode {
    /// One completion, one buffer.
    Once,
    /// One completion, one or more buffers (6.10 bundles; one buffer where missing).
    Bundle,
    /// A stream of completions until end of stream, error or cancel (6.0 multishot; re-armed
    /// single shots where missing). Running out of buffers pauses it; it resumes by itself.
    Multishot,
    /// A multishot stream whose completions may each carry several buffers.
    MultishotBundle,
}

impl RecvMode {
    fn multishot(self) -> bool {
        matches!(self, RecvMode::Multishot | RecvMode::MultishotBundle)
    }
    fn bundle(self) -> bool {
        matches!(self, RecvMode::Bundle | RecvMode::MultishotBundle)
    }
}

/// What happened to an op.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Bytes arrived, in buffers selected from the group, in order.
    Data(BufChain),
    /// A datagram arrived ([`Driver::recv_from`]), in one buffer selected from the group.
    Datagram(Datagram),
    /// The peer closed its side (a receive returned 0) or a read reached the end of the file.
    Eof,
    /// A connection was accepted.
    Accepted(Fd),
    /// A [`Driver::connect`] succeeded.
    Connected,
    /// The leader of a [`Driver::lease_group`] finished: `Ok(n)` with the lease on the `n` bytes
    /// it read (its members have started), or its error (every member then completes with
    /// [`Error::Cancelled`]). Dropping this lease does not end the members' use of the buffer.
    LeaseFilled {
        /// Bytes the leader read.
        result: Result<usize>,
        /// A read-only lease on them (lend it again, or drop it).
        lease: Option<Lease>,
    },
    /// A lease group's buffer is back: its leader failed, or its last holder (member op,
    /// zero-copy notification, or user clone) let go. Carries the group's token.
    LeaseReturned(FixedBuf),
    /// A [`Member::write`] finished.
    Written {
        /// Bytes written, or why not.
        result: Result<usize>,
    },
    /// A [`Member::read_into`] finished.
    ReadInto {
        /// Bytes read into its range, or why not.
        result: Result<usize>,
    },
    /// A read or write on registered memory ([`Driver::read_fixed`] and friends) ended: the
    /// buffer comes back with the bytes transferred or the error.
    FixedIo {
        /// The buffer, back in the user's hands.
        buf: FixedBuf,
        /// Bytes read or written.
        result: Result<usize>,
    },
    /// A send finished: every byte was sent (`Ok(len)`), or it failed. A plain [`Driver::send`]
    /// returns its buffer here; a zero-copy send's buffer stays with the kernel until its
    /// notification and then goes home by itself (or comes back in [`Event::Returned`]).
    Sent {
        /// Bytes sent, or why the send failed.
        result: Result<usize>,
        /// The memory that was sent, when the kernel is already done with it.
        buf: Option<SendBuf>,
    },
    /// The buffer of a [`Driver::send_zc_returning`], after the kernel's last notification.
    Returned(SendBuf),
    /// The op failed; no further completions follow.
    Error(Error),
}

/// One completion delivered to the user.
///
/// # Examples
/// ```no_run
/// # fn f(driver: &mut ringpool::Driver) {
/// while let Some(c) = driver.pop() {
///     println!("op {:?} (token {}) {:?}, more to come: {}", c.op, c.token, c.event, c.more);
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Completion {
    /// The token given when the op was started.
    pub token: u64,
    /// The op.
    pub op: OpId,
    /// What happened.
    pub event: Event,
    /// Whether the op will deliver more completions.
    pub more: bool,
}

enum OpKind {
    Recv {
        fd: Fd,
        group: Rc<GroupShared>,
        mode: RecvMode,
    },
    Read {
        fd: Fd,
        group: Rc<GroupShared>,
        offset: u64,
    },
    /// Datagram receives (`RECVMSG` selecting buffers).
    RecvMsg {
        fd: Fd,
        group: Rc<GroupShared>,
        multishot: bool,
        hdr: Box<MsgHeader>,
    },
    Accept {
        fd: Fd,
    },
    Connect {
        fd: Fd,
        /// Boxed: the kernel reads the address after the submit, while the table may grow.
        addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
    },
    Send(Box<SendOp>),
    Fixed(Box<FixedOp>),
    /// The leader of a lease group: a read into the buffer to lend.
    Leader(Box<LeaderOp>),
    /// A lease member writing the leased bytes.
    LeaseWrite {
        fd: Fd,
        lease: Lease,
        offset: u64,
    },
    /// A send bundle: sends what a send ring holds, in order.
    SendBundle {
        fd: Fd,
        ring: Rc<SendRingShared>,
    },
    /// A read-in lease member reading into its range of the buffer.
    LeaseRead {
        fd: Fd,
        lease: Lease,
        offset: u64,
        range: std::ops::Range<usize>,
    },
    Provide {
        group: Rc<GroupShared>,
        first: u16,
        n: u32,
    },
    Remove {
        group: Rc<GroupShared>,
    },
    Timeout {
        _ts: Box<types::Timespec>,
    },
    /// The read of the eventfd that says buffers came back on another thread.
    Wake {
        _counter: Box<u64>,
    },
}

/// What a datagram receive hands the kernel: the `msghdr` (and the iovec and address storage it
/// points to). Boxed, so the pointers stay valid while the op table grows; the kernel reads it
/// when the SQE is issued and (single-shot receives) writes the sender's address and flags back.
struct MsgHeader {
    msg: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
}

/// Room a datagram receive needs in front of the payload: the kernel's `io_uring_recvmsg_out`
/// header and the sender's address (sized for IPv6, which also holds IPv4). Single-shot
/// receives put nothing there but leave the same room, so a group carries the same payload
/// size on every rung.
pub(crate) const DATAGRAM_HEADROOM: usize =
    sys::RECVMSG_OUT_LEN + std::mem::size_of::<libc::sockaddr_in6>();

impl MsgHeader {
    fn new() -> Box<MsgHeader> {
        // SAFETY: msghdr, iovec and sockaddr_storage are plain old data; all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }

    /// The sender's address a single-shot receive wrote back (`msg_namelen` bytes of it).
    fn name_bytes(&self) -> &[u8] {
        let len =
            (self.msg.msg_namelen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: `name` is plain bytes we own, at least `len` long; the single-shot receive
        // that wrote them has completed, and the next one is not armed while this borrow lives.
        unsafe { std::slice::from_raw_parts((&raw const self.name).cast::<u8>(), len) }
    }

    /// Points the header at its own iovec and address storage, for a receive of at most
    /// `payload` bytes (the kernel overwrites the lengths and flags of single-shot receives).
    fn reset(&mut self, payload: usize) {
        self.iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: payload,
        };
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_name = (&raw mut self.name).cast();
        self.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        self.msg.msg_control = std::ptr::null_mut();
        self.msg.msg_controllen = 0;
        self.msg.msg_flags = 0;
    }
}

/// A read or write on registered memory. Boxed, so the iovecs the kernel reads stay put.
struct FixedOp {
    fd: Fd,
    buf: Option<FixedBuf>,
    write: bool,
    /// One range: `READ/WRITE(_FIXED)`; several: the vectored forms.
    iov: SmallVec<[libc::iovec; 1]>,
    vectored: bool,
    offset: u64,
}

/// A lease group's leader: reads into `buf`, then starts `members` on what it read.
struct LeaderOp {
    fd: Fd,
    buf: Option<FixedBuf>,
    offset: u64,
    members: Vec<Member>,
}

/// Where a send's buffer goes once the kernel is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GiveBack {
    /// In the `Sent` completion (plain sends: the kernel is done at the result).
    InSent,
    /// In a later `Returned` completion, after the last notification.
    Later,
    /// Dropped after the last notification: pooled buffers go home, owned bytes are freed.
    Never,
}

/// A send in flight. Boxed, so the `msghdr`, iovecs and address the kernel reads stay put while
/// the op table grows.
struct SendOp {
    /// The socket, until the result is in (the kernel holds its own reference after that, so
    /// a send waiting only for its notification does not keep the socket open).
    fd: Option<Fd>,
    buf: Option<SendBuf>,
    sent: usize,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    dest: Option<(libc::sockaddr_storage, libc::socklen_t)>,
    /// `send_zc`: the zero-copy policy applies.
    zc: bool,
    give_back: GiveBack,
    /// Generations of this op's zero-copy attempts whose notification may still come. Each
    /// attempt (first try, continuation, re-run after a broken chain) has its own `user_data`
    /// generation, so a notification is matched to its attempt, and one the kernel posts after
    /// a result without `F_MORE` (6.18 does, for a linked `SEND_ZC` its broken chain cancelled)
    /// finds no attempt and is ignored instead of landing on a reused slot.
    notif_attempts: Vec<u32>,
    /// `user_data` of the SQE in flight (what `cancel` targets).
    cur_ud: u64,
    /// The user has seen the result.
    reported: bool,
    /// Whether the SQE in flight is a zero-copy one.
    in_flight_zc: bool,
    lane: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// The kernel has an SQE of this op.
    InKernel,
    /// Out of buffers; waiting for its group to be refilled.
    Parked,
    /// A send waiting in its socket's lane.
    Queued,
    /// A send whose result was reported, waiting for its zero-copy notifications.
    Notif,
}

struct OpSlot {
    token: u64,
    gen: u32,
    kind: OpKind,
    state: SlotState,
    cancel: bool,
}

/// Counters of the driver itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// CQEs reaped.
    pub cqes: u64,
    /// SQEs pushed.
    pub sqes: u64,
    /// CQEs that matched no live op or attempt (late zero-copy notifications the kernel posts
    /// after a result without `F_MORE`), ignored.
    pub stray_cqes: u64,
    /// Send bundle ops issued ([`Driver::send_bundle`]), and the buffers they sent.
    pub bundle_ops: u64,
    /// Buffers (ring entries) the send bundle ops sent.
    pub bundle_buffers: u64,
    /// Waits that held for receive coalescing ([`DriverConfig::receive_coalescing`]).
    pub held_waits: u64,
}

/// Owns an io_uring and everything the kernel may touch through it. See the [module
/// docs](self) for the ownership rule.
pub struct Driver {
    ring: IoUring,
    ladder: Ladder,
    ops: Slab<OpSlot>,
    gen: u32,
    ready: VecDeque<Completion>,
    groups: Vec<Rc<GroupShared>>,
    bgid_used: Vec<bool>,
    parked: Vec<usize>,
    cqe_buf: Vec<cqueue::Entry>,
    /// Slots of internal ops (provides, removes, timeouts) and of sends waiting only for their
    /// notifications: not counted in `in_flight`.
    internal: usize,
    /// Send lanes by socket (`Rc` address of the descriptor).
    lanes: LaneMap,
    /// Send ops ready for reuse (their iovec vectors keep their capacity). Boxed on purpose:
    /// the box is the allocation a new send reuses.
    #[allow(clippy::vec_box)]
    spare_sends: Vec<Box<SendOp>>,
    /// Lanes with sends to start.
    dirty_lanes: Vec<usize>,
    /// Sweep lanes of gone sockets when the map grows past this.
    lane_sweep_at: usize,
    zc_cfg: ZcConfig,
    zc_stats: ZcStats,
    /// Whether the last lane to learn anything found zero-copy copied (seeds new lanes).
    zc_backing_off: bool,
    take_buf: Vec<(u16, u32, u32)>,
    stats: DriverStats,
    /// The fixed buffer table, once registered memory was asked for (shared with other rings of
    /// this thread after [`Driver::share_fixed_table`]).
    fixed: Option<Rc<FixedTable>>,
    fixed_slots: u32,
    /// Names this ring in shared tables.
    ring_id: u64,
    /// Buffers given back on other threads (dropped `Bytes`), and whether the read of its
    /// eventfd is armed.
    cross: Arc<CrossReturns>,
    cross_armed: bool,
    /// The timeout op bounding the current `wait` (kernels without `EXT_ARG`): armed once per
    /// `wait`, removed when it returns.
    wait_timeout: Option<u64>,
    /// CQEs of the driver's own bookkeeping (timeout ops and their removal, cancels), which
    /// must not end a wait on their own.
    cleanup_cqes: u64,
    /// Buffers of leases whose last holder let go, for [`Event::LeaseReturned`].
    lease_returns: ReturnQueue,
    /// Set by `Drop`: no new op may start from a completion (lease members).
    dropping: bool,
    /// Send rings, until their handle is gone and nothing of theirs is in flight.
    send_rings: Vec<Rc<SendRingShared>>,
    /// Receive coalescing, if configured ([`DriverConfig::receive_coalescing`]).
    coalescing: Option<Coalescing>,
    /// Whether this kernel's `PROVIDE_BUFFERS` result counts the buffers it took (5.x) or is 0
    /// for "at least one" (later kernels); `None` until a completion told. Runs of buffers are
    /// provided only where the count comes back, so no buffer ever drops out of circulation.
    provide_counts: Option<bool>,
    /// Memory of rings the kernel refused to forget: never freed (leaked with the driver).
    kept_for_kernel: Vec<Box<dyn std::any::Any>>,
    /// Buffers of ring groups that a completion named without handing out bytes, until the
    /// driver knows whether the kernel kept them in the ring or let go ([`Driver::settle`]).
    unsettled: Vec<(Rc<GroupShared>, u16)>,
}

/// How soon a wait comes back to re-arm parked receives whose group has buffers for them, when
/// the share it re-armed first does not complete.
const REARM_PACE: Duration = Duration::from_millis(1);

/// Sets up the ring. Under a finite `RLIMIT_MEMLOCK`, `ENOMEM` is retried for up to 500 ms:
/// the kernel releases a closed ring's locked-memory charge only when its teardown work has
/// run, and the feature probe of this very process (`Features::get`, run just before) has
/// just closed several rings, which would otherwise take a tight limit's room.
fn build_ring(builder: &io_uring::Builder, entries: u32) -> std::io::Result<IoUring> {
    let mut tries = 0;
    loop {
        match builder.build(entries) {
            Err(e)
                if e.raw_os_error() == Some(libc::ENOMEM)
                    && tries < 50
                    && sys::Memlock::current() != sys::Memlock::Unlimited =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// Why `io_uring_setup` refused a ring of `sq` and `cq` entries, as a typed error: no
/// io_uring at all, io_uring disabled for this process, or the user's locked memory.
fn setup_refused(e: std::io::Error, sq: u32, cq: u32, features: &Features) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => Error::Unsupported {
            feature: "io_uring",
            kernel: features.kernel,
        },
        Some(libc::EPERM) => Error::Os {
            op: "io_uring_setup (refused for this process: kernel.io_uring_disabled or a seccomp filter)",
            source: e,
        },
        Some(libc::ENOMEM) => match sys::Memlock::current().bytes() {
            // Unlimited locked memory: the machine itself is out of memory.
            None => Error::Os {
                op: "io_uring_setup",
                source: e,
            },
            limit => Error::RingMemlock {
                sq_entries: sq,
                // The kernel rounds the completion queue up to a power of two.
                cq_entries: cq.max(sq).next_power_of_two(),
                needs: sys::ring_locked_bytes(sq, cq.max(sq).next_power_of_two()),
                limit,
            },
        },
        _ => Error::Os {
            op: "io_uring_setup",
            source: e,
        },
    }
}

/// Ids of rings in shared fixed buffer tables.
static NEXT_RING_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Driver {
    /// Sets up an io_uring with `SINGLE_ISSUER|DEFER_TASKRUN` where the kernel has it.
    pub fn new(config: DriverConfig) -> Result<Driver> {
        let entries = config.entries;
        if entries == 0 || !entries.is_power_of_two() || entries > sys::MAX_RING_ENTRIES {
            return Err(Error::InvalidRingSize {
                entries,
                max: sys::MAX_RING_ENTRIES,
            });
        }
        if config.fixed_slots == 0 || config.fixed_slots > MAX_FIXED_SLOTS {
            return Err(Error::InvalidArgument {
                what: "fixed_slots must be between 1 and 16384",
            });
        }
        let features = Features::get();
        let cq = config
            .cq_entries
            .unwrap_or(entries.saturating_mul(8).min(65536));
        if !features.io_uring {
            let errno = features.setup_errno.unwrap_or(libc::ENOSYS);
            return Err(setup_refused(
                std::io::Error::from_raw_os_error(errno),
                entries,
                cq,
                features,
            ));
        }
        let mut force = if config.ignore_env {
            Vec::new()
        } else {
            Force::from_env()?
        };
        force.extend(config.force.iter().copied());
        let ladder = Ladder::choose(features, &force);
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq).setup_clamp();
        if ladder.defer_taskrun {
            builder.setup_single_issuer().setup_defer_taskrun();
        }
        let ring =
            build_ring(&builder, entries).map_err(|e| setup_refused(e, entries, cq, features))?;
        Ok(Driver {
            ring,
            ladder,
            ops: Slab::with_capacity(64),
            gen: 0,
            ready: VecDeque::new(),
            groups: Vec::new(),
            bgid_used: vec![false; 1 << 16],
            parked: Vec::new(),
            cqe_buf: Vec::with_capacity(256),
            internal: 0,
            lanes: LaneMap::default(),
            spare_sends: Vec::new(),
            dirty_lanes: Vec::new(),
            lane_sweep_at: 1024,
            zc_cfg: config.zc,
            zc_stats: ZcStats::default(),
            zc_backing_off: false,
            take_buf: Vec::new(),
            stats: DriverStats::default(),
            fixed: None,
            fixed_slots: config.fixed_slots,
            coalescing: Coalescing::new(config.coalesce),
            unsettled: Vec::new(),
            provide_counts: None,
            kept_for_kernel: Vec::new(),
            ring_id: NEXT_RING_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            cross: Arc::new(CrossReturns::new()?),
            cross_armed: false,
            wait_timeout: None,
            cleanup_cqes: 0,
            lease_returns: ReturnQueue::default(),
            dropping: false,
            send_rings: Vec::new(),
        })
    }

    /// The fallback rungs in use.
    pub fn ladder(&self) -> &Ladder {
        &self.ladder
    }

    /// Driver counters.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// The user's ops started and not yet finished (including parked ones).
    pub fn in_flight(&self) -> usize {
        self.ops.len() - self.internal
    }

    /// Registers `shared`'s buffer ring with the kernel, if it is a ring group.
    fn register_group_ring(
        &mut self,
        shared: &GroupShared,
        bgid: u16,
        incremental: bool,
    ) -> Result<()> {
        if let Some((addr, entries)) = shared.ring_registration() {
            let flags = if incremental {
                sys::IOU_PBUF_RING_INC
            } else {
                0
            };
            // SAFETY: the ring memory is owned by `shared`, which the driver keeps in
            // `self.groups` until it unregisters the ring (or until the driver, and with it the
            // io_uring, is gone), so it stays valid for as long as the kernel may read it.
            unsafe {
                self.ring
                    .submitter()
                    .register_buf_ring_with_flags(addr, entries, bgid, flags)
            }
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => Error::GroupIdInUse { bgid },
                _ => Error::Os {
                    op: "registering a buffer ring",
                    source: e,
                },
            })?;
        }
        Ok(())
    }

    /// Creates a buffer group: a provided buffer ring where the kernel has them (incremental if
    /// asked and available), a legacy `PROVIDE_BUFFERS` group otherwise.
    ///
    /// # Errors
    /// A count that is not a power of two or exceeds 32768, a size of 0 or above
    /// [`MAX_BUF_SIZE`](crate::MAX_BUF_SIZE), a group id already in use, or memory that cannot be
    /// had.
    pub fn buf_group(&mut self, cfg: BufGroupConfig) -> Result<BufGroup> {
        let max_count = cfg.validate()?;
        let bgid = match cfg.bgid {
            Some(id) if self.bgid_used[id as usize] => {
                return Err(Error::GroupIdInUse { bgid: id })
            }
            Some(id) => id,
            None => self
                .bgid_used
                .iter()
                .position(|u| !u)
                .ok_or(Error::GroupIdsExhausted)? as u16,
        };
        let (ring, incremental) = match self.ladder.groups {
            GroupRung::Ring { incremental } => (true, cfg.incremental && incremental),
            GroupRung::Legacy => (false, false),
        };
        let mut shared = Rc::new(GroupShared::new(
            &cfg,
            bgid,
            max_count,
            ring,
            incremental,
            self.cross.clone(),
            self.ring_id,
        )?);
        if let Err(e) = self.register_group_ring(&shared, bgid, incremental) {
            // The kernel pins a buffer ring's own memory against RLIMIT_MEMLOCK; a legacy
            // group needs none, so a ring refused for locked memory steps down a rung.
            if e.raw_os_error() != Some(libc::ENOMEM)
                || sys::Memlock::current() == sys::Memlock::Unlimited
            {
                return Err(e);
            }
            shared = Rc::new(GroupShared::new(
                &cfg,
                bgid,
                max_count,
                false,
                false,
                self.cross.clone(),
                self.ring_id,
            )?);
        }
        if cfg.registration != Registration::Plain {
            let registered = {
                let region = shared.region();
                self.register_fixed(&region)
            };
            match registered {
                Ok(slot) => shared.set_fixed(slot, self.fixed_table()?),
                Err(e)
                    if e.refused_registration() && cfg.registration == Registration::Preferred => {}
                Err(e) => {
                    if shared.is_ring() && !self.forget_buf_ring(bgid) {
                        self.bgid_used[bgid as usize] = true;
                        self.kept_for_kernel.push(Box::new(shared));
                    }
                    return Err(e);
                }
            }
        }
        shared.set_registered(true);
        self.bgid_used[bgid as usize] = true;
        shared.fill(0, shared.count());
        self.groups.push(shared.clone());
        if !ring {
            // Provide the initial buffers now, so the group is usable when this returns.
            self.flush_provides()?;
            while shared.stats().in_kernel != shared.count() || self.providing(&shared) {
                self.wait(Some(Duration::from_millis(100)))?;
            }
        }
        Ok(BufGroup {
            shared: shared.clone(),
            _handle: Rc::new(HandleGuard(shared)),
        })
    }

    fn providing(&self, g: &Rc<GroupShared>) -> bool {
        self.ops
            .iter()
            .any(|(_, s)| matches!(&s.kind, OpKind::Provide { group, .. } if Rc::ptr_eq(group, g)))
    }

    /// Starts a receive on `fd` into buffers the kernel selects from `group`.
    ///
    /// Completions: [`Event::Data`] per arrival, then [`Event::Eof`] or [`Event::Error`] as the
    /// last one (multishot), or a single one (once/bundle). A dry group is not an error: the
    /// receive pauses and resumes when buffers come back, with nothing lost.
    ///
    /// The op holds its own clone of `fd`: dropping the user's clones does not stop it (data
    /// that arrives is still delivered); [`Driver::cancel`] or [`Driver::cancel_fd`] does.
    pub fn recv(&mut self, fd: &Fd, group: &BufGroup, mode: RecvMode, token: u64) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        let kind = OpKind::Recv {
            fd: fd.clone(),
            group: group.shared.clone(),
            mode,
        };
        Ok(self.start(kind, token))
    }

    /// Reads from `fd` at `offset` (`u64::MAX`: the file position) into a buffer the kernel
    /// selects from `group`. One completion: [`Event::Data`], [`Event::Eof`] or [`Event::Error`].
    pub fn read(&mut self, fd: &Fd, group: &BufGroup, offset: u64, token: u64) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        let kind = OpKind::Read {
            fd: fd.clone(),
            group: group.shared.clone(),
            offset,
        };
        Ok(self.start(kind, token))
    }

    /// Receives datagrams on `fd` (a UDP socket, bound or connected), each into one buffer the
    /// kernel selects from `group`: one [`Event::Datagram`] per datagram, with its sender.
    /// [`RecvMode::Multishot`] keeps receiving (multishot `RECVMSG`, 6.0; re-armed single
    /// receives where missing) until cancelled; [`RecvMode::Once`] takes one datagram. A dry
    /// group pauses the receive as for [`Driver::recv`] (datagrams wait in the socket's queue,
    /// where the kernel drops what overflows it, as it always does for UDP).
    ///
    /// A buffer carries at most `buf_size − 44` bytes of payload (the kernel puts a header and
    /// the sender's address in front of it); longer datagrams arrive `truncated`.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] for buffers without room for any payload;
    /// [`Error::InvalidArgument`] for bundle modes (a datagram is one buffer) or an incremental
    /// group.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{BufGroupConfig, Driver, Event, Fd, RecvMode};
    /// let mut driver = Driver::new(Default::default())?;
    /// let group = driver.buf_group(BufGroupConfig::new(2048, 16))?;
    /// let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let addr = sock.local_addr().unwrap();
    /// let fd = Fd::from(std::os::fd::OwnedFd::from(sock));
    /// driver.recv_from(&fd, &group, RecvMode::Once, 1)?;
    /// let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// peer.send_to(b"ping", addr).unwrap();
    /// driver.wait(None)?;
    /// match driver.pop().unwrap().event {
    ///     Event::Datagram(d) => {
    ///         assert_eq!(&d.data[..], b"ping");
    ///         assert_eq!(d.from, Some(peer.local_addr().unwrap()));
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn recv_from(
        &mut self,
        fd: &Fd,
        group: &BufGroup,
        mode: RecvMode,
        token: u64,
    ) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        if mode.bundle() {
            return Err(Error::InvalidArgument {
                what: "a datagram receive takes one buffer per datagram: bundle modes do not apply",
            });
        }
        if is_incremental(&group.shared) {
            return Err(Error::InvalidArgument {
                what: "a datagram receive needs whole buffers: use a group that is not incremental",
            });
        }
        if group.shared.buf_size as usize <= DATAGRAM_HEADROOM {
            return Err(Error::BufferTooSmall {
                size: group.shared.buf_size as usize,
                min: DATAGRAM_HEADROOM + 1,
                what: "a datagram receive",
            });
        }
        let kind = OpKind::RecvMsg {
            fd: fd.clone(),
            group: group.shared.clone(),
            multishot: mode.multishot(),
            hdr: MsgHeader::new(),
        };
        Ok(self.start(kind, token))
    }

    /// Accepts connections on `listener` until cancelled: one [`Event::Accepted`] each
    /// (multishot accept, 5.19; re-armed single accepts where missing).
    pub fn accept_multishot(&mut self, listener: &Fd, token: u64) -> Result<OpId> {
        Ok(self.start(
            OpKind::Accept {
                fd: listener.clone(),
            },
            token,
        ))
    }

    /// Connects the socket `fd` to `addr`; one completion: [`Event::Connected`] or
    /// [`Event::Error`].
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// use std::os::fd::FromRawFd;
    /// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// let mut driver = Driver::new(Default::default())?;
    /// let sock = Fd::tcp_socket(listener.local_addr().unwrap())?;
    /// driver.connect(&sock, listener.local_addr().unwrap(), 1)?;
    /// driver.wait(None)?;
    /// assert!(matches!(driver.pop().unwrap().event, Event::Connected));
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn connect(&mut self, fd: &Fd, addr: std::net::SocketAddr, token: u64) -> Result<OpId> {
        let kind = OpKind::Connect {
            fd: fd.clone(),
            addr: Box::new(sockaddr(addr)),
        };
        Ok(self.start(kind, token))
    }

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
    fn fixed_table(&mut self) -> Result<Rc<FixedTable>> {
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
    fn release_fixed(&mut self) -> Result<()> {
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

    /// Reads from `fd` at `offset` (`u64::MAX`: the file position) into `buf[range]`, with
    /// `READ_FIXED` on registered memory (plain `READ` otherwise). One completion,
    /// [`Event::FixedIo`], that gives `buf` back. `O_DIRECT` files need the range and offset
    /// aligned to the device's block size (`buf` itself is page aligned).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a range outside `buf` (the buffer is dropped).
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// let mut driver = Driver::new(Default::default())?;
    /// let file = std::fs::File::open("/proc/self/cmdline").unwrap();
    /// let buf = driver.fixed_buf_or_plain(4096)?;
    /// driver.read_fixed(&Fd::from(std::os::fd::OwnedFd::from(file)), buf, 0..4096, 0, 7)?;
    /// driver.wait(None)?;
    /// let Event::FixedIo { buf, result } = driver.pop().unwrap().event else { panic!() };
    /// assert!(result? > 0 && buf[0] != 0);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn read_fixed(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, &[range], false, false, offset, token)
    }

    /// Writes `buf[range]` to `fd` at `offset` (`u64::MAX`: the file position), with
    /// `WRITE_FIXED` on registered memory. One completion, [`Event::FixedIo`]. See
    /// [`Driver::read_fixed`].
    pub fn write_fixed(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, &[range], true, false, offset, token)
    }

    /// Reads from `fd` at `offset` into the `ranges` of `buf`, in order, in one op:
    /// `READV_FIXED` (6.15+), or `READV` on the same memory where that is missing. One
    /// completion, [`Event::FixedIo`], with the total bytes.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// let mut driver = Driver::new(Default::default())?;
    /// let file = std::fs::File::open("/proc/self/cmdline").unwrap();
    /// let buf = driver.fixed_buf_or_plain(8192)?;
    /// let fd = Fd::from(std::os::fd::OwnedFd::from(file));
    /// driver.read_fixed_vectored(&fd, buf, &[4096..4098, 0..4], 0, 7)?;
    /// driver.wait(None)?;
    /// let Event::FixedIo { result, .. } = driver.pop().unwrap().event else { panic!() };
    /// assert!(result? > 0);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn read_fixed_vectored(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        ranges: &[std::ops::Range<usize>],
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, ranges, false, true, offset, token)
    }

    /// Writes the `ranges` of `buf`, in order, to `fd` at `offset` in one op: `WRITEV_FIXED`
    /// (6.15+), or `WRITEV` on the same memory. See [`Driver::read_fixed_vectored`].
    pub fn write_fixed_vectored(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        ranges: &[std::ops::Range<usize>],
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, ranges, true, true, offset, token)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_fixed(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        ranges: &[std::ops::Range<usize>],
        write: bool,
        vectored: bool,
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        if ranges.is_empty() || ranges.len() > libc::UIO_MAXIOV as usize {
            return Err(Error::InvalidArgument {
                what: "between 1 and 1024 ranges per vectored op",
            });
        }
        if ranges.iter().any(|r| r.start > r.end || r.end > buf.len()) {
            return Err(Error::InvalidArgument {
                what: "a range outside the registered buffer",
            });
        }
        let base = buf.as_ptr();
        let iov = ranges
            .iter()
            .map(|r| libc::iovec {
                // Pointer arithmetic only; the range was checked to lie inside `buf`.
                iov_base: base.wrapping_add(r.start).cast(),
                iov_len: r.len(),
            })
            .collect();
        let kind = OpKind::Fixed(Box::new(FixedOp {
            fd: fd.clone(),
            buf: Some(buf),
            write,
            iov,
            vectored,
            offset,
        }));
        Ok(self.start(kind, token))
    }

    /// A **lease group**: the leader reads from `fd` at `offset` (`u64::MAX`: the file position)
    /// into `buf` (registered: `READ_FIXED`), then lends the bytes it read, read-only, to every
    /// member at once (sends to many sockets, writes to many files); the buffer comes back in
    /// [`Event::LeaseReturned`] (this call's token) after the last member and its last
    /// zero-copy notification.
    ///
    /// - Members start only after the leader succeeded, all in one batch as it completes (not
    ///   linked to it: a linked member would have to be sized before the read, and would send
    ///   stale bytes after a short read).
    /// - A failed leader cancels every member: each completes with [`Error::Cancelled`], and
    ///   the buffer comes back at once.
    /// - One member's failure does not cancel the others; each reports its own result under
    ///   its own token ([`Event::Sent`], [`Event::Written`]). A zero-copy send member then
    ///   reports, in [`Event::Returned`], when its notification came and it let go of the lease.
    /// - After a short read, members see only the bytes read, and the rest of the buffer is
    ///   zeroed before anyone can look at it, so no stale data leaks.
    /// - The leader completes with [`Event::LeaseFilled`], whose [`Lease`] may be lent again
    ///   (read-only leases share freely). No member selects a buffer (no member type can).
    /// - A **read-in lease** has only [`Member::read_into`] members, each writing its own part
    ///   of the buffer (disjoint ranges, checked); its lease is never handed out, so nobody can
    ///   read bytes being written, and a short member read zeroes the rest of its range.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd, Member};
    /// use std::io::Read;
    /// let mut driver = Driver::new(Default::default())?;
    /// let file = Fd::from(std::os::fd::OwnedFd::from(std::fs::File::open("Cargo.toml").unwrap()));
    /// let (a, mut peer_a) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let (b, mut peer_b) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let (a, b) = (Fd::from(std::os::fd::OwnedFd::from(a)), Fd::from(std::os::fd::OwnedFd::from(b)));
    /// let buf = driver.fixed_buf_or_plain(16)?;
    /// driver.lease_group(&file, buf, 0, vec![Member::send(&a, 1), Member::send_zc(&b, 2)], 9)?;
    /// let mut returned = None;
    /// while returned.is_none() {
    ///     driver.wait(None)?;
    ///     while let Some(c) = driver.pop() {
    ///         if let Event::LeaseReturned(buf) = c.event {
    ///             returned = Some(buf);
    ///         }
    ///     }
    /// }
    /// let (mut x, mut y) = ([0u8; 16], [0u8; 16]);
    /// peer_a.read_exact(&mut x).unwrap();
    /// peer_b.read_exact(&mut y).unwrap();
    /// assert_eq!(x, y); // both got the same 16 bytes, read from the file once
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn lease_group(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        offset: u64,
        members: Vec<Member>,
        token: u64,
    ) -> Result<OpId> {
        if buf.len() > u32::MAX as usize {
            return Err(Error::InvalidArgument {
                what: "a leased buffer holds at most 4 GiB",
            });
        }
        check_read_in(&members, buf.len())?;
        let kind = OpKind::Leader(Box::new(LeaderOp {
            fd: fd.clone(),
            buf: Some(buf),
            offset,
            members,
        }));
        Ok(self.start(kind, token))
    }

    /// Refuses a buffer group or send ring made by another driver (`owner`): its bgid names
    /// another group here, or none, and the buffer ids this ring's completions carry would be
    /// taken from the wrong group, memory the other ring's kernel may be writing.
    fn check_owner(&self, owner: u64, what: &'static str) -> Result<()> {
        if owner == self.ring_id {
            return Ok(());
        }
        Err(Error::NotOurs { what })
    }

    /// The leader of a lease group completed: lend its bytes to the members, or cancel them.
    fn leader_done(
        &mut self,
        token: u64,
        id: OpId,
        result: Result<usize>,
        buf: FixedBuf,
        members: Vec<Member>,
    ) {
        let n = match result {
            Ok(n) => n,
            Err(e) => {
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::LeaseFilled {
                        result: Err(e),
                        lease: None,
                    },
                    more: true,
                });
                for m in members {
                    self.ready.push_back(Completion {
                        token: m.token,
                        op: OpId::NONE,
                        event: m.cancelled_event(),
                        more: false,
                    });
                }
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::LeaseReturned(buf),
                    more: false,
                });
                return;
            }
        };
        // A read-in lease's members write into the buffer: nobody may read it meanwhile.
        let read_in = members.iter().any(Member::is_read_into);
        let lease = Lease::new(buf, n, token, self.lease_returns.clone());
        self.ready.push_back(Completion {
            token,
            op: id,
            event: Event::LeaseFilled {
                result: Ok(n),
                lease: (!read_in).then(|| lease.clone()),
            },
            more: true,
        });
        for m in members {
            match m.kind {
                MemberKind::Send { fd, zc } => {
                    // Each member says when it let go of the lease: a plain send in its `Sent`
                    // (which carries its clone), a zero-copy send in a later `Returned`, after
                    // its notification. A server can tell which member still holds a lease.
                    let give_back = if zc {
                        GiveBack::Later
                    } else {
                        GiveBack::InSent
                    };
                    // A leased range is always inside its buffer: this cannot fail.
                    let _ = self.start_send(
                        &fd,
                        SendBuf::Leased(lease.clone()),
                        None,
                        zc,
                        give_back,
                        m.token,
                    );
                }
                MemberKind::Write { fd, offset } => {
                    let kind = OpKind::LeaseWrite {
                        fd,
                        lease: lease.clone(),
                        offset,
                    };
                    self.start(kind, m.token);
                }
                MemberKind::ReadInto { fd, offset, range } => {
                    let kind = OpKind::LeaseRead {
                        fd,
                        lease: lease.clone(),
                        offset,
                        range,
                    };
                    self.start(kind, m.token);
                }
            }
        }
    }

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
        let bgid = if kernel {
            self.bgid_used
                .iter()
                .position(|u| !u)
                .ok_or(Error::GroupIdsExhausted)? as u16
        } else {
            0
        };
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
    fn start_bundle(&mut self, fd: Fd, ring: Rc<SendRingShared>) {
        if !ring.fill() {
            // Only empty sends were queued.
            let (_, done) = ring.consumed(0).unwrap_or_default();
            self.report_bundle(done);
            return;
        }
        ring.in_flight.set(true);
        self.start(OpKind::SendBundle { fd, ring }, 0);
    }

    fn report_bundle(&mut self, done: Vec<(u64, usize)>) {
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
    fn reap_send_rings(&mut self) {
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

    /// Asks the kernel to forget the provided buffer ring of `bgid`, and frees the id; true when
    /// the kernel holds no ring under it any more. Its only refusals (`ENOENT`, `EINVAL`) mean
    /// it had none there. Any other failure: the kernel may still read the ring and write into
    /// its buffers, so the id stays taken and the caller keeps the memory for the driver's life
    /// ([`Driver::kept_for_kernel`]).
    fn forget_buf_ring(&mut self, bgid: u16) -> bool {
        match self.ring.submitter().unregister_buf_ring(bgid) {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => false,
            _ => {
                self.bgid_used[bgid as usize] = false;
                true
            }
        }
    }

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

    fn start_send(
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
        let backing_off = self.zc_backing_off;
        let gen = self.next_gen();
        if self.lanes.len() > self.lane_sweep_at {
            // Forget lanes of sockets that are gone (amortised: the bound doubles with the map).
            self.lanes
                .retain(|_, l| !(l.idle() && l.fd.strong_count() == 0));
            self.lane_sweep_at = (self.lanes.len() * 2).max(1024);
        }
        let policy = if backing_off {
            LanePolicy::backed_off()
        } else {
            LanePolicy::default()
        };
        let lane = match self.lanes.entry(lane_key) {
            Entry::Occupied(e) if e.get().fd.strong_count() > 0 => e.into_mut(),
            // A socket at the address of a gone one, whose lane is idle (its sends kept it alive
            // while they ran): start afresh.
            Entry::Occupied(mut e) => {
                e.insert(Lane::new(Rc::downgrade(&fd.0), policy));
                e.into_mut()
            }
            Entry::Vacant(e) => e.insert(Lane::new(Rc::downgrade(&fd.0), policy)),
        };
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
        };
        let key = self.ops.insert(OpSlot {
            token,
            gen,
            kind: OpKind::Send(match self.spare_sends.pop() {
                Some(mut spare) => {
                    let iov = std::mem::take(&mut spare.iov);
                    *spare = SendOp { iov, ..op };
                    spare
                }
                None => Box::new(op),
            }),
            state: SlotState::Queued,
            cancel: false,
        });
        if lane.queue.is_empty() && lane.in_flight == 0 {
            self.dirty_lanes.push(lane_key);
        }
        lane.queue.push_back(key);
        Ok(OpId::new(key, gen, self.ring_id))
    }

    #[doc(hidden)]
    pub fn debug_state(&self) -> String {
        let mut out = String::new();
        for (k, slot) in self.ops.iter() {
            if let OpKind::Send(op) = &slot.kind {
                out += &format!(
                    "[{k} tok {} {:?} sent {} notifs {:?} reported {} zc {}] ",
                    slot.token,
                    slot.state,
                    op.sent,
                    op.notif_attempts,
                    op.reported,
                    op.in_flight_zc
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

    /// Asks the kernel to stop `op`. Its final completion still comes (usually
    /// `Error(Cancelled)`), and its memory is released only then. Stale ids, and ids of another
    /// driver's ops, are ignored.
    pub fn cancel(&mut self, op: OpId) {
        if op.driver != self.ring_id {
            return; // another driver's op (or none): its key may name an op of ours
        }
        let Some(slot) = self.ops.get_mut(op.key()) else {
            return;
        };
        if slot.gen != op.gen() || slot.cancel {
            return;
        }
        slot.cancel = true;
        match slot.state {
            SlotState::Parked => self.finish_parked(op.key(), Event::Error(Error::Cancelled)),
            SlotState::Notif => {}
            SlotState::Queued => {
                let OpKind::Send(send) = &slot.kind else {
                    unreachable!("only sends queue")
                };
                let (lane_key, sent) = (send.lane, send.sent);
                let len = send.buf.as_ref().map_or(0, SendBuf::len);
                if let Some(lane) = self.lanes.get_mut(&lane_key) {
                    lane.queue.retain(|&k| k != op.key());
                    lane.requeue.retain(|&k| k != op.key());
                }
                // Between two parts of a send (short, or one buffer at a time): what left is
                // said, as for a send cancelled in the kernel.
                let result = if sent > 0 {
                    Err(Error::ShortSend { sent, len })
                } else {
                    Err(Error::Cancelled)
                };
                self.report_send(op.key(), result);
            }
            SlotState::InKernel => {
                // A send's SQE carries the generation of its current attempt.
                let target = match &slot.kind {
                    OpKind::Send(send) => send.cur_ud,
                    _ => op.ud,
                };
                let sqe = opcode::AsyncCancel::new(target).build().user_data(IGNORED);
                self.push(sqe);
            }
        }
    }

    /// Cancels every op using `fd` (for closing a connection with receives in flight).
    pub fn cancel_fd(&mut self, fd: &Fd) {
        self.drop_waiting_members(|m| m.fd().same(fd));
        self.cancel_where(|s| op_fd(&s.kind).is_some_and(|f| f.same(fd)));
    }

    /// Cancels every op whose slot `which` picks, as [`Driver::cancel`] does.
    fn cancel_where(&mut self, which: impl Fn(&OpSlot) -> bool) {
        let ids: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, s)| which(s))
            .map(|(k, s)| OpId::new(k, s.gen, self.ring_id))
            .collect();
        for id in ids {
            self.cancel(id);
        }
    }

    /// Cancels every op started with `token`, as [`Driver::cancel`] does, including lease
    /// members with that token whose leader is still reading (they complete at once with
    /// [`Error::Cancelled`], and will not start). For ops whose [`OpId`] is not known yet, such
    /// as the members of a [`Driver::lease_group`]. Looks at every op in flight: meant for
    /// teardown, not for every op.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(driver: &mut ringpool::Driver, file: ringpool::Fd, sock: ringpool::Fd, buf: ringpool::FixedBuf) -> ringpool::Result<()> {
    /// use ringpool::Member;
    /// driver.lease_group(&file, buf, 0, vec![Member::send_zc(&sock, 7)], 1)?;
    /// driver.cancel_token(7); // the member ends with `Error::Cancelled`, wherever it is
    /// # Ok(()) }
    /// ```
    pub fn cancel_token(&mut self, token: u64) {
        self.drop_waiting_members(|m| m.token == token);
        // Driver-internal ops have no descriptor (and token 0): never the user's.
        // Bundle ops carry many sends (and token 0): `cancel_fd` stops them.
        self.cancel_where(|s| {
            s.token == token
                && op_fd(&s.kind).is_some()
                && !matches!(s.kind, OpKind::SendBundle { .. })
        });
    }

    /// Cancels every op of the user's, as [`Driver::cancel`] does (an `rt` runtime's end).
    pub(crate) fn cancel_all(&mut self) {
        self.drop_waiting_members(|_| true);
        self.cancel_where(|s| op_fd(&s.kind).is_some());
    }

    /// Members of lease groups whose leader is still reading are not ops yet: those `which`
    /// picks end here, with their cancelled completion.
    fn drop_waiting_members(&mut self, which: impl Fn(&Member) -> bool) {
        let mut dropped = Vec::new();
        for (_, slot) in self.ops.iter_mut() {
            if let OpKind::Leader(op) = &mut slot.kind {
                op.members.retain(|m| {
                    let drop = which(m);
                    if drop {
                        dropped.push(m.clone());
                    }
                    !drop
                });
            }
        }
        for m in dropped {
            self.ready.push_back(Completion {
                token: m.token,
                op: OpId::NONE,
                event: m.cancelled_event(),
                more: false,
            });
        }
    }

    /// The next completion, if any is ready.
    pub fn pop(&mut self) -> Option<Completion> {
        if self.ready.is_empty() {
            self.collect_lease_returns();
        }
        self.ready.pop_front()
    }

    /// Leases whose last holder let go: their buffers go back to the user.
    fn collect_lease_returns(&mut self) {
        let mut returns = self.lease_returns.borrow_mut();
        while let Some((token, buf)) = returns.pop_front() {
            self.ready.push_back(Completion {
                token,
                op: OpId::NONE,
                event: Event::LeaseReturned(buf),
                more: false,
            });
        }
    }

    /// Completions ready to be popped.
    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Submits queued work (re-arming receives whose groups were refilled, providing returned
    /// legacy buffers), waits until at least one CQE arrives or `timeout` passes (no waiting if
    /// completions are already ready), and dispatches every CQE. Returns the number of
    /// completions ready.
    ///
    /// When the kernel holds nothing of ours (every op finished or parked on a dry group), a
    /// `wait(None)` returns at once, so a loop that holds every buffer cannot hang here; a
    /// `wait(Some(t))` sleeps for `t` (nothing can complete sooner), so such a loop does not
    /// spin either.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if let Some(delay) = self.hold_for(timeout) {
            // Data streams in: queued sends and re-armed receives go now, but without GETEVENTS,
            // so that (with DEFER_TASKRUN) no receive runs before the sleep: each runs after it,
            // when the loop below collects, and takes what its socket holds by then.
            self.stats.held_waits += 1;
            self.flush()?;
            self.stats.enters += 1;
            enter_result(self.ring.submit())?;
            std::thread::sleep(delay);
        }
        let result = loop {
            self.flush()?;
            self.collect_lease_returns();
            let in_kernel = self.in_kernel();
            let want = if self.ready.is_empty() && (in_kernel > 0 || deadline.is_some()) {
                1
            } else {
                0
            };
            let meaningful = self.stats.cqes - self.cleanup_cqes;
            let mut left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if want == 1 && self.rearm_pending() {
                // Parked receives wait for their turn at buffers that are there (the flush
                // re-arms a group's share at a time): come back for them soon, even if the
                // ones just re-armed never complete (idle sockets).
                left = Some(left.map_or(REARM_PACE, |l| l.min(REARM_PACE)));
            }
            if let Err(e) = self.enter(want, left) {
                break Err(e);
            }
            self.reap();
            self.collect_lease_returns();
            // Woken only by our own bookkeeping (a timeout op's removal, a cancel's result):
            // nothing happened for the caller, so wait on for the time left.
            let only_cleanup = self.stats.cqes - self.cleanup_cqes == meaningful;
            let time_left = deadline.is_none_or(|d| Instant::now() < d);
            if want == 0 || !self.ready.is_empty() || !only_cleanup || !time_left {
                break Ok(self.ready.len());
            }
        };
        if let Some(ud) = self.wait_timeout.take() {
            // The wait's timeout op has not fired: remove it (its CQE is bookkeeping).
            self.push(opcode::TimeoutRemove::new(ud).build().user_data(IGNORED));
        }
        if let Some(c) = &mut self.coalescing {
            c.woke(Instant::now());
        }
        result
    }

    /// A handle that wakes this driver from any thread ([`CrossReturns::notify`]): from now on
    /// the driver keeps a read of its eventfd armed, and a `wait` returns when it completes
    /// (the async layer's wakers, called on other threads).
    pub(crate) fn remote_waker(&mut self) -> Arc<CrossReturns> {
        self.cross.watch();
        self.cross.clone()
    }

    /// Ops the kernel may complete: not parked, and the eventfd read only while buffers are out
    /// as `Bytes` (else nothing but a remote wake-up completes it, and a driver whose ops are
    /// all parked must not sleep on it; a timed wait sleeps anyway).
    fn in_kernel(&self) -> usize {
        let idle_wake = usize::from(self.cross_armed && !self.cross.outstanding());
        self.ops.len() - self.parked.len() - idle_wake
    }

    /// How long this `wait` holds for receive coalescing: the delay, within the timeout, if
    /// the last wake-up asked for it and the wait would block at all (no completion ready or
    /// posted, something in the kernel, a timeout that is not zero).
    fn hold_for(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let delay = self.coalescing.as_ref()?.hold()?;
        let blocks =
            self.ready.is_empty() && self.ring.completion().is_empty() && self.in_kernel() > 0;
        let delay = delay.min(timeout.unwrap_or(Duration::MAX));
        (blocks && !delay.is_zero()).then_some(delay)
    }

    /// Submits queued work and dispatches CQEs that are already there, without waiting.
    pub fn submit(&mut self) -> Result<usize> {
        self.flush()?;
        self.enter(0, None)?;
        self.reap();
        Ok(self.ready.len())
    }

    fn next_gen(&mut self) -> u32 {
        self.gen = self.gen.wrapping_add(1);
        self.gen
    }

    fn start(&mut self, kind: OpKind, token: u64) -> OpId {
        let gen = self.next_gen();
        let key = self.ops.insert(OpSlot {
            token,
            gen,
            kind,
            state: SlotState::InKernel,
            cancel: false,
        });
        self.arm(key);
        OpId::new(key, gen, self.ring_id)
    }

    /// Builds the op's SQE from its slot and pushes it.
    fn arm(&mut self, key: usize) {
        if matches!(self.ops[key].kind, OpKind::Send(_)) {
            self.arm_send(key, false);
            return;
        }
        let ladder = self.ladder;
        // Registered memory of another ring's table goes as plain memory (`fixed::slot_in`).
        let table = self.fixed.as_ref().map(FixedTable::id);
        let slot = &mut self.ops[key];
        let ud = user_data(key, slot.gen);
        slot.state = SlotState::InKernel;
        if let Some(group) = selecting_group(&slot.kind) {
            group.selecting.set(group.selecting.get() + 1);
        }
        let sqe = match &mut slot.kind {
            OpKind::Recv { fd, group, mode } => {
                let fd = types::Fd(fd.as_raw_fd());
                let bundle = mode.bundle() && ladder.bundle && !is_incremental(group);
                let bgid = group.bgid;
                match (
                    mode.multishot() && ladder.recv == MultishotRung::Kernel,
                    bundle,
                ) {
                    (true, true) => opcode::RecvMultiBundle::new(fd, bgid).build(),
                    (true, false) => opcode::RecvMulti::new(fd, bgid).build(),
                    (false, true) => opcode::RecvBundle::new(fd, bgid).build(),
                    (false, false) => opcode::Recv::new(fd, std::ptr::null_mut(), group.buf_size)
                        .buf_group(bgid)
                        .build()
                        .flags(squeue::Flags::BUFFER_SELECT),
                }
            }
            OpKind::Read { fd, group, offset } => opcode::Read::new(
                types::Fd(fd.as_raw_fd()),
                std::ptr::null_mut(),
                group.buf_size,
            )
            .offset(*offset)
            .buf_group(group.bgid)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT),
            OpKind::RecvMsg {
                fd,
                group,
                multishot,
                hdr,
            } => {
                let fd = types::Fd(fd.as_raw_fd());
                if *multishot && ladder.recv == MultishotRung::Kernel {
                    // The kernel fits its header and the address into the selected buffer
                    // itself, in front of at most `buf_size − DATAGRAM_HEADROOM` bytes.
                    hdr.reset(group.buf_size as usize);
                    opcode::RecvMsgMulti::new(fd, &hdr.msg, group.bgid).build()
                } else {
                    // The same payload room as the multishot form, so no rung truncates more.
                    hdr.reset(group.buf_size as usize - DATAGRAM_HEADROOM);
                    opcode::RecvMsg::new(fd, &mut hdr.msg)
                        .buf_group(group.bgid)
                        .build()
                        .flags(squeue::Flags::BUFFER_SELECT)
                }
            }
            OpKind::Accept { fd } => {
                let fd = types::Fd(fd.as_raw_fd());
                match ladder.accept {
                    MultishotRung::Kernel => opcode::AcceptMulti::new(fd)
                        .flags(libc::SOCK_CLOEXEC)
                        .build(),
                    MultishotRung::Rearmed => {
                        opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                            .flags(libc::SOCK_CLOEXEC)
                            .build()
                    }
                }
            }
            OpKind::Connect { fd, addr } => {
                let ptr: *const libc::sockaddr = (&addr.0 as *const libc::sockaddr_storage).cast();
                opcode::Connect::new(types::Fd(fd.as_raw_fd()), ptr, addr.1).build()
            }
            OpKind::Fixed(op) => {
                let fd = types::Fd(op.fd.as_raw_fd());
                let slot = op.buf.as_ref().and_then(|b| b.slot_in(table));
                let (iov, n) = (op.iov.as_ptr(), op.iov.len() as u32);
                let (ptr, len) = (op.iov[0].iov_base.cast::<u8>(), op.iov[0].iov_len as u32);
                match (op.vectored, slot, op.write) {
                    (false, Some(i), false) => opcode::ReadFixed::new(fd, ptr, len, i)
                        .offset(op.offset)
                        .build(),
                    (false, Some(i), true) => opcode::WriteFixed::new(fd, ptr, len, i)
                        .offset(op.offset)
                        .build(),
                    (false, None, false) => {
                        opcode::Read::new(fd, ptr, len).offset(op.offset).build()
                    }
                    (false, None, true) => {
                        opcode::Write::new(fd, ptr, len).offset(op.offset).build()
                    }
                    (true, Some(i), false) if ladder.vectored_fixed => {
                        opcode::ReadvFixed::new(fd, iov, n, i)
                            .offset(op.offset)
                            .build()
                    }
                    (true, Some(i), true) if ladder.vectored_fixed => {
                        opcode::WritevFixed::new(fd, iov, n, i)
                            .offset(op.offset)
                            .build()
                    }
                    (true, _, false) => opcode::Readv::new(fd, iov, n).offset(op.offset).build(),
                    (true, _, true) => opcode::Writev::new(fd, iov, n).offset(op.offset).build(),
                }
            }
            OpKind::Leader(op) => {
                let fd = types::Fd(op.fd.as_raw_fd());
                let buf = op.buf.as_ref().expect("a leader in flight owns its buffer");
                let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
                match buf.slot_in(table) {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
                        .offset(op.offset)
                        .build(),
                    None => opcode::Read::new(fd, ptr, len).offset(op.offset).build(),
                }
            }
            OpKind::LeaseWrite { fd, lease, offset } => {
                let fd = types::Fd(fd.as_raw_fd());
                let (ptr, len) = (lease.as_ptr(), lease.len() as u32);
                match lease.fixed_slot_in(table) {
                    Some(i) => opcode::WriteFixed::new(fd, ptr, len, i)
                        .offset(*offset)
                        .build(),
                    None => opcode::Write::new(fd, ptr, len).offset(*offset).build(),
                }
            }
            OpKind::SendBundle { fd, ring } => {
                self.stats.bundle_ops += 1;
                let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
                let mut sqe = opcode::Send::new(types::Fd(fd.as_raw_fd()), std::ptr::null(), 0)
                    .ioprio(sys::IORING_RECVSEND_BUNDLE)
                    .flags(flags)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT);
                // `buf_group` shares the SQE field of `buf_index`; the crate's `Send` lacks it.
                sys::sqe_set_buf_index(&mut sqe, ring.bgid);
                sqe
            }
            OpKind::LeaseRead {
                fd,
                lease,
                offset,
                range,
            } => {
                let fd = types::Fd(fd.as_raw_fd());
                // Inside the buffer: `check_read_in` made sure of it.
                let ptr = lease.base_ptr().wrapping_add(range.start);
                let len = range.len() as u32;
                match lease.fixed_slot_in(table) {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
                        .offset(*offset)
                        .build(),
                    None => opcode::Read::new(fd, ptr, len).offset(*offset).build(),
                }
            }
            OpKind::Send(_) => unreachable!("sends are armed by arm_send"),
            OpKind::Provide { .. }
            | OpKind::Remove { .. }
            | OpKind::Timeout { .. }
            | OpKind::Wake { .. } => {
                unreachable!("internal ops are pushed where they are built")
            }
        };
        self.push(sqe.user_data(ud));
    }

    /// Builds a send's SQE: plain, `SENDMSG_ZC` or `SEND_ZC` (one buffer), as the ladder and the
    /// lane's policy say. With `link`, the next SQE of the lane's chain waits for this one.
    /// Returns whether it linked: a `SEND_ZC` that covers only the first of several buffers
    /// ends the chain, so its continuation can go before anything newer.
    fn arm_send(&mut self, key: usize, link: bool) -> bool {
        let (ladder, cfg) = (self.ladder, self.zc_cfg);
        // Registered memory of another ring's table goes as plain memory (`fixed::slot_in`).
        let table = self.fixed.as_ref().map(FixedTable::id);
        let attempt = self.next_gen();
        let slot = &mut self.ops[key];
        let ud = user_data(key, attempt);
        slot.state = SlotState::InKernel;
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("arm_send on a send")
        };
        let op = &mut **op;
        let buf = op.buf.as_ref().expect("a send in flight owns its buffer");
        buf.iovecs(op.sent, &mut op.iov);
        // An empty send goes plainly: SEND_ZC of nothing from a fixed buffer is EFAULT.
        let fixed_slot = if ladder.fixed && buf.len() > op.sent {
            buf.fixed_slot_in(table)
        } else {
            None
        };
        let remaining = buf.len() - op.sent;
        let lane = self
            .lanes
            .get_mut(&op.lane)
            .expect("a send's lane lives while it has sends");
        let zc = op.zc
            && remaining > 0
            && ladder.zc != ZcRung::Plain
            && lane
                .policy
                .wants_zc(&cfg, ladder.zc_report_usage, remaining);
        op.in_flight_zc = zc;
        op.cur_ud = ud;
        op.msg.msg_iov = op.iov.as_mut_ptr();
        op.msg.msg_iovlen = op.iov.len();
        if let Some((addr, len)) = &op.dest {
            op.msg.msg_name = (addr as *const libc::sockaddr_storage).cast_mut().cast();
            op.msg.msg_namelen = *len;
        }
        let fd = types::Fd(
            op.fd
                .as_ref()
                .expect("a send owns its socket until its result")
                .as_raw_fd(),
        );
        let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
        let usage = if ladder.zc_report_usage {
            sys::IORING_SEND_ZC_REPORT_USAGE
        } else {
            0
        };
        let msg_ptr: *const libc::msghdr = &op.msg;
        let mut linked = link;
        let sqe = if !zc {
            self.zc_stats.plain_sends += op.zc as u64;
            opcode::SendMsg::new(fd, msg_ptr)
                .flags(flags as u32)
                .build()
        } else if ladder.zc == ZcRung::SendmsgZc && (op.iov.len() > 1 || fixed_slot.is_none()) {
            self.zc_stats.zc_sends += 1;
            // Registered iovecs in SENDMSG_ZC came with the vectored fixed ops (6.15).
            match fixed_slot.filter(|_| ladder.vectored_fixed) {
                Some(slot) => {
                    self.zc_stats.fixed_sends += 1;
                    let mut sqe = opcode::SendMsgZc::new(fd, msg_ptr)
                        .ioprio(usage | sys::IORING_RECVSEND_FIXED_BUF)
                        .flags(flags as u32)
                        .build();
                    sys::sqe_set_buf_index(&mut sqe, slot);
                    sqe
                }
                None => opcode::SendMsgZc::new(fd, msg_ptr)
                    .ioprio(usage)
                    .flags(flags as u32)
                    .build(),
            }
        } else {
            self.zc_stats.zc_sends += 1;
            linked &= op.iov.len() <= 1;
            let (ptr, len) = op.iov.first().map_or((std::ptr::null(), 0), |v| {
                (v.iov_base as *const u8, v.iov_len as u32)
            });
            let mut b = opcode::SendZc::new(fd, ptr, len)
                .zc_flags(usage)
                .buf_index(fixed_slot)
                .flags(flags);
            self.zc_stats.fixed_sends += fixed_slot.is_some() as u64;
            if let Some((addr, alen)) = &op.dest {
                b = b
                    .dest_addr((addr as *const libc::sockaddr_storage).cast())
                    .dest_addr_len(*alen);
            }
            b.build()
        };
        let sqe = if linked {
            sqe.flags(squeue::Flags::IO_LINK)
        } else {
            sqe
        };
        self.push(sqe.user_data(ud));
        linked
    }

    /// Starts the next chain of every lane that is idle and has sends queued.
    fn flush_lanes(&mut self) {
        /// Longest chain submitted at once.
        const MAX_CHAIN: usize = 64;
        let dirty = std::mem::take(&mut self.dirty_lanes);
        for lane_key in dirty {
            let Some(lane) = self.lanes.get_mut(&lane_key) else {
                continue;
            };
            if lane.in_flight > 0 {
                continue;
            }
            if lane.queue.is_empty() {
                continue;
            }
            // A link chain cannot span two submissions: the kernel ends a chain at the end of a
            // submit, and the rest would run beside it, out of order. Make room for the whole
            // chain first (and never build one longer than the queue).
            let capacity = self.ring.submission().capacity();
            let n = lane.queue.len().min(MAX_CHAIN).min(capacity);
            let chain: Vec<usize> = lane.queue.drain(..n).collect();
            // (A submit that found the completion queue full reaps, and what it dispatches may
            // push SQEs of its own: check the room again until the whole chain fits.)
            while capacity - self.ring.submission().len() < n {
                self.submit_queued();
            }
            for (i, &key) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                self.lanes.get_mut(&lane_key).expect("lane").in_flight += 1;
                if !self.arm_send(key, !last) && !last {
                    // The chain ends early: the rest waits for the next one, in order.
                    let lane = self.lanes.get_mut(&lane_key).expect("lane");
                    for &k in chain[i + 1..].iter().rev() {
                        lane.queue.push_front(k);
                    }
                    break;
                }
            }
        }
    }

    /// A send's result is final: tell the user, and free the slot unless notifications are
    /// still to come.
    fn report_send(&mut self, key: usize, result: Result<usize>) {
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

    /// A CQE of a send: its result, or a zero-copy notification.
    fn send_completion(&mut self, key: usize, attempt: u32, res: i32, flags: u32) {
        let slot = &mut self.ops[key];
        let (token, id, cancelled) = (
            slot.token,
            OpId::new(key, slot.gen, self.ring_id),
            slot.cancel,
        );
        let OpKind::Send(op) = &mut slot.kind else {
            unreachable!("send_completion on a send")
        };
        let lane_key = op.lane;
        if cqueue::notif(flags) {
            let copied = res as u32 & sys::IORING_NOTIF_USAGE_ZC_COPIED != 0;
            self.zc_stats.notifications += 1;
            self.zc_stats.zc_copied += copied as u64;
            if self.ladder.zc_report_usage {
                if let Some(lane) = self.lanes.get_mut(&lane_key) {
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
        let total = op.buf.as_ref().map_or(0, SendBuf::len);
        let lane = self
            .lanes
            .get_mut(&lane_key)
            .expect("a send's lane lives while it has sends");
        lane.in_flight -= 1;
        let outcome = if res >= 0 && op.sent < total && res > 0 && !cancelled {
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
        };
        if lane.in_flight == 0 {
            lane.chain_done();
            self.dirty_lanes.push(lane_key);
        }
        match outcome {
            Some(result) => self.report_send(key, result),
            None => {
                let _ = token;
                self.ops[key].state = SlotState::Queued;
            }
        }
    }

    /// Hands the queued SQEs to the kernel without waiting or reaping.
    fn submit_queued(&mut self) {
        self.stats.enters += 1;
        while let Err(e) = self.ring.submit() {
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The completion queue is full: make room, then submit again.
                Some(libc::EBUSY | libc::EAGAIN) => self.reap(),
                _ => panic!("io_uring_enter failed while submitting: {e}"),
            }
        }
    }

    /// Pushes an SQE, submitting first if the queue is full.
    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every SQE pushed names only memory owned by an op slot (or none), and that
            // slot lives until the op's final CQE: the ownership rule of this module.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.stats.sqes += 1;
                return;
            }
            // The queue is full: hand what is there to the kernel and retry.
            self.submit_queued();
        }
    }

    /// Calls `io_uring_enter`: submits, runs deferred task work and waits for `want` CQEs.
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<()> {
        self.stats.enters += 1;
        let res = match timeout {
            Some(t) if want > 0 && self.ladder.ext_arg => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            Some(t) if want > 0 => {
                // No timeout argument (before 5.11, or forced): a timeout op bounds the wait
                // (one per `wait`, however often it enters), removed when `wait` returns if
                // something else woke it first.
                if self.wait_timeout.is_none() {
                    let ts = Box::new(types::Timespec::from(t));
                    let sqe = opcode::Timeout::new(&*ts).build();
                    let ud = self.start_internal(OpKind::Timeout { _ts: ts }, sqe);
                    self.wait_timeout = Some(ud);
                }
                self.ring.submit_and_wait(want)
            }
            _ if want == 0 && self.ladder.defer_taskrun => {
                // Deferred task work runs only on an enter with GETEVENTS, even without waiting.
                let n = self.ring.submission().len() as u32;
                // SAFETY: no argument is passed; the SQEs in the queue obey the ownership rule.
                unsafe { self.ring.submitter().enter::<libc::sigset_t>(n, 0, 1, None) }
            }
            _ => self.ring.submit_and_wait(want),
        };
        enter_result(res)
    }

    /// Before entering the kernel: provide returned legacy buffers, re-arm parked receives whose
    /// group has buffers again, unregister abandoned groups.
    fn flush(&mut self) -> Result<()> {
        if self.cross.in_use() {
            self.take_cross_returns();
        }
        self.flush_provides()?;
        if self.fixed.as_ref().is_some_and(|t| t.has_releases()) {
            self.release_fixed()?;
        }
        if !self.dirty_lanes.is_empty() {
            self.flush_lanes();
        }
        if !self.parked.is_empty() {
            // Snapshot (and clear) which groups got buffers back *before* re-arming: a refill
            // noticed while we re-arm stays set for the next flush instead of being lost. Each
            // refilled group re-arms at most as many parked ops as it has buffers for, oldest
            // first: re-arming every parked op at each refill sent thousands of receives after
            // a few buffers, nearly all of them to fail with ENOBUFS again (a busy loop under
            // load, and no order among the waiting). If some must wait, the group stays
            // refilled, so the next flush (after these ops' completions) re-arms the next ones.
            let mut budgets: Vec<(*const GroupShared, u32)> = self
                .groups
                .iter()
                .filter(|g| g.refilled.replace(false))
                .map(|g| (Rc::as_ptr(g), g.stats().in_kernel.max(1)))
                .collect();
            let parked = std::mem::take(&mut self.parked);
            for key in parked {
                let group = match &self.ops[key].kind {
                    OpKind::Recv { group, .. }
                    | OpKind::Read { group, .. }
                    | OpKind::RecvMsg { group, .. } => group.clone(),
                    _ => unreachable!("only buffer-selecting ops park"),
                };
                match budgets.iter_mut().find(|(g, _)| *g == Rc::as_ptr(&group)) {
                    Some((_, budget)) if *budget > 0 => {
                        *budget -= 1;
                        group.rearms.set(group.rearms.get() + 1);
                        self.arm(key);
                    }
                    Some(_) => {
                        group.refilled.set(true);
                        self.parked.push(key);
                    }
                    None => self.parked.push(key),
                }
            }
        }
        self.reap_groups();
        if !self.send_rings.is_empty() {
            self.reap_send_rings();
        }
        Ok(())
    }

    /// Gives buffers dropped on other threads back to their groups, and keeps the eventfd read
    /// armed so that the next such return wakes a waiting driver.
    fn take_cross_returns(&mut self) {
        for (serial, bid) in self.cross.take() {
            // A group the driver has forgotten is not selected from any more: nothing to do.
            if let Some(g) = self.groups.iter().find(|g| g.serial == serial) {
                g.release(bid);
            }
        }
        if !self.cross_armed && !self.dropping {
            let mut counter = Box::new(0u64);
            let sqe = opcode::Read::new(
                types::Fd(self.cross.wake_fd()),
                (&raw mut *counter).cast::<u8>(),
                8,
            )
            .build();
            self.start_internal(OpKind::Wake { _counter: counter }, sqe);
            self.cross_armed = true;
        }
    }

    fn flush_provides(&mut self) -> Result<()> {
        for gi in 0..self.groups.len() {
            let group = self.groups[gi].clone();
            let max_run = if self.provide_counts == Some(true) {
                u16::MAX
            } else {
                1
            };
            for (bid, n, addr) in group.take_pending_runs(max_run) {
                let sqe =
                    opcode::ProvideBuffers::new(addr, group.buf_size as i32, n, group.bgid, bid)
                        .build();
                let kind = OpKind::Provide {
                    group: group.clone(),
                    first: bid,
                    n: n as u32,
                };
                self.start_internal(kind, sqe);
            }
        }
        Ok(())
    }

    /// Forgets groups whose handle is gone and that no op uses any more.
    fn reap_groups(&mut self) {
        let mut i = 0;
        while i < self.groups.len() {
            let g = &self.groups[i];
            let in_use = !g.handle_alive.get()
                && self
                    .ops
                    .iter()
                    .any(|(_, s)| op_group(&s.kind).is_some_and(|og| Rc::ptr_eq(og, g)));
            if g.handle_alive.get() || in_use {
                i += 1;
                continue;
            }
            let g = self.groups.swap_remove(i);
            g.set_registered(false);
            if g.is_ring() {
                // Nothing selects from the ring any more; the kernel forgets it synchronously.
                if !self.forget_buf_ring(g.bgid) {
                    self.kept_for_kernel.push(Box::new(g));
                }
            } else {
                // Take the provided buffers back before the memory or the id can be reused.
                let sqe = opcode::RemoveBuffers::new(g.count().min(u16::MAX as u32) as u16, g.bgid)
                    .build();
                self.start_internal(OpKind::Remove { group: g }, sqe);
            }
        }
    }

    /// Starts an op of the driver's own (not the user's); returns its user data.
    fn start_internal(&mut self, kind: OpKind, sqe: squeue::Entry) -> u64 {
        let gen = self.next_gen();
        let key = self.ops.insert(OpSlot {
            token: 0,
            gen,
            kind,
            state: SlotState::InKernel,
            cancel: false,
        });
        self.internal += 1;
        let ud = user_data(key, gen);
        self.push(sqe.user_data(ud));
        ud
    }

    /// The final CQE of an internal op arrived.
    fn finish_internal(&mut self, key: usize) {
        self.ops.remove(key);
        self.internal -= 1;
    }

    /// Dispatches every CQE in the completion queue.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqe_buf);
        cqes.clear();
        cqes.extend(self.ring.completion());
        self.stats.cqes += cqes.len() as u64;
        for cqe in &cqes {
            if cqe.user_data() == IGNORED {
                self.cleanup_cqes += 1;
            } else {
                self.dispatch(cqe);
            }
        }
        self.cqe_buf = cqes;
        if !self.unsettled.is_empty() {
            self.settle();
        }
    }

    /// A completion named `bid` of `group` but handed out no bytes (end of file, an error).
    /// Whether the kernel let go of the buffer depends on the kernel and the file: a read on a
    /// pipe at end of file leaves it at the ring head (6.18 does not say so; later kernels set
    /// `F_BUF_MORE`), a read of a regular file consumed it when it started. A legacy group's
    /// buffer is always gone from the kernel; a ring's is settled by asking the kernel.
    fn unused_buffer(&mut self, group: &Rc<GroupShared>, bid: u16, flags: u32) {
        if !group.is_ring() {
            group.put_back_unused(bid);
        } else if flags & sys::IORING_CQE_F_BUF_MORE == 0 {
            self.unsettled.push((group.clone(), bid));
        }
        // With `F_BUF_MORE` the kernel keeps the buffer and fills it further.
    }

    /// A completion handed out `bid` of `group`: the kernel had kept it, so it is settled.
    fn settled_by_take(&mut self, group: &Rc<GroupShared>, bid: u16) {
        self.unsettled
            .retain(|(g, b)| !(Rc::ptr_eq(g, group) && *b == bid));
    }

    /// Decides, for each unsettled buffer, whether the kernel still holds it. The kernel's ring
    /// head is the witness: a buffer at or past it is in the ring and a later completion will
    /// name it. One before it was let go, unless an op of ours on the group is still in flight
    /// (it may have consumed the buffer after the completion that named it, and its own
    /// completion is still to come): then the buffer waits for the group's ops to end. A buffer
    /// never goes back twice; at worst it waits.
    fn settle(&mut self) {
        let fd = self.ring.as_raw_fd();
        let mut pending = std::mem::take(&mut self.unsettled);
        pending.retain(|(group, bid)| {
            if !group.registered() {
                return false; // the kernel forgot the ring: nothing to give back
            }
            match sys::buf_ring_head(fd, group.bgid) {
                Ok(head) if group.ring_holds(*bid, head) => false,
                Ok(_) if group.selecting.get() == 0 => {
                    group.put_back_unused(*bid);
                    false
                }
                Ok(_) => true,
                // No witness: a kernel before 6.8. Those (and every kernel without incremental
                // rings before 6.12) consumed each buffer a completion named, at its selection
                // or its completion, so it is ours again.
                Err(_) => {
                    group.put_back_unused(*bid);
                    false
                }
            }
        });
        pending.append(&mut self.unsettled);
        self.unsettled = pending;
    }

    fn dispatch(&mut self, cqe: &cqueue::Entry) {
        let id = OpId {
            ud: cqe.user_data(),
            driver: self.ring_id,
        };
        if id.ud & fixed::TAG_KEY == fixed::TAG_KEY {
            // The kernel let go of a released fixed buffer slot.
            let released = self
                .fixed
                .as_ref()
                .is_some_and(|t| t.tag_done(id.gen() as u16));
            if !released {
                self.stats.stray_cqes += 1;
            }
            return;
        }
        let key = id.key();
        let (res, flags) = (cqe.result(), cqe.flags());
        let more = cqueue::more(flags);
        let Some(slot) = self.ops.get_mut(key) else {
            // A notification the kernel posted after a result without F_MORE, for an op that
            // has ended (see `SendOp::notif_attempts`): nothing of ours is behind it.
            self.stats.stray_cqes += 1;
            return;
        };
        if let OpKind::Send(op) = &slot.kind {
            let known = if cqueue::notif(flags) {
                op.notif_attempts.contains(&id.gen())
            } else {
                op.cur_ud == id.ud && slot.state == SlotState::InKernel
            };
            if known {
                self.send_completion(key, id.gen(), res, flags);
            } else {
                self.stats.stray_cqes += 1;
            }
            return;
        }
        if slot.gen != id.gen() {
            self.stats.stray_cqes += 1;
            return;
        }
        let token = slot.token;
        let cancelled = slot.cancel;
        if !more {
            if let Some(group) = selecting_group(&slot.kind) {
                group.selecting.set(group.selecting.get() - 1);
            }
        }
        match &mut slot.kind {
            OpKind::Recv { group, mode, .. } => {
                let (group, multishot) = (group.clone(), mode.multishot());
                if let (Some(c), true) = (&mut self.coalescing, res > 0) {
                    c.received(res as usize, group.buf_size as usize);
                }
                self.buffer_completion(key, id, token, &group, res, flags, multishot && !cancelled);
            }
            OpKind::Read { group, .. } => {
                let group = group.clone();
                self.buffer_completion(key, id, token, &group, res, flags, false);
            }
            OpKind::RecvMsg {
                group,
                multishot,
                hdr,
                ..
            } => {
                let (group, rearm) = (group.clone(), *multishot && !cancelled);
                let kernel_multishot = self.ladder.recv == MultishotRung::Kernel && *multishot;
                // A single-shot receive of an empty datagram consumes no buffer (the kernel
                // recycles it) and returns 0, as it does on a socket shut down for reading; the
                // sender's address, which only a datagram has, tells them apart.
                let empty_datagram = res == 0
                    && !kernel_multishot
                    && cqueue::buffer_select(flags).is_none()
                    && hdr.msg.msg_namelen > 0;
                if empty_datagram {
                    let name = hdr.name_bytes();
                    let datagram = Datagram {
                        data: PooledBuf::empty(group.clone()),
                        from: sockaddr_to_std(name),
                        truncated: false,
                    };
                    self.deliver(key, id, token, Event::Datagram(datagram), false, rearm);
                    return;
                }
                match cqueue::buffer_select(flags) {
                    Some(bid) if res >= 0 => {
                        // SAFETY: the kernel wrote `res` bytes into buffer `bid` before posting
                        // this CQE (and, single-shot, the sender's address into `hdr`).
                        let datagram = unsafe {
                            take_datagram(
                                &group,
                                bid,
                                res as u32,
                                hdr,
                                kernel_multishot,
                                &mut self.take_buf,
                            )
                        };
                        if !self.unsettled.is_empty() {
                            self.settled_by_take(&group, bid);
                        }
                        let event = Event::Datagram(datagram);
                        self.deliver(key, id, token, event, cqueue::more(flags), rearm);
                    }
                    _ => self.buffer_completion(key, id, token, &group, res, flags, rearm),
                }
            }
            OpKind::Accept { .. } => {
                let keep = !cancelled && (more || res >= 0 || res == -libc::ECONNABORTED);
                let event = if res >= 0 {
                    // SAFETY: a successful accept returns a new descriptor that we now own.
                    Event::Accepted(Fd::from(unsafe { OwnedFd::from_raw_fd(res) }))
                } else {
                    Event::Error(errno_error("accept", res))
                };
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event,
                    more: keep,
                });
                if keep && !more {
                    self.arm(key);
                } else if !keep && !more {
                    self.ops.remove(key);
                }
            }
            OpKind::Connect { .. } => {
                let event = if res == 0 {
                    Event::Connected
                } else {
                    Event::Error(errno_error("connect", res))
                };
                self.ops.remove(key);
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event,
                    more: false,
                });
            }
            OpKind::Fixed(op) => {
                let (write, buf) = (
                    op.write,
                    op.buf.take().expect("an op in flight owns its buffer"),
                );
                self.ops.remove(key);
                let result = if res >= 0 {
                    Ok(res as usize)
                } else if res == -libc::ECANCELED {
                    Err(Error::Cancelled)
                } else {
                    Err(errno_error(if write { "write" } else { "read" }, res))
                };
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::FixedIo { buf, result },
                    more: false,
                });
            }
            OpKind::Leader(op) => {
                let mut buf = op.buf.take().expect("a leader in flight owns its buffer");
                let members = std::mem::take(&mut op.members);
                self.ops.remove(key);
                let mut result = buf_result(&mut buf, res);
                if (cancelled || self.dropping) && result.is_ok() {
                    // A cancelled group (or a driver going away) starts no members, even if
                    // the read itself finished before the cancel reached it.
                    result = Err(Error::Cancelled);
                }
                self.leader_done(token, id, result, buf, members);
            }
            OpKind::SendBundle { fd, ring } => {
                let (fd, ring) = (fd.clone(), ring.clone());
                self.ops.remove(key);
                ring.in_flight.set(false);
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
                // A bundle cancelled (cancel_fd, the driver going) that finished before the
                // cancel reached it: what it sent is reported, and the sends queued behind it
                // end as cancelled (they stranded in the backlog, never completing).
                let sent = match sent {
                    Ok((pieces, done)) if cancelled || self.dropping => {
                        self.stats.bundle_buffers += pieces as u64;
                        self.report_bundle(done);
                        if ring.sends.borrow().is_empty() {
                            Ok((0, Vec::new()))
                        } else {
                            Err(Error::Cancelled)
                        }
                    }
                    other => other,
                };
                match sent {
                    Ok((pieces, done)) => {
                        self.stats.bundle_buffers += pieces as u64;
                        self.report_bundle(done);
                        if !cancelled
                            && !self.dropping
                            && (ring.fill() || !ring.sends.borrow().is_empty())
                        {
                            self.start_bundle(fd, ring);
                        }
                    }
                    Err(e) => {
                        let raw = e.raw_os_error().unwrap_or(libc::EIO);
                        // Nothing more is sent: the kernel forgets the ring (no op of ours is
                        // in flight on it), then its queued buffers go home.
                        if !self.forget_buf_ring(ring.bgid) {
                            self.kept_for_kernel.push(Box::new(ring.clone()));
                        }
                        self.send_rings.retain(|r| !Rc::ptr_eq(r, &ring));
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
            }
            OpKind::LeaseRead { lease, range, .. } => {
                if res >= 0 && (res as usize) < range.len() {
                    // A short read: zero the rest of the range, so no stale byte comes back.
                    let from = range.start + res as usize;
                    // SAFETY: `from..range.end` lies inside the buffer (checked at submit); the
                    // kernel is done with this range (its final CQE is here), other members
                    // write only their own disjoint ranges, and a read-in lease is never handed
                    // out, so no reference to these bytes exists.
                    unsafe { lease.base_ptr().add(from).write_bytes(0, range.end - from) };
                }
                self.ops.remove(key);
                let result = match res {
                    r if r >= 0 => Ok(r as usize),
                    r if r == -libc::ECANCELED => Err(Error::Cancelled),
                    r => Err(errno_error("read", r)),
                };
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::ReadInto { result },
                    more: false,
                });
            }
            OpKind::LeaseWrite { .. } => {
                self.ops.remove(key);
                let result = match res {
                    r if r >= 0 => Ok(r as usize),
                    r if r == -libc::ECANCELED => Err(Error::Cancelled),
                    r => Err(errno_error("write", r)),
                };
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Written { result },
                    more: false,
                });
            }
            OpKind::Send(_) => unreachable!("sends are dispatched above"),
            OpKind::Provide { group, first, n } => {
                let (group, first, n) = (group.clone(), *first, *n);
                self.finish_internal(key);
                let (taken, counts) = provide_outcome(res, n, self.provide_counts);
                self.provide_counts = counts;
                if taken < n {
                    // The kernel did not take these: queue them again for the next flush.
                    group.provide_failed(first + taken as u16, n - taken);
                }
                if taken > 0 {
                    group.provided(taken);
                    group.refilled.set(true);
                }
            }
            OpKind::Remove { group } => {
                let bgid = group.bgid;
                self.finish_internal(key);
                self.bgid_used[bgid as usize] = false;
            }
            OpKind::Timeout { .. } => {
                self.cleanup_cqes += 1;
                if self.wait_timeout == Some(id.ud) {
                    self.wait_timeout = None; // it fired: nothing to remove
                }
                self.finish_internal(key);
            }
            OpKind::Wake { .. } => {
                // Re-armed at the next flush (which also takes what came back).
                self.finish_internal(key);
                self.cross_armed = false;
            }
        }
    }

    /// A completion of an op that selected a buffer (recv, read).
    #[allow(clippy::too_many_arguments)]
    fn buffer_completion(
        &mut self,
        key: usize,
        id: OpId,
        token: u64,
        group: &Rc<GroupShared>,
        res: i32,
        flags: u32,
        rearm: bool,
    ) {
        let more = cqueue::more(flags);
        if res > 0 {
            let bid = cqueue::buffer_select(flags)
                .expect("a selected-buffer completion names its buffer");
            let mut parts = std::mem::take(&mut self.take_buf);
            parts.clear();
            group.take(
                bid,
                res as u32,
                flags & sys::IORING_CQE_F_BUF_MORE != 0,
                &mut parts,
            );
            if !self.unsettled.is_empty() {
                for &(b, _, _) in &parts {
                    self.settled_by_take(group, b);
                }
            }
            let bufs = parts
                .iter()
                // SAFETY: the kernel wrote these bytes before posting this CQE, and `take` marked
                // the buffers as in user hands, so nothing hands them out again before they drop.
                .map(|&(b, off, len)| unsafe { PooledBuf::new(group.clone(), b, off, len) })
                .collect();
            self.take_buf = parts;
            let event = Event::Data(BufChain::from_bufs(bufs));
            self.deliver(key, id, token, event, more, rearm);
            return;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.unused_buffer(group, bid, flags);
        }
        if res == -libc::ENOBUFS && !more {
            group.enobufs.set(group.enobufs.get() + 1);
            if self.ops[key].cancel {
                self.ops.remove(key);
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Error(Error::Cancelled),
                    more: false,
                });
                return;
            }
            if group.report_exhaustion {
                self.ready.push_back(Completion {
                    token,
                    op: id,
                    event: Event::Error(Error::PoolExhausted { bgid: group.bgid }),
                    more: true,
                });
            }
            self.park(key, group);
            return;
        }
        if more {
            // A multishot op reported a passing condition and goes on.
            return;
        }
        let event = match res {
            0 => Event::Eof,
            r if r == -libc::ECANCELED => Event::Error(Error::Cancelled),
            r => Event::Error(errno_error("recv", r)),
        };
        self.ops.remove(key);
        self.ready.push_back(Completion {
            token,
            op: id,
            event,
            more: false,
        });
    }

    /// Whether parked receives wait to be re-armed on groups that have buffers for them.
    fn rearm_pending(&self) -> bool {
        !self.parked.is_empty() && self.groups.iter().any(|g| g.refilled.get())
    }

    /// Delivers an event that carries received buffers. After the op's last CQE (`!more`), a
    /// receive that must go on (`rearm`: multishot mode on a single-shot rung) is armed again,
    /// any other is forgotten.
    fn deliver(&mut self, key: usize, id: OpId, token: u64, event: Event, more: bool, rearm: bool) {
        let keep = more || rearm;
        self.ready.push_back(Completion {
            token,
            op: id,
            event,
            more: keep,
        });
        if !more {
            if keep {
                self.arm(key);
            } else {
                self.ops.remove(key);
            }
        }
    }

    /// The op's group ran dry: grow it if allowed, else wait for buffers to come back.
    fn park(&mut self, key: usize, group: &Rc<GroupShared>) {
        self.ops[key].state = SlotState::Parked;
        self.parked.push(key);
        if let Ok(Some((first, n))) = group.grow() {
            group.fill(first, n);
        }
        // Buffers may have come back between the kernel's ENOBUFS and now; then re-arm at once.
        if group.stats().in_kernel > 0 {
            group.refilled.set(true);
        }
    }

    fn finish_parked(&mut self, key: usize, event: Event) {
        self.parked.retain(|&k| k != key);
        let slot = self.ops.remove(key);
        self.ready.push_back(Completion {
            token: slot.token,
            op: OpId::new(key, slot.gen, self.ring_id),
            event,
            more: false,
        });
    }
}

/// The datagram of a `RECVMSG` completion that used `res` bytes of buffer `bid`: the payload as a
/// pooled buffer (behind the kernel's header and the address, for multishot receives), the
/// sender, and whether it was cut short.
///
/// # Safety
/// The kernel must have written those bytes (their completion was reaped), and `bid` must not be
/// handed out elsewhere (the completion gave it to us).
unsafe fn take_datagram(
    group: &Rc<GroupShared>,
    bid: u16,
    res: u32,
    hdr: &MsgHeader,
    multishot: bool,
    scratch: &mut Vec<(u16, u32, u32)>,
) -> Datagram {
    scratch.clear();
    group.take(bid, res, false, scratch);
    debug_assert_eq!(scratch.len(), 1, "a datagram is one buffer");
    let (offset, len, from, truncated) = if multishot {
        // SAFETY: `res` bytes of buffer `bid` were written by the kernel (the caller's
        // contract), and no one else reads or writes them until the buffer goes home.
        let used = unsafe { std::slice::from_raw_parts(group.buf_ptr(bid), res as usize) };
        match types::RecvMsgOut::parse(used, &hdr.msg) {
            Ok(out) => {
                let offset = out.payload_data().as_ptr() as usize - used.as_ptr() as usize;
                let from = sockaddr_to_std(out.name_data());
                (
                    offset as u32,
                    out.payload_data().len() as u32,
                    from,
                    out.is_payload_truncated(),
                )
            }
            // Shorter than the header the kernel always writes: nothing to hand out.
            Err(()) => (0, 0, None, false),
        }
    } else {
        let truncated = hdr.msg.msg_flags & libc::MSG_TRUNC != 0;
        (0, res, sockaddr_to_std(hdr.name_bytes()), truncated)
    };
    // SAFETY: `offset + len <= res`, inside the buffer the kernel filled (the caller's contract);
    // `take` marked it as in user hands.
    let data = unsafe { PooledBuf::new(group.clone(), bid, offset, len) };
    Datagram {
        data,
        from,
        truncated,
    }
}

/// A socket address the kernel wrote (`sockaddr_in` or `sockaddr_in6` bytes), as std's type.
fn sockaddr_to_std(name: &[u8]) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    if name.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([name[0], name[1]]) as i32;
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match family {
        libc::AF_INET if name.len() >= std::mem::size_of::<libc::sockaddr_in>() => {
            let ip = Ipv4Addr::new(name[4], name[5], name[6], name[7]);
            Some(SocketAddrV4::new(ip, port(name)).into())
        }
        libc::AF_INET6 if name.len() >= std::mem::size_of::<libc::sockaddr_in6>() => {
            let flowinfo = u32::from_ne_bytes(name[4..8].try_into().expect("4 bytes"));
            let ip: [u8; 16] = name[8..24].try_into().expect("16 bytes");
            let scope = u32::from_ne_bytes(name[24..28].try_into().expect("4 bytes"));
            Some(SocketAddrV6::new(Ipv6Addr::from(ip), port(name), flowinfo, scope).into())
        }
        _ => None,
    }
}

/// A socket address in the form `sendmsg` takes.
pub(crate) fn sockaddr(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A fixed buffer's range must lie inside it (every send path checks before it queues).
fn check_send_range(buf: &SendBuf) -> Result<()> {
    match buf {
        SendBuf::Fixed { buf, range } if range.start > range.end || range.end > buf.len() => {
            Err(Error::InvalidArgument {
                what: "send range outside the registered buffer",
            })
        }
        _ => Ok(()),
    }
}

fn errno_error(op: &'static str, res: i32) -> Error {
    if res == -libc::ECANCELED {
        Error::Cancelled
    } else {
        Error::from_errno(op, res)
    }
}

/// An `io_uring_enter`'s outcome: timeouts, interruptions and a busy or full ring are not
/// errors (the caller's loop goes on).
fn enter_result(res: std::io::Result<usize>) -> Result<()> {
    match res {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::Os {
            op: "io_uring_enter",
            source: e,
        }),
    }
}

fn is_incremental(g: &GroupShared) -> bool {
    matches!(&g.backing, crate::pool::Backing::Ring(r) if r.incremental)
}

/// A read-in group has only `read_into` members whose ranges lie inside the buffer and do not
/// overlap; other groups have none.
fn check_read_in(members: &[Member], len: usize) -> Result<()> {
    let read_in = members.iter().filter(|m| m.is_read_into()).count();
    if read_in == 0 {
        return Ok(());
    }
    if read_in != members.len() {
        return Err(Error::InvalidArgument {
            what: "a read-in lease has only read_into members: nobody may read bytes being written",
        });
    }
    let mut ranges: Vec<_> = members
        .iter()
        .filter_map(|m| match &m.kind {
            MemberKind::ReadInto { range, .. } => Some(range.clone()),
            _ => None,
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let inside = ranges.iter().all(|r| r.start <= r.end && r.end <= len);
    let disjoint = ranges.windows(2).all(|w| w[0].end <= w[1].start);
    if !inside || !disjoint {
        return Err(Error::InvalidArgument {
            what: "read_into ranges must lie inside the buffer and must not overlap",
        });
    }
    Ok(())
}

/// A leader read's result; after a short read, zeroes the rest of `buf` so no stale bytes can
/// be seen through the lease.
fn buf_result(buf: &mut FixedBuf, res: i32) -> Result<usize> {
    if res < 0 {
        return Err(if res == -libc::ECANCELED {
            Error::Cancelled
        } else {
            errno_error("lease leader read", res)
        });
    }
    let n = res as usize;
    buf[n..].fill(0);
    Ok(n)
}

/// Page-aligned memory for a [`FixedBuf`] of `len` bytes.
fn fixed_mem(len: usize) -> Result<sys::Mmap> {
    if len == 0 || len > MAX_FIXED_LEN {
        return Err(Error::InvalidArgument {
            what: "a registered buffer must hold between 1 byte and 1 GiB",
        });
    }
    sys::Mmap::anonymous(len).map_err(Error::os("allocating registered memory"))
}

fn op_fd(kind: &OpKind) -> Option<&Fd> {
    match kind {
        OpKind::Recv { fd, .. }
        | OpKind::Read { fd, .. }
        | OpKind::RecvMsg { fd, .. }
        | OpKind::Accept { fd }
        | OpKind::Connect { fd, .. } => Some(fd),
        OpKind::Send(op) => op.fd.as_ref(),
        OpKind::Fixed(op) => Some(&op.fd),
        OpKind::Leader(op) => Some(&op.fd),
        OpKind::LeaseWrite { fd, .. }
        | OpKind::LeaseRead { fd, .. }
        | OpKind::SendBundle { fd, .. } => Some(fd),
        _ => None,
    }
}

/// What a `PROVIDE_BUFFERS` of `n` buffers that completed with `res` did: how many of the run
/// (from its first bid) the kernel took, and what the result says of this kernel (`counts`:
/// whether results count the buffers taken). The kernel adds a run's buffers in order and
/// stops at the first it cannot allocate for; 5.x kernels return how many it added, later ones
/// 0 for "at least one". A 0 for a run of several is taken as all of it: the safe direction,
/// since a buffer provided twice could be handed to two receives at once, while one missing
/// only waits (runs are sent only to kernels that count, where a 0 does not happen).
fn provide_outcome(res: i32, n: u32, counts: Option<bool>) -> (u32, Option<bool>) {
    match res {
        r if r < 0 => (0, counts),
        0 => (n, if n == 1 { Some(false) } else { counts }),
        r => ((r as u32).min(n), Some(true)),
    }
}

/// The group an op selects buffers from in the kernel (receives and reads).
fn selecting_group(kind: &OpKind) -> Option<&Rc<GroupShared>> {
    match kind {
        OpKind::Recv { group, .. } | OpKind::Read { group, .. } | OpKind::RecvMsg { group, .. } => {
            Some(group)
        }
        _ => None,
    }
}

fn op_group(kind: &OpKind) -> Option<&Rc<GroupShared>> {
    match kind {
        OpKind::Recv { group, .. }
        | OpKind::Read { group, .. }
        | OpKind::RecvMsg { group, .. }
        | OpKind::Provide { group, .. }
        | OpKind::Remove { group } => Some(group),
        _ => None,
    }
}

impl Drop for Driver {
    /// Cancels every op and waits (up to 5 s) for their final CQEs. Memory of ops whose CQE never
    /// came is leaked on purpose: the kernel may still write to it.
    fn drop(&mut self) {
        self.dropping = true;
        let parked: Vec<usize> = std::mem::take(&mut self.parked);
        for key in parked {
            self.ops.remove(key);
        }
        // One cancel per op (works on every kernel, unlike CANCEL_ANY, which needs 5.19).
        self.cancel_where(|_| true);
        let deadline = Instant::now() + Duration::from_secs(5);
        let busy = |ops: &Slab<OpSlot>| {
            ops.iter()
                .any(|(_, s)| !matches!(s.kind, OpKind::Timeout { .. }))
        };
        while busy(&self.ops) && Instant::now() < deadline {
            // Internal ops (provides, removes) finish on their own; user ops were cancelled.
            if self.enter(1, Some(Duration::from_millis(50))).is_err() {
                break;
            }
            self.reap();
            self.ready.clear();
        }
        // Timeout ops of timed waits (kernels without EXT_ARG) were each asked to go away right
        // after their wait; collect those last CQEs.
        while !busy(&self.ops) && !self.ops.is_empty() && Instant::now() < deadline {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap();
        }
        if let Some(table) = &self.fixed {
            // This ring's registrations go with its close; in a shared table they stay in the
            // other rings (once no ring is left, released memory is freed at once).
            table.remove_ring(self.ring_id);
        }
        // Rings the kernel would not forget: their memory stays where the kernel may look.
        std::mem::forget(std::mem::take(&mut self.kept_for_kernel));
        if !self.ops.is_empty() {
            // The kernel still holds these ops: leak their memory rather than free it under it.
            LEAKED_OPS.fetch_add(self.ops.len(), std::sync::atomic::Ordering::Relaxed);
            std::mem::forget(std::mem::take(&mut self.ops));
            std::mem::forget(std::mem::take(&mut self.groups));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of `sockaddr(a)`, as the kernel writes a sender's address.
    fn wire(a: std::net::SocketAddr) -> Vec<u8> {
        let (storage, len) = sockaddr(a);
        // SAFETY: `storage` is plain bytes, at least `len` long.
        unsafe { std::slice::from_raw_parts((&raw const storage).cast::<u8>(), len as usize) }
            .to_vec()
    }

    #[test]
    fn provide_results_count_what_the_kernel_took() {
        // Single buffers until the kernel tells its kind of result.
        assert_eq!(provide_outcome(0, 1, None), (1, Some(false)));
        assert_eq!(provide_outcome(1, 1, None), (1, Some(true)));
        // A counting kernel that ran out part-way: the rest is provided again.
        assert_eq!(provide_outcome(3, 8, Some(true)), (3, Some(true)));
        assert_eq!(provide_outcome(8, 8, Some(true)), (8, Some(true)));
        // Nothing taken.
        assert_eq!(
            provide_outcome(-libc::ENOMEM, 4, Some(true)),
            (0, Some(true))
        );
        assert_eq!(provide_outcome(-libc::ENOMEM, 1, None), (0, None));
        // An ambiguous 0 for a run is never taken as "none" (that would provide twice).
        assert_eq!(provide_outcome(0, 4, Some(true)), (4, Some(true)));
    }

    #[test]
    fn sender_addresses_read_back_as_written_for_both_families() {
        for a in [
            "127.0.0.1:9",
            "10.1.2.3:65535",
            "[::1]:443",
            "[fe80::1%3]:80",
        ] {
            let a: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(sockaddr_to_std(&wire(a)), Some(a));
        }
    }

    #[test]
    fn a_short_or_foreign_address_is_none() {
        let v4 = wire("127.0.0.1:9".parse().unwrap());
        assert_eq!(sockaddr_to_std(&v4[..8]), None, "cut short");
        assert_eq!(sockaddr_to_std(&[]), None);
        let mut unix = v4.clone();
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(sockaddr_to_std(&unix), None);
    }
}
