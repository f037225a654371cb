//! `ringpool echo --rt`: the echo server on the async layer (`ringpool::rt`), a task per
//! connection over the same shared group and per-connection bound as the event loop.

use std::cell::Cell;
use std::io::Write as _;
use std::rc::Rc;
use std::time::Duration;

use ringpool::rt;
use ringpool::{BufGroup, BufGroupConfig, DriverConfig};

use super::Args;
use crate::cmd::proxy::rt::{send_gathering, Gathered, Recv};
use crate::net::{group_error, listen_error, set_nodelay, AcceptLog};
use crate::signals;

/// `ringpool echo --rt`: the same server on the async layer, a task per connection: one
/// receive of one buffer in flight while its send is in flight (`proxy::rt::send_gathering`),
/// within the connection's bound of `conn_bufs` buffers, so a peer that does not read stops
/// being read instead of draining the shared group.
pub(super) fn run(args: Args, conn_bufs: u32) -> Result<(), Box<dyn std::error::Error>> {
    signals::install();
    let config = DriverConfig::default().entries(crate::cmd::probe::SERVER_RING_ENTRIES);
    rt::block_on_with(config, async move {
        let group = rt::buf_group(BufGroupConfig::new(args.buf_size, args.bufs))
            .map_err(group_error(args.bufs, args.buf_size))?;
        let listener =
            rt::TcpListener::bind(args.listen).map_err(|e| listen_error(args.listen)(e.into()))?;
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
        let share = conn_bufs as usize;
        rt::spawn(accept_loop(listener, g, share, c, e));
        while !signals::stop_requested() {
            rt::sleep(Duration::from_millis(100)).await;
        }
        report(&group, connections.get(), echoed.get());
        Ok::<(), Box<dyn std::error::Error>>(())
    })??;
    Ok(())
}

/// Accepts clients for as long as the runtime runs, a task ([`echo`]) per connection.
async fn accept_loop(
    listener: rt::TcpListener,
    g: BufGroup,
    share: usize,
    c: Rc<Cell<u64>>,
    e: Rc<Cell<u64>>,
) {
    // Connections open now (for the log line at the descriptor limit).
    let open = Rc::new(Cell::new(0u64));
    let mut accept_log = AcceptLog::default();
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                // Out of descriptors: wait (connections stay in the backlog) instead
                // of failing again at once.
                rt::sleep(accept_log.failed(&e, open.get() as usize)).await;
                continue;
            }
        };
        accept_log.accepted();
        set_nodelay(stream.fd());
        c.set(c.get() + 1);
        let (e, g, open) = (e.clone(), g.clone(), open.clone());
        open.set(open.get() + 1);
        rt::spawn(echo(stream, g, share, e, open));
    }
}

/// One connection: what arrives leaves again, gathered while a send is in flight, within
/// `share` buffers; ends at end of stream or an error.
async fn echo(
    stream: rt::TcpStream,
    g: BufGroup,
    share: usize,
    e: Rc<Cell<u64>>,
    open: Rc<Cell<u64>>,
) {
    let mut recv: Option<Recv<'_>> = None;
    let mut gathered = Gathered::default();
    loop {
        let chain = match gathered.chain.take() {
            Some(chain) => chain,
            None if gathered.eof => break,
            None => {
                let next = recv.take().unwrap_or_else(|| Box::pin(stream.recv_one(&g)));
                match next.await {
                    Ok(Some(chain)) => chain,
                    _ => break,
                }
            }
        };
        let n = chain.len() as u64;
        let sent = send_gathering(&stream, &stream, chain, &g, share, &mut recv).await;
        match sent {
            (Ok(_), Ok(next)) => {
                e.set(e.get() + n);
                gathered = next;
            }
            _ => break,
        }
    }
    drop(recv);
    open.set(open.get() - 1);
}

/// Prints the final summary line and the `stats {json}` line (read by the bench and the
/// tests).
fn report(group: &BufGroup, connections: u64, echoed: u64) {
    let (s, ds) = (group.stats(), rt::with_driver(|d| d.stats()));
    println!("stopped: {connections} connections served, {echoed} bytes echoed");
    let json = serde_json::json!({
        "enters": ds.enters, "sqes": ds.sqes, "cqes": ds.cqes,
        "connections": connections,
        "bytes_echoed": echoed,
        "buffer_bytes": group.buffer_bytes(),
        "total": s.total, "in_kernel": s.in_kernel, "in_user": s.in_user,
        "enobufs": s.enobufs, "rearms": s.rearms, "bytes_received": s.bytes_received,
        "runtime": "rt", "recv": "groups",
    });
    println!("stats {json}");
}
