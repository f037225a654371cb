//! `ringpool echo` as a user runs it: thousands of connections sharing one small buffer group,
//! every echoed byte checked, a clean stop on SIGINT, and the group full again at the end. Run
//! on the kernel's best rung and with the legacy rungs forced through `RINGPOOL_FORCE`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CONNECTIONS: usize = 2000;
const BUSY: usize = 32;
const BUSY_BYTES: usize = 256 * 1024;

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn start(force: &str, extra: &[&str]) -> (Child, SocketAddr, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args([
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--bufs",
            "64",
            "--buf-size",
            "4096",
        ])
        .args(extra)
        .env("RINGPOOL_FORCE", force)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ringpool echo");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .parse()
        .unwrap();
    (child, addr, out)
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

fn run_echo(force: &str, extra: &[&str]) -> serde_json::Value {
    raise_fd_limit();
    let (mut child, addr, mut out) = start(force, extra);
    let mut conns: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            let c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            c
        })
        .collect();
    // Busy connections stream 256 KiB each, concurrently, through a group of 64 buffers.
    let busy: Vec<_> = conns
        .drain(..BUSY)
        .enumerate()
        .map(|(i, c)| {
            std::thread::spawn(move || {
                let data = pattern(i, BUSY_BYTES);
                let mut w = c.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
                let mut got = vec![0u8; BUSY_BYTES];
                let mut r = c;
                r.read_exact(&mut got).unwrap();
                writer.join().unwrap();
                assert!(got == data, "connection {i}: echoed bytes differ");
            })
        })
        .collect();
    for b in busy {
        b.join().unwrap();
    }
    // Every idle connection is still served.
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&[(i % 256) as u8]).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(b[0], (i % 256) as u8);
    }
    drop(conns);
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "echo exited with {status}; output:\n{rest}"
    );
    let stats = rest
        .lines()
        .find_map(|l| l.strip_prefix("stats "))
        .expect(&rest);
    let v: serde_json::Value = serde_json::from_str(stats).unwrap();
    assert_eq!(v["connections"], CONNECTIONS as u64, "{force}: {stats}");
    let expected = (BUSY * BUSY_BYTES + CONNECTIONS - BUSY) as u64;
    assert_eq!(v["bytes_echoed"], expected, "{force}: {stats}");
    assert_eq!(v["in_user"], 0, "{force}: group full again: {stats}");
    assert_eq!(v["in_kernel"], v["total"], "{force}: {stats}");
    assert_eq!(
        v["buffer_bytes"],
        64 * 4096,
        "{force}: buffer memory is the group's"
    );
    eprintln!("{force:?}: {stats}");
    v
}

#[test]
fn echo_serves_thousands_of_connections_from_one_group() {
    let v = run_echo("", &["--recv", "groups"]);
    assert_eq!(v["recv"], "groups");
}

/// Whether this kernel and process can register a device-less zero-copy receive area.
fn zcrx_here() -> bool {
    ringpool::Features::get().zcrx_device_less == ringpool::ZcrxProbe::Works
}

#[test]
fn echo_by_default_receives_through_zcrx_where_the_kernel_can_else_the_group() {
    let v = run_echo("", &[]);
    let want = if zcrx_here() { "zcrx" } else { "groups" };
    assert_eq!(v["recv"], want, "{v}");
}

/// Regression: `--recv auto` falling back to buffer groups on a kernel without device-less areas
/// (the 6.18 host) gave "the driver's ring was not set up for it" as the reason, which no ring
/// could have helped; it names the kernel or the permission now. Where the kernel has them, the
/// fallback is forced (`no-zcrx`) and the reason says so.
#[test]
fn echo_auto_falling_back_to_groups_names_the_kernel_not_the_ring() {
    let force = if zcrx_here() { "no-zcrx" } else { "" };
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args(["echo", "--listen", "127.0.0.1:0"])
        .env("RINGPOOL_FORCE", force)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let why = err
        .lines()
        .find_map(|l| l.strip_prefix("receive: buffer groups (zero-copy receive unavailable: "))
        .unwrap_or_else(|| panic!("no fallback line in: {err}"));
    assert!(!why.contains("not set up"), "{why}");
    if zcrx_here() {
        assert!(why.contains("no-zcrx rung is forced"), "{why}");
    } else {
        assert!(
            why.contains("needs 7.1")
                || why.contains("CAP_NET_ADMIN")
                || why.contains("needs 6.15"),
            "{why}"
        );
    }
}

#[test]
fn echo_recv_zcrx_serves_where_the_kernel_can_and_says_why_where_it_cannot() {
    if zcrx_here() {
        let v = run_echo("", &["--recv", "zcrx"]);
        assert_eq!(v["recv"], "zcrx");
        assert!(v["zcrx_refills"].as_u64().unwrap() > 0, "{v}");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args(["echo", "--listen", "127.0.0.1:0", "--recv", "zcrx"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("zero-copy receive is not available"), "{err}");
    eprintln!("skipped: zcrx echo not possible here; the refusal reads: {err}");
    // A NIC queue that cannot (loopback) is refused with the device's reason.
    let out = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args(["echo", "--listen", "127.0.0.1:0", "--recv", "zcrx=lo:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("zero-copy receive"),
        "{err}"
    );
    // A value that is none of the choices is a usage error naming them.
    let out = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args(["echo", "--listen", "127.0.0.1:0", "--recv", "pipes"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("groups, auto, zcrx"),
        "{err}"
    );
}

#[test]
fn echo_on_legacy_groups_and_rearmed_single_shots() {
    run_echo("legacy-provide,no-multishot", &[]);
}

#[test]
fn echo_on_the_async_layer() {
    assert_eq!(run_echo("", &["--rt"])["recv"], "groups");
    run_echo("legacy-provide,no-multishot", &["--rt"]);
}
