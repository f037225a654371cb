//! Received buffers as `bytes::Bytes`, against the real kernel: no copy, sendable to other
//! threads, home again when the last clone is dropped there (waking a driver that waits for
//! buffers), and alive after their group and driver are gone.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{pattern_vec, tcp_pair, RUNGS};
use ringpool::{BufGroupConfig, Driver, Event, Fd, RecvMode};

/// The next data chain of the driver (waiting as long as `limit`).
fn next_chain(driver: &mut Driver, limit: Duration) -> ringpool::BufChain {
    let deadline = Instant::now() + limit;
    loop {
        assert!(Instant::now() < deadline, "no data within {limit:?}");
        driver.wait(Some(deadline - Instant::now())).unwrap();
        if let Some(c) = driver.pop() {
            match c.event {
                Event::Data(chain) => return chain,
                other => panic!("{other:?}"),
            }
        }
    }
}

/// A group of one buffer: the receive holding it as `Bytes` on another thread runs dry; when
/// that thread drops the `Bytes`, the buffer goes home and the driver, asleep in `wait`, wakes
/// up (its eventfd read completes) and receives the rest. On every rung.
#[test]
fn bytes_dropped_on_another_thread_bring_the_buffer_home_and_wake_the_driver() {
    for rung in RUNGS {
        let mut driver = rung.driver();
        let group = driver.buf_group(BufGroupConfig::new(4096, 1)).unwrap();
        let (ours, mut peer) = tcp_pair();
        let fd = Fd::from(ours);
        driver.recv(&fd, &group, RecvMode::Multishot, 1).unwrap();
        peer.write_all(b"first").unwrap();
        let first = next_chain(&mut driver, Duration::from_secs(5)).into_bytes();
        assert_eq!(&first[..], b"first");
        assert_eq!(group.stats().in_user, 1, "rung {}", rung.name);
        peer.write_all(b"second").unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let clone = first.clone();
            drop(first);
            assert_eq!(&clone[..], b"first");
            drop(clone); // the last one: the buffer goes home from this thread
        });
        // The driver sleeps in the kernel until the buffer is home (its eventfd read is the
        // one op in flight): no busy loop of empty waits while the other thread holds it.
        let enters = driver.stats().enters;
        let second = next_chain(&mut driver, Duration::from_secs(20));
        let spent = driver.stats().enters - enters;
        assert_eq!(second.to_vec(), b"second", "rung {}", rung.name);
        assert!(
            spent < 50,
            "rung {}: {spent} enters while waiting",
            rung.name
        );
        holder.join().unwrap();
        drop(second);
        driver.submit().unwrap();
        assert_eq!(group.stats().in_user, 0, "rung {}", rung.name);
    }
}

#[test]
fn bytes_share_the_buffer_and_outlive_their_group_and_driver() {
    let mut driver = Driver::new(Default::default()).unwrap();
    let group = driver.buf_group(BufGroupConfig::new(65536, 4)).unwrap();
    let (ours, mut peer) = tcp_pair();
    driver
        .recv(&Fd::from(ours), &group, RecvMode::Once, 1)
        .unwrap();
    let data = pattern_vec(5, 0, 10_000);
    peer.write_all(&data).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let chain = next_chain(&mut driver, Duration::from_secs(5));
    let buf = chain.into_iter().next().unwrap();
    let at = buf.as_ptr();
    let len = buf.len();
    let bytes = buf.into_bytes();
    assert_eq!(bytes.as_ptr(), at, "no copy");
    let tail = bytes.slice(100..);
    assert_eq!(
        tail.as_ptr(),
        at.wrapping_add(100),
        "slices share the buffer"
    );
    drop(group);
    drop(driver); // the buffer's memory stays mapped for the `Bytes`
    let check = std::thread::spawn(move || {
        assert!(bytes[..] == data[..len]);
        assert!(tail[..] == data[100..len]);
    });
    check.join().unwrap();
}

#[test]
fn a_chain_of_several_buffers_becomes_one_bytes_by_copying() {
    let mut driver = Driver::new(Default::default()).unwrap();
    if !driver.ladder().bundle {
        common::require(false, "recv bundles");
        return;
    }
    let group = driver.buf_group(BufGroupConfig::new(1024, 16)).unwrap();
    let (ours, mut peer) = tcp_pair();
    let data = pattern_vec(6, 0, 5000);
    peer.write_all(&data).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    driver
        .recv(&Fd::from(ours), &group, RecvMode::Bundle, 1)
        .unwrap();
    let chain = next_chain(&mut driver, Duration::from_secs(5));
    assert!(chain.buf_count() > 1, "a bundle of {}", chain.buf_count());
    let n = chain.len();
    let bytes = chain.into_bytes();
    assert!(bytes[..] == data[..n]);
    driver.submit().unwrap();
    assert_eq!(
        group.stats().in_user,
        0,
        "copied: the buffers went home at once"
    );
}

/// Once buffers have been out as `Bytes` the driver keeps an eventfd read armed; with no `Bytes`
/// out any more, a driver whose receive is parked on buffers held *here* must still not sleep
/// on it (nothing could wake it): `wait(None)` returns at once, as without `Bytes`.
#[test]
fn wait_does_not_sleep_on_the_wake_read_when_no_bytes_are_out() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut d = Driver::new(Default::default()).unwrap();
        let g = d.buf_group(BufGroupConfig::new(64, 1)).unwrap();
        let (s, mut c) = tcp_pair();
        d.recv(&Fd::from(s), &g, RecvMode::Multishot, 0).unwrap();
        c.write_all(b"a").unwrap();
        drop(next_chain(&mut d, Duration::from_secs(5)).into_bytes()); // arms the wake read
        c.write_all(&[1u8; 200]).unwrap();
        let held = next_chain(&mut d, Duration::from_secs(5)); // the only buffer, kept here
        for _ in 0..3 {
            d.wait(None).unwrap();
        }
        drop(held);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("wait(None) slept on the wake read with no Bytes out");
}
