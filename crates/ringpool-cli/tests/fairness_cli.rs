//! Issue 18, item 1: one hostile client must not stop a server for the others. A client that
//! sends and never reads, or one that sends 100 MB as fast as it can, holds at most its own
//! share of the shared buffer group; 50 ping-pong clients keep a bounded latency meanwhile.
//! Against `echo` and `proxy`, on the event loop and on the async layer (`--rt`).
//!
//! The latency bound tells starvation from noise, nothing finer: before the fix the ping-pong
//! clients did not get slow, they got no answer at all (timeouts of seconds). A tighter bound
//! (50 ms until 2026-12-03) was a latency target in a test, and failed now and then when the
//! CI host was loaded; latency is measured in `ringpool bench`.

mod common;

use common::echo_upstream;

use common::Server;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PING_CLIENTS: usize = 50;
const ROUNDS: usize = 40;
/// p99 of the ping-pong round trips must stay under this (a starved client waits seconds).
const P99_BOUND: Duration = Duration::from_millis(500);
/// A round trip that takes longer than this counts as lost (and ends that client).
const LOST: Duration = Duration::from_secs(3);
const BULK_BYTES: u64 = 100 << 20;

/// 50 clients doing `ROUNDS` round trips of 64 bytes each, at once; returns every round trip's
/// time (a lost one as `LOST`).
fn ping_pong(addr: SocketAddr) -> Vec<Duration> {
    let start = Arc::new(std::sync::Barrier::new(PING_CLIENTS));
    let clients: Vec<_> = (0..PING_CLIENTS)
        .map(|c| {
            let start = start.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(LOST)).unwrap();
                let mut times = Vec::with_capacity(ROUNDS);
                let msg = [c as u8; 64];
                let mut back = [0u8; 64];
                // One round trip first, so connecting is not measured.
                let warm = s.write_all(&msg).and_then(|_| s.read_exact(&mut back));
                start.wait();
                if warm.is_err() {
                    return vec![LOST; ROUNDS];
                }
                for _ in 0..ROUNDS {
                    let t = Instant::now();
                    if s.write_all(&msg)
                        .and_then(|_| s.read_exact(&mut back))
                        .is_err()
                    {
                        times.resize(ROUNDS, LOST);
                        break;
                    }
                    assert_eq!(back, msg, "client {c}: echoed bytes differ");
                    times.push(t.elapsed());
                    std::thread::sleep(Duration::from_millis(2));
                }
                times
            })
        })
        .collect();
    clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect()
}

fn p99(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() * 99 / 100]
}

/// A client that writes 64 KiB chunks as fast as the server takes them and never reads, until
/// `stop`; `sent` counts what it wrote.
fn flooder(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let chunk = vec![7u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            match s.write(&chunk) {
                Ok(n) => {
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
        // Closed with unread data, the socket sends a reset: the server must notice, and drop
        // what it queued for us.
        drop(s);
    })
}

/// Waits until `sent` stops growing for half a second (the server stopped reading the flooder,
/// or the group ran dry) or 64 MiB went; bounded to 30 s.
fn wait_for_stall(sent: &AtomicU64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (sent.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = sent.load(Ordering::Relaxed);
        if now >= 64 << 20 {
            return now;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(500) && now > 0 {
            return now;
        }
    }
    sent.load(Ordering::Relaxed)
}

fn flood_scenario(server: Server, label: &str) {
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let f = flooder(addr, stop.clone(), sent.clone());
    let flooded = wait_for_stall(&sent);
    let times = ping_pong(addr);
    let lost = times.iter().filter(|t| **t >= LOST).count();
    let p = p99(times);
    stop.store(true, Ordering::Relaxed);
    f.join().unwrap();
    eprintln!("{label}: flooder sent {flooded} B before the ping-pong; p99 {p:?}, {lost} lost");
    assert_eq!(
        lost, 0,
        "{label}: ping-pong round trips lost while one client floods"
    );
    assert!(p < P99_BOUND, "{label}: p99 {p:?} while one client floods");
    std::thread::sleep(Duration::from_millis(300));
    let v = server.stop();
    assert_eq!(v["in_user"], 0, "{label}: every buffer back: {v}");
}

fn bulk_scenario(server: Server, label: &str) {
    let addr = server.addr;
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let counted = sent.clone();
    let writer = std::thread::spawn(move || {
        let chunk = vec![3u8; 1 << 20];
        for _ in 0..(BULK_BYTES >> 20) {
            w.write_all(&chunk).unwrap();
            counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let reader = std::thread::spawn(move || {
        let mut r = s;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n as u64,
            }
        }
    });
    while sent.load(Ordering::Relaxed) < 8 << 20 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let times = ping_pong(addr);
    let during = sent.load(Ordering::Relaxed) < BULK_BYTES;
    let lost = times.iter().filter(|t| **t >= LOST).count();
    let p = p99(times);
    writer.join().unwrap();
    let got = reader.join().unwrap();
    eprintln!("{label}: bulk still sending at the end of the ping-pong: {during}; p99 {p:?}");
    assert_eq!(
        got, BULK_BYTES,
        "{label}: the bulk client got its bytes back"
    );
    assert_eq!(
        lost, 0,
        "{label}: ping-pong round trips lost during a bulk transfer"
    );
    assert!(p < P99_BOUND, "{label}: p99 {p:?} during a 100 MB transfer");
    std::thread::sleep(Duration::from_millis(300));
    let v = server.stop();
    assert_eq!(v["in_user"], 0, "{label}: every buffer back: {v}");
}

/// The scenarios measure latency: one at a time (the test harness runs tests in parallel).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn echo(extra: &[&str]) -> Server {
    let mut args = vec!["echo", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args, "")
}

fn proxy(extra: &[&str]) -> Server {
    let upstream = echo_upstream().to_string();
    let mut args = vec!["proxy", "--listen", "127.0.0.1:0", "--upstream", &upstream];
    args.extend_from_slice(extra);
    Server::start(&args, "")
}

#[test]
fn echo_serves_others_while_one_client_floods_and_never_reads() {
    let _one = serial();
    flood_scenario(echo(&[]), "echo");
    flood_scenario(echo(&["--rt"]), "echo --rt");
}

#[test]
fn proxy_serves_others_while_one_client_floods_and_never_reads() {
    let _one = serial();
    flood_scenario(proxy(&[]), "proxy");
    flood_scenario(proxy(&["--rt"]), "proxy --rt");
}

#[test]
fn echo_serves_others_during_a_100_mb_transfer() {
    let _one = serial();
    bulk_scenario(echo(&[]), "echo");
    bulk_scenario(echo(&["--rt"]), "echo --rt");
}

#[test]
fn proxy_serves_others_during_a_100_mb_transfer() {
    let _one = serial();
    bulk_scenario(proxy(&[]), "proxy");
    bulk_scenario(proxy(&["--rt"]), "proxy --rt");
}

/// Issue 18, item 4: `proxy --rt` kept a session (both sockets and its buffers) after a client
/// that sent and never read disconnected, in 2 of 5 runs. Five runs, each checked.
#[test]
fn proxy_frees_the_session_of_a_client_that_sent_never_read_and_left() {
    let _one = serial();
    for extra in [&["--rt"][..], &[][..]] {
        let server = proxy(extra);
        let before = server.open_fds();
        for run in 0..5 {
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            let f = flooder(server.addr, stop.clone(), sent.clone());
            wait_for_stall(&sent);
            stop.store(true, Ordering::Relaxed);
            f.join().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while server.open_fds() > before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                server.open_fds(),
                before,
                "{extra:?} run {run}: the session's descriptors were not freed"
            );
        }
        let v = server.stop();
        assert_eq!(v["in_user"], 0, "{extra:?}: every buffer back: {v}");
        assert_eq!(v["resets"], 5, "{extra:?}: {v}");
    }
}
