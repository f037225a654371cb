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

// One file per capability: each holds its ops' start, SQE building and completion handling.
mod cancel;
mod fixed_io;
mod fixed_table;
mod group;
mod lease;
mod op;
mod recv;
mod send;
mod send_ring;
mod socket;
mod submit;
mod udp;

use group::is_incremental;
use op::Done;
use send::check_send_range;
use udp::sockaddr_to_std;

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

fn errno_error(op: &'static str, res: i32) -> Error {
    if res == -libc::ECANCELED {
        Error::Cancelled
    } else {
        Error::from_errno(op, res)
    }
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
