//! Issue 18, item 7: a ring that `RLIMIT_MEMLOCK` leaves no room for is reported as that, not
//! as "io_uring is not supported" or a bare `ENOMEM`; `ringpool probe` says so too; and a
//! limit that holds the servers' ring (but not a buffer ring beside it) still serves, on
//! legacy provided buffers. Needs root (to drop to uid 65534, whose locked memory is
//! accounted); skipped visibly otherwise, and a failure under `RINGPOOL_REQUIRE_ALL=1`.

mod common;

use common::can_drop_to_nobody;

use common::Server;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// io_uring charges locked memory per user, not per process: the tests of this file, all run
/// as uid 65534, would take each other's room under their tight limits. One at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `setpriv` to uid 65534 under `prlimit --memlock=<bytes>`.
fn as_nobody(memlock: u64) -> Vec<String> {
    [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "prlimit",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--memlock={memlock}"), "--".to_string()])
    .collect()
}

/// Runs `ringpool <args>` as uid 65534 under `memlock` bytes; returns (rc, stdout + stderr).
fn run_as_nobody(memlock: u64, args: &[&str]) -> (Option<i32>, String) {
    let wrapper = as_nobody(memlock);
    let mut cmd = Command::new(&wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(env!("CARGO_BIN_EXE_ringpool"))
        .args(args)
        .env("RINGPOOL_FORCE", "");
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that wrongly starts is stopped after a while instead of hanging the test.
    let pid = child.id() as i32;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        // SAFETY: kill signals a process we spawned (at worst one that already exited).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    drop(killer);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn a_ring_memlock_refuses_is_named_as_rlimit_memlock_not_as_missing_io_uring() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !can_drop_to_nobody() {
        return;
    }
    for (memlock, shown) in [
        (0, "RLIMIT_MEMLOCK = 0 KiB"),
        (64 << 10, "RLIMIT_MEMLOCK = 64 KiB"),
    ] {
        for server in [
            &["echo", "--listen", "127.0.0.1:0"][..],
            &["echo", "--listen", "127.0.0.1:0", "--rt"][..],
            &[
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
            ][..],
        ] {
            let (rc, text) = run_as_nobody(memlock, server);
            assert_eq!(rc, Some(1), "{server:?} at memlock {memlock}: {text}");
            assert!(
                text.contains(shown) && text.contains("1024 submission"),
                "{server:?} at memlock {memlock} must name the limit and the ring: {text}"
            );
            assert!(!text.contains("not supported"), "{text}");
        }
    }
}

#[test]
fn probe_says_when_memlock_leaves_no_room_for_the_servers_ring() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !can_drop_to_nobody() {
        return;
    }
    let (rc, text) = run_as_nobody(64 << 10, &["probe"]);
    assert_eq!(rc, Some(0), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("ring setup"))
        .unwrap_or_else(|| panic!("no ring setup line: {text}"));
    assert!(
        line.contains("refused") && line.contains("RLIMIT_MEMLOCK = 64 KiB"),
        "{line}"
    );
    let (rc, text) = run_as_nobody(8 << 20, &["probe", "--json"]);
    assert_eq!(rc, Some(0), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["ring_setup"], "ok", "{text}");
}

#[test]
fn a_limit_that_holds_the_ring_but_no_buffer_ring_serves_on_legacy_buffers() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !can_drop_to_nobody() {
        return;
    }
    // 208 KiB: the servers' ring (about 200 KiB) fits, once the probe's own rings are torn
    // down; a buffer ring beside it does not.
    //
    // uid 65534's locked memory is one account for every process of that user: what the
    // previous test binary (memlock_cli) ran as uid 65534 may still be charged while the
    // kernel tears its rings down. So a start refused for the ring's locked memory (and only
    // that) is tried again, for a bounded while; the server that starts must then serve.
    let wrapper = as_nobody(208 << 10);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let server = loop {
        match Server::try_start_wrapped(&wrapper, &["echo", "--listen", "127.0.0.1:0"]) {
            Ok(server) => break server,
            Err(e) if e.contains("RLIMIT_MEMLOCK") && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("echo did not start at 208 KiB: {e}"),
        }
    };
    let mut c = TcpStream::connect(server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    c.write_all(&sent).unwrap();
    let mut got = vec![0; sent.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, sent);
    drop(c);
    let stats = server.stop();
    assert_eq!(stats["in_kernel"], stats["total"], "{stats}");
}
