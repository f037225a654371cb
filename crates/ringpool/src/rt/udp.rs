//! UDP: [`UdpSocket`], whose receives hand out one pooled buffer per datagram with its
//! sender's address (`Driver::recv_from`: multishot `RECVMSG`, or one datagram at a time) and
//! whose sends go through the zero-copy policy; [`DatagramStream`], the multishot receive. A
//! dropped receive loses no datagram: the same leftovers rule as TCP (`op.rs`).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use super::multishot::MultishotEvents;
use super::op::{Leftovers, Op};
use super::tcp::local_addr;
use crate::{BufGroup, Datagram, Error, Event, Fd, RecvMode, Result, SendBuf};

/// A UDP socket whose receives hand out pooled buffers (one per datagram, picked by the kernel
/// from a group, with the sender's address) and whose sends go through the zero-copy policy.
///
/// Dropping a receive future cancels it; a datagram the kernel had already delivered to it is
/// kept for the socket's next receive, so cancelling never loses one.
///
/// # Examples
/// ```
/// use ringpool::rt::{self, UdpSocket};
/// use ringpool::BufGroupConfig;
///
/// rt::block_on(async {
///     let group = rt::buf_group(BufGroupConfig::new(2048, 64))?;
///     let server = UdpSocket::bind("127.0.0.1:0".parse().unwrap())?;
///     let client = UdpSocket::bind("127.0.0.1:0".parse().unwrap())?;
///     client.send_zc_to(b"ping".to_vec(), server.local_addr()?).await?;
///     let d = server.recv_from(&group).await?;
///     assert_eq!(&d.data[..], b"ping");
///     server.send_zc_to(d.data, d.from.unwrap()).await?; // the buffer itself goes back out
///     assert_eq!(&client.recv_from(&group).await?.data[..], b"ping");
///     Ok::<(), ringpool::Error>(())
/// })??;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub struct UdpSocket {
    fd: Fd,
    /// Datagrams delivered to receives whose futures were dropped: handed out first.
    leftovers: Leftovers,
}

impl UdpSocket {
    /// Binds a UDP socket to `addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// The bind error.
    pub fn bind(addr: SocketAddr) -> Result<UdpSocket> {
        let s = std::net::UdpSocket::bind(addr).map_err(Error::os("bind"))?;
        Ok(UdpSocket::from_fd(Fd::from(std::os::fd::OwnedFd::from(s))))
    }

    /// A socket over an open UDP socket (e.g. from `std::net`).
    ///
    /// # Examples
    /// ```no_run
    /// let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let socket = ringpool::rt::UdpSocket::from_fd(ringpool::Fd::from(std::os::fd::OwnedFd::from(s)));
    /// ```
    pub fn from_fd(fd: Fd) -> UdpSocket {
        UdpSocket {
            fd,
            leftovers: Leftovers::default(),
        }
    }

    /// Sets the default peer: [`UdpSocket::send_zc`] sends there, and only its datagrams are
    /// received.
    ///
    /// # Errors
    /// The connect error.
    pub fn connect(&self, addr: SocketAddr) -> Result<()> {
        let (storage, len) = crate::driver::sockaddr(addr);
        // SAFETY: connect reads `len` bytes of a socket address we own, on a socket we own.
        let rc = unsafe {
            libc::connect(
                self.fd.as_raw_fd(),
                (&raw const storage).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::os("connect")(std::io::Error::last_os_error()))
        }
    }

    /// The bound address.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        local_addr(&self.fd)
    }

    /// The socket, for the [`Driver`]-level API.
    ///
    /// [`Driver`]: crate::Driver
    pub fn fd(&self) -> &Fd {
        &self.fd
    }

    /// The next datagram, in a buffer the kernel picks from `group`.
    ///
    /// # Errors
    /// The receive error; [`Error::BufferTooSmall`] for a group whose buffers cannot hold a
    /// payload (see [`Driver::recv_from`]).
    ///
    /// [`Driver::recv_from`]: crate::Driver::recv_from
    pub async fn recv_from(&self, group: &BufGroup) -> Result<Datagram> {
        std::future::poll_fn(|cx| self.leftovers.poll_quiet(cx)).await;
        if let Some(event) = self.leftovers.pop() {
            return datagram_result(event);
        }
        let mut op = Op::start(|d, t| d.recv_from(&self.fd, group, RecvMode::Once, t).map(Some))?;
        op.set_stream(&self.leftovers);
        let event = std::future::poll_fn(|cx| op.poll_with(cx, &self.leftovers)).await;
        datagram_result(event)
    }

    /// A multishot receive into `group`: one op for every datagram to come, re-armed by the
    /// driver when the group ran dry. Dropping the stream cancels it; datagrams it had received
    /// and not handed out go back to their group.
    ///
    /// # Errors
    /// As [`Driver::recv_from`].
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::UdpSocket, g: &ringpool::BufGroup) -> ringpool::Result<()> {
    /// let mut rx = s.recv_stream(g)?;
    /// while let Some(d) = rx.next().await? {
    ///     if let Some(from) = d.from {
    ///         s.send_zc_to(d.data, from).await?; // echo, no copy
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// [`Driver::recv_from`]: crate::Driver::recv_from
    pub fn recv_stream(&self, group: &BufGroup) -> Result<DatagramStream> {
        let (fd, group, leftovers) = (self.fd.clone(), group.clone(), self.leftovers.clone());
        let start = Box::new(move || {
            let mut op =
                Op::start(|d, t| d.recv_from(&fd, &group, RecvMode::Multishot, t).map(Some))?;
            op.set_stream(&leftovers);
            Ok(op)
        });
        Ok(DatagramStream(MultishotEvents::new(
            &self.leftovers,
            start,
        )?))
    }

    /// Sends `buf` as one datagram to `addr` through the zero-copy policy (pooled buffers,
    /// registered memory and owned bytes alike); completes when it is queued.
    ///
    /// # Errors
    /// The send error (e.g. `EMSGSIZE`).
    pub async fn send_zc_to(&self, buf: impl Into<SendBuf>, addr: SocketAddr) -> Result<usize> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send_zc_to(&fd, buf, addr, t).map(Some))?;
        sent_result(op.next().await)
    }

    /// Sends `buf` as one datagram to the connected peer ([`UdpSocket::connect`]).
    ///
    /// # Errors
    /// The send error (e.g. `EDESTADDRREQ` when not connected).
    pub async fn send_zc(&self, buf: impl Into<SendBuf>) -> Result<usize> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send_zc(&fd, buf, t).map(Some))?;
        sent_result(op.next().await)
    }
}

/// What a datagram receive's event means to the caller.
fn datagram_result(event: Event) -> Result<Datagram> {
    match event {
        Event::Datagram(d) => Ok(d),
        Event::Error(e) => Err(e),
        // A socket shut down for reading receives nothing more.
        Event::Eof => Err(Error::from_errno("recvmsg", libc::ESHUTDOWN)),
        other => unreachable!("recvmsg: {other:?}"),
    }
}

fn sent_result(event: Event) -> Result<usize> {
    match event {
        Event::Sent { result, .. } => result,
        Event::Error(e) => Err(e),
        other => unreachable!("send: {other:?}"),
    }
}

/// The datagrams of a multishot receive ([`UdpSocket::recv_stream`]).
pub struct DatagramStream(MultishotEvents);

impl DatagramStream {
    /// The next datagram; `None` once the stream has ended (after its error was returned, or
    /// when the socket was shut down for reading).
    ///
    /// # Errors
    /// The receive error; the stream has ended then.
    pub async fn next(&mut self) -> Result<Option<Datagram>> {
        self.0.next(datagram_of).await
    }

    /// A datagram already received, without waiting (`None` if there is none now).
    ///
    /// # Errors
    /// As [`DatagramStream::next`].
    pub fn try_next(&mut self) -> Result<Option<Datagram>> {
        self.0.try_next(datagram_of)
    }
}

/// The datagram a multishot receive's event carries.
fn datagram_of(event: Event) -> Option<Datagram> {
    match event {
        Event::Datagram(d) => Some(d),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_receive_at_end_of_stream_is_eshutdown() {
        // A socket shut down for reading receives nothing more: an error, not a datagram.
        let e = datagram_result(Event::Eof).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESHUTDOWN));
        assert!(matches!(
            datagram_result(Event::Error(Error::Cancelled)),
            Err(Error::Cancelled)
        ));
    }
}
