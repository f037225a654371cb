//! Progress on stderr while a workload runs.
//!
//! On a terminal, each workload gets one line, redrawn in place with `\r` after every run:
//!
//! ```text
//! proxy      [##############..........] 7/12 runs, 9 s
//! ```
//!
//! Anywhere else (a pipe, a CI log, the tests), each run prints the workload's own detailed
//! line instead, exactly as before: those lines are read by people and parsed by scripts.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Characters in the bar between its brackets.
const BAR_WIDTH: usize = 24;

/// Width the workload's name is padded to, so that the bars of all workloads line up.
const NAME_WIDTH: usize = 10;

/// Whether a bar is drawn on the current stderr line, with no newline after it yet.
static BAR_OPEN: AtomicBool = AtomicBool::new(false);

/// Whether stderr is a terminal.
fn stderr_is_terminal() -> bool {
    // SAFETY: `isatty` only asks the kernel about a descriptor number; it reads and writes none
    // of our memory, and an invalid descriptor makes it return 0.
    unsafe { libc::isatty(libc::STDERR_FILENO) == 1 }
}

/// Ends the line of a bar still drawn, so that a message printed next starts on its own line.
/// The bar is drawn again, on a fresh line, at its next step.
pub fn end_bar_line() {
    if BAR_OPEN.swap(false, Ordering::Relaxed) {
        eprintln!();
    }
}

/// The progress of one workload: how many of its runs are done.
///
/// Create it just before the workload's measured runs, call [`Progress::step`] after each,
/// and let it drop at the end (which ends the bar's line on a terminal, even on an error).
pub struct Progress {
    name: &'static str,
    total: usize,
    done: usize,
    start: Instant,
    /// Draw a bar (stderr is a terminal) instead of printing each run's line.
    bar: bool,
}

impl Progress {
    /// The progress of workload `name`, which will make `total` runs; draws the empty bar on a
    /// terminal.
    pub fn new(name: &'static str, total: usize) -> Progress {
        let p = Progress {
            name,
            total,
            done: 0,
            start: Instant::now(),
            bar: stderr_is_terminal(),
        };
        p.draw();
        p
    }

    /// One more run done: redraws the bar on a terminal, or prints `line` (the run's detailed
    /// progress line, without its newline) anywhere else.
    pub fn step(&mut self, line: fmt::Arguments<'_>) {
        self.done += 1;
        if self.bar {
            self.draw();
        } else {
            eprintln!("{line}");
        }
    }

    /// Draws the bar over the current line (a terminal only).
    fn draw(&self) {
        if !self.bar {
            return;
        }
        let line = bar_line(
            self.name,
            self.done,
            self.total,
            self.start.elapsed().as_secs(),
        );
        // `\x1b[K` clears what a longer earlier line left to the right.
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
        BAR_OPEN.store(true, Ordering::Relaxed);
    }
}

impl Drop for Progress {
    /// Ends the bar's line, whether the workload finished or failed half-way.
    fn drop(&mut self) {
        if self.bar {
            end_bar_line();
        }
    }
}

/// The text of a bar: `name [###.....] done/total runs, N s`.
fn bar_line(name: &str, done: usize, total: usize, secs: u64) -> String {
    // Nothing to do (no runs) is all done.
    let filled = (done.min(total) * BAR_WIDTH)
        .checked_div(total)
        .unwrap_or(BAR_WIDTH);
    format!(
        "{name:<NAME_WIDTH$} [{}{}] {done}/{total} runs, {secs} s",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_in_proportion() {
        let empty = bar_line("proxy", 0, 12, 0);
        assert_eq!(
            empty,
            format!("proxy      [{}] 0/12 runs, 0 s", ".".repeat(BAR_WIDTH))
        );
        let half = bar_line("proxy", 6, 12, 3);
        assert!(half.contains(&format!("[{}{}]", "#".repeat(12), ".".repeat(12))));
        assert!(half.ends_with("6/12 runs, 3 s"), "{half}");
        let full = bar_line("send", 12, 12, 9);
        assert!(
            full.contains(&format!("[{}]", "#".repeat(BAR_WIDTH))),
            "{full}"
        );
    }

    #[test]
    fn bar_never_overflows() {
        let over = bar_line("file", 20, 12, 0);
        assert!(
            over.contains(&format!("[{}]", "#".repeat(BAR_WIDTH))),
            "{over}"
        );
        let none = bar_line("file", 0, 0, 0);
        assert!(
            none.contains(&format!("[{}]", "#".repeat(BAR_WIDTH))),
            "{none}"
        );
    }
}
