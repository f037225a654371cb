//! `ringpool fanout`: serves one file to every client, reading each chunk **once** and leasing
//! it to all clients' sends at the same time ([`Driver::lease`]). `--lease` picks the kind
//! ([`lease`]): **pages** (the chunk's page-cache pages spliced into a pipe, teed to every
//! client's pipe and spliced to its socket: no copy) or **memory** (the chunk read into a
//! registered buffer, sent from it: zero-copy where the policy says it pays, plain sends from
//! the same memory otherwise); `auto`, the default, picks pages where zero-copy send would
//! copy (loopback, virtual devices and NICs) and memory elsewhere.
//!
//! Clients are served in rounds: a round starts when `--clients` clients are connected (those
//! that connect during a round wait for the next one) and sends each of them the whole file,
//! then half-closes their connections.
//!
//! **Memory is bounded** by `--in-flight` chunk buffers (or, for pages, chunk pipes): a chunk
//! is read only into a free buffer, and a buffer is free again only when every client's send of
//! it is done (and its zero-copy notification is in). **A slow client cannot stall the others forever**: when every
//! buffer is held and none came back for `--laggard-timeout` seconds, the clients that still
//! hold the oldest chunk are disconnected (reset), which frees it; the others go on. Dropping
//! the laggard (rather than waiting) keeps both memory and the other clients' progress bounded.
//!
//! `--rt` runs the same server on the async layer ([`crate::cmd::fanout::rt`]: tasks awaiting
//! `ringpool::rt::lease_group`s instead of this completion loop), with the same summary.
//!
//! `--read-per-client` (hidden; the `fanout` bench's baseline) serves the same rounds with the
//! same machinery minus the sharing: every client has its own chunk reads
//! ([`Driver::read_fixed`] into buffers of the same kind, `--in-flight` at most per client),
//! each followed by a `send_zc` of that buffer to that client alone
//! ([`Driver::send_zc_returning`], so the buffer comes back). See [`serve_read_per_client`].

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ringpool::{Driver, DriverConfig, Event, Fd, FixedBuf, LeaseBacking, Member, SendBuf};

use crate::net::{fits_memlock, log, set_backlog, set_nodelay, set_reset_on_close, Accept};
use crate::signals;

pub(crate) mod lease;
pub(crate) mod rt;

use lease::{Choice, LeaseArg, LeaseKind};

/// Arguments of `ringpool fanout`.
#[derive(clap::Args)]
pub struct Args {
    /// The file to serve.
    #[arg(long)]
    file: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Bytes per chunk (each chunk is read once for all clients).
    #[arg(long, default_value_t = 1 << 20, value_parser = chunk_size)]
    chunk: usize,
    /// Chunks in flight at most (the memory bound: chunk × in-flight bytes).
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    in_flight: usize,
    /// Clients per round: a round starts when this many are connected.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    clients: usize,
    /// Seconds without progress, with every chunk buffer held, before the clients holding the
    /// oldest chunk are dropped.
    #[arg(long, default_value = "10", value_parser = crate::net::positive_secs, value_name = "SECS")]
    laggard_timeout: Duration,
    /// Baseline for `bench`: read the file once per client instead of once per round (each
    /// client its own reads and buffers, `--in-flight` per client; no laggard handling).
    #[arg(long, hide = true)]
    read_per_client: bool,
    /// Run on the async layer (`ringpool::rt`: tasks and futures over the same lease groups)
    /// instead of the hand-written completion loop; same rounds, bound and laggard rule.
    #[arg(long, conflicts_with = "read_per_client")]
    rt: bool,
    /// The kind of lease: `pages` (page-cache pages spliced to every client through pipes, never
    /// copied), `memory` (each chunk read into a registered buffer and sent from it), or `auto`:
    /// pages where zero-copy send would copy (loopback, virtual devices and NICs), memory where
    /// zero-copy pays (a physical NIC) or pages cannot serve.
    #[arg(long, value_enum, default_value_t = LeaseArg::Auto, conflicts_with = "read_per_client")]
    lease: LeaseArg,
}

/// A count that must be at least 1 (a `clap` value parser).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

/// A chunk size: from 1 byte to the largest registered buffer (1 GiB).
fn chunk_size(s: &str) -> Result<usize, String> {
    let n = at_least_one(s)?;
    if n > ringpool::MAX_FIXED_LEN {
        return Err(format!(
            "{n} bytes: a chunk is one registered buffer, at most {} MiB",
            ringpool::MAX_FIXED_LEN >> 20
        ));
    }
    Ok(n)
}

/// What `serve` did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Rounds completed.
    pub rounds: u64,
    /// Clients served to the end of the file.
    pub clients_done: u64,
    /// Clients that failed or were dropped as laggards.
    pub clients_lost: u64,
    /// Of those, dropped as laggards.
    pub laggards: u64,
    /// Chunks read from the file (each once per round).
    pub chunks_read: u64,
    /// Bytes read from the file.
    pub bytes_read: u64,
    /// Bytes delivered to clients (sum over clients).
    pub bytes_sent: u64,
    /// Most chunk buffers in flight at once.
    pub peak_in_flight: usize,
    /// Chunk buffers free (back from every lease) when serving stopped, of `buffers_total`.
    pub buffers_free: usize,
    /// Chunk buffers.
    pub buffers_total: usize,
}

const ACCEPT: u64 = u64::MAX;
/// Token of lease groups: the chunk index.
const CHUNK_TAG: u64 = 1 << 62;

struct Client {
    /// The socket; `None` once the client failed or was dropped (its ops keep their own clones,
    /// so the descriptor closes when the last of them ends).
    fd: Option<Fd>,
    /// Sends whose result has not come.
    sends: u32,
    /// Chunks whose send completed.
    done_chunks: u64,
    /// Chunks this client's sends still hold (a zero-copy send until its notification, which
    /// on loopback comes only once the client has read the data).
    held: u32,
    /// Chunks this client's sends let go of.
    released: u64,
    alive: bool,
}

/// The state of one round.
struct Round {
    clients: Vec<Client>,
    /// The next chunk to read, and whether the file ended.
    next_chunk: u64,
    /// Where the next chunk starts in the file (a short read moves it by what was read).
    offset: u64,
    eof: bool,
    /// A leader read is in flight (reads go one at a time, so chunks reach every client in order).
    reading: bool,
}

pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    signals::install();
    let file = open_regular(&args.file)?;
    // The baseline reads per client into memory: no lease to choose.
    let choice = if args.read_per_client {
        None
    } else {
        let plan = lease::Plan {
            listen: args.listen,
            chunk: args.chunk,
            in_flight: args.in_flight,
            clients: args.clients,
        };
        let choice = lease::choose(args.lease, &plan)?;
        log(format_args!(
            "fanout: {} leases ({})",
            choice.kind.label(),
            choice.why
        ));
        Some(choice)
    };
    let opts = Options {
        chunk: args.chunk,
        in_flight: args.in_flight,
        clients: args.clients,
        laggard_timeout: args.laggard_timeout,
        lease: choice.as_ref().map_or(LeaseKind::Memory, |c| c.kind),
    };
    let config = driver_config(&args, opts.lease);
    let (summary, z, d, p) = if args.rt {
        let listener = ringpool::rt::TcpListener::bind(args.listen)
            .map_err(|e| crate::net::listen_error(args.listen)(e.into()))?;
        let addr = listener.local_addr()?;
        let announce = move || announce(addr);
        crate::cmd::fanout::rt::run(
            file,
            listener,
            opts,
            config,
            announce,
            signals::stop_requested,
        )?
    } else {
        run_event_loop(&args, file, &opts, config)?
    };
    report(&args, choice.as_ref(), &summary, &z, &d, &p);
    Ok(())
}

/// The start line: where the server listens.
fn announce(addr: SocketAddr) -> std::io::Result<()> {
    println!("listening on {addr}");
    // A closed stdout is not an error for a server.
    let _ = std::io::stdout().flush();
    Ok(())
}

/// The driver's configuration: registered chunk buffers and zero-copy sends both pin memory
/// against RLIMIT_MEMLOCK: where the buffers do not fit it, fall back (once, at start) to
/// plain memory and plain sends rather than fail sends (and drop clients) later. Pages leases
/// have no chunk buffers: nothing to check.
fn driver_config(args: &Args, kind: LeaseKind) -> DriverConfig {
    let mut config = DriverConfig::default().entries(crate::cmd::probe::SERVER_RING_ENTRIES);
    if kind == LeaseKind::Pages {
        return config;
    }
    let bytes = (args.chunk as u64).saturating_mul(args.in_flight as u64);
    if let Err(why) = fits_memlock(bytes, &format!("{} chunk buffers", args.in_flight)) {
        log(format_args!(
            "fanout: {why}: serving from plain memory with plain sends (no zero-copy); \
             raise `ulimit -l` or lower --chunk/--in-flight for registered memory"
        ));
        config = config
            .force(ringpool::Force::NoFixed)
            .zerocopy(ringpool::ZcConfig::default().mode(ringpool::ZcMode::Off));
    }
    config
}

/// Serves on the driver's completion loop ([`serve`], or [`serve_read_per_client`]).
fn run_event_loop(
    args: &Args,
    file: std::fs::File,
    opts: &Options,
    config: DriverConfig,
) -> Result<ServerStats, Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(args.listen).map_err(crate::net::listen_error(args.listen))?;
    set_backlog(&listener, 4096)?;
    let addr = listener.local_addr()?;
    let mut driver = Driver::new(config)?;
    announce(addr)?;
    let file = Fd::from(std::os::fd::OwnedFd::from(file));
    let listener = Fd::from(listener);
    let stop = signals::stop_requested;
    let summary = if args.read_per_client {
        serve_read_per_client(&mut driver, file, listener, opts, stop)?
    } else {
        serve(&mut driver, file, listener, opts, stop)?
    };
    Ok((
        summary,
        driver.zc_stats(),
        driver.stats(),
        driver.pipe_stats(),
    ))
}

/// What a server reports at stop: its summary and its driver's statistics.
pub(crate) type ServerStats = (
    Summary,
    ringpool::ZcStats,
    ringpool::DriverStats,
    ringpool::PipeStats,
);

/// Prints the final summary lines and the `stats {json}` line (read by the bench and the
/// tests): the lease kind and, for pages, how the pipes were used.
fn report(
    args: &Args,
    choice: Option<&Choice>,
    summary: &Summary,
    z: &ringpool::ZcStats,
    d: &ringpool::DriverStats,
    p: &ringpool::PipeStats,
) {
    println!(
        "stopped: {} rounds, {} clients served, {} lost ({} laggards), {} chunks read, {} bytes sent",
        summary.rounds,
        summary.clients_done,
        summary.clients_lost,
        summary.laggards,
        summary.chunks_read,
        summary.bytes_sent
    );
    if let Some(c) = choice {
        println!(
            "leases: {} ({}); pipes: {} made, {} reused, {} in use, {} idle, {} closed, \
             {} would-block waits",
            c.kind.label(),
            c.why,
            p.made,
            p.reused,
            p.in_use,
            p.idle,
            p.closed,
            p.eagain_polls
        );
    }
    let mut json = serde_json::json!({
        "rounds": summary.rounds, "clients_done": summary.clients_done,
        "clients_lost": summary.clients_lost, "laggards": summary.laggards,
        "chunks_read": summary.chunks_read, "bytes_read": summary.bytes_read,
        "bytes_sent": summary.bytes_sent, "peak_in_flight": summary.peak_in_flight,
        "buffers_free": summary.buffers_free, "buffers_total": summary.buffers_total,
    });
    json["zc_sends"] = z.zc_sends.into();
    json["zc_copied"] = z.zc_copied.into();
    json["plain_sends"] = z.plain_sends.into();
    json["fixed_sends"] = z.fixed_sends.into();
    json["chunk_bytes"] = (args.chunk as u64).into();
    json["in_flight_limit"] = (args.in_flight as u64).into();
    json["enters"] = d.enters.into();
    json["sqes"] = d.sqes.into();
    json["cqes"] = d.cqes.into();
    json["lease"] = choice.map_or(serde_json::Value::Null, |c| c.kind.label().into());
    json["lease_why"] = choice.map_or(serde_json::Value::Null, |c| c.why.clone().into());
    json["pipes_made"] = p.made.into();
    json["pipes_reused"] = p.reused.into();
    json["pipes_in_use"] = (p.in_use as u64).into();
    json["pipes_idle"] = (p.idle as u64).into();
    json["pipes_closed"] = p.closed.into();
    json["pipe_max"] = (p.max_pipe as u64).into();
    json["eagain_polls"] = p.eagain_polls.into();
    json["mode"] = if args.read_per_client {
        "read-per-client"
    } else if args.rt {
        "lease-rt"
    } else {
        "lease"
    }
    .into();
    println!("stats {json}");
}

/// Tuning of [`serve`].
pub struct Options {
    pub chunk: usize,
    pub in_flight: usize,
    pub clients: usize,
    pub laggard_timeout: Duration,
    /// The kind of lease each chunk goes out on.
    pub lease: LeaseKind,
}

/// Serves `file` to the clients of `listener`, round after round, until `stop()` says so.
pub fn serve(
    driver: &mut Driver,
    file: Fd,
    listener: Fd,
    opts: &Options,
    stop: impl Fn() -> bool,
) -> ringpool::Result<Summary> {
    let free: Vec<LeaseBacking> = (0..opts.in_flight.max(1))
        .map(|_| chunk_backing(opts, || driver.fixed_buf_or_plain(opts.chunk)))
        .collect::<ringpool::Result<_>>()?;
    let mut fanout = Fanout::new(&file, opts, free);
    let mut accept = Accept::new(driver, &listener, ACCEPT)?;
    while !stop() {
        fanout.start_round();
        if fanout.step_round(driver)? {
            continue;
        }
        accept.poll(driver, &listener)?;
        driver.wait(Some(accept.wait_for(Duration::from_millis(100))))?;
        while let Some(c) = driver.pop() {
            if c.token == ACCEPT {
                on_accept(&mut accept, &mut fanout.waiting, c);
            } else {
                fanout.on_completion(driver, c);
            }
        }
    }
    accept.cancel(driver);
    let mut summary = fanout.summary;
    summary.buffers_free = fanout.free.len();
    summary.buffers_total = fanout.total_bufs;
    Ok(summary)
}

/// A chunk's backing of `opts`' kind: pages of `opts.chunk` bytes, or a buffer from `buf`.
pub(crate) fn chunk_backing(
    opts: &Options,
    buf: impl FnOnce() -> ringpool::Result<FixedBuf>,
) -> ringpool::Result<LeaseBacking> {
    Ok(match opts.lease {
        LeaseKind::Pages => LeaseBacking::Pages { len: opts.chunk },
        LeaseKind::Memory => LeaseBacking::Memory(buf()?),
    })
}

/// [`serve`]'s state between completions.
struct Fanout<'a> {
    file: &'a Fd,
    opts: &'a Options,
    summary: Summary,
    /// Chunk buffers (for pages: chunk slots) back from every lease, of `total_bufs`.
    free: Vec<LeaseBacking>,
    total_bufs: usize,
    /// Clients connected for the next round.
    waiting: Vec<Fd>,
    round: Option<Round>,
    /// When a chunk buffer last came back (or the round or a laggard drop started).
    last_progress: Instant,
}

impl<'a> Fanout<'a> {
    fn new(file: &'a Fd, opts: &'a Options, free: Vec<LeaseBacking>) -> Fanout<'a> {
        Fanout {
            file,
            opts,
            summary: Summary::default(),
            total_bufs: free.len(),
            free,
            waiting: Vec::new(),
            round: None,
            last_progress: Instant::now(),
        }
    }

    /// Starts a round with the waiting clients when none runs and enough are waiting.
    fn start_round(&mut self) {
        if self.round.is_none() && self.waiting.len() >= self.opts.clients.max(1) {
            self.round = Some(Round {
                clients: self
                    .waiting
                    .drain(..)
                    .map(|fd| Client {
                        fd: Some(fd),
                        sends: 0,
                        done_chunks: 0,
                        held: 0,
                        released: 0,
                        alive: true,
                    })
                    .collect(),
                next_chunk: 0,
                offset: 0,
                eof: false,
                reading: false,
            });
            self.last_progress = Instant::now();
        }
    }

    /// Moves the round on: the next chunk lent out, the laggards dropped; whether the round
    /// just finished.
    fn step_round(&mut self, driver: &mut Driver) -> ringpool::Result<bool> {
        let Some(r) = &mut self.round else {
            return Ok(false);
        };
        // Read the next chunk into a free buffer and lend it to every live client.
        if !r.reading && !r.eof && r.clients.iter().any(|c| c.alive) {
            if let Some(buf) = self.free.pop() {
                lend_chunk(driver, self.file, r, buf)?;
                self.summary.peak_in_flight = self
                    .summary
                    .peak_in_flight
                    .max(self.total_bufs - self.free.len());
            }
        }
        if self.free.is_empty() && self.last_progress.elapsed() > self.opts.laggard_timeout {
            drop_laggards(driver, r, &mut self.summary);
            self.last_progress = Instant::now();
        }
        if round_finished(r, &mut self.summary) && self.free.len() == self.total_bufs {
            self.summary.rounds += 1;
            self.round = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// Routes one completion of a round's op: a chunk read, a chunk back, a send's result, a
    /// member's notification.
    #[inline]
    fn on_completion(&mut self, driver: &mut Driver, c: ringpool::Completion) {
        match (c.token, c.event) {
            (_, Event::LeaseFilled { result, lease }) => self.filled(result, lease),
            (_, Event::LeaseReturned(buf)) => {
                self.free.push(LeaseBacking::Memory(buf));
                self.last_progress = Instant::now();
            }
            (_, Event::PagesReturned) => {
                self.free.push(LeaseBacking::Pages {
                    len: self.opts.chunk,
                });
                self.last_progress = Instant::now();
            }
            (i, Event::Sent { result, .. }) => self.sent(driver, i, c.more, result),
            (i, Event::Returned(lease)) => {
                // A zero-copy member's notification: it let go of its chunk.
                drop(lease);
                let r = self.round.as_mut().expect("a send belongs to the round");
                let client = &mut r.clients[i as usize];
                client.held -= 1;
                client.released += 1;
            }
            (_, other) => eprintln!("fanout: unexpected {other:?}"),
        }
    }

    /// The leader read a chunk (`result` bytes): counted, and the end of the file noted.
    #[inline]
    fn filled(&mut self, result: ringpool::Result<usize>, lease: Option<ringpool::Lease>) {
        let r = self.round.as_mut().expect("a lease belongs to the round");
        r.reading = false;
        drop(lease);
        match result {
            Ok(0) => r.eof = true,
            Ok(n) => {
                self.summary.chunks_read += 1;
                self.summary.bytes_read += n as u64;
                r.next_chunk += 1;
                r.offset += n as u64;
                // Only a 0-byte read is the end; a short one is the end only if it
                // reached the file's size (which spares the extra read).
                r.eof = n < self.opts.chunk && at_end(self.file, r.offset);
            }
            Err(e) => {
                eprintln!("reading the file: {e}");
                r.eof = true;
            }
        }
    }

    /// A send to client `i` completed (`more`: its notification is still due); a failed one
    /// drops the client (reset).
    #[inline]
    fn sent(&mut self, driver: &mut Driver, i: u64, more: bool, result: ringpool::Result<usize>) {
        let r = self.round.as_mut().expect("a send belongs to the round");
        let client = &mut r.clients[i as usize];
        client.sends -= 1;
        if !more {
            client.held -= 1;
            client.released += 1;
        }
        match result {
            Ok(n) => {
                client.done_chunks += 1;
                self.summary.bytes_sent += n as u64;
            }
            Err(e) => {
                if let Some(fd) = client.fd.take() {
                    log_lost_client(i, &e);
                    client.alive = false;
                    self.summary.clients_lost += 1;
                    // Reset, so zero-copy data queued for it is dropped at once.
                    set_reset_on_close(&fd);
                    driver.cancel_fd(&fd);
                }
            }
        }
    }
}

/// Reads the round's next chunk into `backing` (a buffer, or a pipe's worth of pages) and lends
/// it to every client that has a socket. Pages members splice (`send`: nothing to notify).
fn lend_chunk(
    driver: &mut Driver,
    file: &Fd,
    r: &mut Round,
    backing: LeaseBacking,
) -> ringpool::Result<()> {
    let member = match backing {
        LeaseBacking::Pages { .. } => Member::send,
        _ => Member::send_zc,
    };
    let members = r
        .clients
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some(member(c.fd.as_ref()?, i as u64)))
        .collect::<Vec<_>>();
    for c in r.clients.iter_mut().filter(|c| c.fd.is_some()) {
        c.sends += 1;
        c.held += 1;
    }
    let offset = r.offset;
    driver.lease(file, backing, offset, members, CHUNK_TAG | r.next_chunk)?;
    r.reading = true;
    Ok(())
}

/// Logs why client `i` is dropped: a send to it failed with `e`. A peer that left is one line;
/// a failure that is our own shortage (memory, memlock) says so, since the client did nothing.
pub(crate) fn log_lost_client(i: u64, e: &ringpool::Error) {
    let errno = match e {
        ringpool::Error::Os { source, .. } => source.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EPIPE | libc::ECONNRESET) => log(format_args!("fanout: client {i} left ({e})")),
        Some(libc::ENOMEM | libc::ENOBUFS) => log(format_args!(
            "fanout: client {i} dropped for our own shortage, not its fault: {e} \
             (RLIMIT_MEMLOCK {}: zero-copy sends pin memory too)",
            crate::net::memlock_limit()
        )),
        _ => log(format_args!("fanout: client {i} dropped: {e}")),
    }
}

/// Whether `offset` is at (or past) the end of the regular file `file` now.
pub(crate) fn at_end(file: &impl AsRawFd, offset: u64) -> bool {
    // SAFETY: fstat writes one `stat` into a zeroed variable we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `file` is a live descriptor.
    let rc = unsafe { libc::fstat(file.as_raw_fd(), &mut st) };
    rc == 0 && offset >= st.st_size as u64
}

/// Opens `path` for `--file`, refusing what fanout cannot serve: a missing path, a directory,
/// or anything but a regular file (a FIFO, a device, a socket). Fanout reads each chunk at its
/// offset, once per round, so it serves regular files only; a stream such as a FIFO or
/// `/dev/zero` has neither offsets nor an end to serve to every client.
pub(crate) fn open_regular(path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::FileTypeExt as _;
    let p = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("--file {p}: {e}"))?;
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        ""
    };
    if !kind.is_empty() {
        return Err(format!(
            "--file {p}: is {kind}, not a regular file; fanout serves regular files only (it \
             reads each chunk at its offset, once for every client of a round)"
        ));
    }
    std::fs::File::open(path).map_err(|e| format!("--file {p}: {e}"))
}

/// Every chunk was read and every live client got all of them: half-close and count them.
fn round_finished(r: &mut Round, summary: &mut Summary) -> bool {
    let all_sent = r.clients.iter().all(|c| c.sends == 0);
    if !(r.eof || r.clients.iter().all(|c| !c.alive)) || r.reading || !all_sent {
        return false;
    }
    for c in r.clients.iter_mut().filter(|c| c.alive) {
        if let Some(fd) = c.fd.take() {
            // SAFETY: shutdown on a socket the round owns.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
        }
        c.alive = false;
        summary.clients_done += 1;
    }
    true
}

/// Every chunk buffer is held and nothing came back for a while: reset the clients that still
/// hold the oldest chunk (those holding chunks that let go of the fewest). Resetting a socket
/// ends its sends and frees its pending zero-copy notifications.
fn drop_laggards(driver: &mut Driver, r: &mut Round, summary: &mut Summary) {
    let Some(oldest) = r
        .clients
        .iter()
        .filter(|c| c.alive && c.held > 0)
        .map(|c| c.released)
        .min()
    else {
        return;
    };
    for c in r
        .clients
        .iter_mut()
        .filter(|c| c.alive && c.held > 0 && c.released == oldest)
    {
        c.alive = false;
        summary.clients_lost += 1;
        summary.laggards += 1;
        if let Some(fd) = c.fd.take() {
            set_reset_on_close(&fd);
            driver.cancel_fd(&fd);
        }
    }
}

/// Token bit of a [`serve_read_per_client`] read; the low bits are the client's index.
const READ_TAG: u64 = 1 << 61;
/// Token bit of a [`serve_read_per_client`] send.
const SEND_TAG: u64 = 1 << 60;

/// A client of [`serve_read_per_client`]: its own position in the file and its own buffers.
struct OwnClient {
    /// The socket; `None` once the client failed or was served.
    fd: Option<Fd>,
    /// The next chunk to read for this client, and whether its reads reached the end.
    next_chunk: u64,
    /// Where its next chunk starts in the file.
    offset: u64,
    eof: bool,
    /// A read for this client is in flight (one at a time, so its chunks go out in order).
    reading: bool,
    /// Sends whose result has not come.
    sends: u32,
    /// Buffers this client holds (its read, its sends until their buffer came back).
    held: usize,
}

/// The read-per-client baseline of [`serve`]: the same rounds, the same kind of buffers, the
/// same one-read-at-a-time pipelining, but nothing shared. Each client gets its own reads of
/// every chunk ([`Driver::read_fixed`], into a buffer of a pool of `in_flight` per client) and
/// each read buffer goes to that client alone with [`Driver::send_zc_returning`] (the same
/// zero-copy policy as the lease members), which hands it back for the next read. A slow
/// client holds only its own buffers, so there is no laggard rule here.
pub fn serve_read_per_client(
    driver: &mut Driver,
    file: Fd,
    listener: Fd,
    opts: &Options,
    stop: impl Fn() -> bool,
) -> ringpool::Result<Summary> {
    let per_client = opts.in_flight.max(1);
    let free: Vec<FixedBuf> = (0..per_client * opts.clients.max(1))
        .map(|_| driver.fixed_buf_or_plain(opts.chunk))
        .collect::<ringpool::Result<_>>()?;
    let mut s = PerClient {
        file: &file,
        opts,
        summary: Summary::default(),
        per_client,
        total_bufs: free.len(),
        free,
        waiting: Vec::new(),
        round: None,
    };
    let mut accept = Accept::new(driver, &listener, ACCEPT)?;
    while !stop() {
        s.start_round();
        if s.step_round(driver)? {
            continue;
        }
        accept.poll(driver, &listener)?;
        driver.wait(Some(accept.wait_for(Duration::from_millis(100))))?;
        while let Some(c) = driver.pop() {
            if c.token == ACCEPT {
                on_accept(&mut accept, &mut s.waiting, c);
            } else {
                s.on_completion(driver, c)?;
            }
        }
    }
    accept.cancel(driver);
    let mut summary = s.summary;
    summary.buffers_free = s.free.len();
    summary.buffers_total = s.total_bufs;
    Ok(summary)
}

/// A client accepted: it waits for the next round.
fn on_accept(accept: &mut Accept, waiting: &mut Vec<Fd>, c: ringpool::Completion) {
    if let Some(fd) = accept.on_completion(c, waiting.len()) {
        set_nodelay(&fd);
        waiting.push(fd);
    }
}

/// [`serve_read_per_client`]'s state between completions.
struct PerClient<'a> {
    file: &'a Fd,
    opts: &'a Options,
    summary: Summary,
    /// Buffers one client may hold.
    per_client: usize,
    free: Vec<FixedBuf>,
    total_bufs: usize,
    /// Clients connected for the next round.
    waiting: Vec<Fd>,
    round: Option<Vec<OwnClient>>,
}

impl PerClient<'_> {
    /// Starts a round with the waiting clients when none runs and enough are waiting.
    fn start_round(&mut self) {
        if self.round.is_none() && self.waiting.len() >= self.opts.clients.max(1) {
            let clients = self.waiting.drain(..).map(|fd| OwnClient {
                fd: Some(fd),
                next_chunk: 0,
                offset: 0,
                eof: false,
                reading: false,
                sends: 0,
                held: 0,
            });
            self.round = Some(clients.collect());
        }
    }

    /// Starts each client's next read where it may, and ends the round (half-closing its
    /// clients) when every client is done and every buffer back; whether it ended.
    fn step_round(&mut self, driver: &mut Driver) -> ringpool::Result<bool> {
        let Some(clients) = &mut self.round else {
            return Ok(false);
        };
        for (i, c) in clients.iter_mut().enumerate() {
            if c.fd.is_none() || c.reading || c.eof || c.held >= self.per_client {
                continue;
            }
            let Some(buf) = self.free.pop() else { break };
            let offset = c.offset;
            let token = READ_TAG | i as u64;
            driver.read_fixed(self.file, buf, 0..self.opts.chunk, offset, token)?;
            c.reading = true;
            c.held += 1;
        }
        let summary = &mut self.summary;
        summary.peak_in_flight = summary
            .peak_in_flight
            .max(self.total_bufs - self.free.len());
        let done = |c: &OwnClient| c.fd.is_none() || (c.eof && c.sends == 0 && !c.reading);
        if clients.iter().all(done) && self.free.len() == self.total_bufs {
            for fd in clients.iter_mut().filter_map(|c| c.fd.take()) {
                // SAFETY: shutdown on a socket the round owns.
                unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
                summary.clients_done += 1;
            }
            summary.rounds += 1;
            self.round = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// Routes one completion of a client's op: a read, a send's result, a buffer back.
    #[inline]
    fn on_completion(
        &mut self,
        driver: &mut Driver,
        c: ringpool::Completion,
    ) -> ringpool::Result<()> {
        match (c.token, c.event) {
            (t, Event::FixedIo { buf, result }) if t & READ_TAG != 0 => {
                self.read(driver, t, buf, result)?
            }
            (t, Event::Sent { result, .. }) if t & SEND_TAG != 0 => {
                let client = client(&mut self.round, t);
                client.sends -= 1;
                match result {
                    Ok(n) => self.summary.bytes_sent += n as u64,
                    Err(e) => {
                        if let Some(fd) = client.fd.take() {
                            log_lost_client(t & !SEND_TAG, &e);
                            self.summary.clients_lost += 1;
                            driver.cancel_fd(&fd);
                        }
                    }
                }
            }
            (t, Event::Returned(SendBuf::Fixed { buf, .. })) if t & SEND_TAG != 0 => {
                client(&mut self.round, t).held -= 1;
                self.free.push(buf);
            }
            (_, other) => eprintln!("fanout --read-per-client: unexpected {other:?}"),
        }
        Ok(())
    }

    /// A client's read (token `t`) completed: its bytes go to that client alone, or the
    /// buffer back to the pool when there is nothing to send or no one to send to.
    #[inline]
    fn read(
        &mut self,
        driver: &mut Driver,
        t: u64,
        buf: FixedBuf,
        result: ringpool::Result<usize>,
    ) -> ringpool::Result<()> {
        let client = client(&mut self.round, t);
        client.reading = false;
        let n = match result {
            Ok(n) => n,
            Err(e) => {
                eprintln!("reading the file: {e}");
                0
            }
        };
        if n > 0 {
            self.summary.chunks_read += 1;
            self.summary.bytes_read += n as u64;
            client.next_chunk += 1;
            client.offset += n as u64;
        }
        // Only a 0-byte read is the end (or a short one that reached the size).
        client.eof = n == 0 || n < self.opts.chunk && at_end(self.file, client.offset);
        match &client.fd {
            Some(fd) if n > 0 => {
                let send = SendBuf::Fixed { buf, range: 0..n };
                driver.send_zc_returning(fd, send, SEND_TAG | (t & !READ_TAG))?;
                client.sends += 1;
            }
            _ => {
                self.free.push(buf);
                client.held -= 1;
            }
        }
        Ok(())
    }
}

/// The client of the round that an op's token names.
fn client(round: &mut Option<Vec<OwnClient>>, token: u64) -> &mut OwnClient {
    let i = (token & !(READ_TAG | SEND_TAG)) as usize;
    &mut round.as_mut().expect("an op belongs to the round")[i]
}
