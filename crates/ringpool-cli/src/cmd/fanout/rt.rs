//! `ringpool fanout --rt`: the [`fanout`](crate::cmd::fanout) server on the async layer
//! (`ringpool::rt`): the same rounds, `--in-flight` bound and laggard rule, written as tasks
//! and futures instead of a hand-written completion loop.
//!
//! - An **accept task** queues new clients for the next round.
//! - A **round task** starts a round when `--clients` clients wait, then reads chunk after
//!   chunk, each into a free buffer or pipe ([`rt::lease`] with a send member per live client:
//!   zero-copy from memory, or spliced pages, as `--lease` chose), awaiting each read before the next (so every client gets its chunks in order);
//!   when no buffer is free it waits for one, and drops the clients that still hold the oldest
//!   chunk once none came back for `--laggard-timeout`.
//! - A **chunk task** per chunk awaits its members' results (a failed client is reset and its
//!   other sends cancelled) and then the group's end ([`LeaseGroup::done`]): the buffer (or, for
//!   pages, the chunk's slot) goes back to the free list.
//!
//! The summary and `stats` line are the event loop's, with `"mode": "lease-rt"`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use ringpool::rt::{self, File, LeaseGroup, LeaseMember, TcpListener, TcpStream};
use ringpool::LeaseBacking;

use crate::cmd::fanout::{chunk_backing, Options, ServerStats, Summary};
use crate::net::{set_nodelay, set_reset_on_close};

/// Serves `file` on `listener` on a runtime of its own until `stop()` says so; `announce` is
/// called once the runtime is up. The summary and the driver's statistics.
pub fn run(
    file: std::fs::File,
    listener: TcpListener,
    opts: Options,
    config: ringpool::DriverConfig,
    announce: impl FnOnce() -> std::io::Result<()>,
    stop: impl Fn() -> bool + 'static,
) -> Result<ServerStats, Box<dyn std::error::Error>> {
    let out = rt::block_on_with(config, async move {
        announce()?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
        let summary = serve(File::from(file), raw, listener, opts, stop).await?;
        let (z, d, p) = rt::with_driver(|d| (d.zc_stats(), d.stats(), d.pipe_stats()));
        Ok::<_, Box<dyn std::error::Error>>((summary, z, d, p))
    })??;
    Ok(out)
}

/// Wakes the tasks waiting for something to change (a client arrived, a buffer came back).
#[derive(Default)]
struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Completes at the next [`Notify::notify`].
    async fn notified(&self) {
        let seen = self.generation.get();
        std::future::poll_fn(|cx| {
            if self.generation.get() != seen {
                return Poll::Ready(());
            }
            let mut wakers = self.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// What the tasks share.
struct Server {
    opts: Options,
    summary: RefCell<Summary>,
    /// Chunk buffers (for pages: chunk slots) back from every lease.
    free: RefCell<Vec<LeaseBacking>>,
    total_bufs: usize,
    /// Clients connected since the current round started.
    waiting: RefCell<Vec<TcpStream>>,
    /// A client arrived or a buffer came back.
    changed: Notify,
    /// When a buffer last came back (or laggards were last dropped).
    last_progress: Cell<Instant>,
    /// The served file's descriptor (owned by the `File`), for its size.
    file_fd: std::os::fd::RawFd,
}

/// A client of the current round.
struct Client {
    /// `None` once it failed, was dropped or was served (its ops keep their own clones of the
    /// socket, so it closes when the last of them ends).
    stream: Option<TcpStream>,
}

/// One chunk in flight: its lease group and, per member, the client it sends to.
struct Chunk {
    group: LeaseGroup,
    clients: Vec<usize>,
}

/// The state of one round.
struct Round {
    clients: RefCell<Vec<Client>>,
    /// Chunks whose buffer has not come back, oldest first.
    chunks: RefCell<VecDeque<Rc<Chunk>>>,
}

impl Round {
    fn any_alive(&self) -> bool {
        self.clients.borrow().iter().any(|c| c.stream.is_some())
    }

    /// Resets client `i` and cancels its sends (they complete with errors, which the chunks'
    /// tasks take): counted as lost, and as a laggard if it is one.
    fn drop_client(&self, i: usize, laggard: bool, summary: &RefCell<Summary>) {
        let Some(stream) = self.clients.borrow_mut()[i].stream.take() else {
            return;
        };
        let mut s = summary.borrow_mut();
        s.clients_lost += 1;
        s.laggards += u64::from(laggard);
        // Reset, so zero-copy data queued for it is dropped at once.
        set_reset_on_close(stream.fd());
        rt::with_driver(|d| d.cancel_fd(stream.fd()));
    }
}

/// Serves rounds until `stop()` says so (checked every 100 ms).
pub async fn serve(
    file: File,
    file_fd: std::os::fd::RawFd,
    listener: TcpListener,
    opts: Options,
    stop: impl Fn() -> bool,
) -> ringpool::Result<Summary> {
    let free = (0..opts.in_flight.max(1))
        .map(|_| chunk_backing(&opts, || rt::fixed_buf(opts.chunk)))
        .collect::<ringpool::Result<Vec<_>>>()?;
    let server = Rc::new(Server {
        opts,
        summary: RefCell::default(),
        total_bufs: free.len(),
        free: RefCell::new(free),
        waiting: RefCell::default(),
        changed: Notify::default(),
        last_progress: Cell::new(Instant::now()),
        file_fd,
    });
    // Both tasks end with the runtime (which cancels their ops).
    rt::spawn(accept(listener, server.clone()));
    let mut rounds = rt::spawn(rounds(file, server.clone()));
    while !stop() {
        if let Ok(result) = rt::timeout(Duration::from_millis(100), &mut rounds).await {
            result?; // the round task ends only on an error
        }
    }
    let mut summary = server.summary.borrow().clone();
    summary.buffers_free = server.free.borrow().len();
    summary.buffers_total = server.total_bufs;
    Ok(summary)
}

/// Queues every new connection for the next round.
async fn accept(listener: TcpListener, server: Rc<Server>) {
    let mut log = crate::net::AcceptLog::default();
    loop {
        match listener.accept().await {
            Ok(stream) => {
                log.accepted();
                set_nodelay(stream.fd());
                server.waiting.borrow_mut().push(stream);
                server.changed.notify();
            }
            Err(e) => {
                let open = server.waiting.borrow().len();
                rt::sleep(log.failed(&e, open)).await;
            }
        }
    }
}

/// Round after round: waits for `--clients` clients, serves them the file.
async fn rounds(file: File, server: Rc<Server>) -> ringpool::Result<()> {
    loop {
        while server.waiting.borrow().len() < server.opts.clients.max(1) {
            server.changed.notified().await;
        }
        let clients = server
            .waiting
            .borrow_mut()
            .drain(..)
            .map(|stream| Client {
                stream: Some(stream),
            })
            .collect();
        server.last_progress.set(Instant::now());
        round(&file, &server, clients).await?;
        server.summary.borrow_mut().rounds += 1;
    }
}

/// One round: every chunk read once into a free buffer and leased to every live client's
/// send; then, once every buffer is back, the live clients are half-closed.
async fn round(file: &File, server: &Rc<Server>, clients: Vec<Client>) -> ringpool::Result<()> {
    let round = Rc::new(Round {
        clients: RefCell::new(clients),
        chunks: RefCell::default(),
    });
    let chunk_len = server.opts.chunk;
    let (mut offset, mut eof) = (0u64, false);
    while !eof && round.any_alive() {
        let buf = server.free.borrow_mut().pop();
        let Some(buf) = buf else {
            wait_for_change(server, &round).await;
            continue;
        };
        let chunk = lend_chunk(file, server, &round, buf, offset)?;
        match chunk.group.filled().await {
            Ok(0) => eof = true,
            Ok(n) => {
                let mut s = server.summary.borrow_mut();
                s.chunks_read += 1;
                s.bytes_read += n as u64;
                offset += n as u64;
                // Only a 0-byte read is the end; a short one is the end only if it reached
                // the file's size (which spares the extra read).
                eof = n < chunk_len && crate::cmd::fanout::at_end(&server.file_fd, offset);
            }
            Err(e) => {
                eprintln!("reading the file: {e}");
                eof = true;
            }
        }
        rt::spawn(finish_chunk(chunk, round.clone(), server.clone()));
    }
    while server.free.borrow().len() < server.total_bufs {
        wait_for_change(server, &round).await;
    }
    half_close(server, &round);
    Ok(())
}

/// Starts the read of the chunk at `offset` into `backing` (a buffer, or a pipe's worth of
/// pages), leased to every client of the round that has a socket; the chunk joins the round's.
fn lend_chunk(
    file: &File,
    server: &Server,
    round: &Round,
    backing: LeaseBacking,
    offset: u64,
) -> ringpool::Result<Rc<Chunk>> {
    // Pages members splice: nothing to notify, so a plain send member.
    let member = match backing {
        LeaseBacking::Pages { .. } => LeaseMember::send,
        _ => LeaseMember::send_zc,
    };
    let (members, indices): (Vec<LeaseMember>, Vec<usize>) = round
        .clients
        .borrow()
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((member(c.stream.as_ref()?), i)))
        .unzip();
    let group = rt::lease(file, backing, offset, members)?;
    {
        let mut s = server.summary.borrow_mut();
        let held = server.total_bufs - server.free.borrow().len();
        s.peak_in_flight = s.peak_in_flight.max(held);
    }
    let chunk = Rc::new(Chunk {
        group,
        clients: indices,
    });
    round.chunks.borrow_mut().push_back(chunk.clone());
    Ok(chunk)
}

/// The round is over: its live clients are half-closed and counted as served.
fn half_close(server: &Server, round: &Round) {
    for c in round.clients.borrow_mut().iter_mut() {
        if let Some(stream) = c.stream.take() {
            // SAFETY: shutdown on a live socket the round owns.
            unsafe { libc::shutdown(stream.fd().as_raw_fd(), libc::SHUT_WR) };
            server.summary.borrow_mut().clients_done += 1;
        }
    }
}

/// Takes a chunk's member results (a client whose send failed is dropped), then gives its
/// buffer (or chunk slot) back.
async fn finish_chunk(chunk: Rc<Chunk>, round: Rc<Round>, server: Rc<Server>) {
    for (member, &client) in chunk.clients.iter().enumerate() {
        match chunk.group.member(member).await {
            Ok(n) => server.summary.borrow_mut().bytes_sent += n as u64,
            Err(_) => round.drop_client(client, false, &server.summary),
        }
    }
    let backing = match chunk.group.done().await {
        Some(buf) => LeaseBacking::Memory(buf),
        None => LeaseBacking::Pages {
            len: server.opts.chunk,
        },
    };
    round.chunks.borrow_mut().retain(|c| !Rc::ptr_eq(c, &chunk));
    server.free.borrow_mut().push(backing);
    server.last_progress.set(Instant::now());
    server.changed.notify();
}

/// Waits for a client or a buffer; when every buffer is held and none came back for the
/// laggard timeout, drops the clients that still hold the oldest chunk instead.
async fn wait_for_change(server: &Server, round: &Round) {
    if !server.free.borrow().is_empty() {
        server.changed.notified().await;
        return;
    }
    let idle = server.last_progress.get().elapsed();
    let limit = server.opts.laggard_timeout;
    if idle > limit {
        drop_laggards(server, round);
        server.last_progress.set(Instant::now());
        return;
    }
    let left = limit - idle + Duration::from_millis(1);
    let _ = rt::timeout(left, server.changed.notified()).await;
}

/// Resets the live clients that still hold the oldest chunk held by any live client.
fn drop_laggards(server: &Server, round: &Round) {
    let alive = |i: usize| round.clients.borrow()[i].stream.is_some();
    let holders = round.chunks.borrow().iter().find_map(|chunk| {
        let holders: Vec<usize> = (0..chunk.group.len())
            .filter(|&m| chunk.group.holds(m) && alive(chunk.clients[m]))
            .map(|m| chunk.clients[m])
            .collect();
        (!holders.is_empty()).then_some(holders)
    });
    for i in holders.unwrap_or_default() {
        round.drop_client(i, true, &server.summary);
    }
}
