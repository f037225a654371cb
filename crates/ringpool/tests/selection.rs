//! Buffer selection against the real kernel: recv (once, multishot, bundle), incremental rings,
//! reads from files, multishot accept, growth, and the typed errors of bad input. Each
//! end-to-end test runs on every rung of the fallback ladder.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use common::{pattern_vec, pump, require, tcp_pair, RUNGS};
use ringpool::{BufGroupConfig, Driver, DriverConfig, Error, Event, Fd, Features, RecvMode};

#[test]
fn recv_once_selects_a_buffer_on_every_rung() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(1024, 4)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Once, 1).unwrap();
        c.write_all(b"selected").unwrap();
        pump(&mut d, 10, |comp| {
            assert!(!comp.more, "a single-shot recv completes once");
            match comp.event {
                Event::Data(chain) => {
                    assert_eq!(chain.to_vec(), b"selected");
                    assert_eq!(chain.buf_count(), 1);
                    assert_eq!(g.stats().in_user, 1, "the buffer is in user hands");
                }
                other => panic!("{}: {other:?}", rung.name),
            }
            true
        });
        let s = g.stats();
        assert_eq!(
            (s.in_user, s.in_kernel, s.total),
            (0, 4, 4),
            "{}: group full again",
            rung.name
        );
        assert_eq!(s.bytes_received, 8);
    }
}

/// Regression test (`core_regression_36c1ff9876`, 6.1 guest): 6.1 keeps a buffer ring's head
/// when the ring is unregistered, so a group whose ring took a dropped group's id at once had
/// every selection fail with `ENOBUFS`. Ids now go round: a dropped group's id is used again
/// only after every other one. Before the fix the second group got the first one's id.
#[test]
fn a_dropped_group_s_id_is_used_again_only_after_every_other() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let first = d.buf_group(BufGroupConfig::new(1024, 4)).unwrap();
        let first_id = first.id();
        drop(first);
        // The driver forgets the group (unregisters its ring) once its handle is gone.
        d.wait(Some(Duration::from_millis(10))).unwrap();
        let g = d.buf_group(BufGroupConfig::new(1024, 4)).unwrap();
        assert_ne!(g.id(), first_id, "{}: a just-freed id came back", rung.name);
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Once, 1).unwrap();
        c.write_all(b"fresh").unwrap();
        pump(&mut d, 10, |comp| match comp.event {
            Event::Data(chain) => {
                assert_eq!(chain.to_vec(), b"fresh");
                true
            }
            other => panic!("{}: {other:?}", rung.name),
        });
    }
}

#[test]
fn multishot_recv_delivers_in_order_then_eof_on_every_rung() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(512, 16)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 9).unwrap();
        let sent = pattern_vec(3, 0, 100_000);
        let writer = std::thread::spawn(move || {
            for chunk in sent.chunks(7000) {
                c.write_all(chunk).unwrap();
            }
        });
        let mut got = Vec::new();
        pump(&mut d, 20, |comp| match comp.event {
            Event::Data(chain) => {
                assert!(comp.more);
                got.extend(chain.to_vec());
                false
            }
            Event::Eof => {
                assert!(!comp.more);
                true
            }
            other => panic!("{}: {other:?}", rung.name),
        });
        writer.join().unwrap();
        assert_eq!(
            got,
            pattern_vec(3, 0, 100_000),
            "{}: bytes in order",
            rung.name
        );
        assert_eq!(d.in_flight(), 0);
        assert_eq!(g.stats().in_user, 0);
    }
}

/// Regression: a bundle's buffers are the ring entries after the first bid, which are not
/// consecutive bids once buffers came back in another order.
#[test]
fn recv_bundle_follows_ring_order_after_out_of_order_returns() {
    if !require(Features::get().bundle, "recv bundle") {
        return;
    }
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    assert!(d.ladder().bundle);
    let g = d.buf_group(BufGroupConfig::new(64, 16)).unwrap();
    let (s, mut c) = tcp_pair();
    let s = Fd::from(s);
    // Take eight buffers and give them back in reverse, scrambling the ring order.
    let mut held = Vec::new();
    for i in 0..8u8 {
        d.recv(&s, &g, RecvMode::Once, 0).unwrap();
        c.write_all(&[i; 10]).unwrap();
        pump(&mut d, 10, |comp| {
            if let Event::Data(chain) = comp.event {
                held.push(chain);
            }
            true
        });
    }
    while let Some(chain) = held.pop() {
        drop(chain);
    }
    // Now 300 bytes into 64-byte buffers: several buffers per completion.
    let sent = pattern_vec(11, 0, 3000);
    c.write_all(&sent).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut got = Vec::new();
    let mut most = 0;
    while got.len() < sent.len() {
        d.recv(&s, &g, RecvMode::Bundle, 0).unwrap();
        pump(&mut d, 10, |comp| {
            match comp.event {
                Event::Data(chain) => {
                    most = most.max(chain.buf_count());
                    for b in &chain {
                        assert!(b.len() <= 64);
                    }
                    got.extend(chain.to_vec());
                }
                other => panic!("{other:?}"),
            }
            true
        });
    }
    assert_eq!(got, sent, "bundle bytes in ring order");
    assert!(most > 1, "a bundle carried several buffers");
    assert_eq!(g.stats().in_user, 0);
}

/// `recv_bundle_limited` with a socket holding far more than its limit: no completion takes
/// more than `max_bufs` buffers (the kernel would otherwise retry a full bundle and take what
/// the socket holds), the bytes arrive once and in order, and where the kernel has bundles a
/// limit of 8 moves several buffers per completion, all 8 where the kernel stops at a cut
/// buffer (`Ladder::exact_bundle_limit`). On every rung, and with the exact limit forced off;
/// 0 is refused.
#[test]
fn a_limited_bundle_takes_at_most_its_buffers() {
    for rung in RUNGS {
        limited_bundles_on(rung.name, rung.driver());
    }
    let loose = DriverConfig::default()
        .ignore_env()
        .force(ringpool::Force::NoExactBundleLimit);
    let d = Driver::new(loose).unwrap();
    assert!(!d.ladder().exact_bundle_limit);
    limited_bundles_on("no-exact-bundle-limit", d);
}

fn limited_bundles_on(name: &str, mut d: Driver) {
    let g = d.buf_group(BufGroupConfig::new(1024, 64)).unwrap();
    let (s, mut c) = tcp_pair();
    let s = Fd::from(s);
    assert!(matches!(
        d.recv_bundle_limited(&s, &g, 0, 0),
        Err(Error::InvalidArgument { .. })
    ));
    let sent = pattern_vec(17, 0, 200_000);
    c.write_all(&sent).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (mut got, mut most_at_8) = (Vec::new(), 0);
    for max in [1u32, 2, 3, 5, 8].into_iter().cycle() {
        if got.len() == sent.len() {
            break;
        }
        d.recv_bundle_limited(&s, &g, max, 0).unwrap();
        pump(&mut d, 10, |comp| {
            let Event::Data(chain) = comp.event else {
                panic!("{:?}", comp.event)
            };
            let n = chain.buf_count() as u32;
            assert!(n <= max, "{name}: {n} buffers taken, limit {max}");
            if max == 8 {
                most_at_8 = most_at_8.max(n);
            }
            got.extend(chain.to_vec());
            true
        });
        assert_eq!(g.stats().in_user, 0, "{name}");
    }
    assert!(got == sent, "{name}: bytes differ");
    let ladder = d.ladder();
    if ladder.exact_bundle_limit {
        assert_eq!(
            most_at_8, 8,
            "{name}: the whole limit where the kernel stops at a cut"
        );
    } else if ladder.bundle {
        assert!(most_at_8 > 1, "{name}: a limit of 8 took {most_at_8}");
    }
}

#[test]
fn multishot_bundle_stream_is_intact() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(256, 32)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::MultishotBundle, 0).unwrap();
        let sent = pattern_vec(5, 0, 300_000);
        let data = sent.clone();
        let writer = std::thread::spawn(move || c.write_all(&data).unwrap());
        let mut got = Vec::new();
        pump(&mut d, 20, |comp| match comp.event {
            Event::Data(chain) => {
                got.extend(chain.to_vec());
                false
            }
            Event::Eof => true,
            other => panic!("{other:?}"),
        });
        writer.join().unwrap();
        assert_eq!(got, sent, "{}", rung.name);
        assert_eq!(g.stats().in_user, 0);
    }
}

#[test]
fn incremental_ring_appends_consecutive_recvs_into_one_buffer() {
    if !require(
        Features::get().buf_ring_incremental,
        "incremental buffer ring",
    ) {
        return;
    }
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let g = d
        .buf_group(BufGroupConfig::new(4096, 4).incremental(true))
        .unwrap();
    assert!(g.is_incremental());
    let (s, mut c) = tcp_pair();
    let s = Fd::from(s);
    d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
    let mut slices = Vec::new();
    for i in 0..5u64 {
        let msg = pattern_vec(i, 0, 100);
        c.write_all(&msg).unwrap();
        pump(&mut d, 10, |comp| match comp.event {
            Event::Data(chain) => {
                assert_eq!(chain.to_vec(), msg);
                slices.extend(chain);
                true
            }
            other => panic!("{other:?}"),
        });
    }
    let first = slices[0].bid();
    assert!(
        slices.iter().all(|b| b.bid() == first),
        "consecutive recvs share one buffer"
    );
    assert_eq!(g.stats().in_user, 1, "one buffer is out, in five slices");
    // The slices are disjoint parts of the same buffer and still hold their bytes.
    for (i, b) in slices.iter().enumerate() {
        assert_eq!(&b[..], &pattern_vec(i as u64, 0, 100)[..]);
    }
    drop(slices);
    assert_eq!(g.stats().in_user, 0);
    // Fill past one buffer: the kernel moves on to the next buffer.
    let big = pattern_vec(99, 0, 10_000);
    c.write_all(&big).unwrap();
    drop(c);
    let mut got = Vec::new();
    pump(&mut d, 10, |comp| match comp.event {
        Event::Data(chain) => {
            got.extend(chain.to_vec());
            false
        }
        Event::Eof => true,
        other => panic!("{other:?}"),
    });
    assert_eq!(got, big);
    let s = g.stats();
    assert_eq!((s.in_user, s.in_kernel), (0, 4));
}

#[test]
fn read_selects_buffers_from_a_file() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(4096, 4)).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "ringpool-read-{}-{}",
            std::process::id(),
            rung.name
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        let content = pattern_vec(7, 0, 10_000);
        std::fs::write(&path, &content).unwrap();
        let f = Fd::from(std::os::fd::OwnedFd::from(
            std::fs::File::open(&path).unwrap(),
        ));
        let mut got = Vec::new();
        let mut offset = 0u64;
        loop {
            d.read(&f, &g, offset, 0).unwrap();
            let mut eof = false;
            pump(&mut d, 10, |comp| {
                match comp.event {
                    Event::Data(chain) => {
                        offset += chain.len() as u64;
                        got.extend(chain.to_vec());
                    }
                    Event::Eof => eof = true,
                    other => panic!("{other:?}"),
                }
                true
            });
            if eof {
                break;
            }
        }
        assert_eq!(got, content, "{}", rung.name);
        assert_eq!(g.stats().in_user, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn accept_multishot_accepts_every_connection_on_every_rung() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let l = Fd::from(l);
        let op = d.accept_multishot(&l, 5).unwrap();
        let clients: Vec<_> = (0..20)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut accepted = Vec::new();
        pump(&mut d, 10, |comp| {
            assert!(comp.more, "accept goes on until cancelled");
            match comp.event {
                Event::Accepted(fd) => accepted.push(fd),
                other => panic!("{other:?}"),
            }
            accepted.len() == clients.len()
        });
        d.cancel(op);
        pump(&mut d, 10, |comp| {
            assert!(!comp.more);
            matches!(comp.event, Event::Error(Error::Cancelled))
        });
        assert_eq!(d.in_flight(), 0, "{}", rung.name);
    }
}

#[test]
fn group_grows_up_to_its_maximum_instead_of_waiting() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d
            .buf_group(BufGroupConfig::new(64, 4).max_count(16))
            .unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
        let sent = pattern_vec(1, 0, 64 * 40);
        c.write_all(&sent).unwrap();
        drop(c);
        let mut held = Vec::new();
        let mut got = Vec::new();
        pump(&mut d, 20, |comp| match comp.event {
            Event::Data(chain) => {
                got.extend(chain.to_vec());
                // Hold twelve buffers: with four buffers per chunk the group must grow to its
                // maximum of sixteen to keep going.
                if held.len() < 12 {
                    held.push(chain);
                }
                false
            }
            Event::Eof => true,
            other => panic!("{other:?}"),
        });
        assert_eq!(got, sent, "{}", rung.name);
        let s = g.stats();
        assert_eq!(s.total, 16, "{}: grew to its maximum", rung.name);
        assert!(s.grows >= 1);
        drop(held);
        assert_eq!(g.stats().in_user, 0);
    }
}

#[test]
fn exhaustion_is_reported_when_asked_and_nothing_is_lost() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d
            .buf_group(BufGroupConfig::new(64, 2).report_exhaustion(true))
            .unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
        let sent = pattern_vec(2, 0, 64 * 20);
        c.write_all(&sent).unwrap();
        drop(c);
        let mut got = Vec::new();
        let mut held = Vec::new();
        let mut exhausted = 0;
        pump(&mut d, 20, |comp| match comp.event {
            Event::Data(chain) => {
                got.extend(chain.to_vec());
                held.push(chain);
                false
            }
            Event::Error(Error::PoolExhausted { bgid }) => {
                assert_eq!(bgid, g.id());
                assert!(comp.more, "exhaustion is reported, the recv goes on");
                exhausted += 1;
                held.clear(); // give the buffers back: the recv resumes
                false
            }
            Event::Eof => true,
            other => panic!("{other:?}"),
        });
        assert_eq!(got, sent, "{}", rung.name);
        assert!(exhausted > 0, "{}: the dry group was reported", rung.name);
    }
}

#[test]
fn bad_ring_sizes_are_typed_errors() {
    for entries in [0, 3, 100, 65536] {
        match Driver::new(DriverConfig::default().entries(entries)) {
            Err(Error::InvalidRingSize { entries: e, .. }) => assert_eq!(e, entries),
            Err(other) => panic!("{entries}: {other}"),
            Ok(_) => panic!("{entries}: accepted"),
        }
    }
}

#[test]
fn bad_group_shapes_are_typed_errors() {
    let mut d = Driver::new(Default::default()).unwrap();
    assert!(matches!(
        d.buf_group(BufGroupConfig::new(4096, 100)),
        Err(Error::InvalidBufferCount { count: 100, .. })
    ));
    assert!(matches!(
        d.buf_group(BufGroupConfig::new(4096, 65536)),
        Err(Error::InvalidBufferCount { .. })
    ));
    assert!(matches!(
        d.buf_group(BufGroupConfig::new(0, 8)),
        Err(Error::InvalidBufferSize { size: 0, .. })
    ));
    assert!(matches!(
        d.buf_group(BufGroupConfig::new(ringpool::MAX_BUF_SIZE + 1, 8)),
        Err(Error::InvalidBufferSize { .. })
    ));
    assert!(matches!(
        d.buf_group(BufGroupConfig::new(1 << 30, 32768)),
        Err(Error::OutOfMemory { .. })
    ));
    // Nothing was registered by the failed attempts: the first id is still free.
    let g = d.buf_group(BufGroupConfig::new(64, 8)).unwrap();
    assert_eq!(g.id(), 0);
}

#[test]
fn a_group_id_cannot_be_taken_twice() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d
            .buf_group(BufGroupConfig::new(64, 8).group_id(42))
            .unwrap();
        assert_eq!(g.id(), 42);
        match d.buf_group(BufGroupConfig::new(64, 8).group_id(42)) {
            Err(Error::GroupIdInUse { bgid: 42 }) => {}
            other => panic!("{}: {other:?}", rung.name),
        }
        // Once the first group is dropped and forgotten, the id is free again.
        drop(g);
        let mut reused = false;
        for _ in 0..10 {
            d.submit().unwrap();
            if let Ok(g2) = d.buf_group(BufGroupConfig::new(64, 8).group_id(42)) {
                assert_eq!(g2.id(), 42);
                reused = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(reused, "{}: id 42 never became free", rung.name);
    }
}

/// The regression test of the bug behind the kernel matrix's "open finding (6.1, 6.12)", on the
/// host: a read of a tmpfs file consumes its ring buffer (bid 0, ring slot 0) when it is issued
/// and completes from io-wq later. Pipe reads issued behind it complete first; each one's
/// buffer, dropped at once, goes back into the ring at the next position, which on a 2-buffer
/// ring is slot 0 again. The file read's completion names bid 0; the driver used to look the
/// bid up by its ring position and hand out the pipe's buffer a second time (both reads "had"
/// bid 1, the file's byte came back wrong). Skips visibly without a tmpfs.
#[test]
fn a_late_tmpfs_file_read_is_not_handed_a_refilled_ring_slot() {
    let Some(dir) = common::tmpfs_dir() else {
        common::require_env(false, "a tmpfs (/dev/shm or the temporary directory)");
        return;
    };
    if !require(Features::get().buf_ring, "provided buffer ring") {
        return;
    }
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let g = d.buf_group(BufGroupConfig::new(256, 2)).unwrap();
    let (mut late, rounds) = (0, 200);
    for round in 0..rounds {
        let want = pattern_vec(round, 0, 1);
        let mut file = tempfile::tempfile_in(&dir).unwrap();
        file.write_all(&want).unwrap();
        let file = Fd::from(std::os::fd::OwnedFd::from(file));
        let (r, mut w) = std::io::pipe().unwrap();
        let r = Fd::from(std::os::fd::OwnedFd::from(r));
        d.read(&file, &g, 0, 1).unwrap();
        d.submit().unwrap();
        let (mut file_done, mut pipe_reads) = (false, 0u64);
        while !file_done {
            // One pipe read at a time beside the file read, its buffer dropped at once.
            w.write_all(b"p").unwrap();
            d.read(&r, &g, u64::MAX, 2).unwrap();
            let mut pipe_done = false;
            pump(&mut d, 10, |comp| {
                match (comp.token, comp.event) {
                    (1, Event::Data(chain)) => {
                        assert_eq!(
                            chain.to_vec(),
                            want,
                            "round {round}: the file read's byte, after {pipe_reads} pipe reads \
                             completed beside it (buffers {:?})",
                            chain.iter().map(|b| b.bid()).collect::<Vec<_>>()
                        );
                        if pipe_reads > 0 {
                            late += 1; // a pipe buffer went home before this completion
                        }
                        file_done = true;
                    }
                    (2, Event::Data(chain)) => {
                        assert_eq!(chain.to_vec(), b"p", "round {round}: the pipe's byte");
                        pipe_reads += 1;
                        pipe_done = true;
                    }
                    (t, other) => panic!("round {round}: token {t}: {other:?}"),
                }
                pipe_done
            });
        }
        assert_eq!(g.stats().in_user, 0);
        assert_eq!(d.in_flight(), 0);
    }
    eprintln!("{late} of {rounds} file reads completed after a pipe buffer went home");
    assert_eq!(g.stats().in_kernel, 2, "the group is full again");
}
