//! `ringpool echo`: an echo server on multishot accept and multishot recv, every connection
//! sharing one buffer group, so buffer memory is bounded by the group, not by the connections.
//!
//! Received buffers are sent back as they are (no copy): a connection queues the chains it
//! received and keeps one send in flight, which carries everything queued so far. Buffers go
//! back to the group when their send completes. A client that does not read makes the group
//! run dry; receives then pause (backpressure) until buffers come back.
//!
//! With `--recv zcrx` (or `auto` where the kernel can) the bytes land in a zero-copy receive
//! area instead (`crate::recv`): each connection keeps a multishot zero-copy receive armed while
//! it holds fewer than its bound of buffers (and cancels it at the bound), and sends the area's
//! buffers back from the same memory.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use ringpool::{
    BufChain, BufGroupConfig, Driver, DriverConfig, Event, Fd, OpId, RecvMode, SendBuf, ZcrxBuf,
};

use crate::net::{group_error, listen_error, set_backlog, set_nodelay, Accept};
use crate::recv::{RecvChoice, Source};
use crate::signals;

mod rt;

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
    /// Buffers one connection may hold at most (received, not yet sent back); a connection at
    /// its bound is not read until its buffers come home. Default: an eighth of --bufs.
    #[arg(long)]
    conn_bufs: Option<u32>,
    /// Serve on the async layer (`ringpool::rt`: a task per connection) instead of the
    /// driver's event loop.
    #[arg(long)]
    rt: bool,
    /// Where received bytes land: `groups` (the shared buffer group), `zcrx` (a device-less
    /// zero-copy receive area of --bufs 4 KiB buffers: Linux 7.1+, CAP_NET_ADMIN),
    /// `zcrx=IFNAME:QUEUE` (an area fed by that NIC queue), or `auto` (zcrx where the kernel and
    /// this process can, else groups). The event loop only; --rt receives through groups.
    #[arg(long, default_value = "auto", value_parser = crate::recv::parse_recv)]
    recv: RecvChoice,
}

/// Upper bound of iovecs in one send (the kernel's `UIO_MAXIOV` is 1024).
const MAX_IOV: usize = 1024;
const ACCEPT: u64 = u64::MAX;

struct Conn {
    fd: Fd,
    queued: VecDeque<BufChain>,
    /// Zero-copy receive: the area's buffers received and not yet sent, and the receive.
    zc_queued: Vec<ZcrxBuf>,
    zc_op: Option<OpId>,
    /// The zero-copy receive was cancelled at the bound (its end is a pause, not the end).
    pausing: bool,
    sending: bool,
    /// A receive is armed on `fd`.
    receiving: bool,
    /// The peer ended its side, failed, or a send to it failed: no more receives.
    recv_done: bool,
    /// Buffers this connection holds: received and not yet back in the group (queued, being
    /// sent, or waiting for a zero-copy notification).
    held: u32,
    /// Sends whose buffers have not come back (`Event::Returned`): the key is not reused before.
    returns: u32,
    /// Not read for now: it holds its bound of buffers.
    paused: bool,
}

/// What the server did, printed when it stops.
#[derive(Debug, Default)]
pub struct Summary {
    pub connections: u64,
    pub bytes_echoed: u64,
    pub peak_connections: usize,
    /// Times a connection reached its bound of held buffers and stopped being read.
    pub paused: u64,
}

/// The default bound of buffers one connection may hold: an eighth of the group (at least 1).
pub(crate) fn default_conn_bufs(bufs: u32) -> u32 {
    (bufs / 8).max(1)
}

pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let conn_bufs = args.conn_bufs.unwrap_or(default_conn_bufs(args.bufs));
    if conn_bufs == 0 {
        return Err("--conn-bufs 0: a connection must be able to hold at least one buffer".into());
    }
    if args.rt {
        if !matches!(args.recv, RecvChoice::Groups | RecvChoice::Auto) {
            return Err("--recv zcrx: the --rt echo receives through buffer groups only".into());
        }
        return rt::run(args, conn_bufs);
    }
    signals::install();
    let listener = TcpListener::bind(args.listen).map_err(listen_error(args.listen))?;
    set_backlog(&listener, 4096)?;
    let addr = listener.local_addr()?;
    let config = DriverConfig::default().entries(crate::cmd::probe::SERVER_RING_ENTRIES);
    let mut driver = Driver::new(args.recv.config(config))?;
    let (bufs, buf_size) = (args.bufs, args.buf_size);
    let source = crate::recv::source(&mut driver, &args.recv, bufs, |d| {
        d.buf_group(BufGroupConfig::new(buf_size, bufs))
            .map_err(group_error(bufs, buf_size))
    })?;
    println!("listening on {addr}");
    println!("{}", source.describe());
    let _ = std::io::stdout().flush();
    let summary = serve(
        &mut driver,
        &source,
        Fd::from(listener),
        conn_bufs,
        signals::stop_requested,
    )?;
    report(&summary, &source, &driver, conn_bufs);
    Ok(())
}

/// Prints the final summary lines and the `stats {json}` line (read by the bench and the
/// tests).
fn report(summary: &Summary, source: &Source, driver: &Driver, conn_bufs: u32) {
    println!(
        "stopped: {} connections served (peak {}), {} bytes echoed",
        summary.connections, summary.peak_connections, summary.bytes_echoed
    );
    let (line, mut json) = source.report();
    println!("{line}");
    let ds = driver.stats();
    println!(
        "driver stats: enters {} sqes {} cqes {} stray_cqes {}",
        ds.enters, ds.sqes, ds.cqes, ds.stray_cqes
    );
    let own = serde_json::json!({
        "enters": ds.enters, "sqes": ds.sqes, "cqes": ds.cqes,
        "connections": summary.connections,
        "peak_connections": summary.peak_connections,
        "bytes_echoed": summary.bytes_echoed,
        "paused": summary.paused, "conn_bufs": conn_bufs,
    });
    if let (Some(all), serde_json::Value::Object(own)) = (json.as_object_mut(), own) {
        all.extend(own);
    }
    println!("stats {json}");
}

/// Serves echo on `listener` until `stop()` says so; a connection holds at most `conn_bufs`
/// buffers of `group` at once.
///
/// **Backpressure falls on the connection that causes it.** Each connection receives one
/// buffer per op (a multishot or bundle receive takes whatever its socket holds before a cancel
/// lands, so it cannot be bounded), and only while it holds fewer than `conn_bufs` buffers
/// (received and not yet back in the group). A peer that sends and never reads therefore stops
/// being read once it holds its bound (its data waits in its socket, and TCP flow control slows
/// it down); its receive is re-armed when its buffers come home. With `conn_bufs` under the
/// group's size one peer can never drain the group that every connection shares.
pub fn serve(
    driver: &mut Driver,
    source: &Source,
    listener: Fd,
    conn_bufs: u32,
    stop: impl Fn() -> bool,
) -> ringpool::Result<Summary> {
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut summary = Summary::default();
    let mut accept = Accept::new(driver, &listener, ACCEPT)?;
    while !stop() {
        accept.poll(driver, &listener)?;
        driver.wait(Some(accept.wait_for(Duration::from_millis(200))))?;
        while let Some(c) = driver.pop() {
            if c.token == ACCEPT {
                if let Some(fd) = accept.on_completion(c, conns.len()) {
                    on_client(driver, source, &mut conns, fd, conn_bufs, &mut summary)?;
                }
                continue;
            }
            let key = c.token as usize;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            on_event(driver, conn, c.event, c.more, &mut summary);
            if !conn.sending {
                send_queued(driver, conn, key)?;
            }
            bound_zc_recv(driver, conn, conn_bufs);
            arm_recv(driver, source, conn, key, conn_bufs, &mut summary)?;
            if conn.finished() {
                conns.remove(key);
                accept.freed(driver, &listener)?;
            }
        }
    }
    accept.cancel(driver);
    Ok(summary)
}

impl Conn {
    fn new(fd: Fd) -> Conn {
        Conn {
            fd,
            queued: VecDeque::new(),
            zc_queued: Vec::new(),
            zc_op: None,
            pausing: false,
            sending: false,
            receiving: false,
            recv_done: false,
            held: 0,
            returns: 0,
            paused: false,
        }
    }

    /// Nothing left to do and no op of it in the kernel: its key may be reused.
    #[inline]
    fn finished(&self) -> bool {
        self.recv_done
            && !self.receiving
            && !self.sending
            && self.queued.is_empty()
            && self.zc_queued.is_empty()
            && self.returns == 0
    }
}

/// A client accepted: a connection, its first receive armed.
fn on_client(
    driver: &mut Driver,
    source: &Source,
    conns: &mut slab::Slab<Conn>,
    fd: Fd,
    conn_bufs: u32,
    summary: &mut Summary,
) -> ringpool::Result<()> {
    set_nodelay(&fd);
    let key = conns.insert(Conn::new(fd));
    arm_recv(driver, source, &mut conns[key], key, conn_bufs, summary)?;
    summary.connections += 1;
    summary.peak_connections = summary.peak_connections.max(conns.len());
    Ok(())
}

/// One completion of `conn`'s ops: data queued, the peer done, a send's result, or a send's
/// buffers back.
#[inline]
fn on_event(driver: &mut Driver, conn: &mut Conn, event: Event, more: bool, summary: &mut Summary) {
    match event {
        Event::Data(chain) => {
            conn.receiving = false;
            summary.bytes_echoed += chain.len() as u64;
            conn.held += chain.buf_count() as u32;
            conn.queued.push_back(chain);
        }
        Event::ZcrxData(buf) => {
            conn.receiving = more;
            if !more {
                conn.pausing = false; // ended with this buffer: the cancel found nothing left
            }
            summary.bytes_echoed += buf.len() as u64;
            conn.held += 1;
            conn.zc_queued.push(buf);
        }
        Event::LimitReached => {
            // The receive took its bytes' worth of the bound: re-armed below it.
            conn.receiving = false;
            conn.pausing = false;
        }
        Event::Error(ringpool::Error::Cancelled) if conn.pausing => {
            // The zero-copy receive stopped at the bound: re-armed when buffers come home.
            conn.receiving = false;
            conn.pausing = false;
        }
        Event::Eof | Event::Error(_) => {
            conn.receiving = false;
            conn.recv_done = true;
        }
        Event::Sent { result, .. } => {
            conn.sending = false;
            if result.is_err() {
                // The peer is gone: stop receiving, drop what is queued (its buffers go
                // home now).
                for chain in conn.queued.drain(..) {
                    conn.held -= chain.buf_count() as u32;
                }
                conn.held -= conn.zc_queued.len() as u32;
                conn.zc_queued.clear();
                conn.recv_done = true;
                driver.cancel_fd(&conn.fd);
            }
        }
        Event::Returned(buf) => {
            // The kernel is done with a send's buffers: they go home as `buf` drops.
            conn.returns -= 1;
            match &buf {
                SendBuf::Chain(chain) => conn.held -= chain.buf_count() as u32,
                SendBuf::Zcrx(bufs) => conn.held -= bufs.len() as u32,
                _ => {}
            }
            drop(buf);
        }
        _ => {}
    }
}

/// Sends what `conn` has queued (up to [`MAX_IOV`] buffers) as one send, if anything is.
#[inline]
fn send_queued(driver: &mut Driver, conn: &mut Conn, key: usize) -> ringpool::Result<()> {
    if let Some(mut out) = conn.queued.pop_front() {
        while let Some(next) = conn.queued.front() {
            if out.buf_count() + next.buf_count() > MAX_IOV {
                break;
            }
            out.append(conn.queued.pop_front().expect("non-empty"));
        }
        driver.send_zc_returning(&conn.fd, SendBuf::from(out), key as u64)?;
        conn.sending = true;
        conn.returns += 1;
    } else if !conn.zc_queued.is_empty() {
        let n = conn.zc_queued.len().min(MAX_IOV);
        let out: Vec<ZcrxBuf> = conn.zc_queued.drain(..n).collect();
        // (No `From<Vec<ZcrxBuf>>`: it would make `Vec::new()` ambiguous as a `SendBuf`.)
        driver.send_zc_returning(&conn.fd, SendBuf::Zcrx(out), key as u64)?;
        conn.sending = true;
        conn.returns += 1;
    }
    Ok(())
}

/// A connection's multishot zero-copy receive takes whatever its socket holds: at its bound
/// of buffers it is cancelled (once), and armed again when they come home.
#[inline]
fn bound_zc_recv(driver: &mut Driver, conn: &mut Conn, conn_bufs: u32) {
    if conn.receiving && !conn.pausing && conn.held >= conn_bufs {
        if let Some(op) = conn.zc_op {
            conn.pausing = true;
            driver.cancel(op);
        }
    }
}

/// Arms `conn`'s one-buffer receive unless one is armed, its peer is done, or it holds its
/// bound of buffers (then its receive is re-armed when a send's buffers come home).
fn arm_recv(
    driver: &mut Driver,
    source: &Source,
    conn: &mut Conn,
    key: usize,
    conn_bufs: u32,
    summary: &mut Summary,
) -> ringpool::Result<()> {
    if conn.receiving || conn.recv_done {
        return Ok(());
    }
    if conn.held >= conn_bufs {
        if !conn.paused {
            conn.paused = true;
            summary.paused += 1;
        }
        return Ok(());
    }
    match source {
        Source::Group(group) => {
            driver.recv(&conn.fd, group, RecvMode::Once, key as u64)?;
        }
        Source::Zcrx(area) => {
            // At most the bound's worth of bytes (a buffer per completion, whatever it carries:
            // `bound_zc_recv` cancels at the bound of buffers too).
            let room = (conn_bufs - conn.held) * ringpool::ZCRX_BUF_SIZE as u32;
            conn.zc_op = Some(driver.recv_zc_limited(&conn.fd, area, room, key as u64)?);
        }
    }
    conn.receiving = true;
    conn.paused = false;
    Ok(())
}
