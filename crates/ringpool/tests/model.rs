//! The model checker: random sequences of user and peer actions against the real kernel, checked
//! against a model after every step, shrunk to a minimal sequence on failure and printed as a
//! regression test to paste below.
//!
//! - `core`: `Driver`s over every group kind and rung, receives of every mode, pipe and file
//!   reads, sends (plain, zero-copy, bundles), leases (memory and pages), cancels, drops,
//!   peers that write, half-close and reset (`tests/model/core.rs`).
//! - `rtm`: the same streams through `ringpool::rt`, over several runtimes in a row, with
//!   futures and streams dropped at any point, also in another runtime (`tests/model/rtm.rs`).
//!
//! Budget: a fixed seed and case count (about a minute in all on the host, a sixth in the
//! kernel-matrix guests, `RINGPOOL_KERNEL_MATRIX=1`). `RINGPOOL_FUZZ_CASES=N` runs N cases per
//! machine, `RINGPOOL_FUZZ_SEED=S` another seed, `RINGPOOL_FUZZ_SECS` caps the time per machine,
//! `RINGPOOL_FUZZ_KEEP_GOING=1` records each failure (shrunk, printed) and goes on,
//! `RINGPOOL_SHRINK_SECS` the shrinking (default 120 s; 30 s in a guest),
//! `RINGPOOL_MODEL_DEBUG=1` prints every completion of the core machine (to read a replay).
//!
//! The tests of this binary run one at a time (`SERIAL`): each case counts the process's
//! descriptors before and after.

mod common;

#[path = "model/core.rs"]
mod core;
#[path = "model/gen.rs"]
mod gen;
#[path = "model/rtm.rs"]
mod rtm;

use std::sync::Mutex;

/// Known defects (issue 13) not fixed on this branch: generated cases steer around them so the
/// checker looks for the next one; their regression tests below are ignored. Remove a number
/// when its fix lands. `RINGPOOL_MODEL_KNOWN=none` steers around nothing, `=1,3` around those.
/// 4 and 5 are new, found by this checker (see their regression tests).
const KNOWN_DEFECTS: &[u32] = &[];

fn known() -> Vec<u32> {
    match std::env::var("RINGPOOL_MODEL_KNOWN") {
        Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        _ => KNOWN_DEFECTS.to_vec(),
    }
}

/// Whether the running kernel is older than `major.minor`.
fn kernel_before(major: u32, minor: u32) -> bool {
    let k = ringpool::Features::get().kernel;
    (k.major, k.minor) < (major, minor)
}

/// A regression test of a kernel quirk that ringpool does not work around yet: on a kernel
/// before `major.minor` (where it was seen) it says so and skips visibly, elsewhere it runs.
fn open_quirk_here(major: u32, minor: u32, what: &str) -> bool {
    if !kernel_before(major, minor) {
        return false;
    }
    eprintln!(
        "skipped: open kernel quirk of this kernel ({}): {what}; not worked around yet",
        ringpool::Features::get().kernel
    );
    true
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
        // Open kernel quirks of the matrix's older kernels (their regression tests are the
        // `core_regression_guest_*` ones): steered around on those kernels only.
        cancels_on_legacy_groups: kernel_before(5, 19),
        forced_legacy_rungs: false,
    };
    let budget = gen::Budget::from_env(1500, 40, 0xC0DE);
    let ran = gen::check::<core::Core>(&budget);
    eprintln!("core: seen: {}", core::seen::summary());
    assert!(ran > 0);
}

#[test]
fn model_rt() {
    let _serial = serial();
    *rtm::RT_AVOID.lock().unwrap() = rtm::RtAvoid {
        foreign_runtime_drop: known().contains(&3),
        outliving_receive: known().contains(&4),
        orphan_at_runtime_end: known().contains(&5),
    };
    let budget = gen::Budget::from_env(150, 25, 0x0A5C);
    let ran = gen::check::<rtm::RtMachine>(&budget);
    eprintln!("rt: seen: {}", rtm::seen::summary());
    assert!(ran > 0);
}

// Regression tests found by the checker.
use crate::core::prelude::*;
use crate::rtm::prelude::*;

/// Defect 1 as the checker found it (`RINGPOOL_MODEL_KNOWN=1`, seed 0x37603761d6f, shrunk from
/// 47 actions): a multishot receive on TCP stream s2 takes 1 byte into the incremental ring's
/// only buffer (the kernel keeps it, offset 1) and the user keeps that byte; a read on pipe s1
/// waits on the same group. At the end the pipe's writer closes: the read ends at EOF (`res = 0`
/// naming that buffer) and the driver recycles it with its offset reset, so the next byte the
/// kernel appends at offset 2 is handed out at offset 0: an old byte.
#[test]
fn core_regression_incremental_eof_read_recycles_a_kept_buffer() {
    core::replay(
        Header {
            rung: Best,
            drivers: 1,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Incremental,
                size: 64,
                count: 1,
            },
            NewTcp { d: 0 },
            NewPipe { d: 0 },
            NewTcp { d: 0 },
            NewTcp { d: 0 },
            Recv {
                s: 4,
                g: 2,
                mode: Multishot,
                keep: true,
            },
            ReadSelect {
                s: 3,
                g: 5,
                keep: false,
            },
            PeerWrite { s: 2, len: 1 },
            Transmit {
                s: 1,
                how: Plain,
                src: Held(6),
            },
            PeerWrite { s: 6, len: 1 },
            PeerWrite { s: 2, len: 1 },
        ],
    );
}

/// Defect 1 again, found with `RINGPOOL_MODEL_KNOWN=none` (seed 0x59fc59b2a7, shrunk from 59
/// actions): a read at the end of a pipe takes the incremental ring's head buffer (`res = 0`,
/// nothing written, the kernel keeps it) and the driver puts it back: the ring now holds bid 0
/// twice, and the receive of 2048 fresh bytes (the drain at the end) is written over itself
/// before the user sees it.
#[test]
fn core_regression_incremental_eof_read_puts_a_buffer_in_the_ring_twice() {
    core::replay(
        Header {
            rung: Best,
            drivers: 1,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Incremental,
                size: 1024,
                count: 2,
            },
            NewTcp { d: 0 },
            PeerWrite { s: 5, len: 2048 },
            NewPipe { d: 0 },
            PeerShutdown { s: 3 },
            ReadSelect {
                s: 6,
                g: 4,
                keep: false,
            },
            ReadSelect {
                s: 3,
                g: 4,
                keep: false,
            },
        ],
    );
}

/// Defect 2 as the checker found it (`RINGPOOL_MODEL_KNOWN=1`, seed 0x3cf02aa957f, shrunk from
/// 64 actions): driver 0's first op (a pipe read) and driver 1's first op (a TCP receive) get
/// the same `OpId`; `cancel` of driver 0's id on driver 1 cancels driver 1's receive.
#[test]
fn core_regression_a_foreign_op_id_cancels_another_drivers_op() {
    core::replay(
        Header {
            rung: NoBundle,
            drivers: 2,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 1,
                kind: Ring,
                size: 4096,
                count: 1,
            },
            NewGroup {
                d: 1,
                kind: Ring,
                size: 4096,
                count: 1,
            },
            NewGroup {
                d: 0,
                kind: Ring,
                size: 4096,
                count: 1,
            },
            NewTcp { d: 1 },
            NewPipe { d: 0 },
            ReadSelect {
                s: 4,
                g: 5,
                keep: false,
            },
            Recv {
                s: 2,
                g: 1,
                mode: Once,
                keep: false,
            },
            Cancel {
                op: 2,
                foreign: true,
            },
        ],
    );
}

/// Defect 4, new, found by the checker (seed 0x5eed0a5c, shrunk from 40 actions): a receive
/// future started in one runtime took a byte off the socket; the runtime ends while the future
/// is still alive (it is dropped afterwards, outside any runtime), and the byte is lost: the
/// next runtime receives the peer's second byte first. The op's events die with the runtime
/// instead of going to the stream's leftovers (issue 13: "dropped elsewhere or after its
/// runtime ended, it must ... lose nothing").
#[test]
fn rt_regression_a_receive_outliving_its_runtime_loses_its_bytes() {
    rtm::rt_replay(
        RtHeader {
            rung: Legacy,
            incremental: false,
            count: 4,
            avoid: RtAvoid::NOTHING,
        },
        &[
            RtNewTcp,
            RtPeerWrite { s: 2, len: 1 },
            RtRecv {
                s: 3,
                one: false,
                ms: 0,
                keep: false,
            },
            RtEpoch { drop_between: None },
            RtPeerWrite { s: 3, len: 1 },
        ],
    );
}

/// Defect 5, new, found by the checker (seed 0x5eed0a5c with defect 4 steered around: each
/// runtime dropped its receives just before it ended): a receive future is dropped while its op
/// is in the kernel (the runtime cancels it and counts an orphan on the stream, to route its
/// late data to the stream's leftovers); the runtime ends before the cancel's completion, which
/// then never reaches the stream. In the next runtime every receive on that stream waits for the
/// orphan forever: here the drain at the end stalls.
#[test]
fn rt_regression_a_receive_dropped_at_runtime_end_blocks_the_stream_forever() {
    rtm::rt_replay(
        RtHeader {
            rung: Best,
            incremental: false,
            count: 4,
            avoid: RtAvoid::NOTHING,
        },
        &[
            RtNewTcp,
            RtRecv {
                s: 0,
                one: true,
                ms: 1,
                keep: false,
            },
            RtDropRecv { s: 0 },
            RtEpoch { drop_between: None },
        ],
    );
}

/// Defect 3 as the checker found it (`RINGPOOL_MODEL_KNOWN=1,2,4,5`, seed 0x24d5b617ff, shrunk
/// from 40 actions): a receive future of the first runtime outlives it; the second runtime's
/// `recv_stream` gets the same token; dropping the old future there removes and cancels the
/// stream's op, so the stream never sees its data or its end (the drain stalls).
#[test]
fn rt_regression_a_future_dropped_in_another_runtime_cancels_its_op() {
    rtm::rt_replay(
        RtHeader {
            rung: Legacy,
            incremental: false,
            count: 4,
            avoid: RtAvoid::NOTHING,
        },
        &[
            RtNewTcp,
            RtRecv {
                s: 0,
                one: true,
                ms: 0,
                keep: false,
            },
            RtEpoch { drop_between: None },
            RtStream { s: 0 },
            RtDropRecv { s: 3 },
            RtPeerWrite { s: 0, len: 1 },
        ],
    );
}

/// Found by the checker in the 6.12 guest of the kernel matrix (seed 0xb7ed44fe0, shrunk from
/// 49 actions; passes on 6.18): a plain ring of two buffers shared by a read on a pipe that has
/// no data yet (it waits) and a read of a 1-byte file; the file's byte comes back wrong. Also
/// seen on 6.1 (next test). Not the kernel version but the file system: the guests' `/tmp` is
/// tmpfs, and a tmpfs read completes from io-wq after the pipe read, whose buffer went home into
/// the ring slot the file read's buffer had; the driver looked the file read's bid up by that
/// slot (fixed; also fails on the host with `TMPDIR` on tmpfs before the fix).
#[test]
fn core_regression_guest_6_12_a_waiting_pipe_read_and_a_file_read_share_a_ring() {
    core::replay(
        Header {
            rung: Best,
            drivers: 1,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Ring,
                size: 1024,
                count: 2,
            },
            NewPipe { d: 0 },
            NewFile { d: 0, len: 1 },
            ReadSelect {
                s: 5,
                g: 7,
                keep: false,
            },
            ReadSelect {
                s: 6,
                g: 7,
                keep: false,
            },
            PeerWrite { s: 1, len: 1 },
        ],
    );
}

/// Found by the checker in the 6.1 guest (seed 0x1879614c0d, shrunk from 66 actions; passes on
/// 6.18): a plain ring (`no-incremental`) shared by pipe reads at EOF and a file read; the
/// file's last 16 bytes come back wrong. Believed the same cause as the test above (a file
/// read on the guest's tmpfs `/tmp` completing after its ring slot was refilled).
#[test]
fn core_regression_guest_6_1_eof_pipe_reads_and_a_file_read_share_a_ring() {
    core::replay(
        Header {
            rung: NoIncremental,
            drivers: 1,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Ring,
                size: 64,
                count: 2,
            },
            NewPipe { d: 0 },
            NewTcp { d: 0 },
            NewFile { d: 0, len: 144 },
            NewFile { d: 0, len: 0 },
            NewPipe { d: 0 },
            ReadSelect {
                s: 5,
                g: 1,
                keep: false,
            },
            PeerShutdown { s: 5 },
            Transmit {
                s: 5,
                how: Plain,
                src: Owned(0),
            },
            NewPipe { d: 0 },
            NewPipe { d: 0 },
            ReadSelect {
                s: 7,
                g: 2,
                keep: false,
            },
            Wait { ms: 1 },
            ReadSelect {
                s: 3,
                g: 4,
                keep: false,
            },
            ReadSelect {
                s: 1,
                g: 1,
                keep: false,
            },
            ReadSelect {
                s: 5,
                g: 4,
                keep: false,
            },
        ],
    );
}

/// Found by the checker in the 6.12 guest (seed 0x1600836529, shrunk from 93 actions, fails 2
/// of 3 replays there; passes on 6.18). The verbose replay shows both completions naming the
/// same buffer of a plain 2-buffer ring:
/// `token 3 Data([bid 1, len 1])`, then `token 2 Data([bid 1, len 1])`: a pipe read (1 byte
/// waiting) and a read of a 1-byte file, in flight together, are handed bid 1 both; bid 0 is
/// never used. The user then holds one buffer twice, its bytes overwritten by the other read.
/// The kernel's completion of the file read named bid 0; the driver handed out bid 1, the bid
/// its ring-order mirror had by then at bid 0's ring slot (fixed: see the next test).
#[test]
fn core_regression_guest_6_12_two_reads_are_handed_the_same_ring_buffer() {
    core::replay(
        Header {
            rung: NoIncremental,
            drivers: 1,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Ring,
                size: 256,
                count: 2,
            },
            NewPipe { d: 0 },
            NewFile { d: 0, len: 0 },
            NewFile { d: 0, len: 1 },
            PeerWrite { s: 7, len: 1 },
            ReadSelect {
                s: 2,
                g: 7,
                keep: false,
            },
            ReadSelect {
                s: 6,
                g: 5,
                keep: false,
            },
        ],
    );
}

/// The bug behind the guests' "open finding (6.1, 6.12)", on the host: the previous test with
/// its files on tmpfs explicitly (`/dev/shm`), as the guests' `/tmp` is. The read of the 1-byte
/// tmpfs file consumes bid 0 (ring slot 0) at issue and completes from io-wq; the pipe read
/// issued behind it completes first with bid 1, which the model drops: it goes home at ring
/// position 2, slot 0. The file read's completion names bid 0, but the driver took the bid its
/// mirror had at bid 0's slot, 1: one buffer in user hands twice (about half the replays failed
/// before the fix; `selection.rs` has a deterministic driver-level test of the same).
#[test]
fn core_regression_tmpfs_a_late_file_read_is_handed_a_refilled_ring_slot() {
    core::replay(
        Header {
            rung: NoIncremental,
            drivers: 1,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Ring,
                size: 256,
                count: 2,
            },
            NewPipe { d: 0 },
            NewTmpfsFile { d: 0, len: 0 },
            NewTmpfsFile { d: 0, len: 1 },
            PeerWrite { s: 7, len: 1 },
            ReadSelect {
                s: 2,
                g: 7,
                keep: false,
            },
            ReadSelect {
                s: 6,
                g: 5,
                keep: false,
            },
        ],
    );
}

/// Found by the checker in the 5.10 guest (seed 0x5eedc0de, case 0; shrunk from 43 to 23
/// actions within the guest's shrink budget; passes on 6.18 on every forced rung). The drain at
/// the end stalls: the legacy group g0 (one buffer) reports the buffer in the kernel
/// (`in_kernel 1, in_user 0`) while every receive on it ends `-ENOBUFS` and is re-armed, about
/// 17,000 times a second (`enobufs 173002, rearms 172998` after 10 s): the buffer left
/// circulation without the driver knowing. Suspected: on 5.10 a buffer-selecting op that is
/// cancelled (here `CancelToken`) after picking a legacy buffer frees it in the kernel
/// (`io_clean_op`) without naming it in its CQE, so it is never provided again.
#[test]
fn core_regression_guest_5_10_a_legacy_buffer_leaves_circulation() {
    if open_quirk_here(
        5,
        19,
        "a cancelled waiting receive on a legacy group keeps its buffer out of circulation",
    ) {
        return;
    }
    core::replay(
        Header {
            rung: Best,
            drivers: 1,
            avoid: Avoid::NOTHING,
        },
        &[
            NewGroup {
                d: 0,
                kind: Incremental,
                size: 256,
                count: 1,
            },
            NewGroup {
                d: 0,
                kind: Incremental,
                size: 64,
                count: 4,
            },
            NewTcp { d: 0 },
            NewTcp { d: 0 },
            NewFile { d: 0, len: 7336 },
            PeerRead { s: 6 },
            NewPipe { d: 0 },
            Transmit {
                s: 0,
                how: Bundled,
                src: Owned(4893),
            },
            LeaseReadIn { f: 3, len: 3749 },
            Wait { ms: 0 },
            PeerWrite { s: 5, len: 32945 },
            Transmit {
                s: 4,
                how: Bundled,
                src: Held(6),
            },
            DropHeld { h: 0 },
            DropFd { s: 7 },
            Recv {
                s: 3,
                g: 4,
                mode: Multishot,
                keep: false,
            },
            PeerWrite { s: 2, len: 6323 },
            NewPipe { d: 0 },
            CancelToken { op: 3 },
            Wait { ms: 0 },
            LeaseReadIn { f: 6, len: 64 },
            Wait { ms: 20 },
            DropHeld { h: 7 },
            PeerWrite { s: 1, len: 24 },
        ],
    );
}

/// Found by the checker on main with nothing steered around (seed 0xf342073b4, shrunk from 38
/// actions): a receive that completed in its runtime while its future was not polled lost its
/// bytes when the runtime ended (fixed: the runtime's end hands them to the stream).
#[test]
fn rt_regression_f342073b4() {
    rtm::rt_replay(
        RtHeader {
            rung: Best,
            incremental: false,
            count: 4,
            avoid: RtAvoid {
                foreign_runtime_drop: false,
                outliving_receive: false,
                orphan_at_runtime_end: false,
            },
        },
        &[
            RtNewTcp,
            RtRecv {
                s: 0,
                one: true,
                ms: 1,
                keep: false,
            },
            RtPeerWrite { s: 0, len: 2665 },
            RtSend {
                s: 2,
                len: 1,
                zc: false,
            },
        ],
    );
}

/// Found by the checker in the 6.1 guest (seed 0x36c1ff9876, 2026-12-07; fails 3 of 3 there, on
/// the code before the send-merging change too; passes on 6.12, 7.3 and the host): a group was
/// dropped and the next group's ring took its id at once (the lowest free one); 6.1 keeps an
/// unregistered ring's head, so every selection from the new ring failed with `ENOBUFS` while
/// all 8 of its buffers were in it, and the drain spun on re-armed receives. Fixed by handing
/// ids out in turn (`Driver::fresh_bgid`); passes in the 6.1 guest since. Host-side test of the
/// id rule: `selection::a_dropped_group_s_id_is_used_again_only_after_every_other`.
#[test]
fn core_regression_36c1ff9876() {
    core::replay(
        Header {
            rung: Best,
            drivers: 1,
            avoid: Avoid {
                eof_incremental: false,
                foreign_cancel: false,
                cancels_on_legacy_groups: false,
                forced_legacy_rungs: false,
            },
        },
        &[
            NewGroup {
                d: 0,
                kind: Registered,
                size: 256,
                count: 2,
            },
            NewPipe { d: 0 },
            NewPipe { d: 0 },
            NewPipe { d: 0 },
            Wait { ms: 10 },
            PeerWrite { s: 6, len: 36 },
            Recv {
                s: 4,
                g: 3,
                mode: Bundle,
                keep: true,
            },
            PeerWrite { s: 2, len: 7764 },
            DropHeld { h: 7 },
            Wait { ms: 20 },
            Transmit {
                s: 3,
                how: Plain,
                src: Held(6),
            },
            PeerWrite { s: 5, len: 32335 },
            Transmit {
                s: 2,
                how: Zc,
                src: Owned(3),
            },
            PeerWrite { s: 3, len: 4096 },
            Wait { ms: 20 },
            PeerWrite { s: 3, len: 832 },
            NewTcp { d: 0 },
            Wait { ms: 10 },
            LeaseReadIn { f: 1, len: 26 },
            Wait { ms: 10 },
            PeerWrite { s: 3, len: 653 },
            Transmit {
                s: 3,
                how: Bundled,
                src: Owned(772),
            },
            Recv {
                s: 0,
                g: 0,
                mode: MultishotBundle,
                keep: false,
            },
            IntoBytes { h: 1 },
            Transmit {
                s: 3,
                how: Plain,
                src: Owned(256),
            },
            ReadSelect {
                s: 6,
                g: 2,
                keep: true,
            },
            DropHeld { h: 4 },
            Transmit {
                s: 4,
                how: Zc,
                src: Owned(525),
            },
            Recv {
                s: 3,
                g: 7,
                mode: MultishotBundle,
                keep: false,
            },
            Transmit {
                s: 5,
                how: Bundled,
                src: Held(5),
            },
            DropHeld { h: 4 },
            DropGroup { g: 2 },
            Recv {
                s: 6,
                g: 4,
                mode: Bundle,
                keep: true,
            },
            IntoBytes { h: 5 },
            PeerWrite { s: 3, len: 850 },
            ReadSelect {
                s: 7,
                g: 5,
                keep: false,
            },
            PeerWrite { s: 2, len: 1 },
            Wait { ms: 1 },
            Wait { ms: 1 },
            ReadSelect {
                s: 2,
                g: 2,
                keep: true,
            },
            DropHeld { h: 2 },
            Recv {
                s: 2,
                g: 0,
                mode: Multishot,
                keep: true,
            },
            Recv {
                s: 1,
                g: 6,
                mode: Once,
                keep: false,
            },
            Cancel {
                op: 4,
                foreign: false,
            },
            Wait { ms: 1 },
            DropHeld { h: 2 },
            PeerRead { s: 4 },
            ReadSelect {
                s: 4,
                g: 2,
                keep: false,
            },
        ],
    );
}
