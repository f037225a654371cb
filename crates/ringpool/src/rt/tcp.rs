//! TCP: [`TcpListener`] (a multishot accept) and [`TcpStream`], whose receives hand out pooled
//! buffers ([`TcpStream::recv`], [`TcpStream::recv_one`], the multishot [`RecvStream`]) and
//! whose sends go through the zero-copy policy. A dropped receive's data is the stream's
//! leftovers, handed out by its next receive (`op.rs`); the copying views are in `io.rs`.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use super::io::{Reader, Writer};
use super::multishot::MultishotEvents;
use super::op::{Leftovers, Op};
use crate::{BufChain, BufGroup, Error, Event, Fd, RecvMode, Result, SendBuf};

/// A listening TCP socket whose connections come from a multishot accept.
pub struct TcpListener {
    fd: Fd,
    accept: RefCell<Option<Op>>,
}

impl TcpListener {
    /// Binds `addr` (backlog 4096).
    ///
    /// # Errors
    /// The bind error.
    pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
        let l = std::net::TcpListener::bind(addr).map_err(Error::os("bind"))?;
        // SAFETY: listen on a socket we own; raising its backlog has no other effect.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        Ok(TcpListener {
            fd: Fd::from(l),
            accept: RefCell::new(None),
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        local_addr(&self.fd)
    }

    /// The next connection.
    ///
    /// # Errors
    /// The accept error.
    pub async fn accept(&self) -> Result<TcpStream> {
        loop {
            if self.accept.borrow().is_none() {
                let fd = self.fd.clone();
                let op = Op::start(|d, t| d.accept_multishot(&fd, t).map(Some))?;
                *self.accept.borrow_mut() = Some(op);
            }
            // The op stays in the listener (a dropped `accept` future leaves it armed); only its
            // token is needed to await its next connection, so no borrow is held across it.
            let (ended, next) = {
                let accept = self.accept.borrow();
                let op = accept.as_ref().expect("armed above");
                (op.runtime_ended(), op.next_detached())
            };
            if ended {
                // Armed by a runtime that has ended (the listener outlived it): arm anew here.
                self.accept.borrow_mut().take();
                continue;
            }
            let event = next.await;
            match event {
                Event::Accepted(fd) => return Ok(TcpStream::from_fd(fd)),
                Event::Error(e) => {
                    self.accept.borrow_mut().take();
                    return Err(e);
                }
                _ => {}
            }
        }
    }
}

/// A connected TCP socket.
pub struct TcpStream {
    pub(super) fd: Fd,
    /// Received by receives whose futures were dropped: handed out first.
    pub(super) leftovers: Leftovers,
}

/// Starts a receive on `fd` whose late events go to `leftovers` if its future is dropped.
pub(super) fn start_recv(
    fd: &Fd,
    group: &BufGroup,
    mode: RecvMode,
    leftovers: &Leftovers,
) -> Result<Op> {
    let mut op = Op::start(|d, t| d.recv(fd, group, mode, t).map(Some))?;
    op.set_stream(leftovers);
    Ok(op)
}

/// What a receive event means to the reader.
fn recv_result(event: Event) -> Result<Option<BufChain>> {
    match event {
        Event::Data(chain) => Ok(Some(chain)),
        Event::Eof => Ok(None),
        Event::Error(e) => Err(e),
        other => unreachable!("recv: {other:?}"),
    }
}

impl TcpStream {
    /// Connects to `addr`.
    ///
    /// # Errors
    /// The connect error (e.g. `ECONNREFUSED`).
    pub async fn connect(addr: SocketAddr) -> Result<TcpStream> {
        let fd = Fd::tcp_socket(addr)?;
        let op = Op::start(|d, t| d.connect(&fd, addr, t).map(Some))?;
        match op.next().await {
            Event::Connected => Ok(TcpStream::from_fd(fd)),
            Event::Error(e) => Err(e),
            other => unreachable!("connect: {other:?}"),
        }
    }

    /// A stream over an already connected socket (e.g. from `std::net`).
    ///
    /// # Examples
    /// ```no_run
    /// let s = std::net::TcpStream::connect("127.0.0.1:7000").unwrap();
    /// let stream = ringpool::rt::TcpStream::from_fd(ringpool::Fd::from(s));
    /// ```
    pub fn from_fd(fd: Fd) -> TcpStream {
        TcpStream {
            fd,
            leftovers: Leftovers::default(),
        }
    }

    /// An [`futures_io::AsyncRead`] view receiving into `group` (the copying path); also
    /// `tokio::io::AsyncRead` with the `tokio` feature.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream, g: ringpool::BufGroup) -> std::io::Result<()> {
    /// use futures::AsyncReadExt;
    /// let mut all = Vec::new();
    /// s.reader(g).read_to_end(&mut all).await?;
    /// # Ok(()) }
    /// ```
    pub fn reader(&self, group: BufGroup) -> Reader<'_> {
        Reader::new(self, group)
    }

    /// An [`futures_io::AsyncWrite`] view (the copying path); also `tokio::io::AsyncWrite`
    /// with the `tokio` feature.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream) -> std::io::Result<()> {
    /// use futures::AsyncWriteExt;
    /// let mut w = s.writer();
    /// w.write_all(b"hello").await?;
    /// w.close().await?; // the peer reads end of stream
    /// # Ok(()) }
    /// ```
    pub fn writer(&self) -> Writer<'_> {
        Writer::new(self)
    }

    /// The socket, for the [`Driver`]-level API.
    ///
    /// [`Driver`]: crate::Driver
    pub fn fd(&self) -> &Fd {
        &self.fd
    }

    /// Receives what has arrived (a bundle of buffers where the kernel has bundles) into
    /// buffers the kernel picks from `group`; `None` at end of stream. Dropping the future
    /// cancels the receive; nothing received is lost to the group.
    ///
    /// # Errors
    /// The receive error (e.g. a reset).
    pub async fn recv(&self, group: &BufGroup) -> Result<Option<BufChain>> {
        self.recv_as(group, RecvMode::Bundle).await
    }

    /// Like [`TcpStream::recv`], but into exactly one buffer: the receive never holds more than
    /// one buffer of `group`, which bounds what a connection can take from a shared group (a
    /// bundle takes what the socket holds, up to the whole group).
    ///
    /// # Errors
    /// The receive error (e.g. a reset).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream, g: &ringpool::BufGroup) -> ringpool::Result<()> {
    /// while let Some(chain) = s.recv_one(g).await? {
    ///     assert_eq!(chain.buf_count(), 1);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recv_one(&self, group: &BufGroup) -> Result<Option<BufChain>> {
        self.recv_as(group, RecvMode::Once).await
    }

    async fn recv_as(&self, group: &BufGroup, mode: RecvMode) -> Result<Option<BufChain>> {
        std::future::poll_fn(|cx| self.leftovers.poll_quiet(cx)).await;
        if let Some(event) = self.leftovers.pop() {
            return recv_result(event);
        }
        let op = start_recv(&self.fd, group, mode, &self.leftovers)?;
        let event = std::future::poll_fn(|cx| op.poll_with(cx, &self.leftovers)).await;
        recv_result(event)
    }

    /// Shuts down the sending side: the peer reads end of stream once everything sent before
    /// has arrived; receiving goes on.
    ///
    /// # Errors
    /// `shutdown`'s error (e.g. `ENOTCONN`).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream) -> ringpool::Result<()> {
    /// s.write_all(b"last words".to_vec()).await?;
    /// s.shutdown_write()?;
    /// # Ok(()) }
    /// ```
    pub fn shutdown_write(&self) -> Result<()> {
        // SAFETY: shutdown on a live socket the stream owns.
        let rc = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::os("shutdown")(std::io::Error::last_os_error()))
        }
    }

    /// A multishot receive into `group` (bundles where the kernel has them): one op for the
    /// whole stream, re-armed by the driver when the group ran dry. Dropping the stream cancels
    /// it; chains it had received and not handed out go home.
    ///
    /// # Errors
    /// The op could not start.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream, g: &ringpool::BufGroup) -> ringpool::Result<()> {
    /// let mut rx = s.recv_stream(g)?;
    /// while let Some(chain) = rx.next().await? {
    ///     s.send_zc(chain).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_stream(&self, group: &BufGroup) -> Result<RecvStream> {
        let (fd, group, leftovers) = (self.fd.clone(), group.clone(), self.leftovers.clone());
        let start =
            Box::new(move || start_recv(&fd, &group, RecvMode::MultishotBundle, &leftovers));
        Ok(RecvStream(MultishotEvents::new(&self.leftovers, start)?))
    }

    /// Sends all of `buf` through the zero-copy policy; completes when the bytes are queued
    /// (the memory goes home after the kernel's notification by itself).
    ///
    /// # Errors
    /// The send error.
    pub async fn send_zc(&self, buf: impl Into<SendBuf>) -> Result<usize> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send_zc(&fd, buf, t).map(Some))?;
        match op.next().await {
            Event::Sent { result, .. } => result,
            Event::Error(e) => Err(e),
            other => unreachable!("send: {other:?}"),
        }
    }

    /// Sends all of `buf` (a plain send; short sends are continued).
    ///
    /// # Errors
    /// The send error.
    pub async fn write_all(&self, buf: impl Into<SendBuf>) -> Result<()> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send(&fd, buf, t).map(Some))?;
        match op.next().await {
            Event::Sent { result, .. } => result.map(drop),
            Event::Error(e) => Err(e),
            other => unreachable!("send: {other:?}"),
        }
    }
}

/// The chains of a multishot receive ([`TcpStream::recv_stream`]).
pub struct RecvStream(MultishotEvents);

impl RecvStream {
    /// The next chain received; `None` at end of stream.
    ///
    /// # Errors
    /// The receive error (e.g. a reset); the stream has ended then.
    pub async fn next(&mut self) -> Result<Option<BufChain>> {
        self.0.next(chain_of).await
    }

    /// A chain already received, without waiting (`None` if there is none now): for
    /// coalescing what arrived meanwhile into one send.
    ///
    /// # Errors
    /// As [`RecvStream::next`].
    pub fn try_next(&mut self) -> Result<Option<BufChain>> {
        self.0.try_next(chain_of)
    }
}

fn chain_of(event: Event) -> Option<BufChain> {
    match event {
        Event::Data(chain) => Some(chain),
        _ => None,
    }
}

pub(super) fn local_addr(fd: &Fd) -> Result<SocketAddr> {
    // SAFETY: a borrowed view of a live socket; `ManuallyDrop` keeps it from being closed here.
    let l = std::mem::ManuallyDrop::new(unsafe {
        <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd.as_raw_fd())
    });
    l.local_addr().map_err(Error::os("getsockname"))
}

/// Bytes a [`ZcrxStream`] handed out: one buffer of the zero-copy receive area, or (bytes a
/// dropped group receive of the same socket had taken) a chain of group buffers.
///
/// # Examples
/// ```no_run
/// # async fn f(s: &ringpool::rt::TcpStream, got: ringpool::rt::Received) -> ringpool::Result<()> {
/// println!("{} bytes", got.len());
/// s.send_zc(got).await?; // from the same memory
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub enum Received {
    /// A buffer of the area.
    Zcrx(crate::ZcrxBuf),
    /// Buffers of a group.
    Chain(BufChain),
}

impl Received {
    /// Bytes received.
    pub fn len(&self) -> usize {
        match self {
            Received::Zcrx(b) => b.len(),
            Received::Chain(c) => c.len(),
        }
    }

    /// Whether no bytes came (never, for a stream's items).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, copied.
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            Received::Zcrx(b) => b.to_vec(),
            Received::Chain(c) => c.to_vec(),
        }
    }
}

impl From<Received> for SendBuf {
    fn from(r: Received) -> SendBuf {
        match r {
            Received::Zcrx(b) => SendBuf::from(b),
            Received::Chain(c) => SendBuf::from(c),
        }
    }
}

/// The buffers of a multishot zero-copy receive ([`TcpStream::recv_zc_stream`]).
pub struct ZcrxStream(MultishotEvents);

impl ZcrxStream {
    /// The next bytes received; `None` at end of stream. A full area pauses the receive until
    /// buffers are dropped.
    ///
    /// # Errors
    /// The receive error (e.g. a reset); the stream has ended then.
    pub async fn next(&mut self) -> Result<Option<Received>> {
        self.0.next(received_of).await
    }

    /// Bytes already received, without waiting (`None` if there are none now).
    ///
    /// # Errors
    /// As [`ZcrxStream::next`].
    pub fn try_next(&mut self) -> Result<Option<Received>> {
        self.0.try_next(received_of)
    }
}

fn received_of(event: Event) -> Option<Received> {
    match event {
        Event::ZcrxData(b) => Some(Received::Zcrx(b)),
        Event::Data(chain) => Some(Received::Chain(chain)),
        _ => None,
    }
}

impl TcpStream {
    /// A multishot zero-copy receive into `area` (registered on this runtime's driver with
    /// [`rt::zcrx_area`](super::zcrx_area)): the bytes land in the area and come out as
    /// [`Received::Zcrx`] buffers, which go back to the kernel when dropped. Dropping the
    /// stream stops the receive; what it had received and not handed out goes to the socket's
    /// next receive.
    ///
    /// # Errors
    /// The op could not start ([`Error::NotOurs`] for another runtime's area).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream, area: &ringpool::ZcrxArea) -> ringpool::Result<()> {
    /// let mut rx = s.recv_zc_stream(area)?;
    /// while let Some(bytes) = rx.next().await? {
    ///     s.send_zc(bytes).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_zc_stream(&self, area: &crate::ZcrxArea) -> Result<ZcrxStream> {
        let (fd, area, leftovers) = (self.fd.clone(), area.clone(), self.leftovers.clone());
        let start = Box::new(move || {
            let mut op = Op::start(|d, t| d.recv_zc(&fd, &area, t).map(Some))?;
            op.set_stream(&leftovers);
            Ok(op)
        });
        Ok(ZcrxStream(MultishotEvents::new(&self.leftovers, start)?))
    }
}
