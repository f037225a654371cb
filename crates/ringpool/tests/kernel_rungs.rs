//! The rung of the fallback ladder the probe must choose on each kernel we test on.
//!
//! One row per kernel series (major.minor): what the probe must find and the ladder it must
//! choose. `ci/kernel-matrix.sh` boots Debian's 5.10, 6.1, 6.12 and 7.3 kernels under QEMU and runs
//! this test first in each guest; the host (6.18) runs it with the workspace's tests. The rows are
//! what those kernels really reported, and agree with the kernel versions that introduced each
//! feature (see `docs/KERNEL-MATRIX.md`).
//!
//! A kernel without a row is skipped visibly; with `RINGPOOL_REQUIRE_ALL=1`, a kernel newer than
//! the host's row is held to the newest row below it and an older unknown one fails.

use ringpool::{Features, GroupRung, Ladder, MultishotRung, ZcRung, ZcrxProbe, ZcrxRung};

/// What one kernel series must report and the ladder the probe must choose on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    /// `IORING_OP_PROVIDE_BUFFERS` (5.7).
    provide_buffers: bool,
    /// Provided buffer rings (5.19).
    buf_ring: bool,
    /// Incremental buffer rings (6.12).
    buf_ring_incremental: bool,
    /// Recv bundles (6.10).
    bundle: bool,
    /// Multishot recv (6.0).
    recv_multishot: bool,
    /// Multishot accept (5.19).
    accept_multishot: bool,
    /// `SEND_ZC` (6.0).
    send_zc: bool,
    /// `SENDMSG_ZC` (6.1).
    sendmsg_zc: bool,
    /// `IORING_SEND_ZC_REPORT_USAGE` (6.2).
    zc_report_usage: bool,
    /// A sparse fixed buffer table with tagged updates (5.19).
    fixed_buffers: bool,
    /// `READV_FIXED`/`WRITEV_FIXED` (6.15).
    vectored_fixed: bool,
    /// Slot-wise `IORING_REGISTER_CLONE_BUFFERS` (offsets, `DST_REPLACE`: 6.13).
    clone_buffers: bool,
    /// `SINGLE_ISSUER|DEFER_TASKRUN` (6.1).
    defer_taskrun: bool,
    /// `IORING_FEAT_EXT_ARG` (5.11).
    ext_arg: bool,
    /// `IORING_OP_RECV_ZC` (6.15).
    zcrx: bool,
    /// A device-less zero-copy receive area registers (`ZCRX_REG_NODEV`, 7.1; as root).
    zcrx_device_less: ZcrxProbe,
    /// The rungs `Ladder::choose(features, &[])` must pick.
    ladder: Rungs,
}

/// The rungs of a [`Ladder`] this table checks (a struct of our own, so a rung added to
/// `Ladder` later does not break this file before it gets a column here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rungs {
    groups: GroupRung,
    bundle: bool,
    recv: MultishotRung,
    accept: MultishotRung,
    defer_taskrun: bool,
    ext_arg: bool,
    zc: ZcRung,
    zc_report_usage: bool,
    fixed: bool,
    vectored_fixed: bool,
    clone_buffers: bool,
    zcrx: ZcrxRung,
    /// Queued plain sends merged into one `sendmsg` (6.1: cancelled sends report progress).
    merge_sends: bool,
    /// Limited bundles ask for their whole limit (6.18: the kernel stops at a cut buffer).
    exact_bundle_limit: bool,
}

impl From<Ladder> for Rungs {
    fn from(l: Ladder) -> Rungs {
        Rungs {
            groups: l.groups,
            bundle: l.bundle,
            recv: l.recv,
            accept: l.accept,
            defer_taskrun: l.defer_taskrun,
            ext_arg: l.ext_arg,
            zc: l.zc,
            zc_report_usage: l.zc_report_usage,
            fixed: l.fixed,
            vectored_fixed: l.vectored_fixed,
            clone_buffers: l.clone_buffers,
            zcrx: l.zcrx,
            merge_sends: l.merge_sends,
            exact_bundle_limit: l.exact_bundle_limit,
        }
    }
}

/// Debian bullseye's 5.10 (5.10.223): legacy provided buffers, no buffer rings, no multishot, no
/// zero-copy send, no defer taskrun, but `EXT_ARG`, which mainline added in 5.11: the 5.10
/// stable series carries a backport of newer io_uring code (believed to be the import of the
/// 5.15-stable io_uring in 5.10.162). The probe finds 37 opcodes, up to `UNLINKAT` (36, mainline
/// 5.11), where 5.10.0 stops at `TEE` (33). The timed-wait rung is therefore `EXT_ARG` on this
/// kernel, not the timeout op.
const K5_10: Row = Row {
    provide_buffers: true,
    buf_ring: false,
    buf_ring_incremental: false,
    bundle: false,
    recv_multishot: false,
    accept_multishot: false,
    send_zc: false,
    sendmsg_zc: false,
    zc_report_usage: false,
    fixed_buffers: false,
    vectored_fixed: false,
    clone_buffers: false,
    defer_taskrun: false,
    ext_arg: true,
    zcrx: false,
    zcrx_device_less: ZcrxProbe::NotInKernel,
    ladder: Rungs {
        groups: GroupRung::Legacy,
        bundle: false,
        recv: MultishotRung::Rearmed,
        accept: MultishotRung::Rearmed,
        defer_taskrun: false,
        ext_arg: true,
        zc: ZcRung::Plain,
        zc_report_usage: false,
        fixed: false,
        vectored_fixed: false,
        clone_buffers: false,
        zcrx: ZcrxRung::Groups,
        merge_sends: false,
        exact_bundle_limit: false,
    },
};

/// Debian bookworm's 6.1 (6.1.192): buffer rings, multishot, zero-copy send, defer taskrun; no
/// incremental rings, no bundles. `SEND_ZC_REPORT_USAGE` came in mainline 6.2, but this kernel
/// has it (a stable backport): checked in the guest, a loopback `SEND_ZC` with the flag gets a
/// notification whose result says `ZC_COPIED`, while an unknown zc flag is rejected with `EINVAL`.
const K6_1: Row = Row {
    provide_buffers: true,
    buf_ring: true,
    buf_ring_incremental: false,
    bundle: false,
    recv_multishot: true,
    accept_multishot: true,
    send_zc: true,
    sendmsg_zc: true,
    zc_report_usage: true,
    fixed_buffers: true,
    vectored_fixed: false,
    clone_buffers: false,
    defer_taskrun: true,
    ext_arg: true,
    zcrx: false,
    zcrx_device_less: ZcrxProbe::NotInKernel,
    ladder: Rungs {
        groups: GroupRung::Ring { incremental: false },
        bundle: false,
        recv: MultishotRung::Kernel,
        accept: MultishotRung::Kernel,
        defer_taskrun: true,
        ext_arg: true,
        zc: ZcRung::SendmsgZc,
        zc_report_usage: true,
        fixed: true,
        vectored_fixed: false,
        clone_buffers: false,
        zcrx: ZcrxRung::Groups,
        merge_sends: true,
        exact_bundle_limit: false,
    },
};

/// Debian trixie's 6.12: everything but vectored fixed I/O (6.15) and slot-wise buffer cloning
/// (6.13; 6.12 clones whole tables only, into a ring without one).
const K6_12: Row = Row {
    provide_buffers: true,
    buf_ring: true,
    buf_ring_incremental: true,
    bundle: true,
    recv_multishot: true,
    accept_multishot: true,
    send_zc: true,
    sendmsg_zc: true,
    zc_report_usage: true,
    fixed_buffers: true,
    vectored_fixed: false,
    clone_buffers: false,
    defer_taskrun: true,
    ext_arg: true,
    zcrx: false,
    zcrx_device_less: ZcrxProbe::NotInKernel,
    ladder: Rungs {
        groups: GroupRung::Ring { incremental: true },
        bundle: true,
        recv: MultishotRung::Kernel,
        accept: MultishotRung::Kernel,
        defer_taskrun: true,
        ext_arg: true,
        zc: ZcRung::SendmsgZc,
        zc_report_usage: true,
        fixed: true,
        vectored_fixed: false,
        clone_buffers: false,
        zcrx: ZcrxRung::Groups,
        merge_sends: true,
        exact_bundle_limit: false,
    },
};

/// The development host's 6.18: everything but device-less zero-copy receive (7.1): zcrx on
/// NIC queues only (loopback and virtio_net cannot).
const HOST: Row = Row {
    vectored_fixed: true,
    clone_buffers: true,
    zcrx: true,
    zcrx_device_less: ZcrxProbe::NotInKernel,
    ladder: Rungs {
        vectored_fixed: true,
        clone_buffers: true,
        zcrx: ZcrxRung::NicOnly,
        exact_bundle_limit: true,
        ..K6_12.ladder
    },
    ..K6_12
};

/// Debian trixie-backports' 7.3 (7.3.4): the host's rungs, and device-less zero-copy receive
/// areas (as root).
const K7_3: Row = Row {
    zcrx_device_less: ZcrxProbe::Works,
    ladder: Rungs {
        zcrx: ZcrxRung::DeviceLess,
        ..HOST.ladder
    },
    ..HOST
};

/// The rows, by (major, minor). The host's row is the one `RINGPOOL_REQUIRE_ALL=1` holds an
/// untabled newer kernel to.
const TABLE: &[((u32, u32), Row)] = &[
    ((5, 10), K5_10),
    ((6, 1), K6_1),
    ((6, 12), K6_12),
    ((6, 18), HOST),
    ((7, 3), K7_3),
];

fn require_all() -> bool {
    std::env::var("RINGPOOL_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// The row for `(major, minor)`, or `None` (after printing why) when the test must skip.
fn row_for(major: u32, minor: u32) -> Option<Row> {
    if let Some((_, row)) = TABLE.iter().find(|(k, _)| *k == (major, minor)) {
        return Some(*row);
    }
    let host = (6, 18);
    if require_all() {
        assert!(
            (major, minor) >= host,
            "no rung table entry for kernel {major}.{minor} and RINGPOOL_REQUIRE_ALL=1"
        );
        let (k, row) = TABLE
            .iter()
            .rev()
            .find(|(k, _)| *k <= (major, minor))
            .expect("the host row is below");
        eprintln!(
            "kernel {major}.{minor} has no rung table entry; RINGPOOL_REQUIRE_ALL=1: using the \
             newest entry below it ({}.{})",
            k.0, k.1
        );
        return Some(*row);
    }
    eprintln!("skipped: no rung table entry for kernel {major}.{minor}");
    None
}

/// The row the probe and the ladder actually give on this kernel.
fn observed(f: &Features) -> Row {
    Row {
        provide_buffers: f.provide_buffers,
        buf_ring: f.buf_ring,
        buf_ring_incremental: f.buf_ring_incremental,
        bundle: f.bundle,
        recv_multishot: f.recv_multishot,
        accept_multishot: f.accept_multishot,
        send_zc: f.send_zc,
        sendmsg_zc: f.sendmsg_zc,
        zc_report_usage: f.zc_report_usage,
        fixed_buffers: f.fixed_buffers,
        vectored_fixed: f.vectored_fixed,
        clone_buffers: f.clone_buffers,
        defer_taskrun: f.defer_taskrun,
        ext_arg: f.ext_arg,
        zcrx: f.zcrx,
        zcrx_device_less: f.zcrx_device_less,
        ladder: Ladder::choose(f, &[]).into(),
    }
}

/// One line per field where `want` and `got` differ.
fn differences(want: &Row, got: &Row) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |name: &str, w: String, g: String| {
        if w != g {
            out.push(format!("  {name}: table says {w}, kernel gave {g}"));
        }
    };
    macro_rules! field {
        ($($path:ident).+) => {
            cmp(
                stringify!($($path).+),
                format!("{:?}", want.$($path).+),
                format!("{:?}", got.$($path).+),
            )
        };
    }
    field!(provide_buffers);
    field!(buf_ring);
    field!(buf_ring_incremental);
    field!(bundle);
    field!(recv_multishot);
    field!(accept_multishot);
    field!(send_zc);
    field!(sendmsg_zc);
    field!(zc_report_usage);
    field!(fixed_buffers);
    field!(vectored_fixed);
    field!(clone_buffers);
    field!(defer_taskrun);
    field!(ext_arg);
    field!(zcrx);
    field!(zcrx_device_less);
    field!(ladder.groups);
    field!(ladder.bundle);
    field!(ladder.recv);
    field!(ladder.accept);
    field!(ladder.defer_taskrun);
    field!(ladder.ext_arg);
    field!(ladder.zc);
    field!(ladder.zc_report_usage);
    field!(ladder.fixed);
    field!(ladder.vectored_fixed);
    field!(ladder.clone_buffers);
    field!(ladder.zcrx);
    field!(ladder.merge_sends);
    field!(ladder.exact_bundle_limit);
    out
}

#[test]
fn probe_chooses_the_tabled_rungs_for_this_kernel() {
    let f = Features::get();
    assert!(f.io_uring, "io_uring setup failed on kernel {}", f.kernel);
    let got = observed(f);
    let supported = f.opcodes.iter().filter(|&&ok| ok).count();
    let highest = f.opcodes.iter().rposition(|&ok| ok);
    eprintln!(
        "kernel {}: probe found {supported} opcodes (highest {highest:?})",
        f.kernel
    );
    for (name, value) in [
        ("provide_buffers", got.provide_buffers),
        ("buf_ring", got.buf_ring),
        ("buf_ring_incremental", got.buf_ring_incremental),
        ("bundle", got.bundle),
        ("recv_multishot", got.recv_multishot),
        ("accept_multishot", got.accept_multishot),
        ("send_zc", got.send_zc),
        ("sendmsg_zc", got.sendmsg_zc),
        ("zc_report_usage", got.zc_report_usage),
        ("fixed_buffers", got.fixed_buffers),
        ("vectored_fixed", got.vectored_fixed),
        ("defer_taskrun", got.defer_taskrun),
        ("ext_arg", got.ext_arg),
        ("zcrx", got.zcrx),
        ("zcrx_device_less", got.zcrx_device_less == ZcrxProbe::Works),
    ] {
        eprintln!("  feature {name}: {}", if value { "yes" } else { "no" });
    }
    eprintln!("kernel {}: ladder chosen", f.kernel);
    for (capability, rung) in Ladder::choose(f, &[]).describe() {
        eprintln!("  rung {capability}: {rung}");
    }
    let Some(want) = row_for(f.kernel.major, f.kernel.minor) else {
        return;
    };
    let diff = differences(&want, &got);
    assert!(
        diff.is_empty(),
        "kernel {}: the probe disagrees with the rung table:\n{}",
        f.kernel,
        diff.join("\n")
    );
    // `ci/kernel-matrix.sh` looks for this line to know the table was really checked.
    eprintln!("RUNG-TABLE-OK kernel={}.{}", f.kernel.major, f.kernel.minor);
}

#[test]
fn rows_follow_the_ladder_rules() {
    // The ladder of each row must be what `Ladder::choose` makes of the row's features, so the
    // table cannot contradict itself.
    for ((major, minor), row) in TABLE {
        let mut f = Features::get().clone();
        f.kernel = ringpool::sys::KernelVersion {
            major: *major,
            minor: *minor,
            patch: 0,
        };
        f.provide_buffers = row.provide_buffers;
        f.buf_ring = row.buf_ring;
        f.buf_ring_incremental = row.buf_ring_incremental;
        f.bundle = row.bundle;
        f.recv_multishot = row.recv_multishot;
        f.accept_multishot = row.accept_multishot;
        f.send_zc = row.send_zc;
        f.sendmsg_zc = row.sendmsg_zc;
        f.zc_report_usage = row.zc_report_usage;
        f.fixed_buffers = row.fixed_buffers;
        f.vectored_fixed = row.vectored_fixed;
        f.clone_buffers = row.clone_buffers;
        f.defer_taskrun = row.defer_taskrun;
        f.ext_arg = row.ext_arg;
        f.zcrx = row.zcrx;
        f.zcrx_device_less = row.zcrx_device_less;
        let diff = differences(row, &observed(&f));
        assert!(
            diff.is_empty(),
            "row {major}.{minor}: its rungs are not what its features give:\n{}",
            diff.join("\n")
        );
    }
}
