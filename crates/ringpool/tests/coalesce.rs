//! Receive coalescing (`DriverConfig::receive_coalescing`) against the real kernel: a stream that
//! arrives in small pieces makes the driver hold its waits, and every byte still arrives, in
//! order, on every rung; a hold sleeps its delay but never past a wait's timeout, nor when
//! the wait would not block; full buffers do not hold. (That holding makes the receives bigger
//! and cheaper is a matter of speed, measured by `ringpool bench --workload proxy`.)

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{pattern_vec, pump, tcp_pair, RUNGS};
use ringpool::{BufGroup, BufGroupConfig, Driver, DriverConfig, Event, Fd, RecvMode};

/// Bytes the peer writes, 8 KiB at a time with a pause of `PAUSE` after each: a stream slower
/// than the receiver (as a client of a proxy is) on any machine, the kernel matrix's emulated
/// guests included (a pause of 20 µs let a guest's writer run ahead of its receiver, which then
/// only ever took full buffers, which do not hold).
const TOTAL: usize = 1 << 20;
const PIECE: usize = 8192;
const PAUSE: Duration = Duration::from_millis(1);
/// The coalescing delay: a hold gathers about two pieces, far from a full buffer.
const STREAM_DELAY: Duration = Duration::from_millis(2);

/// Receives the paced stream with coalescing on every rung; checks every byte and that the
/// group is full again; returns the held waits per rung.
fn paced_stream() -> Vec<(&'static str, u64)> {
    let mut held = Vec::new();
    for rung in RUNGS {
        let mut driver = rung.driver_with(rung.config().receive_coalescing(STREAM_DELAY));
        let group = driver.buf_group(BufGroupConfig::new(65536, 64)).unwrap();
        let (ours, mut peer) = tcp_pair();
        let fd = Fd::from(ours);
        driver.recv(&fd, &group, RecvMode::Multishot, 1).unwrap();
        let writer = std::thread::spawn(move || {
            let data = pattern_vec(7, 0, TOTAL);
            for piece in data.chunks(PIECE) {
                peer.write_all(piece).unwrap();
                std::thread::sleep(PAUSE);
            }
        });
        let mut got = Vec::with_capacity(TOTAL);
        pump(&mut driver, 60, |c| match c.event {
            Event::Data(chain) => {
                got.extend(chain.to_vec());
                false
            }
            Event::Eof => true,
            other => panic!("rung {}: {other:?}", rung.name),
        });
        writer.join().unwrap();
        assert!(
            got == pattern_vec(7, 0, TOTAL),
            "rung {}: {} bytes, not the stream",
            rung.name,
            got.len()
        );
        assert_eq!(group.stats().in_user, 0, "rung {}", rung.name);
        let s = driver.stats();
        eprintln!(
            "rung {}: {} of {} enters held",
            rung.name, s.held_waits, s.enters
        );
        held.push((rung.name, s.held_waits));
    }
    held
}

#[test]
fn a_stream_of_small_pieces_holds_waits_and_loses_nothing() {
    for (rung, held) in paced_stream() {
        assert!(held > 0, "rung {rung}: no wait held");
    }
}

/// One wake-up of `driver` that receives `bytes` the peer writes first (all of them, in one
/// or more completions, popped here).
fn wake_with(driver: &mut Driver, peer: &mut std::net::TcpStream, bytes: usize) -> Duration {
    peer.write_all(&pattern_vec(3, 0, bytes)).unwrap();
    let start = Instant::now();
    let mut got = 0;
    while got < bytes {
        driver.wait(Some(Duration::from_secs(10))).unwrap();
        while let Some(c) = driver.pop() {
            match c.event {
                Event::Data(chain) => got += chain.len(),
                other => panic!("{other:?}"),
            }
        }
    }
    start.elapsed()
}

/// A driver coalescing with `DELAY`, receiving (multishot) from a fresh loopback connection into
/// buffers of `buf_size`.
fn receiving(buf_size: usize) -> (Driver, BufGroup, std::net::TcpStream) {
    let cfg = DriverConfig::default().receive_coalescing(DELAY);
    let mut driver = Driver::new(cfg).unwrap();
    let group = driver.buf_group(BufGroupConfig::new(buf_size, 64)).unwrap();
    let (ours, peer) = tcp_pair();
    driver
        .recv(&Fd::from(ours), &group, RecvMode::Multishot, 1)
        .unwrap();
    (driver, group, peer)
}

/// Long, so that the timing checks below hold on a loaded machine.
const DELAY: Duration = Duration::from_millis(800);
/// A wait that did not hold returns well before `DELAY`.
const PROMPT: Duration = Duration::from_millis(400);

/// Regression (review): the hold ran before anything else in `wait`, so a zero-timeout poll
/// slept the whole delay, a short timeout was overrun, and completions already ready waited.
/// Now a hold sleeps the delay only where the wait would block, and never past its timeout.
#[test]
fn a_hold_keeps_to_the_timeout_and_never_delays_a_poll_or_ready_completions() {
    let (mut d, _group, mut peer) = receiving(65536);
    wake_with(&mut d, &mut peer, 8192); // the first wake-up never holds
    let holds = |d: &Driver| d.stats().held_waits;

    // A small receive soon after the last one: the next wait holds, and sleeps the delay even
    // though the data is already there.
    wake_with(&mut d, &mut peer, 8192);
    let before = holds(&d);
    let took = wake_with(&mut d, &mut peer, 8192);
    assert!(took >= DELAY, "a hold sleeps its delay: {took:?}");
    assert_eq!(holds(&d), before + 1);

    // A zero timeout polls: no hold.
    let before = holds(&d);
    let start = Instant::now();
    d.wait(Some(Duration::ZERO)).unwrap();
    assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
    assert_eq!(holds(&d), before);

    // A short timeout bounds the hold.
    wake_with(&mut d, &mut peer, 8192);
    let before = holds(&d);
    let start = Instant::now();
    d.wait(Some(Duration::from_millis(50))).unwrap();
    assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
    assert_eq!(holds(&d), before + 1);

    // Completions already ready: no hold.
    wake_with(&mut d, &mut peer, 8192);
    peer.write_all(b"ready").unwrap();
    // Collect the receive (a completion is then ready; under load the loopback delivery may
    // take a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.submit().unwrap() == 0 {
        assert!(Instant::now() < deadline, "the receive never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = holds(&d);
    let start = Instant::now();
    d.wait(Some(Duration::from_secs(10))).unwrap();
    assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
    assert_eq!(holds(&d), before);
    assert!(d.pop().is_some());
}

/// A wake-up that filled a buffer is bulk data: the next wait does not hold.
#[test]
fn full_buffers_do_not_hold() {
    let (mut d, _group, mut peer) = receiving(16384);
    for _ in 0..4 {
        wake_with(&mut d, &mut peer, 65536);
    }
    assert_eq!(d.stats().held_waits, 0);
}

/// Regression (review): the hold submitted with GETEVENTS, which (with `DEFER_TASKRUN`) ran the
/// receives whose data was already there before the sleep, and then kept their completions
/// waiting through it. Now nothing runs before the sleep: data waiting when the hold starts
/// and data arriving during it come in one completion.
#[test]
fn a_hold_collects_what_waited_and_what_arrived_in_one_receive() {
    let (mut d, _group, mut peer) = receiving(65536);
    if !common::require(
        d.ladder().defer_taskrun,
        "DEFER_TASKRUN (receives run at once without it)",
    ) {
        return;
    }
    wake_with(&mut d, &mut peer, 8192);
    wake_with(&mut d, &mut peer, 8192); // the next wait holds
    peer.write_all(&[1; 8192]).unwrap(); // waiting when the hold starts
    let mut late = peer.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(DELAY / 4);
        late.write_all(&[2; 8192]).unwrap(); // arrives during the hold
    });
    let before = d.stats().held_waits;
    d.wait(Some(Duration::from_secs(10))).unwrap();
    writer.join().unwrap();
    assert_eq!(d.stats().held_waits, before + 1);
    let mut sizes = Vec::new();
    while let Some(c) = d.pop() {
        match c.event {
            Event::Data(chain) => sizes.push(chain.len()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sizes, [16384], "one receive took both");
}
