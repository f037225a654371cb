//! Socket options the servers set.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ringpool::{Driver, Event, Fd};

fn set_int_opt(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt reads `value` (a valid c_int) for the given length; fd is a live socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Disables Nagle's algorithm: replies go out at once.
pub fn set_nodelay(fd: &impl AsRawFd) {
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
}

/// SO_LINGER with a zero timeout: closing the socket sends RST instead of FIN.
pub fn set_reset_on_close(fd: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid `linger` of the given size; fd is a live socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Raises the listen backlog of a bound listener (std uses 128; thousands of clients connecting
/// at once need more).
pub fn set_backlog(listener: &std::net::TcpListener, backlog: libc::c_int) -> std::io::Result<()> {
    // SAFETY: listen on a bound socket we own; calling it again only changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `e` says the process or the system ran out of descriptors (`EMFILE`, `ENFILE`).
pub fn out_of_descriptors(e: &ringpool::Error) -> bool {
    matches!(e, ringpool::Error::Os { source, .. }
        if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
}

/// How long an accept that failed for want of descriptors waits before it is tried again (if
/// no connection closed before).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

/// A listener's multishot accept on an event loop, which does not spin at the descriptor limit.
///
/// An accept that fails with `EMFILE`/`ENFILE` ends; re-armed at once it would fail again at
/// once (a loop at 100 % CPU, logging each time). So it is re-armed only after a descriptor was
/// freed ([`Accept::freed`]) or after [`ACCEPT_BACKOFF`]; the connections wait in the listen
/// backlog meanwhile. The episode is logged once when it starts and once when it ends.
pub struct Accept {
    op: Option<ringpool::OpId>,
    token: u64,
    /// Not before this instant is the accept re-armed (after a failure).
    retry_at: Option<Instant>,
    log: AcceptLog,
}

impl Accept {
    /// Arms the accept on `listener`; its completions carry `token`.
    pub fn new(driver: &mut Driver, listener: &Fd, token: u64) -> ringpool::Result<Accept> {
        let op = driver.accept_multishot(listener, token)?;
        Ok(Accept {
            op: Some(op),
            token,
            retry_at: None,
            log: AcceptLog::default(),
        })
    }

    /// Handles one of the accept's completions; returns the accepted connection, if any.
    /// `live` is the number of connections held now (for the log line).
    pub fn on_completion(&mut self, c: ringpool::Completion, live: usize) -> Option<Fd> {
        if !c.more {
            self.op = None;
        }
        match c.event {
            Event::Accepted(fd) => {
                self.log.accepted();
                Some(fd)
            }
            Event::Error(e) => {
                self.retry_at = Some(Instant::now() + self.log.failed(&e, live));
                None
            }
            _ => None,
        }
    }

    /// Re-arms the accept if it ended and its backoff is over.
    pub fn poll(&mut self, driver: &mut Driver, listener: &Fd) -> ringpool::Result<()> {
        if self.op.is_some() || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        self.retry_at = None;
        self.op = Some(driver.accept_multishot(listener, self.token)?);
        Ok(())
    }

    /// A descriptor was freed (a connection closed): an accept waiting for one goes now.
    pub fn freed(&mut self, driver: &mut Driver, listener: &Fd) -> ringpool::Result<()> {
        if self.log.starved && self.op.is_none() {
            self.retry_at = None;
            self.poll(driver, listener)?;
        }
        Ok(())
    }

    /// How long the event loop may wait: `default`, or less if a backoff ends sooner.
    pub fn wait_for(&self, default: Duration) -> Duration {
        match self.retry_at {
            Some(t) if self.op.is_none() => {
                t.saturating_duration_since(Instant::now()).min(default)
            }
            _ => default,
        }
    }

    /// Stops accepting.
    pub fn cancel(&mut self, driver: &mut Driver) {
        if let Some(op) = self.op.take() {
            driver.cancel(op);
        }
    }
}

/// The log of a listener's accepts: an out-of-descriptors episode is logged once when it starts
/// and once when it ends, not at every failed attempt.
#[derive(Default)]
pub struct AcceptLog {
    /// Inside an out-of-descriptors episode.
    starved: bool,
    /// Accepts that failed in this episode.
    failures: u64,
}

impl AcceptLog {
    /// A connection was accepted.
    pub fn accepted(&mut self) {
        if std::mem::take(&mut self.starved) {
            log(format_args!(
                "accept: descriptors available again; accepting (after {} refused attempts)",
                self.failures
            ));
        }
    }

    /// An accept failed with `e` while `live` connections are open; returns how long to wait
    /// before the next attempt (any failure waits, so a persistent error cannot spin a loop).
    pub fn failed(&mut self, e: &ringpool::Error, live: usize) -> Duration {
        if out_of_descriptors(e) {
            if !std::mem::replace(&mut self.starved, true) {
                self.failures = 0;
                log(format_args!(
                    "accept: {e} (RLIMIT_NOFILE {}, {live} connections open): new connections \
                     wait in the listen backlog until one closes; logged once until it recovers",
                    nofile_limit()
                ));
            }
            self.failures += 1;
            ACCEPT_BACKOFF
        } else {
            log(format_args!("accept: {e}"));
            Duration::from_millis(10)
        }
    }
}

/// The soft `RLIMIT_NOFILE`, for messages.
pub fn nofile_limit() -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a variable we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return "unknown".into();
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        lim.rlim_cur.to_string()
    }
}

/// Writes one line to stderr; a closed or full stderr is not an error for a server.
pub fn log(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// Aborts a TCP connection now: a reset goes to the peer, data queued for it is dropped (its
/// zero-copy notifications come at once), and ops waiting on the socket fail, even while other
/// ops still hold the descriptor open (`connect` with `AF_UNSPEC`, which disconnects a TCP
/// socket). Closing alone would wait for the last op holding the descriptor, and a send the
/// peer never reads would hold it for ever.
pub fn abort_connection(fd: &impl AsRawFd) {
    set_reset_on_close(fd);
    // SAFETY: an all-zero sockaddr with sa_family AF_UNSPEC is valid for its length; fd is a
    // live socket (a failure leaves it as it was).
    unsafe {
        let mut addr: libc::sockaddr = std::mem::zeroed();
        addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            fd.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}

/// The memlock limit, for messages: "8388608 bytes" or "unlimited".
pub fn memlock_limit() -> String {
    match ringpool::sys::Memlock::current() {
        ringpool::sys::Memlock::Unlimited => "unlimited".into(),
        ringpool::sys::Memlock::Limited(b) => format!("{b} bytes"),
    }
}

/// Whether `bytes` of registered memory fit this process's memlock limit with room to spare:
/// at most half the limit, since the ring itself and zero-copy sends from plain memory are
/// charged to the same limit (a zero-copy send past it fails with `ENOMEM`, which used to
/// reset a client for our own shortage). `Err` says why not, naming the limit.
pub fn fits_memlock(bytes: u64, what: &str) -> Result<(), String> {
    match ringpool::sys::Memlock::current() {
        ringpool::sys::Memlock::Unlimited => Ok(()),
        ringpool::sys::Memlock::Limited(limit) if bytes <= limit / 2 => Ok(()),
        ringpool::sys::Memlock::Limited(limit) => Err(format!(
            "{what} ({bytes} bytes) do not fit RLIMIT_MEMLOCK ({limit} bytes; registered memory \
             may take at most half of it, the ring and zero-copy sends need the rest)"
        )),
    }
}

/// Whether `e` is our own shortage (`ENOMEM`, `ENOBUFS`: memory or memlock), not the peer's
/// doing; such a failure that costs a connection must be logged, never silent.
pub fn own_shortage(e: &ringpool::Error) -> bool {
    matches!(e, ringpool::Error::Os { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOMEM | libc::ENOBUFS)))
}

/// Logs a connection reset for our own shortage (see [`own_shortage`]); other errors (the
/// peer left) are not logged.
pub fn log_if_own_shortage(who: &str, e: &ringpool::Error) {
    if own_shortage(e) {
        log(format_args!(
            "{who}: connection reset for our own shortage, not the peer's doing: {e} \
             (RLIMIT_MEMLOCK {}: zero-copy sends and registered memory are charged to it)",
            memlock_limit()
        ));
    }
}

/// Whether the peer of `fd` left: it reset the connection, or it closed its side without
/// sending anything we have not read (a peek returns end of stream). A peer that sent data
/// and then half-closed has not left: its request is still to be forwarded. Takes no data.
pub fn peer_left(fd: &impl AsRawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv with MSG_PEEK writes at most one byte into `byte`, which we own; the socket
    // is live for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EAGAIN | libc::EINTR)
        ),
    }
}

/// How often a pending upstream connect looks whether its client left.
pub const CONNECT_WATCH: Duration = Duration::from_millis(50);

/// Parses a positive number of seconds (a `clap` value parser): `0`, negatives and NaN are
/// refused, since a zero timeout would fail every connection at once.
pub fn positive_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("`{s}`: must be more than 0 seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// Logs a connect timeout once per episode (until a connect succeeds again).
#[derive(Default)]
pub struct ConnectTimeoutLog {
    in_episode: bool,
}

impl ConnectTimeoutLog {
    /// A connect to `upstream` did not finish within `timeout`.
    pub fn timed_out(&mut self, upstream: std::net::SocketAddr, timeout: Duration) {
        if !std::mem::replace(&mut self.in_episode, true) {
            log(format_args!(
                "proxy: the upstream {upstream} did not accept within --connect-timeout \
                 {timeout:?}; resetting the clients waiting for it; logged once until a connect \
                 succeeds"
            ));
        }
    }

    /// A connect succeeded.
    pub fn connected(&mut self) {
        if std::mem::take(&mut self.in_episode) {
            log(format_args!(
                "proxy: the upstream accepts connections again"
            ));
        }
    }
}

/// What a server says when its listening address cannot be had: the flag and the address
/// (`--listen 127.0.0.1:7000: Address already in use`), not the bare OS error.
pub fn listen_error(addr: std::net::SocketAddr) -> impl FnOnce(std::io::Error) -> String {
    move |e| {
        let hint = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => {
                " (another process listens there; pick another port, or 0 for a free one)"
            }
            Some(libc::EACCES) => " (ports below 1024 need privileges)",
            Some(libc::EADDRNOTAVAIL) => " (no interface of this machine has that address)",
            _ => "",
        };
        format!("--listen {addr}: {e}{hint}")
    }
}

/// A buffer group the flags describe could not be made: the error names the flags.
pub fn group_error(bufs: u32, buf_size: usize) -> impl FnOnce(ringpool::Error) -> String {
    move |e| format!("--bufs {bufs} x --buf-size {buf_size}: {e}")
}
