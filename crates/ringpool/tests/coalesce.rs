//! Receive coalescing (`DriverConfig::receive_coalescing`) against the real kernel: a stream that
//! arrives in small pieces makes the driver hold its waits, and every byte still arrives, in
//! order, on every rung; without coalescing no wait holds. (That holding makes the receives
//! bigger and cheaper is a matter of speed, measured by `ringpool bench --workload proxy`.)

mod common;

use std::io::Write;
use std::time::Duration;

use common::{pattern_vec, pump, tcp_pair, RUNGS};
use ringpool::{BufGroupConfig, Event, Fd, RecvMode};

/// Bytes the peer writes, 4 KiB at a time with a short pause after each: a stream slower than
/// the receiver, as a client of a proxy is.
const TOTAL: usize = 4 << 20;
const PIECE: usize = 4096;

/// Receives the paced stream with `coalesce` (zero: off) on every rung; checks every byte and
/// that the group is full again; returns the held waits per rung.
fn paced_stream(coalesce: Duration) -> Vec<(&'static str, u64)> {
    let mut held = Vec::new();
    for rung in RUNGS {
        let mut driver = rung.driver_with(rung.config().receive_coalescing(coalesce));
        let group = driver.buf_group(BufGroupConfig::new(65536, 64)).unwrap();
        let (ours, mut peer) = tcp_pair();
        let fd = Fd::from(ours);
        driver.recv(&fd, &group, RecvMode::Multishot, 1).unwrap();
        let writer = std::thread::spawn(move || {
            let data = pattern_vec(7, 0, TOTAL);
            for piece in data.chunks(PIECE) {
                peer.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_micros(20));
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
    for (rung, held) in paced_stream(Duration::from_micros(200)) {
        assert!(held > 0, "rung {rung}: no wait held");
    }
}

#[test]
fn without_coalescing_no_wait_holds() {
    for (rung, held) in paced_stream(Duration::ZERO) {
        assert_eq!(held, 0, "rung {rung}");
    }
}
