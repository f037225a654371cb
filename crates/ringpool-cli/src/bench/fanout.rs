//! Workload `fanout`: one file to 16 clients at once. The CPU a file server spends per GB it
//! delivers, and the aggregate GB/s, for `ringpool fanout` (each chunk read once per round and
//! leased to all 16 clients' sends) on both kinds of lease, against two baselines in the same
//! run:
//!
//! - **fanout** (`--lease memory`): each chunk read into a registered buffer, sent from it to
//!   every client (zero-copy where the policy says it pays: not on loopback, which copies);
//! - **fanout-pages** (`--lease pages`, what `auto` picks on loopback): each chunk's page-cache
//!   pages spliced into a pipe once, teed to every client's pipe and spliced to its socket;
//!
//! - **read-per-client**: the same server code path reading the file once per client (the
//!   hidden `ringpool fanout --read-per-client`: each client its own `READ_FIXED` chunk reads
//!   into buffers of the same kind, each sent with the same zero-copy policy, nothing shared);
//! - **sendfile**: the hidden `ringpool sendfile-server`, `sendfile(2)` per client from the page
//!   cache straight into the socket (one thread, non-blocking sockets and `poll(2)`).
//!
//! The targets: the memory-lease server's CPU per GB ≤ 0.67× the read-per-client server's
//! (issue 4); the pages-lease server's ≤ 1.0× `sendfile`'s and ≤ 0.5× read-per-client's
//! (issue 16). The pages / memory ratio (the measurement behind `--lease auto`) is reported.
//!
//! With `RINGPOOL_BENCH_FANOUT_RT=1`, a fourth server joins the rotation: **fanout-rt**, the
//! same fanout server on the async layer (`ringpool fanout --rt`), with two more pairs of rows,
//! fanout-rt against read-per-client and against the event-loop fanout (per-round ratios of
//! adjacent runs in the notes). The default rows do not change.
//!
//! Setup, once per run: a test file of 64 MiB (16 MiB with `--quick`) in a scratch directory on
//! a disk filesystem (`./target`, else the system temp dir, as the `file` workload picks it),
//! every 8-byte word a function of its position; then read back whole, which puts it in the page
//! cache and gives the checksum every client's copy must match. All the servers read the page
//! cache: the fair comparison for a fan-out (a disk would make the read-once side look better
//! still).
//!
//! Each server is a child process of this executable, started once and kept for the whole
//! workload (setup costs, such as registering buffers, stay out of the measurements), with
//! 1 MiB chunks and 8 in flight (per client on the read-per-client side). After one unmeasured
//! warm-up round each, rounds go to the four servers in rotating order (round `r` starts with
//! server `r mod 4`): 9 rounds per server (3 with `--quick`, whatever the bench's general
//! round count says).
//!
//! One round: 16 client threads in this process connect, read to EOF and checksum their copy
//! (a position-sensitive hash, so a misplaced, missing or repeated chunk fails). Measured over
//! the round, from before the first connect to after the last EOF: the server's CPU time (user +
//! system of all its threads, io_uring workers included: its process CPU-time clock, as the
//! `proxy` workload reads it; on loopback the kernel's receive path for what the server sends
//! mostly runs in the sender's context, so it is charged to the server, the same way for all
//! of them) and the wall time. CPU s/GB = server CPU / (16 × file size), GB/s = 16 × file size /
//! wall time (10^9 bytes). Medians per server over the rounds; the ratios of each fanout side
//! to read-per-client and to sendfile, pages / memory, and per round the same ratios of runs
//! that are adjacent in time (which cancels the VM's slow drift).

use std::fs::File;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::progress::Progress;
use super::report::{median, Bound, Metric, Target, Unit, WorkloadReport, LEASES, PAGE_LEASES};
use super::server::Server;
use super::sys::{fs_kind, fs_magic, ProcessClock};
use super::{sys, BenchResult, Options, WorkloadDef};

/// The workload's entry in the bench.
pub const WORKLOAD: WorkloadDef = WorkloadDef {
    name: "fanout",
    run,
};

/// Clients per round (the 16).
const CLIENTS: usize = 16;
/// Size of the test file.
const FILE_BYTES: u64 = 64 << 20;
/// Size of the test file with `--quick`.
const QUICK_FILE_BYTES: u64 = 16 << 20;
/// Measured rounds per server.
const ROUNDS: usize = 9;
/// Measured rounds per server with `--quick`.
const QUICK_ROUNDS: usize = 3;
/// Bytes per chunk read (both ringpool servers).
const CHUNK: usize = 1 << 20;
/// Chunk buffers in flight (per round for fanout, per client for read-per-client).
const IN_FLIGHT: usize = 8;
/// Longest a client may wait for bytes before the round counts as stalled.
const STALL: Duration = Duration::from_secs(30);
/// Longest one connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The clients' read buffer: a copy is checksummed in pieces of this size (the last may be
/// shorter), so the file's checksum is computed in the same pieces.
const PIECE: usize = 1 << 20;
/// Bytes written to the test file per `write`.
const WRITE_CHUNK: usize = 1 << 20;
/// Issue 4's bound on fanout (memory leases) / read-per-client CPU per GB.
const TARGET: f64 = 0.67;
/// Issue 16's bound on fanout (pages leases) / sendfile CPU per GB.
const PAGES_VS_SENDFILE: f64 = 1.0;
/// Issue 16's bound on fanout (pages leases) / read-per-client CPU per GB.
const PAGES_VS_READ_PER_CLIENT: f64 = 0.5;
/// Environment variable that adds the `--rt` fanout server to the rotation when set to `1`.
const RT_VAR: &str = "RINGPOOL_BENCH_FANOUT_RT";

const _: () = assert!(PIECE % 32 == 0 && WRITE_CHUNK % 8 == 0);

/// The servers under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `ringpool fanout --lease memory`: each chunk read once into memory, leased to every
    /// client's send.
    Fanout,
    /// `ringpool fanout --lease pages`: each chunk's pages spliced once, teed to every client.
    FanoutPages,
    /// `ringpool fanout --read-per-client`: the same machinery, each client its own reads.
    ReadPerClient,
    /// `ringpool sendfile-server`: `sendfile(2)` per client.
    Sendfile,
    /// `ringpool fanout --rt`: the fanout server on the async layer (with [`RT_VAR`]).
    FanoutRt,
}

impl Kind {
    /// Every server of the default run, in the order of the first round.
    const ALL: [Kind; 4] = [
        Kind::Fanout,
        Kind::FanoutPages,
        Kind::ReadPerClient,
        Kind::Sendfile,
    ];

    /// The servers of this run: [`Kind::ALL`], and [`Kind::FanoutRt`] when [`RT_VAR`] is `1`.
    fn this_run() -> Vec<Kind> {
        let mut kinds = Kind::ALL.to_vec();
        if std::env::var(RT_VAR).is_ok_and(|v| v == "1") {
            kinds.push(Kind::FanoutRt);
        }
        kinds
    }

    /// Name in progress lines, notes and JSON.
    fn label(self) -> &'static str {
        match self {
            Kind::Fanout => "fanout",
            Kind::FanoutPages => "fanout-pages",
            Kind::ReadPerClient => "read-per-client",
            Kind::Sendfile => "sendfile",
            Kind::FanoutRt => "fanout-rt",
        }
    }

    /// The server's command line (arguments of this executable).
    fn args(self, file: &Path) -> Vec<String> {
        let file = file.display().to_string();
        let clients = CLIENTS.to_string();
        let mut args: Vec<String> = match self {
            Kind::Fanout | Kind::FanoutPages | Kind::ReadPerClient | Kind::FanoutRt => {
                vec!["fanout".into()]
            }
            Kind::Sendfile => vec!["sendfile-server".into()],
        };
        args.extend(
            [
                "--file",
                &file,
                "--listen",
                "127.0.0.1:0",
                "--clients",
                &clients,
            ]
            .map(String::from),
        );
        if self != Kind::Sendfile {
            let (chunk, in_flight) = (CHUNK.to_string(), IN_FLIGHT.to_string());
            args.extend(["--chunk", &chunk, "--in-flight", &in_flight].map(String::from));
        }
        let extra: &[&str] = match self {
            Kind::ReadPerClient => &["--read-per-client"],
            Kind::FanoutRt => &["--rt", "--lease", "memory"],
            Kind::Fanout => &["--lease", "memory"],
            Kind::FanoutPages => &["--lease", "pages"],
            Kind::Sendfile => &[],
        };
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }
}

/// A position-sensitive 64-bit checksum of a byte stream fed in [`PIECE`]-byte pieces (the last
/// one may be shorter): four interleaved multiply-xor lanes over 8-byte words (fast enough that
/// the 16 clients do not bound the servers), then the tail bytes and the length.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Sum {
    lanes: [u64; 4],
    len: u64,
}

impl Default for Sum {
    fn default() -> Self {
        Sum {
            lanes: [1, 2, 3, 4],
            len: 0,
        }
    }
}

impl Sum {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    /// Folds `piece` in: every piece but the stream's last must be [`PIECE`] bytes long.
    fn add(&mut self, piece: &[u8]) {
        let mut groups = piece.chunks_exact(32);
        for g in &mut groups {
            for (lane, w) in self.lanes.iter_mut().zip(g.chunks_exact(8)) {
                let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                *lane = (*lane ^ w).wrapping_mul(Self::K).rotate_left(29);
            }
        }
        for (i, &b) in groups.remainder().iter().enumerate() {
            let lane = &mut self.lanes[i % 4];
            *lane = (*lane ^ u64::from(b)).wrapping_mul(Self::K);
        }
        self.len += piece.len() as u64;
    }

    /// The checksum as one number.
    fn value(&self) -> u64 {
        self.lanes.iter().fold(self.len, |h, &l| {
            (h ^ l).wrapping_mul(Self::K).rotate_left(31)
        })
    }
}

/// What one client of a round got.
struct ClientCopy {
    sum: Sum,
    error: Option<String>,
}

/// One server, one round.
struct Run {
    round: usize,
    kind: Kind,
    /// Bytes the round should deliver ([`CLIENTS`] × the file).
    expected_bytes: u64,
    /// The clients' copies.
    copies: Vec<ClientCopy>,
    /// Copies that matched the file's checksum and length.
    verified_copies: usize,
    /// From before the first connect to after the last EOF.
    wall: Duration,
    /// The server's CPU time over the round (its process CPU-time clock).
    cpu: Duration,
    /// The same from `/proc/PID/stat` (clock ticks), as a cross-check.
    cpu_ticks: u64,
    /// This process's CPU time over the round (the 16 clients).
    loadgen_cpu: Duration,
}

impl Run {
    /// Whether every client got the whole file, checksum and length matching, with no error.
    fn verified(&self) -> bool {
        self.verified_copies == CLIENTS && self.copies.iter().all(|c| c.error.is_none())
    }

    /// Bytes delivered in the round (all clients).
    fn delivered(&self) -> u64 {
        self.copies.iter().map(|c| c.sum.len).sum()
    }

    /// The server's CPU seconds per GB delivered (NaN for an unverified round).
    fn cpu_s_per_gb(&self) -> f64 {
        if self.verified() {
            self.cpu.as_secs_f64() / (self.expected_bytes as f64 / 1e9)
        } else {
            f64::NAN
        }
    }

    /// GB delivered per second of the round (NaN for an unverified round).
    fn gb_per_sec(&self) -> f64 {
        if self.verified() {
            self.expected_bytes as f64 / 1e9 / self.wall.as_secs_f64()
        } else {
            f64::NAN
        }
    }

    /// The run's raw figures for `--json`; `stats` is its server's final `stats` line (whole
    /// life: warm-up and every round).
    fn to_json(&self, hz: u64, command: &[String], stats: &serde_json::Value) -> serde_json::Value {
        let errors: Vec<&str> = self
            .copies
            .iter()
            .filter_map(|c| c.error.as_deref())
            .collect();
        serde_json::json!({
            "round": self.round,
            "server": self.kind.label(),
            "command": command.join(" "),
            "clients": CLIENTS,
            "expected_bytes": self.expected_bytes,
            "delivered_bytes": self.delivered(),
            "verified_copies": self.verified_copies,
            "wall_secs": self.wall.as_secs_f64(),
            "cpu_secs": self.cpu.as_secs_f64(),
            "cpu_ticks": self.cpu_ticks,
            "cpu_ticks_secs": self.cpu_ticks as f64 / hz as f64,
            "loadgen_cpu_secs": self.loadgen_cpu.as_secs_f64(),
            "cpu_s_per_gb": self.cpu_s_per_gb(),
            "gb_per_sec": self.gb_per_sec(),
            "errors": errors,
            "verified": self.verified(),
            "server_stats_whole_life": stats,
        })
    }
}

/// A server child with its CPU clock.
struct Child {
    kind: Kind,
    command: Vec<String>,
    server: Server,
    clock: ProcessClock,
}

/// Runs the workload: setup, the servers, a warm-up each, then the rounds.
fn run(opts: &Options) -> BenchResult<WorkloadReport> {
    let (file_bytes, rounds) = if opts.quick {
        (QUICK_FILE_BYTES, QUICK_ROUNDS)
    } else {
        (FILE_BYTES, ROUNDS)
    };
    let setup = setup(file_bytes)?;
    let hz = sys::clock_ticks_per_sec();
    let kinds = Kind::this_run();
    let mut children = Vec::new();
    for &kind in &kinds {
        let command = kind.args(&setup.path);
        let server = Server::spawn(kind.label(), &command)?;
        let clock = ProcessClock::of(server.pid())?;
        children.push(Child {
            kind,
            command,
            server,
            clock,
        });
    }
    for c in &children {
        let warm =
            deliver(c, 0, &setup).map_err(|e| format!("warm-up, {}: {e}", c.kind.label()))?;
        if !warm.verified() {
            eprintln!("fanout: warm-up of {} did not verify", c.kind.label());
        }
    }
    let mut runs = Vec::new();
    let mut progress = Progress::new(WORKLOAD.name, rounds * kinds.len());
    for round in 1..=rounds {
        for k in 0..kinds.len() {
            let c = &children[(k + round - 1) % kinds.len()];
            let r = deliver(c, round, &setup)
                .map_err(|e| format!("round {round}, {}: {e}", c.kind.label()))?;
            print_progress(&mut progress, &r, rounds, hz);
            runs.push(r);
        }
    }
    drop(progress);
    let mut servers = Vec::new();
    for c in children {
        let stopped = c.server.stop()?;
        servers.push((c.kind, c.command, stopped));
    }
    Ok(summarize(&runs, rounds, hz, &setup, &servers))
}

/// The scratch directory, the test file and its checksum.
struct Setup {
    /// Removes the scratch directory when dropped.
    _scratch: Scratch,
    path: PathBuf,
    /// The filesystem of the scratch directory.
    fs: &'static str,
    bytes: u64,
    sum: Sum,
}

/// A directory removed (with its contents) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the test file and reads it back whole (page cache warm, checksum taken).
fn setup(bytes: u64) -> BenchResult<Setup> {
    let (dir, fs) = scratch_dir()?;
    let scratch = Scratch(dir.join(format!("ringpool-bench-fanout-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .map_err(|e| format!("creating {}: {e}", scratch.0.display()))?;
    let path = scratch.0.join("served.bin");
    write_file(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let sum = checksum_file(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if sum.len != bytes {
        return Err(format!("{} holds {} bytes, not {bytes}", path.display(), sum.len).into());
    }
    eprintln!(
        "fanout: {} MiB test file on {fs} at {}, page-cached, checksum {:016x}; {CLIENTS} \
         clients per round",
        bytes >> 20,
        path.display(),
        sum.value()
    );
    Ok(Setup {
        _scratch: scratch,
        path,
        fs,
        bytes,
        sum,
    })
}

/// Writes `bytes` bytes, every 8-byte word a mix of its index (so any misplaced piece shows).
fn write_file(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    let mut chunk = vec![0u8; WRITE_CHUNK];
    let mut word = 0u64;
    let mut left = bytes;
    while left > 0 {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&mix(word).to_le_bytes());
            word += 1;
        }
        let n = left.min(WRITE_CHUNK as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.flush()
}

/// splitmix64's finalizer.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The checksum of a file, in [`PIECE`]-byte pieces as the clients compute it.
fn checksum_file(path: &Path) -> std::io::Result<Sum> {
    let mut file = File::open(path)?;
    let mut sum = Sum::default();
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = fill(&mut file, &mut buf)?;
        sum.add(&buf[..n]);
        if n < PIECE {
            return Ok(sum);
        }
    }
}

/// Reads until `buf` is full or the end of the stream: the bytes read.
fn fill(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The first of `./target` and the system temp dir that is on a disk filesystem (as the `file`
/// workload picks it), else the temp dir whatever it is on.
fn scratch_dir() -> BenchResult<(PathBuf, &'static str)> {
    let mut candidates = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("target"));
    }
    candidates.push(std::env::temp_dir());
    for dir in &candidates {
        if dir.is_dir() {
            let (name, in_memory) = fs_kind(fs_magic(dir)?);
            if !in_memory {
                return Ok((dir.clone(), name));
            }
        }
    }
    let tmp = std::env::temp_dir();
    let (name, _) = fs_kind(fs_magic(&tmp)?);
    Ok((tmp, name))
}

/// One round against one server: [`CLIENTS`] threads connect, read to EOF and checksum, while
/// the server's CPU and the wall time are measured.
fn deliver(child: &Child, round: usize, setup: &Setup) -> BenchResult<Run> {
    let addr = child.server.addr();
    let pid = child.server.pid();
    let (cpu0, ticks0, load0) = (
        child.clock.now()?,
        sys::cpu_ticks(pid)?,
        sys::process_cpu_time()?,
    );
    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| std::thread::spawn(move || receive(addr)))
        .collect();
    let copies: Vec<ClientCopy> = clients
        .into_iter()
        .map(|c| match c.join() {
            Ok(Ok(sum)) => ClientCopy { sum, error: None },
            Ok(Err((sum, e))) => ClientCopy {
                sum,
                error: Some(e),
            },
            Err(_) => ClientCopy {
                sum: Sum::default(),
                error: Some("the client thread panicked".into()),
            },
        })
        .collect();
    let wall = start.elapsed();
    let (cpu1, ticks1, load1) = (
        child.clock.now()?,
        sys::cpu_ticks(pid)?,
        sys::process_cpu_time()?,
    );
    let verified_copies = copies
        .iter()
        .filter(|c| c.error.is_none() && c.sum == setup.sum)
        .count();
    Ok(Run {
        round,
        kind: child.kind,
        expected_bytes: setup.bytes * CLIENTS as u64,
        copies,
        verified_copies,
        wall,
        cpu: cpu1.saturating_sub(cpu0),
        cpu_ticks: ticks1.saturating_sub(ticks0),
        loadgen_cpu: load1.saturating_sub(load0),
    })
}

/// One client: connects, reads to EOF, checksums. On error, what it got so far and the error.
fn receive(addr: SocketAddr) -> Result<Sum, (Sum, String)> {
    let mut sum = Sum::default();
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| (sum, format!("connect to {addr}: {e}")))?;
    s.set_read_timeout(Some(STALL))
        .map_err(|e| (sum, e.to_string()))?;
    let mut buf = vec![0u8; PIECE];
    loop {
        let n =
            fill(&mut s, &mut buf).map_err(|e| (sum, format!("after {} bytes: {e}", sum.len)))?;
        sum.add(&buf[..n]);
        if n < PIECE {
            return Ok(sum);
        }
    }
}

/// One line per run on stderr, as the bench goes.
fn print_progress(progress: &mut Progress, r: &Run, rounds: usize, hz: u64) {
    let error = r
        .copies
        .iter()
        .find_map(|c| c.error.as_deref())
        .map(|e| format!(", first error: {e}"))
        .unwrap_or_default();
    progress.step(format_args!(
        "fanout round {}/{rounds} {:<15}: {:.0} MiB in {:.3} s, {:.3} GB/s, server CPU {:.3} s \
         ({:.2} s by ticks) = {:.4} s/GB, clients CPU {:.2} s, verified {}/{CLIENTS}{error}",
        r.round,
        r.kind.label(),
        r.delivered() as f64 / (1 << 20) as f64,
        r.wall.as_secs_f64(),
        r.gb_per_sec(),
        r.cpu.as_secs_f64(),
        r.cpu_ticks as f64 / hz as f64,
        r.cpu_s_per_gb(),
        r.loadgen_cpu.as_secs_f64(),
        r.verified_copies,
    ));
}

/// The median over the rounds of `f` for one server.
fn median_of(runs: &[Run], kind: Kind, f: impl Fn(&Run) -> f64) -> f64 {
    let values: Vec<f64> = runs.iter().filter(|r| r.kind == kind).map(f).collect();
    median(&values)
}

/// Per round, `kind` / `other` of `f`: the runs of a round are adjacent in time.
fn paired_ratios(runs: &[Run], kind: Kind, other: Kind, f: impl Fn(&Run) -> f64) -> Vec<f64> {
    let of = |round, kind| runs.iter().find(|r| r.round == round && r.kind == kind);
    runs.iter()
        .filter(|r| r.kind == kind)
        .filter_map(|r| Some(f(r) / f(of(r.round, other)?)))
        .collect()
}

/// The metric keys and labels of one comparison.
struct Versus {
    kind: Kind,
    other: Kind,
    cpu_key: &'static str,
    cpu_label: &'static str,
    rate_key: &'static str,
    rate_label: &'static str,
}

/// The comparisons: each kind of lease against each baseline, and pages against memory.
const VERSUS: [Versus; 5] = [
    Versus {
        kind: Kind::Fanout,
        other: Kind::ReadPerClient,
        cpu_key: "cpu_s_per_gb_vs_read_per_client",
        cpu_label: "memory leases: server CPU/GB, vs read-per-client",
        rate_key: "gb_per_sec_vs_read_per_client",
        rate_label: "memory leases: GB/s, vs read-per-client",
    },
    Versus {
        kind: Kind::Fanout,
        other: Kind::Sendfile,
        cpu_key: "cpu_s_per_gb_vs_sendfile",
        cpu_label: "memory leases: server CPU/GB, vs sendfile",
        rate_key: "gb_per_sec_vs_sendfile",
        rate_label: "memory leases: GB/s, vs sendfile",
    },
    Versus {
        kind: Kind::FanoutPages,
        other: Kind::ReadPerClient,
        cpu_key: "cpu_s_per_gb_pages_vs_read_per_client",
        cpu_label: "pages leases: server CPU/GB, vs read-per-client",
        rate_key: "gb_per_sec_pages_vs_read_per_client",
        rate_label: "pages leases: GB/s, vs read-per-client",
    },
    Versus {
        kind: Kind::FanoutPages,
        other: Kind::Sendfile,
        cpu_key: "cpu_s_per_gb_pages_vs_sendfile",
        cpu_label: "pages leases: server CPU/GB, vs sendfile",
        rate_key: "gb_per_sec_pages_vs_sendfile",
        rate_label: "pages leases: GB/s, vs sendfile",
    },
    Versus {
        kind: Kind::FanoutPages,
        other: Kind::Fanout,
        cpu_key: "cpu_s_per_gb_pages_vs_memory",
        cpu_label: "pages leases: server CPU/GB, vs memory leases",
        rate_key: "gb_per_sec_pages_vs_memory",
        rate_label: "pages leases: GB/s, vs memory leases",
    },
];

/// The comparisons of the server on the async layer (with [`RT_VAR`]).
const VERSUS_RT: [Versus; 2] = [
    Versus {
        kind: Kind::FanoutRt,
        other: Kind::ReadPerClient,
        cpu_key: "cpu_s_per_gb_rt_vs_read_per_client",
        cpu_label: "fanout --rt: server CPU/GB, vs read-per-client",
        rate_key: "gb_per_sec_rt_vs_read_per_client",
        rate_label: "fanout --rt: GB/s, vs read-per-client",
    },
    Versus {
        kind: Kind::FanoutRt,
        other: Kind::Fanout,
        cpu_key: "cpu_s_per_gb_rt_vs_event_loop",
        cpu_label: "fanout --rt: server CPU/GB, vs the event loop (memory leases)",
        rate_key: "gb_per_sec_rt_vs_event_loop",
        rate_label: "fanout --rt: GB/s, vs the event loop (memory leases)",
    },
];

/// The comparisons this run makes.
fn comparisons(runs: &[Run]) -> Vec<&'static Versus> {
    let rt = runs.iter().any(|r| r.kind == Kind::FanoutRt);
    VERSUS
        .iter()
        .chain(VERSUS_RT.iter().filter(|_| rt))
        .collect()
}

const BASELINE: &str = "`ringpool` column = `ringpool fanout` (each chunk read once, leased to \
                        all 16 sends) on memory leases (`--lease memory`: a registered buffer) \
                        or pages leases (`--lease pages`: page-cache pages spliced through \
                        pipes); `baseline` column = the same server reading the file once per \
                        client (`--read-per-client`), `sendfile(2)` per client (one thread, \
                        poll), or, for pages, the memory-lease server; CPU = the server \
                        process's user + system time per GB delivered (16 copies of the file)";

/// Medians per server, fanout against each baseline.
fn summarize(
    runs: &[Run],
    rounds: usize,
    hz: u64,
    setup: &Setup,
    servers: &[(Kind, Vec<String>, super::server::Stopped)],
) -> WorkloadReport {
    let mut metrics = Vec::new();
    for v in comparisons(runs) {
        metrics.push(Metric {
            key: v.cpu_key,
            label: v.cpu_label,
            unit: Unit::SecsPerGb,
            ringpool: median_of(runs, v.kind, Run::cpu_s_per_gb),
            baseline: median_of(runs, v.other, Run::cpu_s_per_gb),
        });
        metrics.push(Metric {
            key: v.rate_key,
            label: v.rate_label,
            unit: Unit::GbPerSec,
            ringpool: median_of(runs, v.kind, Run::gb_per_sec),
            baseline: median_of(runs, v.other, Run::gb_per_sec),
        });
    }
    let null = serde_json::Value::Null;
    let raw_rounds = runs
        .iter()
        .map(|r| {
            let (command, stats) = servers
                .iter()
                .find(|(k, ..)| *k == r.kind)
                .map(|(_, c, s)| (c.as_slice(), s.stats.as_ref().unwrap_or(&null)))
                .unwrap_or((&[], &null));
            r.to_json(hz, command, stats)
        })
        .collect();
    WorkloadReport {
        name: WORKLOAD.name,
        baseline: BASELINE,
        verified: !runs.is_empty() && runs.iter().all(Run::verified),
        rounds,
        targets: vec![
            Target::on(&metrics, VERSUS[0].cpu_key, Bound::AtMost(TARGET), LEASES),
            Target::on(
                &metrics,
                VERSUS[3].cpu_key,
                Bound::AtMost(PAGES_VS_SENDFILE),
                PAGE_LEASES,
            ),
            Target::on(
                &metrics,
                VERSUS[2].cpu_key,
                Bound::AtMost(PAGES_VS_READ_PER_CLIENT),
                PAGE_LEASES,
            ),
        ],
        metrics,
        raw_rounds,
        notes: notes(runs, setup, servers),
        details: vec![
            "kernel entries = `io_uring_enter` calls, operations submitted = SQEs; pages \
             leases: `IORING_OP_SPLICE` file → pipe, `IORING_OP_TEE` pipe → each client's \
             pipe, `IORING_OP_SPLICE` pipe → socket, would-block waits = `EAGAIN` turned \
             into a poll; sendfile server: `sendfile(2)` on non-blocking sockets, `poll(2)` on \
             `EAGAIN`; CPU = the server process's CPU-time clock (`clock_getcpuclockid`)"
                .into(),
        ],
    }
}

/// The per-round ratios, what the servers did per GB, and anything abnormal.
fn notes(
    runs: &[Run],
    setup: &Setup,
    servers: &[(Kind, Vec<String>, super::server::Stopped)],
) -> Vec<String> {
    let mut notes = vec![setup_note(setup)];
    if runs.iter().any(|r| r.kind == Kind::FanoutRt) {
        notes.push(format!(
            "{RT_VAR}=1: fanout-rt is `ringpool fanout --rt`, the fanout server on the async \
             layer, in the same rotation"
        ));
    }
    for v in comparisons(runs) {
        ratio_notes(&mut notes, runs, v);
    }
    for (kind, _, stopped) in servers {
        server_notes(&mut notes, *kind, stopped);
    }
    machine_bound_notes(&mut notes, runs);
    for r in runs.iter().filter(|r| !r.verified()) {
        unverified_note(&mut notes, r);
    }
    notes
}

/// The file, the clients and the servers' chunking.
fn setup_note(setup: &Setup) -> String {
    format!(
        "{} MiB file on {} (page-cached), {CLIENTS} clients, {} MiB delivered per round; \
         ringpool servers: {} KiB chunks, {IN_FLIGHT} in flight (per client on the \
         read-per-client side)",
        setup.bytes >> 20,
        setup.fs,
        (setup.bytes * CLIENTS as u64) >> 20,
        CHUNK >> 10,
    )
}

/// One comparison's CPU per GB (and, against fanout, GB/s): medians and per-round ratios.
fn ratio_notes(notes: &mut Vec<String>, runs: &[Run], v: &Versus) {
    let cpu = |kind| median_of(runs, kind, Run::cpu_s_per_gb);
    let ratio = cpu(v.kind) / cpu(v.other);
    let paired = paired_ratios(runs, v.kind, v.other, Run::cpu_s_per_gb);
    let (lo, hi) = paired
        .iter()
        .fold((f64::NAN, f64::NAN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    notes.push(format!(
        "CPU/GB {}/{} {ratio:.3}x; per round {:.3}x ({lo:.3}..{hi:.3})",
        v.kind.label(),
        v.other.label(),
        median(&paired),
    ));
    if v.other == Kind::Fanout {
        let rate = |kind| median_of(runs, kind, Run::gb_per_sec);
        let paired = paired_ratios(runs, v.kind, v.other, Run::gb_per_sec);
        notes.push(format!(
            "GB/s {}/{} {:.3}x; per round {:.3}x",
            v.kind.label(),
            v.other.label(),
            rate(v.kind) / rate(v.other),
            median(&paired),
        ));
    }
}

/// The `stats` keys of a server worth a note per GB, with their words.
fn per_gb_keys(kind: Kind) -> &'static [(&'static str, &'static str)] {
    match kind {
        Kind::Sendfile => &[
            ("sendfile_calls", "sendfile calls"),
            ("eagain", "would-block returns"),
            ("polls", "polls"),
        ],
        Kind::FanoutPages => &[
            ("chunks_read", "chunk reads"),
            ("enters", "kernel entries"),
            ("sqes", "operations submitted"),
            ("pipes_made", "pipes made"),
            ("pipes_reused", "pipes reused"),
            ("eagain_polls", "would-block waits"),
        ],
        _ => &[
            ("chunks_read", "chunk reads"),
            ("enters", "kernel entries"),
            ("sqes", "operations submitted"),
            ("zc_sends", "zero-copy sends"),
            ("fixed_sends", "of them from registered memory"),
            ("zc_copied", "copied by the kernel anyway"),
            ("plain_sends", "plain sends"),
        ],
    }
}

/// What one server did per GB delivered, how it ended and whether it lost clients (nothing
/// past a missing `stats` line or one without bytes sent).
fn server_notes(notes: &mut Vec<String>, kind: Kind, stopped: &super::server::Stopped) {
    let Some(stats) = &stopped.stats else {
        notes.push(format!("{} server printed no `stats` line", kind.label()));
        return;
    };
    let num = |key: &str| stats.get(key).and_then(serde_json::Value::as_f64);
    let Some(sent) = num("bytes_sent").filter(|&b| b > 0.0) else {
        return;
    };
    let per_gb: Vec<String> = per_gb_keys(kind)
        .iter()
        .filter_map(|&(key, what)| Some(format!("{:.0} {what}", num(key)? / (sent / 1e9))))
        .collect();
    notes.push(format!(
        "{} server per GB delivered (whole life): {}",
        kind.label(),
        per_gb.join(", ")
    ));
    if stopped.killed {
        notes.push(format!("{}: ignored SIGTERM and was killed", kind.label()));
    } else if !stopped.status.success() {
        notes.push(format!("{}: exited with {}", kind.label(), stopped.status));
    }
    if let Some(lost) = num("clients_lost").filter(|&l| l > 0.0) {
        notes.push(format!("{}: lost {lost} client(s)", kind.label()));
    }
}

/// Servers whose runs kept the whole machine busy: their GB/s is the machine's.
fn machine_bound_notes(notes: &mut Vec<String>, runs: &[Run]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for kind in Kind::this_run() {
        let busy = median_of(runs, kind, |r| {
            (r.cpu + r.loadgen_cpu).as_secs_f64() / r.wall.as_secs_f64()
        });
        if busy > 0.9 * cores as f64 {
            notes.push(format!(
                "{}: server and clients together kept {busy:.2} of {cores} cores busy: its GB/s \
                 is bounded by the machine (the clients' receive copies and checksums), not by \
                 the server alone",
                kind.label()
            ));
        }
    }
}

/// A round whose copies did not all verify: how many did, the bytes, the first errors.
fn unverified_note(notes: &mut Vec<String>, r: &Run) {
    let errors: Vec<&str> = r
        .copies
        .iter()
        .filter_map(|c| c.error.as_deref())
        .take(3)
        .collect();
    notes.push(format!(
        "round {} {}: {}/{CLIENTS} copies verified, {} of {} bytes delivered; {}",
        r.round,
        r.kind.label(),
        r.verified_copies,
        r.delivered(),
        r.expected_bytes,
        errors.join("; ")
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_sees_a_misplaced_word() {
        let a: Vec<u8> = (0..PIECE + 100).map(|i| mix(i as u64 / 8) as u8).collect();
        let sum = |bytes: &[u8]| {
            let mut s = Sum::default();
            bytes.chunks(PIECE).for_each(|p| s.add(p));
            s
        };
        let mut b = a.clone();
        b.swap(8, 40); // two words of the same lane, swapped
        assert_ne!(sum(&a), sum(&b));
        let mut c = a.clone();
        c[PIECE + 50] ^= 1; // the tail
        assert_ne!(sum(&a), sum(&c));
        assert_ne!(sum(&a).value(), sum(&a[..PIECE]).value());
    }

    #[test]
    fn command_lines() {
        let p = Path::new("/f");
        assert_eq!(
            Kind::Fanout.args(p).join(" "),
            "fanout --file /f --listen 127.0.0.1:0 --clients 16 --chunk 1048576 --in-flight 8 \
             --lease memory"
        );
        assert_eq!(
            Kind::FanoutPages.args(p).join(" "),
            "fanout --file /f --listen 127.0.0.1:0 --clients 16 --chunk 1048576 --in-flight 8 \
             --lease pages"
        );
        assert!(Kind::ReadPerClient
            .args(p)
            .join(" ")
            .ends_with(" --read-per-client"));
        assert_eq!(
            Kind::FanoutRt.args(p).join(" "),
            "fanout --file /f --listen 127.0.0.1:0 --clients 16 --chunk 1048576 --in-flight 8 \
             --rt --lease memory"
        );
        assert_eq!(
            Kind::Sendfile.args(p).join(" "),
            "sendfile-server --file /f --listen 127.0.0.1:0 --clients 16"
        );
    }
}
