//! `ringpool proxy`: a TCP proxy in both directions. Every connection's receives select buffers
//! from one shared group, a registered region where memlock allows (plain memory otherwise),
//! and the received buffers leave as they are, through `send_zc`: zero-copy from the registered
//! memory where the policy says it pays, plain `sendmsg` from the same buffers otherwise. No
//! byte is copied in user space.
//!
//! Half-close propagates (EOF from one side becomes `shutdown(SHUT_WR)` on the other once
//! everything before it was sent), and so do resets (an error on one side resets the other).
//!
//! **Flow control.** A shared group can deadlock a proxy: if one direction's sends block (its
//! receiver is not reading) and hold every buffer, the other direction, whose progress would
//! unblock them, cannot receive. So each direction holds at most a fair share of the group,
//! `buffers / (2 × connections)` (at least one), counted until its buffers are really back
//! (after any zero-copy notification), and each of its receives is one bundle of at most what
//! its share leaves ([`Driver::recv_bundle_limited`]; `--recv-bufs` lowers that): the shares
//! always fit in the group, so every direction can always make progress and the group never
//! runs dry. A multishot receive cannot be bounded this way (it takes whatever the socket holds
//! before a cancel lands), nor a bundle whose length is a whole number of buffers: a full one
//! is retried and takes what the socket holds (6.18, measured: 3 buffers asked, 31 taken).
//! Bundles pay at 64 KiB writes, where the proxy is the busy side and data waits in its
//! sockets: CPU per GB 0.68–0.76× one buffer per receive at 1 stream, 0.82–0.93× at 32, 5×
//! fewer operations (same runs); at 4 KiB × 1 the load generator moved 0.63–0.70× the GB/s
//! through them (`--recv-bufs 1` restores one buffer per receive).
//!
//! **Receive coalescing.** A proxy that is faster than its peers wakes for every few KiB that
//! arrive: at 4 KiB client writes on loopback, one receive and one send per ~10 KiB, most of
//! the CPU in per-wake-up and per-packet costs rather than in moving bytes. So the driver runs
//! with [`DriverConfig::receive_coalescing`] (`--coalesce-us`, 100 µs): while data streams in
//! in small pieces, each wait submits what is queued, sleeps, and only then collects
//! completions, so every receive and send carries more bytes; bulk 64 KiB transfers and
//! request/response traffic see no delay. Measured (2 cores, proxy CPU per GB at 4 KiB
//! writes): ≈ 0.55–0.65× the CPU without coalescing; neutral at 64 KiB writes. The cost is
//! latency: up to one delay per hop while a stream is busy; `--coalesce-us 0` turns it off.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ringpool::{
    BufChain, BufGroupConfig, Driver, DriverConfig, Event, Fd, OpId, Registration, SendBuf,
    ZcConfig, ZcMode, ZcrxBuf,
};

use crate::net::{
    abort_connection, group_error, listen_error, log, nofile_limit, peer_left, set_backlog,
    set_nodelay, Accept, ConnectTimeoutLog, CONNECT_WATCH,
};
use crate::recv::{RecvChoice, Source};
use crate::signals;

pub(crate) mod rt;

/// Arguments of `ringpool proxy`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// Where to forward connections.
    #[arg(long)]
    pub(crate) upstream: SocketAddr,
    /// Zero-copy send: auto (the adaptive policy), on, or off.
    #[arg(long, default_value = "auto")]
    pub(crate) zerocopy: ZcMode,
    /// Size of each buffer in the shared group.
    #[arg(long, default_value_t = 65536)]
    pub(crate) buf_size: usize,
    /// Number of buffers in the shared group (a power of two, at most 32768).
    #[arg(long, default_value_t = 256)]
    pub(crate) bufs: u32,
    /// Most buffers one receive takes (a bundle receive, Linux 6.10+; one buffer where
    /// bundles are missing), always within the direction's share of the group; 0: as many as
    /// the share leaves.
    #[arg(long, default_value_t = 0)]
    pub(crate) recv_bufs: u32,
    /// Receive coalescing: while data streams in, wait this long (microseconds) before
    /// collecting completions, so each receive takes more bytes; 0 turns it off.
    #[arg(long, default_value_t = 100)]
    pub(crate) coalesce_us: u64,
    /// Seconds an upstream connect may take before its client is reset (an upstream that
    /// never answers, e.g. with a full backlog, must not hold clients and descriptors).
    #[arg(long, default_value = "5", value_parser = crate::net::positive_secs, value_name = "SECS")]
    pub(crate) connect_timeout: Duration,
    /// Run on the async layer (`ringpool::rt`): a task per direction, one buffer per receive
    /// (see `rt.rs` beside this file).
    #[arg(long)]
    pub(crate) rt: bool,
    /// Where received bytes land: `groups` (the shared group or registered region), `zcrx`
    /// (a device-less zero-copy receive area of --bufs x --buf-size bytes in 4 KiB buffers:
    /// Linux 7.1+, CAP_NET_ADMIN), `zcrx=IFNAME:QUEUE` (an area fed by that NIC queue), or
    /// `auto` (zcrx where the kernel and this process can, else groups). The event loop
    /// only; --rt receives through groups.
    #[arg(long, default_value = "auto", value_parser = crate::recv::parse_recv)]
    pub(crate) recv: RecvChoice,
    /// How bytes cross the proxy: `buffers` (received into the shared group or area, sent on
    /// from there) or `splice` (socket to pipe to socket, `Driver::splice_stream`: no byte in
    /// user memory, no group; --bufs, --buf-size, --zerocopy and --recv do not apply). The
    /// event loop only.
    #[arg(long, default_value = "buffers")]
    pub(crate) path: ProxyPath,
    /// The pipe size of `--path splice`, per direction with a chunk on its way (at most
    /// /proc/sys/fs/pipe-max-size). Larger pipes move more per splice (1 MiB halved the CPU
    /// per GB of one 64 KiB stream against 64 KiB pipes here), but at 32 streams each way
    /// 1 MiB pipes flooded loopback's socket memory and throughput fell tenfold.
    #[arg(long, default_value_t = 64 << 10)]
    pub(crate) pipe_bytes: usize,
    /// `--path splice`: at most this many pipes at once for all connections (default 256: 16
    /// MiB of 64 KiB pipes, 512 descriptors); a direction whose chunk finds none waits for one.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_pipes: u32,
}

/// How bytes cross the proxy (`--path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyPath {
    /// Received into buffers (the shared group, or a zero-copy receive area), sent from there.
    Buffers,
    /// Spliced through pipes, never in user memory.
    Splice,
}

const ACCEPT: u64 = u64::MAX;
/// Token tags: which op of a pair a completion belongs to.
const RECV_CLIENT: u64 = 0;
const RECV_UPSTREAM: u64 = 1;
const SEND_UPSTREAM: u64 = 2;
const SEND_CLIENT: u64 = 3;
const CONNECT: u64 = 4;
/// The splice streams of `--path splice`: client → upstream, upstream → client.
const SPLICE_UP: u64 = 5;
const SPLICE_DOWN: u64 = 6;

/// Received bytes waiting to be sent: group buffers, or buffers of a zero-copy receive area.
enum Pending {
    Chain(BufChain),
    Zcrx(Vec<ZcrxBuf>),
}

impl Pending {
    fn buf_count(&self) -> u32 {
        match self {
            Pending::Chain(c) => c.buf_count() as u32,
            Pending::Zcrx(v) => v.len() as u32,
        }
    }

    fn len(&self) -> usize {
        match self {
            Pending::Chain(c) => c.len(),
            Pending::Zcrx(v) => v.iter().map(|b| b.len()).sum(),
        }
    }

    /// Appends `more` (of the same kind: a proxy has one receive source).
    fn append(&mut self, more: Pending) {
        match (self, more) {
            (Pending::Chain(c), Pending::Chain(m)) => c.append(m),
            (Pending::Zcrx(v), Pending::Zcrx(mut m)) => v.append(&mut m),
            _ => unreachable!("a proxy receives from one source"),
        }
    }

    fn into_send_buf(self) -> SendBuf {
        match self {
            Pending::Chain(c) => SendBuf::from(c),
            Pending::Zcrx(v) => SendBuf::Zcrx(v),
        }
    }
}

/// One direction of a pair: bytes from `src` to `dst`.
#[derive(Default)]
struct Direction {
    /// `src` reached end of stream.
    eof: bool,
    /// Sends to `dst` whose result has not come (at most one: see `pending`).
    sends: u32,
    /// Data received while a send was in flight: it leaves in one send (one `sendmsg` with an
    /// iovec per buffer) when that send completes, so small receives coalesce.
    pending: Option<Pending>,
    /// A zero-copy receive (`--recv zcrx`): the op, and whether it was cancelled at the share
    /// (its end is then a pause, not the end of the stream).
    zc_op: Option<OpId>,
    pausing: bool,
    /// Buffers of this direction not yet back in the group.
    bufs_out: u32,
    /// A receive on `src` is armed.
    receiving: bool,
    /// `dst` was shut down for writing (the EOF went through).
    shut: bool,
}

struct Pair {
    /// The sockets; taken (closed once the last op using them ends) when the pair aborts, so
    /// a peer that stopped reading cannot keep them, and the zero-copy data queued on them,
    /// alive forever.
    client: Option<Fd>,
    upstream: Option<Fd>,
    /// [0]: client → upstream, [1]: upstream → client.
    dirs: [Direction; 2],
    /// Ops of this pair whose final completion has not come: the pair's key is not reused
    /// before they are all in.
    live_ops: u32,
    aborted: bool,
    /// When the upstream connect started, while it is pending.
    connecting_since: Option<Instant>,
}

impl Pair {
    /// (source, destination) of direction `dir`; only called before the pair aborted.
    fn sockets(&self, dir: usize) -> (&Fd, &Fd) {
        let (c, u) = (
            self.client.as_ref().expect("a live pair has its sockets"),
            self.upstream.as_ref().expect("a live pair has its sockets"),
        );
        if dir == 0 {
            (c, u)
        } else {
            (u, c)
        }
    }

    fn finished(&self) -> bool {
        self.live_ops == 0 && (self.aborted || (self.dirs[0].shut && self.dirs[1].shut))
    }
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct Summary {
    pub connections: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub resets: u64,
    /// Clients refused (reset at once) because no upstream socket could be opened.
    pub refused: u64,
    /// Clients reset because the upstream did not accept within `--connect-timeout`.
    pub connect_timeouts: u64,
    /// Clients that left while their upstream connect was pending (the connect cancelled).
    pub left_connecting: u64,
}

pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.rt {
        check_rt_flags(&args)?;
        return crate::cmd::proxy::rt::run(args);
    }
    signals::install();
    let listener = TcpListener::bind(args.listen).map_err(listen_error(args.listen))?;
    set_backlog(&listener, 4096)?;
    let addr = listener.local_addr()?;
    let splice = splice_pipe(&args)?;
    let (mut driver, source) = open_driver(&args, splice)?;
    println!("listening on {addr}");
    announce(&args, &source, splice);
    let _ = std::io::stdout().flush();
    let summary = serve(
        &mut driver,
        &source,
        Fd::from(listener),
        Upstream {
            addr: args.upstream,
            connect_timeout: args.connect_timeout,
        },
        splice,
        // 0: no cap of its own, only the share's.
        if args.recv_bufs == 0 {
            u32::MAX
        } else {
            args.recv_bufs
        },
        signals::stop_requested,
    )?;
    report(&summary, &source, &driver, "event-loop");
    Ok(())
}

/// Refuses what the `--rt` proxy cannot do: splicing, and receiving into a zcrx area.
fn check_rt_flags(args: &Args) -> Result<(), String> {
    if args.path == ProxyPath::Splice {
        return Err("--path splice: the --rt proxy forwards through buffers only".into());
    }
    if !matches!(args.recv, RecvChoice::Groups | RecvChoice::Auto) {
        return Err("--recv zcrx: the --rt proxy receives through buffer groups only".into());
    }
    if args.recv_bufs != 0 {
        return Err("--recv-bufs: the --rt proxy receives one buffer at a time".into());
    }
    Ok(())
}

/// The event loop's driver and where its receives land: the group (a registered region where
/// memlock allows, so zero-copy sends name the memory the kernel received into, with no
/// per-send page pinning) or a zcrx area; with `splice` (which receives nothing) the
/// smallest group, for the report.
fn open_driver(
    args: &Args,
    splice: Option<usize>,
) -> Result<(Driver, Source), Box<dyn std::error::Error>> {
    let cfg = DriverConfig::default()
        .entries(crate::cmd::probe::SERVER_RING_ENTRIES)
        .zerocopy(ZcConfig::default().mode(zerocopy_mode(args)))
        .receive_coalescing(Duration::from_micros(args.coalesce_us))
        .max_pipes(args.max_pipes as usize);
    let (recv, group_cfg) = match splice {
        Some(_) => (
            RecvChoice::Groups,
            BufGroupConfig::new(ringpool::ZCRX_BUF_SIZE, 1),
        ),
        None => (args.recv.clone(), group_config(args)?),
    };
    let mut driver = Driver::new(recv.config(cfg))?;
    check_pipe_bytes(&driver, splice)?;
    let (bufs, buf_size) = (args.bufs, args.buf_size);
    let area_bufs = ((bufs as usize * buf_size) / ringpool::ZCRX_BUF_SIZE)
        .clamp(1, ringpool::MAX_ZCRX_BUFFERS) as u32;
    let source = crate::recv::source(&mut driver, &recv, area_bufs, |d| {
        d.buf_group(group_cfg).map_err(group_error(bufs, buf_size))
    })?;
    Ok((driver, source))
}

/// The start line: how bytes cross the proxy.
fn announce(args: &Args, source: &Source, splice: Option<usize>) {
    if let Some(pipe_bytes) = splice {
        println!(
            "forwarding to {} through splice streams: a pipe of {pipe_bytes} B per direction \
             with a chunk on its way (at most {} at once), no byte in user memory",
            args.upstream, args.max_pipes
        );
        return;
    }
    match source {
        Source::Group(group) => println!(
            "forwarding to {} through buffer group {}: {} x {} B ({}{}), zero-copy {:?}",
            args.upstream,
            group.id(),
            args.bufs,
            args.buf_size,
            if group.is_ring() {
                "buffer ring"
            } else {
                "legacy provided buffers"
            },
            if group.is_registered() {
                ", registered region"
            } else {
                ", plain memory"
            },
            args.zerocopy
        ),
        Source::Zcrx(_) => println!(
            "forwarding to {} through {}, zero-copy {:?}",
            args.upstream,
            source.describe(),
            args.zerocopy
        ),
    }
}

/// The pipe size of `--path splice` (checked against the largest pipe once the driver is up:
/// [`check_pipe_bytes`]), or `None` for `--path buffers`. An explicit `--recv zcrx` with splice is refused: nothing is received
/// into memory there.
fn splice_pipe(args: &Args) -> Result<Option<usize>, String> {
    if args.path == ProxyPath::Buffers {
        return Ok(None);
    }
    if matches!(args.recv, RecvChoice::DeviceLess | RecvChoice::Nic { .. }) {
        return Err(
            "--path splice receives nothing into memory: --recv zcrx does not apply".into(),
        );
    }
    Ok(Some(args.pipe_bytes))
}

/// Refuses a `--pipe-bytes` that no pipe of `driver` can have.
fn check_pipe_bytes(driver: &Driver, splice: Option<usize>) -> Result<(), String> {
    let max = driver.pipe_stats().max_pipe;
    match splice {
        Some(bytes) if bytes == 0 || bytes > max => Err(format!(
            "--pipe-bytes {bytes}: a pipe holds 1 byte to {max} (/proc/sys/fs/pipe-max-size)"
        )),
        _ => Ok(()),
    }
}

/// The proxy's buffer group: one registered region where memlock allows. A region holds at
/// most 1 GiB ([`ringpool::MAX_FIXED_LEN`]); larger flags are refused here, naming them.
pub(crate) fn group_config(args: &Args) -> Result<BufGroupConfig, String> {
    let bytes = (args.buf_size as u64).saturating_mul(u64::from(args.bufs));
    if bytes > ringpool::MAX_FIXED_LEN as u64 {
        return Err(format!(
            "--bufs {} x --buf-size {} = {} MiB: the proxy's buffers are one registered region, \
             which holds at most {} MiB; lower --bufs or --buf-size",
            args.bufs,
            args.buf_size,
            bytes >> 20,
            ringpool::MAX_FIXED_LEN >> 20
        ));
    }
    Ok(BufGroupConfig::new(args.buf_size, args.bufs).registration(Registration::Preferred))
}

/// The zero-copy mode to run with: `--zerocopy`, except that zero-copy (`on`, or `auto`, which
/// sends zero-copy from 16 KiB) whose buffer group does not fit the memlock limit falls back to
/// plain sends (with a log line): the
/// group is then plain memory, and every zero-copy send from plain memory is charged to the
/// same limit, so past it sends would fail with `ENOMEM` and streams be reset for our own
/// shortage. `auto` sends plainly below 16 KiB and stops zero-copy where the kernel copies.
pub(crate) fn zerocopy_mode(args: &Args) -> ZcMode {
    if args.zerocopy == ZcMode::Off {
        return ZcMode::Off;
    }
    let bytes = (args.buf_size as u64).saturating_mul(args.bufs as u64);
    match crate::net::fits_memlock(bytes, "the buffer group's --bufs x --buf-size") {
        Ok(()) => args.zerocopy,
        Err(why) => {
            crate::net::log(format_args!(
                "proxy: --zerocopy {}: {why}: sending plainly (zero-copy off); raise `ulimit -l` \
                 or lower --bufs/--buf-size for zero-copy from a registered region",
                if args.zerocopy == ZcMode::On {
                    "on"
                } else {
                    "auto"
                }
            ));
            ZcMode::Off
        }
    }
}

/// Prints the final summary line and the `stats {json}` line (read by the bench and the tests)
/// of a proxy that ran on `driver` with `group`.
pub(crate) fn report(summary: &Summary, source: &Source, driver: &Driver, runtime: &str) {
    let (z, d, p) = (driver.zc_stats(), driver.stats(), driver.pipe_stats());
    println!(
        "stopped: {} connections, {} bytes up, {} bytes down, {} resets",
        summary.connections, summary.bytes_up, summary.bytes_down, summary.resets
    );
    let (line, mut json) = source.report();
    if let Source::Zcrx(_) = source {
        println!("{line}");
    }
    let registered = matches!(source, Source::Group(g) if g.is_registered());
    let own = serde_json::json!({
        "connections": summary.connections, "bytes_up": summary.bytes_up,
        "bytes_down": summary.bytes_down, "resets": summary.resets, "refused": summary.refused,
        "connect_timeouts": summary.connect_timeouts, "left_connecting": summary.left_connecting,
        "zc_sends": z.zc_sends, "zc_copied": z.zc_copied, "plain_sends": z.plain_sends,
        "fixed_sends": z.fixed_sends, "registered": registered,
        "enters": d.enters, "sqes": d.sqes, "cqes": d.cqes, "held_waits": d.held_waits,
        "pipes_made": p.made, "pipes_in_use": p.in_use, "pipe_polls": p.eagain_polls,
        "pipe_waits": p.pipe_waits,
        "runtime": runtime,
    });
    if let (Some(all), serde_json::Value::Object(own)) = (json.as_object_mut(), own) {
        all.extend(own);
    }
    println!("stats {json}");
}

/// Where the proxy forwards to, and how long a connect there may take.
#[derive(Clone, Copy)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
}

/// Proxies connections accepted on `listener` to `upstream` until `stop()` says so (with the
/// receive coalescing of `driver`'s configuration): through `source`'s buffers, at most
/// `recv_bufs` group buffers per receive (and never more than the direction's share), or, with
/// `splice` (a pipe size), through splice streams.
pub fn serve(
    driver: &mut Driver,
    source: &Source,
    listener: Fd,
    upstream: Upstream,
    splice: Option<usize>,
    recv_bufs: u32,
    stop: impl Fn() -> bool,
) -> ringpool::Result<Summary> {
    let mut proxy = Proxy::new(source, upstream, splice, recv_bufs);
    let mut accept = Accept::new(driver, &listener, ACCEPT)?;
    while !stop() {
        accept.poll(driver, &listener)?;
        let wait = accept.wait_for(proxy.connects.wait_for(Duration::from_millis(200)));
        driver.wait(Some(wait))?;
        proxy
            .connects
            .sweep(driver, &mut proxy.pairs, upstream, &mut proxy.summary);
        while let Some(c) = driver.pop() {
            if c.token == ACCEPT {
                if let Some(client) = accept.on_completion(c, proxy.pairs.len()) {
                    proxy.on_client(driver, client)?;
                }
            } else if proxy.on_pair_completion(driver, c)? {
                accept.freed(driver, &listener)?;
            }
        }
    }
    accept.cancel(driver);
    drain_at_stop(driver, source, &mut proxy.pairs)?;
    Ok(proxy.summary)
}

/// The event loop's state between completions.
struct Proxy<'g> {
    source: &'g Source,
    upstream: Upstream,
    /// `--path splice`: the pipe size.
    splice: Option<usize>,
    /// `--recv-bufs`: most group buffers per receive (`u32::MAX`: only the share bounds it).
    recv_bufs: u32,
    /// The group's buffers (the fair share's numerator).
    total: u32,
    pairs: slab::Slab<Pair>,
    summary: Summary,
    connects: PendingConnects,
    /// Inside an episode of failing to open upstream sockets (logged once when it starts).
    starved: bool,
}

impl<'g> Proxy<'g> {
    fn new(
        source: &'g Source,
        upstream: Upstream,
        splice: Option<usize>,
        recv_bufs: u32,
    ) -> Proxy<'g> {
        Proxy {
            source,
            upstream,
            splice,
            recv_bufs,
            total: source.counts().0,
            pairs: slab::Slab::new(),
            summary: Summary::default(),
            connects: PendingConnects::default(),
            starved: false,
        }
    }

    /// A client accepted: opens its upstream socket and starts the connect (or refuses the
    /// client with a reset when no socket can be opened).
    fn on_client(&mut self, driver: &mut Driver, client: Fd) -> ringpool::Result<()> {
        set_nodelay(&client);
        let Some(up) = self.open_upstream(&client) else {
            return Ok(());
        };
        let key = self.pairs.insert(Pair {
            client: Some(client),
            upstream: Some(up.clone()),
            dirs: Default::default(),
            live_ops: 1,
            aborted: false,
            connecting_since: Some(Instant::now()),
        }) as u64;
        driver.connect(&up, self.upstream.addr, key << 3 | CONNECT)?;
        self.connects
            .started(key as usize, &self.pairs[key as usize]);
        self.summary.connections += 1;
        Ok(())
    }

    /// A socket for `client`'s upstream side; `None` (the client reset, counted as refused)
    /// when none can be opened. Logs once per episode of failures, and its end.
    fn open_upstream(&mut self, client: &Fd) -> Option<Fd> {
        match Fd::tcp_socket(self.upstream.addr) {
            Ok(up) => {
                if std::mem::take(&mut self.starved) {
                    log(format_args!("proxy: upstream sockets available again"));
                }
                Some(up)
            }
            Err(e) => {
                // Out of descriptors (or another resource): refuse this client with
                // a reset and go on serving the others.
                if !std::mem::replace(&mut self.starved, true) {
                    log(format_args!(
                        "proxy: cannot open a socket to the upstream {}: {e} \
                         (RLIMIT_NOFILE {}, {} connections open); refusing new clients \
                         with a reset until one closes; logged once until it recovers",
                        self.upstream.addr,
                        nofile_limit(),
                        self.pairs.len()
                    ));
                }
                abort_connection(client);
                self.summary.refused += 1;
                None
            }
        }
    }

    /// A completion of a pair's op; whether it ended the pair (then removed).
    #[inline]
    fn on_pair_completion(
        &mut self,
        driver: &mut Driver,
        c: ringpool::Completion,
    ) -> ringpool::Result<bool> {
        let (key, tag) = ((c.token >> 3) as usize, c.token & 7);
        let live_pairs = self.pairs.len();
        let Some(pair) = self.pairs.get_mut(key) else {
            return Ok(false);
        };
        if !c.more {
            pair.live_ops -= 1;
        }
        let mut ev = PairEvent {
            driver,
            source: self.source,
            splice: self.splice,
            recv_bufs: self.recv_bufs,
            more: c.more,
            pair,
            key,
            total: self.total,
            live_pairs,
            summary: &mut self.summary,
        };
        ev.handle(tag, c.event, &mut self.connects.log)?;
        if ev.pair.finished() {
            self.pairs.remove(key);
            return Ok(true);
        }
        Ok(false)
    }
}

/// One completion's view of the proxy: its pair, and what handling it may touch.
struct PairEvent<'a> {
    driver: &'a mut Driver,
    source: &'a Source,
    splice: Option<usize>,
    /// Most group buffers per receive (`u32::MAX`: only the share bounds it).
    recv_bufs: u32,
    /// Whether the op delivers more completions after this one.
    more: bool,
    pair: &'a mut Pair,
    key: usize,
    /// The group's buffers and the pairs open: the inputs of the fair share.
    total: u32,
    live_pairs: usize,
    summary: &'a mut Summary,
}

impl PairEvent<'_> {
    /// Routes the completion (tag, event) of the pair's op to its handling.
    #[inline]
    fn handle(
        &mut self,
        tag: u64,
        event: Event,
        log: &mut ConnectTimeoutLog,
    ) -> ringpool::Result<()> {
        match (tag, event) {
            // Reset by the connect watch after the connect completed, before this: the
            // sockets are gone and the pair ends with this completion.
            (CONNECT, Event::Connected) if self.pair.aborted => {}
            (CONNECT, Event::Connected) => self.connected(log)?,
            (CONNECT, _) => {
                self.pair.connecting_since = None;
                self.abort();
            }
            (RECV_CLIENT | RECV_UPSTREAM, Event::Data(chain)) => {
                self.data((tag == RECV_UPSTREAM) as usize, Pending::Chain(chain))?
            }
            (RECV_CLIENT | RECV_UPSTREAM, Event::ZcrxData(buf)) => {
                self.data((tag == RECV_UPSTREAM) as usize, Pending::Zcrx(vec![buf]))?
            }
            (RECV_CLIENT | RECV_UPSTREAM, Event::LimitReached) => {
                self.paused((tag == RECV_UPSTREAM) as usize)?
            }
            (RECV_CLIENT | RECV_UPSTREAM, Event::Error(ringpool::Error::Cancelled))
                if self.pair.dirs[(tag == RECV_UPSTREAM) as usize].pausing =>
            {
                self.paused((tag == RECV_UPSTREAM) as usize)?
            }
            (RECV_CLIENT | RECV_UPSTREAM, Event::Eof) => self.eof((tag == RECV_UPSTREAM) as usize),
            (RECV_CLIENT | RECV_UPSTREAM, Event::Error(_)) => self.abort(),
            (SEND_UPSTREAM | SEND_CLIENT, Event::Sent { result, .. }) => {
                self.sent((tag == SEND_CLIENT) as usize, result)?
            }
            (SEND_UPSTREAM | SEND_CLIENT, Event::Returned(buf)) => {
                self.returned((tag == SEND_CLIENT) as usize, buf)?
            }
            (SPLICE_UP | SPLICE_DOWN, Event::Spliced { bytes }) => {
                self.spliced((tag == SPLICE_DOWN) as usize, bytes)
            }
            (SPLICE_UP | SPLICE_DOWN, Event::Eof) => self.eof((tag == SPLICE_DOWN) as usize),
            (SPLICE_UP | SPLICE_DOWN, Event::Error(_)) => self.abort(),
            _ => {}
        }
        Ok(())
    }

    /// The buffers one direction of this pair may hold now.
    #[inline]
    fn share(&self) -> u32 {
        fair_share(self.total, self.live_pairs)
    }

    /// [`arm_recv`] for direction `dir` of this pair, within its share.
    #[inline]
    fn arm_recv(&mut self, dir: usize) -> ringpool::Result<()> {
        let share = self.share();
        arm_recv(
            self.driver,
            self.source,
            self.pair,
            self.key,
            dir,
            share,
            self.recv_bufs,
        )
    }

    /// Direction `dir`'s zero-copy receive stopped at its share (its limit, or cancelled at
    /// the share of buffers): armed again once under it.
    fn paused(&mut self, dir: usize) -> ringpool::Result<()> {
        self.pair.dirs[dir].receiving = false;
        self.pair.dirs[dir].pausing = false;
        self.arm_recv(dir)
    }

    /// [`abort`] of this pair.
    #[inline]
    fn abort(&mut self) {
        abort(self.driver, self.pair, self.summary);
    }

    /// The upstream connect completed: both directions start receiving (or splicing).
    fn connected(&mut self, log: &mut ConnectTimeoutLog) -> ringpool::Result<()> {
        self.pair.connecting_since = None;
        log.connected();
        set_nodelay(self.pair.sockets(0).1);
        if let Some(pipe_bytes) = self.splice {
            for (dir, tag) in [(0, SPLICE_UP), (1, SPLICE_DOWN)] {
                let (src, dst) = self.pair.sockets(dir);
                let token = (self.key as u64) << 3 | tag;
                self.driver.splice_stream(src, dst, pipe_bytes, token)?;
                self.pair.live_ops += 1;
            }
            return Ok(());
        }
        for dir in 0..2 {
            self.arm_recv(dir)?;
        }
        Ok(())
    }

    /// Data received in direction `dir`: sent at once, or appended to the pending chain while
    /// a send is in flight; then the next receive (within the share).
    #[inline]
    fn data(&mut self, dir: usize, chain: Pending) -> ringpool::Result<()> {
        // A zero-copy receive goes on (multishot) until it says otherwise.
        let multishot = matches!(chain, Pending::Zcrx(_));
        self.pair.dirs[dir].receiving = multishot && self.more;
        if multishot && !self.more {
            self.pair.dirs[dir].pausing = false;
        }
        // After an abort the data is dropped (its buffers go home), and the pair
        // may now be finished: the caller checks that.
        if self.pair.aborted {
            return Ok(());
        }
        if dir == 0 {
            self.summary.bytes_up += chain.len() as u64;
        } else {
            self.summary.bytes_down += chain.len() as u64;
        }
        let d = &mut self.pair.dirs[dir];
        d.bufs_out += chain.buf_count();
        if d.sends == 0 {
            send(self.driver, self.pair, self.key, dir, chain)?;
        } else if let Some(p) = &mut d.pending {
            p.append(chain);
        } else {
            d.pending = Some(chain);
        }
        let share = self.share();
        bound_zc_recv(self.driver, &mut self.pair.dirs[dir], share);
        self.arm_recv(dir)
    }

    /// Bytes of direction `dir`'s splice stream reached its destination.
    fn spliced(&mut self, dir: usize, bytes: usize) {
        if dir == 0 {
            self.summary.bytes_up += bytes as u64;
        } else {
            self.summary.bytes_down += bytes as u64;
        }
    }

    /// Direction `dir`'s source ended: the EOF goes on once everything before it left.
    #[inline]
    fn eof(&mut self, dir: usize) {
        self.pair.dirs[dir].receiving = false;
        self.pair.dirs[dir].eof = true;
        shut_if_drained(self.pair, dir);
    }

    /// A send of direction `dir` completed: a failure resets the pair; otherwise the pending
    /// chain leaves, or the EOF goes on if it is due.
    #[inline]
    fn sent(&mut self, dir: usize, result: ringpool::Result<usize>) -> ringpool::Result<()> {
        self.pair.dirs[dir].sends -= 1;
        if let Err(e) = &result {
            crate::net::log_if_own_shortage("proxy", e);
            self.abort();
        } else if let Some(chain) = self.pair.dirs[dir].pending.take() {
            send(self.driver, self.pair, self.key, dir, chain)?;
        } else {
            shut_if_drained(self.pair, dir);
        }
        Ok(())
    }

    /// A send's buffers came back (after any notification): they go home, and direction
    /// `dir` may receive again.
    #[inline]
    fn returned(&mut self, dir: usize, buf: ringpool::SendBuf) -> ringpool::Result<()> {
        // The kernel is done with these buffers: they go home as `buf` drops.
        let n = match &buf {
            SendBuf::Chain(chain) => chain.buf_count() as u32,
            SendBuf::Zcrx(bufs) => bufs.len() as u32,
            _ => 0,
        };
        drop(buf);
        self.pair.dirs[dir].bufs_out -= n;
        self.arm_recv(dir)
    }
}

/// How long a stopping proxy waits for its buffers to come home.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// At stop: every connection's ops are cancelled and the buffers its directions hold are
/// dropped; then the driver runs until every buffer of the group is home (the kernel's last
/// zero-copy notifications included) and every op has ended (splice streams: their pipes
/// home), at most [`DRAIN_LIMIT`], so that the statistics read after this say where each
/// buffer and pipe is.
fn drain_at_stop(
    driver: &mut Driver,
    source: &Source,
    pairs: &mut slab::Slab<Pair>,
) -> ringpool::Result<()> {
    for (_, pair) in pairs.iter() {
        for fd in [&pair.client, &pair.upstream].into_iter().flatten() {
            driver.cancel_fd(fd);
        }
    }
    pairs.clear();
    let deadline = Instant::now() + DRAIN_LIMIT;
    while (source.counts().2 > 0 || driver.in_flight() > 0) && Instant::now() < deadline {
        driver.wait(Some(Duration::from_millis(10)))?;
        // What completes now has no connection left to go to: its buffers go home as it drops.
        while driver.pop().is_some() {}
    }
    Ok(())
}

/// The pairs whose upstream connect is pending, oldest first: each is reset when its connect
/// outlives `--connect-timeout`, or as soon as its client leaves (looked at every
/// [`CONNECT_WATCH`], without reading its data), which cancels the connect and frees both
/// descriptors. Without it, clients of an upstream that never answers (a full backlog) would
/// wait as long as the kernel retries the SYN, and the proxy hold their descriptors as long.
#[derive(Default)]
struct PendingConnects {
    /// (pair key, when its connect started); entries of pairs that connected, failed or were
    /// reused since are dropped at the next sweep.
    queue: std::collections::VecDeque<(usize, Instant)>,
    log: ConnectTimeoutLog,
}

impl PendingConnects {
    fn started(&mut self, key: usize, pair: &Pair) {
        if let Some(since) = pair.connecting_since {
            self.queue.push_back((key, since));
        }
    }

    /// How long the event loop may wait: at most until the next look at the clients.
    fn wait_for(&self, default: Duration) -> Duration {
        if self.queue.is_empty() {
            default
        } else {
            default.min(CONNECT_WATCH)
        }
    }

    /// Resets the pairs whose connect timed out or whose client left.
    fn sweep(
        &mut self,
        driver: &mut Driver,
        pairs: &mut slab::Slab<Pair>,
        upstream: Upstream,
        summary: &mut Summary,
    ) {
        let now = Instant::now();
        self.queue.retain(|&(key, since)| {
            let Some(pair) = pairs.get_mut(key) else {
                return false;
            };
            if pair.connecting_since != Some(since) || pair.aborted {
                return false;
            }
            let timed_out = now.duration_since(since) >= upstream.connect_timeout;
            let left = !timed_out && pair.client.as_ref().is_some_and(peer_left);
            if !(timed_out || left) {
                return true;
            }
            if timed_out {
                self.log.timed_out(upstream.addr, upstream.connect_timeout);
                summary.connect_timeouts += 1;
            } else {
                summary.left_connecting += 1;
            }
            // Cancels the connect (its completion then ends the pair).
            abort(driver, pair, summary);
            false
        });
    }
}

/// The buffers one direction may hold: half the group split across the connections, and never
/// more than a sixteenth of the group (an eighth per connection). The share is taken when a
/// direction receives: one that already holds more (it took them while it had the proxy to
/// itself) is not read again until it is back under its share. Without the cap, a client that
/// sends and never reads, alone at first, would keep half the group each way for as long as it
/// stays, whatever the share of the connections that came later.
pub(crate) fn fair_share(total: u32, pairs: usize) -> u32 {
    (total / (2 * pairs.max(1) as u32))
        .min(total / MAX_SHARE_DIVISOR)
        .max(1)
}

/// One direction never holds more than `1 / MAX_SHARE_DIVISOR` of the group.
pub(crate) const MAX_SHARE_DIVISOR: u32 = 16;

/// Arms the receive of direction `dir` unless one is armed, its source ended, or the direction
/// holds its share: from a group, one bundle of at most what the share leaves (and at most
/// `recv_bufs`), so the direction never holds more than its share.
fn arm_recv(
    driver: &mut Driver,
    source: &Source,
    pair: &mut Pair,
    key: usize,
    dir: usize,
    share: u32,
    recv_bufs: u32,
) -> ringpool::Result<()> {
    let d = &pair.dirs[dir];
    if d.receiving || d.eof || pair.aborted || d.bufs_out >= share {
        return Ok(());
    }
    let tag = if dir == 0 { RECV_CLIENT } else { RECV_UPSTREAM };
    let (src, _) = pair.sockets(dir);
    let token = (key as u64) << 3 | tag;
    match source {
        Source::Group(group) => {
            let most = (share - d.bufs_out).min(recv_bufs);
            driver.recv_bundle_limited(src, group, most, token)?;
        }
        Source::Zcrx(area) => {
            // At most the share's worth of bytes; `bound_zc_recv` cancels at the share of
            // buffers too (each completion takes a whole buffer, however few bytes it has).
            let room = (share - d.bufs_out) * ringpool::ZCRX_BUF_SIZE as u32;
            let op = driver.recv_zc_limited(src, area, room, token)?;
            pair.dirs[dir].zc_op = Some(op);
        }
    }
    pair.dirs[dir].receiving = true;
    pair.live_ops += 1;
    Ok(())
}

/// A direction's zero-copy receive takes whatever its socket holds, up to its limit: at its
/// share of buffers it is cancelled (once), and armed again when they come home.
fn bound_zc_recv(driver: &mut Driver, d: &mut Direction, share: u32) {
    if d.receiving && !d.pausing && d.bufs_out >= share {
        if let Some(op) = d.zc_op {
            d.pausing = true;
            driver.cancel(op);
        }
    }
}

/// Sends `chain` from direction `dir`'s source to its destination; the buffers come back in
/// `Event::Returned` after any zero-copy notification.
fn send(
    driver: &mut Driver,
    pair: &mut Pair,
    key: usize,
    dir: usize,
    chain: Pending,
) -> ringpool::Result<()> {
    let dst = pair.sockets(dir).1.clone();
    let tag = if dir == 0 { SEND_UPSTREAM } else { SEND_CLIENT };
    pair.dirs[dir].sends += 1;
    pair.live_ops += 1;
    driver.send_zc_returning(&dst, chain.into_send_buf(), (key as u64) << 3 | tag)?;
    Ok(())
}

/// Passes an EOF on: once `src` ended and every byte before the EOF left, shut `dst` for writing.
fn shut_if_drained(pair: &mut Pair, dir: usize) {
    let d = &pair.dirs[dir];
    if d.eof && d.sends == 0 && d.pending.is_none() && !d.shut && !pair.aborted {
        let (_, dst) = pair.sockets(dir);
        // SAFETY: shutdown on a socket the pair owns.
        unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) };
        pair.dirs[dir].shut = true;
    }
}

/// One side failed: reset both (SO_LINGER 0, so closing sends RST) and cancel their ops. The
/// sockets close when the last op using them has ended.
fn abort(driver: &mut Driver, pair: &mut Pair, summary: &mut Summary) {
    if pair.aborted {
        return;
    }
    pair.aborted = true;
    summary.resets += 1;
    for d in &mut pair.dirs {
        d.pending = None; // back to the group
    }
    for fd in [pair.client.take(), pair.upstream.take()]
        .into_iter()
        .flatten()
    {
        // A reset now, queued data dropped, waiting ops failed: see `abort_connection`.
        abort_connection(&fd);
        driver.cancel_fd(&fd);
    }
}
