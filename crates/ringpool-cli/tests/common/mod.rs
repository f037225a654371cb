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
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(env!("CARGO_BIN_EXE_ringpool"))
            .args(args)
            .env("RINGPOOL_FORCE", "");
        Server::spawn(cmd, true)
    }

    fn spawn(mut cmd: Command, capture_stderr: bool) -> Server {
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
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let (tx, rest) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = out.read_to_string(&mut rest);
            let _ = tx.send(rest);
        });
        Server {
            child,
            addr,
            rest,
            stderr,
        }
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
    pub fn stop(mut self) -> serde_json::Value {
        // SAFETY: kill sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
        let out = self
            .rest
            .recv_timeout(Duration::from_secs(10))
            .expect("the server's output");
        let stats = out
            .lines()
            .find_map(|l| l.strip_prefix("stats "))
            .unwrap_or_else(|| panic!("no stats in {out:?}"));
        serde_json::from_str(stats).unwrap()
    }
}

impl Drop for Server {
    /// A test that panicked before `stop` leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
