//! Issue 18, items 2 and 3: the servers at their descriptor limit (`prlimit --nofile=256`).
//! An exhausted resource is a refused or delayed connection, never the end of the server, and
//! a server at the limit does not spin (an accept that failed with `EMFILE` is re-armed after a
//! descriptor was freed or after a backoff, and the episode is logged once).

mod common;

use common::echo_upstream;

use common::Server;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const LIMIT: &[&str] = &["prlimit", "--nofile=256", "--"];

fn start(kind: &[&str]) -> Server {
    let upstream = echo_upstream().to_string();
    let mut args: Vec<&str> = if kind[0] == "proxy" {
        vec!["proxy", "--upstream", &upstream]
    } else if kind[0] == "fanout" {
        // Rounds of 1000 clients: the 400 all wait, holding their descriptors.
        vec!["fanout", "--file", "/proc/self/exe", "--clients", "1000"]
    } else {
        vec![kind[0]]
    };
    args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    args.extend_from_slice(&kind[1..]);
    Server::start_wrapped(LIMIT, &args)
}

/// One round trip through a fresh connection, within `within` (retried: the server may be
/// waiting out a backoff).
fn served(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr) {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 4];
            if s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping" {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Connects `n` clients and keeps them (each says hello, so the proxy opens its upstream).
fn crowd(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect(addr).ok()?;
            let _ = s.write_all(b"hi");
            Some(s)
        })
        .collect()
}

fn survives_the_descriptor_limit(kind: &[&str]) {
    let mut server = start(kind);
    let addr = server.addr;
    let clients = crowd(addr, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.running(),
        "{kind:?} exited at the descriptor limit: {}",
        server.stderr.lock().unwrap()
    );
    drop(clients);
    assert!(
        served(addr, Duration::from_secs(10)),
        "{kind:?}: not serving after the clients left"
    );
    let err = server.stderr.lock().unwrap().clone();
    let v = server.stop();
    eprintln!("{kind:?}: {v}\n{err}");
}

#[test]
fn proxy_refuses_clients_at_the_descriptor_limit_and_goes_on() {
    survives_the_descriptor_limit(&["proxy"]);
    survives_the_descriptor_limit(&["proxy", "--rt"]);
}

fn does_not_spin_at_the_descriptor_limit(kind: &[&str]) {
    let mut server = start(kind);
    let addr = server.addr;
    let clients = crowd(addr, 400);
    std::thread::sleep(Duration::from_millis(300));
    let cpu = server.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let spent = server.cpu_time() - cpu;
    assert!(server.running(), "{kind:?} exited at the descriptor limit");
    let log = server.stderr.lock().unwrap().clone();
    let accept_lines = log.lines().filter(|l| l.contains("accept")).count();
    // A spinning server burns a whole core (2 s of CPU in 2 s); one that waits, next to none.
    assert!(
        spent < Duration::from_millis(600),
        "{kind:?}: {spent:?} of CPU in 2 s while held at the descriptor limit"
    );
    assert!(
        accept_lines <= 2,
        "{kind:?}: the episode is logged once, not per attempt ({accept_lines} lines):\n{}",
        &log[..log.len().min(2000)]
    );
    assert!(
        log.contains("RLIMIT_NOFILE 256"),
        "{kind:?}: the log names the limit:\n{}",
        &log[..log.len().min(2000)]
    );
    drop(clients);
    if kind[0] != "fanout" {
        assert!(
            served(addr, Duration::from_secs(10)),
            "{kind:?}: not serving after the clients left"
        );
    }
    server.stop();
}

#[test]
fn fanout_does_not_spin_at_the_descriptor_limit() {
    does_not_spin_at_the_descriptor_limit(&["fanout"]);
    does_not_spin_at_the_descriptor_limit(&["fanout", "--rt"]);
}

#[test]
fn echo_does_not_spin_at_the_descriptor_limit() {
    does_not_spin_at_the_descriptor_limit(&["echo"]);
    does_not_spin_at_the_descriptor_limit(&["echo", "--rt"]);
}

#[test]
fn proxy_does_not_spin_at_the_descriptor_limit() {
    does_not_spin_at_the_descriptor_limit(&["proxy"]);
    does_not_spin_at_the_descriptor_limit(&["proxy", "--rt"]);
}
