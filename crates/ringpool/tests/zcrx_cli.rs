//! The `ringpool` command's zero-copy receive paths, end to end, where the kernel has them:
//! `ringpool echo --recv zcrx` serving clients, and `ringpool proxy --recv zcrx` forwarding to
//! it, every byte checked, each server's area full again at exit.
//!
//! The CLI crate's own tests cover `--recv` on this host (6.18: the refusal and the fallback),
//! but they cannot run in the kernel matrix's guests, which is where device-less zcrx exists.
//! So this test lives here, with the crate's kernel tests, and runs the `ringpool` binary: the
//! one the matrix puts in the guest (`/bin/ringpool`), `RINGPOOL_CLI`, or the workspace's
//! `target/release/ringpool`. Where the kernel cannot register a device-less area it skips
//! visibly (and fails where it must be able to: 7.1+ as root).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use ringpool::{Features, ZcrxProbe};

/// The `ringpool` binary to run, if there is one.
fn cli() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("RINGPOOL_CLI").map(PathBuf::from),
        Some(PathBuf::from("/bin/ringpool")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/ringpool")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Whether this kernel and process must be able to register a device-less area.
fn device_less_expected() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let k = Features::get().kernel;
    root && (k.major, k.minor) >= (7, 1)
}

/// A server started with `args`, and its stdout after the `listening on` line.
struct Server {
    child: Child,
    addr: SocketAddr,
    out: BufReader<ChildStdout>,
}

impl Server {
    fn start(bin: &PathBuf, args: &[&str]) -> Server {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ringpool");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{line}"))
            .parse()
            .unwrap();
        Server { child, addr, out }
    }

    /// SIGINT, then the `stats` line it printed.
    fn stop(mut self) -> String {
        // SAFETY: kill sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exited with {status}: {rest}");
        eprintln!("{rest}");
        rest.lines()
            .find_map(|l| l.strip_prefix("stats "))
            .unwrap_or_else(|| panic!("no stats line: {rest}"))
            .to_string()
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

/// `conns` clients through `addr`, each writing `len` bytes and reading them back.
fn echo_clients(addr: SocketAddr, conns: usize, len: usize) {
    let clients: Vec<_> = (0..conns)
        .map(|i| {
            std::thread::spawn(move || {
                let c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let data = pattern(i, len);
                let mut w = c.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
                let mut got = vec![0u8; len];
                let mut r = c;
                r.read_exact(&mut got).unwrap();
                writer.join().unwrap();
                assert!(got == data, "client {i}: the echo differs");
            })
        })
        .collect();
    clients.into_iter().for_each(|c| c.join().unwrap());
}

#[test]
fn echo_and_proxy_serve_through_zcrx_areas_and_every_buffer_comes_home() {
    if Features::get().zcrx_device_less != ZcrxProbe::Works {
        assert!(
            !device_less_expected(),
            "kernel {} as root must register a device-less area",
            Features::get().kernel
        );
        eprintln!(
            "skipped: device-less zero-copy receive not available here ({}): the CLI's own \
             tests cover --recv's refusal and fallback",
            Features::get().kernel
        );
        return;
    }
    let Some(bin) = cli() else {
        panic!("no ringpool binary (RINGPOOL_CLI, /bin/ringpool or target/release/ringpool)");
    };
    let echo = Server::start(
        &bin,
        &[
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--bufs",
            "128",
            "--recv",
            "zcrx",
        ],
    );
    echo_clients(echo.addr, 4, 2 << 20);
    let up = echo.addr.to_string();
    let proxy = Server::start(
        &bin,
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--bufs",
            "32",
            "--recv",
            "zcrx",
        ],
    );
    echo_clients(proxy.addr, 4, 2 << 20);
    std::thread::sleep(Duration::from_millis(100));
    let p = proxy.stop();
    let e = echo.stop();
    for (name, stats, bytes) in [
        ("proxy", &p, "\"bytes_up\":8388608"),
        ("echo", &e, "\"bytes_echoed\":16777216"),
    ] {
        assert!(stats.contains("\"recv\":\"zcrx\""), "{name}: {stats}");
        assert!(
            stats.contains("\"in_user\":0"),
            "{name}: the area is full again: {stats}"
        );
        assert!(stats.contains(bytes), "{name}: {stats}");
    }
    assert!(p.contains("\"resets\":0"), "{p}");
}
