//! Send rings under hostile use (found in review): every queued send completes, bytes leave
//! only on the ring's socket, bad input is a typed error.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{require, tcp_pair};
use ringpool::{Completion, Driver, DriverConfig, Fd, Features, SendBuf};

fn driver() -> Driver {
    Driver::new(DriverConfig::default().ignore_env()).unwrap()
}

/// Collects completions for `secs` or until `done` says so.
fn collect(
    d: &mut Driver,
    secs: u64,
    mut done: impl FnMut(&[Completion]) -> bool,
) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    while Instant::now() < deadline && !done(&out) {
        d.wait(Some(Duration::from_millis(20))).unwrap();
        while let Some(c) = d.pop() {
            out.push(c);
        }
    }
    out
}

/// Rule: every queued send completes (Driver::send_bundle: "Each completes with its own
/// Event::Sent"); cancel_fd "cancels every op using fd". A bundle op that finished before the
/// cancel reached it leaves the sends queued behind it (backlog) with no completion at all.
#[test]
fn send_bundle_cancelled_after_it_finished_completes_the_sends_queued_behind_it() {
    if !require(Features::get().bundle, "send bundles") {
        return;
    }
    let mut d = driver();
    let ring = d.send_ring(8).unwrap();
    let (s, mut c) = tcp_pair();
    let s = Fd::from(s);
    d.send_bundle(&s, &ring, b"first".to_vec(), 1).unwrap(); // the bundle op (not submitted yet)
    d.send_bundle(&s, &ring, b"second".to_vec(), 2).unwrap(); // queued behind it
    d.cancel_fd(&s); // the op completes inline at submit, before this cancel reaches it
    let done = collect(&mut d, 3, |v| v.iter().any(|c| c.token == 2));
    let tokens: Vec<(u64, String)> = done
        .iter()
        .map(|c| (c.token, format!("{:?}", c.event)))
        .collect();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = [0u8; 64];
    let n = c.read(&mut got).unwrap_or(0);
    eprintln!(
        "completions {tokens:?}; peer got {:?}",
        String::from_utf8_lossy(&got[..n])
    );
    assert!(
        done.iter().any(|c| c.token == 2),
        "the send queued behind the cancelled bundle never completed: {tokens:?}"
    );
}

/// Rule: `send_bundle(fd, ring, buf, token)` sends `buf` on `fd`. Bytes queued for one socket
/// must never leave on another (a connection's data reaching another client is a data leak).
/// While a bundle is in flight the `fd` of later calls is ignored and the bytes go to the first
/// socket.
#[test]
fn send_bundle_never_sends_bytes_to_another_socket() {
    if !require(Features::get().bundle, "send bundles") {
        return;
    }
    let mut d = driver();
    let ring = d.send_ring(8).unwrap();
    let (x, mut x_peer) = tcp_pair();
    let (y, mut y_peer) = tcp_pair();
    let (x, y) = (Fd::from(x), Fd::from(y));
    let r1 = d.send_bundle(&x, &ring, b"for-x".to_vec(), 1);
    let r2 = d.send_bundle(&y, &ring, b"for-y".to_vec(), 2);
    r1.unwrap();
    assert!(
        matches!(r2, Err(ringpool::Error::InvalidArgument { .. })),
        "a second socket on one ring is refused: {r2:?}"
    );
    let done = collect(&mut d, 3, |v| !v.is_empty());
    assert_eq!(done.len(), 1);
    x_peer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut bx = [0u8; 64];
    let nx = x_peer.read(&mut bx).unwrap_or(0);
    assert_eq!(&bx[..nx], b"for-x");
    y_peer
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut by = [0u8; 8];
    assert!(y_peer.read(&mut by).is_err(), "nothing reached y");
    drop(y);
}

/// The binding of the bug above, the other way: a ring whose socket was dropped is not used
/// for a new socket that happens to get the same descriptor number.
#[test]
fn a_send_ring_is_not_reused_for_another_socket_after_its_first_is_gone() {
    let mut d = driver();
    let ring = d.send_ring(8).unwrap();
    let (x, _xp) = tcp_pair();
    let x = Fd::from(x);
    d.send_bundle(&x, &ring, b"a".to_vec(), 1).unwrap();
    collect(&mut d, 3, |v| !v.is_empty());
    drop(x);
    let (y, _yp) = tcp_pair();
    let y = Fd::from(y);
    assert!(d.send_bundle(&y, &ring, b"b".to_vec(), 2).is_err());
}

/// Rule: bad input is a typed error, never a panic inside the driver (`send` and `send_zc`
/// refuse a `SendBuf::Fixed` range outside its buffer with `Error::InvalidArgument`);
/// `send_bundle` slices the buffer unchecked in `SendRingShared::queue` and panics.
#[test]
fn send_bundle_refuses_a_fixed_range_outside_its_buffer() {
    if !require(Features::get().bundle, "send bundles") {
        return;
    }
    let mut d = driver();
    let ring = d.send_ring(8).unwrap();
    let (s, _c) = tcp_pair();
    let s = Fd::from(s);
    let buf = d.fixed_buf_or_plain(4096).unwrap();
    let direct = d.send(
        &s,
        SendBuf::Fixed {
            buf,
            range: 0..8192,
        },
        1,
    );
    assert!(direct.is_err(), "send refuses the range");
    let buf = d.fixed_buf_or_plain(4096).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        d.send_bundle(
            &s,
            &ring,
            SendBuf::Fixed {
                buf,
                range: 0..8192,
            },
            2,
        )
    }));
    match r {
        Ok(Err(_)) => {}
        Ok(Ok(())) => panic!("an out-of-range send was queued"),
        Err(_) => {
            panic!("send_bundle panicked on a range outside the buffer instead of refusing it")
        }
    }
}

/// One ring entry's length is 32 bits: a piece of memory over 4 GiB is refused, not cut short
/// (its length was truncated into the entry).
#[test]
fn send_bundle_refuses_memory_over_4_gib_in_one_piece() {
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    if !common::require_env(
        mem_kib > 8 << 20,
        "8 GiB of memory (for a 4 GiB allocation)",
    ) {
        return;
    }
    let mut d = driver();
    let ring = d.send_ring(8).unwrap();
    let (s, _c) = tcp_pair();
    let s = Fd::from(s);
    // Zero pages from the allocator: nothing is touched.
    let big = vec![0u8; (1usize << 32) + 1];
    let r = d.send_bundle(&s, &ring, big, 1);
    assert!(
        matches!(r, Err(ringpool::Error::InvalidArgument { .. })),
        "{r:?}"
    );
}
