//! A server under test, run as a child process of the bench (this same executable with a
//! server subcommand).
//!
//! Contract with the child: its first stdout line is `listening on ADDR`; on SIGTERM it prints
//! a line `stats {json}` and exits.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::BenchResult;

/// How long a child may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child may take to exit after SIGTERM before it is killed with SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server child.
pub struct Server {
    label: &'static str,
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

/// How a server ended.
pub struct Stopped {
    /// The JSON of the final `stats` line, if the server printed one.
    pub stats: Option<serde_json::Value>,
    /// Whether the server ignored SIGTERM for [`STOP_TIMEOUT`] and was killed.
    pub killed: bool,
    /// The exit status.
    pub status: ExitStatus,
}

impl Server {
    /// Starts `current_exe() ARGS...` and waits for its `listening on ADDR` line.
    pub fn spawn(label: &'static str, args: &[String]) -> BenchResult<Server> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{label}: cannot start server: {e}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            label,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines,
            reader: Some(reader),
        };
        server.addr = server.wait_listening()?;
        Ok(server)
    }

    fn wait_listening(&mut self) -> BenchResult<SocketAddr> {
        let line = self.lines.recv_timeout(START_TIMEOUT).map_err(|_| {
            format!(
                "{}: server printed no `listening on` line within {:?}",
                self.label, START_TIMEOUT
            )
        })?;
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .ok_or_else(|| format!("{}: unexpected first line {line:?}", self.label))?;
        Ok(addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, waits (bounded) for the exit, and collects the final `stats` line.
    pub fn stop(mut self) -> BenchResult<Stopped> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own unreaped child,
        // so the id cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (status, killed) = self.wait_bounded()?;
        if let Some(reader) = self.reader.take() {
            // The child is gone, so its stdout reaches EOF and the reader ends.
            let _ = reader.join();
        }
        let stats = self
            .lines
            .try_iter()
            .filter_map(|l| l.strip_prefix("stats ").map(str::to_owned))
            .last()
            .and_then(|json| serde_json::from_str(&json).ok());
        Ok(Stopped {
            stats,
            killed,
            status,
        })
    }

    fn wait_bounded(&mut self) -> BenchResult<(ExitStatus, bool)> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, false));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        super::progress::end_bar_line();
        eprintln!(
            "bench: {} server ignored SIGTERM for {:?}; killing it (SIGKILL)",
            self.label, STOP_TIMEOUT
        );
        self.child.kill()?;
        Ok((self.child.wait()?, true))
    }
}

impl Drop for Server {
    /// A server still running here means the round failed half-way: do not leave it behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
