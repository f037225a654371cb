//! Merged sends (`Ladder::merge_sends`), against the real kernel: the plain sends that wait in a
//! stream socket's lane together leave in one `sendmsg`, and each still gets its own result, in
//! order, with every byte once; a datagram socket's sends never merge; a cancel of one send of a
//! merged `sendmsg`, and a peer that resets under one, end each send once, and what arrives is
//! exactly what the results say left.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{pattern_vec, pump, require, reset, set_sock_buf, tcp_pair};
use ringpool::{Driver, DriverConfig, Error, Event, Fd, Features, Force, OpId};

/// Whether this kernel merges sends (6.1+: a cancelled send reports what it sent); else the
/// test says why it skips.
fn merging_kernel() -> bool {
    require(
        Features::get().cancelled_send_reports_progress(),
        "merged sends (a cancelled send that reports the bytes it sent, 6.1)",
    )
}

fn driver(merge: bool) -> Driver {
    let mut cfg = DriverConfig::default().ignore_env();
    if !merge {
        cfg = cfg.force(Force::NoSendMerge);
    }
    let d = Driver::new(cfg).unwrap();
    assert_eq!(d.ladder().merge_sends, merge);
    d
}

fn size(i: u64) -> usize {
    [1, 100, 1500, 4096, 9000, 16384, 65536, 3][(i % 8) as usize]
}

/// Waits until every one of `count` sends has its result, and returns them by token. The
/// results other than `Cancelled` come in the order of the sends (a cancel ends its send at
/// once, before sends ahead of it that still have bytes to go).
fn results(d: &mut Driver, count: usize) -> HashMap<u64, ringpool::Result<usize>> {
    let mut out = HashMap::new();
    let mut order = Vec::new();
    pump(d, 30, |c| {
        match c.event {
            Event::Sent { result, .. } => {
                if !matches!(result, Err(Error::Cancelled)) {
                    order.push(c.token);
                }
                assert!(out.insert(c.token, result).is_none(), "one result per send");
            }
            other => panic!("{other:?}"),
        }
        out.len() == count
    });
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "sends on one socket complete in order");
    out
}

#[test]
fn queued_plain_sends_leave_in_one_sendmsg_each_with_its_own_result() {
    for merge in [true, false] {
        if merge && !merging_kernel() {
            continue;
        }
        let mut d = driver(merge);
        let (s, mut peer) = tcp_pair();
        let s = Fd::from(s);
        const SENDS: u64 = 300;
        let total: usize = (0..SENDS).map(size).sum();
        let reader = std::thread::spawn(move || {
            peer.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut got = Vec::with_capacity(total);
            peer.read_to_end(&mut got).unwrap();
            got
        });
        let mut expected = Vec::with_capacity(total);
        for i in 0..SENDS {
            let bytes = pattern_vec(i, 0, size(i));
            expected.extend_from_slice(&bytes);
            // Plain sends and zero-copy ones under the policy's threshold: both go plainly.
            if i % 3 == 0 && size(i) < 16384 {
                d.send_zc(&s, bytes, i).unwrap();
            } else {
                d.send(&s, bytes, i).unwrap();
            }
        }
        let before = d.stats();
        let results = results(&mut d, SENDS as usize);
        for i in 0..SENDS {
            assert_eq!(results[&i].as_ref().ok(), Some(&size(i)), "send {i}");
        }
        let stats = d.stats();
        let sqes = stats.sqes - before.sqes;
        eprintln!("merge {merge}: {SENDS} sends in {sqes} SQEs, {stats:?}");
        if merge {
            assert!(stats.merged_sends >= SENDS - 64, "{stats:?}");
            assert!(sqes <= 8, "{sqes} SQEs for {SENDS} sends waiting together");
        } else {
            assert_eq!(stats.merged_sends, 0);
            assert!(sqes >= SENDS, "{sqes} SQEs");
        }
        drop(s);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "every byte once, in order (merge {merge})");
    }
}

/// Regression test: a datagram socket's sends are messages; merged, they would arrive as one.
#[test]
fn sends_on_a_connected_udp_socket_stay_datagrams() {
    if !merging_kernel() {
        return;
    }
    let mut d = driver(true);
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    let tx = Fd::from(std::os::fd::OwnedFd::from(tx));
    const SENDS: u64 = 20;
    for i in 0..SENDS {
        d.send(&tx, pattern_vec(i, 0, 100 + i as usize), i).unwrap();
    }
    let results = results(&mut d, SENDS as usize);
    assert!(results.values().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(d.stats().merged_sends, 0);
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 65536];
    for i in 0..SENDS {
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            &pattern_vec(i, 0, 100 + i as usize)[..],
            "datagram {i}"
        );
    }
}

/// Sends `big` (more than the socket's buffers hold, so the `sendmsg` waits for the reader)
/// and then three small sends, all plain and queued together: one merged `sendmsg`, blocked.
/// Returns the connection, its reader's side and the four sends' ids.
fn blocked_merged_sendmsg(d: &mut Driver, big: usize) -> (Fd, std::net::TcpStream, Vec<OpId>) {
    let (s, peer) = tcp_pair();
    // Buffers of 64 KiB each way: tiny ones (4 KiB) make loopback TCP crawl once reading
    // starts (silly-window avoidance leaves the sender to the persist timer).
    set_sock_buf(s.as_raw_fd(), libc::SO_SNDBUF, 64 << 10);
    set_sock_buf(peer.as_raw_fd(), libc::SO_RCVBUF, 64 << 10);
    let s = Fd::from(s);
    let mut ids = Vec::new();
    for i in 0..4u64 {
        let len = if i == 0 { big } else { 8192 };
        ids.push(d.send(&s, pattern_vec(i, 0, len), i).unwrap());
    }
    d.submit().unwrap();
    // Let the sendmsg fill the buffers and wait for room.
    d.wait(Some(Duration::from_millis(50))).unwrap();
    assert!(d.pop().is_none(), "the merged sendmsg is still waiting");
    assert_eq!(d.stats().merged_sends, 3);
    (s, peer, ids)
}

#[test]
fn a_cancelled_send_of_a_merged_sendmsg_ends_alone_and_the_rest_arrive_whole() {
    if !merging_kernel() {
        return;
    }
    let mut d = driver(true);
    const BIG: usize = 1 << 20;
    let (s, mut peer, ids) = blocked_merged_sendmsg(&mut d, BIG);
    d.cancel(ids[2]);
    let reader = std::thread::spawn(move || {
        peer.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        got
    });
    let results = results(&mut d, 4);
    // The cancel stopped the whole sendmsg part-way: the first send's rest and the sends
    // beside the cancelled one went again; the cancelled one, behind unsent bytes, sent none.
    assert_eq!(results[&0].as_ref().ok(), Some(&BIG));
    assert_eq!(results[&1].as_ref().ok(), Some(&8192));
    assert!(
        matches!(results[&2], Err(Error::Cancelled)),
        "{:?}",
        results[&2]
    );
    assert_eq!(results[&3].as_ref().ok(), Some(&8192));
    drop(s);
    let got = reader.join().unwrap();
    let mut expected = pattern_vec(0, 0, BIG);
    expected.extend(pattern_vec(1, 0, 8192));
    expected.extend(pattern_vec(3, 0, 8192));
    assert_eq!(got.len(), expected.len());
    assert!(
        got == expected,
        "every byte of the sends that completed, once, in order"
    );
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn a_peer_reset_under_a_merged_sendmsg_fails_each_send_once() {
    if !merging_kernel() {
        return;
    }
    let mut d = driver(true);
    let (s, peer, _) = blocked_merged_sendmsg(&mut d, 1 << 20);
    reset(peer);
    let results = results(&mut d, 4);
    match &results[&0] {
        Err(Error::ShortSend { sent, len }) => assert!(*sent > 0 && *sent < *len),
        other => panic!("the first send went part-way: {other:?}"),
    }
    for i in 1..4 {
        let e = results[&i].as_ref().unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)),
            "send {i}: {e:?}"
        );
    }
    drop(s);
    assert_eq!(d.in_flight(), 0);
}
