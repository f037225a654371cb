//! What the running kernel can do, detected once and cached, and the rung of the fallback
//! ladder each capability will use.
//!
//! Detection asks the kernel, not the version number: opcodes through `IORING_REGISTER_PROBE`,
//! buffer rings and incremental rings by registering one, multishot recv and accept by running
//! one on a loopback socket. [`Features::get`] runs the probe once per process.
//!
//! The ladder ([`Ladder`]) is chosen once from the features and from forced rungs: the
//! `RINGPOOL_FORCE` environment variable (a comma-separated list of [`Force`] names) or
//! [`crate::DriverConfig::force`]. Forcing a rung lets the tests run every fallback path on a new
//! kernel.

use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::error::{Error, Result};
use crate::sys::{self, KernelVersion, Memlock, Mmap};

/// What the running kernel supports, as measured by the probe.
///
/// # Examples
/// ```
/// let f = ringpool::Features::get();
/// println!("kernel {} buffer rings: {}", f.kernel, f.buf_ring);
/// ```
#[derive(Debug, Clone)]
pub struct Features {
    /// The running kernel.
    pub kernel: KernelVersion,
    /// io_uring itself works (setup succeeded).
    pub io_uring: bool,
    /// Why the probe's own ring could not be set up (the errno of `io_uring_setup`), when
    /// `io_uring` is false: `ENOSYS` (no io_uring), `EPERM` (disabled by
    /// `kernel.io_uring_disabled` or a seccomp filter), `ENOMEM` (`RLIMIT_MEMLOCK`).
    pub setup_errno: Option<i32>,
    /// Opcodes the kernel reports as supported (index = opcode).
    pub opcodes: Vec<bool>,
    /// `io_uring_params.features` bits.
    pub feature_bits: u32,
    /// `IORING_OP_PROVIDE_BUFFERS` (5.7).
    pub provide_buffers: bool,
    /// Provided buffer rings (5.19).
    pub buf_ring: bool,
    /// Incrementally consumed buffer rings, `IOU_PBUF_RING_INC` (6.12).
    pub buf_ring_incremental: bool,
    /// Send/recv bundles (6.10).
    pub bundle: bool,
    /// Multishot recv (6.0).
    pub recv_multishot: bool,
    /// Multishot accept (5.19).
    pub accept_multishot: bool,
    /// `IORING_OP_SEND_ZC` (6.0).
    pub send_zc: bool,
    /// `IORING_OP_SENDMSG_ZC` (6.1).
    pub sendmsg_zc: bool,
    /// `IORING_SEND_ZC_REPORT_USAGE` (6.2): notifications say whether the kernel copied.
    pub zc_report_usage: bool,
    /// A sparse fixed buffer table updated slot by slot with tags (5.19).
    pub fixed_buffers: bool,
    /// `IORING_OP_READV_FIXED`/`WRITEV_FIXED` (6.15).
    pub vectored_fixed: bool,
    /// Registered buffers cloned slot by slot into another ring's table
    /// (`IORING_REGISTER_CLONE_BUFFERS` with offsets and `DST_REPLACE`, 6.13).
    pub clone_buffers: bool,
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (6.1).
    pub defer_taskrun: bool,
    /// `io_uring_enter` with a timeout argument (5.11).
    pub ext_arg: bool,
    /// How much memory this process may register.
    pub memlock: Memlock,
    /// `IORING_OP_RECV_ZC` (6.15): zero-copy receive from a NIC queue.
    pub zcrx: bool,
    /// Whether a device-less zero-copy receive area (`ZCRX_REG_NODEV`, 7.1) registers here.
    pub zcrx_device_less: ZcrxProbe,
}

/// What registering a device-less zero-copy receive area did when the probe tried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZcrxProbe {
    /// It registered.
    Works,
    /// The kernel refused this process (`EPERM`: registering needs `CAP_NET_ADMIN`).
    NoCapNetAdmin,
    /// The kernel has no device-less mode (before 7.1) or no zero-copy receive at all.
    NotInKernel,
}

static FEATURES: OnceLock<Features> = OnceLock::new();

impl Features {
    /// The probed features, detected on first call and cached for the life of the process.
    ///
    /// # Examples
    /// ```
    /// assert!(ringpool::Features::get().io_uring);
    /// ```
    pub fn get() -> &'static Features {
        FEATURES.get_or_init(detect)
    }

    /// Whether `opcode` is supported.
    ///
    /// # Examples
    /// ```
    /// let f = ringpool::Features::get();
    /// assert!(f.opcode(io_uring::opcode::Nop::CODE));
    /// ```
    pub fn opcode(&self, opcode: u8) -> bool {
        self.opcodes.get(opcode as usize).copied().unwrap_or(false)
    }

    /// Whether a send cancelled after it sent some bytes completes with their count, as 6.1
    /// and later do (a send waiting for room is polled, and its cancel reports the bytes it
    /// sent before). 5.10 does not: a send that waited twice finishes in an io-wq worker
    /// blocked in `sendmsg`, and a cancel ends it with `ECANCELED` whatever it had sent (seen
    /// in the 5.10 guest of the kernel matrix). Not probed (it takes a blocked send and a
    /// cancel racing it): the oldest release measured to report, 6.1, and later ones.
    ///
    /// # Examples
    /// ```
    /// let f = ringpool::Features::get();
    /// assert_eq!(f.cancelled_send_reports_progress(), (f.kernel.major, f.kernel.minor) >= (6, 1));
    /// ```
    pub fn cancelled_send_reports_progress(&self) -> bool {
        (self.kernel.major, self.kernel.minor) >= (6, 1)
    }

    /// Whether a bundle recv whose `len` ends inside a buffer stops at that buffer: the kernel
    /// cuts the buffer that would pass `len`, and where the cut is not the first buffer this
    /// kernel drops it and does not retry the bundle, so `len = n × buf_size + 1` takes at
    /// most `n` buffers. Measured on 6.18 (3 × 4096 + 1 took exactly 3; a `len` of exactly
    /// 3 × 4096 was retried and took 31); older bundle kernels are not known to drop the cut
    /// piece, so a limit there asks one buffer less
    /// ([`Driver::recv_bundle_limited`](crate::Driver::recv_bundle_limited)).
    ///
    /// # Examples
    /// ```
    /// let f = ringpool::Features::get();
    /// assert_eq!(f.bundle_stops_at_a_cut_buffer(), (f.kernel.major, f.kernel.minor) >= (6, 18));
    /// ```
    pub fn bundle_stops_at_a_cut_buffer(&self) -> bool {
        (self.kernel.major, self.kernel.minor) >= (6, 18)
    }
}

fn detect() -> Features {
    let kernel = KernelVersion::current();
    let memlock = Memlock::current();
    let mut f = Features {
        kernel,
        io_uring: false,
        setup_errno: None,
        opcodes: vec![false; 256],
        feature_bits: 0,
        provide_buffers: false,
        buf_ring: false,
        buf_ring_incremental: false,
        bundle: false,
        recv_multishot: false,
        accept_multishot: false,
        send_zc: false,
        sendmsg_zc: false,
        zc_report_usage: false,
        fixed_buffers: false,
        vectored_fixed: false,
        clone_buffers: false,
        defer_taskrun: false,
        ext_arg: false,
        memlock,
        zcrx: false,
        zcrx_device_less: ZcrxProbe::NotInKernel,
    };
    let mut ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(e) => {
            f.setup_errno = e.raw_os_error();
            return f;
        }
    };
    f.io_uring = true;
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_ok() {
        for (op, slot) in f.opcodes.iter_mut().enumerate() {
            *slot = probe.is_supported(op as u8);
        }
    }
    f.feature_bits = feature_bits(&ring);
    f.ext_arg = f.feature_bits & sys::IORING_FEAT_EXT_ARG != 0;
    f.bundle = f.feature_bits & sys::IORING_FEAT_RECVSEND_BUNDLE != 0;
    f.provide_buffers = f.opcode(opcode::ProvideBuffers::CODE);
    f.send_zc = f.opcode(opcode::SendZc::CODE);
    f.sendmsg_zc = f.opcode(opcode::SendMsgZc::CODE);
    f.vectored_fixed = f.opcode(opcode::ReadvFixed::CODE) && f.opcode(opcode::WritevFixed::CODE);
    f.fixed_buffers = try_sparse_buffers(&ring);
    f.clone_buffers = f.fixed_buffers && try_clone_buffers();
    f.buf_ring = try_buf_ring(&ring, 0);
    f.buf_ring_incremental = f.buf_ring && try_buf_ring(&ring, sys::IOU_PBUF_RING_INC);
    f.defer_taskrun = IoUring::<squeue::Entry, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
        .is_ok();
    if f.provide_buffers {
        f.recv_multishot = try_recv_multishot(&mut ring).unwrap_or(false);
    }
    f.accept_multishot = try_accept_multishot(&mut ring).unwrap_or(false);
    if f.send_zc {
        f.zc_report_usage = try_zc_report_usage(&mut ring).unwrap_or(false);
    }
    f.zcrx = f.opcode(opcode::RecvZc::CODE);
    if f.zcrx && f.defer_taskrun {
        f.zcrx_device_less = try_zcrx_device_less();
    }
    f
}

/// Registers a one-buffer device-less zero-copy receive area on a ring of its own (closed
/// right after, which unregisters it).
fn try_zcrx_device_less() -> ZcrxProbe {
    let Ok(ring) = IoUring::<squeue::Entry, cqueue::Entry32>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
    else {
        return ZcrxProbe::NotInKernel;
    };
    let (Ok(area), Ok(region)) = (Mmap::anonymous(4096), Mmap::anonymous(4096)) else {
        return ZcrxProbe::NotInKernel;
    };
    let mut area_reg = sys::ZcrxAreaReg {
        addr: area.as_ptr() as u64,
        len: 4096,
        ..Default::default()
    };
    let mut region_desc = sys::RegionDesc {
        user_addr: region.as_ptr() as u64,
        size: 4096,
        flags: sys::IORING_MEM_REGION_TYPE_USER,
        ..Default::default()
    };
    let mut reg = sys::ZcrxIfqReg {
        rq_entries: 1,
        flags: sys::ZCRX_REG_NODEV,
        area_ptr: &raw mut area_reg as u64,
        region_ptr: &raw mut region_desc as u64,
        ..Default::default()
    };
    // SAFETY: a live ring of ours; `area` and `region` stay mapped until after the ring is
    // closed (dropped explicitly below, before them), which ends the kernel's use of both.
    let res = unsafe { sys::register_zcrx_ifq(ring.as_raw_fd(), &mut reg) };
    drop(ring);
    match res {
        Ok(()) => ZcrxProbe::Works,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => ZcrxProbe::NoCapNetAdmin,
        Err(_) => ZcrxProbe::NotInKernel,
    }
}

/// Sends one byte with `SEND_ZC | REPORT_USAGE` on loopback TCP and collects both CQEs.
fn try_zc_report_usage(ring: &mut IoUring) -> std::io::Result<bool> {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    // A static byte: the kernel may hold it until the notification, which we wait for only
    // for a bounded time, so it must outlive any wait.
    static BYTE: [u8; 1] = [7];
    let send = opcode::SendZc::new(types::Fd(client.as_raw_fd()), BYTE.as_ptr(), 1)
        .zc_flags(sys::IORING_SEND_ZC_REPORT_USAGE)
        .build()
        .user_data(5);
    let cqe = run_one(ring, send)?;
    let supported = cqe.result() == 1;
    if cqueue::more(cqe.flags()) {
        // On loopback the notification comes once the receiver has read the data.
        server.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        server.read_exact(&mut [0u8; 1])?;
        let ts = types::Timespec::new().sec(2);
        let _ = ring
            .submitter()
            .submit_with_args(1, &types::SubmitArgs::new().timespec(&ts));
        ring.completion().for_each(drop);
    }
    Ok(supported)
}

fn feature_bits(ring: &IoUring) -> u32 {
    let p = ring.params();
    // The crate exposes the bits one predicate at a time; rebuild the word from the ones we use.
    let mut bits = 0;
    if p.is_feature_ext_arg() {
        bits |= sys::IORING_FEAT_EXT_ARG;
    }
    if p.is_feature_recvsend_bundle() {
        bits |= sys::IORING_FEAT_RECVSEND_BUNDLE;
    }
    if p.is_feature_nodrop() {
        bits |= 1 << 1;
    }
    if p.is_feature_fast_poll() {
        bits |= 1 << 5;
    }
    bits
}

/// Registers and unregisters a small buffer ring with `flags`.
fn try_buf_ring(ring: &IoUring, flags: u16) -> bool {
    const PROBE_BGID: u16 = 0xfffe;
    let Ok(mem) = Mmap::anonymous(4096) else {
        return false;
    };
    // SAFETY: `mem` is a page-aligned 4096-byte mapping, large enough for 8 entries of 16 bytes,
    // and stays mapped until after the unregister below.
    let ok = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(mem.as_ptr() as u64, 8, PROBE_BGID, flags)
            .is_ok()
    };
    if ok {
        let _ = ring.submitter().unregister_buf_ring(PROBE_BGID);
    }
    ok
}

/// Registers (and unregisters) a sparse table of two fixed buffers.
fn try_sparse_buffers(ring: &IoUring) -> bool {
    let ok = ring.submitter().register_buffers_sparse(2).is_ok();
    if ok {
        let _ = ring.submitter().unregister_buffers();
    }
    ok
}

/// Clones one (empty) slot of a sparse table into another ring's table with offsets and
/// `DST_REPLACE`; 6.12's clone (whole tables only) refuses those fields.
fn try_clone_buffers() -> bool {
    let (Ok(src), Ok(dst)) = (IoUring::new(2), IoUring::new(2)) else {
        return false;
    };
    if src.submitter().register_buffers_sparse(2).is_err()
        || dst.submitter().register_buffers_sparse(2).is_err()
    {
        return false;
    }
    // SAFETY: two live rings; the slot cloned is empty, so no memory is involved.
    unsafe { sys::clone_buffers(dst.as_raw_fd(), src.as_raw_fd(), 1, 0, 1) }.is_ok()
}

/// Pushes one SQE, submits it and returns the first CQE for `user_data` (waiting at most for the
/// ones that are already due: the probe only submits ops whose data is already there).
fn run_one(ring: &mut IoUring, sqe: squeue::Entry) -> std::io::Result<cqueue::Entry> {
    // SAFETY: the probe's SQEs point only at memory that outlives the wait below.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| std::io::ErrorKind::Other)?;
    ring.submit_and_wait(1)?;
    ring.completion()
        .next()
        .ok_or_else(|| std::io::ErrorKind::Other.into())
}

/// Cancels everything still in flight on the probe ring and waits for it to finish.
fn drain(ring: &mut IoUring) {
    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
        .build()
        .user_data(u64::MAX);
    // SAFETY: a cancel SQE names no memory.
    if unsafe { ring.submission().push(&cancel) }.is_err() {
        return;
    }
    for _ in 0..8 {
        if ring.submit_and_wait(1).is_err() {
            return;
        }
        let mut done = false;
        for cqe in ring.completion() {
            done |= cqe.user_data() == u64::MAX;
        }
        if done {
            break;
        }
    }
    // Collect whatever the cancellation ended.
    let _ = ring.submitter().submit_and_wait(0);
    ring.completion().for_each(drop);
}

fn try_recv_multishot(ring: &mut IoUring) -> std::io::Result<bool> {
    const BGID: u16 = 0xfffd;
    let mut fds = [0; 2];
    sys::syscall!(socketpair(
        libc::AF_UNIX,
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
        0,
        fds.as_mut_ptr()
    ))?;
    // SAFETY: socketpair returned two fresh descriptors we now own.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mem = Mmap::anonymous(4096)?;
    let provide = opcode::ProvideBuffers::new(mem.as_ptr(), 64, 4, BGID, 0)
        .build()
        .user_data(1);
    let cqe = run_one(ring, provide)?;
    if cqe.result() < 0 {
        return Ok(false);
    }
    std::fs::File::from(b.try_clone()?).write_all(b"x")?;
    let recv = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), BGID)
        .build()
        .user_data(2);
    let cqe = run_one(ring, recv)?;
    let supported = cqe.result() > 0 && cqueue::more(cqe.flags());
    drain(ring);
    let remove = opcode::RemoveBuffers::new(4, BGID).build().user_data(3);
    let _ = run_one(ring, remove);
    // `mem` outlives every op that could have used it: the recv was cancelled and reaped above.
    drop(mem);
    Ok(supported)
}

fn try_accept_multishot(ring: &mut IoUring) -> std::io::Result<bool> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let _client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(4);
    let cqe = run_one(ring, accept)?;
    let supported = cqe.result() >= 0 && cqueue::more(cqe.flags());
    if cqe.result() >= 0 {
        // SAFETY: a successful accept returns a new descriptor we own.
        drop(unsafe { OwnedFd::from_raw_fd(cqe.result()) });
    }
    drain(ring);
    Ok(supported)
}

/// A rung that can be forced, by name, through `RINGPOOL_FORCE` or [`crate::DriverConfig::force`].
///
/// # Examples
/// ```
/// use ringpool::Force;
/// let forced = Force::parse_list("legacy-provide,no-multishot").unwrap();
/// assert_eq!(forced, vec![Force::LegacyProvide, Force::NoMultishot]);
/// assert!(Force::parse_list("warp-drive").is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Force {
    /// `legacy-provide`: legacy `IORING_OP_PROVIDE_BUFFERS` groups instead of buffer rings.
    LegacyProvide,
    /// `no-incremental`: plain buffer rings where incremental ones were asked for.
    NoIncremental,
    /// `no-bundle`: one buffer per recv instead of bundles.
    NoBundle,
    /// `no-multishot`: re-armed single-shot recv and accept instead of multishot.
    NoMultishot,
    /// `no-defer-taskrun`: a ring without `SINGLE_ISSUER|DEFER_TASKRUN`.
    NoDeferTaskrun,
    /// `no-ext-arg`: timed waits through a timeout op instead of `io_uring_enter`'s argument.
    NoExtArg,
    /// `no-sendmsg-zc`: zero-copy sends through `SEND_ZC`, one buffer per op.
    NoSendmsgZc,
    /// `no-send-zc`: plain sends only.
    NoSendZc,
    /// `no-fixed`: plain memory where registered memory was preferred (fixed buffers, regions).
    NoFixed,
    /// `no-vectored-fixed`: `READV`/`WRITEV` on registered memory instead of the fixed forms.
    NoVectoredFixed,
    /// `no-clone`: a shared fixed buffer table registers memory in each ring instead of cloning.
    NoClone,
    /// `no-zcrx`: no zero-copy receive areas (receives go through buffer groups).
    NoZcrx,
    /// `no-inline-splice`: every splice and tee of pages leases and splice streams as an
    /// `IORING_OP_SPLICE`/`IORING_OP_TEE` SQE (each runs in an io-wq worker) instead of the
    /// driver's own non-blocking `splice(2)`/`tee(2)`.
    NoInlineSplice,
    /// `no-send-merge`: every send of a stream socket as an SQE of its own instead of the
    /// plain sends waiting in its lane leaving together in one `sendmsg`.
    NoSendMerge,
    /// `no-exact-bundle-limit`: a limited bundle receive asks one buffer less than its limit,
    /// as on kernels that keep a cut buffer.
    NoExactBundleLimit,
}

const FORCE_NAMES: &[(&str, Force)] = &[
    ("legacy-provide", Force::LegacyProvide),
    ("no-incremental", Force::NoIncremental),
    ("no-bundle", Force::NoBundle),
    ("no-multishot", Force::NoMultishot),
    ("no-defer-taskrun", Force::NoDeferTaskrun),
    ("no-ext-arg", Force::NoExtArg),
    ("no-sendmsg-zc", Force::NoSendmsgZc),
    ("no-send-zc", Force::NoSendZc),
    ("no-fixed", Force::NoFixed),
    ("no-vectored-fixed", Force::NoVectoredFixed),
    ("no-clone", Force::NoClone),
    ("no-zcrx", Force::NoZcrx),
    ("no-inline-splice", Force::NoInlineSplice),
    ("no-send-merge", Force::NoSendMerge),
    ("no-exact-bundle-limit", Force::NoExactBundleLimit),
];
const FORCE_KNOWN: &str = "legacy-provide, no-incremental, no-bundle, no-multishot, \
     no-defer-taskrun, no-ext-arg, no-sendmsg-zc, no-send-zc, no-fixed, no-vectored-fixed, no-clone, \
     no-zcrx, no-inline-splice, no-send-merge, no-exact-bundle-limit";

impl Force {
    /// The rung's name as `RINGPOOL_FORCE` spells it.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(ringpool::Force::NoBundle.name(), "no-bundle");
    /// ```
    pub fn name(self) -> &'static str {
        FORCE_NAMES
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// Parses a comma-separated list of rung names; an unknown name is an error.
    pub fn parse_list(list: &str) -> Result<Vec<Force>> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| {
                FORCE_NAMES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, f)| *f)
                    .ok_or_else(|| Error::UnknownRung {
                        name: name.to_string(),
                        known: FORCE_KNOWN,
                    })
            })
            .collect()
    }

    /// The rungs forced by the `RINGPOOL_FORCE` environment variable.
    pub fn from_env() -> Result<Vec<Force>> {
        match std::env::var("RINGPOOL_FORCE") {
            Ok(list) => Force::parse_list(&list),
            Err(_) => Ok(Vec::new()),
        }
    }
}

/// How buffer groups are backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRung {
    /// Provided buffer rings (5.19), incremental where asked and supported (6.12).
    Ring {
        /// Whether incremental consumption is available.
        incremental: bool,
    },
    /// Legacy `IORING_OP_PROVIDE_BUFFERS` groups (5.7).
    Legacy,
}

/// How multishot operations (recv, accept) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultishotRung {
    /// The kernel's multishot op.
    Kernel,
    /// A single-shot op that the driver re-arms after each completion.
    Rearmed,
}

/// How zero-copy sends go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZcRung {
    /// `SENDMSG_ZC` (6.1): any number of buffers in one op.
    SendmsgZc,
    /// `SEND_ZC` (6.0): one op per buffer.
    SendZc,
    /// Plain send: the kernel has no zero-copy send.
    Plain,
}

/// Where received bytes can land without a copy by the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZcrxRung {
    /// Zero-copy receive areas, device-less ones included (7.1): any TCP socket.
    DeviceLess,
    /// Zero-copy receive from NIC queues only (6.15; the kernel has no device-less mode, or
    /// this process may not register one: see [`Features::zcrx_device_less`]).
    NicOnly,
    /// None: receives go through buffer groups.
    Groups,
}

/// The rung of the fallback ladder chosen for each capability, once, at driver start.
///
/// # Examples
/// ```
/// use ringpool::{Features, Force, Ladder};
/// let ladder = Ladder::choose(Features::get(), &[Force::LegacyProvide]);
/// assert_eq!(ladder.groups, ringpool::GroupRung::Legacy);
/// assert!(!ladder.bundle, "bundles need buffer rings");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ladder {
    /// Buffer groups.
    pub groups: GroupRung,
    /// Recv bundles (several buffers per completion); `false` means one buffer per op.
    pub bundle: bool,
    /// Multishot recv.
    pub recv: MultishotRung,
    /// Multishot accept.
    pub accept: MultishotRung,
    /// `SINGLE_ISSUER|DEFER_TASKRUN` ring setup.
    pub defer_taskrun: bool,
    /// Timed waits through `io_uring_enter`'s extended argument (else a timeout op).
    pub ext_arg: bool,
    /// Zero-copy sends.
    pub zc: ZcRung,
    /// Notifications report whether the kernel copied (the adaptive policy needs it).
    pub zc_report_usage: bool,
    /// Registered memory (fixed buffer table, registered regions); else plain memory.
    pub fixed: bool,
    /// `READV_FIXED`/`WRITEV_FIXED` and registered iovecs in `SENDMSG_ZC` (both 6.15); else
    /// `READV`/`WRITEV` on the same memory, and zero-copy bundles that pin their pages per send.
    pub vectored_fixed: bool,
    /// A shared fixed buffer table clones each registration into the other rings (6.13); else
    /// it registers the same memory in each ring (pinned once per ring).
    pub clone_buffers: bool,
    /// Zero-copy receive areas (they also need `DEFER_TASKRUN`).
    pub zcrx: ZcrxRung,
    /// Splices and tees between pipes and sockets run in the driver's thread as non-blocking
    /// `splice(2)`/`tee(2)` calls, with a poll SQE only when one would block (the kernel runs
    /// every `IORING_OP_SPLICE` and `IORING_OP_TEE` in an io-wq worker); else each is an
    /// SQE. Needs nothing of the kernel; off where forced, and where
    /// the process does not ignore `SIGPIPE` when the driver is made (a splice to a socket
    /// whose peer is gone raises it in the calling thread, and its default action ends the
    /// process; Rust programs ignore it from the start).
    pub inline_splice: bool,
    /// Plain sends waiting together in a stream socket's lane leave in one `SENDMSG` with the
    /// iovecs of all of them (up to `UIO_MAXIOV`), its result split back over them in order;
    /// else each is an SQE of its own in the lane's linked chain. Needs a kernel whose
    /// cancelled send reports the bytes it sent ([`Features::cancelled_send_reports_progress`]):
    /// a cancel of one send of a merged `sendmsg` stops all of them, and the others go again
    /// from where the result says they stopped. Off where forced.
    pub merge_sends: bool,
    /// A bundle receive limited to `n` buffers asks for `n × buf_size + 1` bytes and takes up
    /// to `n` ([`Features::bundle_stops_at_a_cut_buffer`]); else `(n - 1) × buf_size + 1`,
    /// which takes at most `n` on every bundle kernel (`n - 1` where the cut stops it). Only
    /// with bundles; off where forced.
    pub exact_bundle_limit: bool,
}

impl Ladder {
    /// Chooses the highest rung the kernel supports for each capability, below any forced one.
    pub fn choose(f: &Features, forced: &[Force]) -> Ladder {
        let has = |x: Force| forced.contains(&x);
        let groups = if f.buf_ring && !has(Force::LegacyProvide) {
            GroupRung::Ring {
                incremental: f.buf_ring_incremental && !has(Force::NoIncremental),
            }
        } else {
            GroupRung::Legacy
        };
        let multishot = |ok: bool| {
            if ok && !has(Force::NoMultishot) {
                MultishotRung::Kernel
            } else {
                MultishotRung::Rearmed
            }
        };
        let bundle = f.bundle && matches!(groups, GroupRung::Ring { .. }) && !has(Force::NoBundle);
        Ladder {
            groups,
            bundle,
            // Multishot recv selects buffers from a group; on legacy groups it works too (6.0+).
            recv: multishot(f.recv_multishot),
            accept: multishot(f.accept_multishot),
            defer_taskrun: f.defer_taskrun && !has(Force::NoDeferTaskrun),
            ext_arg: f.ext_arg && !has(Force::NoExtArg),
            zc: if !f.send_zc || has(Force::NoSendZc) {
                ZcRung::Plain
            } else if f.sendmsg_zc && !has(Force::NoSendmsgZc) {
                ZcRung::SendmsgZc
            } else {
                ZcRung::SendZc
            },
            zc_report_usage: f.zc_report_usage,
            fixed: f.fixed_buffers && !has(Force::NoFixed),
            vectored_fixed: f.fixed_buffers
                && f.vectored_fixed
                && !has(Force::NoFixed)
                && !has(Force::NoVectoredFixed),
            clone_buffers: f.fixed_buffers
                && f.clone_buffers
                && !has(Force::NoFixed)
                && !has(Force::NoClone),
            zcrx: if !f.zcrx || !f.defer_taskrun || has(Force::NoZcrx) || has(Force::NoDeferTaskrun)
            {
                ZcrxRung::Groups
            } else if f.zcrx_device_less == ZcrxProbe::Works {
                ZcrxRung::DeviceLess
            } else {
                ZcrxRung::NicOnly
            },
            inline_splice: !has(Force::NoInlineSplice),
            merge_sends: f.cancelled_send_reports_progress() && !has(Force::NoSendMerge),
            exact_bundle_limit: bundle
                && f.bundle_stops_at_a_cut_buffer()
                && !has(Force::NoExactBundleLimit),
        }
    }

    /// One line per capability: its name and the rung in use, for `ringpool probe` and test logs.
    ///
    /// # Examples
    /// ```
    /// let ladder = ringpool::Ladder::choose(ringpool::Features::get(), &[]);
    /// for (capability, rung) in ladder.describe() {
    ///     println!("{capability}: {rung}");
    /// }
    /// ```
    pub fn describe(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "buffer groups",
                match self.groups {
                    GroupRung::Ring { incremental: true } => "buffer ring (incremental available)",
                    GroupRung::Ring { incremental: false } => "buffer ring",
                    GroupRung::Legacy => "legacy PROVIDE_BUFFERS",
                },
            ),
            (
                "recv bundles",
                if self.bundle {
                    "bundle"
                } else {
                    "one buffer per op"
                },
            ),
            (
                "multishot recv",
                match self.recv {
                    MultishotRung::Kernel => "multishot",
                    MultishotRung::Rearmed => "re-armed single shot",
                },
            ),
            (
                "multishot accept",
                match self.accept {
                    MultishotRung::Kernel => "multishot",
                    MultishotRung::Rearmed => "re-armed single shot",
                },
            ),
            (
                "ring setup",
                if self.defer_taskrun {
                    "single issuer + defer taskrun"
                } else {
                    "plain"
                },
            ),
            (
                "zero-copy send",
                match self.zc {
                    ZcRung::SendmsgZc => "sendmsg_zc (many buffers per op)",
                    ZcRung::SendZc => "send_zc (one buffer per op)",
                    ZcRung::Plain => "plain send",
                },
            ),
            (
                "registered buffers",
                if self.fixed {
                    "fixed buffer table (sparse, tagged updates)"
                } else {
                    "plain memory"
                },
            ),
            (
                "vectored fixed I/O",
                if self.vectored_fixed {
                    "readv/writev_fixed"
                } else {
                    "readv/writev on the same memory"
                },
            ),
            (
                "shared fixed table",
                if self.clone_buffers {
                    "slots cloned between rings"
                } else {
                    "memory registered in each ring"
                },
            ),
            (
                "timed wait",
                if self.ext_arg {
                    "enter with timeout argument"
                } else {
                    "timeout op"
                },
            ),
            (
                "zero-copy receive",
                match self.zcrx {
                    ZcrxRung::DeviceLess => "zcrx areas, device-less included",
                    ZcrxRung::NicOnly => "zcrx on NIC queues only",
                    ZcrxRung::Groups => "buffer groups",
                },
            ),
            (
                "splice and tee",
                if self.inline_splice {
                    "non-blocking calls, polls on EAGAIN"
                } else {
                    "IORING_OP_SPLICE/TEE (io-wq)"
                },
            ),
            (
                "queued plain sends",
                if self.merge_sends {
                    "merged into one sendmsg per stream socket"
                } else {
                    "one SQE each, linked"
                },
            ),
            (
                "limited bundle receives",
                match (self.bundle, self.exact_bundle_limit) {
                    (true, true) => "up to the limit (the kernel stops at a cut buffer)",
                    (true, false) => "up to one buffer under the limit",
                    (false, _) => "one buffer",
                },
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_names_round_trip() {
        for (name, f) in FORCE_NAMES {
            assert_eq!(f.name(), *name);
            assert_eq!(Force::parse_list(name).unwrap(), vec![*f]);
            assert!(FORCE_KNOWN.contains(name));
        }
        assert_eq!(Force::parse_list(" , ").unwrap(), vec![]);
        let err = Force::parse_list("no-bundle,bogus").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn forcing_legacy_disables_bundles() {
        let mut f = Features::get().clone();
        f.buf_ring = true;
        f.bundle = true;
        let l = Ladder::choose(&f, &[Force::LegacyProvide]);
        assert_eq!(l.groups, GroupRung::Legacy);
        assert!(!l.bundle);
        let l = Ladder::choose(&f, &[]);
        assert!(matches!(l.groups, GroupRung::Ring { .. }));
        assert!(l.bundle);
    }

    #[test]
    fn old_kernel_features_pick_low_rungs() {
        let mut f = Features::get().clone();
        f.buf_ring = false;
        f.buf_ring_incremental = false;
        f.bundle = false;
        f.recv_multishot = false;
        f.accept_multishot = false;
        let l = Ladder::choose(&f, &[]);
        assert_eq!(l.groups, GroupRung::Legacy);
        assert_eq!(l.recv, MultishotRung::Rearmed);
        assert_eq!(l.accept, MultishotRung::Rearmed);
        assert!(!l.bundle);
    }
}
