//! `ringpool tokio-echo` (hidden): the baseline echo server of `ringpool bench`.
//!
//! A tokio current_thread runtime, one task per connection, each with its own buffer (read,
//! then `write_all` what was read). Buffer memory therefore grows with the connections:
//! `buf_size` x peak connections. Same stdout contract as `ringpool echo`: first line
//! `listening on ADDR`; on SIGTERM/SIGINT a final line `stats {json}`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

/// Arguments of `ringpool tokio-echo`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:7000 (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Size of each connection's buffer.
    #[arg(long, default_value_t = 16 * 1024)]
    buf_size: usize,
}

/// Counters shared by the connection tasks.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    open: AtomicU64,
    peak: AtomicU64,
    bytes_echoed: AtomicU64,
}

impl Counters {
    fn opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
    }
}

/// Runs the server until SIGTERM or SIGINT, then prints its `stats` line.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    crate::bench::sys::raise_nofile_limit()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let counters = Arc::new(Counters::default());
    rt.block_on(serve(&args, counters.clone()))?;
    let peak = counters.peak.load(Ordering::Relaxed);
    let json = serde_json::json!({
        "connections": counters.connections.load(Ordering::Relaxed),
        "peak_connections": peak,
        "bytes_echoed": counters.bytes_echoed.load(Ordering::Relaxed),
        "buffer_bytes": args.buf_size as u64 * peak,
        "buf_size": args.buf_size,
    });
    println!("stats {json}");
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Accepts connections until a stop signal arrives.
async fn serve(args: &Args, counters: Arc<Counters>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let listener = TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let _ = std::io::stdout().flush();
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    counters.opened();
                    tokio::spawn(echo(stream, args.buf_size, counters.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning on the error.
                    eprintln!("tokio-echo: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Echoes one connection through its own `buf_size` buffer until EOF or an error.
async fn echo(mut stream: TcpStream, buf_size: usize, counters: Arc<Counters>) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; buf_size];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counters.bytes_echoed.fetch_add(n as u64, Ordering::Relaxed);
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
}
