//! Pipe-backed ("pages") leases, the part that needs no ring: pipes and the driver's pool of
//! them, how big a pipe a lease needs, a group's shared state, and the pure decisions of its
//! ops (what a splice's or a tee's result means next).
//!
//! A pages lease lends **page references** instead of memory: the leader `SPLICE`s from a file
//! (page-cache pages) or a socket into the group's pipe, every member `TEE`s those references
//! into its own pipe and `SPLICE`s them on to its socket or file. No byte is copied in user
//! space and no user memory is named by any SQE, so the lease is read-only by construction:
//! nothing exposes the bytes at all. The kernel op that runs is in `driver/pipe_lease.rs`.
//!
//! ```text
//!   file ──SPLICE──▶ group pipe ──TEE──▶ member pipe 1 ──SPLICE──▶ socket 1
//!                        │       ──TEE──▶ member pipe 2 ──SPLICE──▶ socket 2
//!                        └─ drained into /dev/null once every member's TEE is done
//! ```

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::syscall;

/// The kernel's default `/proc/sys/fs/pipe-max-size` (1 MiB), used where the file cannot be read.
const DEFAULT_PIPE_MAX: usize = 1 << 20;

/// Idle pipes a pool keeps (each is two descriptors); more are closed when they come back.
pub(crate) const MAX_IDLE_PIPES: usize = 2048;

/// Parses `/proc/sys/fs/pipe-max-size`.
fn parse_pipe_max(text: &str) -> Option<usize> {
    text.trim().parse::<usize>().ok().filter(|&n| n > 0)
}

/// The largest pipe an unprivileged process may ask for (`/proc/sys/fs/pipe-max-size`), read
/// once per process. Pages leases stay within it even where the process could exceed it.
pub(crate) fn pipe_max_size() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|t| parse_pipe_max(&t))
            .unwrap_or(DEFAULT_PIPE_MAX)
    })
}

/// The system's page size.
pub(crate) fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a configuration value; it has no memory arguments.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            n as usize
        } else {
            4096
        }
    })
}

/// The pipe capacity, in bytes, that holds `len` bytes starting `first` bytes into a page: one
/// pipe slot per page spanned (a file's page-cache pages are spliced one page per slot),
/// rounded up to a power of two pages as `F_SETPIPE_SZ` does.
pub(crate) fn pipe_bytes_for(len: usize, first: usize, page: usize) -> usize {
    let pages = (first % page + len).div_ceil(page).max(1);
    pages.next_power_of_two() * page
}

/// The longest pages lease that fits a pipe of at most `max` bytes when it starts `first`
/// bytes into a page.
pub(crate) fn max_len_for(first: usize, page: usize, max: usize) -> usize {
    // The largest power of two pages within `max`.
    let pages = (max / page).max(1);
    let pages = 1usize << (usize::BITS - 1 - pages.leading_zeros());
    (pages * page).saturating_sub(first % page)
}

/// Checks that a pages lease of `len` bytes starting `first` bytes into a page fits a pipe of
/// at most `max` bytes; returns the pipe capacity it needs.
pub(crate) fn check_len(len: usize, first: usize, page: usize, max: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::InvalidArgument {
            what: "a pages lease needs a length of at least 1 byte",
        });
    }
    let bytes = pipe_bytes_for(len, first, page);
    if bytes > max {
        return Err(Error::LeaseTooLong {
            len,
            max: max_len_for(first, page, max),
        });
    }
    Ok(bytes)
}

/// A pipe of the pool: both ends non-blocking (a splice that would wait ends with `EAGAIN`,
/// which the driver turns into a poll and a retry, so no kernel worker blocks on a pipe),
/// close-on-exec, and at least `cap` bytes of capacity.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// A new pipe of at least `cap` bytes (`F_SETPIPE_SZ`).
    fn open(cap: usize) -> Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))
            .map_err(Error::os("pipe2"))?;
        // SAFETY: pipe2 succeeded: both descriptors are fresh and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let got = syscall!(fcntl(
            write.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            cap as libc::c_int
        ))
        .map_err(Error::os(
            "F_SETPIPE_SZ (the user's pipe buffers, /proc/sys/fs/pipe-user-pages-*, are used up)",
        ))?;
        Ok(Pipe {
            read,
            write,
            cap: got as usize,
        })
    }

    /// The read end.
    pub(crate) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The write end.
    pub(crate) fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Capacity in bytes.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes the pipe holds (`FIONREAD`).
    fn queued(&self) -> std::io::Result<usize> {
        let mut n: libc::c_int = 0;
        syscall!(ioctl(
            self.read.as_raw_fd(),
            libc::FIONREAD,
            &mut n as *mut libc::c_int
        ))?;
        Ok(n as usize)
    }
}

/// How a driver's pipe pool is used ([`Driver::pipe_stats`](crate::Driver::pipe_stats)).
///
/// # Examples
/// ```
/// let driver = ringpool::Driver::new(Default::default())?;
/// let s = driver.pipe_stats();
/// assert_eq!((s.in_use, s.idle), (0, 0)); // pipes are made on the first pages lease
/// assert!(s.max_pipe >= 4096);
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Pipes opened so far.
    pub made: u64,
    /// Times an idle pipe was handed out again instead of opening one.
    pub reused: u64,
    /// Pipes held by pages leases and splice streams now.
    pub in_use: usize,
    /// Pipes waiting in the pool, drained (closed once none was used for a second).
    pub idle: usize,
    /// Pipes closed because they could not be drained (or the pool was full) when they came back.
    pub closed: u64,
    /// The largest pipe a lease may use, in bytes (`/proc/sys/fs/pipe-max-size`).
    pub max_pipe: usize,
    /// Splices and tees that would have blocked (`EAGAIN` from a non-blocking descriptor):
    /// each waited for a poll and ran again, none was taken for data.
    pub eagain_polls: u64,
    /// Times a splice stream's chunk waited for a pipe (all of
    /// [`DriverConfig::max_pipes`](crate::DriverConfig::max_pipes) in use, or none could be
    /// opened while others were): backpressure, nothing lost.
    pub pipe_waits: u64,
}

/// The driver's pipes: handed out to pages leases, drained and kept when they come back.
#[derive(Debug, Default)]
pub(crate) struct PipePool {
    idle: Vec<Pipe>,
    /// `/dev/null`, opened on the first drain: splicing into it drops a pipe's page
    /// references without copying a byte.
    devnull: Option<OwnedFd>,
    made: u64,
    reused: u64,
    in_use: usize,
    closed: u64,
    eagain_polls: u64,
    /// When a pipe was last taken or given back.
    last_used: Option<Instant>,
    /// Most pipes in use at once (`DriverConfig::max_pipes`; 0 in a `Default` pool: no bound).
    max: usize,
    waits: u64,
}

/// Idle pipes (and `/dev/null`) are closed once no pipe was taken or given back for this long:
/// their descriptors are the process's, and a server near `RLIMIT_NOFILE` needs them for its
/// clients (the soak found a splice proxy holding ~300 descriptors of idle pipes after its load
/// ended). Work that comes back within it reuses them.
pub(crate) const IDLE_PIPE_LIFETIME: Duration = Duration::from_secs(1);

impl PipePool {
    /// A pool that hands out at most `max` pipes at once.
    pub(crate) fn with_max(max: usize) -> PipePool {
        PipePool {
            max,
            ..Default::default()
        }
    }

    /// Whether every pipe the pool may hand out is in use.
    pub(crate) fn at_limit(&self) -> bool {
        self.max != 0 && self.in_use >= self.max
    }

    /// Pipes handed out and not back yet.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// A splice stream waits for a pipe.
    pub(crate) fn count_wait(&mut self) {
        self.waits += 1;
    }

    /// A drained pipe of at least `cap` bytes: the smallest idle one that fits, or a new one.
    pub(crate) fn take(&mut self, cap: usize) -> Result<Pipe> {
        if self.at_limit() {
            return Err(Error::PipesExhausted { max: self.max });
        }
        let best = (0..self.idle.len())
            .filter(|&i| self.idle[i].cap >= cap)
            .min_by_key(|&i| self.idle[i].cap);
        let pipe = match best {
            Some(i) => {
                self.reused += 1;
                self.idle.swap_remove(i)
            }
            None => {
                let p = Pipe::open(cap)?;
                self.made += 1;
                p
            }
        };
        self.in_use += 1;
        self.last_used = Some(Instant::now());
        Ok(pipe)
    }

    /// A pipe comes back (the kernel is done with it: its ops' final CQEs came). It is kept
    /// only once it is known to be empty; one that cannot be drained is closed.
    pub(crate) fn put(&mut self, pipe: Pipe) {
        self.in_use -= 1;
        self.last_used = Some(Instant::now());
        if self.drain(&pipe) && self.idle.len() < MAX_IDLE_PIPES {
            self.idle.push(pipe);
        } else {
            self.closed += 1;
        }
    }

    /// Empties `pipe` into `/dev/null` (page references dropped, nothing copied); whether it
    /// is empty now.
    fn drain(&mut self, pipe: &Pipe) -> bool {
        for _ in 0..64 {
            match pipe.queued() {
                Ok(0) => return true,
                Ok(n) => {
                    let Some(null) = self.devnull() else {
                        return false;
                    };
                    let moved = syscall!(splice(
                        pipe.read_fd(),
                        std::ptr::null_mut(),
                        null,
                        std::ptr::null_mut(),
                        n,
                        libc::SPLICE_F_NONBLOCK
                    ));
                    if !matches!(moved, Ok(m) if m > 0) {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    fn devnull(&mut self) -> Option<RawFd> {
        if self.devnull.is_none() {
            let fd = syscall!(open(
                c"/dev/null".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC
            ))
            .ok()?;
            // SAFETY: open succeeded: the descriptor is fresh and ours alone.
            self.devnull = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        self.devnull.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub(crate) fn stats(&self) -> PipeStats {
        PipeStats {
            made: self.made,
            reused: self.reused,
            in_use: self.in_use,
            idle: self.idle.len(),
            closed: self.closed,
            max_pipe: pipe_max_size(),
            eagain_polls: self.eagain_polls,
            pipe_waits: self.waits,
        }
    }

    /// Whether there is anything for [`PipePool::trim`] to close.
    pub(crate) fn has_spares(&self) -> bool {
        !self.idle.is_empty() || (self.devnull.is_some() && self.in_use == 0)
    }

    /// Closes the idle pipes, and `/dev/null` when no pipe is in use, if no pipe was taken or
    /// given back within [`IDLE_PIPE_LIFETIME`] before `now`.
    pub(crate) fn trim(&mut self, now: Instant) {
        if self
            .last_used
            .is_some_and(|t| now.saturating_duration_since(t) < IDLE_PIPE_LIFETIME)
        {
            return;
        }
        self.closed += self.idle.len() as u64;
        self.idle.clear();
        if self.in_use == 0 {
            self.devnull = None;
        }
    }

    /// A splice or tee said `EAGAIN` and waits for a poll.
    pub(crate) fn count_poll(&mut self) {
        self.eagain_polls += 1;
    }
}

/// Groups whose last member let go, with their token and the group pipe if it is still held
/// (no member had teed from it): the driver turns them into completions.
pub(crate) type PagesReturns = Rc<RefCell<VecDeque<(u64, Option<Pipe>)>>>;

/// What the members of one pages lease share: the group pipe holding the leader's `len`
/// bytes (until every member's tee is done), and how many tees are still to end. Each member
/// op holds an `Rc`; the last one dropped reports the group's end.
pub(crate) struct PagesGroup {
    pub(crate) token: u64,
    pipe: RefCell<Option<Pipe>>,
    tees: Cell<usize>,
    returns: PagesReturns,
}

impl PagesGroup {
    pub(crate) fn new(token: u64, pipe: Pipe, members: usize, returns: PagesReturns) -> Self {
        PagesGroup {
            token,
            pipe: RefCell::new(Some(pipe)),
            tees: Cell::new(members),
            returns,
        }
    }

    /// The group pipe's read end, for a member's tee (present until every tee ended).
    pub(crate) fn read_fd(&self) -> RawFd {
        self.pipe
            .borrow()
            .as_ref()
            .expect("a group pipe is held while a member tees from it")
            .read_fd()
    }

    /// One member's tee ended (done, failed or cancelled): the group pipe, once no tee is left.
    pub(crate) fn tee_ended(&self) -> Option<Pipe> {
        let left = self.tees.get() - 1;
        self.tees.set(left);
        if left == 0 {
            self.pipe.borrow_mut().take()
        } else {
            None
        }
    }
}

impl Drop for PagesGroup {
    fn drop(&mut self) {
        let pipe = self.pipe.get_mut().take();
        self.returns.borrow_mut().push_back((self.token, pipe));
    }
}

/// The kind of file `fd` is (`st_mode & S_IFMT`: `S_IFREG`, `S_IFSOCK`, `S_IFIFO`, ...), what
/// decides how its splices run; `what` names the caller in an error.
pub(crate) fn file_type(fd: RawFd, what: &'static str) -> Result<libc::mode_t> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(fstat(fd, &mut st as *mut libc::stat)).map_err(Error::os(what))?;
    Ok(st.st_mode & libc::S_IFMT)
}

/// A step the driver runs in its own thread instead of as an SQE (`Ladder::inline_splice`):
/// `splice(2)` of up to `len` bytes from `from` to `to` (neither with an offset), or, with
/// `tee`, `tee(2)` from pipe `from` to pipe `to`; always `SPLICE_F_NONBLOCK`. The result as a
/// CQE gives it (bytes moved, or a negative errno), for the same step rules.
///
/// Only for descriptors that cannot make it sleep: the pool's pipes (non-blocking both ends)
/// and sockets or pipes made non-blocking (a splice to a socket waits for room unless the
/// socket is `O_NONBLOCK`; `SPLICE_F_NONBLOCK` covers only the pipe side). A file's side
/// could wait for the disk, so file steps stay SQEs.
pub(crate) fn splice_now(from: RawFd, to: RawFd, len: usize, tee: bool) -> i32 {
    // A step's length is at most a pipe's, below 2 GiB (pipe-max-size is an int).
    let len = len.min(i32::MAX as usize);
    loop {
        let res = if tee {
            syscall!(tee(from, to, len, libc::SPLICE_F_NONBLOCK))
        } else {
            syscall!(splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK
            ))
        };
        match res {
            // At most `len`, so it fits.
            Ok(n) => return n as i32,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// What the leader does after one of its splices completed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LeaderNext {
    /// Splice again for the rest (a regular file that gave fewer bytes than asked), with this
    /// many bytes in the pipe now.
    Again(usize),
    /// Nothing to read yet (`EAGAIN`): poll the source, then splice again.
    Poll,
    /// The leader is done with this many bytes in the group pipe.
    Done(usize),
    /// The leader failed with this (negative) errno, having moved nothing.
    Failed(i32),
}

/// The leader's next step after a splice of `res` (its CQE result), with `got` bytes already
/// in the pipe out of `want`. A regular file is read until `want` or its end (a splice may
/// stop short of both); a socket or pipe gives what it has, like a receive. An error after
/// some bytes ends the leader with those (the error comes back on the next read), and so does
/// `EAGAIN` after some bytes: a file's splice then found the pipe full, and polling the file
/// (always readable) would only spin.
pub(crate) fn leader_next(res: i32, got: usize, want: usize, regular: bool) -> LeaderNext {
    match res {
        r if r == -libc::EAGAIN && got == 0 => LeaderNext::Poll,
        r if r < 0 && got > 0 => LeaderNext::Done(got),
        r if r < 0 => LeaderNext::Failed(r),
        0 => LeaderNext::Done(got),
        r => {
            let got = got + r as usize;
            if got < want && regular {
                LeaderNext::Again(got)
            } else {
                LeaderNext::Done(got)
            }
        }
    }
}

/// What a member does after one of its tees or splices completed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MemberNext {
    /// The step moved `n` more bytes and there are more to move: the same step again.
    Again(usize),
    /// Would block (`EAGAIN`): poll, then the same step again.
    Poll,
    /// The step moved `n` more bytes, and they were the last.
    Done(usize),
    /// The member fails with this (negative) errno.
    Failed(i32),
}

/// A member's next step after a splice of `res`, with `done` of its `share` already moved.
/// A splice that moves nothing while bytes are left in the member's pipe cannot happen with
/// a write end held open; it is an error (`EIO`) rather than a loop.
pub(crate) fn splice_next(res: i32, done: usize, share: usize) -> MemberNext {
    match res {
        r if r == -libc::EAGAIN => MemberNext::Poll,
        r if r < 0 => MemberNext::Failed(r),
        0 => MemberNext::Failed(-libc::EIO),
        r => {
            let n = r as usize;
            if done + n < share {
                MemberNext::Again(n)
            } else {
                MemberNext::Done(n)
            }
        }
    }
}

/// A member's next step after its tee of `res`. The member's pipe is empty and at least as
/// large as the group pipe, so a tee duplicates every slot at once: one that stops short
/// could not be continued (a tee always starts at the head of the group pipe), and fails
/// the member (`EIO`) rather than lose or repeat bytes.
pub(crate) fn tee_next(res: i32, share: usize) -> MemberNext {
    match res {
        r if r == -libc::EAGAIN => MemberNext::Poll,
        r if r < 0 => MemberNext::Failed(r),
        r if r as usize == share => MemberNext::Done(share),
        _ => MemberNext::Failed(-libc::EIO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_pipes_are_closed_once_unused_for_their_lifetime() {
        let mut pool = PipePool::default();
        let (a, b) = (pool.take(4096).unwrap(), pool.take(4096).unwrap());
        pool.put(a);
        pool.put(b);
        assert!(pool.has_spares());
        let now = Instant::now();
        pool.trim(now);
        assert_eq!(pool.stats().idle, 2, "recently used: kept for reuse");
        pool.trim(now + IDLE_PIPE_LIFETIME);
        let st = pool.stats();
        assert_eq!((st.idle, st.closed), (0, 2), "{st:?}");
        assert!(!pool.has_spares());
        // In use meanwhile: nothing of it is closed, and it comes back as usual.
        let c = pool.take(4096).unwrap();
        pool.trim(Instant::now() + IDLE_PIPE_LIFETIME * 2);
        assert_eq!(pool.stats().in_use, 1);
        pool.put(c);
        assert_eq!(pool.stats().idle, 1);
    }

    const P: usize = 4096;

    #[test]
    fn pipe_max_size_parses_the_proc_file() {
        assert_eq!(parse_pipe_max("1048576\n"), Some(1 << 20));
        assert_eq!(parse_pipe_max(" 65536 "), Some(65536));
        assert_eq!(parse_pipe_max("0"), None);
        assert_eq!(parse_pipe_max("lots"), None);
    }

    #[test]
    fn a_pipe_holds_every_page_a_lease_spans_rounded_to_a_power_of_two() {
        assert_eq!(pipe_bytes_for(1, 0, P), P);
        assert_eq!(pipe_bytes_for(P, 0, P), P);
        assert_eq!(pipe_bytes_for(P + 1, 0, P), 2 * P);
        // Starting inside a page: one more page spanned.
        assert_eq!(pipe_bytes_for(P, 1, P), 2 * P);
        assert_eq!(pipe_bytes_for(64 << 10, 0, P), 64 << 10);
        assert_eq!(pipe_bytes_for(64 << 10, 100, P), 128 << 10);
        assert_eq!(pipe_bytes_for(48 << 10, 0, P), 64 << 10);
        // Only the offset inside the page matters.
        assert_eq!(pipe_bytes_for(P, 3 * P + 1, P), 2 * P);
    }

    #[test]
    fn a_lease_longer_than_the_largest_pipe_is_refused_with_the_longest_that_fits() {
        let max = 1 << 20;
        assert_eq!(check_len(1 << 20, 0, P, max).unwrap(), 1 << 20);
        match check_len((1 << 20) + 1, 0, P, max) {
            Err(Error::LeaseTooLong { len, max: fits }) => {
                assert_eq!((len, fits), ((1 << 20) + 1, 1 << 20));
            }
            other => panic!("{other:?}"),
        }
        match check_len(1 << 20, 10, P, max) {
            Err(Error::LeaseTooLong { max: fits, .. }) => assert_eq!(fits, (1 << 20) - 10),
            other => panic!("{other:?}"),
        }
        assert!(check_len((1 << 20) - 10, 10, P, max).is_ok());
        // A maximum that is not a power of two pages: the power of two below it.
        assert_eq!(max_len_for(0, P, 3 * P), 2 * P);
        assert!(matches!(
            check_len(0, 0, P, max),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn a_file_leader_reads_until_its_length_or_the_end_a_socket_once() {
        assert_eq!(leader_next(100, 0, 300, true), LeaderNext::Again(100));
        assert_eq!(leader_next(100, 100, 300, true), LeaderNext::Again(200));
        assert_eq!(leader_next(100, 0, 300, false), LeaderNext::Done(100));
        assert_eq!(leader_next(200, 100, 300, true), LeaderNext::Done(300));
        // The end of the file: what was read so far (a short lease).
        assert_eq!(leader_next(0, 100, 300, true), LeaderNext::Done(100));
        assert_eq!(leader_next(0, 0, 300, true), LeaderNext::Done(0));
        // EAGAIN is never data.
        assert_eq!(leader_next(-libc::EAGAIN, 0, 300, false), LeaderNext::Poll);
        // EAGAIN after some bytes: the pipe is full, the leader is done with what it holds.
        assert_eq!(
            leader_next(-libc::EAGAIN, 100, 300, true),
            LeaderNext::Done(100)
        );
        // An error after some bytes ends with those; before any, it is the leader's error.
        assert_eq!(
            leader_next(-libc::EIO, 100, 300, true),
            LeaderNext::Done(100)
        );
        assert_eq!(
            leader_next(-libc::EINVAL, 0, 300, true),
            LeaderNext::Failed(-libc::EINVAL)
        );
    }

    #[test]
    fn a_member_splices_until_its_whole_share_left() {
        assert_eq!(splice_next(100, 0, 300), MemberNext::Again(100));
        assert_eq!(splice_next(200, 100, 300), MemberNext::Done(200));
        assert_eq!(splice_next(300, 0, 300), MemberNext::Done(300));
        assert_eq!(splice_next(-libc::EAGAIN, 100, 300), MemberNext::Poll);
        assert_eq!(
            splice_next(-libc::EPIPE, 100, 300),
            MemberNext::Failed(-libc::EPIPE)
        );
        assert_eq!(splice_next(0, 100, 300), MemberNext::Failed(-libc::EIO));
    }

    #[test]
    fn a_tee_duplicates_the_whole_share_or_fails_the_member() {
        assert_eq!(tee_next(300, 300), MemberNext::Done(300));
        assert_eq!(tee_next(-libc::EAGAIN, 300), MemberNext::Poll);
        assert_eq!(tee_next(100, 300), MemberNext::Failed(-libc::EIO));
        assert_eq!(tee_next(0, 300), MemberNext::Failed(-libc::EIO));
        assert_eq!(
            tee_next(-libc::ECANCELED, 300),
            MemberNext::Failed(-libc::ECANCELED)
        );
    }

    #[test]
    fn the_group_pipe_comes_back_after_the_last_tee_and_the_group_after_its_last_member() {
        let returns = PagesReturns::default();
        let pipe = Pipe::open(P).unwrap();
        let group = Rc::new(PagesGroup::new(7, pipe, 2, returns.clone()));
        let member = group.clone();
        assert!(group.tee_ended().is_none());
        assert!(
            group.tee_ended().is_some(),
            "the last tee frees the group pipe"
        );
        drop(group);
        assert!(
            returns.borrow().is_empty(),
            "a member still holds the group"
        );
        drop(member);
        let (token, pipe) = returns.borrow_mut().pop_front().unwrap();
        assert_eq!(token, 7);
        assert!(pipe.is_none(), "the pipe went back at the last tee");
    }

    #[test]
    fn the_pool_reuses_drained_pipes_and_hands_out_the_smallest_that_fits() {
        let mut pool = PipePool::default();
        let small = pool.take(P).unwrap();
        let big = pool.take(16 * P).unwrap();
        assert!(small.cap() >= P && big.cap() >= 16 * P);
        // Bytes left in a pipe are drained before it is kept.
        let n = syscall!(write(big.write_fd(), b"stale".as_ptr().cast(), 5)).unwrap();
        assert_eq!(n, 5);
        pool.put(small);
        pool.put(big);
        assert_eq!(pool.stats().idle, 2);
        let again = pool.take(2 * P).unwrap();
        assert!(again.cap() >= 16 * P, "only the big pipe fits");
        assert_eq!(again.queued().unwrap(), 0, "drained");
        let s = pool.stats();
        assert_eq!((s.made, s.reused, s.in_use, s.idle), (2, 1, 1, 1));
        pool.put(again);
    }
}
