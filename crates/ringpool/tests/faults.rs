//! Faults: a peer that resets, a socket closed under a receive, cancel mid-stream, a group
//! dropped while its buffers are out, a driver dropped with ops in flight. Each ends cleanly,
//! loses no byte that arrived, and leaves every group full.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{pattern_vec, pump, reset, tcp_pair, RUNGS};
use ringpool::{BufGroupConfig, Driver, Error, Event, Fd, RecvMode};

#[test]
fn peer_reset_during_multishot_recv_ends_the_stream_with_the_error() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(1024, 8)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
        let sent = pattern_vec(4, 0, 5000);
        c.write_all(&sent).unwrap();
        let mut got = Vec::new();
        pump(&mut d, 10, |comp| {
            if let Event::Data(chain) = comp.event {
                got.extend(chain.to_vec());
            }
            got.len() == sent.len()
        });
        assert_eq!(
            got, sent,
            "{}: data before the reset arrived whole",
            rung.name
        );
        reset(c);
        pump(&mut d, 10, |comp| match comp.event {
            Event::Error(e) => {
                assert!(!comp.more, "the error ends the stream");
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ECONNRESET),
                    "{}: {e}",
                    rung.name
                );
                true
            }
            Event::Eof => panic!("{}: a reset is not an orderly end", rung.name),
            other => panic!("{other:?}"),
        });
        assert_eq!(d.in_flight(), 0);
        let st = g.stats();
        assert_eq!((st.in_user, st.in_kernel), (0, 8), "{}", rung.name);
    }
}

#[test]
fn cancel_fd_then_close_ends_a_recv_in_flight() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(1024, 8)).unwrap();
        let (s, c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
        d.submit().unwrap();
        d.cancel_fd(&s);
        drop(s);
        pump(&mut d, 10, |comp| {
            assert!(
                matches!(comp.event, Event::Error(Error::Cancelled)),
                "{}: {:?}",
                rung.name,
                comp.event
            );
            !comp.more
        });
        assert_eq!(d.in_flight(), 0);
        // The op released the last reference: the descriptor is closed, the peer sees EOF.
        let mut c = c;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            c.read(&mut [0u8; 16]).unwrap(),
            0,
            "{}: the socket was closed",
            rung.name
        );
        assert_eq!(g.stats().in_user, 0);
    }
}

#[test]
fn dropping_the_socket_handle_keeps_the_recv_safe_and_loses_nothing() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(1024, 8)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
        d.submit().unwrap();
        // The user lets go of the socket while the receive is in the kernel: the op keeps the
        // descriptor (and its memory) alive, so data that arrives is still delivered.
        drop(s);
        let sent = pattern_vec(6, 0, 20_000);
        c.write_all(&sent).unwrap();
        drop(c);
        let mut got = Vec::new();
        pump(&mut d, 10, |comp| match comp.event {
            Event::Data(chain) => {
                got.extend(chain.to_vec());
                false
            }
            Event::Eof => true,
            other => panic!("{}: {other:?}", rung.name),
        });
        assert_eq!(got, sent, "{}", rung.name);
        assert_eq!(d.in_flight(), 0);
    }
}

#[test]
fn cancel_mid_stream_delivers_a_clean_prefix_and_returns_every_buffer() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(4096, 8)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        let op = d.recv(&s, &g, RecvMode::MultishotBundle, 0).unwrap();
        let writer = std::thread::spawn(move || {
            let mut off = 0u64;
            // Write until the reader goes away (bounded: at most 256 MiB).
            while off < 256 << 20 {
                if c.write_all(&pattern_vec(9, off, 16384)).is_err() {
                    break;
                }
                off += 16384;
            }
        });
        let mut got = Vec::new();
        pump(&mut d, 20, |comp| {
            assert!(
                comp.more,
                "{}: the stream ended before the cancel",
                rung.name
            );
            match comp.event {
                Event::Data(chain) => got.extend(chain.to_vec()),
                other => panic!("{}: {other:?}", rung.name),
            }
            got.len() > 1 << 20
        });
        // Cancel mid-stream; the op's final CQE still comes, and only then is its memory free.
        d.cancel(op);
        pump(&mut d, 10, |comp| {
            if let Event::Data(chain) = comp.event {
                got.extend(chain.to_vec());
            }
            !comp.more
        });
        assert_eq!(
            got,
            pattern_vec(9, 0, got.len()),
            "{}: a clean prefix",
            rung.name
        );
        assert_eq!(d.in_flight(), 0);
        assert_eq!(g.stats().in_user, 0, "{}", rung.name);
        drop(s);
        writer.join().unwrap();
    }
}

#[test]
fn a_group_dropped_while_its_buffers_are_out_frees_them_when_they_drop() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d
            .buf_group(BufGroupConfig::new(512, 4).group_id(7))
            .unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Once, 0).unwrap();
        c.write_all(b"outlives its group").unwrap();
        let mut held = None;
        pump(&mut d, 10, |comp| {
            if let Event::Data(chain) = comp.event {
                held = Some(chain);
            }
            true
        });
        drop(g);
        // The driver forgets the group (nothing uses it); the buffer still reads its bytes.
        for _ in 0..5 {
            d.submit().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let held = held.unwrap();
        assert_eq!(held.to_vec(), b"outlives its group", "{}", rung.name);
        // The id can be reused while the old buffer is still out: the two never mix.
        let g2 = d
            .buf_group(BufGroupConfig::new(512, 4).group_id(7))
            .unwrap();
        drop(held);
        assert_eq!(g2.stats().in_user, 0);
        assert_eq!(
            g2.stats().in_kernel,
            4,
            "{}: the old buffer did not join the new group",
            rung.name
        );
    }
}

#[test]
fn buffers_outlive_a_dropped_driver_and_ops_in_flight_are_cancelled() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(256, 4)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
        c.write_all(b"kept").unwrap();
        let mut held = None;
        pump(&mut d, 10, |comp| {
            if let Event::Data(chain) = comp.event {
                held = Some(chain);
            }
            true
        });
        // A receive is still in flight; dropping the driver cancels it and waits for its end.
        drop(d);
        let held = held.unwrap();
        assert_eq!(held.to_vec(), b"kept", "{}", rung.name);
        drop(held);
        drop(g);
        // The driver closed its reference: once the user's goes, the peer sees EOF.
        drop(s);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(c.read(&mut [0u8; 4]).unwrap(), 0);
    }
}

#[test]
fn zero_length_and_large_sends_complete_and_return_their_buffer() {
    for rung in RUNGS {
        let mut d = rung.driver();
        let (s, c) = tcp_pair();
        let s = Fd::from(s);
        d.send(&s, Vec::new(), 1).unwrap();
        let big = pattern_vec(12, 0, 8 << 20);
        d.send(&s, big.clone(), 2).unwrap();
        let reader = std::thread::spawn(move || common::read_to_end(c));
        let mut done = 0;
        pump(&mut d, 20, |comp| {
            match comp.event {
                Event::Sent { result, buf } => {
                    let n = result.unwrap();
                    assert_eq!(
                        n,
                        buf.expect("a plain send returns its buffer").len(),
                        "all of it was sent"
                    );
                    done += 1;
                }
                other => panic!("{other:?}"),
            }
            done == 2
        });
        drop(s);
        assert_eq!(reader.join().unwrap(), big, "{}", rung.name);
    }
}

#[test]
fn send_to_a_reset_peer_fails_and_returns_the_buffer() {
    let mut d = Driver::new(Default::default()).unwrap();
    let (s, c) = tcp_pair();
    reset(c);
    std::thread::sleep(Duration::from_millis(20));
    let s = Fd::from(s);
    let mut errors = 0;
    for i in 0..3 {
        d.send(&s, vec![1u8; 100_000], i).unwrap();
        pump(&mut d, 10, |comp| {
            if let Event::Sent { result, buf } = comp.event {
                assert_eq!(
                    buf.unwrap().len(),
                    100_000,
                    "the buffer comes back even on error"
                );
                errors += result.is_err() as u32;
            }
            true
        });
    }
    assert!(errors > 0, "sending to a reset peer fails");
}

/// Regression: `wait(None)` with nothing in the kernel (every op parked on a group whose buffers
/// the user holds) used to block forever.
#[test]
fn wait_returns_at_once_when_the_kernel_holds_nothing() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut d = Driver::new(Default::default()).unwrap();
        let g = d.buf_group(BufGroupConfig::new(64, 1)).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 0).unwrap();
        c.write_all(&[1u8; 200]).unwrap();
        let mut held = Vec::new();
        // Take the only buffer and keep it; the recv parks on the dry group.
        while held.is_empty() {
            d.wait(None).unwrap();
            while let Some(comp) = d.pop() {
                if let Event::Data(chain) = comp.event {
                    held.push(chain);
                }
            }
        }
        for _ in 0..3 {
            d.wait(None).unwrap();
        }
        tx.send(d.ready()).unwrap();
    });
    let ready = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("wait(None) blocked with nothing in the kernel");
    assert_eq!(ready, 0);
}

/// Regression: without `EXT_ARG` (forced here; kernels before 5.11), each timed wait removed
/// its timeout op afterwards, and the removal's completions ended the next wait at once: a
/// caller waiting in a loop spun through `io_uring_enter` instead of sleeping.
#[test]
fn a_timed_wait_without_ext_arg_sleeps_instead_of_spinning() {
    let mut d = Driver::new(
        ringpool::DriverConfig::default()
            .ignore_env()
            .force(ringpool::Force::NoExtArg),
    )
    .unwrap();
    let g = d.buf_group(BufGroupConfig::new(64, 4)).unwrap();
    let (s, _c) = tcp_pair();
    d.recv(&Fd::from(s), &g, RecvMode::Multishot, 0).unwrap();
    let start = std::time::Instant::now();
    let before = d.stats().enters;
    let mut waits = 0;
    while start.elapsed() < Duration::from_millis(300) {
        assert_eq!(d.wait(Some(Duration::from_millis(30))).unwrap(), 0);
        waits += 1;
    }
    let enters = d.stats().enters - before;
    assert!(
        waits <= 12,
        "{waits} waits of 30 ms in 300 ms: they did not sleep"
    );
    assert!(enters <= 4 * waits, "{enters} enters for {waits} waits");
}

/// Regression (found through `rt::sleep`): with nothing in the kernel, `wait(Some(t))` returned
/// at once, so a runtime with only timers pending spun through `io_uring_enter` (157,613 enters
/// in one 100 ms sleep) instead of sleeping.
#[test]
fn a_timed_wait_with_nothing_in_flight_sleeps() {
    let mut d = Driver::new(Default::default()).unwrap();
    let start = std::time::Instant::now();
    let mut waits = 0;
    while start.elapsed() < Duration::from_millis(200) {
        assert_eq!(d.wait(Some(Duration::from_millis(20))).unwrap(), 0);
        waits += 1;
    }
    assert!(
        waits <= 12,
        "{waits} waits of 20 ms in 200 ms: they did not sleep"
    );
    // `wait(None)` still returns at once (nothing could ever complete).
    let t = std::time::Instant::now();
    d.wait(None).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Regression (review): a buffer group or send ring given to a driver that did not make it was
/// armed in the wrong ring, where its group id names that ring's own group (or none): the buffer
/// ids of the completions were then taken from the wrong group, handing out memory the other
/// ring's kernel could be writing. Now a typed error before anything starts, and both groups
/// stay whole. On every rung.
#[test]
fn a_group_or_send_ring_of_another_driver_is_refused() {
    for rung in RUNGS {
        let mut a = rung.driver();
        let mut b = rung.driver();
        let ga = a.buf_group(BufGroupConfig::new(1024, 8)).unwrap();
        let gb = b.buf_group(BufGroupConfig::new(1024, 8)).unwrap();
        assert_eq!(ga.id(), gb.id(), "both rings' first group has the same id");
        let ring_b = b.send_ring(8).unwrap();
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = Fd::from(std::os::fd::OwnedFd::from(udp));
        let not_ours = |e: Error| {
            assert!(
                matches!(e, Error::NotOurs { .. }),
                "rung {}: {e}",
                rung.name
            )
        };
        not_ours(a.recv(&s, &gb, RecvMode::Multishot, 1).unwrap_err());
        not_ours(a.read(&s, &gb, u64::MAX, 2).unwrap_err());
        not_ours(a.recv_from(&udp, &gb, RecvMode::Once, 3).unwrap_err());
        not_ours(a.send_bundle(&s, &ring_b, b"x".to_vec(), 4).unwrap_err());
        // Each driver's own group works, and nothing was taken from either.
        a.recv(&s, &ga, RecvMode::Once, 5).unwrap();
        c.write_all(b"ours").unwrap();
        let mut got = Vec::new();
        pump(&mut a, 10, |comp| {
            if let Event::Data(chain) = comp.event {
                got.extend(chain.to_vec());
            }
            !got.is_empty()
        });
        assert_eq!(got, b"ours", "rung {}", rung.name);
        for g in [&ga, &gb] {
            assert_eq!(g.stats().in_user, 0, "rung {}", rung.name);
        }
        assert_eq!(gb.stats().in_kernel, gb.stats().total, "rung {}", rung.name);
    }
}
