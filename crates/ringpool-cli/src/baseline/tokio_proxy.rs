//! `ringpool tokio-proxy` (hidden): the baseline proxy of `ringpool bench`.
//!
//! A tokio current_thread runtime (one thread, like `ringpool proxy`): each accepted connection
//! connects to the upstream and runs [`tokio::io::copy_bidirectional`] (an 8 KiB buffer per
//! direction, EOF passed on as a write shutdown). Same stdout contract as `ringpool proxy`:
//! first line `listening on ADDR`; on SIGTERM/SIGINT a final line `stats {json}` with the
//! bytes of the connections that ended.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

/// Arguments of `ringpool tokio-proxy`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Where to forward connections.
    #[arg(long)]
    upstream: SocketAddr,
}

/// Counters shared by the connection tasks.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    /// Bytes client → upstream of the connections that ended.
    bytes_up: AtomicU64,
    /// Bytes upstream → client of the connections that ended.
    bytes_down: AtomicU64,
    /// Connections that ended with an error (upstream refused, reset, ...).
    errors: AtomicU64,
}

/// Runs the proxy until SIGTERM or SIGINT, then prints its `stats` line.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    crate::bench::sys::raise_nofile_limit()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let counters = Arc::new(Counters::default());
    rt.block_on(serve(&args, counters.clone()))?;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let json = serde_json::json!({
        "connections": load(&counters.connections),
        "bytes_up": load(&counters.bytes_up),
        "bytes_down": load(&counters.bytes_down),
        "errors": load(&counters.errors),
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
    println!("forwarding to {} with copy_bidirectional", args.upstream);
    let _ = std::io::stdout().flush();
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(forward(client, args.upstream, counters.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning on the error.
                    eprintln!("tokio-proxy: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Connects to `upstream` and copies both ways until both directions ended.
async fn forward(mut client: TcpStream, upstream: SocketAddr, counters: Arc<Counters>) {
    let copied = async {
        let mut up = TcpStream::connect(upstream).await?;
        client.set_nodelay(true)?;
        up.set_nodelay(true)?;
        tokio::io::copy_bidirectional(&mut client, &mut up).await
    };
    match copied.await {
        Ok((up, down)) => {
            counters.bytes_up.fetch_add(up, Ordering::Relaxed);
            counters.bytes_down.fetch_add(down, Ordering::Relaxed);
        }
        Err(e) => {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("tokio-proxy: connection: {e}");
        }
    }
}
