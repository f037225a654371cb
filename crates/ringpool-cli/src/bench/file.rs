//! Workload `file`: `O_DIRECT` 4 KiB random reads at queue depth 32, into registered buffers
//! (`READ_FIXED`) against the same reads into unregistered buffers (plain `READ`), in the same
//! run; CPU per read and IOPS, and their ratio registered / unregistered.
//!
//! Setup, once per run: a scratch directory on a real disk filesystem (the current directory's
//! `target/`, else the system temp dir; tmpfs and ramfs are refused, as they have no disk
//! behind them), one test file of 256 MiB (32 MiB with `--quick`) written, `fsync`'d and
//! dropped from the page cache, then opened with `O_DIRECT`, so every read really reaches the
//! disk. A filesystem that refuses `O_DIRECT` (`EINVAL`), no disk filesystem to write to, or no
//! registered memory make the workload *skipped*, with the reason in its notes (an error
//! instead with `RINGPOOL_REQUIRE_ALL=1`).
//!
//! Both sides run the same code on their own [`Driver`] with [`DEPTH`] page-aligned 4 KiB
//! [`FixedBuf`]s: the **registered** side's come from [`Driver::fixed_buf`] (one table slot
//! each); the **unregistered** side's driver is built with [`Force::NoFixed`], so
//! [`Driver::fixed_buf_or_plain`] hands out plain memory and [`Driver::read_fixed`] issues plain
//! `READ`. Each keeps [`DEPTH`] reads in flight at 4 KiB-aligned offsets drawn from a
//! deterministic PRNG (seeded by round and side) for a fixed window, then drains.
//!
//! Every 4 KiB block of the file encodes its index: its first 8 bytes are the index, every
//! other 8-byte word is `index * K ^ salt[word]` (a fixed per-position salt), so a block from
//! the wrong offset, a stale buffer or a torn read fails the check. Every completed read is
//! checked (a few hundred nanoseconds, charged to both sides alike).
//!
//! Measurement per round and side: the calling thread's CPU time (`RUSAGE_THREAD`: submission,
//! the completions' task work, which `DEFER_TASKRUN` runs in this thread, and the checks) per
//! read, the process's CPU time per read (adds io_uring workers, should a read be punted), and
//! IOPS = reads / wall time. After one unmeasured warm-up per side, rounds alternate the two
//! sides (registered first in odd rounds): 9 rounds of 1 s per side (3 of 300 ms with
//! `--quick`, whatever the bench's general round count and window say); medians over the
//! rounds, and per round the ratio of the two sides run back to back, which cancels the VM's
//! slow drift.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringpool::{Driver, DriverConfig, Error, Event, Fd, FixedBuf, Force};

use super::progress::Progress;
use super::report::{median, Metric, Unit, WorkloadReport};
use super::sys::{fs_kind, fs_magic};
use super::{sys, BenchResult, Options, WorkloadDef};

/// The workload's entry in the bench.
pub const WORKLOAD: WorkloadDef = WorkloadDef { name: "file", run };

/// Bytes per read, and the block the file's pattern is made of.
const BLOCK: usize = 4096;
/// Reads in flight.
const DEPTH: usize = 32;
/// Size of the test file.
const FILE_BYTES: u64 = 256 << 20;
/// Size of the test file with `--quick`.
const QUICK_FILE_BYTES: u64 = 32 << 20;
/// Rounds per side: many short rounds, so that the VM's swings hit both sides alike.
const ROUNDS: usize = 9;
/// Rounds per side with `--quick`.
const QUICK_ROUNDS: usize = 3;
/// How long each side submits reads per round.
const WINDOW: Duration = Duration::from_secs(1);
/// The window with `--quick`.
const QUICK_WINDOW: Duration = Duration::from_millis(300);
/// The unmeasured warm-up per side, before the first round.
const WARMUP: Duration = Duration::from_millis(300);
/// The warm-up with `--quick`.
const QUICK_WARMUP: Duration = Duration::from_millis(100);
/// Longest time without a completion before a side gives up (a stall).
const STALL: Duration = Duration::from_secs(20);
/// Bytes written to the test file per `write`.
const WRITE_CHUNK: usize = 1 << 20;
/// 8-byte words per block.
const WORDS: usize = BLOCK / 8;
/// Multiplier of the block index in the pattern's words.
const KEY: u64 = 0x9e37_79b9_7f4a_7c15;
/// Block checks timed at the end to estimate the check's share of the CPU per read.
const CHECK_SAMPLES: usize = 50_000;

const _: () = assert!(BLOCK % 8 == 0 && WRITE_CHUNK % BLOCK == 0);
const _: () = assert!(FILE_BYTES % WRITE_CHUNK as u64 == 0);
const _: () = assert!(QUICK_FILE_BYTES % WRITE_CHUNK as u64 == 0);

/// Which memory a side reads into.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mem {
    /// Registered buffers, `READ_FIXED`: the side under test.
    Registered,
    /// Plain memory (the `no-fixed` rung), plain `READ`: the baseline.
    Unregistered,
}

impl Mem {
    fn label(self) -> &'static str {
        match self {
            Mem::Registered => "registered",
            Mem::Unregistered => "unregistered",
        }
    }

    /// Both sides, registered first.
    const BOTH: [Mem; 2] = [Mem::Registered, Mem::Unregistered];
}

/// One side's driver and its buffers.
struct Reader {
    mem: Mem,
    driver: Driver,
    /// The buffers not in flight; all [`DEPTH`] of them between rounds.
    free: Vec<FixedBuf>,
}

/// What one side measured in one round.
struct SideRun {
    round: usize,
    mem: Mem,
    /// Reads completed (each 4 KiB, each checked).
    reads: u64,
    /// Blocks whose bytes did not match their index.
    mismatches: u64,
    /// Index of the first mismatching block.
    first_mismatch: Option<u64>,
    /// Reads that returned fewer than [`BLOCK`] bytes.
    short_reads: u64,
    /// The calling thread's CPU time over the round.
    cpu: Duration,
    /// The whole process's CPU time over the round.
    process_cpu: Duration,
    /// From the first submission to the last completion.
    wall: Duration,
    /// Buffers in the table (registered) on this side.
    registered_bufs: usize,
    /// The driver's `io_uring_enter` calls, SQEs and CQEs over the round.
    enters: u64,
    sqes: u64,
    cqes: u64,
}

impl SideRun {
    fn verified(&self) -> bool {
        self.reads > 0 && self.mismatches == 0 && self.short_reads == 0
    }

    fn cpu_us_per_io(&self) -> f64 {
        per_io_us(self.cpu, self.reads)
    }

    fn process_cpu_us_per_io(&self) -> f64 {
        per_io_us(self.process_cpu, self.reads)
    }

    fn iops(&self) -> f64 {
        if self.reads == 0 || self.wall.is_zero() {
            f64::NAN
        } else {
            self.reads as f64 / self.wall.as_secs_f64()
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "round": self.round,
            "side": self.mem.label(),
            "reads": self.reads,
            "bytes": self.reads * BLOCK as u64,
            "wall_secs": self.wall.as_secs_f64(),
            "thread_cpu_secs": self.cpu.as_secs_f64(),
            "process_cpu_secs": self.process_cpu.as_secs_f64(),
            "cpu_us_per_io": self.cpu_us_per_io(),
            "process_cpu_us_per_io": self.process_cpu_us_per_io(),
            "iops": self.iops(),
            "mismatches": self.mismatches,
            "first_mismatch": self.first_mismatch,
            "short_reads": self.short_reads,
            "registered_bufs": self.registered_bufs,
            "enters": self.enters,
            "sqes": self.sqes,
            "cqes": self.cqes,
            "verified": self.verified(),
        })
    }
}

fn per_io_us(cpu: Duration, reads: u64) -> f64 {
    if reads == 0 {
        f64::NAN
    } else {
        cpu.as_secs_f64() * 1e6 / reads as f64
    }
}

/// Runs the workload: setup, a warm-up per side, then the rounds.
fn run(opts: &Options) -> BenchResult<WorkloadReport> {
    let (file_bytes, rounds, window, warmup) = if opts.quick {
        (QUICK_FILE_BYTES, QUICK_ROUNDS, QUICK_WINDOW, QUICK_WARMUP)
    } else {
        (FILE_BYTES, ROUNDS, WINDOW, WARMUP)
    };
    let pattern = Pattern::new();
    // Registered memory first: without it there is nothing to compare, and no file to write.
    let mut readers = Vec::new();
    for mem in Mem::BOTH {
        match Reader::new(mem)? {
            Ok(r) => readers.push(r),
            Err(reason) => return skipped(reason),
        }
    }
    let setup = match setup(file_bytes, &pattern)? {
        Ok(setup) => setup,
        Err(reason) => return skipped(reason),
    };
    let blocks = file_bytes / BLOCK as u64;
    for r in &mut readers {
        let seed = 0x5eed_0000 + r.mem as u64;
        r.run_round(&setup.fd, 0, blocks, seed, warmup, &pattern)
            .map_err(|e| format!("warm-up, {}: {e}", r.mem.label()))?;
    }

    let mut runs = Vec::new();
    let mut progress = Progress::new(WORKLOAD.name, rounds * readers.len());
    for round in 1..=rounds {
        for k in 0..2 {
            let r = &mut readers[(k + round - 1) % 2];
            let seed = (round as u64) << 8 | r.mem as u64;
            let run = r
                .run_round(&setup.fd, round, blocks, seed, window, &pattern)
                .map_err(|e| format!("round {round}, {}: {e}", r.mem.label()))?;
            print_progress(&mut progress, &run, rounds);
            runs.push(run);
        }
    }
    drop(progress);
    drop(readers);
    let check_ns = check_cost_ns(&pattern);
    Ok(summarize(&runs, rounds, &setup, check_ns))
}

/// The scratch directory and the test file, opened with `O_DIRECT`.
struct Setup {
    /// Removes the scratch directory when dropped.
    _scratch: Scratch,
    path: PathBuf,
    fs: &'static str,
    bytes: u64,
    /// Time to write and `fsync` the file.
    write_time: Duration,
    fd: Fd,
}

/// A directory removed (with its contents) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates the test file on a disk filesystem and opens it with `O_DIRECT`. `Ok(Err(reason))`
/// when the workload cannot run here (a skip, not a failure).
fn setup(bytes: u64, pattern: &Pattern) -> BenchResult<Result<Setup, String>> {
    let (dir, fs) = match disk_dir()? {
        Ok(found) => found,
        Err(tried) => {
            return Ok(Err(format!(
                "no disk filesystem for the test file (in memory, O_DIRECT would not reach a \
                 disk): {tried}"
            )))
        }
    };
    let scratch = Scratch(dir.join(format!("ringpool-bench-file-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .map_err(|e| format!("creating {}: {e}", scratch.0.display()))?;
    let path = scratch.0.join("data.bin");
    let direct = |write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .truncate(write)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
    };
    // Ask for O_DIRECT before writing hundreds of MiB the bench could not use.
    match direct(true) {
        Ok(f) => drop(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Ok(Err(format!(
                "the {fs} filesystem of {} refuses O_DIRECT (EINVAL)",
                dir.display()
            )));
        }
        Err(e) => return Err(format!("opening {} with O_DIRECT: {e}", path.display()).into()),
    }

    let start = Instant::now();
    write_file(&path, bytes, pattern).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let write_time = start.elapsed();
    let file = direct(false).map_err(|e| format!("reopening {}: {e}", path.display()))?;
    eprintln!(
        "file: {} MiB test file on {fs} at {} written and fsync'd in {:.2} s",
        bytes >> 20,
        path.display(),
        write_time.as_secs_f64()
    );
    Ok(Ok(Setup {
        _scratch: scratch,
        path,
        fs,
        bytes,
        write_time,
        fd: Fd::from(OwnedFd::from(file)),
    }))
}

/// Writes the pattern, `fsync`s, and drops the file's pages from the page cache (`O_DIRECT`
/// reads bypass it anyway; this only gives the memory back).
fn write_file(path: &Path, bytes: u64, pattern: &Pattern) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    let mut chunk = vec![0u8; WRITE_CHUNK];
    let per_chunk = (WRITE_CHUNK / BLOCK) as u64;
    for c in 0..bytes / WRITE_CHUNK as u64 {
        for (i, block) in chunk.chunks_exact_mut(BLOCK).enumerate() {
            pattern.fill(c * per_chunk + i as u64, block);
        }
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    drop_cache(&file)
}

fn drop_cache(file: &File) -> std::io::Result<()> {
    // SAFETY: posix_fadvise only takes a descriptor (valid: `file` is borrowed) and numbers.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// The first of `./target` and the system temp dir that is on a disk filesystem, with the
/// filesystem's name; else what each candidate was.
fn disk_dir() -> BenchResult<Result<(PathBuf, &'static str), String>> {
    let mut candidates = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("target"));
    }
    candidates.push(std::env::temp_dir());
    let mut tried = Vec::new();
    for dir in candidates {
        if !dir.is_dir() {
            tried.push(format!("{} is not a directory", dir.display()));
            continue;
        }
        let (name, in_memory) = fs_kind(fs_magic(&dir)?);
        if !in_memory {
            return Ok(Ok((dir, name)));
        }
        tried.push(format!("{} is on {name}", dir.display()));
    }
    Ok(Err(tried.join(", ")))
}

/// The workload's report when it could not run here: no metrics, a note with the reason. The
/// bench goes on (nothing was read, so nothing failed to verify), except under
/// `RINGPOOL_REQUIRE_ALL=1`, where a skip is an error.
fn skipped(reason: String) -> BenchResult<WorkloadReport> {
    if std::env::var("RINGPOOL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        return Err(format!("skipped ({reason}) but RINGPOOL_REQUIRE_ALL=1").into());
    }
    eprintln!("file: skipped: {reason}");
    Ok(WorkloadReport {
        name: WORKLOAD.name,
        baseline: BASELINE,
        verified: true,
        rounds: 0,
        metrics: Vec::new(),
        raw_rounds: Vec::new(),
        targets: Vec::new(),
        notes: vec![format!("skipped: {reason}")],
        details: vec![DETAILS.into()],
    })
}

/// Why the registered side cannot run, naming a forced rung (the library words that error as a
/// kernel limitation).
fn no_registered_buffers(e: &Error) -> String {
    match std::env::var("RINGPOOL_FORCE") {
        Ok(force) if !force.is_empty() => {
            format!("no registered buffers here: {e} (RINGPOOL_FORCE={force})")
        }
        _ => format!("no registered buffers here: {e}"),
    }
}

const BASELINE: &str = "the same O_DIRECT reads into unregistered memory (plain reads, as \
                        ringpool does where registered buffers are forced off); the `ringpool` \
                        column is registered buffers (fixed reads); CPU = the reading thread; \
                        no target, the ratio is reported";

/// The internal names behind [`BASELINE`]'s words.
const DETAILS: &str = "unregistered = `Force::NoFixed` (`RINGPOOL_FORCE=no-fixed`), \
                       `IORING_OP_READ`; registered = `FixedBuf::read_fixed`, \
                       `IORING_OP_READ_FIXED`; CPU = `getrusage(RUSAGE_THREAD)`";

impl Reader {
    /// A driver and [`DEPTH`] buffers for `mem`. `Ok(Err(reason))` when registered memory is
    /// unavailable here (a skip).
    fn new(mem: Mem) -> BenchResult<Result<Reader, String>> {
        let config = DriverConfig::default().entries(2 * DEPTH as u32);
        let mut driver = match mem {
            Mem::Registered => Driver::new(config)?,
            Mem::Unregistered => Driver::new(config.force(Force::NoFixed))?,
        };
        let mut free = Vec::with_capacity(DEPTH);
        for _ in 0..DEPTH {
            let buf = match mem {
                Mem::Registered => match driver.fixed_buf(BLOCK) {
                    Ok(buf) => buf,
                    Err(
                        e @ (Error::Unsupported { .. }
                        | Error::MemlockExceeded { .. }
                        | Error::FixedTableFull { .. }),
                    ) => return Ok(Err(no_registered_buffers(&e))),
                    Err(e) => return Err(e.into()),
                },
                Mem::Unregistered => driver.fixed_buf_or_plain(BLOCK)?,
            };
            if buf.is_registered() != (mem == Mem::Registered) {
                return Err(format!(
                    "the {} side got {} memory",
                    mem.label(),
                    if buf.is_registered() {
                        "registered"
                    } else {
                        "plain"
                    }
                )
                .into());
            }
            free.push(buf);
        }
        Ok(Ok(Reader { mem, driver, free }))
    }

    /// Keeps [`DEPTH`] reads at random blocks of `fd` in flight for `window`, then drains;
    /// checks every block read.
    fn run_round(
        &mut self,
        fd: &Fd,
        round: usize,
        blocks: u64,
        seed: u64,
        window: Duration,
        pattern: &Pattern,
    ) -> BenchResult<SideRun> {
        let mut rng = SplitMix64(seed);
        let mut run = self.empty_run(round);
        let mut in_flight = 0usize;
        let stats_before = self.driver.stats();
        let process_before = sys::process_cpu_time()?;
        let cpu_before = sys::thread_cpu_time()?;
        let start = Instant::now();
        let mut open = true;
        let mut last_progress = start;
        loop {
            if open {
                in_flight += self.start_reads(fd, &mut rng, blocks)?;
            }
            if in_flight == 0 {
                break;
            }
            self.driver.wait(Some(Duration::from_millis(500)))?;
            let reaped = self.reap(&mut run, pattern)?;
            in_flight -= reaped;
            let now = Instant::now();
            open = open && now - start < window;
            if reaped > 0 {
                last_progress = now;
            } else if now - last_progress > STALL {
                return Err(format!(
                    "no completion for {STALL:?}: {} reads done, {in_flight} in flight; \
                     driver: {}",
                    run.reads,
                    self.driver.debug_state()
                )
                .into());
            }
        }
        run.wall = start.elapsed();
        run.cpu = sys::thread_cpu_time()?.saturating_sub(cpu_before);
        run.process_cpu = sys::process_cpu_time()?.saturating_sub(process_before);
        let stats = self.driver.stats();
        run.enters = stats.enters - stats_before.enters;
        run.sqes = stats.sqes - stats_before.sqes;
        run.cqes = stats.cqes - stats_before.cqes;
        Ok(run)
    }

    /// A round of this side with nothing counted yet.
    fn empty_run(&self, round: usize) -> SideRun {
        SideRun {
            round,
            mem: self.mem,
            reads: 0,
            mismatches: 0,
            first_mismatch: None,
            short_reads: 0,
            cpu: Duration::ZERO,
            process_cpu: Duration::ZERO,
            wall: Duration::ZERO,
            registered_bufs: self.free.iter().filter(|b| b.is_registered()).count(),
            enters: 0,
            sqes: 0,
            cqes: 0,
        }
    }

    /// Starts a read at a random block into every free buffer; how many it started.
    #[inline]
    fn start_reads(&mut self, fd: &Fd, rng: &mut SplitMix64, blocks: u64) -> BenchResult<usize> {
        let mut started = 0;
        while let Some(buf) = self.free.pop() {
            let block = rng.next() % blocks;
            let offset = block * BLOCK as u64;
            self.driver.read_fixed(fd, buf, 0..BLOCK, offset, block)?;
            started += 1;
        }
        Ok(started)
    }

    /// Takes every completion the driver holds, checks its block and frees its buffer; how
    /// many it took.
    #[inline]
    fn reap(&mut self, run: &mut SideRun, pattern: &Pattern) -> BenchResult<usize> {
        let mut reaped = 0;
        while let Some(c) = self.driver.pop() {
            reaped += 1;
            let Event::FixedIo { buf, result } = c.event else {
                return Err(format!("unexpected completion: {:?}", c.event).into());
            };
            let block = c.token;
            let n = result.map_err(|e| format!("read of block {block} failed: {e}"))?;
            if n != BLOCK {
                run.short_reads += 1;
            } else if !pattern.check(block, &buf) {
                run.mismatches += 1;
                run.first_mismatch.get_or_insert(block);
            }
            run.reads += 1;
            self.free.push(buf);
        }
        Ok(reaped)
    }
}

/// The deterministic PRNG of the offsets (splitmix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The file's content: block `i` holds `i` in its first word and `i * KEY ^ salt[j]` in word
/// `j` (little-endian), with fixed pseudo-random salts.
struct Pattern {
    salts: Box<[u64; WORDS]>,
}

impl Pattern {
    fn new() -> Pattern {
        let mut rng = SplitMix64(0x0f11_e0f1_1e0f_11e0);
        let mut salts = Box::new([0u64; WORDS]);
        for s in salts.iter_mut() {
            *s = rng.next();
        }
        Pattern { salts }
    }

    /// Writes block `index` into `out` ([`BLOCK`] bytes).
    fn fill(&self, index: u64, out: &mut [u8]) {
        let key = index.wrapping_mul(KEY);
        for (w, salt) in out.chunks_exact_mut(8).zip(self.salts.iter()) {
            w.copy_from_slice(&(key ^ salt).to_le_bytes());
        }
        out[..8].copy_from_slice(&index.to_le_bytes());
    }

    /// Whether `data` is block `index`.
    fn check(&self, index: u64, data: &[u8]) -> bool {
        if data.len() != BLOCK || data[..8] != index.to_le_bytes() {
            return false;
        }
        let key = index.wrapping_mul(KEY);
        let diff = data[8..]
            .chunks_exact(8)
            .zip(&self.salts[1..])
            .fold(0u64, |acc, (w, salt)| {
                let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                acc | (w ^ salt ^ key)
            });
        diff == 0
    }
}

/// Thread CPU nanoseconds of one [`Pattern::check`] on cache-cold-ish blocks (a buffer of
/// [`DEPTH`] blocks, as the rounds use), to say how much of the CPU per read is the check.
fn check_cost_ns(pattern: &Pattern) -> f64 {
    let mut blocks = vec![0u8; DEPTH * BLOCK];
    for (i, b) in blocks.chunks_exact_mut(BLOCK).enumerate() {
        pattern.fill(i as u64, b);
    }
    let Ok(before) = sys::thread_cpu_time() else {
        return f64::NAN;
    };
    let mut ok = 0usize;
    for k in 0..CHECK_SAMPLES {
        let i = k % DEPTH;
        let b = &blocks[i * BLOCK..(i + 1) * BLOCK];
        ok += usize::from(pattern.check(std::hint::black_box(i as u64), std::hint::black_box(b)));
    }
    let Ok(after) = sys::thread_cpu_time() else {
        return f64::NAN;
    };
    assert_eq!(ok, CHECK_SAMPLES, "the pattern checks itself");
    (after - before).as_secs_f64() * 1e9 / CHECK_SAMPLES as f64
}

fn print_progress(progress: &mut Progress, r: &SideRun, rounds: usize) {
    progress.step(format_args!(
        "file round {}/{rounds} {:<12}: {} reads, {:.0} IOPS, CPU {:.2} µs/read (process {:.2}), \
         {:.2} enters/read, verified {}",
        r.round,
        r.mem.label(),
        r.reads,
        r.iops(),
        r.cpu_us_per_io(),
        r.process_cpu_us_per_io(),
        r.enters as f64 / r.reads.max(1) as f64,
        if r.verified() { "yes" } else { "no" },
    ));
}

/// The median over the rounds of `f` on side `mem`.
fn median_of(runs: &[SideRun], mem: Mem, f: impl Fn(&SideRun) -> f64) -> f64 {
    let values: Vec<f64> = runs.iter().filter(|r| r.mem == mem).map(f).collect();
    median(&values)
}

/// Per round, `f` of the registered side over `f` of the unregistered side.
fn paired_ratios(runs: &[SideRun], f: impl Fn(&SideRun) -> f64) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.mem == Mem::Registered)
        .filter_map(|r| {
            let base = runs
                .iter()
                .find(|b| b.round == r.round && b.mem == Mem::Unregistered)?;
            Some(f(r) / f(base))
        })
        .collect()
}

/// "median (min..max)" of per-round ratios.
fn describe_ratios(ratios: &[f64]) -> String {
    let (lo, hi) = ratios
        .iter()
        .fold((f64::NAN, f64::NAN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{:.3}x ({lo:.3}..{hi:.3})", median(ratios))
}

fn summarize(runs: &[SideRun], rounds: usize, setup: &Setup, check_ns: f64) -> WorkloadReport {
    let mut notes = setup_notes(runs, setup, check_ns);
    for r in runs {
        round_notes(&mut notes, r);
    }
    WorkloadReport {
        name: WORKLOAD.name,
        baseline: BASELINE,
        verified: !runs.is_empty() && runs.iter().all(SideRun::verified),
        rounds,
        metrics: metrics(runs),
        raw_rounds: runs.iter().map(SideRun::to_json).collect(),
        targets: Vec::new(),
        notes,
        details: vec![DETAILS.into()],
    }
}

/// CPU per read (thread and process) and IOPS, registered against unregistered.
fn metrics(runs: &[SideRun]) -> Vec<Metric> {
    let metric = |key, label, unit, f: fn(&SideRun) -> f64| Metric {
        key,
        label,
        unit,
        ringpool: median_of(runs, Mem::Registered, f),
        baseline: median_of(runs, Mem::Unregistered, f),
    };
    vec![
        metric(
            "cpu_us_per_io",
            "CPU per 4 KiB read (thread)",
            Unit::Micros,
            SideRun::cpu_us_per_io,
        ),
        metric(
            "process_cpu_us_per_io",
            "CPU per 4 KiB read (process)",
            Unit::Micros,
            SideRun::process_cpu_us_per_io,
        ),
        metric("iops", "IOPS (4 KiB, QD 32)", Unit::Count, SideRun::iops),
    ]
}

/// The test file, the per-round ratios and the cost of checking a block.
fn setup_notes(runs: &[SideRun], setup: &Setup, check_ns: f64) -> Vec<String> {
    vec![
        format!(
            "test file: {} MiB on {} ({}), written and fsync'd in {:.2} s, read with O_DIRECT \
             (page cache bypassed: every read reaches the virtual disk)",
            setup.bytes >> 20,
            setup.fs,
            setup.path.display(),
            setup.write_time.as_secs_f64()
        ),
        format!(
            "per round, registered / unregistered of the rounds run back to back (median, \
             range): CPU per read {}, IOPS {}",
            describe_ratios(&paired_ratios(runs, SideRun::cpu_us_per_io)),
            describe_ratios(&paired_ratios(runs, SideRun::iops)),
        ),
        format!(
            "checking a block costs about {:.0} ns of CPU (measured on cached blocks), in both \
             sides' CPU per read",
            check_ns
        ),
    ]
}

/// Anything abnormal in one round: bad or short blocks, CPU spent outside the reading thread.
fn round_notes(notes: &mut Vec<String>, r: &SideRun) {
    let what = format!("round {} {}", r.round, r.mem.label());
    if r.mismatches > 0 || r.short_reads > 0 {
        notes.push(format!(
            "{what}: {} blocks did not match (first: block {:?}), {} short reads",
            r.mismatches, r.first_mismatch, r.short_reads
        ));
    }
    let other = r.process_cpu.saturating_sub(r.cpu);
    if other > r.cpu / 20 && other > Duration::from_millis(10) {
        notes.push(format!(
            "{what}: {:.3} s of process CPU outside the reading thread (thread {:.3} s)",
            other.as_secs_f64(),
            r.cpu.as_secs_f64()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_checks_only_as_itself() {
        let p = Pattern::new();
        let mut a = vec![0u8; BLOCK];
        p.fill(7, &mut a);
        assert!(p.check(7, &a));
        assert!(!p.check(8, &a), "another index");
        let mut b = vec![0u8; BLOCK];
        p.fill(8, &mut b);
        b[..8].copy_from_slice(&7u64.to_le_bytes());
        assert!(!p.check(7, &b), "right header, wrong body");
        a[BLOCK - 1] ^= 1;
        assert!(!p.check(7, &a), "a flipped bit");
        assert!(!p.check(0, &[0u8; BLOCK]), "zeros are not block 0");
        assert!(!p.check(7, &b[..BLOCK / 2]), "a short read");
    }

    #[test]
    fn memory_filesystems_are_refused() {
        assert!(fs_kind(0x0102_1994).1);
        assert!(fs_kind(0x8584_58f6).1);
        assert_eq!(fs_kind(0xef53), ("ext2/3/4", false));
        assert!(!fs_kind(fs_magic(&std::env::temp_dir()).unwrap())
            .0
            .is_empty());
    }

    #[test]
    fn offsets_are_deterministic_and_spread() {
        let draw = |seed| {
            let mut r = SplitMix64(seed);
            (0..1000).map(|_| r.next() % 64).collect::<Vec<u64>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        let mut seen = draw(1);
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 64, "every block is drawn");
    }
}
