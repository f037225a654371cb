//! Typed errors. Every error names what was asked and why it cannot be done, and converts into
//! `io::Error` for code that wants one error type.

use std::io;

use crate::sys::KernelVersion;

/// The result type of ringpool.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong.
///
/// # Examples
/// ```
/// use ringpool::{BufGroupConfig, Driver, Error};
/// let mut driver = Driver::new(Default::default()).unwrap();
/// let err = driver.buf_group(BufGroupConfig::new(4096, 100)).unwrap_err();
/// assert!(matches!(err, Error::InvalidBufferCount { count: 100, .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What ringpool was doing.
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The ring size asked for is not usable.
    #[error("ring size {entries} is invalid: it must be a power of two between 1 and {max}")]
    InvalidRingSize {
        /// Entries asked for.
        entries: u32,
        /// Largest accepted value.
        max: u32,
    },
    /// A buffer group's buffer count must be a power of two no larger than 32768.
    #[error("buffer count {count} is invalid: it must be a power of two between 1 and {max}")]
    InvalidBufferCount {
        /// Count asked for.
        count: u32,
        /// Largest accepted value.
        max: u32,
    },
    /// A buffer group's buffer size must be at least 1 byte and at most the limit.
    #[error("buffer size {size} is invalid: it must be between 1 and {max} bytes")]
    InvalidBufferSize {
        /// Size asked for.
        size: usize,
        /// Largest accepted value.
        max: usize,
    },
    /// A group's maximum is below its initial count, or not a power of two.
    #[error("buffer group growth limit {max_count} is invalid for an initial count of {count}")]
    InvalidGrowth {
        /// Initial count.
        count: u32,
        /// Growth limit asked for.
        max_count: u32,
    },
    /// The group id is already registered on this ring.
    #[error("buffer group id {bgid} is already in use on this ring")]
    GroupIdInUse {
        /// The id asked for.
        bgid: u16,
    },
    /// Every buffer group id is taken.
    #[error("no free buffer group id left on this ring")]
    GroupIdsExhausted,
    /// The pool asked for exceeds what this machine could ever hold.
    #[error("a pool of {bytes} bytes cannot be allocated ({reason})")]
    OutOfMemory {
        /// Bytes asked for.
        bytes: u128,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The running kernel lacks a feature that was required (not merely preferred).
    #[error("{feature} is not supported by this kernel ({kernel})")]
    Unsupported {
        /// The missing feature.
        feature: &'static str,
        /// The running kernel.
        kernel: KernelVersion,
    },
    /// A buffer group ran dry and the caller asked to see that instead of waiting.
    #[error("buffer group {bgid} is exhausted (every buffer is in use)")]
    PoolExhausted {
        /// The exhausted group.
        bgid: u16,
    },
    /// The kernel refused to set up the ring itself for lack of locked memory: io_uring
    /// charges its rings to the user's locked memory (`RLIMIT_MEMLOCK`, shared by every
    /// process of that user) unless the process has `CAP_IPC_LOCK`.
    ///
    /// # Examples
    /// ```
    /// let e = ringpool::Error::RingMemlock { sq_entries: 256, cq_entries: 2048, needs: 73728, limit: Some(65536) };
    /// assert!(e.to_string().contains("RLIMIT_MEMLOCK"));
    /// ```
    #[error("io_uring_setup refused a ring of {sq_entries} submission and {cq_entries} completion entries (about {} KiB of locked memory) under RLIMIT_MEMLOCK = {}: io_uring charges rings to the user's locked memory, shared by all of that user's processes (rings still being torn down count too); raise `ulimit -l`, run with CAP_IPC_LOCK, or ask for a smaller ring", needs.div_ceil(1024), match limit { Some(l) => format!("{} KiB", l / 1024), None => "unlimited".to_string() })]
    RingMemlock {
        /// Submission queue entries asked for.
        sq_entries: u32,
        /// Completion queue entries asked for.
        cq_entries: u32,
        /// Bytes of ring memory this ring needs, estimated from its sizes (page-rounded).
        needs: u64,
        /// The soft `RLIMIT_MEMLOCK` in bytes (`None`: unlimited).
        limit: Option<u64>,
    },
    /// The kernel refused to pin more memory: registering it would exceed `RLIMIT_MEMLOCK`.
    #[error("registering {asked} bytes exceeds the memlock limit ({}; {registered} bytes already registered by this ring); raise `ulimit -l`, run with CAP_IPC_LOCK, or allow the fallback to unregistered memory", match limit { Some(l) => format!("{l} bytes"), None => "unlimited, yet the kernel refused".to_string() })]
    MemlockExceeded {
        /// Bytes this registration asked for.
        asked: u64,
        /// Bytes this ring had registered already.
        registered: u64,
        /// The soft `RLIMIT_MEMLOCK` in bytes (`None`: unlimited).
        limit: Option<u64>,
    },
    /// Every slot of the fixed buffer table is taken (or waits for the kernel to let go).
    #[error("the fixed buffer table is full ({slots} slots); drop registered buffers or configure more slots")]
    FixedTableFull {
        /// Slots in the table.
        slots: u32,
    },
    /// A group's buffers are too small for the op (a datagram receive needs room for the
    /// kernel's header and the sender's address in front of the payload).
    #[error("buffers of {size} bytes are too small for {what}: at least {min} bytes are needed")]
    BufferTooSmall {
        /// The group's buffer size.
        size: usize,
        /// The smallest size that works.
        min: usize,
        /// The op that needs more room.
        what: &'static str,
    },
    /// A pages lease ([`LeaseBacking::Pages`](crate::LeaseBacking::Pages)) on a descriptor
    /// `splice(2)` cannot read from or write to, such as a directory.
    ///
    /// # Examples
    /// ```
    /// let e = ringpool::Error::NotSpliceable { role: "leader", kind: "a directory" };
    /// assert!(e.to_string().contains("directory"));
    /// ```
    #[error("a pages lease's {role} cannot splice: its descriptor is {kind} (splice needs a regular file, a socket or a pipe)")]
    NotSpliceable {
        /// Which part of the lease: `"leader"` or `"member"`.
        role: &'static str,
        /// What the descriptor is.
        kind: &'static str,
    },
    /// A pages lease longer than its pipe can hold: a pipe holds at most
    /// `/proc/sys/fs/pipe-max-size` bytes, one page per slot.
    ///
    /// # Examples
    /// ```
    /// let e = ringpool::Error::LeaseTooLong { len: 2 << 20, max: 1 << 20 };
    /// assert!(e.to_string().contains("1048576"));
    /// ```
    #[error("a pages lease of {len} bytes does not fit a pipe: at most {max} bytes from this offset (/proc/sys/fs/pipe-max-size); lease shorter chunks")]
    LeaseTooLong {
        /// Bytes asked for.
        len: usize,
        /// The longest lease that fits, from the offset asked for.
        max: usize,
    },
    /// Every pipe [`DriverConfig::max_pipes`](crate::DriverConfig::max_pipes) allows is in
    /// use (a pages lease takes all of its pipes at its start; splice streams wait instead).
    ///
    /// # Examples
    /// ```
    /// let e = ringpool::Error::PipesExhausted { max: 64 };
    /// assert!(e.to_string().contains("max_pipes"));
    /// ```
    #[error("all {max} pipes DriverConfig::max_pipes allows are in use")]
    PipesExhausted {
        /// The bound.
        max: usize,
    },
    /// An argument that cannot be used this way.
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong.
        what: &'static str,
    },
    /// A buffer group or send ring passed to a driver that did not make it: each belongs to
    /// its driver's ring, where its group id means it (and only there).
    #[error("{what} of another driver: use it with the driver that made it")]
    NotOurs {
        /// What was passed.
        what: &'static str,
    },
    /// An [`rt::timeout`](crate::rt::timeout) elapsed before its future completed.
    #[error("timed out")]
    TimedOut,
    /// The operation was cancelled before it completed. For a send: the kernel reported no
    /// byte sent (a cancelled send that had sent some is [`Error::ShortSend`]; 5.x kernels do
    /// not report the bytes a send cancelled while it blocked had sent).
    #[error("operation cancelled")]
    Cancelled,
    /// A send ended before every byte left: it was cancelled part-way, or the kernel accepted
    /// no more bytes. The first `sent` bytes of the `len` were sent, and the rest was not: a
    /// stream that goes on must send those again.
    #[error("the send ended after {sent} of {len} bytes")]
    ShortSend {
        /// Bytes that left.
        sent: usize,
        /// Bytes the send had.
        len: usize,
    },
    /// An [`rt`](crate::rt) operation was used after the runtime that started it ended (it
    /// was returned out of its `rt::block_on`): it was cancelled then, and can do nothing more.
    /// Start a new one in the running runtime.
    #[error("the ringpool::rt runtime that started this operation has ended: start it anew")]
    RuntimeGone,
    /// The kernel has the feature, but a lower fallback rung was forced (`RINGPOOL_FORCE` or
    /// [`DriverConfig::force`](crate::DriverConfig::force)).
    #[error("{feature} is off: the `{rung}` fallback rung is forced (RINGPOOL_FORCE or DriverConfig::force)")]
    RungForced {
        /// The feature that is off.
        feature: &'static str,
        /// The forced rung's name.
        rung: &'static str,
    },
    /// A zero-copy receive area could not be registered; `reason` says why and what would
    /// make it work. Receiving through buffer groups ([`Driver::recv`](crate::Driver::recv))
    /// is the fallback.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Error, ZcrxRefusal};
    /// let e = Error::ZcrxUnavailable { reason: ZcrxRefusal::NoCapNetAdmin };
    /// assert!(e.to_string().contains("CAP_NET_ADMIN"));
    /// ```
    #[error("zero-copy receive is not available: {reason}")]
    ZcrxUnavailable {
        /// Why.
        reason: crate::ZcrxRefusal,
    },
    /// `RINGPOOL_FORCE` or a builder option named an unknown rung.
    #[error("unknown fallback rung {name:?} (known: {known})")]
    UnknownRung {
        /// What was given.
        name: String,
        /// The names that are accepted.
        known: &'static str,
    },
}

impl Error {
    /// Wraps the OS error `errno` (a negative CQE result or a positive errno).
    pub(crate) fn from_errno(op: &'static str, errno: i32) -> Error {
        Error::Os {
            op,
            source: io::Error::from_raw_os_error(errno.abs()),
        }
    }

    /// Whether this error means "memory could not be registered" (memlock, a full table, the
    /// kernel or a forced rung), where plain memory is the documented fallback.
    pub(crate) fn refused_registration(&self) -> bool {
        matches!(
            self,
            Error::MemlockExceeded { .. }
                | Error::FixedTableFull { .. }
                | Error::Unsupported { .. }
                | Error::RungForced { .. }
        )
    }

    /// Wraps an `io::Error` from a setup call.
    pub(crate) fn os(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Os { op, source }
    }

    /// The raw OS error number, when the error came from the kernel.
    ///
    /// # Examples
    /// ```
    /// use ringpool::Error;
    /// assert_eq!(Error::Cancelled.raw_os_error(), Some(libc::ECANCELED));
    /// ```
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } => source.raw_os_error(),
            Error::Cancelled => Some(libc::ECANCELED),
            Error::PoolExhausted { .. } => Some(libc::ENOBUFS),
            Error::TimedOut => Some(libc::ETIMEDOUT),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Os { source, .. } => source,
            Error::Cancelled => io::Error::from_raw_os_error(libc::ECANCELED),
            Error::OutOfMemory { .. } => io::Error::new(io::ErrorKind::OutOfMemory, e),
            Error::Unsupported { .. } => io::Error::new(io::ErrorKind::Unsupported, e),
            Error::PoolExhausted { .. } | Error::PipesExhausted { .. } => {
                io::Error::new(io::ErrorKind::WouldBlock, e)
            }
            Error::TimedOut => io::Error::new(io::ErrorKind::TimedOut, e),
            other => io::Error::new(io::ErrorKind::InvalidInput, other),
        }
    }
}
