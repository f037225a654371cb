//! Registered memory against the real kernel: the fixed buffer table (slots, tags, a full table,
//! release while in use), `O_DIRECT` round trips through `READ/WRITE(V)_FIXED`, registered
//! regions (provided buffers backed by registered memory) whose received buffers leave by
//! zero-copy send from where they landed, alone and as bundles, and the memlock limit of an
//! unprivileged user. Every fallback rung is forced here too.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use common::{fixed_result, pattern_vec, pump, require, require_env, tcp_pair};
use ringpool::{
    BufGroupConfig, Driver, DriverConfig, Error, Event, Fd, Features, Force, RecvMode,
    Registration, SendBuf, ZcConfig, ZcMode,
};

/// The registered-memory rungs: the kernel's best, `READV/WRITEV` on registered memory, and
/// plain memory throughout.
const FIXED_RUNGS: &[(&str, &[Force])] = &[
    ("best", &[]),
    ("no-vectored-fixed", &[Force::NoVectoredFixed]),
    ("no-fixed", &[Force::NoFixed]),
];

fn driver(force: &[Force]) -> Driver {
    let mut cfg = DriverConfig::default()
        .ignore_env()
        .zerocopy(ZcConfig::default().mode(ZcMode::On));
    for f in force {
        cfg = cfg.force(*f);
    }
    Driver::new(cfg).unwrap()
}

fn fixed_supported() -> bool {
    require(Features::get().fixed_buffers, "a sparse fixed buffer table")
}

/// Cargo's scratch dir on the build machine's disk; the system temp dir where the test binary
/// runs elsewhere (the kernel-matrix guests).
fn scratch_dir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if dir.is_dir() {
        dir
    } else {
        std::env::temp_dir()
    }
}

/// A file opened with `O_DIRECT` in the target's temp dir (a real disk filesystem), or `None`
/// (visibly skipped) where the filesystem refuses `O_DIRECT`.
fn direct_file(dir: &std::path::Path) -> Option<(Fd, std::path::PathBuf)> {
    let path = dir.join("direct.bin");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(f) => Some((Fd::from(std::os::fd::OwnedFd::from(f)), path)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            require_env(false, "O_DIRECT on the scratch filesystem");
            None
        }
        Err(e) => panic!("open O_DIRECT: {e}"),
    }
}

#[test]
fn o_direct_round_trips_with_registered_buffers_single_and_vectored() {
    // Runs on every kernel: where registered memory is missing, every rung is plain memory
    // (the fallback), which must work the same.
    if !Features::get().fixed_buffers {
        eprintln!("registered memory missing on this kernel: every rung runs on plain memory");
    }
    const MIB: usize = 1 << 20;
    const PART: usize = 64 << 10;
    for (name, force) in FIXED_RUNGS {
        let mut d = driver(force);
        let tmp = tempfile::tempdir_in(scratch_dir()).unwrap();
        let Some((fd, path)) = direct_file(tmp.path()) else {
            return;
        };
        let mut out = d.fixed_buf_or_plain(MIB).unwrap();
        assert_eq!(out.is_registered(), d.ladder().fixed, "{name}");
        out.copy_from_slice(&pattern_vec(7, 0, MIB));

        // One aligned write of 1 MiB, then four 64 KiB parts, out of order, in one op.
        d.write_fixed(&fd, out, 0..MIB, 0, 1).unwrap();
        let (out, r) = fixed_result(&mut d);
        assert_eq!(r.unwrap(), MIB, "{name}");
        let parts = [
            3 * PART..4 * PART,
            0..PART,
            2 * PART..3 * PART,
            PART..2 * PART,
        ];
        d.write_fixed_vectored(&fd, out, &parts, MIB as u64, 2)
            .unwrap();
        let (out, r) = fixed_result(&mut d);
        assert_eq!(r.unwrap(), 4 * PART, "{name}");
        let mut expected = out[..MIB].to_vec();
        for p in &parts {
            expected.extend_from_slice(&out[p.clone()]);
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            expected,
            "{name}: file bytes"
        );

        // Read it back with O_DIRECT: whole, then vectored into scattered ranges.
        let inb = d.fixed_buf_or_plain(MIB + 4 * PART).unwrap();
        d.read_fixed(&fd, inb, 0..MIB, 0, 3).unwrap();
        let (inb, r) = fixed_result(&mut d);
        assert_eq!(r.unwrap(), MIB, "{name}");
        assert!(inb[..MIB] == expected[..MIB], "{name}: read_fixed bytes");
        let back = [MIB + 2 * PART..MIB + 4 * PART, MIB..MIB + 2 * PART];
        d.read_fixed_vectored(&fd, inb, &back, MIB as u64, 4)
            .unwrap();
        let (inb, r) = fixed_result(&mut d);
        assert_eq!(r.unwrap(), 4 * PART, "{name}");
        let mut got = inb[back[0].clone()].to_vec();
        got.extend_from_slice(&inb[back[1].clone()]);
        assert!(got == expected[MIB..], "{name}: read_fixed_vectored bytes");

        let used = d.fixed_stats().used;
        assert_eq!(used, 2 * d.ladder().fixed as u32, "{name}");
        drop((out, inb));
        wait_table_empty(&mut d, name);
    }
}

/// Waits until every slot of the table is free again (released and confirmed by its tag).
fn wait_table_empty(d: &mut Driver, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        d.wait(Some(Duration::from_millis(10))).unwrap();
        let s = d.fixed_stats();
        if s.used == 0 && s.releasing == 0 {
            assert_eq!(s.registered_bytes, 0, "{name}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: table never emptied: {s:?}"
        );
    }
}

#[test]
fn a_misaligned_o_direct_buffer_is_einval_and_the_buffer_comes_back() {
    if !fixed_supported() {
        return;
    }
    let mut d = driver(&[]);
    let tmp = tempfile::tempdir_in(scratch_dir()).unwrap();
    let Some((fd, _)) = direct_file(tmp.path()) else {
        return;
    };
    // tmpfs accepts O_DIRECT (6.6+) without any alignment rule: nothing to test there.
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // SAFETY: statfs is plain old data; all-zero is valid.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes a statfs into `fs`, a valid, writable one, for a live descriptor.
    assert_eq!(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) }, 0);
    if !require_env(
        fs.f_type as i64 != TMPFS_MAGIC,
        "a scratch filesystem that enforces O_DIRECT alignment (tmpfs does not)",
    ) {
        return;
    }
    let buf = d.fixed_buf(8192).unwrap();
    d.write_fixed(&fd, buf, 1..4097, 0, 1).unwrap();
    let (buf, r) = fixed_result(&mut d);
    let err = r.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert_eq!(buf.len(), 8192, "the buffer came back whole");
    assert!(buf.is_registered());
}

#[test]
fn a_full_table_is_a_typed_error_and_a_dropped_buffer_frees_its_slot() {
    if !fixed_supported() {
        return;
    }
    let mut d = Driver::new(DriverConfig::default().ignore_env().fixed_slots(2)).unwrap();
    let a = d.fixed_buf(4096).unwrap();
    let b = d.fixed_buf(4096).unwrap();
    assert_ne!(a.slot(), b.slot());
    let err = d.fixed_buf(4096).unwrap_err();
    assert!(matches!(err, Error::FixedTableFull { slots: 2 }), "{err}");
    assert!(err.to_string().contains("2 slots"), "{err}");
    let plain = d.fixed_buf_or_plain(4096).unwrap();
    assert!(!plain.is_registered(), "the fallback is plain memory");
    let slot = a.slot();
    drop(a);
    // The release goes to the kernel; its tag CQE frees the slot for the next registration.
    // 6.18 confirms at once; 6.1 only from a delayed work item, up to about a second later:
    // until then the slot is releasing and a registration that needs it gets the typed error.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let c = loop {
        match d.fixed_buf(4096) {
            Ok(c) => break c,
            Err(Error::FixedTableFull { .. }) => {
                assert_eq!(d.fixed_stats().releasing, 1, "full only while releasing");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the release never came"
                );
                d.wait(Some(Duration::from_millis(50))).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(c.slot(), slot, "the released slot is reused");
    drop((b, c));
    wait_table_empty(&mut d, "table-full");
}

#[test]
fn a_forced_no_fixed_rung_says_so_and_the_fallback_is_plain_memory() {
    let mut d = driver(&[Force::NoFixed]);
    let err = d.fixed_buf(4096).unwrap_err();
    if Features::get().fixed_buffers {
        assert!(
            matches!(
                err,
                Error::RungForced {
                    rung: "no-fixed",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("no-fixed"), "{err}");
    } else {
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
    assert!(!d.fixed_buf_or_plain(4096).unwrap().is_registered());
}

#[test]
fn bad_registered_arguments_are_typed_errors() {
    if !fixed_supported() {
        return;
    }
    let mut d = driver(&[]);
    for len in [0, (1 << 30) + 1] {
        let err = d.fixed_buf(len).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{len}: {err}");
    }
    let err = d
        .buf_group(
            BufGroupConfig::new(4096, 16)
                .max_count(64)
                .registration(Registration::Required),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let Err(err) = Driver::new(DriverConfig::default().fixed_slots(0)) else {
        panic!("a table of 0 slots was accepted");
    };
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let file = Fd::from(std::os::fd::OwnedFd::from(tempfile::tempfile().unwrap()));
    let buf = d.fixed_buf(4096).unwrap();
    let err = d.read_fixed(&file, buf, 0..4097, 0, 1).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let buf = d.fixed_buf(4096).unwrap();
    let err = d.read_fixed_vectored(&file, buf, &[], 0, 1).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let (s, _peer) = tcp_pair();
    let buf = d.fixed_buf(4096).unwrap();
    let err = d
        .send_zc(
            &Fd::from(s),
            SendBuf::Fixed {
                buf,
                range: 10..5000,
            },
            1,
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    wait_table_empty(&mut d, "bad arguments");
}

/// Receives `LEN` bytes into a registered region and forwards every received chain with
/// zero-copy send from where it landed; checks the bytes, the fixed sends and the full group.
fn forward_through_region(name: &str, force: &[Force], mode: RecvMode) {
    let mut d = driver(force);
    let g = d
        .buf_group(BufGroupConfig::new(4096, 16).registration(Registration::Required))
        .unwrap();
    assert!(g.is_registered(), "{name}");
    let (a, mut a_peer) = tcp_pair();
    let (b, b_peer) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    const LEN: usize = 4 << 20;
    let writer = std::thread::spawn(move || {
        a_peer.write_all(&pattern_vec(31, 0, LEN)).unwrap();
    });
    let reader = std::thread::spawn(move || {
        let mut v = vec![0u8; LEN];
        let mut r = b_peer;
        r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        r.read_exact(&mut v).unwrap();
        v
    });
    let multishot = matches!(mode, RecvMode::Multishot | RecvMode::MultishotBundle);
    d.recv(&a, &g, mode, 1).unwrap();
    let (mut received, mut acked, mut max_bufs) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < LEN {
        assert!(
            Instant::now() < deadline,
            "{name}: stalled at {received}/{acked}"
        );
        d.wait(Some(Duration::from_millis(100))).unwrap();
        while let Some(comp) = d.pop() {
            match comp.event {
                Event::Data(chain) => {
                    received += chain.len();
                    max_bufs = max_bufs.max(chain.buf_count());
                    assert!(
                        chain.fixed_slot().is_some(),
                        "{name}: region buffers carry their slot"
                    );
                    d.send_zc(&b, chain, 2).unwrap();
                    if !comp.more && !multishot && received < LEN {
                        d.recv(&a, &g, mode, 1).unwrap();
                    }
                }
                Event::Sent { result, .. } => acked += result.unwrap(),
                Event::Eof => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    }
    writer.join().unwrap();
    assert!(
        reader.join().unwrap() == pattern_vec(31, 0, LEN),
        "{name}: bytes differ"
    );
    let z = d.zc_stats();
    assert!(z.zc_sends > 0, "{name}: {z:?}");
    if d.ladder().vectored_fixed || max_bufs == 1 || d.ladder().zc == ringpool::ZcRung::SendZc {
        assert_eq!(
            z.fixed_sends, z.zc_sends,
            "{name}: every zero-copy send named the region: {z:?}"
        );
    } else {
        // Without registered iovecs in SENDMSG_ZC, bundles pin their pages per send.
        assert!(z.fixed_sends < z.zc_sends, "{name}: {z:?}");
    }
    eprintln!("{name}: largest chain {max_bufs} buffers, {z:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.stats().in_user != 0 {
        assert!(Instant::now() < deadline, "{name}: buffers never came home");
        d.wait(Some(Duration::from_millis(10))).unwrap();
    }
    assert_eq!(g.stats().in_kernel, g.stats().total, "{name}");
    drop(g);
    wait_table_empty(&mut d, name);
}

#[test]
fn recv_into_a_region_then_zero_copy_send_from_it_single_and_bundled() {
    if !fixed_supported() || !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    forward_through_region("single, sendmsg_zc rung", &[], RecvMode::Once);
    forward_through_region(
        "single, send_zc rung",
        &[Force::NoSendmsgZc],
        RecvMode::Once,
    );
    if require(Features::get().bundle, "recv bundles") {
        forward_through_region("bundle", &[], RecvMode::Bundle);
        forward_through_region("multishot bundle", &[], RecvMode::MultishotBundle);
        forward_through_region(
            "bundle, no vectored fixed",
            &[Force::NoVectoredFixed],
            RecvMode::MultishotBundle,
        );
    }
}

#[test]
fn a_region_whose_handle_is_dropped_mid_send_is_released_after_the_notification() {
    if !fixed_supported() || !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    let mut d = driver(&[]);
    let g = d
        .buf_group(BufGroupConfig::new(4096, 8).registration(Registration::Required))
        .unwrap();
    let (a, mut a_peer) = tcp_pair();
    let (b, b_peer) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    a_peer.write_all(&pattern_vec(5, 0, 4096)).unwrap();
    d.recv(&a, &g, RecvMode::Once, 1).unwrap();
    let mut chain = None;
    pump(&mut d, 10, |c| match c.event {
        Event::Data(ch) => {
            chain = Some(ch);
            true
        }
        other => panic!("{other:?}"),
    });
    let chain = chain.unwrap();
    let n = chain.len();
    // Fill the path to `b_peer` so that the send cannot finish before the peer reads: until
    // then the send holds the region's buffer, so the slot must stay registered.
    // Fixed small socket buffers (no autotuning, which in the 6.12 guest grew them again after
    // the fill), filled twice with a pause between, so the path stays full.
    set_buf_sizes(&b, libc::SO_SNDBUF);
    set_buf_sizes(&b_peer, libc::SO_RCVBUF);
    let mut filler = fill_socket(&b);
    std::thread::sleep(Duration::from_millis(50));
    filler += fill_socket(&b);
    d.send_zc(&b, chain, 2).unwrap();
    drop(g);
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        d.wait(Some(Duration::from_millis(20))).unwrap();
        if let Some(c) = d.pop() {
            panic!("the send cannot have finished: {:?}", c.event);
        }
        assert_eq!(d.fixed_stats().used, 1, "released while a send used it");
    }
    let reader = std::thread::spawn(move || {
        let mut b_peer = b_peer;
        let mut got = vec![0u8; filler + n];
        b_peer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        b_peer.read_exact(&mut got).unwrap();
        got
    });
    pump(&mut d, 10, |c| match c.event {
        Event::Sent { result, .. } => {
            assert_eq!(result.unwrap(), n);
            true
        }
        other => panic!("{other:?}"),
    });
    let got = reader.join().unwrap();
    assert!(
        got[filler..] == pattern_vec(5, 0, n),
        "the region's bytes arrived intact"
    );
    wait_table_empty(&mut d, "dropped region");
}

/// Sets the socket's `which` buffer (SO_SNDBUF or SO_RCVBUF) to its minimum, which also stops
/// the kernel from growing it.
fn set_buf_sizes(fd: &impl AsRawFd, which: libc::c_int) {
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt reads a valid c_int of the given size on a live socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            which,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

/// Writes zeros to `fd` without blocking until the socket and its peer's receive queue are
/// full; returns how many.
fn fill_socket(fd: &Fd) -> usize {
    use std::os::fd::AsRawFd;
    let chunk = [0u8; 65536];
    let mut total = 0;
    loop {
        // SAFETY: a non-blocking send from a live buffer on a live socket.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                chunk.as_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return total;
        }
        total += n as usize;
    }
}

#[test]
fn an_empty_zero_copy_send_from_registered_memory_is_zero_bytes_not_efault() {
    if !fixed_supported() || !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    let mut d = driver(&[]);
    let buf = d.fixed_buf(4096).unwrap();
    let (s, _peer) = tcp_pair();
    d.send_zc(&Fd::from(s), SendBuf::Fixed { buf, range: 7..7 }, 1)
        .unwrap();
    pump(&mut d, 10, |c| match c.event {
        Event::Sent { result, .. } => {
            assert_eq!(result.unwrap(), 0);
            true
        }
        other => panic!("{other:?}"),
    });
}

#[test]
fn a_fixed_buffer_sent_with_zero_copy_comes_back_after_its_notification() {
    if !fixed_supported() || !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    let mut d = driver(&[]);
    let mut buf = d.fixed_buf(1 << 16).unwrap();
    buf.copy_from_slice(&pattern_vec(9, 0, 1 << 16));
    let slot = buf.slot();
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    let reader = std::thread::spawn(move || {
        let mut v = vec![0u8; 60000];
        let mut r = peer;
        r.read_exact(&mut v).unwrap();
        v
    });
    d.send_zc_returning(
        &s,
        SendBuf::Fixed {
            buf,
            range: 100..60100,
        },
        1,
    )
    .unwrap();
    let mut back = None;
    pump(&mut d, 10, |c| match c.event {
        Event::Sent { result, .. } => {
            assert_eq!(result.unwrap(), 60000);
            false
        }
        Event::Returned(SendBuf::Fixed { buf, range }) => {
            assert_eq!(range, 100..60100);
            back = Some(buf);
            true
        }
        other => panic!("{other:?}"),
    });
    assert_eq!(reader.join().unwrap(), pattern_vec(9, 100, 60000));
    assert_eq!(back.unwrap().slot(), slot);
    assert_eq!(d.zc_stats().fixed_sends, 1);
}

/// The body run as uid 65534 (no `CAP_IPC_LOCK`, 8 MiB memlock here).
fn unprivileged_child() {
    let limit = match ringpool::sys::Memlock::current() {
        ringpool::sys::Memlock::Limited(b) => b,
        ringpool::sys::Memlock::Unlimited => panic!("the child runs without a memlock limit"),
    };
    let big = (limit as usize * 2).next_power_of_two();
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let err = d.fixed_buf(big).unwrap_err();
    match &err {
        Error::MemlockExceeded {
            asked, limit: l, ..
        } => {
            assert_eq!(*asked, big as u64);
            assert_eq!(*l, Some(limit));
        }
        other => panic!("expected MemlockExceeded, got {other}"),
    }
    println!("memlock error: {err}");
    assert!(!d.fixed_buf_or_plain(big).unwrap().is_registered());
    let small = d.fixed_buf(4096).unwrap();
    assert!(small.is_registered(), "below the limit registration works");
    let cfg = BufGroupConfig::new(64 << 10, (big / (64 << 10)) as u32);
    let err = d
        .buf_group(cfg.clone().registration(Registration::Required))
        .unwrap_err();
    assert!(matches!(err, Error::MemlockExceeded { .. }), "{err}");
    // The documented fallback: plain memory, and the group works end to end.
    let g = d
        .buf_group(cfg.registration(Registration::Preferred))
        .unwrap();
    assert!(!g.is_registered());
    let (a, mut peer) = tcp_pair();
    let a = Fd::from(a);
    peer.write_all(b"through plain memory").unwrap();
    d.recv(&a, &g, RecvMode::Once, 1).unwrap();
    pump(&mut d, 10, |c| match c.event {
        Event::Data(ch) => {
            assert_eq!(ch.to_vec(), b"through plain memory");
            true
        }
        other => panic!("{other:?}"),
    });
    println!("unprivileged child ok");
}

#[test]
fn memlock_as_an_unprivileged_user_gives_a_typed_error_or_the_fallback() {
    if std::env::var_os("RINGPOOL_UNPRIVILEGED_CHILD").is_some() {
        unprivileged_child();
        return;
    }
    if !fixed_supported() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = std::path::Path::new("/usr/bin/setpriv").exists();
    if !require_env(root && setpriv, "root with setpriv (to drop to uid 65534)") {
        return;
    }
    // The child must be able to execute the test binary: copy it somewhere world-readable.
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("registered-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "memlock_as_an_unprivileged_user_gives_a_typed_error_or_the_fallback",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RINGPOOL_UNPRIVILEGED_CHILD", "1")
        .env("HOME", dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("unprivileged child ok"),
        "child failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("memlock error"))
        .unwrap_or_else(|| panic!("no memlock error line in {stdout}"));
    eprintln!("{line}");
    assert!(line.contains("memlock limit"), "{line}");
}

/// Receives a little into `g` (a registered region) and forwards it with zero-copy send.
fn small_round_trip(d: &mut Driver, g: &ringpool::BufGroup, seed: u64) {
    let (a, mut a_peer) = tcp_pair();
    let (b, mut b_peer) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    let data = pattern_vec(seed, 0, 100_000);
    a_peer.write_all(&data).unwrap();
    drop(a_peer);
    d.recv(&a, g, RecvMode::Multishot, 1).unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = vec![0u8; 100_000];
        b_peer.read_exact(&mut v).unwrap();
        v
    });
    let (mut eof, mut chains) = (false, Vec::new());
    pump(d, 10, |c| {
        match c.event {
            Event::Data(chain) => {
                assert!(chain.fixed_slot().is_some());
                chains.push(chain);
            }
            Event::Eof => eof = true,
            other => panic!("{other:?}"),
        }
        eof
    });
    for chain in chains {
        d.send_zc(&b, chain, 2).unwrap();
    }
    let mut sent = 0;
    pump(d, 10, |c| {
        if let Event::Sent { result, .. } = c.event {
            sent += result.unwrap();
        }
        sent == 100_000
    });
    assert_eq!(reader.join().unwrap(), data);
}

/// Restores `/proc/sys/vm/nr_hugepages` when dropped.
struct HugePagesReserved(String);

impl Drop for HugePagesReserved {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", &self.0);
    }
}

#[test]
fn huge_page_backed_regions_where_the_system_has_huge_pages() {
    if !fixed_supported() || !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    let mut d = driver(&[]);
    let cfg = BufGroupConfig::new(64 << 10, 32)
        .registration(Registration::Required)
        .huge_pages(true);
    // Without reserved huge pages: transparent huge pages where enabled, else normal pages.
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if free == 0 {
        let g = d.buf_group(cfg.clone()).unwrap();
        assert_ne!(g.page_backing(), ringpool::PageBacking::HugeTlb);
        eprintln!("no reserved huge pages: {:?}", g.page_backing());
        small_round_trip(&mut d, &g, 40);
    }
    // With reserved huge pages (root can reserve two for the test; restored afterwards).
    let Ok(old) = std::fs::read_to_string("/proc/sys/vm/nr_hugepages") else {
        eprintln!("skipped: reserved huge pages (no /proc/sys/vm/nr_hugepages)");
        return;
    };
    let old = old.trim().to_string();
    let want = old.parse::<u64>().unwrap_or(0) + 2;
    if std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string()).is_err() {
        eprintln!("skipped: reserved huge pages (cannot reserve: not root)");
        return;
    }
    let _restore = HugePagesReserved(old);
    let g = d.buf_group(cfg).unwrap();
    if g.page_backing() != ringpool::PageBacking::HugeTlb {
        // The kernel could not find two free 2 MiB pages (fragmented memory): say so.
        eprintln!("skipped: reserved huge pages (the kernel could not reserve two)");
        return;
    }
    assert!(g.is_registered());
    eprintln!("reserved huge pages: {:?}", g.page_backing());
    small_round_trip(&mut d, &g, 41);
    drop(g);
    wait_table_empty(&mut d, "huge pages");
}
