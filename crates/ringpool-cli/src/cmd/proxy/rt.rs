//! `ringpool proxy --rt`: the same proxy on the async layer (`ringpool::rt`): one task per
//! direction of each connection, `recv_one` into the shared (registered where memlock allows)
//! group, `send_zc` of the received buffer as it is.
//!
//! **Flow control.** While a direction's send is in flight it receives one buffer ahead (within
//! its fair share of the group, `buffers / (2 × connections)`), which leaves with the next send;
//! so one stalled direction cannot take the group from the others, and a reset of the source is
//! seen even when the destination stopped reading (and, once the share is full, by a periodic
//! `SO_ERROR` check).
//!
//! Half-close (EOF → `shutdown(SHUT_WR)` of the other side) and resets (an error on one side
//! resets both) propagate as in the event-loop proxy, and so does receive coalescing
//! (`--coalesce-us`: the runtime's driver holds its waits while data streams in).

use std::cell::Cell;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use ringpool::rt::{self, TcpListener, TcpStream};
use ringpool::{BufChain, BufGroup, DriverConfig, Error, ZcConfig};

use crate::cmd::proxy::{Args, Summary, Upstream};
use crate::net::{
    abort_connection, log, nofile_limit, out_of_descriptors, peer_left, set_nodelay,
    set_reset_on_close, AcceptLog, ConnectTimeoutLog, CONNECT_WATCH,
};
use crate::signals;

/// Counters shared by the connection tasks.
#[derive(Default)]
struct Counters {
    connections: Cell<u64>,
    /// Pairs forwarding now (for each direction's fair share of the group).
    live: Cell<u64>,
    bytes_up: Cell<u64>,
    bytes_down: Cell<u64>,
    resets: Cell<u64>,
    /// Clients reset at once because no upstream socket could be opened.
    refused: Cell<u64>,
    /// Inside an episode of failing to open upstream sockets (logged once when it starts).
    starved: Cell<bool>,
    connect_timeouts: Cell<u64>,
    left_connecting: Cell<u64>,
    timeout_log: std::cell::RefCell<ConnectTimeoutLog>,
}

pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    signals::install();
    let cfg = DriverConfig::default()
        .entries(crate::cmd::probe::SERVER_RING_ENTRIES)
        .zerocopy(ZcConfig::default().mode(crate::cmd::proxy::zerocopy_mode(&args)))
        .receive_coalescing(Duration::from_micros(args.coalesce_us));
    rt::block_on_with(cfg, async move {
        let group = rt::buf_group(crate::cmd::proxy::group_config(&args)?)
            .map_err(crate::net::group_error(args.bufs, args.buf_size))?;
        let listener = TcpListener::bind(args.listen)
            .map_err(|e| crate::net::listen_error(args.listen)(e.into()))?;
        print_start(&args, &listener, &group)?;
        let counters = Rc::new(Counters::default());
        accept_until_stopped(&args, &listener, &group, &counters).await;
        // Buffers still held by zero-copy sends come home with their notifications.
        for _ in 0..50 {
            if group.stats().in_user == 0 {
                break;
            }
            rt::sleep(Duration::from_millis(10)).await;
        }
        let summary = counters.summary();
        let source = crate::recv::Source::Group(group.clone());
        rt::with_driver(|d| crate::cmd::proxy::report(&summary, &source, d, "rt"));
        Ok::<(), Box<dyn std::error::Error>>(())
    })?
}

/// The start lines: where the proxy listens, where it forwards to, through which buffers.
fn print_start(args: &Args, listener: &TcpListener, group: &BufGroup) -> std::io::Result<()> {
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
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Accepts clients until a stop is requested, each served by its own [`pair`] task.
async fn accept_until_stopped(
    args: &Args,
    listener: &TcpListener,
    group: &BufGroup,
    counters: &Rc<Counters>,
) {
    let mut accept_log = AcceptLog::default();
    while !signals::stop_requested() {
        match rt::timeout(Duration::from_millis(200), listener.accept()).await {
            Err(Error::TimedOut) => {}
            Err(e) | Ok(Err(e)) => {
                // Out of descriptors: wait (connections stay in the backlog) instead of
                // failing again at once.
                let live = counters.live.get() as usize;
                rt::sleep(accept_log.failed(&e, live)).await;
            }
            Ok(Ok(client)) => {
                accept_log.accepted();
                set_nodelay(client.fd());
                counters.connections.set(counters.connections.get() + 1);
                let upstream = Upstream {
                    addr: args.upstream,
                    connect_timeout: args.connect_timeout,
                };
                let task = pair(client, upstream, group.clone(), counters.clone());
                drop(rt::spawn(task)); // runs on its own; ends with the runtime
            }
        }
    }
}

impl Counters {
    /// What the proxy did, for [`crate::cmd::proxy::report`].
    fn summary(&self) -> Summary {
        Summary {
            connections: self.connections.get(),
            bytes_up: self.bytes_up.get(),
            bytes_down: self.bytes_down.get(),
            resets: self.resets.get(),
            refused: self.refused.get(),
            connect_timeouts: self.connect_timeouts.get(),
            left_connecting: self.left_connecting.get(),
        }
    }
}

/// One client connection: connect upstream, then both directions at once.
async fn pair(client: TcpStream, upstream: Upstream, group: BufGroup, counters: Rc<Counters>) {
    let connect = rt::timeout(upstream.connect_timeout, TcpStream::connect(upstream.addr));
    let Some(connected) = unless_peer_leaves(&client, connect).await else {
        // The client left: dropping the connect cancelled it.
        counters
            .left_connecting
            .set(counters.left_connecting.get() + 1);
        return;
    };
    let Some(upstream) = connect_outcome(&client, upstream, connected, &counters) else {
        return;
    };
    set_nodelay(upstream.fd());
    let pair = Rc::new(Pair {
        client,
        upstream,
        reset: Cell::new(false),
    });
    counters.live.set(counters.live.get() + 1);
    let up = rt::spawn(forward(pair.clone(), group.clone(), counters.clone(), true));
    forward(pair, group, counters.clone(), false).await;
    up.await;
    counters.live.set(counters.live.get() - 1);
}

/// The upstream stream of a finished connect, or `None` when it failed: then `client` is set
/// to reset on close, and the failure counted (timed out, out of descriptors, refused) and
/// logged once per episode.
fn connect_outcome(
    client: &TcpStream,
    upstream: Upstream,
    connected: ringpool::Result<ringpool::Result<TcpStream>>,
    counters: &Counters,
) -> Option<TcpStream> {
    match connected.unwrap_or_else(Err) {
        Ok(s) => {
            counters.timeout_log.borrow_mut().connected();
            if counters.starved.replace(false) {
                log(format_args!("proxy: upstream sockets available again"));
            }
            Some(s)
        }
        Err(Error::TimedOut) => {
            let log = &mut counters.timeout_log.borrow_mut();
            log.timed_out(upstream.addr, upstream.connect_timeout);
            counters
                .connect_timeouts
                .set(counters.connect_timeouts.get() + 1);
            set_reset_on_close(client.fd());
            None
        }
        Err(e) if out_of_descriptors(&e) => {
            if !counters.starved.replace(true) {
                log(format_args!(
                    "proxy: cannot open a socket to the upstream {}: {e} (RLIMIT_NOFILE \
                     {}, {} connections open); refusing new clients with a reset until one \
                     closes; logged once until it recovers",
                    upstream.addr,
                    nofile_limit(),
                    counters.live.get()
                ));
            }
            set_reset_on_close(client.fd());
            counters.refused.set(counters.refused.get() + 1);
            None
        }
        Err(_) => {
            // The client sees the refusal as a reset.
            set_reset_on_close(client.fd());
            counters.resets.set(counters.resets.get() + 1);
            None
        }
    }
}

/// Runs `fut` unless the peer of `client` leaves first (looked at every [`CONNECT_WATCH`],
/// without reading its data): `None` then, and `fut` is dropped (an upstream connect is
/// cancelled with it).
async fn unless_peer_leaves<F: Future>(client: &TcpStream, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut watch = Box::pin(rt::sleep(CONNECT_WATCH));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        while watch.as_mut().poll(cx).is_ready() {
            if peer_left(client.fd()) {
                return Poll::Ready(None);
            }
            watch = Box::pin(rt::sleep(CONNECT_WATCH));
        }
        Poll::Pending
    })
    .await
}

/// The two sockets of a connection, and whether it was reset (counted once per pair).
struct Pair {
    client: TcpStream,
    upstream: TcpStream,
    reset: Cell<bool>,
}

/// A receive in flight on a direction's source (boxed, so it can outlive one send).
pub(crate) type Recv<'a> = Pin<Box<dyn Future<Output = ringpool::Result<Option<BufChain>>> + 'a>>;

/// Forwards `src` to `dst` until end of stream (then half-closes `dst`) or an error (then
/// resets both, which ends the other direction too).
async fn forward(pair: Rc<Pair>, group: BufGroup, counters: Rc<Counters>, up: bool) {
    let (src, dst, bytes) = if up {
        (&pair.client, &pair.upstream, &counters.bytes_up)
    } else {
        (&pair.upstream, &pair.client, &counters.bytes_down)
    };
    // At most one receive is in flight on `src`, and it is never abandoned while the pair
    // lives: it carries over from one send to the next, so bytes cannot overtake each other.
    let mut recv: Option<Recv<'_>> = None;
    // What arrived while the last send was in flight: it leaves as one send.
    let mut gathered = Gathered::default();
    loop {
        let chain = match gathered.chain.take() {
            Some(chain) => chain,
            None if gathered.eof => {
                let _ = dst.shutdown_write();
                return;
            }
            None => {
                let next = recv
                    .take()
                    .unwrap_or_else(|| Box::pin(src.recv_one(&group)));
                match next.await {
                    Ok(Some(chain)) => chain,
                    Ok(None) => {
                        let _ = dst.shutdown_write();
                        return;
                    }
                    Err(_) => break,
                }
            }
        };
        let share = fair_share(&group, &counters);
        match send_gathering(src, dst, chain, &group, share, &mut recv).await {
            (Ok(n), Ok(next)) => {
                bytes.set(bytes.get() + n as u64);
                gathered = next;
            }
            (sent, _) => {
                if let Err(e) = &sent {
                    crate::net::log_if_own_shortage("proxy", e);
                }
                break;
            }
        }
    }
    // A reset on either side: reset both now (`abort_connection`: the peers get a reset, data
    // queued for them is dropped, and every op waiting on the sockets fails), and cancel the
    // other direction's ops so that it ends too. Cancelling alone is not enough: a send to a
    // peer that never reads, or a zero-copy notification for data queued to it, can keep a
    // socket open, its buffers out and the other task waiting (a leaked session: issue 18).
    // (Not `shutdown`: its FIN could reach the peer before the reset and read as a clean end.)
    drop(recv);
    reset_both(&pair, src, dst, &counters);
}

/// Resets both sockets of `pair` (counted once per pair) and cancels their ops.
fn reset_both(pair: &Pair, src: &TcpStream, dst: &TcpStream, counters: &Counters) {
    if !pair.reset.replace(true) {
        counters.resets.set(counters.resets.get() + 1);
    }
    for s in [src, dst] {
        abort_connection(s.fd());
        rt::with_driver(|d| d.cancel_fd(s.fd()));
    }
}

/// Buffers a direction may hold: its share of the group, `buffers / (2 × connections)` (at most
/// a sixteenth of the group, as in the event-loop proxy), less
/// one for the receive that may carry over from one send to the next (at least 2). The chain
/// being sent counts against it: all directions' shares fit in the group, so every direction
/// can always receive, and a shared group cannot deadlock the proxy.
fn fair_share(group: &BufGroup, counters: &Counters) -> usize {
    let live = counters.live.get().max(1);
    let total = group.stats().total as u64;
    let share = (total / (2 * live)).min(total / crate::cmd::proxy::MAX_SHARE_DIVISOR as u64);
    share.saturating_sub(1).max(2) as usize
}

/// How often a direction whose share is full looks for an error on its source.
const WATCH: Duration = Duration::from_millis(50);

/// The error pending on `s` (a reset), if any, without taking data (`SO_ERROR`; a reset
/// sets it even while unread data waits in the socket).
fn pending_error(s: &TcpStream) -> Option<ringpool::Error> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int and its length into variables we own.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s.fd()),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &mut len,
        )
    };
    (rc == 0 && err != 0).then(|| Error::Os {
        op: "recv",
        source: std::io::Error::from_raw_os_error(err),
    })
}

/// What a direction received while its send was in flight.
#[derive(Default)]
pub(crate) struct Gathered {
    pub(crate) chain: Option<BufChain>,
    /// `src` reached end of stream.
    pub(crate) eof: bool,
}

/// Sends `chain` to `dst` while receiving from `src` through `recv`, the direction's one
/// receive in flight (at most one buffer ahead, within `share` counting `chain`). Returns the
/// send's result and what was received meanwhile, for the next send; a receive still in flight
/// stays in `recv`. An error on `src` ends the send at once (dropping it cancels it): the pair is
/// being reset, and `dst` may never read again.
pub(crate) async fn send_gathering<'a>(
    src: &'a TcpStream,
    dst: &TcpStream,
    chain: BufChain,
    group: &'a BufGroup,
    share: usize,
    recv: &mut Option<Recv<'a>>,
) -> (ringpool::Result<usize>, ringpool::Result<Gathered>) {
    // Room left in the share besides the chain being sent, and at most one buffer ahead: with
    // more, zero-copy sends that hold their buffers until the notification let the directions
    // together overrun the group under load (a 64 MiB test hung in CI).
    let room = share.saturating_sub(chain.buf_count()).min(1);
    let mut send = std::pin::pin!(dst.send_zc(chain));
    let mut gathered = Gathered::default();
    let mut held = 0;
    // While the share is full no receive watches `src`: look at it now and then instead (the
    // timer is made only then).
    let mut watch: Option<Pin<Box<dyn Future<Output = ()>>>> = None;
    std::future::poll_fn(|cx| {
        loop {
            if recv.is_none() {
                if gathered.eof || held >= room {
                    let timer = watch.get_or_insert_with(|| Box::pin(rt::sleep(WATCH)));
                    while timer.as_mut().poll(cx).is_ready() {
                        if let Some(e) = pending_error(src) {
                            return Poll::Ready((Err(Error::Cancelled), Err(e)));
                        }
                        *timer = Box::pin(rt::sleep(WATCH));
                    }
                    break;
                }
                *recv = Some(Box::pin(src.recv_one(group)));
            }
            let r = match recv.as_mut().expect("set above").as_mut().poll(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => break,
            };
            *recv = None;
            match r {
                Err(e) => return Poll::Ready((Err(Error::Cancelled), Err(e))),
                Ok(None) => gathered.eof = true,
                Ok(Some(more)) => {
                    held += more.buf_count();
                    match &mut gathered.chain {
                        Some(c) => c.append(more),
                        None => gathered.chain = Some(more),
                    }
                }
            }
        }
        match send.as_mut().poll(cx) {
            Poll::Ready(sent) => Poll::Ready((sent, Ok(std::mem::take(&mut gathered)))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}
