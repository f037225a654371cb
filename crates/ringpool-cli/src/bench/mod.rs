//! `ringpool bench`: runs ringpool's servers against a baseline, workload by workload, and
//! prints the medians and ratios.
//!
//! Each workload is a module with a [`WorkloadDef`] in [`WORKLOADS`]. A workload alternates
//! the two sides (ringpool, baseline, ringpool, ...), runs each server as a child process of
//! this executable, drives the load from this process, and verifies every byte it gets back.
//! `send` runs its four variants in threads of this process instead (sender and receiver per
//! connection), and compares each with ringpool's plain send. `proxy` runs the proxy under test
//! as the child, with the load generator and the upstream in this process. `fanout` runs four
//! file servers as children (ringpool's on memory and on pages leases, and two baselines) and
//! compares ringpool's with each.
//!
//! While a workload runs, [`progress`] shows a bar on a terminal (its per-run lines elsewhere).
//! After the run, the results go to stdout (tables, or JSON with `--json`) and to a
//! self-contained HTML page ([`html`]) whose path is the last line on stderr.

use std::path::PathBuf;
use std::time::Duration;

mod fanout;
mod file;
mod html;
mod idle_heavy;
mod load;
mod progress;
mod proxy;
mod report;
mod send;
mod server;
pub mod sys;

use report::WorkloadReport;

/// The error type of the bench: any error, with a message saying where it happened.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Arguments of `ringpool bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A shorter run: `idle-heavy` one round per side with a 1 s window instead of 3 rounds of
    /// 3 s; `send` one round of 128 MiB per run instead of 3 rounds of 1 GiB; `proxy` one round
    /// of 250 ms windows instead of 3 rounds of 1 s; `file` and `fanout` 3 rounds per side on
    /// a 32 MiB file instead of 9 rounds on 256 MiB.
    #[arg(long)]
    quick: bool,
    /// Run only this workload (default: all of them).
    #[arg(long, value_name = "NAME")]
    workload: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Write the HTML report here (default: `target/ringpool-bench.html` when the current
    /// directory has a `target/`, else `ringpool-bench.html`).
    #[arg(long, value_name = "PATH")]
    html: Option<PathBuf>,
}

/// How long and how often each side is measured.
pub struct Options {
    /// Rounds per side.
    pub rounds: usize,
    /// Length of one measurement window.
    pub window: Duration,
    /// `--quick`: workloads with a fixed volume use a smaller one.
    pub quick: bool,
}

impl Options {
    fn new(quick: bool) -> Options {
        if quick {
            Options {
                rounds: 1,
                window: Duration::from_secs(1),
                quick,
            }
        } else {
            Options {
                rounds: 3,
                window: Duration::from_secs(3),
                quick,
            }
        }
    }
}

/// Which server a round measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// ringpool's server.
    Ringpool,
    /// The baseline server.
    Baseline,
}

impl Side {
    /// Both sides, in the order a round runs them.
    pub const BOTH: [Side; 2] = [Side::Ringpool, Side::Baseline];

    /// Name in progress lines and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Side::Ringpool => "ringpool",
            Side::Baseline => "baseline",
        }
    }
}

/// A workload the bench knows.
pub struct WorkloadDef {
    /// Name given to `--workload`.
    pub name: &'static str,
    /// Runs all rounds of the workload.
    pub run: fn(&Options) -> BenchResult<WorkloadReport>,
}

/// Every workload, in the order `ringpool bench` runs them.
const WORKLOADS: &[WorkloadDef] = &[
    idle_heavy::WORKLOAD,
    idle_heavy::ECHO_WORKLOAD,
    send::WORKLOAD,
    proxy::WORKLOAD,
    file::WORKLOAD,
    fanout::WORKLOAD,
];

/// Runs `ringpool bench`.
pub fn run(args: Args) -> BenchResult<()> {
    let selected = select(args.workload.as_deref())?;
    let html_path = args.html.clone().unwrap_or_else(html::default_path);
    html::check_writable(&html_path)?;
    let nofile = sys::raise_nofile_limit()?;
    let opts = Options::new(args.quick);
    eprintln!(
        "bench: {} workload(s), each alternating ringpool and its baseline (every progress line \
         names its round); RLIMIT_NOFILE {nofile}",
        selected.len()
    );
    let mut reports = Vec::new();
    for w in selected {
        reports.push((w.run)(&opts).map_err(|e| format!("workload {}: {e}", w.name))?);
    }
    if args.json {
        println!("{:#}", report::to_json(&reports));
    } else {
        report::print_table(&reports);
    }
    let written = html::write(&html_path, &reports)?;
    eprintln!("report: {}", written.display());
    let unverified: Vec<&str> = reports
        .iter()
        .filter(|r| !r.verified)
        .map(|r| r.name)
        .collect();
    if !unverified.is_empty() {
        return Err(format!("bytes not verified in: {}", unverified.join(", ")).into());
    }
    Ok(())
}

/// The workloads `--workload` asks for, or all of them.
fn select(name: Option<&str>) -> BenchResult<Vec<&'static WorkloadDef>> {
    let Some(name) = name else {
        return Ok(WORKLOADS.iter().collect());
    };
    match WORKLOADS.iter().find(|w| w.name == name) {
        Some(w) => Ok(vec![w]),
        None => {
            let known: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
            Err(format!(
                "unknown workload `{name}`; known workloads: {}",
                known.join(", ")
            )
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_workload_lists_the_known_ones() {
        let err = select(Some("nope")).err().unwrap().to_string();
        assert!(err.contains("unknown workload `nope`"), "{err}");
        assert!(err.contains("idle-heavy"), "{err}");
    }

    #[test]
    fn no_name_selects_every_workload() {
        assert_eq!(select(None).unwrap().len(), WORKLOADS.len());
        assert_eq!(select(Some("idle-heavy")).unwrap().len(), 1);
        assert_eq!(select(Some("send")).unwrap()[0].name, "send");
        assert_eq!(select(Some("proxy")).unwrap()[0].name, "proxy");
        assert_eq!(select(Some("fanout")).unwrap()[0].name, "fanout");
    }
}
