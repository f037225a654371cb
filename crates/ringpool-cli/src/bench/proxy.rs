//! Workload `proxy`: the CPU a proxy process spends per GB it forwards, and its GB/s, for
//! `ringpool proxy` against two baselines in the same run: a tokio proxy built on
//! `copy_bidirectional`, and a naive blocking std proxy (two threads per connection, 64 KiB
//! buffers), the floor any event-loop proxy should beat.
//!
//! Topology, all on loopback:
//!
//! ```text
//!  bench process                  proxy process (child)               bench process
//!  client streams  ── up ──►  ringpool proxy | tokio-proxy | std-proxy  ── up ──►  upstream
//!                 ◄── down ──                                           ◄── down ──
//! ```
//!
//! The proxy under test is a child process of this executable: `ringpool proxy --zerocopy
//! auto` (one thread, one shared buffer group), the hidden `ringpool tokio-proxy` (one thread,
//! `copy_bidirectional` per connection) or the hidden `ringpool std-proxy` (blocking `read` /
//! `write_all`, a thread per direction of each connection). The load generator and the
//! upstream both live in the bench process, on one current-thread tokio runtime.
//!
//! Placement: on a machine with two CPUs or more, that runtime's thread is pinned to one CPU and
//! every proxy (all its threads) to another, the same for every side, so that no proxy shares a
//! core with the traffic it serves and the scheduler moves neither mid-window. It applies to
//! every side alike; on this 2-core VM the 4 KiB ratios came out lower and steadier pinned
//! (ringpool/tokio CPU per GB at 4 KiB × 1: pinned 0.36–0.59 over fourteen runs, median 0.48;
//! unpinned 0.51–0.63 over five, median 0.56).
//! `RINGPOOL_BENCH_PROXY_PIN=0` leaves placement to the scheduler.
//!
//! Each stream carries data both ways at once: the client writes a pattern up and the upstream
//! writes another one down, in writes of 4 KiB or 64 KiB, and each end reads and checks every
//! byte the other end wrote, then the end of stream (EOF passes through the proxy as a
//! half-close). A stream's first 8 bytes up name it, so the upstream knows which pattern to
//! expect and to send, whatever order the proxy connects in. Streams: 1 or 32.
//!
//! Measurement: after a warm-up, a window during which the proxy's CPU time (user + system,
//! all its threads, io_uring workers included: its process CPU-time clock) and the bytes that
//! reached the far ends (both directions) are taken at both edges; then the writers stop and
//! the rest drains and is verified outside the window. CPU s/GB = proxy CPU / GB forwarded
//! (both directions), GB/s = GB forwarded / window. On loopback the kernel's receive path
//! for what a process sends runs in the sender's context, so a proxy pays for its sends
//! including their delivery into the far end's socket, and for copying out what it receives
//! (the load generator pays for delivering into the proxy's sockets). Per round and
//! configuration the proxies run one after the other, the order rotating by round; medians
//! over the rounds. The issue's target: ringpool ≤ 0.55× tokio's CPU per GB at 4 KiB writes
//! and ≤ 0.8× at 64 KiB.
//!
//! For A/B experiments, [`VARIANT_ARGS_VAR`] adds a fourth proxy to every round: `ringpool
//! proxy` with other arguments, reported against the first ringpool proxy.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::progress::Progress;
use super::report::{median, Bound, Metric, Target, Unit, WorkloadReport, PERFORMANCE, REGISTERED};
use super::server::Server;
use super::sys::ProcessClock;
use super::{sys, BenchResult, Options, WorkloadDef};

/// The workload's entry in the bench.
pub const WORKLOAD: WorkloadDef = WorkloadDef { name: "proxy", run };

/// Time the streams run before the window opens (connections settle, buffers warm).
const WARMUP: Duration = Duration::from_millis(200);
/// The warm-up with `--quick`.
const QUICK_WARMUP: Duration = Duration::from_millis(100);
/// The measurement window (rounds: [`Options::rounds`]).
const WINDOW: Duration = Duration::from_millis(700);
/// The measurement window with `--quick`.
const QUICK_WINDOW: Duration = Duration::from_millis(250);
/// Longest a run may take to drain after its window (a stalled proxy).
const STALL: Duration = Duration::from_secs(20);
/// Longest one connect or the upstream's accepts may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Period of the pattern every stream is cut from (a prime, so no write size divides it and a
/// misplaced chunk never matches).
const PERIOD: usize = 1_000_003;
/// Largest write, and the readers' buffer: the pattern is this much longer than [`PERIOD`], so
/// any piece starting below [`PERIOD`] is one contiguous slice.
const MAX_PIECE: usize = 64 << 10;
/// Distance in the pattern between the starts of two stream directions.
const STRIDE: usize = 15_013;
/// The first bytes up of each stream: [`MAGIC`] and the stream's number, little-endian u32s.
const HEADER: usize = 8;
/// Marks a stream header.
const MAGIC: u32 = 0x5250_5859;
/// Client → upstream: the direction index of the client's writes.
const UP: usize = 0;
/// Upstream → client.
const DOWN: usize = 1;

/// The arguments of the ringpool proxy after `--upstream ADDR`.
const RINGPOOL_ARGS: &[&str] = &["--zerocopy", "auto"];
/// Environment variable with more arguments for the ringpool proxy, separated by spaces (e.g.
/// `--buf-size 65536 --bufs 512`), to measure other settings without a rebuild.
const EXTRA_ARGS_VAR: &str = "RINGPOOL_BENCH_PROXY_ARGS";
/// Environment variable that adds a ringpool proxy variant to every round: `ringpool proxy`
/// with these arguments (separated by spaces) instead of [`EXTRA_ARGS_VAR`]'s, compared with
/// the first ringpool proxy run for run.
const VARIANT_ARGS_VAR: &str = "RINGPOOL_BENCH_PROXY_VARIANT_ARGS";
/// Environment variable that, set to `0`, leaves the proxies and the load generator unpinned.
const PIN_VAR: &str = "RINGPOOL_BENCH_PROXY_PIN";

/// Where the processes run: the load generator (and the upstream sink, on the same thread) on
/// one CPU, every proxy on another, so a proxy never shares a core with the traffic it serves
/// and the scheduler never moves either (on a machine with two CPUs or more, unless
/// [`PIN_VAR`] is `0`).
#[derive(Clone, Copy)]
struct Placement {
    loadgen: usize,
    proxy: usize,
}

impl Placement {
    /// Two allowed CPUs (the last two), or `None` to leave the scheduler free.
    fn choose() -> Option<Placement> {
        if std::env::var(PIN_VAR).is_ok_and(|v| v == "0") {
            return None;
        }
        let cpus = sys::allowed_cpus().ok()?;
        match cpus[..] {
            [.., loadgen, proxy] => Some(Placement { loadgen, proxy }),
            _ => None,
        }
    }
}

/// Restores the calling thread's CPU affinity when dropped.
struct AffinityGuard(libc::cpu_set_t);

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        let _ = sys::set_affinity(0, &self.0);
    }
}

/// The proxies under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `ringpool proxy`.
    Ringpool,
    /// `ringpool tokio-proxy`: `copy_bidirectional` on a current-thread runtime.
    Tokio,
    /// `ringpool std-proxy`: blocking sockets, a thread per direction.
    Std,
    /// `ringpool proxy --path splice`: socket to pipe to socket, no byte in user memory.
    Splice,
    /// `ringpool proxy` with [`VARIANT_ARGS_VAR`]'s arguments (only when it is set).
    Variant,
}

impl Kind {
    /// The proxies of a round, in the order of the first round.
    fn all() -> Vec<Kind> {
        let mut kinds = vec![Kind::Ringpool, Kind::Tokio, Kind::Std, Kind::Splice];
        if std::env::var_os(VARIANT_ARGS_VAR).is_some() {
            kinds.push(Kind::Variant);
        }
        kinds
    }

    /// Short name in progress lines and JSON.
    fn label(self) -> &'static str {
        match self {
            Kind::Ringpool => "ringpool",
            Kind::Tokio => "tokio",
            Kind::Std => "std",
            Kind::Splice => "splice",
            Kind::Variant => "variant",
        }
    }

    /// What the proxy is, in notes and JSON.
    fn proxy_name(self) -> &'static str {
        match self {
            Kind::Ringpool => "ringpool proxy",
            Kind::Tokio => "tokio copy_bidirectional",
            Kind::Std => "std blocking, a thread per direction",
            Kind::Splice => "ringpool proxy --path splice",
            Kind::Variant => "ringpool proxy variant",
        }
    }
}

/// One configuration: write size and stream count, with the static keys and labels of its
/// metrics.
struct Config {
    write: usize,
    streams: usize,
    label: &'static str,
    cpu_key: &'static str,
    cpu_label: &'static str,
    rate_key: &'static str,
    rate_label: &'static str,
    /// The same metrics against the std proxy.
    std_cpu_key: &'static str,
    std_cpu_label: &'static str,
    std_rate_key: &'static str,
    std_rate_label: &'static str,
    /// The splice path (`--path splice`) against the std proxy.
    splice_cpu_key: &'static str,
    splice_cpu_label: &'static str,
    splice_rate_key: &'static str,
    splice_rate_label: &'static str,
    /// Issue 7's bound on ringpool / tokio CPU per GB.
    target: f64,
    /// Issue 19's bound on ringpool / std CPU per GB.
    std_target: f64,
}

macro_rules! config {
    ($write:expr, $streams:expr, $label:literal, $tag:literal, $target:expr, $std_target:expr) => {
        Config {
            write: $write,
            streams: $streams,
            label: $label,
            cpu_key: concat!("cpu_s_per_gb_", $tag),
            cpu_label: concat!($label, " proxy CPU/GB"),
            rate_key: concat!("gb_per_sec_", $tag),
            rate_label: concat!($label, " GB/s"),
            std_cpu_key: concat!("cpu_s_per_gb_", $tag, "_vs_std"),
            std_cpu_label: concat!($label, " proxy CPU/GB, vs std"),
            std_rate_key: concat!("gb_per_sec_", $tag, "_vs_std"),
            std_rate_label: concat!($label, " GB/s, vs std"),
            splice_cpu_key: concat!("cpu_s_per_gb_", $tag, "_splice_vs_std"),
            splice_cpu_label: concat!($label, " splice path CPU/GB, vs std"),
            splice_rate_key: concat!("gb_per_sec_", $tag, "_splice_vs_std"),
            splice_rate_label: concat!($label, " splice path GB/s, vs std"),
            target: $target,
            std_target: $std_target,
        }
    };
}

/// Every configuration, in the order a round runs them.
const CONFIGS: [Config; 4] = [
    config!(4 << 10, 1, "4 KiB x 1", "4k_x1", 0.55, 0.9),
    config!(4 << 10, 32, "4 KiB x 32", "4k_x32", 0.55, 0.5),
    config!(64 << 10, 1, "64 KiB x 1", "64k_x1", 0.8, 0.75),
    config!(64 << 10, 32, "64 KiB x 32", "64k_x32", 0.8, 0.5),
];

/// What the ends of all streams of one run saw.
#[derive(Default)]
struct Totals {
    /// Bytes written, per direction ([`UP`], [`DOWN`]), headers not included.
    written: [u64; 2],
    /// Bytes read and checked, per direction.
    read: [u64; 2],
    /// Reads whose bytes did not match the pattern.
    mismatches: u64,
    /// Where the first mismatch was: stream, direction, offset in the stream.
    first_mismatch: Option<(usize, usize, u64)>,
    /// Reads that ended without an end of stream.
    no_eof: u64,
    /// Every error, in words.
    errors: Vec<String>,
}

/// One run: one proxy, one configuration.
struct Run {
    round: usize,
    config: usize,
    kind: Kind,
    /// The proxy's command line (arguments of this executable).
    command: Vec<String>,
    /// The measurement window as it really was.
    window: Duration,
    /// Bytes that reached the far ends during the window, both directions.
    window_bytes: u64,
    /// The proxy's CPU time during the window (its process CPU-time clock).
    cpu: Duration,
    /// The same from `/proc/PID/stat` (clock ticks), as a cross-check.
    cpu_ticks: u64,
    /// This process's CPU time during the window (load generator and upstream).
    loadgen_cpu: Duration,
    totals: Totals,
    stats: Option<serde_json::Value>,
    killed: bool,
    exit: std::process::ExitStatus,
}

impl Run {
    /// The configuration this run measured.
    fn config(&self) -> &'static Config {
        &CONFIGS[self.config]
    }

    /// Whether every byte written came out at the far end, matching, followed by the end of
    /// the stream, with no error anywhere.
    fn verified(&self) -> bool {
        let t = &self.totals;
        t.errors.is_empty()
            && t.mismatches == 0
            && t.no_eof == 0
            && t.read == t.written
            && self.window_bytes > 0
            && t.written.iter().all(|&w| w > 0)
    }

    /// Gigabytes forwarded during the window.
    fn gb(&self) -> f64 {
        self.window_bytes as f64 / 1e9
    }

    /// The proxy's CPU seconds per GB forwarded (NaN for an unverified run).
    fn cpu_s_per_gb(&self) -> f64 {
        if self.verified() {
            self.cpu.as_secs_f64() / self.gb()
        } else {
            f64::NAN
        }
    }

    /// GB forwarded per second of the window (NaN for an unverified run).
    fn gb_per_sec(&self) -> f64 {
        if self.verified() {
            self.gb() / self.window.as_secs_f64()
        } else {
            f64::NAN
        }
    }

    /// A number of the proxy's `stats` line.
    fn stat(&self, key: &str) -> Option<f64> {
        self.stats.as_ref()?.get(key)?.as_f64()
    }

    /// Bytes the proxy forwarded over its whole life, by its own count.
    fn proxy_bytes(&self) -> Option<f64> {
        Some(self.stat("bytes_up")? + self.stat("bytes_down")?)
    }

    /// A counter of the proxy's `stats` line per GB it forwarded over its whole life.
    fn stat_per_gb(&self, key: &str) -> f64 {
        match (self.stat(key), self.proxy_bytes()) {
            (Some(v), Some(b)) if b > 0.0 => v / (b / 1e9),
            _ => f64::NAN,
        }
    }

    /// The run's raw figures for `--json`.
    fn to_json(&self, hz: u64) -> serde_json::Value {
        let c = self.config();
        let t = &self.totals;
        serde_json::json!({
            "round": self.round,
            "write": c.write,
            "streams": c.streams,
            "side": self.kind.label(),
            "proxy": self.kind.proxy_name(),
            "command": self.command.join(" "),
            "window_secs": self.window.as_secs_f64(),
            "window_bytes": self.window_bytes,
            "cpu_secs": self.cpu.as_secs_f64(),
            "cpu_ticks": self.cpu_ticks,
            "cpu_ticks_secs": self.cpu_ticks as f64 / hz as f64,
            "loadgen_cpu_secs": self.loadgen_cpu.as_secs_f64(),
            "cpu_s_per_gb": self.cpu_s_per_gb(),
            "gb_per_sec": self.gb_per_sec(),
            "bytes_up_written": t.written[UP],
            "bytes_up_read": t.read[UP],
            "bytes_down_written": t.written[DOWN],
            "bytes_down_read": t.read[DOWN],
            "mismatches": t.mismatches,
            "first_mismatch": t.first_mismatch.map(|(s, d, at)| {
                serde_json::json!({ "stream": s, "direction": dir_name(d), "offset": at })
            }),
            "missing_eof": t.no_eof,
            "errors": t.errors,
            "killed": self.killed,
            "exit": self.exit.to_string(),
            "verified": self.verified(),
            "proxy_stats": self.stats,
        })
    }
}

/// Name of a direction in notes and JSON.
fn dir_name(dir: usize) -> &'static str {
    if dir == UP {
        "up"
    } else {
        "down"
    }
}

/// Runs every round: per round, per configuration, every proxy (round `r` starts with proxy
/// `r - 1` of [`Kind::all`], the rest following in turn).
fn run(opts: &Options) -> BenchResult<WorkloadReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rounds = opts.rounds;
    let placement = Placement::choose();
    let _restore = match placement {
        Some(p) => {
            let guard = AffinityGuard(sys::current_affinity()?);
            sys::set_affinity(0, &sys::one_cpu(p.loadgen))?;
            Some(guard)
        }
        None => None,
    };
    let (warmup, window) = if opts.quick {
        (QUICK_WARMUP, QUICK_WINDOW)
    } else {
        (WARMUP, WINDOW)
    };
    let hz = sys::clock_ticks_per_sec();
    let pattern: Arc<[u8]> = pattern().into();
    let mut runs = Vec::new();
    let kinds = Kind::all();
    let mut progress = Progress::new(WORKLOAD.name, rounds * CONFIGS.len() * kinds.len());
    for round in 1..=rounds {
        for (i, config) in CONFIGS.iter().enumerate() {
            for k in 0..kinds.len() {
                let kind = kinds[(k + round - 1) % kinds.len()];
                let run = Setup {
                    warmup,
                    window,
                    placement,
                };
                let r = run_one(&rt, round, i, kind, &run, &pattern).map_err(|e| {
                    format!("round {round}, {} {}: {e}", config.label, kind.proxy_name())
                })?;
                print_progress(&mut progress, &r, rounds, hz);
                runs.push(r);
            }
        }
    }
    Ok(summarize(&runs, rounds, hz, placement))
}

/// How every run goes.
struct Setup {
    warmup: Duration,
    window: Duration,
    placement: Option<Placement>,
}

/// The proxy's command line.
fn proxy_args(kind: Kind, upstream: SocketAddr) -> Vec<String> {
    let name = match kind {
        Kind::Ringpool | Kind::Splice | Kind::Variant => "proxy",
        Kind::Tokio => "tokio-proxy",
        Kind::Std => "std-proxy",
    };
    let mut args: Vec<String> = [name, "--listen", "127.0.0.1:0", "--upstream"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(upstream.to_string());
    let extra = match kind {
        Kind::Ringpool | Kind::Splice => EXTRA_ARGS_VAR,
        Kind::Variant => VARIANT_ARGS_VAR,
        Kind::Tokio | Kind::Std => return args,
    };
    args.extend(RINGPOOL_ARGS.iter().map(|s| s.to_string()));
    if kind == Kind::Splice {
        args.extend(["--path".to_string(), "splice".to_string()]);
    }
    if let Ok(extra) = std::env::var(extra) {
        args.extend(extra.split_whitespace().map(str::to_owned));
    }
    args
}

/// One run: an upstream listener, the proxy in front of it, the streams through both.
fn run_one(
    rt: &tokio::runtime::Runtime,
    round: usize,
    config: usize,
    kind: Kind,
    setup: &Setup,
    pattern: &Arc<[u8]>,
) -> BenchResult<Run> {
    let upstream = TcpListener::bind("127.0.0.1:0")?;
    upstream.set_nonblocking(true)?;
    let command = proxy_args(kind, upstream.local_addr()?);
    let server = Server::spawn(kind.label(), &command)?;
    if let Some(p) = setup.placement {
        sys::pin_process(server.pid(), p.proxy)?;
    }
    let clock = ProcessClock::of(server.pid())?;
    let c = &CONFIGS[config];
    let params = Params {
        write: c.write,
        streams: c.streams,
        warmup: setup.warmup,
        window: setup.window,
        pattern: Arc::clone(pattern),
    };
    let m = rt.block_on(drive(
        server.addr(),
        upstream,
        &params,
        &clock,
        server.pid(),
    ))?;
    let stopped = server.stop()?;
    Ok(Run {
        round,
        config,
        kind,
        command,
        window: m.window,
        window_bytes: m.window_bytes,
        cpu: m.cpu,
        cpu_ticks: m.cpu_ticks,
        loadgen_cpu: m.loadgen_cpu,
        totals: m.totals,
        stats: stopped.stats,
        killed: stopped.killed,
        exit: stopped.status,
    })
}

/// What [`drive`] needs to know.
struct Params {
    write: usize,
    streams: usize,
    warmup: Duration,
    window: Duration,
    pattern: Arc<[u8]>,
}

/// What [`drive`] measured.
struct Measured {
    window: Duration,
    window_bytes: u64,
    cpu: Duration,
    cpu_ticks: u64,
    loadgen_cpu: Duration,
    totals: Totals,
}

/// One edge of the window.
struct Snapshot {
    at: Instant,
    bytes: u64,
    cpu: Duration,
    ticks: u64,
    loadgen: Duration,
}

impl Snapshot {
    /// Reads the clocks and the byte counter now.
    fn take(received: &AtomicU64, clock: &ProcessClock, pid: u32) -> BenchResult<Snapshot> {
        Ok(Snapshot {
            at: Instant::now(),
            bytes: received.load(Ordering::Relaxed),
            cpu: clock.now()?,
            ticks: sys::cpu_ticks(pid)?,
            loadgen: sys::process_cpu_time()?,
        })
    }
}

/// What one task of a stream did.
enum TaskOut {
    /// A writer: bytes written, or the error that stopped it.
    Wrote(usize, Result<u64, String>),
    /// A reader.
    Read(usize, usize, ReadOutcome),
}

/// What a reader saw.
#[derive(Default)]
struct ReadOutcome {
    bytes: u64,
    mismatches: u64,
    first_mismatch: Option<u64>,
    eof: bool,
    error: Option<String>,
}

/// Opens the streams, runs them through warm-up and window, stops the writers and collects
/// every end's outcome.
async fn drive(
    proxy: SocketAddr,
    upstream: TcpListener,
    p: &Params,
    clock: &ProcessClock,
    pid: u32,
) -> BenchResult<Measured> {
    let upstream = tokio::net::TcpListener::from_std(upstream)?;
    let (clients, servers) = open_streams(proxy, &upstream, p.streams).await?;
    drop(upstream);

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let tasks = spawn_streams(clients, servers, p, &stop, &received);

    tokio::time::sleep(p.warmup).await;
    let before = Snapshot::take(&received, clock, pid)?;
    tokio::time::sleep(p.window).await;
    let after = Snapshot::take(&received, clock, pid)?;
    stop.store(true, Ordering::Relaxed);

    let totals = collect_streams(tasks).await;
    Ok(Measured {
        window: after.at - before.at,
        window_bytes: after.bytes - before.bytes,
        cpu: after.cpu.saturating_sub(before.cpu),
        cpu_ticks: after.ticks.saturating_sub(before.ticks),
        loadgen_cpu: after.loadgen.saturating_sub(before.loadgen),
        totals,
    })
}

/// Starts a writer and a reader per direction of every stream.
fn spawn_streams(
    clients: Vec<TcpStream>,
    servers: Vec<TcpStream>,
    p: &Params,
    stop: &Arc<AtomicBool>,
    received: &Arc<AtomicU64>,
) -> JoinSet<TaskOut> {
    let mut tasks = JoinSet::new();
    for (id, (client, server)) in clients.into_iter().zip(servers).enumerate() {
        let (client_r, client_w) = client.into_split();
        let (server_r, server_w) = server.into_split();
        for (dir, r, w) in [(UP, server_r, client_w), (DOWN, client_r, server_w)] {
            let start = start_of(id, dir);
            let (pattern, stop) = (Arc::clone(&p.pattern), Arc::clone(stop));
            let write = p.write;
            tasks.spawn(async move {
                TaskOut::Wrote(dir, write_stream(w, start, write, &pattern, &stop).await)
            });
            let (pattern, received) = (Arc::clone(&p.pattern), Arc::clone(received));
            tasks.spawn(async move {
                TaskOut::Read(id, dir, read_stream(r, start, &pattern, &received).await)
            });
        }
    }
    tasks
}

/// Waits (at most [`STALL`]) for every stream task and adds up what they did.
async fn collect_streams(mut tasks: JoinSet<TaskOut>) -> Totals {
    let mut totals = Totals::default();
    let collect = async {
        while let Some(done) = tasks.join_next().await {
            totals.add(done);
        }
    };
    if tokio::time::timeout(STALL, collect).await.is_err() {
        tasks.abort_all();
        totals.errors.push(format!(
            "{} stream task(s) still running {STALL:?} after the writers stopped",
            tasks.len()
        ));
    }
    totals
}

impl Totals {
    /// Adds what one stream task did (or how it failed).
    fn add(&mut self, done: Result<TaskOut, tokio::task::JoinError>) {
        match done {
            Ok(TaskOut::Wrote(dir, Ok(n))) => self.written[dir] += n,
            Ok(TaskOut::Wrote(dir, Err(e))) => {
                self.errors.push(format!("{} writer: {e}", dir_name(dir)))
            }
            Ok(TaskOut::Read(id, dir, r)) => {
                self.read[dir] += r.bytes;
                self.mismatches += r.mismatches;
                if let (None, Some(at)) = (self.first_mismatch, r.first_mismatch) {
                    self.first_mismatch = Some((id, dir, at));
                }
                self.no_eof += u64::from(!r.eof);
                if let Some(e) = r.error {
                    self.errors
                        .push(format!("stream {id} {} reader: {e}", dir_name(dir)));
                }
            }
            Err(e) => self.errors.push(format!("a stream task failed: {e}")),
        }
    }
}

/// Connects `n` clients through the proxy and accepts their upstream sides, paired by the
/// header each client sends first: `(clients, upstreams)`, index = stream number.
async fn open_streams(
    proxy: SocketAddr,
    upstream: &tokio::net::TcpListener,
    n: usize,
) -> BenchResult<(Vec<TcpStream>, Vec<TcpStream>)> {
    let mut clients = Vec::with_capacity(n);
    for id in 0..n {
        let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(proxy))
            .await
            .map_err(|_| format!("connect {id} to the proxy at {proxy}: timed out"))?
            .map_err(|e| format!("connect {id} to the proxy at {proxy}: {e}"))?;
        s.set_nodelay(true)?;
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..].copy_from_slice(&(id as u32).to_le_bytes());
        s.write_all(&header).await?;
        clients.push(s);
    }
    let mut servers: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let accept_all = async {
        for _ in 0..n {
            let (mut s, _) = upstream.accept().await?;
            s.set_nodelay(true)?;
            let mut header = [0u8; HEADER];
            s.read_exact(&mut header).await?;
            let magic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
            let id = u32::from_le_bytes(header[4..].try_into().expect("4 bytes")) as usize;
            if magic != MAGIC || id >= n || servers[id].is_some() {
                return Err(format!("upstream got an unexpected stream header {header:?}").into());
            }
            servers[id] = Some(s);
        }
        BenchResult::Ok(())
    };
    tokio::time::timeout(CONNECT_TIMEOUT, accept_all)
        .await
        .map_err(|_| {
            format!("the upstream did not get all {n} streams in {CONNECT_TIMEOUT:?}")
        })??;
    Ok((clients, servers.into_iter().flatten().collect()))
}

/// Where in the pattern direction `dir` of stream `id` starts.
fn start_of(id: usize, dir: usize) -> usize {
    (2 * id + dir) * STRIDE % PERIOD
}

/// The pattern: [`PERIOD`] pseudo-random bytes (xorshift), then its first [`MAX_PIECE`] bytes
/// again.
fn pattern() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v: Vec<u8> = (0..PERIOD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    v.extend_from_within(..MAX_PIECE);
    v
}

/// The `len` bytes at stream offset `at` of a direction starting at `start` in the pattern.
fn piece(pattern: &[u8], start: usize, at: u64, len: usize) -> &[u8] {
    debug_assert!(len <= MAX_PIECE);
    let p = ((start as u64 + at) % PERIOD as u64) as usize;
    &pattern[p..p + len]
}

/// Writes the direction's pattern in `write`-byte pieces until `stop`, then shuts the
/// direction down (EOF at the far end once the proxy passed everything on).
async fn write_stream(
    mut w: OwnedWriteHalf,
    start: usize,
    write: usize,
    pattern: &[u8],
    stop: &AtomicBool,
) -> Result<u64, String> {
    let mut written = 0u64;
    while !stop.load(Ordering::Relaxed) {
        w.write_all(piece(pattern, start, written, write))
            .await
            .map_err(|e| format!("after {written} bytes: {e}"))?;
        written += write as u64;
    }
    w.shutdown()
        .await
        .map_err(|e| format!("shutdown after {written} bytes: {e}"))?;
    Ok(written)
}

/// Reads the direction to its end, checking every byte against the pattern and counting them
/// into `received`.
async fn read_stream(
    mut r: OwnedReadHalf,
    start: usize,
    pattern: &[u8],
    received: &AtomicU64,
) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    let mut buf = vec![0u8; MAX_PIECE];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                out.eof = true;
                break;
            }
            Ok(n) => {
                if buf[..n] != *piece(pattern, start, out.bytes, n) {
                    out.mismatches += 1;
                    out.first_mismatch.get_or_insert(out.bytes);
                }
                out.bytes += n as u64;
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                out.error = Some(format!("after {} bytes: {e}", out.bytes));
                break;
            }
        }
    }
    out
}

/// One line per run on stderr, as the bench goes.
fn print_progress(progress: &mut Progress, r: &Run, rounds: usize, hz: u64) {
    let t = &r.totals;
    let error = t
        .errors
        .first()
        .map(|e| format!(", {} error(s), first: {e}", t.errors.len()))
        .unwrap_or_default();
    progress.step(format_args!(
        "proxy round {}/{rounds} {:<11} {:<8}: {:.0} MiB in {:.2} s, {:.3} GB/s, proxy CPU \
         {:.3} s ({:.2} s by ticks) = {:.4} s/GB, load generator CPU {:.2} s, verified {}{}{error}",
        r.round,
        r.config().label,
        r.kind.label(),
        r.window_bytes as f64 / (1 << 20) as f64,
        r.window.as_secs_f64(),
        r.gb_per_sec(),
        r.cpu.as_secs_f64(),
        r.cpu_ticks as f64 / hz as f64,
        r.cpu_s_per_gb(),
        r.loadgen_cpu.as_secs_f64(),
        if r.verified() { "yes" } else { "no" },
        if r.killed { " (proxy killed)" } else { "" },
    ));
}

/// The median over the rounds of `f` for one configuration and proxy.
fn median_of(runs: &[Run], config: usize, kind: Kind, f: impl Fn(&Run) -> f64) -> f64 {
    let values: Vec<f64> = runs
        .iter()
        .filter(|r| r.config == config && r.kind == kind)
        .map(f)
        .collect();
    median(&values)
}

/// Per round, `kind` / `other` of `f` for one configuration. The runs of a round are adjacent
/// in time, so this pairing cancels the VM's slow drift.
fn paired_ratios(
    runs: &[Run],
    config: usize,
    kind: Kind,
    other: Kind,
    f: impl Fn(&Run) -> f64,
) -> Vec<f64> {
    let of = |round, kind| {
        runs.iter()
            .find(|r| r.round == round && r.config == config && r.kind == kind)
    };
    runs.iter()
        .filter(|r| r.config == config && r.kind == kind)
        .filter_map(|r| Some(f(r) / f(of(r.round, other)?)))
        .collect()
}

/// `median (lo..hi)` of per-round ratios.
fn spread(ratios: &[f64]) -> String {
    let (lo, hi) = ratios
        .iter()
        .fold((f64::NAN, f64::NAN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{:.3}x ({lo:.3}..{hi:.3})", median(ratios))
}

/// Medians per configuration, ringpool against tokio, then against std, then the splice path
/// against std.
fn summarize(runs: &[Run], rounds: usize, hz: u64, placement: Option<Placement>) -> WorkloadReport {
    let mut metrics = Vec::new();
    for (i, c) in CONFIGS.iter().enumerate() {
        for (kind, other, cpu_key, cpu_label, rate_key, rate_label) in [
            (
                Kind::Ringpool,
                Kind::Tokio,
                c.cpu_key,
                c.cpu_label,
                c.rate_key,
                c.rate_label,
            ),
            (
                Kind::Ringpool,
                Kind::Std,
                c.std_cpu_key,
                c.std_cpu_label,
                c.std_rate_key,
                c.std_rate_label,
            ),
            (
                Kind::Splice,
                Kind::Std,
                c.splice_cpu_key,
                c.splice_cpu_label,
                c.splice_rate_key,
                c.splice_rate_label,
            ),
        ] {
            metrics.push(Metric {
                key: cpu_key,
                label: cpu_label,
                unit: Unit::SecsPerGb,
                ringpool: median_of(runs, i, kind, Run::cpu_s_per_gb),
                baseline: median_of(runs, i, other, Run::cpu_s_per_gb),
            });
            metrics.push(Metric {
                key: rate_key,
                label: rate_label,
                unit: Unit::GbPerSec,
                ringpool: median_of(runs, i, kind, Run::gb_per_sec),
                baseline: median_of(runs, i, other, Run::gb_per_sec),
            });
        }
    }
    WorkloadReport {
        name: WORKLOAD.name,
        baseline: "tokio current_thread proxy, copy_bidirectional per connection (8 KiB \
                   buffers); rows `vs std`: blocking std proxy, a thread per direction (64 KiB \
                   buffers); ringpool = `ringpool proxy --zerocopy auto` (rows `splice path`: \
                   with `--path splice`); CPU = the proxy \
                   process's user + system time per GB forwarded (both directions)",
        verified: !runs.is_empty() && runs.iter().all(Run::verified),
        rounds,
        targets: targets(&metrics),
        metrics,
        raw_rounds: runs.iter().map(|r| r.to_json(hz)).collect(),
        notes: notes(runs, placement),
        details: vec![format!(
            "kernel entries = `io_uring_enter` calls, operations submitted = SQEs, completions \
             = CQEs; tokio = `current_thread` runtime, `tokio::io::copy_bidirectional`; CPU = the \
             proxy process's CPU-time clock (`clock_getcpuclockid`); extra arguments: \
             {EXTRA_ARGS_VAR}, variant rows: {VARIANT_ARGS_VAR}"
        )],
    }
}

/// Per configuration: issue 7's bound against tokio's CPU per GB, and issue 19's against the
/// std proxy's CPU per GB and GB/s.
fn targets(metrics: &[Metric]) -> Vec<Target> {
    let mut targets = Vec::new();
    for c in &CONFIGS {
        targets.push(
            Target::on(metrics, c.cpu_key, Bound::AtMost(c.target), REGISTERED)
                .named(format!("{}, vs tokio", c.cpu_label)),
        );
        targets.push(Target::on(
            metrics,
            c.std_cpu_key,
            Bound::AtMost(c.std_target),
            PERFORMANCE,
        ));
        targets.push(Target::on(
            metrics,
            c.std_rate_key,
            Bound::AtLeast(1.0),
            PERFORMANCE,
        ));
    }
    targets
}

/// Where ringpool's proxy spends its CPU, the per-round spread, and anything abnormal.
fn notes(runs: &[Run], placement: Option<Placement>) -> Vec<String> {
    let mut notes = vec![placement_note(placement)];
    extra_args_notes(&mut notes);
    let kinds = Kind::all();
    for (i, c) in CONFIGS.iter().enumerate() {
        cpu_ratio_notes(&mut notes, runs, &kinds, i, c);
        op_count_notes(&mut notes, runs, &kinds, i, c);
        loadgen_notes(&mut notes, runs, &kinds, i, c);
    }
    for r in runs {
        round_notes(&mut notes, r);
    }
    notes
}

/// Where the proxies and the load generator ran.
fn placement_note(placement: Option<Placement>) -> String {
    match placement {
        Some(p) => format!(
            "placement: load generator and upstream sink pinned to CPU {}, every proxy to CPU {} \
             ({PIN_VAR}=0 leaves them unpinned)",
            p.loadgen, p.proxy
        ),
        None => {
            "placement: unpinned (the scheduler places the proxy and the load generator)".to_owned()
        }
    }
}

/// The extra proxy arguments given through the environment, if any.
fn extra_args_notes(notes: &mut Vec<String>) {
    for var in [EXTRA_ARGS_VAR, VARIANT_ARGS_VAR] {
        if let Ok(extra) = std::env::var(var) {
            notes.push(format!("{var}: {extra}"));
        }
    }
}

/// One configuration's CPU per GB against tokio and std (and the variant against ringpool),
/// with the per-round spread.
fn cpu_ratio_notes(notes: &mut Vec<String>, runs: &[Run], kinds: &[Kind], i: usize, c: &Config) {
    let cpu = |kind| median_of(runs, i, kind, Run::cpu_s_per_gb);
    let ratio = cpu(Kind::Ringpool) / cpu(Kind::Tokio);
    let paired = |kind, other| paired_ratios(runs, i, kind, other, Run::cpu_s_per_gb);
    notes.push(format!(
        "{}: CPU/GB ringpool/tokio {ratio:.3}x, per round {}; ringpool/std {:.3}x, per \
         round {}",
        c.label,
        spread(&paired(Kind::Ringpool, Kind::Tokio)),
        cpu(Kind::Ringpool) / cpu(Kind::Std),
        spread(&paired(Kind::Ringpool, Kind::Std)),
    ));
    for (kind, name) in [(Kind::Splice, "splice path"), (Kind::Variant, "variant")] {
        if kinds.contains(&kind) {
            let rate = paired_ratios(runs, i, kind, Kind::Ringpool, Run::gb_per_sec);
            notes.push(format!(
                "{}: {name}/ringpool per round: CPU/GB {}, GB/s {}",
                c.label,
                spread(&paired(kind, Kind::Ringpool)),
                spread(&rate),
            ));
        }
    }
}

/// One configuration's kernel entries, operations and sends per GB, for each ringpool proxy.
fn op_count_notes(notes: &mut Vec<String>, runs: &[Run], kinds: &[Kind], i: usize, c: &Config) {
    for kind in [Kind::Ringpool, Kind::Splice, Kind::Variant] {
        if !kinds.contains(&kind) {
            continue;
        }
        let per_gb: Vec<String> = [
            ("enters", "kernel entries"),
            ("sqes", "operations submitted"),
            ("cqes", "completions"),
            ("zc_sends", "zero-copy sends"),
            ("fixed_sends", "of them from registered memory"),
            ("plain_sends", "plain sends"),
        ]
        .iter()
        .map(|&(key, what)| (median_of(runs, i, kind, |r| r.stat_per_gb(key)), what))
        .filter(|(v, _)| !v.is_nan())
        .map(|(v, what)| format!("{v:.0} {what}"))
        .collect();
        notes.push(format!(
            "{}: {} per GB forwarded (median, whole life): {}",
            c.label,
            kind.proxy_name(),
            per_gb.join(", ")
        ));
    }
}

/// One configuration's load generator CPU share, noted where it may have bounded a proxy.
fn loadgen_notes(notes: &mut Vec<String>, runs: &[Run], kinds: &[Kind], i: usize, c: &Config) {
    let busy: Vec<(Kind, f64)> = kinds
        .iter()
        .map(|&kind| {
            let share = median_of(runs, i, kind, |r| {
                r.loadgen_cpu.as_secs_f64() / r.window.as_secs_f64()
            });
            (kind, share)
        })
        .collect();
    if busy.iter().any(|&(_, share)| share > 0.9) {
        let shares: Vec<String> = busy
            .iter()
            .map(|(kind, share)| format!("{:.0}% ({} runs)", share * 100.0, kind.label()))
            .collect();
        notes.push(format!(
            "{}: the load generator used {} of a core: where near 100%, that proxy's GB/s \
             is bounded by the load generator, not by the proxy",
            c.label,
            shares.join(", ")
        ));
    }
}

/// Anything abnormal in one round: its exit, a missing `stats` line, errors, bad bytes, and
/// byte counts the proxy and the streams disagree on.
fn round_notes(notes: &mut Vec<String>, r: &Run) {
    let what = format!(
        "round {} {} {}",
        r.round,
        r.config().label,
        r.kind.proxy_name()
    );
    let t = &r.totals;
    if r.killed {
        notes.push(format!("{what}: ignored SIGTERM and was killed"));
    } else if !r.exit.success() {
        notes.push(format!("{what}: exited with {}", r.exit));
    }
    if r.stats.is_none() {
        notes.push(format!("{what}: printed no `stats` line"));
    }
    for e in t.errors.iter().take(3) {
        notes.push(format!("{what}: {e}"));
    }
    if t.mismatches > 0 || t.no_eof > 0 || t.read != t.written {
        notes.push(format!(
            "{what}: {} mismatching reads (first: stream, direction, offset {:?}), {} reads \
             without EOF, read {:?} of {:?} bytes written (up, down)",
            t.mismatches, t.first_mismatch, t.no_eof, t.read, t.written
        ));
    }
    let headers = (r.config().streams * HEADER) as f64;
    let ours = [t.written[UP] as f64 + headers, t.written[DOWN] as f64];
    if let (Some(up), Some(down)) = (r.stat("bytes_up"), r.stat("bytes_down")) {
        if [up, down] != ours && r.verified() {
            notes.push(format!(
                "{what}: the proxy counted {up} bytes up and {down} down, the streams {} \
                 and {}",
                ours[0], ours[1]
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_wrap_around_the_period() {
        let p = pattern();
        assert_eq!(p.len(), PERIOD + MAX_PIECE);
        assert_eq!(p[PERIOD..], p[..MAX_PIECE]);
        let start = PERIOD - 10;
        assert_eq!(piece(&p, start, 10, 16), &p[..16]);
        assert_eq!(piece(&p, start, 4, 16), &p[PERIOD - 6..PERIOD + 10]);
    }

    #[test]
    fn every_direction_starts_elsewhere() {
        let mut starts: Vec<usize> = (0..32)
            .flat_map(|id| [start_of(id, UP), start_of(id, DOWN)])
            .collect();
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts.len(), 64);
    }

    #[test]
    fn a_misplaced_write_does_not_match() {
        let p = pattern();
        for write in [4 << 10, 64 << 10] {
            assert_ne!(piece(&p, 0, 0, 4096), piece(&p, 0, write, 4096));
        }
    }

    #[test]
    fn every_proxy_command_line() {
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let rp = proxy_args(Kind::Ringpool, up).join(" ");
        // RINGPOOL_BENCH_PROXY_ARGS may add more after these.
        assert!(
            rp.starts_with("proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:9 --zerocopy auto"),
            "{rp}"
        );
        let tk = proxy_args(Kind::Tokio, up).join(" ");
        assert_eq!(
            tk,
            "tokio-proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:9"
        );
        let st = proxy_args(Kind::Std, up).join(" ");
        assert_eq!(st, "std-proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:9");
    }
}
