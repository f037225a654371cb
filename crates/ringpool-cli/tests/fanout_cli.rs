//! `ringpool fanout` as a user runs it: a file served to many clients, each chunk read once and
//! leased to every client's send; identical, checksum-verified copies, every chunk buffer back
//! at the end; a client that disconnects, a file that shrinks, and a laggard that is dropped.
//! The bench's baseline mode, `--read-per-client` (each client its own reads), delivers the
//! same identical copies. The server on the async layer (`--rt`) passes the same tests, and so
//! do both kinds of lease (`--lease pages`, `--lease memory`); pages leases leak no pipe and no
//! descriptor, `--lease auto` picks what its rule says, and a bad `--lease` is refused.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::Server;

/// A file of `len` bytes whose content depends on the position (so a misplaced chunk shows).
fn make_file(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
    let path = dir.join("served.bin");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut block = vec![0u8; 1 << 16];
    for b in 0..len.div_ceil(block.len()) {
        for (i, x) in block.iter_mut().enumerate() {
            *x = ((b * 7919 + i * 31 + i / 251) % 256) as u8;
        }
        let n = block.len().min(len - b * block.len());
        f.write_all(&block[..n]).unwrap();
    }
    f.flush().unwrap();
    path
}

/// A 64-bit checksum of a stream (position-sensitive).
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Sum {
    hash: u64,
    len: u64,
}

impl Sum {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash = (self.hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }
}

fn sum_of(bytes: &[u8]) -> Sum {
    let mut s = Sum::default();
    s.add(bytes);
    s
}

/// Reads a client's copy to EOF: its checksum, or the error that ended it.
fn receive(addr: SocketAddr, read_first: Option<usize>) -> std::io::Result<Sum> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut sum = Sum::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if read_first.is_some_and(|limit| sum.len as usize >= limit) {
            return Ok(sum);
        }
        match s.read(&mut buf)? {
            0 => return Ok(sum),
            n => sum.add(&buf[..n]),
        }
    }
}

/// The `--lease` value of `extra` (`pages` when none: `auto` picks pages on loopback).
fn lease_of<'a>(extra: &[&'a str]) -> &'a str {
    extra
        .iter()
        .position(|&a| a == "--lease")
        .map_or("pages", |i| extra[i + 1])
}

fn fanout(file: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "fanout",
        "--file",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Server::start(&args, "")
}

#[test]
fn a_256_mib_file_to_16_clients_identical_verified_copies() {
    sixteen_clients_identical_verified_copies(&["--lease", "memory"], "lease");
}

#[test]
fn on_the_async_layer_a_256_mib_file_to_16_clients_identical_verified_copies() {
    sixteen_clients_identical_verified_copies(&["--rt", "--lease", "memory"], "lease-rt");
}

/// Issue 16: 256 MiB to 16 clients byte-checked with pages leases; every pipe back in the pool
/// (none in use), and the server holds no descriptor more than the idle pipes' two each.
#[test]
fn pages_leases_serve_256_mib_to_16_clients_leaking_no_pipe_or_descriptor() {
    sixteen_clients_identical_verified_copies(&["--lease", "pages"], "lease");
}

#[test]
fn on_the_async_layer_pages_leases_serve_256_mib_to_16_clients_leaking_no_pipe_or_descriptor() {
    sixteen_clients_identical_verified_copies(&["--rt", "--lease", "pages"], "lease-rt");
}

/// The `stats` of a server that used `kind` leases say so; for pages, every pipe is back and
/// the server's descriptors are those it had before serving plus two per idle pipe (and the
/// pool's `/dev/null`).
fn assert_lease_and_no_leak(v: &serde_json::Value, kind: &str, fds_before: usize, fds: usize) {
    assert_eq!(v["lease"], kind, "{v}");
    assert_eq!(v["pipes_in_use"], 0, "every pipe back: {v}");
    let (made, idle, closed) = (
        v["pipes_made"].as_u64().unwrap(),
        v["pipes_idle"].as_u64().unwrap(),
        v["pipes_closed"].as_u64().unwrap(),
    );
    assert_eq!(
        made,
        idle + closed,
        "every pipe made is idle or closed: {v}"
    );
    // Pages: the pool's `/dev/null`, opened on the first drain of a pipe that held pages.
    let devnull = usize::from(kind == "pages");
    assert!(
        (fds_before + 2 * idle as usize..=fds_before + 2 * idle as usize + devnull).contains(&fds),
        "descriptors before serving {fds_before}, after {fds}, idle pipes {idle}: {v}"
    );
    if kind == "pages" {
        assert!(made > 0, "{v}");
        assert_eq!(v["zc_sends"], 0, "pages members splice: {v}");
    } else {
        assert_eq!(made, 0, "memory leases use no pipe: {v}");
    }
}

fn sixteen_clients_identical_verified_copies(extra: &[&str], mode: &str) {
    const LEN: usize = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), LEN);
    let expected = sum_of(&std::fs::read(&path).unwrap());
    let mut args = vec!["--clients", "16", "--in-flight", "8"];
    args.extend_from_slice(extra);
    let kind = lease_of(extra);
    let server = fanout(&path, &args);
    let fds_before = server.open_fds();
    let addr = server.addr;
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|_| std::thread::spawn(move || receive(addr, None)))
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap().unwrap(), expected, "client {i}");
    }
    eprintln!(
        "{kind} leases, {extra:?}: 16 x 256 MiB in {:?}",
        started.elapsed()
    );
    // The round ends (its sockets closed) just after the last client's EOF.
    std::thread::sleep(Duration::from_millis(300));
    let fds = server.open_fds();
    let v = server.stop();
    eprintln!("{v}");
    assert_lease_and_no_leak(&v, kind, fds_before, fds);
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["rounds"], 1, "{v}");
    assert_eq!(v["clients_done"], 16, "{v}");
    assert_eq!(v["chunks_read"], 256, "each chunk read once: {v}");
    assert_eq!(v["bytes_sent"], 16 * LEN as u64, "{v}");
    assert!(v["peak_in_flight"].as_u64().unwrap() <= 8, "{v}");
    assert_eq!(
        v["buffers_free"], v["buffers_total"],
        "every chunk buffer back: {v}"
    );
}

#[test]
fn read_per_client_mode_delivers_identical_verified_copies() {
    // Not a multiple of the chunk: every client's last read is short.
    const LEN: usize = (32 << 20) + 12_345;
    const CLIENTS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), LEN);
    let expected = sum_of(&std::fs::read(&path).unwrap());
    let server = fanout(
        &path,
        &["--clients", "8", "--in-flight", "4", "--read-per-client"],
    );
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| std::thread::spawn(move || receive(addr, None)))
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap().unwrap(), expected, "client {i}");
    }
    let v = server.stop();
    eprintln!("{v}");
    assert_eq!(v["mode"], "read-per-client", "{v}");
    assert_eq!(v["rounds"], 1, "{v}");
    assert_eq!(v["clients_done"], CLIENTS as u64, "{v}");
    assert_eq!(v["clients_lost"], 0, "{v}");
    assert_eq!(
        v["chunks_read"],
        (CLIENTS * LEN.div_ceil(1 << 20)) as u64,
        "every chunk read once per client: {v}"
    );
    assert_eq!(v["bytes_read"], (CLIENTS * LEN) as u64, "{v}");
    assert_eq!(v["bytes_sent"], (CLIENTS * LEN) as u64, "{v}");
    assert_eq!(v["buffers_total"], (CLIENTS * 4) as u64, "{v}");
    assert!(
        v["peak_in_flight"].as_u64().unwrap() <= (CLIENTS * 4) as u64,
        "{v}"
    );
    assert_eq!(
        v["buffers_free"], v["buffers_total"],
        "every chunk buffer back: {v}"
    );
}

#[test]
fn a_client_that_disconnects_mid_file_does_not_disturb_the_others() {
    a_client_disconnects(&["--lease", "memory"]);
}

#[test]
fn on_the_async_layer_a_client_that_disconnects_mid_file_does_not_disturb_the_others() {
    a_client_disconnects(&["--rt", "--lease", "memory"]);
}

/// Issue 16: a client that disconnects mid-splice.
#[test]
fn with_pages_leases_a_client_that_disconnects_mid_file_does_not_disturb_the_others() {
    a_client_disconnects(&["--lease", "pages"]);
}

#[test]
fn on_the_async_layer_with_pages_leases_a_client_that_disconnects_mid_file_does_not_disturb_the_others(
) {
    a_client_disconnects(&["--rt", "--lease", "pages"]);
}

fn a_client_disconnects(extra: &[&str]) {
    const LEN: usize = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), LEN);
    let expected = sum_of(&std::fs::read(&path).unwrap());
    let mut args = vec!["--clients", "3", "--in-flight", "4"];
    args.extend_from_slice(extra);
    let server = fanout(&path, &args);
    let fds_before = server.open_fds();
    let addr = server.addr;
    let quitter = std::thread::spawn(move || receive(addr, Some(1 << 20)));
    let others: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || receive(addr, None)))
        .collect();
    assert!(quitter.join().unwrap().unwrap().len >= 1 << 20);
    for c in others {
        assert_eq!(c.join().unwrap().unwrap(), expected);
    }
    std::thread::sleep(Duration::from_millis(300));
    let fds = server.open_fds();
    let v = server.stop();
    assert_eq!(v["clients_done"], 2, "{v}");
    assert_eq!(v["clients_lost"], 1, "{v}");
    assert_eq!(v["buffers_free"], v["buffers_total"], "{v}");
    assert_lease_and_no_leak(&v, lease_of(extra), fds_before, fds);
}

#[test]
fn a_file_that_shrinks_while_served_ends_the_round_with_identical_copies() {
    a_file_shrinks(&["--lease", "memory"]);
}

#[test]
fn on_the_async_layer_a_file_that_shrinks_while_served_ends_the_round_with_identical_copies() {
    a_file_shrinks(&["--rt", "--lease", "memory"]);
}

#[test]
fn with_pages_leases_a_file_that_shrinks_while_served_ends_the_round_with_identical_copies() {
    a_file_shrinks(&["--lease", "pages"]);
}

#[test]
fn on_the_async_layer_with_pages_leases_a_file_that_shrinks_ends_the_round_with_identical_copies() {
    a_file_shrinks(&["--rt", "--lease", "pages"]);
}

fn a_file_shrinks(extra: &[&str]) {
    const LEN: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), LEN);
    let original = std::fs::read(&path).unwrap();
    let mut args = vec!["--clients", "2", "--in-flight", "2", "--chunk", "65536"];
    args.extend_from_slice(extra);
    let server = fanout(&path, &args);
    let addr = server.addr;
    let mut a = TcpStream::connect(addr).unwrap();
    let b = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    let mut first = vec![0u8; 1 << 20];
    a.read_exact(&mut first).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    first.extend(rest);
    let got_b = b.join().unwrap();
    assert_eq!(first.len(), got_b.len(), "both clients got the same length");
    assert!(first == got_b, "both clients got the same bytes");
    assert!(first.len() < LEN, "the shrink was seen");
    assert!(first.len() >= 4 << 20);
    assert!(first[..] == original[..first.len()], "a prefix of the file");
    let v = server.stop();
    assert_eq!(v["clients_done"], 2, "{v}");
    assert_eq!(v["buffers_free"], v["buffers_total"], "{v}");
    assert_eq!(v["lease"], lease_of(extra), "{v}");
    assert_eq!(v["pipes_in_use"], 0, "{v}");
}

#[test]
fn a_laggard_is_dropped_and_memory_stays_bounded() {
    a_laggard_is_dropped(&["--lease", "memory"]);
}

#[test]
fn on_the_async_layer_a_laggard_is_dropped_and_memory_stays_bounded() {
    a_laggard_is_dropped(&["--rt", "--lease", "memory"]);
}

/// Issue 16: a pipe that fills (a client that never reads) under the laggard rule.
#[test]
fn with_pages_leases_a_laggard_is_dropped_and_pipes_stay_bounded() {
    a_laggard_is_dropped(&["--lease", "pages"]);
}

#[test]
fn on_the_async_layer_with_pages_leases_a_laggard_is_dropped_and_pipes_stay_bounded() {
    a_laggard_is_dropped(&["--rt", "--lease", "pages"]);
}

fn a_laggard_is_dropped(extra: &[&str]) {
    const LEN: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), LEN);
    let expected = sum_of(&std::fs::read(&path).unwrap());
    let mut args = vec![
        "--clients",
        "3",
        "--in-flight",
        "2",
        "--laggard-timeout",
        "1",
    ];
    args.extend_from_slice(extra);
    let server = fanout(&path, &args);
    let addr = server.addr;
    // The laggard connects and never reads.
    let laggard = TcpStream::connect(addr).unwrap();
    let others: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || receive(addr, None)))
        .collect();
    for c in others {
        assert_eq!(
            c.join().unwrap().unwrap(),
            expected,
            "the others got everything"
        );
    }
    // The laggard was reset: reading what it buffered ends in an error or a short EOF.
    let mut l = laggard;
    l.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let ended = loop {
        match l.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => got += n,
            Err(_) => break "reset",
        }
    };
    assert!(
        got < LEN,
        "the laggard did not get the whole file ({ended})"
    );
    let v = server.stop();
    assert_eq!(v["laggards"], 1, "{v}");
    assert!(v["peak_in_flight"].as_u64().unwrap() <= 2, "{v}");
    assert_eq!(v["buffers_free"], v["buffers_total"], "{v}");
    assert_eq!(v["lease"], lease_of(extra), "{v}");
    assert_eq!(v["pipes_in_use"], 0, "{v}");
    if lease_of(extra) == "pages" {
        // 2 chunks in flight, a group pipe and 3 member pipes each.
        assert!(v["pipes_made"].as_u64().unwrap() <= 8, "{v}");
    }
}

/// Runs `ringpool fanout --file PATH` (with `extra`), which must fail at start: its exit status
/// and stderr (bounded: a server that starts instead is killed after 10 s).
fn fails_at_start(path: &std::path::Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args(["fanout", "--listen", "127.0.0.1:0", "--file"])
        .arg(path)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fanout --file {} started instead of failing",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 18, item 5: a FIFO, a character device and a directory are refused at start with a
/// clear error naming the path (fanout serves regular files only: it reads each chunk at its
/// offset, once per round). Before, a FIFO served 64 KiB as the whole file, `/dev/zero` random
/// lengths, and a directory reset every client.
#[test]
fn non_regular_files_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A writer holding the FIFO open (read-write: never blocks), slowly writing.
    let w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let _writer = std::thread::spawn(move || {
        let mut w = w;
        for _ in 0..100 {
            if w.write_all(&[1u8; 1000]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    for extra in [&[][..], &["--rt"][..]] {
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (std::path::Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let (status, err) = fails_at_start(path, extra);
            assert_eq!(status.code(), Some(1), "{path:?} {extra:?}: {err}");
            assert!(
                err.contains(&format!("--file {}", path.display()))
                    && err.contains(kind)
                    && err.contains("not a regular file"),
                "{path:?} {extra:?}: the error names the flag, the path and why: {err}"
            );
        }
    }
    let (status, err) = fails_at_start(&dir.path().join("missing"), &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing") && err.contains("No such file"),
        "{err}"
    );
}

/// The summary's lease line and the `stats` line of a server started with `extra` that served
/// one client a small file.
fn lease_report(extra: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), (3 << 20) + 5);
    let expected = sum_of(&std::fs::read(&path).unwrap());
    let mut server = fanout(&path, extra);
    let addr = server.addr;
    assert_eq!(receive(addr, None).unwrap(), expected, "{extra:?}");
    assert!(server.running());
    let out = server.stop_output();
    let line = out
        .lines()
        .find(|l| l.starts_with("leases: "))
        .unwrap_or_else(|| panic!("no `leases:` line in {out:?}"))
        .to_string();
    let stats = out.lines().find_map(|l| l.strip_prefix("stats ")).unwrap();
    (line, serde_json::from_str(stats).unwrap())
}

/// Issue 16, item 3: `auto` (the default) picks pages where zero-copy send would copy: on
/// loopback; the summary and the `stats` line say which kind and why, with the pipes' use.
#[test]
fn auto_picks_pages_on_loopback_and_says_so() {
    for extra in [&[][..], &["--lease", "auto"][..], &["--rt"][..]] {
        let (line, v) = lease_report(extra);
        assert!(
            line.starts_with(
                "leases: pages (auto: zero-copy send would copy on the clients' \
                              path (lo: loopback)); pipes: "
            ),
            "{extra:?}: {line}"
        );
        assert!(
            line.contains(" in use, ") && line.contains(" would-block waits"),
            "{line}"
        );
        assert_eq!(v["lease"], "pages", "{v}");
        assert!(v["lease_why"].as_str().unwrap().contains("loopback"), "{v}");
        assert!(v["pipes_made"].as_u64().unwrap() >= 2, "{v}");
        assert_eq!(v["pipes_in_use"], 0, "{v}");
        assert!(v["pipe_max"].as_u64().unwrap() >= 4096, "{v}");
    }
}

/// The largest pipe (`/proc/sys/fs/pipe-max-size`).
fn pipe_max() -> usize {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `auto` picks memory where pages cannot serve: a chunk larger than the largest pipe; asked
/// for explicitly, pages then fail at start with the flag and the reason named. `--lease
/// memory` is memory, whatever the path.
#[test]
fn auto_picks_memory_where_a_chunk_does_not_fit_a_pipe_and_memory_when_asked() {
    let chunk = (pipe_max() * 2).to_string();
    let (line, v) = lease_report(&["--chunk", &chunk]);
    assert!(
        line.starts_with("leases: memory (auto: pages cannot serve here (a chunk of "),
        "{line}"
    );
    assert!(line.contains("pipe-max-size"), "{line}");
    assert_eq!(v["lease"], "memory", "{v}");
    assert_eq!(v["pipes_made"], 0, "{v}");

    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), 4096);
    let (status, err) = fails_at_start(&path, &["--lease", "pages", "--chunk", &chunk]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("--lease pages: a chunk of") && err.contains("pipe-max-size"),
        "{err}"
    );

    for extra in [
        &["--lease", "memory"][..],
        &["--rt", "--lease", "memory"][..],
    ] {
        let (line, v) = lease_report(extra);
        assert!(line.starts_with("leases: memory (asked for (--lease memory)); pipes: 0 made"));
        assert_eq!(v["lease"], "memory", "{v}");
        assert_eq!(v["pipes_made"], 0, "{v}");
    }
}

/// A bad `--lease` value is refused at start, naming the flag, the value and the choices.
#[test]
fn a_bad_lease_value_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), 4096);
    let (status, err) = fails_at_start(&path, &["--lease", "pipes"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value 'pipes' for '--lease <LEASE>'")
            && err.contains("[possible values: pages, memory, auto]"),
        "{err}"
    );
    // The baseline reads per client: a lease kind makes no sense with it.
    let (status, err) = fails_at_start(&path, &["--lease", "pages", "--read-per-client"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--lease") && err.contains("--read-per-client"),
        "{err}"
    );
}
