//! The async machine: TCP streams through `ringpool::rt`, over several runtimes in a row
//! (`RtEpoch` ends one `rt::block_on` and starts the next), with receive futures and receive
//! streams started, polled for a while, and dropped at any point: in their runtime, in a later
//! one, or between runtimes.
//!
//! Checked after every step: every chain received holds the next bytes its peer sent (none
//! lost, none twice, in order, also across dropped receives), no receive ends `Cancelled` or
//! panics, every held chain keeps its bytes; at the end every stream drains to its peer's last
//! byte, the peer reads exactly what was sent, the last runtime's group is full again, no op
//! was leaked and no descriptor is left.

use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream as StdTcp;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ringpool::rt::{self, RecvStream, TcpStream};
use ringpool::{BufChain, BufGroup, BufGroupConfig, Error, Fd};

use super::core::Rung;
use super::gen::{Failure, Machine, Outcome, Rng};
use crate::common::pattern_vec;

/// Everything a regression test needs in scope.
#[allow(unused_imports)]
pub mod prelude {
    pub use super::RtAction::*;
    pub use super::{rt_replay, RtAvoid, RtHeader};
}

#[derive(Debug, Clone)]
pub struct RtHeader {
    pub rung: Rung,
    pub incremental: bool,
    pub count: u32,
    pub avoid: RtAvoid,
}

/// Known defects the generated cases steer around (see `core::Avoid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtAvoid {
    /// Defect 3: an op dropped in another runtime than its own (such drops are skipped).
    pub foreign_runtime_drop: bool,
    /// Defect 4 (found by this checker): a receive that outlives its runtime loses what its
    /// op had received. Avoided by dropping what a runtime started before it ends.
    pub outliving_receive: bool,
    /// Defect 5 (found by this checker): a receive dropped shortly before its runtime ends
    /// leaves its stream waiting forever in the next runtime. Avoided by letting each runtime
    /// run on a little after the last drop.
    pub orphan_at_runtime_end: bool,
}

impl RtAvoid {
    pub const NOTHING: RtAvoid = RtAvoid {
        foreign_runtime_drop: false,
        outliving_receive: false,
        orphan_at_runtime_end: false,
    };
}

/// What the cases saw, for the summary.
pub mod seen {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    pub static DATA: AtomicU64 = AtomicU64::new(0);
    pub static EOF: AtomicU64 = AtomicU64::new(0);
    pub static READS: AtomicU64 = AtomicU64::new(0);
    pub static EPOCHS: AtomicU64 = AtomicU64::new(0);
    pub static DROPPED_LIVE: AtomicU64 = AtomicU64::new(0);
    pub static DROPPED_FOREIGN: AtomicU64 = AtomicU64::new(0);
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
    pub fn summary() -> String {
        let g = |c: &AtomicU64| c.load(Relaxed);
        format!(
            "chains {}, eof {}, copying reads {}, runtimes ended {}, receives dropped in their \
             runtime {}, elsewhere {}",
            g(&DATA),
            g(&EOF),
            g(&READS),
            g(&EPOCHS),
            g(&DROPPED_LIVE),
            g(&DROPPED_FOREIGN)
        )
    }
}

/// What generated cases avoid (set by the test).
pub static RT_AVOID: Mutex<RtAvoid> = Mutex::new(RtAvoid::NOTHING);

/// The `Rt` prefix lets regression tests glob-import both machines' actions side by side.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtAction {
    RtNewTcp,
    RtPeerWrite {
        s: usize,
        len: usize,
    },
    RtPeerShutdown {
        s: usize,
    },
    RtPeerRead {
        s: usize,
    },
    /// Starts `recv` (`one`: `recv_one`) unless one is pending, and polls it for up to `ms`.
    RtRecv {
        s: usize,
        one: bool,
        ms: u64,
        keep: bool,
    },
    /// Drops the pending receive future (of any runtime).
    RtDropRecv {
        s: usize,
    },
    /// Starts a `recv_stream` unless one exists.
    RtStream {
        s: usize,
    },
    /// Polls the stream's `next` for up to `ms`.
    RtNext {
        s: usize,
        ms: u64,
        keep: bool,
    },
    /// Reads through the copying `Reader` (`futures::AsyncRead`) for up to `ms`, then drops it.
    RtReadCopy {
        s: usize,
        ms: u64,
    },
    /// Drops the receive stream (of any runtime).
    RtDropStream {
        s: usize,
    },
    RtSend {
        s: usize,
        len: usize,
        zc: bool,
    },
    RtDropHeld {
        h: usize,
    },
    /// Ends this runtime and starts the next; `drop_between`: the stream whose receive future
    /// and stream are dropped in between, outside any runtime.
    RtEpoch {
        drop_between: Option<usize>,
    },
}

use RtAction::*;

type RecvFut = Pin<Box<dyn Future<Output = ringpool::Result<Option<BufChain>>>>>;

struct RtStreamM {
    seed: u64,
    peer: Option<StdTcp>,
    stream: Rc<TcpStream>,
    sent_in: u64,
    recv_in: u64,
    eof: bool,
    shut: bool,
    /// The receive future in flight and the runtime (epoch) that started it.
    pending: Option<(RecvFut, usize)>,
    rx: Option<(RecvStream, usize)>,
    out_expected: Vec<u8>,
    out_got: usize,
    out_pos: u64,
}

struct Held {
    chain: BufChain,
    snapshot: Vec<u8>,
    what: String,
}

struct State {
    header: RtHeader,
    streams: Vec<RtStreamM>,
    held: Vec<Held>,
    epoch: usize,
    group: Option<BufGroup>,
    step: usize,
}

fn fail(tag: &'static str, detail: impl Into<String>) -> Outcome {
    Err(Failure::new(tag, detail))
}

/// Counts a drop of something a runtime (`of`) started, in runtime `now`.
fn count_drop(of: Option<usize>, now: usize) {
    match of {
        Some(e) if e == now => seen::bump(&seen::DROPPED_LIVE),
        Some(_) => seen::bump(&seen::DROPPED_FOREIGN),
        None => {}
    }
}

impl State {
    fn stream(&self, s: usize) -> Option<usize> {
        (!self.streams.is_empty()).then(|| s % self.streams.len())
    }

    fn group(&self) -> BufGroup {
        self.group.clone().expect("each runtime has its group")
    }

    /// Checks that `got` are the next bytes of stream `i`.
    fn got_bytes(&mut self, i: usize, got: &[u8]) -> Outcome {
        let st = &mut self.streams[i];
        let want = pattern_vec(st.seed, st.recv_in, got.len());
        if st.eof {
            return fail("data after eof", format!("stream {i}: data after its end"));
        }
        if got.is_empty() || got != want || st.recv_in + got.len() as u64 > st.sent_in {
            return fail(
                "wrong bytes received",
                format!(
                    "stream {i}: {} bytes received at {} (peer sent {}): not the next \
                     bytes the peer sent (lost, duplicated, reordered or stale)",
                    got.len(),
                    st.recv_in,
                    st.sent_in
                ),
            );
        }
        st.recv_in += got.len() as u64;
        seen::bump(&seen::DATA);
        Ok(())
    }

    fn got(&mut self, i: usize, r: ringpool::Result<Option<BufChain>>, keep: bool) -> Outcome {
        match r {
            Ok(Some(chain)) => {
                let got = chain.to_vec();
                self.got_bytes(i, &got)?;
                if keep {
                    self.held.push(Held {
                        chain,
                        snapshot: got,
                        what: format!("chain of stream {i} (step {})", self.step),
                    });
                }
                Ok(())
            }
            Ok(None) => {
                let st = &mut self.streams[i];
                if !st.shut || st.recv_in != st.sent_in {
                    return fail(
                        "early eof",
                        format!(
                            "stream {i}: end of stream after {} of {} bytes (peer shut: {})",
                            st.recv_in, st.sent_in, st.shut
                        ),
                    );
                }
                st.eof = true;
                seen::bump(&seen::EOF);
                Ok(())
            }
            Err(Error::Cancelled) => fail(
                "cancelled but never cancelled",
                format!("stream {i}: a receive ended Cancelled, but nobody cancelled it"),
            ),
            Err(e) => fail("unexpected error", format!("stream {i}: receive: {e}")),
        }
    }

    fn peer_read(&mut self, i: usize) -> Outcome {
        let st = &mut self.streams[i];
        let Some(p) = st.peer.as_mut() else {
            return Ok(());
        };
        let mut buf = vec![0u8; 65536];
        for _ in 0..1000 {
            match p.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if st.out_expected.get(st.out_got..st.out_got + n) != Some(&buf[..n]) {
                        return fail(
                            "peer got wrong bytes",
                            format!("stream {i}: the peer read {n} bytes at {}", st.out_got),
                        );
                    }
                    st.out_got += n;
                }
            }
        }
        Ok(())
    }

    /// One action, inside the current runtime.
    async fn act(&mut self, a: &RtAction) -> Outcome {
        let avoid = self.header.avoid.foreign_runtime_drop;
        match *a {
            RtNewTcp => {
                let (ours, peer) = crate::common::tcp_pair();
                peer.set_nonblocking(true).unwrap();
                let seed = 1 + 2 * self.streams.len() as u64;
                self.streams.push(RtStreamM {
                    seed,
                    peer: Some(peer),
                    stream: Rc::new(TcpStream::from_fd(Fd::from(ours))),
                    sent_in: 0,
                    recv_in: 0,
                    eof: false,
                    shut: false,
                    pending: None,
                    rx: None,
                    out_expected: Vec::new(),
                    out_got: 0,
                    out_pos: 0,
                });
            }
            RtPeerWrite { s, len } => {
                let Some(i) = self.stream(s) else {
                    return Ok(());
                };
                let st = &mut self.streams[i];
                if let (Some(p), false) = (st.peer.as_mut(), st.shut) {
                    let n = p.write(&pattern_vec(st.seed, st.sent_in, len)).unwrap_or(0);
                    st.sent_in += n as u64;
                }
            }
            RtPeerShutdown { s } => {
                let Some(i) = self.stream(s) else {
                    return Ok(());
                };
                let st = &mut self.streams[i];
                if let Some(p) = &st.peer {
                    let _ = p.shutdown(std::net::Shutdown::Write);
                    st.shut = true;
                }
            }
            RtPeerRead { s } => {
                if let Some(i) = self.stream(s) {
                    self.peer_read(i)?;
                }
            }
            RtRecv { s, one, ms, keep } => {
                let Some(i) = self.stream(s) else {
                    return Ok(());
                };
                let epoch = self.epoch;
                let g = self.group();
                let st = &mut self.streams[i];
                if st.eof {
                    return Ok(());
                }
                if st.rx.as_ref().is_some_and(|r| r.1 == epoch) {
                    // One receiver per stream at a time: two live ones may legitimately
                    // interleave what they take.
                    return Ok(());
                }
                match &st.pending {
                    Some((_, e)) if *e != epoch => return Ok(()),
                    Some(_) => {}
                    None => {
                        let s2 = st.stream.clone();
                        let fut: RecvFut = if one {
                            Box::pin(async move { s2.recv_one(&g).await })
                        } else {
                            Box::pin(async move { s2.recv(&g).await })
                        };
                        st.pending = Some((fut, epoch));
                    }
                }
                let (fut, _) = st.pending.as_mut().unwrap();
                if let Ok(r) = rt::timeout(Duration::from_millis(ms), fut).await {
                    self.streams[i].pending = None;
                    self.got(i, r, keep)?;
                }
            }
            RtDropRecv { s } => {
                if let Some(i) = self.stream(s) {
                    let st = &mut self.streams[i];
                    if !(avoid && st.pending.as_ref().is_some_and(|p| p.1 != self.epoch)) {
                        count_drop(st.pending.take().map(|p| p.1), self.epoch);
                    }
                }
            }
            RtStream { s } => {
                let Some(i) = self.stream(s) else {
                    return Ok(());
                };
                let epoch = self.epoch;
                let st = &mut self.streams[i];
                let receiving = st.pending.as_ref().is_some_and(|p| p.1 == epoch);
                if st.rx.is_none() && !st.eof && !receiving {
                    let rx = st
                        .stream
                        .recv_stream(&self.group.clone().unwrap())
                        .map_err(|e| Failure::new("start error", format!("recv_stream: {e}")))?;
                    st.rx = Some((rx, self.epoch));
                }
            }
            RtNext { s, ms, keep } => {
                let Some(i) = self.stream(s) else {
                    return Ok(());
                };
                let epoch = self.epoch;
                let st = &mut self.streams[i];
                let Some((rx, e)) = st.rx.as_mut() else {
                    return Ok(());
                };
                if *e != epoch || st.eof {
                    return Ok(());
                }
                if let Ok(r) = rt::timeout(Duration::from_millis(ms), rx.next()).await {
                    let ended = !matches!(r, Ok(Some(_)));
                    self.got(i, r, keep)?;
                    if ended {
                        self.streams[i].rx = None;
                    }
                }
            }
            RtReadCopy { s, ms } => {
                let Some(i) = self.stream(s) else {
                    return Ok(());
                };
                let epoch = self.epoch;
                let st = &self.streams[i];
                let busy = st.pending.as_ref().is_some_and(|p| p.1 == epoch)
                    || st.rx.as_ref().is_some_and(|p| p.1 == epoch);
                if busy || st.eof {
                    return Ok(());
                }
                let stream = st.stream.clone();
                let mut reader = stream.reader(self.group());
                // Larger than any chain, so the reader keeps nothing back when dropped.
                let mut buf = vec![0u8; 256 << 10];
                let read = futures::AsyncReadExt::read(&mut reader, &mut buf);
                if let Ok(r) = rt::timeout(Duration::from_millis(ms), read).await {
                    match r {
                        Ok(0) => self.got(i, Ok(None), false)?,
                        Ok(n) => self.got_bytes(i, &buf[..n])?,
                        Err(e) => return fail("unexpected error", format!("reader: {e}")),
                    }
                }
                seen::bump(&seen::READS);
            }
            RtDropStream { s } => {
                if let Some(i) = self.stream(s) {
                    let st = &mut self.streams[i];
                    if !(avoid && st.rx.as_ref().is_some_and(|p| p.1 != self.epoch)) {
                        count_drop(st.rx.take().map(|p| p.1), self.epoch);
                    }
                }
            }
            RtSend { s, len, zc } => {
                let Some(i) = self.stream(s) else {
                    return Ok(());
                };
                let st = &mut self.streams[i];
                if st.peer.is_none() {
                    return Ok(());
                }
                let v = pattern_vec(st.seed + 1_000_000, st.out_pos, len.max(1));
                st.out_pos += v.len() as u64;
                st.out_expected.extend_from_slice(&v);
                let s2 = st.stream.clone();
                let n = v.len();
                let r = if zc {
                    rt::timeout(Duration::from_secs(5), s2.send_zc(v)).await
                } else {
                    rt::timeout(Duration::from_secs(5), async {
                        s2.write_all(v).await.map(|_| n)
                    })
                    .await
                };
                match r {
                    Ok(Ok(m)) if m == n => {}
                    Ok(Ok(m)) => {
                        return fail("short send", format!("stream {i}: sent {m} of {n}"));
                    }
                    Ok(Err(e)) => return fail("unexpected error", format!("send: {e}")),
                    Err(_) => return fail("hang", format!("stream {i}: a send of {n} hung 5 s")),
                }
            }
            RtDropHeld { h } => {
                if !self.held.is_empty() {
                    let h = h % self.held.len();
                    self.held.remove(h);
                }
            }
            RtEpoch { .. } => unreachable!("handled by the case loop"),
        }
        Ok(())
    }

    fn check(&self) -> Outcome {
        for h in &self.held {
            if h.chain.to_vec() != h.snapshot {
                return fail(
                    "held bytes changed",
                    format!("{} changed while the user held it", h.what),
                );
            }
        }
        if let Some(g) = &self.group {
            let st = g.stats();
            if st.in_kernel + st.in_user > st.total {
                return fail("buffer accounting", format!("{st:?}"));
            }
        }
        Ok(())
    }

    /// Runs `actions` (no epoch markers) in the current runtime.
    async fn epoch(&mut self, actions: &[(usize, RtAction)]) -> Outcome {
        self.group = Some(
            rt::buf_group(
                BufGroupConfig::new(1024, self.header.count.clamp(1, 64).next_power_of_two())
                    .incremental(self.header.incremental),
            )
            .map_err(|e| Failure::new("setup", format!("buf_group: {e}")))?,
        );
        for (i, a) in actions {
            self.step = *i;
            let r = match self.act(a).await {
                Ok(()) => self.check(),
                e => e,
            };
            if let Err(mut f) = r {
                f.detail = format!("step {i} ({a:?}): {}", f.detail);
                return Err(f);
            }
        }
        if self.header.avoid.outliving_receive {
            // Nothing this runtime started outlives it with bytes it may have taken
            // (defect 4); a receive on a stream with nothing to take may.
            let epoch = self.epoch;
            for st in self.streams.iter_mut().filter(|st| st.sent_in > st.recv_in) {
                if st.pending.as_ref().is_some_and(|p| p.1 == epoch) {
                    st.pending = None;
                }
                if st.rx.as_ref().is_some_and(|p| p.1 == epoch) {
                    st.rx = None;
                }
            }
        }
        if self.header.avoid.orphan_at_runtime_end {
            // Receives dropped (cancelled) must finish in this runtime (defect 5): wait for
            // their final completions.
            let ms = if crate::common::in_emulated_guest() {
                200
            } else {
                30
            };
            rt::sleep(Duration::from_millis(ms)).await;
        }
        Ok(())
    }

    /// Drops what a runtime that ends started, where the defect must be avoided.
    fn end_epoch(&mut self, drop_between: Option<usize>) {
        let epoch = self.epoch;
        let avoid = self.header.avoid.foreign_runtime_drop;
        let between = drop_between.and_then(|s| self.stream(s));
        for (i, st) in self.streams.iter_mut().enumerate() {
            if avoid || between == Some(i) {
                if st.pending.as_ref().is_some_and(|p| p.1 == epoch) {
                    st.pending = None;
                }
                if st.rx.as_ref().is_some_and(|p| p.1 == epoch) {
                    st.rx = None;
                }
            }
        }
        self.group = None;
        self.epoch += 1;
        seen::bump(&seen::EPOCHS);
    }

    /// The last runtime: every stream drains to its end, the peers read everything.
    async fn finish(&mut self) -> Outcome {
        self.held.clear();
        self.group = Some(
            rt::buf_group(BufGroupConfig::new(4096, 8))
                .map_err(|e| Failure::new("setup", format!("buf_group: {e}")))?,
        );
        let epoch = self.epoch;
        for st in &mut self.streams {
            if let Some(p) = &st.peer {
                let _ = p.shutdown(std::net::Shutdown::Write);
            }
            st.shut = true;
            // What older runtimes started goes now (their runtime is gone).
            if st.pending.as_ref().is_some_and(|p| p.1 != epoch) {
                st.pending = None;
            }
            if st.rx.as_ref().is_some_and(|p| p.1 != epoch) {
                st.rx = None;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for i in 0..self.streams.len() {
            while !self.streams[i].eof {
                if Instant::now() > deadline {
                    let st = &self.streams[i];
                    return fail(
                        "drain stalled",
                        format!(
                            "stream {i}: received {} of {} bytes after 5 s",
                            st.recv_in, st.sent_in
                        ),
                    );
                }
                let a = if self.streams[i].rx.is_some() {
                    RtNext {
                        s: i,
                        ms: 100,
                        keep: false,
                    }
                } else {
                    RtRecv {
                        s: i,
                        one: false,
                        ms: 100,
                        keep: false,
                    }
                };
                self.act(&a).await?;
                self.peer_read(i)?;
            }
            self.streams[i].rx = None;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                self.peer_read(i)?;
                let st = &self.streams[i];
                if st.out_got == st.out_expected.len() {
                    break;
                }
                if Instant::now() > deadline {
                    return fail(
                        "peer missing bytes",
                        format!(
                            "stream {i}: the peer read {} of {} bytes sent",
                            st.out_got,
                            st.out_expected.len()
                        ),
                    );
                }
                rt::sleep(Duration::from_millis(5)).await;
            }
        }
        let g = self.group();
        let deadline = Instant::now() + Duration::from_secs(3);
        while g.stats().in_user != 0 {
            if Instant::now() > deadline {
                return fail("not full at the end", format!("{:?}", g.stats()));
            }
            rt::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

pub fn rt_run(header: &RtHeader, actions: &[RtAction]) -> Outcome {
    let _ = ringpool::Features::get();
    let fds_before = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let leaked_before = ringpool::leaked_ops();
    {
        let mut st = State {
            header: header.clone(),
            streams: Vec::new(),
            held: Vec::new(),
            epoch: 0,
            group: None,
            step: 0,
        };
        let mut rest: Vec<(usize, RtAction)> = actions.iter().cloned().enumerate().collect();
        let cfg = header.rung.config();
        loop {
            let cut = rest.iter().position(|(_, a)| matches!(a, RtEpoch { .. }));
            let (now, between) = match cut {
                Some(c) => {
                    let (_, RtEpoch { drop_between }) = rest[c].clone() else {
                        unreachable!()
                    };
                    let later = rest.split_off(c + 1);
                    rest.pop();
                    (std::mem::replace(&mut rest, later), Some(drop_between))
                }
                None => (std::mem::take(&mut rest), None),
            };
            let r = rt::block_on_with(cfg.clone(), st.epoch(&now))
                .map_err(|e| Failure::new("setup", format!("block_on: {e}")))?;
            r?;
            match between {
                Some(b) => st.end_epoch(b),
                None => break,
            }
        }
        st.epoch += 1;
        rt::block_on_with(cfg, st.finish())
            .map_err(|e| Failure::new("setup", format!("block_on: {e}")))?
            .map_err(|mut f| {
                f.detail = format!("at the end (drain): {}", f.detail);
                f
            })?;
        st.held.clear();
        st.streams.clear();
    }
    if ringpool::leaked_ops() != leaked_before {
        return fail("leaked ops", "a runtime's driver leaked op memory");
    }
    let fds_after = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    if fds_after != fds_before {
        return fail(
            "descriptor leaked",
            format!("{fds_before} descriptors before the case, {fds_after} after"),
        );
    }
    Ok(())
}

/// A regression test's body.
pub fn rt_replay(header: RtHeader, actions: &[RtAction]) {
    let _serial = crate::serial();
    if let Err(f) = rt_run(&header, actions) {
        panic!("[{}] {}", f.tag, f.detail);
    }
}

pub struct RtMachine;

impl Machine for RtMachine {
    type Header = RtHeader;
    type Action = RtAction;
    const NAME: &'static str = "rt";
    const REPLAY: &'static str = "rtm::rt_replay";

    fn generate(rng: &mut Rng) -> (RtHeader, Vec<RtAction>) {
        let header = RtHeader {
            rung: rng.pick(&[Rung::Best, Rung::Best, Rung::Legacy, Rung::NoMultishot]),
            incremental: rng.pct(30),
            count: rng.pick(&[1, 2, 4, 8, 16]),
            avoid: *RT_AVOID.lock().unwrap_or_else(|e| e.into_inner()),
        };
        let mut a = vec![RtNewTcp];
        for _ in 0..rng.below(3) {
            a.push(RtNewTcp);
        }
        let ix = |rng: &mut Rng| rng.below(4);
        for _ in 0..10 + rng.below(40) {
            a.push(match rng.below(100) {
                0..=24 => RtPeerWrite {
                    s: ix(rng),
                    len: rng.len(),
                },
                25..=26 => RtPeerShutdown { s: ix(rng) },
                27..=29 => RtPeerRead { s: ix(rng) },
                30..=44 => RtRecv {
                    s: ix(rng),
                    one: rng.pct(50),
                    ms: rng.pick(&[0, 1, 5, 20]),
                    keep: rng.pct(40),
                },
                45..=51 => RtDropRecv { s: ix(rng) },
                52..=56 => RtStream { s: ix(rng) },
                57..=66 => RtNext {
                    s: ix(rng),
                    ms: rng.pick(&[0, 1, 5, 20]),
                    keep: rng.pct(40),
                },
                67..=68 => RtDropStream { s: ix(rng) },
                69..=70 => RtReadCopy {
                    s: ix(rng),
                    ms: rng.pick(&[0, 1, 5, 20]),
                },
                71..=78 => RtSend {
                    s: ix(rng),
                    len: rng.len(),
                    zc: rng.pct(50),
                },
                79..=88 => RtDropHeld { h: ix(rng) },
                _ => RtEpoch {
                    drop_between: rng.pct(50).then(|| ix(rng)),
                },
            });
        }
        (header, a)
    }

    fn run(header: &RtHeader, actions: &[RtAction]) -> Outcome {
        rt_run(header, actions)
    }

    fn simplify(a: &RtAction) -> Vec<RtAction> {
        match a.clone() {
            RtPeerWrite { s, len } if len > 1 => vec![RtPeerWrite { s, len: 1 }],
            RtSend { s, len, zc } if len > 1 || zc => vec![RtSend {
                s,
                len: 1,
                zc: false,
            }],
            RtRecv { s, one, ms, keep } if keep || ms > 1 => vec![RtRecv {
                s,
                one,
                ms: ms.min(1),
                keep: false,
            }],
            RtNext { s, ms, keep } if keep || ms > 1 => vec![RtNext {
                s,
                ms: ms.min(1),
                keep: false,
            }],
            RtEpoch {
                drop_between: Some(_),
            } => vec![RtEpoch { drop_between: None }],
            _ => Vec::new(),
        }
    }
}
