//! Workloads `idle-heavy` and `echo`, one machinery for both ([`Shape`]):
//! - `idle-heavy`: 10,000 connections of which 100 are busy with 512-byte request/response
//!   exchanges and 9,900 sit idle. The target: ringpool holds at most 5% of the baseline's
//!   buffer bytes at 1.0x or more of its requests/s (and issue 19's CPU per request).
//! - `echo`: 32 connections, every one busy with 64-byte ping-pong (issue 19's "echo, 32
//!   connections" row): server CPU per request against tokio's.
//!
//! ringpool's side is `ringpool echo` (one shared group of 4 KiB buffers: 512 for idle-heavy,
//! 64 for echo); the baseline is `ringpool tokio-echo` (a 16 KiB buffer per connection).

use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::progress::Progress;
use super::report::{median, Bound, Metric, Target, Unit, WorkloadReport, FOUNDATION, PERFORMANCE};
use super::server::Server;
use super::{load, sys, BenchResult, Options, Side, WorkloadDef};

/// The `idle-heavy` workload's entry in the bench.
pub const WORKLOAD: WorkloadDef = WorkloadDef {
    name: IDLE_HEAVY.name,
    run: |opts| run(opts, &IDLE_HEAVY),
};

/// The `echo` workload's entry in the bench.
pub const ECHO_WORKLOAD: WorkloadDef = WorkloadDef {
    name: ECHO.name,
    run: |opts| run(opts, &ECHO),
};

/// The connections of one workload of this module.
pub struct Shape {
    name: &'static str,
    /// Connections opened.
    total: usize,
    /// Of them, busy with request/response exchanges (the others sit idle).
    busy: usize,
    /// Bytes per request (and response), at most [`MAX_MSG_LEN`].
    msg_len: usize,
    /// Buffers of `ringpool echo`'s shared group (of 4 KiB).
    ringpool_bufs: u32,
}

const IDLE_HEAVY: Shape = Shape {
    name: "idle-heavy",
    total: 10_000,
    busy: 100,
    msg_len: 512,
    ringpool_bufs: 512,
};

const ECHO: Shape = Shape {
    name: "echo",
    total: 32,
    busy: 32,
    msg_len: 64,
    // Two buffers per connection: half of tokio's 32 x 16 KiB.
    ringpool_bufs: 64,
};

const MAX_MSG_LEN: usize = 512;
const _: () = assert!(IDLE_HEAVY.msg_len <= MAX_MSG_LEN && ECHO.msg_len <= MAX_MSG_LEN);
const IDLE_PROBE_LEN: usize = 16;
const RINGPOOL_BUF_SIZE: usize = 4096;
const BASELINE_BUF_SIZE: usize = 16 * 1024;
/// Longest time one request/response may take before it counts as a failure (a stall).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections checked at once at the end of a round.
const IDLE_CHECK_CONCURRENCY: usize = 256;
/// Bound on the whole idle check.
const IDLE_CHECK_TIME: Duration = Duration::from_secs(20);

/// What one round of one side measured.
struct Round {
    shape: &'static Shape,
    side: Side,
    /// Every byte this process got echoed back in the round (warm-up, window, idle check).
    client_bytes: u64,
    connect_time: Duration,
    slow_connects: usize,
    window: Duration,
    requests: u64,
    cpu_ticks: u64,
    rss_bytes: u64,
    busy: BusyTotals,
    idle: IdleCheck,
    stats: Option<serde_json::Value>,
    killed: bool,
    exit: std::process::ExitStatus,
}

/// Outcome of the busy connections' exchanges.
#[derive(Default)]
struct BusyTotals {
    requests: u64,
    /// Bytes sent and echoed back, matching or not.
    bytes: u64,
    mismatches: u64,
    errors: u64,
}

/// Outcome of the final check of the idle connections.
#[derive(Default)]
struct IdleCheck {
    ok: u64,
    failed: u64,
}

impl Round {
    fn buffer_bytes(&self) -> Option<f64> {
        self.stat("buffer_bytes")
    }

    fn stat(&self, key: &str) -> Option<f64> {
        self.stats.as_ref()?.get(key)?.as_f64()
    }

    fn verified(&self) -> bool {
        self.busy.mismatches == 0
            && self.busy.errors == 0
            && self.idle.failed == 0
            && self.idle.ok == (self.shape.total - self.shape.busy) as u64
            && self.requests > 0
            && self.stats.is_some()
    }

    fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }

    fn cpu_us_per_request(&self, hz: u64) -> f64 {
        self.cpu_ticks as f64 * 1e6 / hz as f64 / self.requests.max(1) as f64
    }

    fn to_json(&self, hz: u64) -> serde_json::Value {
        serde_json::json!({
            "side": self.side.label(),
            "connect_secs": self.connect_time.as_secs_f64(),
            "slow_connects": self.slow_connects,
            "window_secs": self.window.as_secs_f64(),
            "requests": self.requests,
            "client_bytes": self.client_bytes,
            "requests_per_sec": self.requests_per_sec(),
            "cpu_ticks": self.cpu_ticks,
            "cpu_us_per_request": self.cpu_us_per_request(hz),
            "rss_bytes": self.rss_bytes,
            "mismatches": self.busy.mismatches,
            "errors": self.busy.errors,
            "idle_ok": self.idle.ok,
            "idle_failed": self.idle.failed,
            "killed": self.killed,
            "exit": self.exit.to_string(),
            "verified": self.verified(),
            "server_stats": self.stats,
        })
    }
}

/// Runs every round of `shape`, alternating the sides, and summarizes them.
fn run(opts: &Options, shape: &'static Shape) -> BenchResult<WorkloadReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hz = sys::clock_ticks_per_sec();
    let mut rounds = Vec::new();
    let mut progress = Progress::new(shape.name, opts.rounds * Side::BOTH.len());
    for i in 1..=opts.rounds {
        for side in Side::BOTH {
            let r = run_round(&rt, shape, side, opts.window)
                .map_err(|e| format!("round {i} ({}): {e}", side.label()))?;
            print_progress(&mut progress, &r, i, opts.rounds, hz);
            rounds.push(r);
        }
    }
    Ok(summarize(shape, &rounds, opts.rounds, hz))
}

/// Extra arguments for ringpool's echo server (e.g. `--rt` to measure the async layer's echo
/// against the event-loop one), for experiments; the report notes when it was set.
const EXTRA_ARGS_VAR: &str = "RINGPOOL_BENCH_ECHO_ARGS";

fn server_args(shape: &Shape, side: Side) -> Vec<String> {
    let bufs = shape.ringpool_bufs;
    let extra = std::env::var(EXTRA_ARGS_VAR).unwrap_or_default();
    let args = match side {
        Side::Ringpool => format!(
            "echo --listen 127.0.0.1:0 --buf-size {RINGPOOL_BUF_SIZE} --bufs {bufs} {extra}"
        ),
        Side::Baseline => {
            format!("tokio-echo --listen 127.0.0.1:0 --buf-size {BASELINE_BUF_SIZE}")
        }
    };
    args.split_whitespace().map(str::to_owned).collect()
}

/// One round: start the server, connect everything, measure the busy window, check the
/// idle connections, stop the server.
fn run_round(
    rt: &tokio::runtime::Runtime,
    shape: &'static Shape,
    side: Side,
    window: Duration,
) -> BenchResult<Round> {
    let server = Server::spawn(side.label(), &server_args(shape, side))?;
    let pid = server.pid();
    let conns = load::connect_all(server.addr(), shape.total)?;
    let _runtime = rt.enter();
    let mut busy = conns
        .streams
        .into_iter()
        .map(load::into_tokio)
        .collect::<std::io::Result<Vec<_>>>()?;
    let idle = busy.split_off(shape.busy);
    let measured = rt.block_on(measure(busy, shape.msg_len, pid, window))?;
    let (idle, idle_check) = rt.block_on(check_idle(idle, shape.busy));
    let stopped = server.stop()?;
    // Close our ends only after the server stopped, so it served every connection to the end.
    drop(measured.streams);
    drop(idle);
    Ok(Round {
        shape,
        side,
        client_bytes: measured.warmup_bytes
            + measured.busy.bytes
            + idle_check.ok * IDLE_PROBE_LEN as u64,
        connect_time: conns.elapsed,
        slow_connects: conns.slow,
        window: measured.elapsed,
        requests: measured.busy.requests,
        cpu_ticks: measured.cpu_ticks,
        rss_bytes: measured.rss_bytes,
        busy: measured.busy,
        idle: idle_check,
        stats: stopped.stats,
        killed: stopped.killed,
        exit: stopped.status,
    })
}

/// What the measurement window saw.
struct Measured {
    streams: Vec<TcpStream>,
    /// Bytes echoed by the warm-up exchanges, before the window.
    warmup_bytes: u64,
    elapsed: Duration,
    busy: BusyTotals,
    cpu_ticks: u64,
    rss_bytes: u64,
}

/// Warms up each busy connection with one exchange, then runs all of them for `window`,
/// reading the server's CPU time around the window and its RSS at the end.
async fn measure(
    mut busy: Vec<TcpStream>,
    msg_len: usize,
    pid: u32,
    window: Duration,
) -> BenchResult<Measured> {
    let mut totals = BusyTotals::default();
    for (id, s) in busy.iter_mut().enumerate() {
        exchange(s, id as u32, 0, msg_len, &mut totals).await;
    }
    if totals.errors > 0 {
        return Err(format!("{} busy connection(s) failed the warm-up", totals.errors).into());
    }
    let warmup_bytes = totals.bytes;
    let totals = BusyTotals {
        mismatches: totals.mismatches,
        ..BusyTotals::default()
    };
    let cpu_before = sys::cpu_ticks(pid)?;
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = busy
        .into_iter()
        .enumerate()
        .map(|(id, s)| tokio::spawn(busy_loop(s, id as u32, msg_len, deadline)))
        .collect();
    let mut streams = Vec::with_capacity(tasks.len());
    let mut totals = totals;
    for task in tasks {
        let (s, t) = task.await?;
        streams.push(s);
        totals.requests += t.requests;
        totals.bytes += t.bytes;
        totals.mismatches += t.mismatches;
        totals.errors += t.errors;
    }
    let elapsed = start.elapsed();
    let cpu_ticks = sys::cpu_ticks(pid)?.saturating_sub(cpu_before);
    let rss_bytes = sys::rss_bytes(pid)?;
    Ok(Measured {
        streams,
        warmup_bytes,
        elapsed,
        busy: totals,
        cpu_ticks,
        rss_bytes,
    })
}

/// Request/response on one busy connection until `deadline`; stops at the first failure.
async fn busy_loop(
    mut s: TcpStream,
    id: u32,
    msg_len: usize,
    deadline: Instant,
) -> (TcpStream, BusyTotals) {
    let mut totals = BusyTotals::default();
    let mut seq = 1;
    while Instant::now() < deadline && totals.errors == 0 {
        exchange(&mut s, id, seq, msg_len, &mut totals).await;
        seq += 1;
    }
    (s, totals)
}

/// One verified exchange of `len` bytes, counted into `totals`.
async fn exchange(s: &mut TcpStream, id: u32, seq: u64, len: usize, totals: &mut BusyTotals) {
    let mut out = [0u8; MAX_MSG_LEN];
    let mut back = [0u8; MAX_MSG_LEN];
    let (out, back) = (&mut out[..len], &mut back[..len]);
    load::fill_message(id, seq, out);
    match tokio::time::timeout(REQUEST_TIMEOUT, load::round_trip(s, out, back)).await {
        Ok(Ok(matched)) => {
            totals.requests += 1;
            totals.bytes += len as u64;
            totals.mismatches += u64::from(!matched);
        }
        Ok(Err(_)) | Err(_) => totals.errors += 1,
    }
}

/// Checks that every idle connection is still open and echoing: one small verified exchange
/// each, a bounded number at a time, within [`IDLE_CHECK_TIME`] overall.
async fn check_idle(idle: Vec<TcpStream>, first_id: usize) -> (Vec<TcpStream>, IdleCheck) {
    let deadline = tokio::time::Instant::now() + IDLE_CHECK_TIME;
    let mut check = IdleCheck::default();
    let mut kept = Vec::with_capacity(idle.len());
    let mut set = JoinSet::new();
    for (i, s) in idle.into_iter().enumerate() {
        if set.len() >= IDLE_CHECK_CONCURRENCY {
            collect_probe(set.join_next().await, &mut kept, &mut check);
        }
        let id = (first_id + i) as u32;
        set.spawn(async move {
            let mut s = s;
            let mut totals = BusyTotals::default();
            let probe = exchange(&mut s, id, 0, IDLE_PROBE_LEN, &mut totals);
            let ok = tokio::time::timeout_at(deadline, probe).await.is_ok()
                && totals.requests == 1
                && totals.mismatches == 0;
            (s, ok)
        });
    }
    while let Some(done) = set.join_next().await {
        collect_probe(Some(done), &mut kept, &mut check);
    }
    (kept, check)
}

type ProbeResult = Option<Result<(TcpStream, bool), tokio::task::JoinError>>;

fn collect_probe(done: ProbeResult, kept: &mut Vec<TcpStream>, check: &mut IdleCheck) {
    match done {
        Some(Ok((s, ok))) => {
            if ok {
                check.ok += 1;
            } else {
                check.failed += 1;
            }
            kept.push(s);
        }
        Some(Err(_)) => check.failed += 1,
        None => {}
    }
}

fn print_progress(progress: &mut Progress, r: &Round, i: usize, rounds: usize, hz: u64) {
    progress.step(format_args!(
        "{} round {i}/{rounds} {:<8}: {} conns in {:.2} s ({} slow), {} req in {:.2} s \
         ({:.0} req/s), server CPU {:.2} µs/req, RSS {:.1} MiB, idle {}/{} ok, verified {}{}",
        r.shape.name,
        r.side.label(),
        r.shape.total,
        r.connect_time.as_secs_f64(),
        r.slow_connects,
        r.requests,
        r.window.as_secs_f64(),
        r.requests_per_sec(),
        r.cpu_us_per_request(hz),
        r.rss_bytes as f64 / (1024.0 * 1024.0),
        r.idle.ok,
        r.shape.total - r.shape.busy,
        if r.verified() { "yes" } else { "no" },
        if r.killed { " (server killed)" } else { "" },
    ));
}

/// Issue 19's bound on CPU per request, for both shapes; with idle connections also issue 2's
/// (buffer bytes, requests/s): what a shared group is for.
fn targets(shape: &Shape, metrics: &[Metric]) -> Vec<Target> {
    let mut targets = Vec::new();
    if shape.busy < shape.total {
        targets.push(
            Target::on(metrics, "buffer_bytes", Bound::AtMost(0.05), FOUNDATION)
                .named("buffer bytes, vs tokio"),
        );
        targets.push(
            Target::on(metrics, "requests_per_sec", Bound::AtLeast(1.0), FOUNDATION)
                .named("requests/s, vs tokio"),
        );
    }
    targets.push(
        Target::on(
            metrics,
            "cpu_us_per_request",
            Bound::AtMost(0.75),
            PERFORMANCE,
        )
        .named("server CPU/request, vs tokio"),
    );
    targets
}

/// Medians per side of every metric.
fn summarize(shape: &Shape, rounds: &[Round], per_side: usize, hz: u64) -> WorkloadReport {
    let side_median = |side: Side, f: &dyn Fn(&Round) -> f64| {
        let values: Vec<f64> = rounds.iter().filter(|r| r.side == side).map(f).collect();
        median(&values)
    };
    let metric = |key, label, unit, f: &dyn Fn(&Round) -> f64| Metric {
        key,
        label,
        unit,
        ringpool: side_median(Side::Ringpool, f),
        baseline: side_median(Side::Baseline, f),
    };
    let metrics = vec![
        metric("buffer_bytes", "buffer bytes", Unit::Bytes, &|r| {
            r.buffer_bytes().unwrap_or(f64::NAN)
        }),
        metric("requests_per_sec", "requests/s", Unit::Count, &|r| {
            r.requests_per_sec()
        }),
        metric(
            "cpu_us_per_request",
            "server CPU/request",
            Unit::Micros,
            &|r| r.cpu_us_per_request(hz),
        ),
        metric("rss_bytes", "server RSS", Unit::Bytes, &|r| {
            r.rss_bytes as f64
        }),
        metric("requests", "requests (window)", Unit::Count, &|r| {
            r.requests as f64
        }),
        metric("connections", "connections served", Unit::Count, &|r| {
            r.stat("connections").unwrap_or(f64::NAN)
        }),
    ];
    WorkloadReport {
        name: shape.name,
        baseline: "tokio current_thread echo, 16 KiB buffer per connection",
        verified: rounds.iter().all(Round::verified),
        rounds: per_side,
        targets: targets(shape, &metrics),
        metrics,
        raw_rounds: rounds.iter().map(|r| r.to_json(hz)).collect(),
        notes: notes(rounds),
        details: vec![
            "buffer bytes = what the servers report holding for receives: ringpool's buffer \
             group, tokio's per-connection buffers; CPU = the server process's user + system \
             time (`/proc/PID/stat`)"
                .into(),
        ],
    }
}

/// Anything abnormal in the rounds, in words.
fn notes(rounds: &[Round]) -> Vec<String> {
    let mut notes = Vec::new();
    if let Ok(extra) = std::env::var(EXTRA_ARGS_VAR) {
        notes.push(format!(
            "ringpool echo ran with extra arguments ({EXTRA_ARGS_VAR}): {extra}"
        ));
    }
    for r in rounds {
        server_notes(&mut notes, r);
        traffic_notes(&mut notes, r);
    }
    notes
}

/// How one round's server ended, and whether it printed its statistics.
fn server_notes(notes: &mut Vec<String>, r: &Round) {
    let side = r.side.label();
    if r.killed {
        notes.push(format!("{side} server ignored SIGTERM and was killed"));
    }
    if !r.killed && !r.exit.success() {
        notes.push(format!("{side} server exited with {}", r.exit));
    }
    if r.stats.is_none() {
        notes.push(format!("{side} server printed no `stats` line"));
    }
}

/// One round's bad replies, disagreeing byte counts and failed idle connections.
fn traffic_notes(notes: &mut Vec<String>, r: &Round) {
    let side = r.side.label();
    if r.busy.mismatches > 0 || r.busy.errors > 0 {
        notes.push(format!(
            "{side}: {} mismatched replies, {} failed/timed-out exchanges on busy connections",
            r.busy.mismatches, r.busy.errors
        ));
    }
    if let Some(server) = r.stat("bytes_echoed") {
        if server != r.client_bytes as f64 {
            notes.push(format!(
                "{side} server counted {server} bytes echoed, the client {}",
                r.client_bytes
            ));
        }
    }
    if r.idle.failed > 0 {
        notes.push(format!(
            "{side}: {} idle connections failed the final check",
            r.idle.failed
        ));
    }
}
