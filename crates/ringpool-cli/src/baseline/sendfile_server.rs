//! `ringpool sendfile-server` (hidden): the `fanout` bench's `sendfile(2)` baseline. It serves
//! one file to every client in rounds, like `ringpool fanout` (a round starts when `--clients`
//! clients are connected; each gets the whole file, then a half-close), but with the classic
//! kernel shortcut instead of io_uring: `sendfile(2)` from the page cache straight into each
//! client's socket, per client, with no user-space buffer at all.
//!
//! **One thread, non-blocking sockets and `poll(2)`** (not a thread per client): the ringpool
//! servers it is compared with run on one thread too, so GB/s compares one core against one
//! core, and CPU per GB is not inflated by 16 threads' scheduling. Each time a client's socket
//! is writable, `sendfile` is called on it until the socket is full (`EAGAIN`) or the file
//! ends (`sendfile` returns 0); every client keeps its own file offset (the shared descriptor's
//! position is never used). Prints `listening on ADDR` first and `stats {json}` on
//! SIGINT/SIGTERM.

use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::net::{set_backlog, set_nodelay};
use crate::signals;

/// Arguments of `ringpool sendfile-server`.
#[derive(clap::Args)]
pub struct Args {
    /// The file to serve.
    #[arg(long)]
    file: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Clients per round: a round starts when this many are connected.
    #[arg(long, default_value_t = 1)]
    clients: usize,
}

/// Most bytes one `sendfile` call is asked for (Linux transfers at most 0x7ffff000 anyway).
const MAX_CALL: usize = 1 << 30;
/// How long `poll` waits before the loop looks at the stop flag again.
const POLL_MS: libc::c_int = 100;

/// What the server did.
#[derive(Default)]
struct Summary {
    rounds: u64,
    clients_done: u64,
    clients_lost: u64,
    bytes_sent: u64,
    /// `sendfile` calls that moved bytes, returned EOF, or failed.
    sendfile_calls: u64,
    /// `sendfile` calls that found the socket full (`EAGAIN`).
    eagain: u64,
    /// `poll` calls.
    polls: u64,
}

/// A client of the current round.
struct Client {
    stream: TcpStream,
    /// Where in the file this client's next byte is.
    offset: libc::off_t,
}

/// What [`Client::push`] ended with.
enum Push {
    /// The socket is full; wait until it is writable.
    Full,
    /// The whole file went out.
    Done,
    /// The connection failed.
    Failed,
}

impl Client {
    /// `sendfile`s from the client's offset until the socket is full or the file ends.
    fn push(&mut self, file: libc::c_int, s: &mut Summary) -> Push {
        loop {
            // SAFETY: both descriptors are live (the socket is owned by `self.stream`, the file
            // by the caller's `File`); sendfile reads and updates the valid, exclusively
            // borrowed `self.offset`.
            let n = unsafe {
                libc::sendfile(self.stream.as_raw_fd(), file, &mut self.offset, MAX_CALL)
            };
            match n {
                0 => {
                    s.sendfile_calls += 1;
                    return Push::Done;
                }
                n if n > 0 => {
                    s.sendfile_calls += 1;
                    s.bytes_sent += n as u64;
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {
                            s.eagain += 1;
                            return Push::Full;
                        }
                        io::ErrorKind::Interrupted => {}
                        _ => {
                            s.sendfile_calls += 1;
                            return Push::Failed;
                        }
                    }
                }
            }
        }
    }
}

/// Runs `ringpool sendfile-server` until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    signals::install();
    let listener = TcpListener::bind(args.listen)?;
    set_backlog(&listener, 4096)?;
    listener.set_nonblocking(true)?;
    let file = std::fs::File::open(&args.file)?;
    println!("listening on {}", listener.local_addr()?);
    let _ = io::stdout().flush();
    let s = serve(&listener, file.as_raw_fd(), args.clients.max(1))?;
    println!(
        "stopped: {} rounds, {} clients served, {} lost, {} bytes sent",
        s.rounds, s.clients_done, s.clients_lost, s.bytes_sent
    );
    let json = serde_json::json!({
        "rounds": s.rounds, "clients_done": s.clients_done, "clients_lost": s.clients_lost,
        "bytes_sent": s.bytes_sent, "sendfile_calls": s.sendfile_calls, "eagain": s.eagain,
        "polls": s.polls, "mode": "sendfile",
    });
    println!("stats {json}");
    Ok(())
}

/// Serves rounds of `clients` clients until a stop signal.
fn serve(listener: &TcpListener, file: libc::c_int, clients: usize) -> io::Result<Summary> {
    let mut s = Summary::default();
    let mut waiting: Vec<TcpStream> = Vec::new();
    // The round's clients; a served or failed client's entry becomes `None`.
    let mut round: Vec<Option<Client>> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !signals::stop_requested() {
        if round.is_empty() && waiting.len() >= clients {
            for stream in waiting.drain(..) {
                stream.set_nonblocking(true)?;
                set_nodelay(&stream);
                round.push(Some(Client { stream, offset: 0 }));
            }
        }
        fill_pollfds(&mut fds, listener, &round);
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        s.polls += 1;
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            accept_all(listener, &mut waiting);
        }
        push_ready(&mut round, &fds[1..], file, &mut s);
        if !round.is_empty() && round.iter().all(Option::is_none) {
            s.rounds += 1;
            round.clear();
        }
    }
    Ok(s)
}

/// The listener, then every live client of the round (index + 1 in `fds`).
fn fill_pollfds(fds: &mut Vec<libc::pollfd>, listener: &TcpListener, round: &[Option<Client>]) {
    fds.clear();
    fds.push(libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    for c in round {
        fds.push(libc::pollfd {
            // A negative descriptor is ignored by poll: a finished client.
            fd: c.as_ref().map_or(-1, |c| c.stream.as_raw_fd()),
            events: libc::POLLOUT,
            revents: 0,
        });
    }
}

/// Pushes more of the file to every client that `poll` found writable (`fds`, one per client
/// of the round); a client served to the end is half-closed, and its entry, like a failed
/// one's, becomes `None`.
fn push_ready(
    round: &mut [Option<Client>],
    fds: &[libc::pollfd],
    file: libc::c_int,
    s: &mut Summary,
) {
    for (slot, pfd) in round.iter_mut().zip(fds) {
        if pfd.revents == 0 {
            continue;
        }
        let Some(c) = slot else { continue };
        match c.push(file, s) {
            Push::Full => {}
            Push::Done => {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                s.clients_done += 1;
                *slot = None;
            }
            Push::Failed => {
                s.clients_lost += 1;
                *slot = None;
            }
        }
    }
}

/// Accepts every pending connection into `waiting`.
fn accept_all(listener: &TcpListener, waiting: &mut Vec<TcpStream>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => waiting.push(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("accept: {e}");
                return;
            }
        }
    }
}
