//! The ring driver: owns one io_uring, an op table, and every byte of memory the kernel may touch.
//!
//! # The ownership rule
//! From the moment an SQE that names memory is pushed until the op's **last** CQE (the one without
//! `IORING_CQE_F_MORE`), that memory is owned by the op's slot in the driver's table, not by the
//! user. Cancelling an op only asks the kernel to stop: the slot, and what it owns, is freed when
//! the final CQE arrives. Dropping the driver cancels everything and waits for those CQEs; memory
//! whose CQE never came is leaked, never freed under the kernel.
//!
//! Everything that enforces the rule is in this module: an SQE names memory only when the op's
//! slot owns it (each capability's payload type in [`OpKind`]), one function pushes
//! SQEs (`submit.rs`), a slot is freed only at its op's final CQE (each capability's completion
//! handler), and `Drop for Driver` leaks what the kernel never gave back ([`leaked_ops`]).
//!
//! # Layout
//! The ring loop and the op lifecycle are apart from what each kind of op does; a capability's
//! kernel code (its ops' start, SQE and completions) is one file:
//!
//! - `mod.rs`: [`Driver`] (its fields grouped by capability), [`DriverConfig`],
//!   [`DriverStats`], [`Fd`], [`Event`], [`Completion`], setting the ring up, `Drop`.
//! - `op.rs`: an op's life in the table: [`OpId`], `user_data`, `OpSlot`, `SlotState`,
//!   `OpKind` (whose variants wrap the capabilities' payload types), starting ops.
//! - `submit.rs`: the ring loop: `push` (the one place SQEs enter the ring, with its safety
//!   argument), enter, submit, wait, flush, reap, and the two routers, `arm` (an op's SQE) and
//!   `dispatch` (a CQE to its capability's handler).
//! - `recv.rs`: stream receives and reads selecting buffers; `-ENOBUFS` parking and re-arming.
//! - `group.rs`: buffer groups with the kernel: creation, registration, legacy provides,
//!   buffers given back on other threads, settling buffers named without bytes, forgetting.
//! - `udp.rs`: datagram receives (`RECVMSG`); socket addresses.
//! - `socket.rs`: accept, connect.
//! - `fixed.rs`: the fixed buffer table: registered memory, tags, a table shared by rings.
//! - `fixed_io.rs`: reads and writes on registered memory, vectored or not.
//! - `send.rs`: sends: lanes of linked chains, plain and zero-copy, results, notifications.
//! - `send_ring.rs`: send rings and send bundles.
//! - `lease.rs`: lease groups: the leader and its members.
//! - `pipe_lease.rs`: pages leases: splice, tee and splice through pooled pipes.
//! - `cancel.rs`: cancel by id, descriptor, token, or all.
//!
//! The capabilities' state that needs no kernel lives beside the driver: `crate::pool` (groups),
//! `crate::fixed` (the table), `crate::zc` (the zero-copy policy), `crate::lease`,
//! `crate::pages` (pipes), `crate::send_ring`.
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

mod cancel;
mod fixed;
mod fixed_io;
mod group;
mod inline;
mod lease;
mod op;
mod pipe_lease;
mod recv;
mod ring;
mod send;
mod send_ring;
mod socket;
mod splice;
mod submit;
mod udp;
mod zcrx;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use slab::Slab;

use crate::buf::{BufChain, Datagram, SendBuf};
use crate::coalesce::Coalescing;
use crate::error::{Error, Result};
use crate::fixed::{FixedBuf, FixedTable, MAX_FIXED_SLOTS};
use crate::lease::{Lease, ReturnQueue};
use crate::pool::{CrossReturns, GroupShared};
use crate::probe::{Features, Force, Ladder};
use crate::send_ring::SendRingShared;
use crate::sys;
use crate::zc::{LaneMap, ZcConfig, ZcStats};

pub use op::OpId;
use op::{OpKind, OpSlot};
pub use recv::RecvMode;
use ring::{Cqe, Ring};
use send::SendOp;
pub(crate) use udp::sockaddr;

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
    zcrx: bool,
    max_pipes: usize,
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
            zcrx: false,
            max_pipes: usize::MAX,
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

    /// Sets the ring up for zero-copy receive (default: off): 32-byte completions and
    /// `DEFER_TASKRUN`, which [`Driver::zcrx_area`] needs. Completions then take twice the
    /// memory, so only rings that receive this way should ask.
    ///
    /// # Examples
    /// ```
    /// let driver = ringpool::Driver::new(ringpool::DriverConfig::default().zero_copy_receive(true))?;
    /// # drop(driver);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn zero_copy_receive(mut self, on: bool) -> Self {
        self.zcrx = on;
        self
    }

    /// At most `n` pipes held at once by pages leases and splice streams (default: no bound
    /// but the descriptor limit; each pipe is two descriptors and up to its size in page
    /// references). A splice stream whose chunk finds none waits until one comes home
    /// (backpressure, as with a pipe that cannot be opened while others are in use); a pages
    /// lease that cannot have its pipes fails at its start, as before.
    ///
    /// # Examples
    /// ```
    /// let driver = ringpool::Driver::new(ringpool::DriverConfig::default().max_pipes(64))?;
    /// # drop(driver);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn max_pipes(mut self, n: usize) -> Self {
        self.max_pipes = n.max(1);
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
    /// A pages lease group ([`Driver::lease`] with [`LeaseBacking::Pages`]) is over: its
    /// leader failed or lent nothing, or its last member finished; its pipes are drained and
    /// back in the driver's pool. Carries the group's token.
    ///
    /// [`LeaseBacking::Pages`]: crate::LeaseBacking::Pages
    PagesReturned,
    /// Bytes of a [`Driver::splice_stream`] reached its sink, in order (more follow).
    Spliced {
        /// How many.
        bytes: usize,
    },
    /// A [`Member::write`] finished.
    ///
    /// [`Member::write`]: crate::Member::write
    Written {
        /// Bytes written, or why not.
        result: Result<usize>,
    },
    /// Bytes arrived through a zero-copy receive ([`Driver::recv_zc`]): one buffer of the
    /// area, in order.
    ZcrxData(crate::ZcrxBuf),
    /// A limited receive ([`Driver::recv_zc_limited`]) took all the bytes it was allowed: its
    /// last completion. Start another for more.
    LimitReached,
    /// A [`Member::read_into`] finished.
    ///
    /// [`Member::read_into`]: crate::Member::read_into
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
    /// Splices and tees the driver ran itself instead of as SQEs ([`Ladder::inline_splice`]).
    pub inline_steps: u64,
    /// Sends that left in the `sendmsg` of the send before them in their lane
    /// ([`Ladder::merge_sends`]) instead of an SQE of their own.
    pub merged_sends: u64,
}

/// Owns an io_uring and everything the kernel may touch through it: nothing the kernel may
/// still read or write is freed, reused or handed out before the op's final completion (the
/// ownership rule, stated in full in `driver/mod.rs` and docs/ARCHITECTURE.md).
pub struct Driver {
    // The ring and what every capability shares (declared first, so the ring closes before
    // the fields below are dropped).
    ring: Ring,
    ladder: Ladder,
    /// Names this ring in shared tables, and the ring that made a group or send ring.
    ring_id: u64,
    stats: DriverStats,
    /// Set by `Drop`: no new op may start from a completion (lease members).
    dropping: bool,

    // The op table and the completion loop (`op.rs`, `submit.rs`).
    ops: Slab<OpSlot>,
    gen: u32,
    /// Slots of internal ops (provides, removes, timeouts) and of sends waiting only for their
    /// notifications: not counted in `in_flight`.
    internal: usize,
    ready: VecDeque<Completion>,
    cqe_buf: Vec<Cqe>,
    /// The timeout op bounding the current `wait` (kernels without `EXT_ARG`): armed once per
    /// `wait`, removed when it returns.
    wait_timeout: Option<u64>,
    /// CQEs of the driver's own bookkeeping (timeout ops and their removal, cancels), which
    /// must not end a wait on their own.
    cleanup_cqes: u64,
    /// Receive coalescing, if configured ([`DriverConfig::receive_coalescing`]).
    coalescing: Option<Coalescing>,

    // Buffer groups and the receives that select from them (`group.rs`, `recv.rs`, `udp.rs`).
    groups: Vec<Rc<GroupShared>>,
    bgid_used: Vec<bool>,
    /// Where the search for a free group id starts: the id after the last one handed out, so
    /// ids are reused only after every other one was (see [`Driver::fresh_bgid`]).
    bgid_next: usize,
    /// Receives parked on a dry group, oldest first.
    parked: Vec<usize>,
    take_buf: Vec<(u16, u32, u32)>,
    /// Buffers of ring groups that a completion named without handing out bytes, until the
    /// driver knows whether the kernel kept them in the ring or let go ([`Driver::settle`]).
    unsettled: Vec<(Rc<GroupShared>, u16)>,
    /// Whether this kernel's `PROVIDE_BUFFERS` result counts the buffers it took (5.x) or is 0
    /// for "at least one" (later kernels); `None` until a completion told. Runs of buffers are
    /// provided only where the count comes back, so no buffer ever drops out of circulation.
    provide_counts: Option<bool>,
    /// Buffers given back on other threads (dropped `Bytes`), and whether the read of its
    /// eventfd is armed.
    cross: Arc<CrossReturns>,
    cross_armed: bool,
    /// Memory of rings the kernel refused to forget: never freed (leaked with the driver).
    kept_for_kernel: Vec<Box<dyn std::any::Any>>,

    // Sends (`send.rs`) and send rings (`send_ring.rs`).
    /// Send lanes by socket (`Rc` address of the descriptor).
    lanes: LaneMap,
    /// Send ops ready for reuse (their iovec vectors keep their capacity). Boxed on purpose:
    /// the box is the allocation a new send reuses.
    #[allow(clippy::vec_box)]
    spare_sends: Vec<Box<SendOp>>,
    /// The iovecs of the sends that ride in a merged `sendmsg`, gathered before they join its
    /// first send's (reused).
    merge_iov: Vec<libc::iovec>,
    /// Lanes with sends to start.
    dirty_lanes: Vec<usize>,
    /// Sweep lanes of gone sockets when the map grows past this.
    lane_sweep_at: usize,
    zc_cfg: ZcConfig,
    zc_stats: ZcStats,
    /// Whether the last lane to learn anything found zero-copy copied (seeds new lanes).
    zc_backing_off: bool,
    /// Send rings, until their handle is gone and nothing of theirs is in flight.
    send_rings: Vec<Rc<SendRingShared>>,

    // Registered memory (`fixed.rs`, `fixed_io.rs`) and leases (`lease.rs`).
    /// The fixed buffer table, once registered memory was asked for (shared with other rings of
    /// this thread after [`Driver::share_fixed_table`]).
    fixed: Option<Rc<FixedTable>>,
    fixed_slots: u32,
    /// Buffers of leases whose last holder let go, for [`Event::LeaseReturned`].
    lease_returns: ReturnQueue,

    // Zero-copy receive (`zcrx.rs`).
    /// Areas registered with this ring (they live as long as it does).
    zcrx_areas: Vec<Rc<crate::zcrx::ZcrxShared>>,
    /// Zero-copy receives paused on a full area, oldest first.
    zcrx_parked: Vec<usize>,
    /// Whether the config asked for a ring zero-copy receive can use.
    zcrx_asked: bool,
    /// Pages leases: the pipe pool, groups that ended, sinks' lines (`pipe_lease.rs`).
    pages: pipe_lease::PagesState,
}

/// Sets up the ring. Under a finite `RLIMIT_MEMLOCK`, `ENOMEM` is retried for up to 500 ms:
/// the kernel releases a closed ring's locked-memory charge only when its teardown work has
/// run, and the feature probe of this very process (`Features::get`, run just before) has
/// just closed several rings, which would otherwise take a tight limit's room.
fn build_ring<C: io_uring::cqueue::EntryMarker>(
    builder: &io_uring::Builder<io_uring::squeue::Entry, C>,
    entries: u32,
) -> std::io::Result<IoUring<io_uring::squeue::Entry, C>> {
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

/// Checks `config`, chooses the rungs (the probed features, `RINGPOOL_FORCE` unless ignored,
/// the config's forced rungs) and sets up the ring on them.
fn setup(config: &DriverConfig) -> Result<(Ring, Ladder)> {
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
    let mut ladder = Ladder::choose(features, &force);
    // A splice the driver makes itself to a socket or pipe whose reader is gone raises SIGPIPE
    // in its thread (an io-wq worker's is never delivered): only where the process ignores it.
    ladder.inline_splice &= crate::sys::sigpipe_ignored();
    let refused = |e| setup_refused(e, entries, cq, features);
    // Zero-copy receive needs 32-byte completions, and DEFER_TASKRUN (without it, the ring
    // stays narrow and `zcrx_area` says why).
    let ring = if config.zcrx && ladder.defer_taskrun {
        let mut builder = IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry32>::builder();
        builder.setup_cqsize(cq).setup_clamp();
        builder.setup_single_issuer().setup_defer_taskrun();
        Ring::Wide(build_ring(&builder, entries).map_err(refused)?)
    } else {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq).setup_clamp();
        if ladder.defer_taskrun {
            builder.setup_single_issuer().setup_defer_taskrun();
        }
        Ring::Narrow(build_ring(&builder, entries).map_err(refused)?)
    };
    Ok((ring, ladder))
}

/// Ids of rings in shared fixed buffer tables.
static NEXT_RING_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Driver {
    /// Sets up an io_uring with `SINGLE_ISSUER|DEFER_TASKRUN` where the kernel has it.
    pub fn new(config: DriverConfig) -> Result<Driver> {
        let (ring, ladder) = setup(&config)?;
        Ok(Driver {
            ring,
            ladder,
            ring_id: NEXT_RING_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            stats: DriverStats::default(),
            dropping: false,
            ops: Slab::with_capacity(64),
            gen: 0,
            internal: 0,
            ready: VecDeque::new(),
            cqe_buf: Vec::with_capacity(256),
            wait_timeout: None,
            cleanup_cqes: 0,
            coalescing: Coalescing::new(config.coalesce),
            groups: Vec::new(),
            bgid_used: vec![false; 1 << 16],
            bgid_next: 0,
            parked: Vec::new(),
            take_buf: Vec::new(),
            unsettled: Vec::new(),
            provide_counts: None,
            cross: Arc::new(CrossReturns::new()?),
            cross_armed: false,
            kept_for_kernel: Vec::new(),
            lanes: LaneMap::default(),
            spare_sends: Vec::new(),
            merge_iov: Vec::new(),
            dirty_lanes: Vec::new(),
            lane_sweep_at: 1024,
            zc_cfg: config.zc,
            zc_stats: ZcStats::default(),
            zc_backing_off: false,
            send_rings: Vec::new(),
            fixed: None,
            fixed_slots: config.fixed_slots,
            lease_returns: ReturnQueue::default(),
            zcrx_areas: Vec::new(),
            zcrx_parked: Vec::new(),
            zcrx_asked: config.zcrx,
            pages: pipe_lease::PagesState::with_max_pipes(config.max_pipes),
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
}

impl Drop for Driver {
    /// Cancels every op and waits (up to 5 s) for their final CQEs. Memory of ops whose CQE never
    /// came is leaked on purpose: the kernel may still write to it.
    fn drop(&mut self) {
        self.dropping = true;
        let mut parked: Vec<usize> = std::mem::take(&mut self.parked);
        parked.append(&mut self.zcrx_parked);
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
            // Steps the driver runs itself end here (cancelled, without their call).
            self.run_inline_steps();
            if !busy(&self.ops) {
                break;
            }
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
        for area in &self.zcrx_areas {
            // The ring's close takes the kernel's instance with it: buffers dropped later
            // have no queue to go back to.
            area.orphaned.set(true);
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
