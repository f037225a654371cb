//! Leased buffers on the async layer: [`lease_group`] reads a file chunk once into registered
//! memory and lends it, read-only, to its [`LeaseMember`]s (sends, zero-copy sends, writes);
//! [`lease`] does the same with either backing ([`LeaseBacking`]: memory, or page references
//! spliced into pipes); the [`LeaseGroup`]'s parts (the leader's result, each member's, the
//! end of the group with the buffer) are awaited separately, each handed out once. The group has `1 + members` consecutive tokens in the
//! op table (`op.rs`); dropping it cancels what still runs, and the runtime drops the late
//! completions (the buffer is freed once the kernel let go of it).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use super::executor::{runtime, Runtime};
use super::fs::File;
use super::tcp::TcpStream;
use crate::{Error, Event, Fd, LeaseBacking, OpId, Result};

/// What a lease's leader reads from on the async layer: a [`File`] or a [`TcpStream`]
/// (implemented for those two only).
///
/// # Examples
/// ```no_run
/// # fn f(file: &ringpool::rt::File, stream: &ringpool::rt::TcpStream) {
/// fn source_fd(s: &impl ringpool::rt::LeaseSource) -> &ringpool::Fd { s.source_fd() }
/// assert!(!source_fd(file).same(source_fd(stream)));
/// # }
/// ```
pub trait LeaseSource: sealed::Sealed {
    /// The descriptor the leader reads from.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(file: &ringpool::rt::File) {
    /// use ringpool::rt::LeaseSource;
    /// let fd = file.source_fd();
    /// # }
    /// ```
    fn source_fd(&self) -> &Fd;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::File {}
    impl Sealed for super::TcpStream {}
}

impl LeaseSource for File {
    fn source_fd(&self) -> &Fd {
        &self.fd
    }
}

impl LeaseSource for TcpStream {
    fn source_fd(&self) -> &Fd {
        &self.fd
    }
}

/// One member of a [`lease_group`]: what it does with the leased bytes. A member only reads
/// them (no member can write into the lease), so any number run at once.
///
/// # Examples
/// ```no_run
/// # fn f(a: &ringpool::rt::TcpStream, b: &ringpool::rt::TcpStream, copy: &ringpool::rt::File) {
/// use ringpool::rt::LeaseMember;
/// let members = vec![LeaseMember::send_zc(a), LeaseMember::send(b), LeaseMember::write(copy, 0)];
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LeaseMember(MemberTarget);

#[derive(Debug, Clone)]
enum MemberTarget {
    Send(Fd),
    SendZc(Fd),
    Write(Fd, u64),
}

impl LeaseMember {
    /// Sends the leased bytes on `stream` plainly.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(s: &ringpool::rt::TcpStream) {
    /// let m = ringpool::rt::LeaseMember::send(s);
    /// # }
    /// ```
    pub fn send(stream: &TcpStream) -> LeaseMember {
        LeaseMember(MemberTarget::Send(stream.fd.clone()))
    }

    /// Sends the leased bytes on `stream` through the zero-copy policy (registered memory is
    /// named, so nothing is pinned per send); it holds the lease until the kernel's
    /// notification ([`LeaseGroup::holds`]).
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(s: &ringpool::rt::TcpStream) {
    /// let m = ringpool::rt::LeaseMember::send_zc(s);
    /// # }
    /// ```
    pub fn send_zc(stream: &TcpStream) -> LeaseMember {
        LeaseMember(MemberTarget::SendZc(stream.fd.clone()))
    }

    /// Writes the leased bytes to `file` at `offset` (`WRITE_FIXED` on registered memory).
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(copy: &ringpool::rt::File) {
    /// let m = ringpool::rt::LeaseMember::write(copy, 4096);
    /// # }
    /// ```
    pub fn write(file: &File, offset: u64) -> LeaseMember {
        LeaseMember(MemberTarget::Write(file.fd.clone(), offset))
    }

    fn member(&self, token: u64) -> crate::Member {
        match &self.0 {
            MemberTarget::Send(fd) => crate::Member::send(fd, token),
            MemberTarget::SendZc(fd) => crate::Member::send_zc(fd, token),
            MemberTarget::Write(fd, offset) => crate::Member::write(fd, *offset, token),
        }
    }
}

/// Reads `file` at `offset` into `buf` once and lends what it read, read-only, to every member
/// at once ([`Driver::lease_group`] on this thread's driver): one file chunk to many sockets
/// or files, read once, no copy. The [`LeaseGroup`] gives the leader's result, each member's
/// result, and the buffer back after the last member (and its zero-copy notification) let go.
///
/// - Members start only after the leader succeeded (a read of 0 bytes at the end of the file
///   succeeds: members then send nothing); a failed leader cancels every member
///   ([`Error::Cancelled`]) and the buffer comes back at once.
/// - One member's failure does not end the others.
/// - After a short read, members send only the bytes read; the rest of the buffer is zeroed.
/// - **Dropping the group before its buffer came back cancels it**: the leader if it is still
///   reading, else every member still running. The driver keeps the buffer until the kernel
///   is done with it; the runtime then frees it.
///
/// # Errors
/// As [`Driver::lease_group`] (a buffer over 4 GiB); `buf` is dropped then.
///
/// # Examples
/// ```
/// use ringpool::rt::{self, File, LeaseMember, TcpStream};
/// use ringpool::Fd;
/// use std::io::Read;
///
/// let (a, mut peer_a) = std::os::unix::net::UnixStream::pair().unwrap();
/// let (b, mut peer_b) = std::os::unix::net::UnixStream::pair().unwrap();
/// rt::block_on(async move {
///     let file = File::from(std::fs::File::open("Cargo.toml").unwrap());
///     let a = TcpStream::from_fd(Fd::from(std::os::fd::OwnedFd::from(a)));
///     let b = TcpStream::from_fd(Fd::from(std::os::fd::OwnedFd::from(b)));
///     let members = vec![LeaseMember::send(&a), LeaseMember::send_zc(&b)];
///     let group = rt::lease_group(&file, rt::fixed_buf(64)?, 0, members)?;
///     assert_eq!(group.filled().await?, 64); // read once
///     assert_eq!(group.member(0).await?, 64); // sent twice
///     assert_eq!(group.member(1).await?, 64);
///     let buf = group.returned().await; // back for the next chunk
///     assert_eq!(buf.len(), 64);
///     Ok::<(), ringpool::Error>(())
/// })??;
/// let (mut x, mut y) = ([0u8; 64], [0u8; 64]);
/// peer_a.read_exact(&mut x).unwrap();
/// peer_b.read_exact(&mut y).unwrap();
/// assert_eq!(x, y);
/// # Ok::<(), ringpool::Error>(())
/// ```
///
/// [`Driver::lease_group`]: crate::Driver::lease_group
pub fn lease_group(
    file: &File,
    buf: crate::FixedBuf,
    offset: u64,
    members: Vec<LeaseMember>,
) -> Result<LeaseGroup> {
    lease(file, LeaseBacking::Memory(buf), offset, members)
}

/// A lease group of either backing ([`Driver::lease`] on this thread's driver): with
/// [`LeaseBacking::Memory`] it is [`lease_group`]; with [`LeaseBacking::Pages`] the leader
/// splices up to `len` bytes from `source` (a file at `offset`, `u64::MAX` for its position;
/// a stream with `u64::MAX`) into a pipe, and every member tees the same page references into
/// its own pipe and splices them to its socket or file: no copy, no memory of the user's.
/// The rules are [`lease_group`]'s; a pages group's end ([`LeaseGroup::done`]) gives no
/// buffer back (`None`): its pipes went back to the driver's pool.
///
/// # Errors
/// As [`Driver::lease`].
///
/// # Examples
/// ```
/// use ringpool::rt::{self, File, LeaseMember, TcpStream};
/// use ringpool::{Fd, LeaseBacking};
/// use std::io::Read;
///
/// let (a, mut peer_a) = std::os::unix::net::UnixStream::pair().unwrap();
/// let (b, mut peer_b) = std::os::unix::net::UnixStream::pair().unwrap();
/// rt::block_on(async move {
///     let file = File::from(std::fs::File::open("Cargo.toml").unwrap());
///     let a = TcpStream::from_fd(Fd::from(std::os::fd::OwnedFd::from(a)));
///     let b = TcpStream::from_fd(Fd::from(std::os::fd::OwnedFd::from(b)));
///     let members = vec![LeaseMember::send(&a), LeaseMember::send(&b)];
///     let group = rt::lease(&file, LeaseBacking::Pages { len: 64 }, 0, members)?;
///     assert_eq!(group.filled().await?, 64); // spliced once
///     assert_eq!(group.member(0).await?, 64); // teed and spliced twice
///     assert_eq!(group.member(1).await?, 64);
///     assert!(group.done().await.is_none()); // no buffer: the pipes went home
///     Ok::<(), ringpool::Error>(())
/// })??;
/// let (mut x, mut y) = ([0u8; 64], [0u8; 64]);
/// peer_a.read_exact(&mut x).unwrap();
/// peer_b.read_exact(&mut y).unwrap();
/// assert_eq!(x, y);
/// # Ok::<(), ringpool::Error>(())
/// ```
///
/// [`Driver::lease`]: crate::Driver::lease
pub fn lease(
    source: &impl LeaseSource,
    backing: LeaseBacking,
    offset: u64,
    members: Vec<LeaseMember>,
) -> Result<LeaseGroup> {
    let rt = runtime();
    // The group's token (LeaseFilled, LeaseReturned), then one per member.
    let token = rt.tokens(1 + members.len() as u64);
    let driver_members = members
        .iter()
        .zip(token + 1..)
        .map(|(m, t)| m.member(t))
        .collect();
    let started =
        rt.driver
            .borrow_mut()
            .lease(source.source_fd(), backing, offset, driver_members, token);
    match started {
        Ok(leader) => Ok(LeaseGroup {
            token,
            members: members.len(),
            leader,
            rt: Rc::downgrade(&rt),
            leader_result: RefCell::new(Part::Waiting),
            buf: RefCell::new(Part::Waiting),
            waiters: RefCell::default(),
        }),
        Err(e) => {
            let mut ops = rt.ops.borrow_mut();
            for t in token..=token + members.len() as u64 {
                ops.remove(&t);
            }
            Err(e)
        }
    }
}

/// A part of a [`LeaseGroup`] handed out once.
enum Part<T> {
    Waiting,
    Ready(T),
    Taken,
}

impl<T> Part<T> {
    fn take(&mut self, what: &str) -> Option<T> {
        match std::mem::replace(self, Part::Taken) {
            Part::Ready(v) => Some(v),
            Part::Waiting => {
                *self = Part::Waiting;
                None
            }
            Part::Taken => panic!("LeaseGroup: {what} was already taken"),
        }
    }
}

/// A lease group started by [`lease_group`]: its awaitable parts are the leader's result
/// ([`filled`](LeaseGroup::filled)), each member's result ([`member`](LeaseGroup::member)) and
/// the buffer ([`returned`](LeaseGroup::returned)). Each is handed out once, in any order,
/// and may be awaited from different tasks (share the group in an `Rc`).
///
/// **Dropping the group before its buffer came back cancels what still runs** (the leader,
/// or the members still holding the lease). The kernel's late completions are then dropped
/// by the runtime, and the buffer is freed once the kernel let go of it: nothing leaks, and
/// no memory the kernel may touch is freed early.
///
/// # Examples
/// ```no_run
/// # async fn f(file: &ringpool::rt::File, members: Vec<ringpool::rt::LeaseMember>) -> ringpool::Result<()> {
/// let group = ringpool::rt::lease_group(file, ringpool::rt::fixed_buf(1 << 20)?, 0, members)?;
/// let n = group.filled().await?;
/// for i in 0..group.len() {
///     if let Err(e) = group.member(i).await {
///         eprintln!("member {i}: {e}");
///     }
/// }
/// let buf = group.returned().await; // every member let go: read the next chunk into it
/// # Ok(()) }
/// ```
#[must_use = "dropping a lease group cancels it"]
pub struct LeaseGroup {
    /// The group's token; member `i` has `token + 1 + i`.
    token: u64,
    members: usize,
    leader: OpId,
    /// The runtime that started the group: the only one it touches.
    rt: Weak<Runtime>,
    /// What the group's token delivered: the leader's result, then the group's end (with
    /// the buffer of a memory lease).
    leader_result: RefCell<Part<Result<usize>>>,
    buf: RefCell<Part<Option<crate::FixedBuf>>>,
    /// Tasks awaiting the leader or the buffer (one token, one waker slot in the runtime:
    /// whoever takes the token's events wakes the others).
    waiters: RefCell<Vec<Waker>>,
}

impl LeaseGroup {
    /// How many members the group has.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(g: &ringpool::rt::LeaseGroup) {
    /// let all_done = (0..g.len()).all(|i| !g.holds(i));
    /// # }
    /// ```
    pub fn len(&self) -> usize {
        self.members
    }

    /// Whether the group has no member (its leader still reads).
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(g: &ringpool::rt::LeaseGroup) {
    /// assert_eq!(g.is_empty(), g.len() == 0);
    /// # }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.members == 0
    }

    /// The leader's result: the bytes read into the buffer (0 at end of file; members then
    /// send nothing), or its error, in which case every member was cancelled.
    ///
    /// # Errors
    /// The read's error.
    ///
    /// # Panics
    /// If the result was already taken.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(g: ringpool::rt::LeaseGroup) -> ringpool::Result<()> {
    /// let eof = g.filled().await? == 0;
    /// # Ok(()) }
    /// ```
    pub async fn filled(&self) -> Result<usize> {
        std::future::poll_fn(|cx| {
            self.poll_group(cx, |g| {
                g.leader_result.borrow_mut().take("the leader's result")
            })
        })
        .await
        .unwrap_or(Err(Error::RuntimeGone))
    }

    /// The buffer, once the leader failed or the last member (and its zero-copy notification)
    /// let go of it. Awaiting it does not need the other results to have been taken.
    ///
    /// # Panics
    /// If the buffer was already taken, or the runtime that started the group has ended (it
    /// was returned out of its `rt::block_on`; the buffer went with that runtime's driver).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(g: ringpool::rt::LeaseGroup) {
    /// let buf = g.returned().await;
    /// # }
    /// ```
    pub async fn returned(&self) -> crate::FixedBuf {
        self.done()
            .await
            .expect("LeaseGroup::returned on a pages lease, which has no buffer: await done()")
    }

    /// The group's end: its leader failed, or its last member (and its zero-copy
    /// notification) let go. A memory lease's buffer comes back here (`Some`); a pages
    /// lease's pipes went back to the driver's pool (`None`).
    ///
    /// # Panics
    /// As [`LeaseGroup::returned`]: if the end was already taken, or the runtime that started
    /// the group has ended.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(g: ringpool::rt::LeaseGroup) {
    /// if let Some(buf) = g.done().await {
    ///     println!("the {} byte buffer is back for the next chunk", buf.len());
    /// }
    /// # }
    /// ```
    pub async fn done(&self) -> Option<crate::FixedBuf> {
        std::future::poll_fn(|cx| self.poll_group(cx, |g| g.buf.borrow_mut().take("the buffer")))
            .await
            .expect("LeaseGroup::done awaited after the runtime that started the group ended")
    }

    /// Member `i`'s result (in the order of the members given to [`lease_group`]): the bytes
    /// it sent or wrote. A zero-copy send's result comes when its bytes are queued; it may hold
    /// the lease until its notification ([`LeaseGroup::holds`]).
    ///
    /// # Errors
    /// The member's error; [`Error::Cancelled`] when its leader failed or it was cancelled
    /// (e.g. [`Driver::cancel_fd`] on its socket).
    ///
    /// # Panics
    /// If `i` is not a member, or its result was already taken.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(g: ringpool::rt::LeaseGroup) {
    /// for i in 0..g.len() {
    ///     match g.member(i).await {
    ///         Ok(n) => println!("member {i}: {n} bytes"),
    ///         Err(e) => println!("member {i}: {e}"),
    ///     }
    /// }
    /// # }
    /// ```
    ///
    /// [`Driver::cancel_fd`]: crate::Driver::cancel_fd
    pub async fn member(&self, i: usize) -> Result<usize> {
        assert!(i < self.members, "LeaseGroup: no member {i}");
        let token = self.token + 1 + i as u64;
        let event = std::future::poll_fn(|cx| {
            let Some(rt) = self.rt.upgrade() else {
                return Poll::Ready(Event::Error(Error::RuntimeGone));
            };
            let mut ops = rt.ops.borrow_mut();
            let state = ops
                .get_mut(&token)
                .expect("a live group has its members' states");
            if let Some(e) = state.events.pop_front() {
                return Poll::Ready(e);
            }
            assert!(
                !state.finished,
                "LeaseGroup: member {i}'s result was already taken"
            );
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        match event {
            Event::Sent { result, .. } | Event::Written { result } | Event::ReadInto { result } => {
                result
            }
            Event::Error(e) => Err(e),
            other => unreachable!("lease member: {other:?}"),
        }
    }

    /// Whether member `i` still holds the lease (its op, or a zero-copy send's notification,
    /// is not done): for finding the members a buffer waits for, such as a client that does
    /// not read.
    ///
    /// # Panics
    /// If `i` is not a member.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(g: &ringpool::rt::LeaseGroup) {
    /// let waiting_for: Vec<usize> = (0..g.len()).filter(|&i| g.holds(i)).collect();
    /// # }
    /// ```
    pub fn holds(&self, i: usize) -> bool {
        assert!(i < self.members, "LeaseGroup: no member {i}");
        let token = self.token + 1 + i as u64;
        self.rt
            .upgrade()
            .is_some_and(|rt| rt.ops.borrow().get(&token).is_some_and(|s| !s.finished))
    }

    /// Takes the group token's events into their parts, then `take`s one part: pending (and
    /// registered to be woken) while it has not come.
    fn poll_group<T>(
        &self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&Self) -> Option<T>,
    ) -> Poll<Option<T>> {
        let Some(rt) = self.rt.upgrade() else {
            return Poll::Ready(None);
        };
        let mut ops = rt.ops.borrow_mut();
        let state = ops
            .get_mut(&self.token)
            .expect("a live group has its state");
        let mut took = false;
        while let Some(event) = state.events.pop_front() {
            took = true;
            match event {
                Event::LeaseFilled { result, .. } => {
                    *self.leader_result.borrow_mut() = Part::Ready(result);
                }
                Event::LeaseReturned(buf) => *self.buf.borrow_mut() = Part::Ready(Some(buf)),
                Event::PagesReturned => *self.buf.borrow_mut() = Part::Ready(None),
                other => unreachable!("lease group: {other:?}"),
            }
        }
        if let Some(v) = take(self) {
            state.waker = None;
            drop(ops);
            if took {
                self.waiters.borrow_mut().drain(..).for_each(Waker::wake);
            }
            return Poll::Ready(Some(v));
        }
        state.waker = Some(cx.waker().clone());
        drop(ops);
        let mut waiters = self.waiters.borrow_mut();
        if took {
            waiters.drain(..).for_each(Waker::wake);
        }
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for LeaseGroup {
    fn drop(&mut self) {
        // Its runtime ended: it cancelled the group, and its driver kept what the kernel held.
        let Some(rt) = self.rt.upgrade() else {
            return;
        };
        let mut ops = rt.ops.borrow_mut();
        // Late completions of these tokens are dropped by `route` from now on (a buffer that
        // comes back then is freed there).
        let done = ops.remove(&self.token).is_none_or(|s| s.finished);
        let running: Vec<u64> = (self.token + 1..=self.token + self.members as u64)
            .filter(|t| ops.remove(t).is_some_and(|s| !s.finished))
            .collect();
        drop(ops);
        if done {
            // The buffer came back: every member had let go.
            return;
        }
        let mut driver = rt.driver.borrow_mut();
        // Ignored once the leader completed; members it has not started yet end at once.
        driver.cancel(self.leader);
        for t in running {
            driver.cancel_token(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_group_part_is_handed_out_once_it_came_and_only_once() {
        let mut part = Part::Waiting;
        assert_eq!(part.take("the buffer"), None::<u32>);
        assert!(
            matches!(part, Part::Waiting),
            "not come yet: still to be handed out"
        );
        part = Part::Ready(5);
        assert_eq!(part.take("the buffer"), Some(5));
        assert!(matches!(part, Part::Taken));
    }

    #[test]
    #[should_panic(expected = "LeaseGroup: the leader's result was already taken")]
    fn a_lease_group_part_taken_twice_panics_naming_the_part() {
        let mut part = Part::Ready(1);
        part.take("the leader's result");
        part.take("the leader's result");
    }
}
