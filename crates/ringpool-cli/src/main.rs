//! `ringpool`: the command-line tool of the ringpool library.
//!
//! - `ringpool probe [--json]`: what this kernel supports and the fallback rung in use.
//! - `ringpool echo --listen ADDR [--rt]`: an echo server whose connections share one buffer
//!   group (on the driver's event loop, or on the async layer with `--rt`).
//! - `ringpool proxy --listen ADDR --upstream ADDR`: a TCP proxy over a registered region.
//! - `ringpool fanout --file PATH --listen ADDR [--rt]`: a file served to many clients, each
//!   chunk read once and leased to all their sends (on the driver's event loop, or on the async
//!   layer with `--rt`).
//! - `ringpool bench [--quick] [--workload NAME] [--json] [--html PATH]`: every workload against its
//!   baseline, a table on stdout and a self-contained HTML report.

use clap::{Parser, Subcommand};

// A closed or full stdout (`ringpool echo | true`, `>/dev/full`) or stderr must not stop a
// server: std's `println!`/`eprintln!` panic on a write error (rc=101 before serving), so the
// crate's own versions, which every module below sees in place of std's, drop the error. What
// cannot be written (the statistics at exit) is lost; the server goes on.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod baseline;
mod bench;
mod cmd;
mod net;
mod recv;
mod signals;

use baseline::{sendfile_server, std_proxy, tokio_echo, tokio_proxy};
use cmd::{echo, fanout, probe, proxy};

#[derive(Parser)]
#[command(
    name = "ringpool",
    version,
    about = "io_uring buffer pools for zero-copy I/O"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what this kernel supports and which rung of the fallback ladder ringpool uses.
    Probe(probe::Args),
    /// Run an echo server on multishot accept and multishot recv over one shared buffer group.
    Echo(echo::Args),
    /// Run a TCP proxy whose received buffers leave without a copy (zero-copy where it pays).
    Proxy(proxy::Args),
    /// Serve a file to every client, reading each chunk once and leasing it to all their sends.
    Fanout(fanout::Args),
    /// Benchmark ringpool against a baseline (medians of alternating rounds, and ratios).
    Bench(bench::Args),
    /// Baseline echo server for `bench`: tokio, one task and buffer per connection.
    #[command(hide = true)]
    TokioEcho(tokio_echo::Args),
    /// Baseline proxy for `bench`: tokio, `copy_bidirectional` per connection.
    #[command(hide = true)]
    TokioProxy(tokio_proxy::Args),
    /// Baseline proxy for `bench`: blocking std sockets, two threads per connection.
    #[command(hide = true)]
    StdProxy(std_proxy::Args),
    /// Baseline file server for `bench`: `sendfile(2)` per client, one thread, `poll(2)`.
    #[command(hide = true)]
    SendfileServer(sendfile_server::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(args) => probe::run(args),
        Command::Echo(args) => echo::run(args),
        Command::Proxy(args) => proxy::run(args),
        Command::Fanout(args) => fanout::run(args),
        Command::Bench(args) => bench::run(args),
        Command::TokioEcho(args) => tokio_echo::run(args),
        Command::TokioProxy(args) => tokio_proxy::run(args),
        Command::StdProxy(args) => std_proxy::run(args),
        Command::SendfileServer(args) => sendfile_server::run(args),
    };
    if let Err(e) = result {
        eprintln!("ringpool: {e}");
        std::process::exit(1);
    }
}
