//! Zero-copy send with one completion, against the real kernel: pipelined sends checked byte for
//! byte by the receiver, every buffer returned exactly once, order kept, faults, UDP, and the
//! adaptive policy finding out by itself that loopback copies.
//!
//! On loopback a notification arrives only once the receiver has read the data, so every test
//! reads concurrently with sending.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::time::Duration;

use common::{in_emulated_guest, pattern, pattern_vec, pump, require, reset, tcp_pair};
use ringpool::{
    BufGroupConfig, Driver, DriverConfig, Event, Fd, Features, Force, RecvMode, ZcConfig, ZcMode,
};

/// The zero-copy rungs: SENDMSG_ZC, SEND_ZC one buffer per op, plain.
const ZC_RUNGS: &[(&str, &[Force])] = &[
    ("sendmsg_zc", &[]),
    ("send_zc", &[Force::NoSendmsgZc]),
    ("plain", &[Force::NoSendZc]),
];

fn zc_driver(force: &[Force], mode: ZcMode) -> Driver {
    let mut cfg = DriverConfig::default()
        .ignore_env()
        .zerocopy(ZcConfig::default().mode(mode));
    for f in force {
        cfg = cfg.force(*f);
    }
    let d = Driver::new(cfg).unwrap();
    eprintln!("zero-copy rung: {:?}", d.ladder().zc);
    d
}

fn sizes(i: u64) -> usize {
    [1, 100, 1500, 4096, 9000, 16384, 65536, 3][(i % 8) as usize]
}

/// `sends` pipelined `send_zc_returning` calls of mixed sizes on each of `conns` connections.
fn pipelined(force: &[Force], conns: usize, sends: u64) {
    if !force.contains(&Force::NoSendZc) && !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    let mut d = zc_driver(force, ZcMode::On);
    let mut socks = Vec::new();
    let mut readers = Vec::new();
    for c in 0..conns {
        let (s, mut r) = tcp_pair();
        socks.push(Fd::from(s));
        let total: usize = (0..sends).map(sizes).sum();
        readers.push(std::thread::spawn(move || {
            r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut at = 0usize;
            while at < total {
                let n = r.read(&mut buf).unwrap();
                assert!(n > 0, "conn {c}: early EOF at {at}");
                for (i, &b) in buf[..n].iter().enumerate() {
                    assert_eq!(
                        b,
                        pattern(c as u64, (at + i) as u64),
                        "conn {c}: byte {}",
                        at + i
                    );
                }
                at += n;
            }
            at
        }));
    }
    let mut offsets = vec![0u64; conns];
    let mut next_sent = vec![0u64; conns];
    let mut returned = HashSet::new();
    let mut sent_events = 0u64;
    // Keep at most 256 sends per connection outstanding, submitting as results come in.
    let mut submitted = vec![0u64; conns];
    let total_ops = sends * conns as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while returned.len() as u64 != total_ops || sent_events != total_ops {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled: {sent_events} sent, {} returned",
            returned.len()
        );
        for c in 0..conns {
            while submitted[c] < sends && submitted[c] - next_sent[c] < 256 {
                let i = submitted[c];
                let len = sizes(i);
                let data = pattern_vec(c as u64, offsets[c], len);
                offsets[c] += len as u64;
                d.send_zc_returning(&socks[c], data, (c as u64) << 32 | i)
                    .unwrap();
                submitted[c] += 1;
            }
        }
        d.wait(Some(Duration::from_millis(100))).unwrap();
        while let Some(comp) = d.pop() {
            let (c, i) = ((comp.token >> 32) as usize, comp.token & 0xffff_ffff);
            match comp.event {
                Event::Sent { result, buf } => {
                    assert!(buf.is_none() && comp.more, "the buffer comes later");
                    assert_eq!(result.unwrap(), sizes(i), "all bytes of send {i}");
                    assert_eq!(i, next_sent[c], "conn {c}: sends complete in order");
                    next_sent[c] += 1;
                    sent_events += 1;
                }
                Event::Returned(buf) => {
                    assert!(!comp.more);
                    assert_eq!(buf.len(), sizes(i));
                    assert!(returned.insert(comp.token), "buffer {c}/{i} returned twice");
                }
                other => panic!("{other:?}"),
            }
        }
    }
    for r in readers {
        r.join().unwrap();
    }
    let st = d.zc_stats();
    eprintln!("{force:?} conns {conns}: {st:?}");
    if !force.contains(&Force::NoSendZc) {
        assert!(st.zc_sends > 0, "zero-copy was used");
        assert_eq!(
            st.notifications, st.zc_sends,
            "one notification per zero-copy op"
        );
    } else {
        assert_eq!(st.zc_sends, 0);
    }
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn pipelined_sends_on_one_connection_every_rung() {
    for (_, force) in ZC_RUNGS {
        pipelined(force, 1, pipelined_sends());
    }
}

#[test]
fn pipelined_sends_over_32_connections() {
    pipelined(&[], 32, pipelined_sends() / 32 + 1);
}

/// 10,000 sends in all; 2,000 in a kernel-matrix guest, where the point is the rung.
fn pipelined_sends() -> u64 {
    if in_emulated_guest() {
        2_000
    } else {
        10_000
    }
}

#[test]
fn forwarding_received_buffers_with_zero_copy_returns_them_to_their_group() {
    if !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    for (name, force) in ZC_RUNGS {
        let mut d = zc_driver(force, ZcMode::On);
        let g = d.buf_group(BufGroupConfig::new(4096, 16)).unwrap();
        let (a, mut a_peer) = tcp_pair();
        let (b, b_peer) = tcp_pair();
        let (a, b) = (Fd::from(a), Fd::from(b));
        d.recv(&a, &g, RecvMode::MultishotBundle, 1).unwrap();
        const LEN: usize = 4 << 20;
        let writer = std::thread::spawn(move || {
            a_peer.write_all(&pattern_vec(21, 0, LEN)).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut v = vec![0u8; LEN];
            let mut r = b_peer;
            r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            r.read_exact(&mut v).unwrap();
            v
        });
        let (mut received, mut acked) = (0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acked < LEN {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: stalled at {received}/{acked}"
            );
            d.wait(Some(Duration::from_millis(100))).unwrap();
            while let Some(comp) = d.pop() {
                match comp.event {
                    // Every received chain leaves as it is: zero-copy from where it landed.
                    Event::Data(chain) => {
                        received += chain.len();
                        d.send_zc(&b, chain, 2).unwrap();
                    }
                    Event::Sent { result, buf } => {
                        assert!(buf.is_none());
                        acked += result.unwrap();
                    }
                    Event::Eof => assert_eq!(received, LEN, "{name}: EOF after every byte"),
                    other => panic!("{name}: {other:?}"),
                }
            }
        }
        writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), pattern_vec(21, 0, LEN), "{name}");
        // The last notifications come once the reader has read; then the group is full.
        for _ in 0..100 {
            if g.stats().in_user == 0 {
                break;
            }
            d.wait(Some(Duration::from_millis(20))).unwrap();
        }
        assert_eq!(
            g.stats().in_user,
            0,
            "{name}: every buffer went home after its notification"
        );
        assert_eq!(received, LEN);
    }
}

#[test]
fn a_peer_reset_with_notifications_pending_returns_every_buffer() {
    if !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    for (name, force) in ZC_RUNGS {
        let mut d = zc_driver(force, ZcMode::On);
        let (s, mut peer) = tcp_pair();
        let s = Fd::from(s);
        // The peer reads a little, then resets the connection.
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            let _ = peer.read(&mut b);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            use std::os::fd::AsRawFd;
            // SAFETY: setsockopt reads a valid linger; the fd is a live socket.
            unsafe {
                libc::setsockopt(
                    peer.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        });
        const SENDS: u64 = 200;
        for i in 0..SENDS {
            d.send_zc_returning(&s, vec![i as u8; 64 * 1024], i)
                .unwrap();
        }
        let (mut sent, mut returned, mut errors) = (HashSet::new(), HashSet::new(), 0);
        pump(&mut d, 30, |comp| {
            match comp.event {
                Event::Sent { result, .. } => {
                    assert!(sent.insert(comp.token), "{name}: one result per send");
                    errors += result.is_err() as u32;
                }
                Event::Returned(_) => {
                    assert!(returned.insert(comp.token), "{name}: returned twice")
                }
                other => panic!("{other:?}"),
            }
            returned.len() as u64 == SENDS
        });
        reader.join().unwrap();
        assert_eq!(
            sent.len() as u64,
            SENDS,
            "{name}: every send completed once"
        );
        assert!(errors > 0, "{name}: the reset reached the sender");
        assert_eq!(d.in_flight(), 0);
    }
}

#[test]
fn closing_the_socket_with_sends_in_flight_and_dropping_handles_at_once() {
    if !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    let mut d = zc_driver(&[], ZcMode::On);
    let g = d.buf_group(BufGroupConfig::new(1024, 8)).unwrap();
    let (src, mut src_peer) = tcp_pair();
    let src = Fd::from(src);
    d.recv(&src, &g, RecvMode::Once, 0).unwrap();
    src_peer.write_all(&[5u8; 1000]).unwrap();
    let mut chain = None;
    pump(&mut d, 10, |comp| {
        if let Event::Data(c) = comp.event {
            chain = Some(c);
        }
        true
    });
    let (s, mut peer) = tcp_pair();
    let s = Fd::from(s);
    // A pooled buffer and owned ones, then the user's socket handle goes away at once.
    d.send_zc(&s, chain.unwrap(), 1).unwrap();
    for i in 2..50 {
        d.send_zc(&s, vec![i as u8; 32 * 1024], i).unwrap();
    }
    drop(s);
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = peer.read_to_end(&mut v);
        v.len()
    });
    let mut done = 0;
    pump(&mut d, 20, |comp| {
        if let Event::Sent { result, .. } = comp.event {
            result.unwrap();
            done += 1;
        }
        done == 49
    });
    // The sends held the socket until their results: now it is closed, and the reader sees EOF
    // after every byte (while the driver keeps collecting notifications).
    for _ in 0..500 {
        if reader.is_finished() {
            break;
        }
        d.wait(Some(Duration::from_millis(10))).unwrap();
    }
    assert_eq!(reader.join().unwrap(), 1000 + 48 * 32 * 1024);
    for _ in 0..50 {
        if g.stats().in_user == 0 {
            break;
        }
        d.wait(Some(Duration::from_millis(20))).unwrap();
    }
    assert_eq!(
        g.stats().in_user,
        0,
        "the pooled buffer went home after its notification"
    );
}

#[test]
fn cancel_fd_with_queued_sends_reports_each_once() {
    let mut d = zc_driver(&[], ZcMode::On);
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    for i in 0..100 {
        d.send_zc_returning(&s, vec![1u8; 256 * 1024], i).unwrap();
    }
    d.submit().unwrap();
    d.cancel_fd(&s);
    drop(peer);
    let (mut sent, mut returned) = (HashSet::new(), HashSet::new());
    pump(&mut d, 20, |comp| {
        match comp.event {
            Event::Sent { .. } => assert!(sent.insert(comp.token)),
            Event::Returned(_) => assert!(returned.insert(comp.token)),
            other => panic!("{other:?}"),
        }
        returned.len() == 100
    });
    assert_eq!(sent.len(), 100);
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn a_zero_length_send_completes_with_zero() {
    for (_, force) in ZC_RUNGS {
        let mut d = zc_driver(force, ZcMode::On);
        let (s, _peer) = tcp_pair();
        let s = Fd::from(s);
        d.send_zc(&s, Vec::new(), 7).unwrap();
        pump(&mut d, 10, |comp| {
            match comp.event {
                Event::Sent { result, .. } => assert_eq!(result.unwrap(), 0),
                other => panic!("{other:?}"),
            }
            !comp.more
        });
    }
}

#[test]
fn udp_send_zc_to_a_destination_and_to_an_unreachable_port() {
    for (name, force) in ZC_RUNGS {
        let mut d = zc_driver(force, ZcMode::On);
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = Fd::from(std::os::fd::OwnedFd::from(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        ));
        for i in 0..10u8 {
            d.send_zc_to(&tx, vec![i; 1200], rx.local_addr().unwrap(), i as u64)
                .unwrap();
        }
        // The driver must keep running while we read: with DEFER_TASKRUN a linked chain
        // advances only inside io_uring_enter.
        rx.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut ok = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 10 || ok < 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: got {got:?}, {ok} sent"
            );
            d.wait(Some(Duration::from_millis(10))).unwrap();
            while let Some(comp) = d.pop() {
                if let Event::Sent { result, .. } = comp.event {
                    assert_eq!(result.unwrap(), 1200);
                    ok += 1;
                }
            }
            let mut b = [0u8; 2000];
            while let Ok(n) = rx.recv(&mut b) {
                assert_eq!(n, 1200);
                got.push(b[0]);
            }
        }
        assert_eq!(
            got,
            (0..10).collect::<Vec<u8>>(),
            "{name}: datagrams in order"
        );
        // A connected socket whose peer port is closed: the ICMP error reaches a later send.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let conn = UdpSocket::bind("127.0.0.1:0").unwrap();
        conn.connect(dead).unwrap();
        let conn = Fd::from(std::os::fd::OwnedFd::from(conn));
        let mut refused = 0;
        for round in 0..20u64 {
            d.send_zc_returning(&conn, vec![1u8; 100], round).unwrap();
            let mut back = false;
            pump(&mut d, 10, |comp| {
                match comp.event {
                    Event::Sent { result: Err(e), .. } => {
                        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{name}: {e}");
                        refused += 1;
                    }
                    Event::Sent { .. } => {}
                    Event::Returned(_) => back = true,
                    other => panic!("{other:?}"),
                }
                back
            });
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(refused > 0, "{name}: the unreachable port was reported");
        assert_eq!(d.in_flight(), 0);
    }
}

#[test]
fn the_adaptive_policy_switches_to_plain_send_on_loopback() {
    let f = Features::get();
    if !require(
        f.send_zc && f.zc_report_usage,
        "zero-copy send with usage reports",
    ) {
        return;
    }
    // Threshold 0: only what the kernel reports decides.
    let cfg = DriverConfig::default()
        .ignore_env()
        .zerocopy(ZcConfig::default().threshold(0));
    let mut d = Driver::new(cfg).unwrap();
    let (s, mut peer) = tcp_pair();
    let s = Fd::from(s);
    const SENDS: usize = 2000;
    const LEN: usize = 64 * 1024;
    let reader = std::thread::spawn(move || {
        let mut v = vec![0u8; 1 << 16];
        let mut n = 0;
        while n < SENDS * LEN {
            n += peer.read(&mut v).unwrap();
        }
        n
    });
    let mut done = 0;
    // Keep 8 sends in flight: the policy learns from notifications while sends keep going.
    let mut next = 0;
    while done < SENDS {
        while next < SENDS && next - done < 8 {
            d.send_zc(&s, vec![3u8; LEN], next as u64).unwrap();
            next += 1;
        }
        d.wait(Some(Duration::from_millis(100))).unwrap();
        while let Some(comp) = d.pop() {
            if let Event::Sent { result, .. } = comp.event {
                assert_eq!(result.unwrap(), LEN);
                done += 1;
            }
        }
    }
    assert_eq!(reader.join().unwrap(), SENDS * LEN);
    let st = d.zc_stats();
    eprintln!("{st:?}");
    assert!(st.zc_copied > 0, "loopback copies: {st:?}");
    // It tries zero-copy at first, backs off after COPIED_STREAK copied notifications (plus the
    // sends already in flight), and retries once per PLAIN_RUN sends.
    let bound =
        (ringpool::COPIED_STREAK as u64 + 8) * (1 + SENDS as u64 / ringpool::PLAIN_RUN as u64);
    assert!(
        st.zc_sends <= bound,
        "switched to plain within {bound} zero-copy sends: {st:?}"
    );
    assert!(st.plain_sends >= SENDS as u64 - bound, "{st:?}");
}

/// Regression: on 6.18 a linked `SEND_ZC` cancelled by its broken chain completes with
/// `-ECANCELED` *without* `F_MORE` and then posts a notification anyway. Counting notifications
/// by `F_MORE` let such a late notification land on a reused slot (its count underflowed and
/// the op never finished). Every attempt now has its own generation; strays are ignored.
#[test]
fn late_notifications_of_a_broken_chain_never_reach_a_reused_slot() {
    if !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    for (name, force) in &ZC_RUNGS[..2] {
        let mut d = zc_driver(force, ZcMode::On);
        let (dead, _peer) = tcp_pair();
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&dead), libc::SHUT_WR) };
        let dead = Fd::from(dead);
        // One chain: the first send fails (EPIPE), the kernel cancels the rest.
        for i in 0..32 {
            d.send_zc_returning(&dead, vec![1u8; 8192], i).unwrap();
        }
        let (mut sent, mut returned) = (HashSet::new(), HashSet::new());
        pump(&mut d, 10, |comp| {
            match comp.event {
                Event::Sent { result, .. } => {
                    assert!(
                        result.is_err(),
                        "{name}: a send on a shut-down socket fails"
                    );
                    assert!(sent.insert(comp.token), "{name}: one result per send");
                }
                Event::Returned(_) => {
                    assert!(returned.insert(comp.token), "{name}: returned twice")
                }
                other => panic!("{other:?}"),
            }
            returned.len() == 32
        });
        // New sends reuse the freed slots while late notifications may still arrive.
        let (s, mut peer) = tcp_pair();
        let s = Fd::from(s);
        let reader = std::thread::spawn(move || {
            let mut v = vec![0u8; 64 * 4096];
            peer.read_exact(&mut v).unwrap();
            v
        });
        for i in 0..64u64 {
            d.send_zc_returning(&s, pattern_vec(i, 0, 4096), 100 + i)
                .unwrap();
        }
        let mut back = HashSet::new();
        pump(&mut d, 20, |comp| {
            match comp.event {
                Event::Sent { result, .. } => assert_eq!(result.unwrap(), 4096),
                Event::Returned(buf) => {
                    assert_eq!(buf.len(), 4096);
                    assert!(back.insert(comp.token), "{name}: returned twice");
                }
                other => panic!("{other:?}"),
            }
            back.len() == 64
        });
        let got = reader.join().unwrap();
        for i in 0..64u64 {
            assert_eq!(
                &got[i as usize * 4096..][..4096],
                &pattern_vec(i, 0, 4096)[..],
                "{name}"
            );
        }
        assert_eq!(d.in_flight(), 0, "{name}");
        eprintln!("{name}: stray CQEs ignored: {}", d.stats().stray_cqes);
    }
}

/// Regression: when the submission queue filled up in the middle of a linked chain, the chain
/// was submitted in two halves, which the kernel runs side by side: bytes arrived out of order.
#[test]
fn sends_stay_in_order_when_chains_outgrow_the_submission_queue() {
    for (name, force) in ZC_RUNGS {
        let mut cfg = DriverConfig::default()
            .ignore_env()
            .entries(8)
            .zerocopy(ZcConfig::default().mode(ZcMode::On));
        for f in *force {
            cfg = cfg.force(*f);
        }
        let mut d = Driver::new(cfg).unwrap();
        let mut socks = Vec::new();
        let mut readers = Vec::new();
        for c in 0..4u64 {
            let (s, mut peer) = tcp_pair();
            socks.push(Fd::from(s));
            readers.push(std::thread::spawn(move || {
                let mut v = vec![0u8; 200 * 3000];
                peer.set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                peer.read_exact(&mut v).unwrap();
                assert!(
                    v == pattern_vec(c, 0, v.len()),
                    "conn {c}: bytes out of order"
                );
            }));
        }
        // A receive takes one queue entry first, so chains do not start on an empty queue.
        let g = d.buf_group(BufGroupConfig::new(64, 1)).unwrap();
        let (r, _rpeer) = tcp_pair();
        let r = Fd::from(r);
        d.recv(&r, &g, RecvMode::Once, u64::MAX).unwrap();
        // 200 sends per socket queued at once: chains far longer than the 8-entry queue.
        for c in 0..4u64 {
            for i in 0..200u64 {
                d.send_zc(
                    &socks[c as usize],
                    pattern_vec(c, i * 3000, 3000),
                    c << 32 | i,
                )
                .unwrap();
            }
        }
        let mut next = [0u64; 4];
        let mut done = 0;
        pump(&mut d, 30, |comp| {
            let (c, i) = ((comp.token >> 32) as usize, comp.token & 0xffff_ffff);
            match comp.event {
                Event::Sent { result, .. } => assert_eq!(result.unwrap(), 3000),
                other => panic!("{other:?}"),
            }
            assert_eq!(i, next[c], "{name}: conn {c} completes in order");
            next[c] += 1;
            done += 1;
            done == 800
        });
        for r in readers {
            r.join().unwrap();
        }
    }
}

/// Forwards 8 MiB received into a small group through a send ring (send bundles: many buffers
/// per op, in order), mixed with owned sends; checks every byte, the order of completions, that
/// bundles really carried several buffers, and that every buffer went home.
fn forward_through_a_send_ring(name: &str, force: &[Force]) {
    let mut cfg = DriverConfig::default().ignore_env();
    for f in force {
        cfg = cfg.force(*f);
    }
    let mut d = Driver::new(cfg).unwrap();
    let g = d.buf_group(BufGroupConfig::new(4096, 64)).unwrap();
    let ring = d.send_ring(64).unwrap();
    let (a, mut a_peer) = tcp_pair();
    let (b, b_peer) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    const LEN: usize = 8 << 20;
    let writer = std::thread::spawn(move || {
        a_peer.write_all(&pattern_vec(40, 0, LEN)).unwrap();
    });
    // Every 10th chain is followed by an owned marker send, so order across kinds is checked.
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let mut r = b_peer;
        r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        r.read_to_end(&mut v).unwrap();
        v
    });
    d.recv(&a, &g, RecvMode::MultishotBundle, u64::MAX).unwrap();
    let (mut expected, mut received, mut next_token, mut acked) = (Vec::new(), 0, 0u64, 0u64);
    let mut eof = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(eof && acked == next_token) {
        assert!(std::time::Instant::now() < deadline, "{name}: stalled");
        d.wait(Some(Duration::from_millis(100))).unwrap();
        while let Some(c) = d.pop() {
            match c.event {
                Event::Data(chain) => {
                    expected.extend(chain.to_vec());
                    received += chain.len();
                    d.send_bundle(&b, &ring, chain, next_token).unwrap();
                    next_token += 1;
                    if next_token % 10 == 0 {
                        let marker = format!("<{next_token}>").into_bytes();
                        expected.extend(&marker);
                        d.send_bundle(&b, &ring, marker, next_token).unwrap();
                        next_token += 1;
                    }
                }
                Event::Eof => eof = true,
                Event::Sent { result, .. } => {
                    result.unwrap();
                    assert_eq!(c.token, acked, "{name}: completions in order");
                    acked += 1;
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }
    writer.join().unwrap();
    assert_eq!(received, LEN, "{name}");
    drop(b);
    drop(ring);
    d.submit().unwrap();
    let got = reader.join().unwrap();
    assert!(
        got == expected,
        "{name}: bytes differ ({} vs {})",
        got.len(),
        expected.len()
    );
    assert_eq!(g.stats().in_user, 0, "{name}: every buffer went home");
    let s = d.stats();
    if d.ladder().bundle {
        assert!(
            s.bundle_ops > 0 && s.bundle_buffers > s.bundle_ops,
            "{name}: {s:?}"
        );
    } else {
        assert_eq!(s.bundle_ops, 0, "{name}: the fallback sends plainly");
    }
    eprintln!("{name}: {next_token} sends, {s:?}");
}

#[test]
fn send_bundles_from_a_send_ring_keep_order_and_return_every_buffer() {
    if require(Features::get().bundle, "send bundles") {
        forward_through_a_send_ring("bundles", &[]);
    }
    forward_through_a_send_ring("no-bundle fallback", &[Force::NoBundle]);
}

#[test]
fn a_send_ring_whose_peer_resets_fails_every_queued_send_and_loses_no_buffer() {
    if !require(Features::get().bundle, "send bundles") {
        return;
    }
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let g = d.buf_group(BufGroupConfig::new(4096, 64)).unwrap();
    let ring = d.send_ring(16).unwrap();
    let (a, mut a_peer) = tcp_pair();
    let (b, b_peer) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    // The destination resets (SO_LINGER 0) without reading.
    reset(b_peer);
    std::thread::sleep(Duration::from_millis(50));
    a_peer.write_all(&pattern_vec(41, 0, 256 << 10)).unwrap();
    d.recv(&a, &g, RecvMode::MultishotBundle, u64::MAX).unwrap();
    let (mut queued, mut failed, mut ok, mut received) = (0u64, 0u64, 0u64, 0usize);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while received < 256 << 10 || failed + ok < queued {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled: {queued} {failed} {ok}"
        );
        d.wait(Some(Duration::from_millis(50))).unwrap();
        while let Some(c) = d.pop() {
            match c.event {
                Event::Data(chain) => {
                    received += chain.len();
                    d.send_bundle(&b, &ring, chain, queued).unwrap();
                    queued += 1;
                }
                Event::Sent { result: Err(e), .. } => {
                    let raw = e.raw_os_error();
                    assert!(
                        matches!(raw, Some(libc::EPIPE) | Some(libc::ECONNRESET)),
                        "{e}"
                    );
                    failed += 1;
                }
                Event::Sent { result: Ok(_), .. } => ok += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(failed > 0, "the reset reached the sends");
    // The failed ring's queued buffers went home, though its handle is still alive.
    assert_eq!(g.stats().in_user, 0, "no buffer lost");
    d.send_bundle(&b, &ring, vec![1u8; 10], 99).unwrap();
    pump(&mut d, 5, |c| {
        assert!(
            matches!(c.event, Event::Sent { result: Err(_), .. }),
            "a failed ring stays failed"
        );
        true
    });
}
