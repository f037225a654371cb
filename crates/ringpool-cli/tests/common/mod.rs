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
}

impl Server {
    /// Starts `ringpool <args>` with `RINGPOOL_FORCE=force` and waits for `listening on ADDR`.
    pub fn start(args: &[&str], force: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringpool"))
            .args(args)
            .env("RINGPOOL_FORCE", force)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ringpool");
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
        Server { child, addr, rest }
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
