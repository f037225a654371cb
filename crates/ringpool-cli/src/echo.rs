//! `ringpool echo`: an echo server on multishot accept and multishot recv, every connection
//! sharing one buffer group, so buffer memory is bounded by the group, not by the connections.
//!
//! Received buffers are sent back as they are (no copy): a connection queues the chains it
//! received and keeps one send in flight, which carries everything queued so far. Buffers go
//! back to the group when their send completes. A client that does not read makes the group
//! run dry; receives then pause (backpressure) until buffers come back.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use ringpool::{BufChain, BufGroupConfig, Driver, DriverConfig, Event, Fd, RecvMode, SendBuf};

use crate::net::{set_backlog, set_nodelay};
use crate::signals;

/// Arguments of `ringpool echo`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:7000 (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Size of each buffer in the shared group.
    #[arg(long, default_value_t = 4096)]
    buf_size: usize,
    /// Number of buffers in the shared group (a power of two, at most 32768).
    #[arg(long, default_value_t = 512)]
    bufs: u32,
    /// Serve on the async layer (`ringpool::rt`: a task per connection) instead of the
    /// driver's event loop.
    #[arg(long)]
    rt: bool,
}

/// Upper bound of iovecs in one send (the kernel's `UIO_MAXIOV` is 1024).
const MAX_IOV: usize = 1024;
const ACCEPT: u64 = u64::MAX;

struct Conn {
    fd: Fd,
    queued: VecDeque<BufChain>,
    sending: bool,
    recv_done: bool,
}

/// What the server did, printed when it stops.
#[derive(Debug, Default)]
pub struct Summary {
    pub connections: u64,
    pub bytes_echoed: u64,
    pub peak_connections: usize,
}

pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.rt {
        return run_rt(args);
    }
    signals::install();
    let listener = TcpListener::bind(args.listen)?;
    set_backlog(&listener, 4096)?;
    let addr = listener.local_addr()?;
    let mut driver = Driver::new(DriverConfig::default().entries(1024))?;
    let group = driver.buf_group(BufGroupConfig::new(args.buf_size, args.bufs))?;
    println!("listening on {addr}");
    println!(
        "buffer group {}: {} x {} B = {} B ({}), shared by all connections",
        group.id(),
        args.bufs,
        args.buf_size,
        group.buffer_bytes(),
        if group.is_ring() {
            "buffer ring"
        } else {
            "legacy provided buffers"
        }
    );
    std::io::stdout().flush()?;
    let summary = serve(
        &mut driver,
        &group,
        Fd::from(listener),
        signals::stop_requested,
    )?;
    let s = group.stats();
    println!(
        "stopped: {} connections served (peak {}), {} bytes echoed",
        summary.connections, summary.peak_connections, summary.bytes_echoed
    );
    println!(
        "group stats: total {} in_kernel {} in_user {} enobufs {} rearms {} grows {} bytes_received {}",
        s.total, s.in_kernel, s.in_user, s.enobufs, s.rearms, s.grows, s.bytes_received
    );
    let ds = driver.stats();
    println!(
        "driver stats: enters {} sqes {} cqes {} stray_cqes {}",
        ds.enters, ds.sqes, ds.cqes, ds.stray_cqes
    );
    let json = serde_json::json!({
        "enters": ds.enters, "sqes": ds.sqes, "cqes": ds.cqes,
        "connections": summary.connections,
        "peak_connections": summary.peak_connections,
        "bytes_echoed": summary.bytes_echoed,
        "buffer_bytes": group.buffer_bytes(),
        "total": s.total, "in_kernel": s.in_kernel, "in_user": s.in_user,
        "enobufs": s.enobufs, "rearms": s.rearms, "bytes_received": s.bytes_received,
    });
    println!("stats {json}");
    Ok(())
}

/// Serves echo on `listener` until `stop()` says so.
pub fn serve(
    driver: &mut Driver,
    group: &ringpool::BufGroup,
    listener: Fd,
    stop: impl Fn() -> bool,
) -> ringpool::Result<Summary> {
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut summary = Summary::default();
    let accept = driver.accept_multishot(&listener, ACCEPT)?;
    while !stop() {
        driver.wait(Some(Duration::from_millis(200)))?;
        while let Some(c) = driver.pop() {
            if c.token == ACCEPT {
                match c.event {
                    Event::Accepted(fd) => {
                        set_nodelay(&fd);
                        let key = conns.insert(Conn {
                            fd: fd.clone(),
                            queued: VecDeque::new(),
                            sending: false,
                            recv_done: false,
                        });
                        driver.recv(&fd, group, RecvMode::MultishotBundle, key as u64)?;
                        summary.connections += 1;
                        summary.peak_connections = summary.peak_connections.max(conns.len());
                    }
                    Event::Error(e) => eprintln!("accept: {e}"),
                    _ => {}
                }
                if !c.more {
                    eprintln!("accept stopped; re-arming");
                    driver.accept_multishot(&listener, ACCEPT)?;
                }
                continue;
            }
            let key = c.token as usize;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            match c.event {
                Event::Data(chain) => {
                    summary.bytes_echoed += chain.len() as u64;
                    conn.queued.push_back(chain);
                    // A cancelled receive can end with data (taken before the cancel landed):
                    // its last completion, so the connection was left open forever.
                    conn.recv_done |= !c.more;
                }
                Event::Eof | Event::Error(_) => conn.recv_done = true,
                Event::Sent { result, .. } => {
                    // The buffers go back to the group by themselves once the kernel is done.
                    conn.sending = false;
                    if result.is_err() {
                        // The peer is gone: stop receiving, drop what is queued.
                        conn.queued.clear();
                        driver.cancel_fd(&conn.fd);
                    }
                }
                _ => {}
            }
            if !conn.sending && !conn.queued.is_empty() {
                let mut out = conn.queued.pop_front().expect("non-empty");
                while let Some(next) = conn.queued.front() {
                    if out.buf_count() + next.buf_count() > MAX_IOV {
                        break;
                    }
                    out.append(conn.queued.pop_front().expect("non-empty"));
                }
                driver.send_zc(&conn.fd, SendBuf::from(out), key as u64)?;
                conn.sending = true;
            }
            if conn.recv_done && !conn.sending && conn.queued.is_empty() {
                conns.remove(key);
            }
        }
    }
    driver.cancel(accept);
    Ok(summary)
}

/// `ringpool echo --rt`: the same server on the async layer, a task per connection: one
/// multishot receive stream each, and one send in flight carrying everything received
/// meanwhile.
fn run_rt(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    use ringpool::rt;
    use std::cell::Cell;
    use std::rc::Rc;
    signals::install();
    let config = DriverConfig::default().entries(1024);
    rt::block_on_with(config, async move {
        let group = rt::buf_group(BufGroupConfig::new(args.buf_size, args.bufs))?;
        let listener = rt::TcpListener::bind(args.listen)?;
        println!("listening on {}", listener.local_addr()?);
        println!(
            "buffer group {}: {} x {} B = {} B, shared by all connections (async layer)",
            group.id(),
            args.bufs,
            args.buf_size,
            group.buffer_bytes()
        );
        let _ = std::io::stdout().flush();
        let connections = Rc::new(Cell::new(0u64));
        let echoed = Rc::new(Cell::new(0u64));
        let (c, e, g) = (connections.clone(), echoed.clone(), group.clone());
        rt::spawn(async move {
            loop {
                let Ok(stream) = listener.accept().await else {
                    continue;
                };
                set_nodelay(stream.fd());
                c.set(c.get() + 1);
                let (e, g) = (e.clone(), g.clone());
                rt::spawn(async move {
                    let Ok(mut rx) = stream.recv_stream(&g) else {
                        return;
                    };
                    while let Ok(Some(mut out)) = rx.next().await {
                        // Everything received meanwhile leaves in the same send.
                        while out.buf_count() < MAX_IOV {
                            match rx.try_next() {
                                Ok(Some(more)) => out.append(more),
                                _ => break,
                            }
                        }
                        e.set(e.get() + out.len() as u64);
                        if stream.send_zc(SendBuf::from(out)).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        while !signals::stop_requested() {
            rt::sleep(Duration::from_millis(100)).await;
        }
        let (s, ds) = (group.stats(), rt::with_driver(|d| d.stats()));
        println!(
            "stopped: {} connections served, {} bytes echoed",
            connections.get(),
            echoed.get()
        );
        let json = serde_json::json!({
            "enters": ds.enters, "sqes": ds.sqes, "cqes": ds.cqes,
            "connections": connections.get(),
            "bytes_echoed": echoed.get(),
            "buffer_bytes": group.buffer_bytes(),
            "total": s.total, "in_kernel": s.in_kernel, "in_user": s.in_user,
            "enobufs": s.enobufs, "rearms": s.rearms, "bytes_received": s.bytes_received,
            "runtime": "rt",
        });
        println!("stats {json}");
        Ok::<(), ringpool::Error>(())
    })??;
    Ok(())
}
