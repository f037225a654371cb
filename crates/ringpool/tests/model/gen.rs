//! The model checker's engine, shared by its machines: a seeded generator, the case loop with
//! its budget (`RINGPOOL_FUZZ_CASES`, `RINGPOOL_FUZZ_SEED`, a wall-clock cap, a smaller budget in
//! the kernel-matrix guests), and a delta-debugging shrinker that turns a failing sequence into a
//! minimal one, printed as a ready-to-paste regression test.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// Set while the minimal sequence is replayed once more, so the machine prints what it sees
/// (also `RINGPOOL_MODEL_DEBUG=1`).
pub static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether to print every completion.
pub fn verbose() -> bool {
    VERBOSE.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var("RINGPOOL_MODEL_DEBUG").is_ok_and(|v| v == "1")
}

/// SplitMix64: small, seedable, good enough to pick actions.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `p` percent.
    pub fn pct(&mut self, p: u32) -> bool {
        self.below(100) < p as usize
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    /// A length that is usually small, sometimes exactly a buffer size, sometimes large.
    pub fn len(&mut self) -> usize {
        match self.below(10) {
            0..=3 => 1 + self.below(64),
            4..=5 => 1 + self.below(1024),
            6 => self.pick(&[64, 256, 1024, 4096]),
            7..=8 => 1 + self.below(8192),
            _ => 1 + self.below(40_000),
        }
    }
}

/// Why a case failed: `tag` names the kind of failure (the shrinker keeps it the same), `detail`
/// says what was seen.
#[derive(Debug, Clone)]
pub struct Failure {
    pub tag: &'static str,
    pub detail: String,
}

impl Failure {
    pub fn new(tag: &'static str, detail: impl Into<String>) -> Failure {
        Failure {
            tag,
            detail: detail.into(),
        }
    }
}

pub type Outcome = Result<(), Failure>;

/// A machine the engine can drive: a case is a header (the driver's rung and such) and a
/// sequence of actions, both printable as Rust.
pub trait Machine {
    type Header: Clone + Debug;
    type Action: Clone + Debug;
    /// A name for messages and the printed test.
    const NAME: &'static str;
    /// The function a regression test calls: `<REPLAY>(header, &[actions])`.
    const REPLAY: &'static str;
    /// Generates one case.
    fn generate(rng: &mut Rng) -> (Self::Header, Vec<Self::Action>);
    /// Runs a case against the kernel; must clean up after itself whatever happens.
    fn run(header: &Self::Header, actions: &[Self::Action]) -> Outcome;
    /// Smaller versions of one action (for the shrinker), simplest first.
    fn simplify(action: &Self::Action) -> Vec<Self::Action>;
}

/// Runs `run` on a thread of its own, so a panic (or a runtime left in a bad state) ends only
/// this case, and a case that hangs is reported instead of hanging the test.
pub fn isolated<M: Machine>(header: &M::Header, actions: &[M::Action]) -> Outcome
where
    M::Header: Send + 'static,
    M::Action: Send + 'static,
{
    let (h, a) = (header.clone(), actions.to_vec());
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::Builder::new()
        .name("model-case".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| M::run(&h, &a)));
            let r = match r {
                Ok(r) => r,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "non-string panic".into());
                    Err(Failure::new("panic", msg))
                }
            };
            let _ = tx.send(r);
        })
        .expect("spawn a case thread");
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => {
            let _ = t.join();
            r
        }
        Err(_) => Err(Failure::new(
            "hang",
            "the case did not finish within 60 s (thread left behind)",
        )),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What a test asked for: cases, seed, wall-clock cap.
pub struct Budget {
    pub cases: u64,
    pub seed: u64,
    pub cap: Duration,
}

impl Budget {
    /// `default_cases` on the host; a sixth of them (at least 3) in a guest;
    /// `RINGPOOL_FUZZ_CASES` / `RINGPOOL_FUZZ_SEED` / `RINGPOOL_FUZZ_SECS` override.
    pub fn from_env(default_cases: u64, default_secs: u64, salt: u64) -> Budget {
        let (cases, secs) = if crate::common::in_emulated_guest() {
            ((default_cases / 6).max(3), (default_secs / 3).max(10))
        } else {
            (default_cases, default_secs)
        };
        let explicit = env_u64("RINGPOOL_FUZZ_CASES");
        let cases = explicit.unwrap_or(cases);
        // An explicit case count is a long run: give it time (a day at most) unless capped.
        let secs =
            env_u64("RINGPOOL_FUZZ_SECS").unwrap_or(if explicit.is_some() { 86_400 } else { secs });
        Budget {
            cases,
            seed: env_u64("RINGPOOL_FUZZ_SEED").unwrap_or(0x5EED_0000) ^ salt,
            cap: Duration::from_secs(secs),
        }
    }
}

/// Runs cases until the budget is spent; on the first failure shrinks it and panics with the
/// minimal sequence as a regression test. Returns the number of cases run.
pub fn check<M: Machine>(budget: &Budget) -> u64
where
    M::Header: Send + 'static,
    M::Action: Send + 'static,
{
    let start = Instant::now();
    let mut ran = 0;
    let mut actions_run = 0;
    // A long run records every failure (shrunk and printed) and goes on.
    let keep_going = std::env::var("RINGPOOL_FUZZ_KEEP_GOING").is_ok_and(|v| v == "1");
    let mut failures: Vec<&'static str> = Vec::new();
    for i in 0..budget.cases {
        if start.elapsed() > budget.cap {
            eprintln!(
                "{}: wall-clock cap of {:?} reached after {ran} of {} cases",
                M::NAME,
                budget.cap,
                budget.cases
            );
            break;
        }
        let case_seed = budget.seed.wrapping_add(i.wrapping_mul(0x9E37_79B9));
        let mut rng = Rng::new(case_seed);
        let (header, actions) = M::generate(&mut rng);
        actions_run += actions.len();
        ran += 1;
        if let Err(f) = isolated::<M>(&header, &actions) {
            eprintln!(
                "{}: case {i} (seed {case_seed:#x}, {} actions) failed: [{}] {}",
                M::NAME,
                actions.len(),
                f.tag,
                f.detail
            );
            let (h, a, f) = shrink::<M>(header, actions, f);
            let test = render::<M>(&h, &a, case_seed);
            let again = (0..3).filter(|_| isolated::<M>(&h, &a).is_err()).count();
            eprintln!(
                "{}: the minimal sequence once more, with every completion:",
                M::NAME
            );
            VERBOSE.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = isolated::<M>(&h, &a);
            VERBOSE.store(false, std::sync::atomic::Ordering::Relaxed);
            let msg = format!(
                "{}: minimal failing sequence ({} actions, fails {again} of 3 replays): [{}] {}\n\n{test}",
                M::NAME,
                a.len(),
                f.tag,
                f.detail
            );
            if !keep_going {
                panic!("{msg}");
            }
            eprintln!("{msg}");
            failures.push(f.tag);
        }
        if (i + 1) % 100 == 0 {
            eprintln!(
                "{}: {} cases, {actions_run} actions, {:.0?}",
                M::NAME,
                i + 1,
                start.elapsed()
            );
        }
    }
    eprintln!(
        "{}: {ran} cases ({actions_run} actions), {} failed, in {:.1?} (seed {:#x})",
        M::NAME,
        failures.len(),
        start.elapsed(),
        budget.seed
    );
    assert!(failures.is_empty(), "{}: failures: {failures:?}", M::NAME);
    ran
}

/// Delta debugging: removes chunks of actions, then single ones, then simplifies each action,
/// keeping every change after which the case still fails the same way. Bounded in runs and time.
pub fn shrink<M: Machine>(
    header: M::Header,
    mut actions: Vec<M::Action>,
    mut failure: Failure,
) -> (M::Header, Vec<M::Action>, Failure)
where
    M::Header: Send + 'static,
    M::Action: Send + 'static,
{
    let start = Instant::now();
    let default = if crate::common::in_emulated_guest() {
        30
    } else {
        120
    };
    let limit = Duration::from_secs(env_u64("RINGPOOL_SHRINK_SECS").unwrap_or(default));
    let tag = failure.tag;
    let mut runs = 0;
    let still_fails = |a: &[M::Action], runs: &mut u32| -> Option<Failure> {
        *runs += 1;
        match isolated::<M>(&header, a) {
            Err(f) if f.tag == tag => Some(f),
            _ => None,
        }
    };
    let out_of_budget = |runs: u32| runs > 2000 || start.elapsed() > limit;
    // 1. Chunks, halving.
    let mut chunk = actions.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut progressed = false;
        while i < actions.len() && !out_of_budget(runs) {
            let end = (i + chunk).min(actions.len());
            let mut candidate = actions.clone();
            candidate.drain(i..end);
            if let Some(f) = still_fails(&candidate, &mut runs) {
                actions = candidate;
                failure = f;
                progressed = true;
            } else {
                i += chunk;
            }
        }
        if out_of_budget(runs) {
            break;
        }
        if chunk == 1 && !progressed {
            break;
        }
        if !progressed {
            chunk = (chunk / 2).max(1);
        }
    }
    // 2. Simpler actions.
    let mut changed = true;
    while changed && !out_of_budget(runs) {
        changed = false;
        for i in 0..actions.len() {
            for simpler in M::simplify(&actions[i]) {
                if out_of_budget(runs) {
                    break;
                }
                let mut candidate = actions.clone();
                candidate[i] = simpler;
                if let Some(f) = still_fails(&candidate, &mut runs) {
                    actions = candidate;
                    failure = f;
                    changed = true;
                    break;
                }
            }
        }
    }
    eprintln!(
        "{}: shrunk to {} actions in {runs} runs, {:.1?}",
        M::NAME,
        actions.len(),
        start.elapsed()
    );
    (header, actions, failure)
}

/// The sequence as a `#[test]` to paste into `tests/model.rs`.
pub fn render<M: Machine>(header: &M::Header, actions: &[M::Action], seed: u64) -> String {
    let mut s = String::new();
    s.push_str("// Found by the model checker; paste into tests/model.rs.\n");
    s.push_str(&format!(
        "#[test]\nfn {}_regression_{seed:x}() {{\n",
        M::NAME
    ));
    s.push_str(&format!(
        "    {}(\n        {header:?},\n        &[\n",
        M::REPLAY
    ));
    for a in actions {
        s.push_str(&format!("            {a:?},\n"));
    }
    s.push_str("        ],\n    );\n}\n");
    s
}
