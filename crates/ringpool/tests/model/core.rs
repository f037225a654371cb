//! The core machine: random sequences of user and peer actions on `Driver`s, checked against a
//! model after every step.
//!
//! The world: one or two drivers (on one rung of the ladder), buffer groups of every kind,
//! streams (loopback TCP pairs, pipes, temp files) whose peer side the test drives with std,
//! ops in flight, and what the user holds (chains, `Bytes`, leases). Actions name objects by
//! index, taken modulo how many exist, so any subsequence of a case still means something (the
//! shrinker relies on it); an action whose object does not fit is a no-op.
//!
//! Checked after every step:
//! - per group, the buffers the user holds (distinct bids) equal `in_user`, up to buffers on
//!   their way home (sent or shipped as `Bytes`); no bid is held twice (outside incremental
//!   rings), and no two held buffers overlap in memory;
//! - every held buffer (chain, `Bytes`, lease) still has the bytes it had when handed out;
//! - per stream, every received byte is the next one its peer sent (patterned bytes, so a
//!   duplicate, a reordering or stale bytes show), end of stream only after all of them;
//!   what the peer reads is exactly what was sent, in order;
//! - an op ends `Cancelled` only if it was cancelled (by id, fd or token), a foreign group is
//!   refused with `NotOurs`;
//! - at the end every group is full again, `leaked_ops()` is 0 and no descriptor is left.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringpool::{
    BufChain, BufGroup, BufGroupConfig, Completion, Driver, DriverConfig, Error, Event, Fd,
    FixedBuf, Force, Lease, Member, OpId, RecvMode, Registration, SendBuf, SendRing,
};

use super::gen::{Failure, Machine, Outcome, Rng};
use crate::common::pattern_vec;

/// Everything a regression test needs in scope.
pub mod prelude {
    pub use super::Action::*;
    pub use super::GroupKind::*;
    pub use super::How::*;
    pub use super::Mode::*;
    pub use super::Rung::*;
    pub use super::Src::*;
    pub use super::{Avoid, Header};
}

/// The rung of the ladder every driver of a case uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    Best,
    Legacy,
    NoMultishot,
    NoBundle,
    NoIncremental,
    LegacyNoMultishot,
    /// Every fallback at once (what a 5.10 kernel gets).
    Oldest,
}

impl Rung {
    /// The driver configuration of this rung (ignoring `RINGPOOL_FORCE`).
    pub fn config(self) -> DriverConfig {
        let cfg = DriverConfig::default().ignore_env();
        let forced: &[Force] = match self {
            Rung::Best => &[],
            Rung::Legacy => &[Force::LegacyProvide],
            Rung::NoMultishot => &[Force::NoMultishot],
            Rung::NoBundle => &[Force::NoBundle, Force::NoDeferTaskrun],
            Rung::NoIncremental => &[Force::NoIncremental, Force::NoExactBundleLimit],
            Rung::LegacyNoMultishot => &[
                Force::LegacyProvide,
                Force::NoMultishot,
                Force::NoInlineSplice,
            ],
            Rung::Oldest => &[
                Force::LegacyProvide,
                Force::NoMultishot,
                Force::NoBundle,
                Force::NoDeferTaskrun,
                Force::NoExtArg,
                Force::NoSendZc,
                Force::NoFixed,
                Force::NoInlineSplice,
                Force::NoSendMerge,
            ],
        };
        forced.iter().fold(cfg, |c, f| c.force(*f))
    }
}

#[derive(Debug, Clone)]
pub struct Header {
    pub rung: Rung,
    pub drivers: usize,
    pub avoid: Avoid,
}

/// Known defects, not fixed on this branch yet, that the generated cases steer around (so the
/// checker can look for the next one); a case avoids them by skipping the actions that would
/// trigger them. Regression tests replay with `Avoid::NOTHING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Avoid {
    /// Defect 1: a buffer-selecting read at end of file (or of a pipe) into an incremental ring.
    pub eof_incremental: bool,
    /// Defect 2: `Driver::cancel` with another driver's `OpId`.
    pub foreign_cancel: bool,
    /// Kernel quirk, open (5.10 guest, `docs/KERNEL-MATRIX.md`): a cancelled waiting receive on
    /// a legacy group takes its selected buffer out of circulation without naming it.
    pub cancels_on_legacy_groups: bool,
    /// Open (6.1 guest): on the forced legacy rungs of a kernel with rings, a multishot receive
    /// stalled with its data in the socket. Steers those rungs to the best one.
    pub forced_legacy_rungs: bool,
}

impl Avoid {
    pub const NOTHING: Avoid = Avoid {
        eof_incremental: false,
        foreign_cancel: false,
        cancels_on_legacy_groups: false,
        forced_legacy_rungs: false,
    };
}

/// What the cases saw, for the summary (proof that the actions reach the kernel paths).
pub mod seen {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    pub static DATA: AtomicU64 = AtomicU64::new(0);
    pub static MULTI_BUF: AtomicU64 = AtomicU64::new(0);
    pub static EOF: AtomicU64 = AtomicU64::new(0);
    pub static CANCELLED: AtomicU64 = AtomicU64::new(0);
    pub static RESET: AtomicU64 = AtomicU64::new(0);
    pub static SENT: AtomicU64 = AtomicU64::new(0);
    pub static LEASES: AtomicU64 = AtomicU64::new(0);
    pub static REFUSED: AtomicU64 = AtomicU64::new(0);
    pub static GROWS: AtomicU64 = AtomicU64::new(0);
    pub static ENOBUFS: AtomicU64 = AtomicU64::new(0);
    pub static PAGES: AtomicU64 = AtomicU64::new(0);
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
    pub fn summary() -> String {
        let g = |c: &AtomicU64| c.load(Relaxed);
        format!(
            "data {} (multi-buffer {}), eof {}, cancelled {}, reset errors {}, sends {}, \
             leases returned {}, foreign groups refused {}, group growths {}, dry-group stops {}, \
             pages leases returned {}",
            g(&DATA),
            g(&MULTI_BUF),
            g(&EOF),
            g(&CANCELLED),
            g(&RESET),
            g(&SENT),
            g(&LEASES),
            g(&REFUSED),
            g(&GROWS),
            g(&ENOBUFS),
            g(&PAGES)
        )
    }
}

/// What generated cases avoid (set by the test from its list of known defects).
pub static AVOID: Mutex<Avoid> = Mutex::new(Avoid::NOTHING);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Ring,
    Incremental,
    Registered,
    Growing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Once,
    Bundle,
    /// `recv_bundle_limited` with this limit.
    BundleLimited(u32),
    Multishot,
    MultishotBundle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Plain,
    Zc,
    Bundled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// That many fresh patterned bytes.
    Owned(usize),
    /// A held chain or lease (by index), sent back out.
    Held(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    NewGroup {
        d: usize,
        kind: GroupKind,
        size: usize,
        count: u32,
    },
    NewTcp {
        d: usize,
    },
    NewPipe {
        d: usize,
    },
    NewFile {
        d: usize,
        len: usize,
    },
    /// A file like `NewFile`, on tmpfs (`/dev/shm`, else the temporary directory if it is tmpfs,
    /// else like `NewFile`): its reads consume their buffer at issue and complete from io-wq,
    /// after ops issued behind them. The generator makes every file of odd length one.
    NewTmpfsFile {
        d: usize,
        len: usize,
    },
    /// The peer writes `len` patterned bytes (as many as fit without blocking).
    PeerWrite {
        s: usize,
        len: usize,
    },
    /// The peer half-closes (TCP) or closes the pipe's writer.
    PeerShutdown {
        s: usize,
    },
    /// The peer resets the connection (RST).
    PeerReset {
        s: usize,
    },
    /// The peer reads what arrived and checks it.
    PeerRead {
        s: usize,
    },
    /// A receive on a TCP stream.
    Recv {
        s: usize,
        g: usize,
        mode: Mode,
        keep: bool,
    },
    /// A buffer-selecting read on a pipe (the pipe's position) or a file (the next offset).
    ReadSelect {
        s: usize,
        g: usize,
        keep: bool,
    },
    Transmit {
        s: usize,
        how: How,
        src: Src,
    },
    /// `n` sends of owned bytes on TCP stream `s` in one step (no submit between them), so
    /// they wait in its lane together and leave as one merged `sendmsg` (`zc`: every other one
    /// is a `send_zc`, which the policy may send zero-copy, alone, between the merged runs).
    Burst {
        s: usize,
        n: usize,
        len: usize,
        zc: bool,
    },
    /// A lease group: the leader reads file `f` into registered memory, one member sends it
    /// on TCP stream `s` (`keep`: the user keeps the lease too).
    LeaseSend {
        f: usize,
        s: usize,
        len: usize,
        zc: bool,
        keep: bool,
    },
    /// A pages lease: the leader splices up to `len` bytes of file `f` into a pipe, one
    /// member tees them and splices them on to TCP stream `s` (run by the driver itself or,
    /// on rungs that force `no-inline-splice`, as SQEs).
    PagesSend {
        f: usize,
        s: usize,
        len: usize,
    },
    /// A read-in lease on file `f`: the leader and two members read parts of the file.
    LeaseReadIn {
        f: usize,
        len: usize,
    },
    /// `Driver::cancel` of a live op; `foreign`: on the other driver (must do nothing).
    Cancel {
        op: usize,
        foreign: bool,
    },
    CancelFd {
        s: usize,
    },
    CancelToken {
        op: usize,
    },
    DropHeld {
        h: usize,
    },
    /// A held chain becomes `Bytes` (`PooledBuf::into_bytes`), still held.
    IntoBytes {
        h: usize,
    },
    /// A held `Bytes` goes to another thread, which checks it and drops it after `ms`.
    ShipHeld {
        h: usize,
        ms: u64,
    },
    DropGroup {
        g: usize,
    },
    DropFd {
        s: usize,
    },
    DropDriver {
        d: usize,
    },
    /// Each driver waits up to `ms` for completions.
    Wait {
        ms: u64,
    },
}

use Action::*;

/// Which streams an action can name.
#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    File,
    /// What a peer writes into: TCP or pipe.
    Written,
    /// What the driver reads with `read`: pipe or file.
    Read,
}

enum Peer {
    Tcp(Option<TcpStream>),
    Pipe(Option<File>),
    File { len: usize },
}

struct StreamM {
    d: usize,
    seed: u64,
    fd: Option<Fd>,
    peer: Peer,
    /// Bytes the peer sent to us (TCP, pipe) / the file's length.
    sent_in: u64,
    recv_in: u64,
    eof: bool,
    /// A receive ended with the reset's error: the drain at the end leaves the stream alone.
    ended: bool,
    shut: bool,
    reset: bool,
    /// The receive or read in flight (its token).
    active: Option<u64>,
    out_expected: Vec<u8>,
    out_got: usize,
    out_broken: bool,
    out_pos: u64,
    sends: usize,
    bundles: usize,
    leases: usize,
    ring: Option<SendRing>,
}

impl StreamM {
    fn is_tcp(&self) -> bool {
        matches!(self.peer, Peer::Tcp(_))
    }
}

struct GroupM {
    d: usize,
    g: Option<BufGroup>,
    incremental: bool,
    max: u32,
    total: u32,
    /// Buffers that left the user's hands but may not be home yet (sent, shipped).
    away: u32,
}

enum OpKindM {
    Recv,
    Read,
    Send { len: usize, bundle: bool },
    Leader(Box<LeaderM>),
    Member { read_in: bool },
}

struct LeaderM {
    /// What the leader must have read.
    expect_read: usize,
    /// The file bytes the lease must show.
    lease_bytes: Vec<u8>,
    /// The buffer's content when it comes back.
    final_buf: Vec<u8>,
    /// Send targets and the members' tokens.
    targets: Vec<usize>,
    members: Vec<u64>,
    keep: bool,
    filled: bool,
    /// A member ended with an error: its range of the buffer is unknown.
    member_failed: bool,
}

struct OpM {
    token: u64,
    d: usize,
    id: Option<OpId>,
    kind: OpKindM,
    /// The stream it works on (a leader: its file).
    s: usize,
    g: Option<usize>,
    cancelled: bool,
    keep: bool,
    /// A limited bundle receive: the most buffers one completion may carry.
    max_bufs: Option<u32>,
}

enum Item {
    Chain(BufChain),
    Bytes(bytes::Bytes),
    Lease(Lease),
}

struct HeldM {
    item: Item,
    snapshot: Vec<u8>,
    g: Option<usize>,
    bids: Vec<u16>,
    what: String,
}

impl HeldM {
    fn matches(&self) -> bool {
        match &self.item {
            Item::Chain(c) => {
                let mut at = 0;
                for b in c.iter() {
                    if self.snapshot.get(at..at + b.len()) != Some(&b[..]) {
                        return false;
                    }
                    at += b.len();
                }
                at == self.snapshot.len()
            }
            Item::Bytes(b) => b[..] == self.snapshot[..],
            Item::Lease(l) => l[..] == self.snapshot[..],
        }
    }
    fn ranges(&self) -> Vec<(usize, usize)> {
        match &self.item {
            Item::Chain(c) => c
                .iter()
                .filter(|b| !b.is_empty())
                .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + b.len()))
                .collect(),
            Item::Bytes(b) if !b.is_empty() => {
                vec![(b.as_ptr() as usize, b.as_ptr() as usize + b.len())]
            }
            Item::Lease(l) if !l.is_empty() => {
                vec![(l.as_ptr() as usize, l.as_ptr() as usize + l.len())]
            }
            _ => Vec::new(),
        }
    }
}

/// Drops `Bytes` on another thread after a delay, checking them first.
struct Shipper {
    tx: Option<std::sync::mpsc::Sender<(bytes::Bytes, Vec<u8>, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
}

impl Shipper {
    fn new() -> Shipper {
        let (tx, rx) = std::sync::mpsc::channel::<(bytes::Bytes, Vec<u8>, u64)>();
        let error = Arc::new(Mutex::new(None));
        let e = error.clone();
        let thread = std::thread::spawn(move || {
            while let Ok((b, snap, ms)) = rx.recv() {
                std::thread::sleep(Duration::from_millis(ms.min(50)));
                if b[..] != snap[..] {
                    *e.lock().unwrap() = Some(format!(
                        "a shipped Bytes of {} bytes changed on the other thread",
                        snap.len()
                    ));
                }
                drop(b);
            }
        });
        Shipper {
            tx: Some(tx),
            thread: Some(thread),
            error,
        }
    }
    fn finish(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct World {
    drivers: Vec<Option<Driver>>,
    groups: Vec<GroupM>,
    streams: Vec<StreamM>,
    ops: Vec<OpM>,
    held: Vec<HeldM>,
    next_token: u64,
    next_seed: u64,
    shipper: Shipper,
    step: usize,
    avoid: Avoid,
}

fn fail(tag: &'static str, detail: impl Into<String>) -> Outcome {
    Err(Failure::new(tag, detail))
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on a descriptor we own, with flags read from it.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

fn pipe() -> (OwnedFd, File) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fresh descriptors into `fds`.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    set_nonblocking(w.as_raw_fd());
    (r, w)
}

/// How long the end of a case may take to drain and settle.
fn drain_time() -> Duration {
    Duration::from_secs(if crate::common::in_emulated_guest() {
        10
    } else {
        3
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

impl World {
    fn new(header: &Header) -> Result<World, Failure> {
        let mut drivers = Vec::new();
        for _ in 0..header.drivers.clamp(1, 2) {
            let d = Driver::new(header.rung.config())
                .map_err(|e| Failure::new("setup", format!("Driver::new: {e}")))?;
            drivers.push(Some(d));
        }
        Ok(World {
            drivers,
            groups: Vec::new(),
            streams: Vec::new(),
            ops: Vec::new(),
            held: Vec::new(),
            next_token: 1,
            next_seed: 1,
            shipper: Shipper::new(),
            step: 0,
            avoid: header.avoid,
        })
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn d(&self, d: usize) -> usize {
        d % self.drivers.len()
    }

    fn stream(&self, s: usize) -> Option<usize> {
        (!self.streams.is_empty()).then(|| s % self.streams.len())
    }

    /// The `s`-th stream (modulo) of those of kind `k`.
    fn of_kind(&self, s: usize, k: Kind) -> Option<usize> {
        let fits: Vec<usize> = (0..self.streams.len())
            .filter(|&i| {
                let st = &self.streams[i];
                match k {
                    Kind::Tcp => st.is_tcp(),
                    Kind::File => matches!(st.peer, Peer::File { .. }),
                    Kind::Written => !matches!(st.peer, Peer::File { .. }),
                    Kind::Read => !st.is_tcp(),
                }
            })
            .collect();
        (!fits.is_empty()).then(|| fits[s % fits.len()])
    }

    /// The index that names stream `i` among those of kind `k` (the inverse of `of_kind`).
    fn kind_index(&self, i: usize, k: Kind) -> usize {
        (0..self.streams.len())
            .position(|j| self.of_kind(j, k) == Some(i))
            .expect("stream of that kind")
    }

    /// Like [`World::of_kind`], if the user still has the stream and its driver.
    fn live_of_kind(&self, s: usize, k: Kind) -> Option<usize> {
        let i = self.of_kind(s, k)?;
        self.live_stream(i)
    }

    fn live_stream(&self, s: usize) -> Option<usize> {
        let i = self.stream(s)?;
        let st = &self.streams[i];
        (st.fd.is_some() && self.drivers[st.d].is_some()).then_some(i)
    }

    fn group(&self, g: usize) -> Option<usize> {
        (!self.groups.is_empty()).then(|| g % self.groups.len())
    }

    /// A file of `len` patterned bytes to read (on tmpfs where asked and there is one).
    fn new_file(&mut self, d: usize, len: usize, tmpfs: bool) {
        let d = self.d(d);
        if self.drivers[d].is_none() {
            return;
        }
        let seed = self.next_seed + 1;
        let mut f = match tmpfs.then(crate::common::tmpfs_dir).flatten() {
            Some(dir) => tempfile::tempfile_in(dir).unwrap(),
            None => tempfile::tempfile().unwrap(),
        };
        f.write_all(&pattern_vec(seed, 0, len)).unwrap();
        self.add_stream(
            d,
            Fd::from(OwnedFd::from(f)),
            Peer::File { len },
            len as u64,
        );
    }

    fn do_action(&mut self, a: &Action) -> Outcome {
        match *a {
            NewGroup {
                d,
                kind,
                size,
                count,
            } => {
                let d = self.d(d);
                let Some(drv) = self.drivers[d].as_mut() else {
                    return Ok(());
                };
                let size = size.clamp(1, 65536);
                let count = count.clamp(1, 64).next_power_of_two();
                let mut cfg = BufGroupConfig::new(size, count);
                let mut max = count;
                match kind {
                    GroupKind::Ring => {}
                    GroupKind::Incremental => cfg = cfg.incremental(true),
                    GroupKind::Registered => cfg = cfg.registration(Registration::Preferred),
                    GroupKind::Growing => {
                        max = count * 4;
                        cfg = cfg.max_count(max);
                    }
                }
                let g = drv
                    .buf_group(cfg)
                    .map_err(|e| Failure::new("setup", format!("buf_group: {e}")))?;
                self.groups.push(GroupM {
                    d,
                    incremental: g.is_incremental(),
                    max,
                    total: g.stats().total,
                    g: Some(g),
                    away: 0,
                });
            }
            NewTcp { d } => {
                let d = self.d(d);
                if self.drivers[d].is_none() {
                    return Ok(());
                }
                let (ours, peer) = crate::common::tcp_pair();
                peer.set_nonblocking(true).unwrap();
                self.add_stream(d, Fd::from(ours), Peer::Tcp(Some(peer)), 0);
            }
            NewPipe { d } => {
                let d = self.d(d);
                if self.drivers[d].is_none() {
                    return Ok(());
                }
                let (r, w) = pipe();
                self.add_stream(d, Fd::from(r), Peer::Pipe(Some(w)), 0);
            }
            NewFile { d, len } => self.new_file(d, len, false),
            NewTmpfsFile { d, len } => self.new_file(d, len, true),
            PeerWrite { s, len } => {
                let Some(i) = self.of_kind(s, Kind::Written) else {
                    return Ok(());
                };
                let st = &mut self.streams[i];
                let data = pattern_vec(st.seed, st.sent_in, len);
                let n = match &mut st.peer {
                    Peer::Tcp(Some(p)) if !st.shut => p.write(&data).unwrap_or(0),
                    Peer::Pipe(Some(w)) => w.write(&data).unwrap_or(0),
                    _ => 0,
                };
                st.sent_in += n as u64;
            }
            PeerShutdown { s } => {
                let Some(i) = self.of_kind(s, Kind::Written) else {
                    return Ok(());
                };
                if self.avoid.eof_incremental && self.reads_incremental(i) {
                    // The read in flight would end at EOF: defect 1.
                    return Ok(());
                }
                let st = &mut self.streams[i];
                match &mut st.peer {
                    Peer::Tcp(Some(p)) => {
                        let _ = p.shutdown(std::net::Shutdown::Write);
                        st.shut = true;
                    }
                    Peer::Pipe(w) => {
                        w.take();
                        st.shut = true;
                    }
                    _ => {}
                }
            }
            PeerReset { s } => {
                let Some(i) = self.of_kind(s, Kind::Tcp) else {
                    return Ok(());
                };
                let st = &mut self.streams[i];
                if let Peer::Tcp(p) = &mut st.peer {
                    if let Some(p) = p.take() {
                        crate::common::reset(p);
                        st.reset = true;
                        st.shut = true;
                        st.out_broken = true;
                    }
                }
            }
            PeerRead { s } => {
                if let Some(i) = self.of_kind(s, Kind::Tcp) {
                    self.peer_read(i)?;
                }
            }
            Recv { s, g, mode, keep } => {
                let (Some(i), Some(gi)) = (self.live_of_kind(s, Kind::Tcp), self.group(g)) else {
                    return Ok(());
                };
                let st = &self.streams[i];
                if !st.is_tcp() || st.active.is_some() {
                    return Ok(());
                }
                let Some(group) = self.groups[gi].g.clone() else {
                    return Ok(());
                };
                let (d, fd) = (st.d, st.fd.clone().unwrap());
                let foreign = self.groups[gi].d != d;
                let token = self.token();
                let driver = self.drivers[d].as_mut().unwrap();
                let r = match mode {
                    Mode::BundleLimited(n) => driver.recv_bundle_limited(&fd, &group, n, token),
                    Mode::Once => driver.recv(&fd, &group, RecvMode::Once, token),
                    Mode::Bundle => driver.recv(&fd, &group, RecvMode::Bundle, token),
                    Mode::Multishot => driver.recv(&fd, &group, RecvMode::Multishot, token),
                    Mode::MultishotBundle => {
                        driver.recv(&fd, &group, RecvMode::MultishotBundle, token)
                    }
                };
                self.started(r, foreign, token, d, i, gi, OpKindM::Recv, keep)?;
                if let (Mode::BundleLimited(n), Some(op)) = (mode, self.ops.last_mut()) {
                    if op.token == token {
                        op.max_bufs = Some(n);
                    }
                }
            }
            ReadSelect { s, g, keep } => {
                let (Some(i), Some(gi)) = (self.live_of_kind(s, Kind::Read), self.group(g)) else {
                    return Ok(());
                };
                let st = &self.streams[i];
                if st.is_tcp() || st.active.is_some() {
                    return Ok(());
                }
                if self.avoid.eof_incremental
                    && self.groups[gi].incremental
                    && (st.shut || matches!(st.peer, Peer::File { .. }))
                {
                    // A read that may end at EOF: defect 1.
                    return Ok(());
                }
                let Some(group) = self.groups[gi].g.clone() else {
                    return Ok(());
                };
                let offset = match st.peer {
                    Peer::File { .. } => st.recv_in,
                    _ => u64::MAX,
                };
                let d = st.d;
                let fd = st.fd.clone().unwrap();
                let foreign = self.groups[gi].d != d;
                let token = self.token();
                let r = self.drivers[d]
                    .as_mut()
                    .unwrap()
                    .read(&fd, &group, offset, token);
                self.started(r, foreign, token, d, i, gi, OpKindM::Read, keep)?;
            }
            Transmit { s, how, src } => self.transmit(s, how, src)?,
            Burst { s, n, len, zc } => {
                for k in 0..n {
                    let how = if zc && k % 2 == 1 {
                        How::Zc
                    } else {
                        How::Plain
                    };
                    self.transmit(s, how, Src::Owned(len / (k + 1) + 1))?;
                }
            }
            LeaseSend {
                f,
                s,
                len,
                zc,
                keep,
            } => self.lease_send(f, s, len, zc, keep)?,
            PagesSend { f, s, len } => self.pages_send(f, s, len)?,
            LeaseReadIn { f, len } => self.lease_read_in(f, len)?,
            Cancel { op, foreign } => {
                if self.ops.is_empty()
                    || (foreign && self.avoid.foreign_cancel)
                    || self.avoid.cancels_on_legacy_groups
                {
                    return Ok(());
                }
                let o = op % self.ops.len();
                let Some(id) = self.ops[o].id else {
                    return Ok(());
                };
                let d = self.ops[o].d;
                let target = if foreign && self.drivers.len() > 1 {
                    (d + 1) % self.drivers.len()
                } else {
                    self.ops[o].cancelled = true;
                    d
                };
                if let Some(drv) = self.drivers[target].as_mut() {
                    drv.cancel(id);
                }
            }
            CancelFd { s } => {
                if self.avoid.cancels_on_legacy_groups {
                    return Ok(());
                }
                let Some(i) = self.live_stream(s) else {
                    return Ok(());
                };
                let d = self.streams[i].d;
                let fd = self.streams[i].fd.clone().unwrap();
                for op in self.ops.iter_mut().filter(|o| o.s == i) {
                    op.cancelled = true;
                }
                self.drivers[d].as_mut().unwrap().cancel_fd(&fd);
            }
            CancelToken { op } => {
                if self.ops.is_empty() || self.avoid.cancels_on_legacy_groups {
                    return Ok(());
                }
                let o = op % self.ops.len();
                let (d, token) = (self.ops[o].d, self.ops[o].token);
                for op in self.ops.iter_mut().filter(|x| x.d == d && x.token == token) {
                    op.cancelled = true;
                }
                if let Some(drv) = self.drivers[d].as_mut() {
                    drv.cancel_token(token);
                }
            }
            DropHeld { h } => {
                if !self.held.is_empty() {
                    let h = self.held.remove(h % self.held.len());
                    self.left_hands(&h);
                }
            }
            IntoBytes { h } => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let h = h % self.held.len();
                if let Item::Chain(_) = self.held[h].item {
                    let held = &mut self.held[h];
                    let Item::Chain(c) =
                        std::mem::replace(&mut held.item, Item::Bytes(bytes::Bytes::new()))
                    else {
                        unreachable!()
                    };
                    if c.buf_count() == 1 {
                        held.item = Item::Bytes(c.into_bytes());
                    } else {
                        // Copied: the buffers go home now.
                        held.item = Item::Bytes(c.into_bytes());
                        let h = HeldM {
                            item: Item::Bytes(bytes::Bytes::new()),
                            snapshot: Vec::new(),
                            g: held.g,
                            bids: std::mem::take(&mut held.bids),
                            what: String::new(),
                        };
                        self.left_hands(&h);
                    }
                }
            }
            ShipHeld { h, ms } => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let h = h % self.held.len();
                if let Item::Bytes(_) = self.held[h].item {
                    let held = self.held.remove(h);
                    self.left_hands(&held);
                    let Item::Bytes(b) = held.item else {
                        unreachable!()
                    };
                    let tx = self.shipper.tx.as_ref().unwrap();
                    tx.send((b, held.snapshot, ms)).unwrap();
                }
            }
            DropGroup { g } => {
                if let Some(gi) = self.group(g) {
                    self.groups[gi].g = None;
                }
            }
            DropFd { s } => {
                if let Some(i) = self.stream(s) {
                    let st = &mut self.streams[i];
                    st.fd = None;
                    st.ring = None;
                    if st.is_tcp() && st.recv_in < st.sent_in {
                        // Closed with unread bytes, the socket resets the connection (RFC
                        // 2525): what it sent may not reach the peer.
                        st.out_broken = true;
                    }
                }
            }
            DropDriver { d } => {
                let d = self.d(d);
                if self.drivers[d].is_none() {
                    return Ok(());
                }
                for st in self.streams.iter_mut().filter(|s| s.d == d) {
                    st.ring = None;
                }
                self.drivers[d] = None;
                // Its ops are gone with it: whatever they did to a stream is unknown now.
                let gone: Vec<OpM> = {
                    let (gone, kept) = std::mem::take(&mut self.ops)
                        .into_iter()
                        .partition(|o| o.d == d);
                    self.ops = kept;
                    gone
                };
                for o in gone {
                    let st = &mut self.streams[o.s];
                    st.active = None;
                    st.out_broken = true;
                    if let OpKindM::Leader(l) = &o.kind {
                        for &t in &l.targets {
                            self.streams[t].out_broken = true;
                        }
                    }
                }
                for g in self.groups.iter_mut().filter(|g| g.d == d) {
                    // Buffers of completions nobody popped went home with the driver.
                    g.away = u32::MAX / 2;
                }
            }
            Wait { ms } => {
                for d in 0..self.drivers.len() {
                    let Some(drv) = self.drivers[d].as_mut() else {
                        continue;
                    };
                    let r = if drv.in_flight() > 0 {
                        drv.wait(Some(Duration::from_millis(ms.min(200))))
                    } else {
                        drv.submit()
                    };
                    if let Err(e) = r {
                        return fail("driver error", format!("wait: {e}"));
                    }
                    self.pop_all(d)?;
                }
            }
        }
        Ok(())
    }

    /// Whether a read into an incremental group is in flight on stream `i` (a pipe).
    fn reads_incremental(&self, i: usize) -> bool {
        let st = &self.streams[i];
        !st.is_tcp()
            && self.ops.iter().any(|o| {
                o.s == i
                    && matches!(o.kind, OpKindM::Read)
                    && o.g.is_some_and(|g| self.groups[g].incremental)
            })
    }

    fn add_stream(&mut self, d: usize, fd: Fd, peer: Peer, sent_in: u64) {
        self.next_seed += 2;
        self.streams.push(StreamM {
            d,
            seed: self.next_seed - 1,
            fd: Some(fd),
            peer,
            sent_in,
            recv_in: 0,
            eof: false,
            ended: false,
            shut: false,
            reset: false,
            active: None,
            out_expected: Vec::new(),
            out_got: 0,
            out_broken: false,
            out_pos: 0,
            sends: 0,
            bundles: 0,
            leases: 0,
            ring: None,
        });
    }

    /// Records a receive or read that `r` says started (or was refused).
    #[allow(clippy::too_many_arguments)]
    fn started(
        &mut self,
        r: ringpool::Result<OpId>,
        foreign: bool,
        token: u64,
        d: usize,
        s: usize,
        g: usize,
        kind: OpKindM,
        keep: bool,
    ) -> Outcome {
        match (r, foreign) {
            (Err(Error::NotOurs { .. }), true) => {
                seen::bump(&seen::REFUSED);
                Ok(())
            }
            (Ok(_), true) => fail(
                "foreign group accepted",
                "a receive into another driver's group was started",
            ),
            (Err(e), _) => fail("start error", format!("starting a receive: {e}")),
            (Ok(id), false) => {
                self.streams[s].active = Some(token);
                self.ops.push(OpM {
                    token,
                    d,
                    id: Some(id),
                    kind,
                    s,
                    g: Some(g),
                    cancelled: false,
                    max_bufs: None,
                    keep,
                });
                Ok(())
            }
        }
    }

    /// `h` left the user's hands (dropped, sent, shipped): its buffers are on their way home.
    fn left_hands(&mut self, h: &HeldM) {
        if let Some(g) = h.g {
            let n = h.bids.iter().collect::<HashSet<_>>().len() as u32;
            self.groups[g].away = self.groups[g].away.saturating_add(n);
        }
    }

    fn transmit(&mut self, s: usize, how: How, src: Src) -> Outcome {
        let Some(i) = self.live_of_kind(s, Kind::Tcp) else {
            return Ok(());
        };
        let st = &self.streams[i];
        let bundle = how == How::Bundled;
        if !st.is_tcp() || st.leases > 0 || (bundle && st.sends > 0) || (!bundle && st.bundles > 0)
        {
            return Ok(());
        }
        let (buf, bytes, g) = match src {
            Src::Owned(len) => {
                let st = &mut self.streams[i];
                let v = pattern_vec(st.seed + 1_000_000, st.out_pos, len.max(1));
                st.out_pos += v.len() as u64;
                (SendBuf::from(v.clone()), v, None)
            }
            Src::Held(h) => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let h = h % self.held.len();
                if matches!(self.held[h].item, Item::Bytes(_)) {
                    return Ok(());
                }
                let held = self.held.remove(h);
                self.left_hands(&held);
                let buf = match held.item {
                    Item::Chain(c) => SendBuf::from(c),
                    Item::Lease(l) => SendBuf::from(l),
                    Item::Bytes(_) => unreachable!(),
                };
                (buf, held.snapshot, held.g)
            }
        };
        let _ = g;
        let token = self.token();
        let d = self.streams[i].d;
        let fd = self.streams[i].fd.clone().unwrap();
        let len = bytes.len();
        let id = {
            let drv = self.drivers[d].as_mut().unwrap();
            match how {
                How::Plain => Some(drv.send(&fd, buf, token)),
                How::Zc => Some(drv.send_zc(&fd, buf, token)),
                How::Bundled => {
                    if self.streams[i].ring.is_none() {
                        let ring = drv
                            .send_ring(16)
                            .map_err(|e| Failure::new("start error", format!("send_ring: {e}")))?;
                        self.streams[i].ring = Some(ring);
                    }
                    let ring = self.streams[i].ring.as_ref().unwrap();
                    drv.send_bundle(&fd, ring, buf, token)
                        .map_err(|e| Failure::new("start error", format!("send_bundle: {e}")))?;
                    None
                }
            }
        };
        let id = match id {
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => return fail("start error", format!("send: {e}")),
            None => None,
        };
        let st = &mut self.streams[i];
        st.out_expected.extend_from_slice(&bytes);
        if bundle {
            st.bundles += 1;
        } else {
            st.sends += 1;
        }
        self.ops.push(OpM {
            token,
            d,
            id,
            kind: OpKindM::Send { len, bundle },
            s: i,
            g: None,
            cancelled: false,
            max_bufs: None,
            keep: false,
        });
        Ok(())
    }

    fn file(&self, f: usize) -> Option<(usize, usize)> {
        let i = self.of_kind(f, Kind::File)?;
        match self.streams[i].peer {
            Peer::File { len } if self.live_stream(i).is_some() => Some((i, len)),
            _ => None,
        }
    }

    /// The file and TCP stream a lease from `f` to `s` would use (on one driver, the stream
    /// sending nothing else), if there are such.
    fn lease_streams(&self, f: usize, s: usize) -> Option<(usize, usize, usize)> {
        let (Some((fi, flen)), Some(si)) = (self.file(f), self.live_of_kind(s, Kind::Tcp)) else {
            return None;
        };
        let st = &self.streams[si];
        let busy = st.sends > 0 || st.bundles > 0 || st.leases > 0;
        (st.is_tcp() && !busy && self.streams[fi].d == st.d).then_some((fi, flen, si))
    }

    fn pages_send(&mut self, f: usize, s: usize, len: usize) -> Outcome {
        let Some((fi, flen, si)) = self.lease_streams(f, s) else {
            return Ok(());
        };
        let d = self.streams[si].d;
        let len = len.clamp(1, 16384);
        let seed = self.streams[fi].seed;
        let off = (seed as usize * 7919) % (flen + 1);
        let n = len.min(flen - off);
        let (tl, tm) = (self.token(), self.token());
        let sock = self.streams[si].fd.clone().unwrap();
        let file = self.streams[fi].fd.clone().unwrap();
        let backing = ringpool::LeaseBacking::Pages { len };
        let drv = self.drivers[d].as_mut().unwrap();
        let id = drv
            .lease(
                &file,
                backing,
                off as u64,
                vec![Member::send(&sock, tm)],
                tl,
            )
            .map_err(|e| Failure::new("start error", format!("pages lease: {e}")))?;
        let leader = LeaderM {
            expect_read: n,
            lease_bytes: pattern_vec(seed, off as u64, n),
            final_buf: Vec::new(),
            targets: vec![si],
            members: vec![tm],
            keep: false,
            filled: false,
            member_failed: false,
        };
        self.started_lease(d, id, tl, leader, fi, si, tm);
        Ok(())
    }

    /// A lease group started: its leader's and its one sending member's models.
    #[allow(clippy::too_many_arguments)]
    fn started_lease(
        &mut self,
        d: usize,
        id: OpId,
        tl: u64,
        leader: LeaderM,
        fi: usize,
        si: usize,
        tm: u64,
    ) {
        self.streams[si].leases += 1;
        let keep = leader.keep;
        self.ops.push(OpM {
            token: tl,
            d,
            id: Some(id),
            kind: OpKindM::Leader(Box::new(leader)),
            s: fi,
            g: None,
            cancelled: false,
            max_bufs: None,
            keep,
        });
        self.ops.push(OpM {
            token: tm,
            d,
            id: None,
            kind: OpKindM::Member { read_in: false },
            s: si,
            g: None,
            cancelled: false,
            max_bufs: None,
            keep: false,
        });
    }

    fn lease_send(&mut self, f: usize, s: usize, len: usize, zc: bool, keep: bool) -> Outcome {
        let Some((fi, flen, si)) = self.lease_streams(f, s) else {
            return Ok(());
        };
        let d = self.streams[si].d;
        let len = len.clamp(1, 16384);
        let drv = self.drivers[d].as_mut().unwrap();
        let buf = drv
            .fixed_buf_or_plain(len)
            .map_err(|e| Failure::new("start error", format!("fixed_buf_or_plain: {e}")))?;
        let seed = self.streams[fi].seed;
        let off = (seed as usize * 7919) % (flen + 1);
        let n = len.min(flen - off);
        let lease_bytes = pattern_vec(seed, off as u64, n);
        let mut final_buf = lease_bytes.clone();
        final_buf.resize(len, 0);
        let (tl, tm) = (self.token(), self.token());
        let sock = self.streams[si].fd.clone().unwrap();
        let file = self.streams[fi].fd.clone().unwrap();
        let member = if zc {
            Member::send_zc(&sock, tm)
        } else {
            Member::send(&sock, tm)
        };
        let drv = self.drivers[d].as_mut().unwrap();
        let id = drv
            .lease_group(&file, buf, off as u64, vec![member], tl)
            .map_err(|e| Failure::new("start error", format!("lease_group: {e}")))?;
        let leader = LeaderM {
            expect_read: n,
            lease_bytes,
            final_buf,
            targets: vec![si],
            members: vec![tm],
            keep,
            filled: false,
            member_failed: false,
        };
        self.started_lease(d, id, tl, leader, fi, si, tm);
        Ok(())
    }

    fn lease_read_in(&mut self, f: usize, len: usize) -> Outcome {
        let Some((fi, flen)) = self.file(f) else {
            return Ok(());
        };
        let d = self.streams[fi].d;
        let len = len.clamp(4, 16384);
        let seed = self.streams[fi].seed;
        let offs = [
            (seed as usize * 31) % (flen + 1),
            (seed as usize * 77) % (flen + 1),
            (seed as usize * 13) % (flen + 1),
        ];
        let ranges = [len / 2..3 * len / 4, 3 * len / 4..len];
        let n0 = len.min(flen - offs[0]);
        let mut final_buf = pattern_vec(seed, offs[0] as u64, n0);
        final_buf.resize(len, 0);
        for (r, &off) in ranges.iter().zip(&offs[1..]) {
            let n = r.len().min(flen - off);
            let mut part = pattern_vec(seed, off as u64, n);
            part.resize(r.len(), 0);
            final_buf[r.clone()].copy_from_slice(&part);
        }
        let tl = self.token();
        let tms = [self.token(), self.token()];
        let file = self.streams[fi].fd.clone().unwrap();
        let members = ranges
            .iter()
            .zip(&offs[1..])
            .zip(tms)
            .map(|((r, &off), t)| Member::read_into(&file, off as u64, r.clone(), t))
            .collect();
        let drv = self.drivers[d].as_mut().unwrap();
        let mut buf = drv
            .fixed_buf_or_plain(len)
            .map_err(|e| Failure::new("start error", format!("fixed_buf_or_plain: {e}")))?;
        buf.fill(0xEE);
        let id = drv
            .lease_group(&file, buf, offs[0] as u64, members, tl)
            .map_err(|e| Failure::new("start error", format!("lease_group: {e}")))?;
        self.ops.push(OpM {
            token: tl,
            d,
            id: Some(id),
            kind: OpKindM::Leader(Box::new(LeaderM {
                expect_read: n0,
                lease_bytes: Vec::new(),
                final_buf,
                targets: Vec::new(),
                members: tms.to_vec(),
                keep: false,
                filled: false,
                member_failed: false,
            })),
            s: fi,
            g: None,
            cancelled: false,
            max_bufs: None,
            keep: false,
        });
        for t in tms {
            self.ops.push(OpM {
                token: t,
                d,
                id: None,
                kind: OpKindM::Member { read_in: true },
                s: fi,
                g: None,
                cancelled: false,
                max_bufs: None,
                keep: false,
            });
        }
        Ok(())
    }

    fn peer_read(&mut self, i: usize) -> Outcome {
        let st = &mut self.streams[i];
        let Peer::Tcp(Some(p)) = &mut st.peer else {
            return Ok(());
        };
        let mut buf = vec![0u8; 65536];
        for _ in 0..1000 {
            match p.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let want = st.out_expected.get(st.out_got..st.out_got + n);
                    if !st.out_broken && want != Some(&buf[..n]) {
                        let why = if want.is_none() {
                            "more bytes than were sent"
                        } else {
                            "bytes other than those sent, in that order"
                        };
                        return fail(
                            "peer got wrong bytes",
                            format!(
                                "stream {i}: the peer read {n} bytes at {}: {why}",
                                st.out_got
                            ),
                        );
                    }
                    st.out_got += n;
                }
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn pop_all(&mut self, d: usize) -> Outcome {
        for _ in 0..100_000 {
            let Some(c) = self.drivers[d].as_mut().and_then(|x| x.pop()) else {
                return Ok(());
            };
            self.dispatch(d, c)?;
        }
        fail("driver error", "pop never ran dry")
    }

    fn settle(&mut self) -> Outcome {
        for d in 0..self.drivers.len() {
            let Some(drv) = self.drivers[d].as_mut() else {
                continue;
            };
            if let Err(e) = drv.submit() {
                return fail("driver error", format!("submit: {e}"));
            }
            self.pop_all(d)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, d: usize, c: Completion) -> Outcome {
        if super::gen::verbose() {
            eprintln!(
                "dispatch d{d} token {} more {} {:?}",
                c.token, c.more, c.event
            );
        }
        let Some(o) = self.ops.iter().position(|o| o.d == d && o.token == c.token) else {
            return fail(
                "unexpected completion",
                format!("driver {d}: token {} is no live op: {:?}", c.token, c.event),
            );
        };
        let more = c.more;
        let s = self.ops[o].s;
        let mut done = !more;
        match c.event {
            Event::Data(chain) => {
                if !matches!(self.ops[o].kind, OpKindM::Recv | OpKindM::Read) {
                    return fail("unexpected completion", "data for an op that is no receive");
                }
                if let Some(max) = self.ops[o].max_bufs {
                    if chain.buf_count() as u32 > max {
                        return fail(
                            "bundle over its limit",
                            format!("stream {s}: {} buffers, limit {max}", chain.buf_count()),
                        );
                    }
                }
                let st = &mut self.streams[s];
                let got = chain.to_vec();
                if got.is_empty() {
                    return fail("empty data", format!("stream {s}: a Data event of 0 bytes"));
                }
                if st.eof {
                    return fail(
                        "data after eof",
                        format!("stream {s}: {} bytes after end of stream", got.len()),
                    );
                }
                let want = pattern_vec(st.seed, st.recv_in, got.len());
                if got != want || st.recv_in + got.len() as u64 > st.sent_in {
                    let at = got.iter().zip(&want).position(|(a, b)| a != b);
                    return fail(
                        "wrong bytes received",
                        format!(
                            "stream {s}: {} bytes received at {} (peer sent {}), first wrong byte at {at:?}: \
                             not the next bytes the peer sent (duplicated, reordered or stale)",
                            got.len(),
                            st.recv_in,
                            st.sent_in
                        ),
                    );
                }
                st.recv_in += got.len() as u64;
                seen::bump(&seen::DATA);
                if chain.buf_count() > 1 {
                    seen::bump(&seen::MULTI_BUF);
                }
                let g = self.ops[o].g;
                if self.ops[o].keep {
                    let bids = chain.iter().map(|b| b.bid()).collect();
                    self.held.push(HeldM {
                        item: Item::Chain(chain),
                        snapshot: got,
                        g,
                        bids,
                        what: format!("chain from stream {s} (step {})", self.step),
                    });
                } else if let Some(g) = g {
                    let n = chain.iter().map(|b| b.bid()).collect::<HashSet<_>>().len();
                    self.groups[g].away = self.groups[g].away.saturating_add(n as u32);
                }
            }
            Event::Eof => {
                let st = &mut self.streams[s];
                let complete = st.recv_in == st.sent_in;
                if !st.reset && (!complete || (!st.shut && !matches!(st.peer, Peer::File { .. }))) {
                    return fail(
                        "early eof",
                        format!(
                            "stream {s}: end of stream after {} of {} bytes (peer shut: {})",
                            st.recv_in, st.sent_in, st.shut
                        ),
                    );
                }
                st.eof = true;
                seen::bump(&seen::EOF);
                done = true;
            }
            Event::Error(e) => {
                self.check_error(o, &e, "receive")?;
                if self.streams[s].reset && !matches!(e, Error::Cancelled) {
                    self.streams[s].ended = true;
                }
                done = true;
            }
            Event::Sent { result, buf } => {
                drop(buf);
                seen::bump(&seen::SENT);
                match &self.ops[o].kind {
                    OpKindM::Send { len, .. } => {
                        let len = *len;
                        match result {
                            Ok(n) if n == len => {}
                            Ok(n) => {
                                return fail(
                                    "short send",
                                    format!("stream {s}: a send of {len} bytes reported Ok({n})"),
                                )
                            }
                            Err(e) => {
                                self.check_error(o, &e, "send")?;
                                self.streams[s].out_broken = true;
                            }
                        }
                    }
                    OpKindM::Member { read_in: false } => {
                        if let Err(e) = result {
                            self.check_error(o, &e, "lease member send")?;
                            self.streams[s].out_broken = true;
                        }
                    }
                    _ => return fail("unexpected completion", "Sent for an op that sends nothing"),
                }
            }
            Event::Returned(_) => {}
            Event::ReadInto { result } => {
                if let Err(e) = result {
                    self.check_error(o, &e, "read-in member")?;
                    let t = c.token;
                    for op in &mut self.ops {
                        if let OpKindM::Leader(l) = &mut op.kind {
                            if l.members.contains(&t) {
                                l.member_failed = true;
                            }
                        }
                    }
                }
            }
            Event::LeaseFilled { result, lease } => {
                let cancelled = self.ops[o].cancelled;
                let OpKindM::Leader(l) = &mut self.ops[o].kind else {
                    return fail("unexpected completion", "LeaseFilled for no leader");
                };
                l.filled = true;
                done = false;
                match result {
                    Ok(n) => {
                        if n != l.expect_read {
                            return fail(
                                "short lease read",
                                format!("leader read {n} bytes, the file had {}", l.expect_read),
                            );
                        }
                        let lease_bytes = std::mem::take(&mut l.lease_bytes);
                        let (targets, keep) = (l.targets.clone(), l.keep);
                        if let Some(lease) = lease {
                            if lease[..] != lease_bytes[..] {
                                return fail("wrong lease bytes", "the lease shows other bytes");
                            }
                            if keep {
                                self.held.push(HeldM {
                                    item: Item::Lease(lease),
                                    snapshot: lease_bytes.clone(),
                                    g: None,
                                    bids: Vec::new(),
                                    what: format!("lease (step {})", self.step),
                                });
                            }
                        }
                        for t in targets {
                            self.streams[t].out_expected.extend_from_slice(&lease_bytes);
                        }
                    }
                    Err(e) => {
                        if !(cancelled && matches!(e, Error::Cancelled)) {
                            return fail("unexpected error", format!("lease leader: {e}"));
                        }
                        // Its members end cancelled.
                        let members = l.members.clone();
                        for op in self.ops.iter_mut().filter(|x| members.contains(&x.token)) {
                            op.cancelled = true;
                        }
                    }
                }
            }
            Event::LeaseReturned(buf) => {
                let OpKindM::Leader(l) = &self.ops[o].kind else {
                    return fail("unexpected completion", "LeaseReturned for no leader");
                };
                if l.filled && (self.ops[o].cancelled || l.member_failed) {
                    // Cancelled after it was filled: members may have read partly.
                } else if l.filled && buf[..] != l.final_buf[..] {
                    let at = buf.iter().zip(&l.final_buf).position(|(a, b)| a != b);
                    return fail(
                        "wrong lease buffer",
                        format!("the returned lease buffer differs at {at:?}"),
                    );
                }
                drop::<FixedBuf>(buf);
                seen::bump(&seen::LEASES);
                done = true;
            }
            Event::PagesReturned => {
                if !matches!(self.ops[o].kind, OpKindM::Leader(_)) {
                    return fail("unexpected completion", "PagesReturned for no leader");
                }
                seen::bump(&seen::PAGES);
                done = true;
            }
            other => {
                return fail("unexpected completion", format!("{other:?}"));
            }
        }
        if done {
            let op = self.ops.remove(o);
            let st = &mut self.streams[op.s];
            match op.kind {
                OpKindM::Recv | OpKindM::Read => st.active = None,
                OpKindM::Send { bundle: true, .. } => st.bundles -= 1,
                OpKindM::Send { .. } => st.sends -= 1,
                OpKindM::Member { read_in: false } => st.leases -= 1,
                _ => {}
            }
        }
        Ok(())
    }

    fn check_error(&self, o: usize, e: &Error, what: &str) -> Outcome {
        let op = &self.ops[o];
        let st = &self.streams[op.s];
        match e {
            Error::Cancelled if op.cancelled => {
                seen::bump(&seen::CANCELLED);
                Ok(())
            }
            // A pages member stopped after part of its share left (the stream has a gap).
            Error::ShortSend { .. } if op.cancelled => {
                seen::bump(&seen::CANCELLED);
                Ok(())
            }
            Error::Cancelled => fail(
                "cancelled but never cancelled",
                format!(
                    "a {what} on stream {} (token {}) ended Cancelled, but nobody cancelled it",
                    op.s, op.token
                ),
            ),
            e if st.reset
                && matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN)
                ) =>
            {
                seen::bump(&seen::RESET);
                Ok(())
            }
            e => fail(
                "unexpected error",
                format!("a {what} on stream {}: {e}", op.s),
            ),
        }
    }

    /// The groups' and drivers' state, for a failure's message.
    fn state(&self) -> String {
        let groups: Vec<String> = self
            .groups
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                let st = g.g.as_ref()?.stats();
                Some(format!(
                    "g{i} (d{}{}): total {} in_kernel {} in_user {} enobufs {} rearms {}",
                    g.d,
                    if g.incremental { ", incremental" } else { "" },
                    st.total,
                    st.in_kernel,
                    st.in_user,
                    st.enobufs,
                    st.rearms
                ))
            })
            .collect();
        let drivers: Vec<String> = self
            .drivers
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let d = d.as_ref()?;
                Some(format!(
                    "d{i}: {:?}, in flight {} [{}]",
                    d.ladder().groups,
                    d.in_flight(),
                    d.debug_state()
                ))
            })
            .collect();
        format!("{}; {}", groups.join("; "), drivers.join("; "))
    }

    /// The invariants that hold after every step.
    fn check(&mut self) -> Outcome {
        if let Some(e) = self.shipper.error.lock().unwrap().take() {
            return fail("held bytes changed", e);
        }
        for h in &self.held {
            if !h.matches() {
                return fail(
                    "held bytes changed",
                    format!(
                        "{} ({} bytes, bids {:?}) changed while the user held it: the kernel wrote into a held buffer",
                        h.what,
                        h.snapshot.len(),
                        h.bids
                    ),
                );
            }
        }
        let mut ranges: Vec<(usize, usize, usize)> = self
            .held
            .iter()
            .enumerate()
            .flat_map(|(i, h)| h.ranges().into_iter().map(move |(a, b)| (a, b, i)))
            .collect();
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return fail(
                    "buffer held twice",
                    format!(
                        "{} and {} overlap in memory",
                        self.held[w[0].2].what, self.held[w[1].2].what
                    ),
                );
            }
        }
        for (gi, g) in self.groups.iter_mut().enumerate() {
            let Some(group) = &g.g else { continue };
            let st = group.stats();
            let mut bids = Vec::new();
            for h in self.held.iter().filter(|h| h.g == Some(gi)) {
                bids.extend(h.bids.iter().copied());
            }
            let distinct: HashSet<u16> = bids.iter().copied().collect();
            if !g.incremental && distinct.len() != bids.len() {
                return fail(
                    "buffer held twice",
                    format!("group {gi}: the user holds a bid twice: {bids:?}"),
                );
            }
            let held = distinct.len() as u32;
            if st.total < g.total || st.total > g.max {
                return fail(
                    "group size",
                    format!(
                        "group {gi}: total {} (was {}, max {})",
                        st.total, g.total, g.max
                    ),
                );
            }
            g.total = st.total;
            if st.in_user < held || st.in_user > held.saturating_add(g.away) {
                return fail(
                    "buffer accounting",
                    format!(
                        "group {gi}: in_user {} but the user holds {held} buffers ({} on their way home)",
                        st.in_user, g.away
                    ),
                );
            }
            if st.in_user == held {
                g.away = 0;
            }
            if st.in_kernel + st.in_user > st.total {
                return fail(
                    "buffer accounting",
                    format!("group {gi}: {st:?} counts more buffers than it has"),
                );
            }
        }
        Ok(())
    }

    /// The end: everything dropped, every stream drained, every group full.
    fn finish(&mut self) -> Outcome {
        while let Some(h) = self.held.pop() {
            self.left_hands(&h);
        }
        // From now on nothing received is kept (a lease the user kept is dropped above).
        for o in &mut self.ops {
            o.keep = false;
            if let OpKindM::Leader(l) = &mut o.kind {
                l.keep = false;
            }
        }
        self.shipper.finish();
        if let Some(e) = self.shipper.error.lock().unwrap().take() {
            return fail("held bytes changed", e);
        }
        if self.avoid.eof_incremental {
            // A pipe read into an incremental group must not end at EOF (defect 1): give it a
            // byte and let it complete before the writer closes.
            let deadline = Instant::now() + drain_time();
            for i in 0..self.streams.len() {
                if !self.reads_incremental(i) {
                    continue;
                }
                self.do_action(&PeerWrite {
                    s: self.kind_index(i, Kind::Written),
                    len: 1,
                })?;
                while self.reads_incremental(i) && Instant::now() < deadline {
                    self.do_action(&Wait { ms: 10 })?;
                }
            }
        }
        // Peers stop writing; every receive that can still run drains its stream.
        for st in &mut self.streams {
            match &mut st.peer {
                Peer::Tcp(Some(p)) => {
                    let _ = p.shutdown(std::net::Shutdown::Write);
                }
                Peer::Pipe(w) => {
                    w.take();
                }
                _ => {}
            }
            st.shut = true;
        }
        let deadline = Instant::now() + drain_time();
        loop {
            self.settle()?;
            self.check()?;
            let mut busy = false;
            for i in 0..self.streams.len() {
                let st = &self.streams[i];
                let alive = st.fd.is_some() && self.drivers[st.d].is_some();
                if st.is_tcp() && st.out_got < st.out_expected.len() && !st.out_broken {
                    busy = true;
                }
                self.peer_read(i)?;
                let st = &self.streams[i];
                if matches!(st.peer, Peer::File { .. }) || st.eof || st.ended {
                    continue;
                }
                if st.active.is_some() {
                    busy = true;
                    continue;
                }
                if !alive {
                    continue;
                }
                // A fresh group of this driver for draining, so held-up groups cannot stall it.
                busy = true;
                let d = st.d;
                let usable = |g: &GroupM| {
                    g.d == d && g.g.is_some() && !(self.avoid.eof_incremental && g.incremental)
                };
                let gi = match self.groups.iter().position(usable) {
                    Some(gi) => gi,
                    None => {
                        let drv = self.drivers[d].as_mut().unwrap();
                        let g = drv
                            .buf_group(BufGroupConfig::new(4096, 8))
                            .map_err(|e| Failure::new("setup", format!("buf_group: {e}")))?;
                        self.groups.push(GroupM {
                            d,
                            incremental: false,
                            max: 8,
                            total: 8,
                            g: Some(g),
                            away: 0,
                        });
                        self.groups.len() - 1
                    }
                };
                let a = if st.is_tcp() {
                    Recv {
                        s: self.kind_index(i, Kind::Tcp),
                        g: gi,
                        mode: Mode::Multishot,
                        keep: false,
                    }
                } else {
                    ReadSelect {
                        s: self.kind_index(i, Kind::Read),
                        g: gi,
                        keep: false,
                    }
                };
                self.do_action(&a)?;
            }
            let sending = self
                .ops
                .iter()
                .any(|o| !matches!(o.kind, OpKindM::Recv | OpKindM::Read));
            if !busy && !sending {
                break;
            }
            if Instant::now() > deadline {
                let st: Vec<String> = self
                    .streams
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        format!(
                            "s{i}: in {}/{} eof {} active {:?} out {}/{} broken {}",
                            s.recv_in,
                            s.sent_in,
                            s.eof,
                            s.active,
                            s.out_got,
                            s.out_expected.len(),
                            s.out_broken
                        )
                    })
                    .collect();
                return fail(
                    "drain stalled",
                    format!(
                        "after {:?}: {} ops live; {}; {}",
                        drain_time(),
                        self.ops.len(),
                        st.join("; "),
                        self.state()
                    ),
                );
            }
            self.do_action(&Wait { ms: 10 })?;
        }
        for (i, st) in self.streams.iter().enumerate() {
            if st.is_tcp() && !st.out_broken && st.out_got != st.out_expected.len() {
                return fail(
                    "peer missing bytes",
                    format!(
                        "stream {i}: the peer read {} of {} bytes sent",
                        st.out_got,
                        st.out_expected.len()
                    ),
                );
            }
        }
        // Everything else ends: cancel what is left and wait for the final completions.
        for d in 0..self.drivers.len() {
            for st in self.streams.iter().filter(|s| s.d == d) {
                if let (Some(fd), Some(drv)) = (&st.fd, self.drivers[d].as_mut()) {
                    drv.cancel_fd(fd);
                }
            }
        }
        for o in &mut self.ops {
            o.cancelled = true;
        }
        let ids: Vec<(usize, OpId)> = self.ops.iter().filter_map(|o| Some((o.d, o.id?))).collect();
        for (d, id) in ids {
            if let Some(drv) = self.drivers[d].as_mut() {
                drv.cancel(id);
            }
        }
        let deadline = Instant::now() + drain_time();
        loop {
            self.do_action(&Wait { ms: 10 })?;
            let in_flight: usize = self.drivers.iter().flatten().map(|d| d.in_flight()).sum();
            // A group whose driver is gone gets no more returns from `Bytes` (they go home
            // through the driver): only groups of live drivers must be full again.
            let live = |g: &&GroupM| self.drivers[g.d].is_some();
            let out: u32 = self
                .groups
                .iter()
                .filter(live)
                .filter_map(|g| g.g.as_ref())
                .map(|g| g.stats().in_user)
                .sum();
            if in_flight == 0 && out == 0 {
                break;
            }
            if Instant::now() > deadline {
                return fail(
                    "not full at the end",
                    format!(
                        "after {:?}: {in_flight} ops in flight, {out} buffers out",
                        drain_time()
                    ),
                );
            }
        }
        for g in self.groups.iter().filter_map(|g| g.g.as_ref()) {
            let st = g.stats();
            seen::GROWS.fetch_add(st.grows, std::sync::atomic::Ordering::Relaxed);
            seen::ENOBUFS.fetch_add(st.enobufs, std::sync::atomic::Ordering::Relaxed);
        }
        for (gi, g) in self.groups.iter().enumerate() {
            if self.drivers[g.d].is_none() {
                continue;
            }
            if let Some(group) = &g.g {
                let st = group.stats();
                if st.in_kernel != st.total || st.in_user != 0 {
                    return fail(
                        "not full at the end",
                        format!("group {gi}: {st:?} after everything was dropped"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Runs one case; used by the generator and by the regression tests.
pub fn run(header: &Header, actions: &[Action]) -> Outcome {
    let _ = ringpool::Features::get();
    let fds_before = open_fds();
    let leaked_before = ringpool::leaked_ops();
    let result = {
        let mut w = World::new(header)?;
        let mut r = Ok(());
        for (i, a) in actions.iter().enumerate() {
            w.step = i;
            if super::gen::verbose() {
                eprintln!("step {i}: {a:?}");
            }
            r = w
                .do_action(a)
                .and_then(|_| w.settle())
                .and_then(|_| w.check());
            if let Err(f) = &mut r {
                f.detail = format!("step {i} ({a:?}): {}", f.detail);
                break;
            }
        }
        if r.is_ok() {
            r = w.finish();
            if let Err(f) = &mut r {
                f.detail = format!("at the end (drain, then settle): {}", f.detail);
            }
        }
        w.shipper.finish();
        // Drop order: what the user holds, groups, streams, then the drivers.
        w.held.clear();
        w.groups.clear();
        w.streams.clear();
        w.ops.clear();
        w.drivers.clear();
        r
    };
    result?;
    if ringpool::leaked_ops() != leaked_before {
        return fail(
            "leaked ops",
            format!(
                "leaked_ops() went from {leaked_before} to {}",
                ringpool::leaked_ops()
            ),
        );
    }
    let fds_after = open_fds();
    if fds_after != fds_before {
        return fail(
            "descriptor leaked",
            format!("{fds_before} descriptors before the case, {fds_after} after"),
        );
    }
    Ok(())
}

/// A regression test's body: runs the case and panics with the failure.
pub fn replay(header: Header, actions: &[Action]) {
    let _serial = crate::serial();
    if let Err(f) = run(&header, actions) {
        panic!("[{}] {}", f.tag, f.detail);
    }
}

pub struct Core;

/// A generated file: on tmpfs when its length is odd (no draw of its own, so a seed still
/// makes the same cases), else where `tempfile` puts it.
fn file(d: usize, len: usize) -> Action {
    if len % 2 == 1 {
        NewTmpfsFile { d, len }
    } else {
        NewFile { d, len }
    }
}

impl Machine for Core {
    type Header = Header;
    type Action = Action;
    const NAME: &'static str = "core";
    const REPLAY: &'static str = "core::replay";

    fn run(header: &Header, actions: &[Action]) -> Outcome {
        run(header, actions)
    }

    fn generate(rng: &mut Rng) -> (Header, Vec<Action>) {
        let rung = rng.pick(&[
            Rung::Best,
            Rung::Best,
            Rung::Best,
            Rung::Legacy,
            Rung::NoMultishot,
            Rung::NoBundle,
            Rung::NoIncremental,
            Rung::LegacyNoMultishot,
            Rung::Oldest,
        ]);
        let drivers = if rng.pct(20) { 2 } else { 1 };
        let avoid = *AVOID.lock().unwrap_or_else(|e| e.into_inner());
        let rung = match rung {
            Rung::Legacy | Rung::LegacyNoMultishot | Rung::Oldest if avoid.forced_legacy_rungs => {
                Rung::Best
            }
            rung => rung,
        };
        let header = Header {
            rung,
            drivers,
            avoid,
        };
        let mut a = Vec::new();
        let ix = |rng: &mut Rng| rng.below(8);
        let groups = 1 + rng.below(3);
        for _ in 0..groups {
            let kind = rng.pick(&[
                GroupKind::Ring,
                GroupKind::Incremental,
                GroupKind::Incremental,
                GroupKind::Registered,
                GroupKind::Growing,
            ]);
            a.push(NewGroup {
                d: rng.below(drivers),
                kind,
                size: rng.pick(&[64, 256, 1024, 4096]),
                count: rng.pick(&[1, 2, 4, 8]),
            });
        }
        let streams = 1 + rng.below(4);
        for _ in 0..streams {
            let d = rng.below(drivers);
            a.push(match rng.below(4) {
                0 | 1 => NewTcp { d },
                2 => NewPipe { d },
                _ => file(d, rng.len().min(20_000)),
            });
        }
        let steps = 20 + rng.below(80);
        for _ in 0..steps {
            let act = match rng.below(100) {
                0..=15 => PeerWrite {
                    s: ix(rng),
                    len: rng.len(),
                },
                16..=18 => PeerShutdown { s: ix(rng) },
                19..=20 => PeerReset { s: ix(rng) },
                21..=22 => PeerRead { s: ix(rng) },
                23..=32 => Recv {
                    s: ix(rng),
                    g: ix(rng),
                    mode: rng.pick(&[
                        Mode::Once,
                        Mode::Bundle,
                        Mode::BundleLimited(1),
                        Mode::BundleLimited(2),
                        Mode::BundleLimited(3),
                        Mode::Multishot,
                        Mode::MultishotBundle,
                    ]),
                    keep: rng.pct(60),
                },
                33..=42 => ReadSelect {
                    s: ix(rng),
                    g: ix(rng),
                    keep: rng.pct(60),
                },
                43..=50 => Transmit {
                    s: ix(rng),
                    how: rng.pick(&[How::Plain, How::Zc, How::Bundled]),
                    src: if rng.pct(50) {
                        Src::Held(ix(rng))
                    } else {
                        Src::Owned(rng.len())
                    },
                },
                51..=52 => LeaseSend {
                    f: ix(rng),
                    s: ix(rng),
                    len: rng.len().min(16384),
                    zc: rng.pct(50),
                    keep: rng.pct(50),
                },
                53..=54 => PagesSend {
                    f: ix(rng),
                    s: ix(rng),
                    len: rng.len().min(16384),
                },
                55 => LeaseReadIn {
                    f: ix(rng),
                    len: rng.len().min(16384),
                },
                56..=58 => Cancel {
                    op: ix(rng),
                    foreign: drivers > 1 && rng.pct(50),
                },
                59 => CancelFd { s: ix(rng) },
                60 => CancelToken { op: ix(rng) },
                61..=68 => DropHeld { h: ix(rng) },
                69..=70 => IntoBytes { h: ix(rng) },
                71..=72 => ShipHeld {
                    h: ix(rng),
                    ms: rng.below(20) as u64,
                },
                73 => DropGroup { g: ix(rng) },
                74 => DropFd { s: ix(rng) },
                75 if rng.pct(30) => DropDriver { d: ix(rng) },
                76..=78 => NewPipe {
                    d: rng.below(drivers),
                },
                79 => NewTcp {
                    d: rng.below(drivers),
                },
                80 => file(rng.below(drivers), rng.len().min(20_000)),
                81..=83 => Burst {
                    s: ix(rng),
                    n: 2 + rng.below(7),
                    len: rng.len(),
                    zc: rng.pct(30),
                },
                _ => Wait {
                    ms: rng.pick(&[0, 1, 2, 5, 10, 20]),
                },
            };
            a.push(act);
        }
        (header, a)
    }

    fn simplify(a: &Action) -> Vec<Action> {
        let mut out = Vec::new();
        let smaller = |len: usize| -> Vec<usize> {
            let mut v = Vec::new();
            for c in [1, 10, 64, 4096, len / 2] {
                if c < len && !v.contains(&c) {
                    v.push(c);
                }
            }
            v
        };
        match a.clone() {
            PeerWrite { s, len } => {
                out.extend(smaller(len).into_iter().map(|len| PeerWrite { s, len }))
            }
            NewFile { d, len } => {
                out.extend(smaller(len).into_iter().map(|len| NewFile { d, len }))
            }
            NewTmpfsFile { d, len } => {
                out.push(NewFile { d, len });
                out.extend(smaller(len).into_iter().map(|len| NewTmpfsFile { d, len }))
            }
            Recv { s, g, mode, keep } => {
                if mode != Mode::Once {
                    out.push(Recv {
                        s,
                        g,
                        mode: Mode::Once,
                        keep,
                    });
                }
                if keep {
                    out.push(Recv {
                        s,
                        g,
                        mode,
                        keep: false,
                    });
                }
            }
            ReadSelect { s, g, keep: true } => out.push(ReadSelect { s, g, keep: false }),
            Burst { s, n, len, zc } => {
                if zc {
                    out.push(Burst {
                        s,
                        n,
                        len,
                        zc: false,
                    });
                }
                if n > 2 {
                    out.push(Burst {
                        s,
                        n: n - 1,
                        len,
                        zc,
                    });
                }
                out.extend(smaller(len).into_iter().map(|len| Burst { s, n, len, zc }));
            }
            Transmit { s, how, src } => {
                if how != How::Plain {
                    out.push(Transmit {
                        s,
                        how: How::Plain,
                        src,
                    });
                }
                if let Src::Owned(len) = src {
                    out.extend(smaller(len).into_iter().map(|len| Transmit {
                        s,
                        how,
                        src: Src::Owned(len),
                    }));
                }
            }
            LeaseSend {
                f,
                s,
                len,
                zc,
                keep,
            } => {
                if zc || keep {
                    out.push(LeaseSend {
                        f,
                        s,
                        len,
                        zc: false,
                        keep: false,
                    });
                }
                out.extend(smaller(len).into_iter().map(|len| LeaseSend {
                    f,
                    s,
                    len,
                    zc,
                    keep,
                }));
            }
            PagesSend { f, s, len } => {
                out.extend(smaller(len).into_iter().map(|len| PagesSend { f, s, len }));
            }
            Wait { ms } if ms > 1 => out.push(Wait { ms: 1 }),
            NewGroup {
                d,
                kind,
                size,
                count,
            } => {
                if kind != GroupKind::Ring {
                    out.push(NewGroup {
                        d,
                        kind: GroupKind::Ring,
                        size,
                        count,
                    });
                }
                if count > 1 {
                    out.push(NewGroup {
                        d,
                        kind,
                        size,
                        count: count / 2,
                    });
                }
            }
            ShipHeld { h, ms } if ms > 0 => out.push(ShipHeld { h, ms: 0 }),
            _ => {}
        }
        out
    }
}
