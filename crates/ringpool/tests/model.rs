//! The model checker: random sequences of user and peer actions against the real kernel, checked
//! against a model after every step, shrunk to a minimal sequence on failure and printed as a
//! regression test to paste below.
//!
//! - `core`: `Driver`s over every group kind and rung, receives of every mode, pipe and file
//!   reads, sends (plain, zero-copy, bundles), leases, cancels, drops, peers that write,
//!   half-close and reset (`tests/model/core.rs`).
//! - `rtm`: the same streams through `ringpool::rt`, over several runtimes in a row, with
//!   futures and streams dropped at any point, also in another runtime (`tests/model/rtm.rs`).
//!
//! Budget: a fixed seed and case count (about a minute in all on the host, a sixth in the
//! kernel-matrix guests, `RINGPOOL_KERNEL_MATRIX=1`). `RINGPOOL_FUZZ_CASES=N` runs N cases per
//! machine, `RINGPOOL_FUZZ_SEED=S` another seed, `RINGPOOL_FUZZ_SECS` caps the time per machine,
//! `RINGPOOL_SHRINK_SECS` the shrinking (default 120 s).
//!
//! The tests of this binary run one at a time (`SERIAL`): each case counts the process's
//! descriptors before and after.

mod common;

#[path = "model/core.rs"]
mod core;
#[path = "model/gen.rs"]
mod gen;

use std::sync::Mutex;

/// Known defects (issue 13) not fixed on this branch: generated cases steer around them so the
/// checker looks for the next one; their regression tests below are ignored. Remove a number
/// when its fix lands. `RINGPOOL_MODEL_KNOWN=none` steers around nothing.
const KNOWN_DEFECTS: &[u32] = &[1, 2, 3];

fn known() -> Vec<u32> {
    match std::env::var("RINGPOOL_MODEL_KNOWN") {
        Ok(v) if v == "none" => Vec::new(),
        _ => KNOWN_DEFECTS.to_vec(),
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Says (or, under `RINGPOOL_REQUIRE_ALL=1`, fails) what the kernel lacks: the machine still
/// runs, on the rungs the probe chose, with those actions falling back.
fn report_features() {
    let f = ringpool::Features::get();
    common::require(f.buf_ring, "provided buffer ring");
    common::require(f.buf_ring_incremental, "incremental buffer ring");
    common::require(f.bundle, "recv bundle");
    common::require(f.recv_multishot, "multishot recv");
    common::require(f.send_zc, "zero-copy send");
}

#[test]
fn model_core() {
    let _serial = serial();
    report_features();
    *core::AVOID.lock().unwrap() = core::Avoid {
        eof_incremental: known().contains(&1),
        foreign_cancel: known().contains(&2),
    };
    let budget = gen::Budget::from_env(160, 40, 0xC0DE);
    let ran = gen::check::<core::Core>(&budget);
    assert!(ran > 0);
}

// Regression tests found by the checker.
#[allow(unused_imports)]
use crate::core::prelude::*;

/// Defect 1 as the checker found it (seed 0xd597abd0b, shrunk from 36 actions): a 1-byte
/// receive leaves the incremental ring's only buffer with the kernel (`F_BUF_MORE`, offset 1);
/// at the end, the drain reads the closed pipes s1 and s3 (EOF: `res = 0` naming that buffer,
/// which the driver recycles with its offset reset), then pipe s4's byte lands at offset 1 while
/// the driver hands out offset 0: the TCP stream's old byte.
#[test]
#[ignore = "defect 1, fixed on main by the lead"]
fn core_regression_incremental_eof_read_recycles_a_kept_buffer() {
    core::replay(
        Header {
            rung: Best,
            drivers: 2,
            avoid: core::Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Incremental,
                size: 256,
                count: 1,
            },
            NewTcp { d: 0 },
            NewPipe { d: 0 },
            NewFile { d: 1, len: 0 },
            NewPipe { d: 0 },
            NewPipe { d: 0 },
            NewPipe { d: 1 },
            PeerWrite { s: 4, len: 1 },
            Recv {
                s: 0,
                g: 5,
                mode: Once,
                keep: false,
            },
            PeerWrite { s: 6, len: 1 },
        ],
    );
}
