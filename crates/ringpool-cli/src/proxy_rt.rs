//! `ringpool proxy --rt`: the same proxy on the async layer (`ringpool::rt`): one task per
//! direction of each connection, `recv_one` into the shared (registered where memlock allows)
//! group, `send_zc` of the received buffer as it is.
//!
//! **Flow control.** Each direction holds at most two received buffers of the shared group at a
//! time (the one being sent, and the next one, received while that send is in flight so that a
//! reset is seen even when the other side stopped reading), plus what a zero-copy send keeps
//! until its notification; so one stalled direction cannot take the group from the others, and
//! the group is large enough for every direction when it holds four buffers per connection. Half-close (EOF → `shutdown(SHUT_WR)` of the other side) and resets
//! (an error on one side resets both) propagate as in the event-loop proxy, which stays the
//! default: it coalesces small receives into one send, which this one does not.

use std::cell::Cell;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use ringpool::rt::{self, TcpListener, TcpStream};
use ringpool::{BufChain, BufGroup, BufGroupConfig, DriverConfig, Error, Registration, ZcConfig};

use crate::net::{set_nodelay, set_reset_on_close};
use crate::proxy::{Args, Summary};
use crate::signals;

/// Counters shared by the connection tasks.
#[derive(Default)]
struct Counters {
    connections: Cell<u64>,
    bytes_up: Cell<u64>,
    bytes_down: Cell<u64>,
    resets: Cell<u64>,
}

pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    signals::install();
    let cfg = DriverConfig::default()
        .entries(1024)
        .zerocopy(ZcConfig::default().mode(args.zerocopy));
    rt::block_on_with(cfg, async move {
        let group = rt::buf_group(
            BufGroupConfig::new(args.buf_size, args.bufs).registration(Registration::Preferred),
        )?;
        let listener = TcpListener::bind(args.listen)?;
        println!("listening on {}", listener.local_addr()?);
        println!(
            "forwarding to {} on the async layer through buffer group {}: {} x {} B ({}), \
             zero-copy {:?}",
            args.upstream,
            group.id(),
            args.bufs,
            args.buf_size,
            if group.is_registered() {
                "registered region"
            } else {
                "plain memory"
            },
            args.zerocopy
        );
        std::io::stdout().flush()?;
        let counters = Rc::new(Counters::default());
        while !signals::stop_requested() {
            match rt::timeout(Duration::from_millis(200), listener.accept()).await {
                Err(Error::TimedOut) => {}
                Err(e) | Ok(Err(e)) => eprintln!("accept: {e}"),
                Ok(Ok(client)) => {
                    set_nodelay(client.fd());
                    counters.connections.set(counters.connections.get() + 1);
                    let task = pair(client, args.upstream, group.clone(), counters.clone());
                    drop(rt::spawn(task)); // runs on its own; ends with the runtime
                }
            }
        }
        // Buffers still held by zero-copy sends come home with their notifications.
        for _ in 0..50 {
            if group.stats().in_user == 0 {
                break;
            }
            rt::sleep(Duration::from_millis(10)).await;
        }
        let summary = Summary {
            connections: counters.connections.get(),
            bytes_up: counters.bytes_up.get(),
            bytes_down: counters.bytes_down.get(),
            resets: counters.resets.get(),
        };
        let (s, z, d) = rt::with_driver(|d| (group.stats(), d.zc_stats(), d.stats()));
        println!(
            "stopped: {} connections, {} bytes up, {} bytes down, {} resets",
            summary.connections, summary.bytes_up, summary.bytes_down, summary.resets
        );
        let json = serde_json::json!({
            "connections": summary.connections, "bytes_up": summary.bytes_up,
            "bytes_down": summary.bytes_down, "resets": summary.resets,
            "buffer_bytes": group.buffer_bytes(), "total": s.total, "in_kernel": s.in_kernel,
            "in_user": s.in_user, "enobufs": s.enobufs, "rearms": s.rearms,
            "zc_sends": z.zc_sends, "zc_copied": z.zc_copied, "plain_sends": z.plain_sends,
            "fixed_sends": z.fixed_sends, "registered": group.is_registered(),
            "enters": d.enters, "sqes": d.sqes, "cqes": d.cqes, "runtime": "rt",
        });
        println!("stats {json}");
        Ok::<(), Box<dyn std::error::Error>>(())
    })?
}

/// One client connection: connect upstream, then both directions at once.
async fn pair(client: TcpStream, upstream: SocketAddr, group: BufGroup, counters: Rc<Counters>) {
    let upstream = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            // The client sees the refusal as a reset.
            set_reset_on_close(client.fd());
            counters.resets.set(counters.resets.get() + 1);
            return;
        }
    };
    set_nodelay(upstream.fd());
    let pair = Rc::new(Pair {
        client,
        upstream,
        reset: Cell::new(false),
    });
    let up = rt::spawn(forward(pair.clone(), group.clone(), counters.clone(), true));
    forward(pair, group, counters, false).await;
    up.await;
}

/// The two sockets of a connection, and whether it was reset (counted once per pair).
struct Pair {
    client: TcpStream,
    upstream: TcpStream,
    reset: Cell<bool>,
}

/// Forwards `src` to `dst` until end of stream (then half-closes `dst`) or an error (then
/// resets both, which ends the other direction too).
async fn forward(pair: Rc<Pair>, group: BufGroup, counters: Rc<Counters>, up: bool) {
    let (src, dst, bytes) = if up {
        (&pair.client, &pair.upstream, &counters.bytes_up)
    } else {
        (&pair.upstream, &pair.client, &counters.bytes_down)
    };
    // The next receive runs while a send is in flight (one buffer ahead): that is how a reset
    // of `src` is seen even when `dst` stopped reading and the send never completes.
    let mut ahead = None;
    loop {
        let received = match ahead.take() {
            Some(r) => r,
            None => src.recv_one(&group).await,
        };
        match received {
            Ok(Some(chain)) => match send_watching(src, dst, chain, &group).await {
                (Ok(n), next) => {
                    bytes.set(bytes.get() + n as u64);
                    ahead = next;
                }
                (Err(_), _) => break,
            },
            Ok(None) => {
                let _ = dst.shutdown_write();
                return;
            }
            Err(_) => break,
        }
    }
    // A reset on either side: reset both (closed with linger 0 once both tasks let go), and
    // shut them down now, so the other direction's receive ends.
    if !pair.reset.replace(true) {
        counters.resets.set(counters.resets.get() + 1);
    }
    for s in [src, dst] {
        set_reset_on_close(s.fd());
        // SAFETY: shutdown on a live socket this pair owns.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(s.fd()), libc::SHUT_RDWR) };
    }
}

/// Sends `chain` to `dst` while receiving the next buffer from `src`. Returns the send's result
/// and what the receive got if it finished. An error on `src` ends the send at once (dropping it
/// cancels it): the pair is being reset, and `dst` may never read again.
async fn send_watching(
    src: &TcpStream,
    dst: &TcpStream,
    chain: BufChain,
    group: &BufGroup,
) -> (
    ringpool::Result<usize>,
    Option<ringpool::Result<Option<BufChain>>>,
) {
    let mut send = std::pin::pin!(dst.send_zc(chain));
    let mut recv = std::pin::pin!(src.recv_one(group));
    let mut received = None;
    std::future::poll_fn(|cx| {
        if received.is_none() {
            if let Poll::Ready(r) = recv.as_mut().poll(cx) {
                if let Err(e) = r {
                    return Poll::Ready((Err(e), None));
                }
                received = Some(r);
            }
        }
        match send.as_mut().poll(cx) {
            Poll::Ready(sent) => Poll::Ready((sent, received.take())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}
