//! Issue 18, item 9: an upstream that never answers (its backlog full) must not hold the
//! proxy's clients and descriptors for as long as the kernel retries the SYN. A connect that
//! outlives `--connect-timeout` resets its client; a client that leaves cancels its pending
//! connect at once. Both proxies: the event loop and `--rt`.

mod common;

use common::echo_upstream;

use common::Server;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// A listener whose accept queue is full and never drained: further connects to it hang
/// (their SYNs are dropped). The returned values must live as long as the test needs that.
fn silent_upstream() -> (TcpListener, TcpStream, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen on a bound socket we own; a backlog of 0 holds one connection.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let addr = l.local_addr().unwrap();
    let filler = TcpStream::connect(addr).unwrap();
    // The queue is full: a probe connect must hang, or the test would prove nothing.
    let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(probe.is_err(), "the upstream's backlog did not fill");
    (l, filler, addr)
}

fn proxy(upstream: SocketAddr, timeout: &str, rt: bool) -> Server {
    let up = upstream.to_string();
    let mut args = vec![
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--connect-timeout",
        timeout,
    ];
    if rt {
        args.push("--rt");
    }
    Server::start(&args, "")
}

/// Waits up to `within` for `cond`.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[test]
fn a_silent_upstream_resets_waiting_clients_after_the_connect_timeout() {
    let (_l, _filler, upstream) = silent_upstream();
    for rt in [false, true] {
        let server = proxy(upstream, "1", rt);
        let idle = server.open_fds();
        let start = Instant::now();
        let clients: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect(server.addr).unwrap())
            .collect();
        for mut c in clients {
            c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            let mut b = [0u8; 1];
            match c.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("rt={rt}: expected a reset or an end, got {other:?}"),
            }
        }
        let waited = start.elapsed();
        assert!(
            waited < Duration::from_secs(6),
            "rt={rt}: clients waited {waited:?} for a 1 s connect timeout"
        );
        assert!(
            eventually(Duration::from_secs(3), || server.open_fds() <= idle),
            "rt={rt}: {} descriptors open, {idle} when idle",
            server.open_fds()
        );
        let stats = server.stop();
        assert_eq!(stats["connect_timeouts"], 5, "rt={rt}: {stats}");
        assert_eq!(stats["in_kernel"], stats["total"], "rt={rt}: {stats}");
    }
}

#[test]
fn a_client_that_leaves_cancels_its_pending_upstream_connect() {
    let (_l, _filler, upstream) = silent_upstream();
    for rt in [false, true] {
        let server = proxy(upstream, "60", rt);
        let idle = server.open_fds();
        let clients: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect(server.addr).unwrap())
            .collect();
        // Each client holds two of the proxy's descriptors while its connect is pending.
        assert!(
            eventually(Duration::from_secs(5), || server.open_fds() >= idle + 10),
            "rt={rt}: the proxy did not take the clients ({} open, {idle} idle)",
            server.open_fds()
        );
        drop(clients);
        assert!(
            eventually(Duration::from_secs(2), || server.open_fds() <= idle),
            "rt={rt}: the clients left but {} descriptors stay open ({idle} idle)",
            server.open_fds()
        );
        let stats = server.stop();
        assert_eq!(stats["left_connecting"], 5, "rt={rt}: {stats}");
        assert_eq!(stats["connect_timeouts"], 0, "rt={rt}: {stats}");
    }
}

#[test]
fn a_zero_connect_timeout_is_refused_naming_the_flag() {
    let (status, err) = common::proxy_refusal(&["--connect-timeout", "0"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--connect-timeout") && err.contains("more than 0"),
        "{err}"
    );
}

/// Regression (found by the soak): a client that left was reset by the connect watch after
/// its connect had completed but before that completion was handled, and the handler then
/// used the reset pair's sockets (a panic: the proxy died). Clients that connect and close at
/// once, against an upstream that answers, hit that window.
#[test]
fn regression_a_client_gone_as_its_connect_completes_leaves_the_proxy_running() {
    use std::io::Write;
    let upstream = echo_upstream();
    for rt in [false, true] {
        let mut server = proxy(upstream, "5", rt);
        for round in 0..20 {
            let clients: Vec<TcpStream> = (0..50)
                .map(|_| TcpStream::connect(server.addr).unwrap())
                .collect();
            // Let the proxy accept them and start their connects, then leave.
            std::thread::sleep(Duration::from_millis(round % 5 * 10));
            drop(clients);
            assert!(server.running(), "rt={rt}: the proxy died in round {round}");
        }
        let mut c = TcpStream::connect(server.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping", "rt={rt}");
        drop(c);
        let stats = server.stop();
        assert_eq!(stats["in_kernel"], stats["total"], "rt={rt}: {stats}");
    }
}
