//! Issue 18, item 8: a closed or full stdout (`ringpool echo … | true`, `>/dev/full`) used to
//! panic every command (rc=101) before it served. Write errors on stdout/stderr are not fatal:
//! the servers serve, and stop cleanly on SIGINT.

mod common;

use common::echo_upstream;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port free right now on 127.0.0.1 (the server's stdout cannot tell us which it took).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Out {
    /// `>/dev/full`: every write fails with ENOSPC.
    Full,
    /// `| true`: the reader is gone, every write fails with EPIPE.
    Closed,
}

/// Connects to `addr` (retrying while the server starts) and checks one round trip, or for
/// fanout that bytes arrive.
fn serves(addr: SocketAddr, fanout: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if fanout {
                let mut b = vec![0u8; 4096];
                return s.read(&mut b).is_ok_and(|n| n > 0);
            }
            let mut b = [0u8; 4];
            return s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping";
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn server_with_broken_stdout(args: &[&str], out: Out) {
    let addr = free_port();
    let upstream = echo_upstream().to_string();
    let listen = addr.to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringpool"));
    cmd.args(&args[..1]).args(["--listen", &listen]);
    match args[0] {
        "proxy" => {
            cmd.args(["--upstream", &upstream]);
        }
        "fanout" => {
            cmd.args(["--file", env!("CARGO_BIN_EXE_ringpool")]);
        }
        _ => {}
    }
    cmd.args(&args[1..]).stderr(Stdio::piped());
    match out {
        Out::Full => cmd.stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        ),
        Out::Closed => cmd.stdout(Stdio::piped()),
    };
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take()); // `| true`
    let ok = serves(addr, args[0] == "fanout");
    let running = child.try_wait().unwrap().is_none();
    // SAFETY: kill sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        running && ok,
        "{args:?} {out:?}: not serving (rc {:?}): {err}",
        o.status.code()
    );
    assert_eq!(o.status.code(), Some(0), "{args:?} {out:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} {out:?}: {err}");
}

#[test]
fn servers_serve_with_a_closed_or_full_stdout() {
    for args in [
        &["echo"][..],
        &["echo", "--rt"],
        &["proxy"],
        &["proxy", "--rt"],
        &["fanout"],
        &["fanout", "--rt"],
    ] {
        for out in [Out::Full, Out::Closed] {
            server_with_broken_stdout(args, out);
        }
    }
}

#[test]
fn probe_with_a_full_stdout_does_not_panic() {
    let o = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .arg("probe")
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(101), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
