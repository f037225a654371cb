//! `ringpool std-proxy` (hidden): the `proxy` bench's second baseline, the naive blocking proxy.
//!
//! Two threads per connection, one per direction, each a loop of blocking `read` into its own
//! 64 KiB buffer and `write_all` of what it got (EOF passed on as a write shutdown, an error as
//! a shutdown of both sockets, which ends the other direction too). No event loop at all: the
//! kernel's blocking calls do the batching (a `read` takes whatever queued while the previous
//! `write` ran). The main thread accepts, polling the listener so that it sees the stop flag.
//! Same stdout contract as `ringpool proxy`: first line `listening on ADDR`; on SIGTERM/SIGINT
//! a final line `stats {json}` with the bytes of the directions that ended.

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::net::{set_backlog, set_nodelay};
use crate::signals;

/// Arguments of `ringpool std-proxy`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Where to forward connections.
    #[arg(long)]
    upstream: SocketAddr,
    /// Size of each direction's buffer.
    #[arg(long, default_value_t = 65536)]
    buf_size: usize,
}

/// How long `poll` on the listener waits before the loop looks at the stop flag again.
const POLL_MS: libc::c_int = 100;
/// Stack of a copying thread (its buffer is on the heap).
const STACK: usize = 64 << 10;

/// Counters shared by the copying threads.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    /// Bytes client → upstream of the directions that ended.
    bytes_up: AtomicU64,
    /// Bytes upstream → client of the directions that ended.
    bytes_down: AtomicU64,
    /// Directions that ended with an error (upstream refused, reset, ...).
    errors: AtomicU64,
}

/// Runs the proxy until SIGTERM or SIGINT, then prints its `stats` line.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    signals::install();
    crate::bench::sys::raise_nofile_limit()?;
    let listener = TcpListener::bind(args.listen)?;
    set_backlog(&listener, 4096)?;
    println!("listening on {}", listener.local_addr()?);
    println!(
        "forwarding to {} with two blocking threads per connection, {} B buffers",
        args.upstream, args.buf_size
    );
    let _ = io::stdout().flush();
    let counters = Arc::new(Counters::default());
    while !signals::stop_requested() {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for a listener this function owns.
        if unsafe { libc::poll(&mut pfd, 1, POLL_MS) } <= 0 {
            continue; // timeout, or EINTR from the stop signal
        }
        match listener.accept() {
            Ok((client, _)) => {
                counters.connections.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = forward(client, args.upstream, args.buf_size, &counters) {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("std-proxy: connection: {e}");
                }
            }
            Err(e) => eprintln!("std-proxy: accept: {e}"),
        }
    }
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let json = serde_json::json!({
        "connections": load(&counters.connections),
        "bytes_up": load(&counters.bytes_up),
        "bytes_down": load(&counters.bytes_down),
        "errors": load(&counters.errors),
    });
    println!("stats {json}");
    let _ = io::stdout().flush();
    Ok(())
}

/// Connects to `upstream` and starts one copying thread per direction.
fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    buf_size: usize,
    counters: &Arc<Counters>,
) -> io::Result<()> {
    let up = TcpStream::connect(upstream)?;
    set_nodelay(&client);
    set_nodelay(&up);
    let (client2, up2) = (client.try_clone()?, up.try_clone()?);
    for (src, dst, dir) in [(client, up, 0), (up2, client2, 1)] {
        let counters = Arc::clone(counters);
        std::thread::Builder::new()
            .name(format!("std-proxy-{}", ["up", "down"][dir]))
            .stack_size(STACK)
            .spawn(move || {
                let (n, result) = copy(&src, &dst, buf_size);
                let total = if dir == 0 {
                    &counters.bytes_up
                } else {
                    &counters.bytes_down
                };
                total.fetch_add(n, Ordering::Relaxed);
                if let Err(e) = result {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("std-proxy: connection: {e}");
                    // End the other direction too.
                    let _ = src.shutdown(Shutdown::Both);
                    let _ = dst.shutdown(Shutdown::Both);
                }
            })?;
    }
    Ok(())
}

/// Copies `src` to `dst` until EOF (then shuts `dst` for writing) or an error: the bytes
/// copied, and how it ended.
fn copy(mut src: &TcpStream, mut dst: &TcpStream, buf_size: usize) -> (u64, io::Result<()>) {
    let mut buf = vec![0u8; buf_size];
    let mut copied = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return (copied, dst.shutdown(Shutdown::Write)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (copied, Err(e)),
        };
        if let Err(e) = dst.write_all(&buf[..n]) {
            return (copied, Err(e));
        }
        copied += n as u64;
    }
}
