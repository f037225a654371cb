//! Shared helpers of the kernel tests: visible skips, the rungs to run each test on, a
//! deterministic byte pattern, and loopback socket pairs.
#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ringpool::{Completion, Driver, DriverConfig, Event, Features, FixedBuf, Force};

/// Skips the test (returns false) when `supported` is false, printing why; with
/// `RINGPOOL_REQUIRE_ALL=1` a missing feature fails the test instead.
pub fn require(supported: bool, feature: &str) -> bool {
    if supported {
        return true;
    }
    let kernel = Features::get().kernel;
    if std::env::var("RINGPOOL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{feature} not supported by this kernel ({kernel}) but RINGPOOL_REQUIRE_ALL=1");
    }
    eprintln!("skipped: {feature} not supported by this kernel ({kernel})");
    false
}

/// Whether the test runs in a kernel-matrix guest (`RINGPOOL_KERNEL_MATRIX=1`): its CPU is
/// emulated, so volume tests carry less there (the point of a guest is the rung, not the volume).
pub fn in_emulated_guest() -> bool {
    std::env::var("RINGPOOL_KERNEL_MATRIX").is_ok_and(|v| v == "1")
}

/// Like [`require`], for what the test environment (not the kernel) must provide: a disk
/// filesystem for `O_DIRECT`, root and `setpriv`. The kernel-matrix guests lack some of these.
pub fn require_env(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("RINGPOOL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{what} is not available here but RINGPOOL_REQUIRE_ALL=1");
    }
    eprintln!("skipped: {what} is not available here");
    false
}

/// A named driver configuration: one rung of the fallback ladder.
pub struct Rung {
    pub name: &'static str,
    pub force: &'static [Force],
}

impl Rung {
    /// The configuration of this rung (ignoring `RINGPOOL_FORCE`).
    pub fn config(&self) -> DriverConfig {
        let mut cfg = DriverConfig::default().ignore_env();
        for f in self.force {
            cfg = cfg.force(*f);
        }
        cfg
    }

    pub fn driver(&self) -> Driver {
        self.driver_with(self.config())
    }

    /// A driver of `cfg`, which should come from [`Rung::config`].
    pub fn driver_with(&self, cfg: DriverConfig) -> Driver {
        let d = Driver::new(cfg).expect("driver");
        eprintln!("rung {}: {:?}", self.name, d.ladder());
        d
    }
}

/// The rungs every end-to-end test runs on: the kernel's best, and each fallback forced.
pub const RUNGS: &[Rung] = &[
    Rung {
        name: "best",
        force: &[],
    },
    Rung {
        name: "legacy-provide",
        force: &[Force::LegacyProvide],
    },
    Rung {
        name: "no-multishot",
        force: &[Force::NoMultishot],
    },
    Rung {
        name: "no-bundle+no-defer-taskrun",
        force: &[Force::NoBundle, Force::NoDeferTaskrun],
    },
    Rung {
        name: "legacy+no-multishot+no-ext-arg",
        force: &[Force::LegacyProvide, Force::NoMultishot, Force::NoExtArg],
    },
];

/// A deterministic, seekable byte stream: byte `i` of stream `seed`.
pub fn pattern(seed: u64, i: u64) -> u8 {
    let mut x =
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i / 8).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x >> ((i % 8) * 8)) as u8
}

pub fn pattern_vec(seed: u64, start: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(seed, start + i)).collect()
}

/// A connected loopback TCP pair: (server side, client side).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (s, c)
}

/// Closes `c` with a reset (SO_LINGER 0: close() sends RST instead of FIN).
pub fn reset(c: TcpStream) {
    // SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads a valid `linger` of the given size; the fd is a live socket.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(c);
}

/// Waits for completions until `f` returns true for one of them, or panics after `secs`.
pub fn pump(driver: &mut Driver, secs: u64, mut f: impl FnMut(Completion) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for completions"
        );
        driver.wait(Some(Duration::from_millis(100))).unwrap();
        while let Some(c) = driver.pop() {
            if f(c) {
                return;
            }
        }
    }
}

/// Joins `reader` (a thread reading a peer to its end) while `d` goes on waiting, and returns
/// what it read. The kernel drops its last reference to a descriptor an io-wq op used (a
/// splice's socket) in task work that a `DEFER_TASKRUN` ring runs only when its owner waits
/// again (seen on Debian's 7.3): a socket the user closed after such an op closes, and its peer
/// sees the end, once the driver waits. A server's loop always does; a test must as well.
/// Completions that come meanwhile are dropped: call it once the driver's work is over.
pub fn join_while_waiting<T>(d: &mut Driver, reader: std::thread::JoinHandle<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "the reader did not finish");
        while d.pop().is_some() {}
        d.wait(Some(Duration::from_millis(10))).unwrap();
    }
    reader.join().unwrap()
}

/// Reads until EOF (bounded in time by the socket's timeout).
pub fn read_to_end(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}

/// Waits for the one completion of a fixed op and returns its buffer and result.
pub fn fixed_result(d: &mut Driver) -> (FixedBuf, ringpool::Result<usize>) {
    let mut out = None;
    pump(d, 10, |c| match c.event {
        Event::FixedIo { buf, result } => {
            out = Some((buf, result));
            true
        }
        other => panic!("{other:?}"),
    });
    out.unwrap()
}

/// A directory on tmpfs to create files in: `/dev/shm`, else the temporary directory if it is
/// tmpfs (the kernel-matrix guests' `/tmp`). Reads of tmpfs files cannot complete without
/// blocking in the kernel's eyes: io_uring consumes their selected buffer at issue and completes
/// them from io-wq, after ops issued behind them (ext4 reads of cached pages complete inline).
pub fn tmpfs_dir() -> Option<std::path::PathBuf> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let is_tmpfs = |p: &std::path::Path| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: `statfs` is plain old data, for which all zeros is a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs reads the NUL-terminated path `c` and writes one `statfs` into `st`;
        // both live across the call.
        let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        rc == 0 && st.f_type as i64 == TMPFS_MAGIC
    };
    [std::path::PathBuf::from("/dev/shm"), std::env::temp_dir()]
        .into_iter()
        .find(|p| is_tmpfs(p) && tempfile::tempfile_in(p).is_ok())
}

thread_local! {
    /// The splice path the running test variant drives (`both_splice_paths!`).
    static IO_WQ_SPLICES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `test` with [`splice_config`] on the io-wq splice path (`io_wq`) or the default one.
pub fn with_splice_path(io_wq: bool, test: fn()) {
    IO_WQ_SPLICES.with(|p| p.set(io_wq));
    test();
}

/// The config of a splicing test's driver (`RINGPOOL_FORCE` ignored): the default path, where
/// the driver runs splices and tees itself as non-blocking calls, or, in a test's `io_wq`
/// variant, `Force::NoInlineSplice` (every splice and tee an SQE, run in an io-wq worker).
pub fn splice_config() -> DriverConfig {
    let config = DriverConfig::default().ignore_env();
    if IO_WQ_SPLICES.with(|p| p.get()) {
        config.force(Force::NoInlineSplice)
    } else {
        config
    }
}

/// Each named test (a plain `fn()` of the file) as two tests, `NAME::inline` and
/// `NAME::io_wq`, whose drivers (from [`splice_config`]) take either splice path.
#[allow(unused_macros)]
macro_rules! both_splice_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn inline() {
                crate::common::with_splice_path(false, super::$name)
            }
            #[test]
            fn io_wq() {
                crate::common::with_splice_path(true, super::$name)
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use both_splice_paths;

/// A pipe (read end, write end), blocking, close-on-exec.
pub fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// Sets socket option `opt` (`SO_SNDBUF`, `SO_RCVBUF`) of socket `fd` to `bytes`.
pub fn set_sock_buf(fd: i32, opt: i32, bytes: libc::c_int) {
    // SAFETY: setsockopt reads an int of the given size; the fd is a live socket of the test.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}
