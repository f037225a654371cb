//! Running a `ringpool` server subcommand as a user would: spawn it, read the address it listens
//! on, stop it with SIGINT and parse its final `stats {json}` line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `ringpool` server and the rest of its stdout, collected in the background so the
/// server never blocks on a full pipe.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    rest: std::sync::mpsc::Receiver<String>,
    /// What the server wrote to stderr so far (when started with [`Server::start_wrapped`]).
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Starts `ringpool <args>` with `RINGPOOL_FORCE=force` and waits for `listening on ADDR`.
    pub fn start(args: &[&str], force: &str) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringpool"));
        cmd.args(args).env("RINGPOOL_FORCE", force);
        Server::spawn(cmd, false)
    }

    /// Starts `<wrapper...> ringpool <args>` (e.g. `prlimit --nofile=256 --`), collecting its
    /// stderr into [`Server::stderr`].
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Server {
        Server::try_start_wrapped(wrapper, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Server::start_wrapped`], but a server that exits instead of listening is an
    /// `Err` with its first line and its stderr.
    pub fn try_start_wrapped(wrapper: &[&str], args: &[&str]) -> Result<Server, String> {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(env!("CARGO_BIN_EXE_ringpool"))
            .args(args)
            .env("RINGPOOL_FORCE", "");
        Server::try_spawn(cmd, true)
    }

    fn spawn(cmd: Command, capture_stderr: bool) -> Server {
        Server::try_spawn(cmd, capture_stderr).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_spawn(mut cmd: Command, capture_stderr: bool) -> Result<Server, String> {
        cmd.stdout(Stdio::piped());
        if capture_stderr {
            cmd.stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("spawn ringpool");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.wait();
            // The stderr reader ends with the process; give it a moment to collect the rest.
            std::thread::sleep(Duration::from_millis(50));
            let err = stderr.lock().unwrap().clone();
            return Err(format!("unexpected first line {line:?}; stderr: {err}"));
        };
        let addr = addr.parse().unwrap();
        let (tx, rest) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = out.read_to_string(&mut rest);
            let _ = tx.send(rest);
        });
        Ok(Server {
            child,
            addr,
            rest,
            stderr,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Descriptors the server holds open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time (user + system) the server used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which is in parentheses): utime is the 14th field
        // of the line, stime the 15th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Whether the server is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the server with SIGINT and returns its final `stats` line.
    pub fn stop(self) -> serde_json::Value {
        let out = self.stop_output();
        let stats = out
            .lines()
            .find_map(|l| l.strip_prefix("stats "))
            .unwrap_or_else(|| panic!("no stats in {out:?}"));
        serde_json::from_str(stats).unwrap()
    }

    /// Stops the server with SIGINT and returns the rest of its stdout (after the first line).
    pub fn stop_output(mut self) -> String {
        // SAFETY: kill sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
        self.rest
            .recv_timeout(Duration::from_secs(10))
            .expect("the server's output")
    }
}

impl Drop for Server {
    /// A test that panicked before `stop` leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ringpool proxy` (in front of a port nothing listens on) with `args` added, for flags
/// it must refuse at start: its exit status and its stderr.
pub fn proxy_refusal(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An upstream echo server in the test process (whose descriptor limit is high): every
/// connection echoes until its client half-closes, then half-closes back.
pub fn echo_upstream() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Whether tests may run the binary as uid 65534 here (we are root, and that uid can run the
/// binary). When not, says why: a visible skip, and a failure under `RINGPOOL_REQUIRE_ALL=1`.
pub fn can_drop_to_nobody() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let runs = root
        && Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_ringpool"))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !runs {
        let why = "skipped: needs root and a binary uid 65534 can run";
        assert!(std::env::var_os("RINGPOOL_REQUIRE_ALL").is_none(), "{why}");
        eprintln!("{why}");
    }
    runs
}
