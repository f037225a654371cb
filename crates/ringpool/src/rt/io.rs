//! The copying path: [`Reader`] and [`Writer`], `futures-io`'s `AsyncRead`/`AsyncWrite` over a
//! [`TcpStream`] (pooled buffers copied into the caller's buffer, the caller's bytes copied
//! into a send), for code written against those traits. tokio's traits for the same types are
//! in `tokio_io.rs` (the `tokio` feature), sharing `poll_copy_out`, `poll_send` and `shutdown`.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use super::op::Op;
use super::tcp::{start_recv, TcpStream};
use crate::{BufGroup, Event, RecvMode};

/// [`futures_io::AsyncRead`] over a [`TcpStream`]: receives into pooled buffers of `group` and
/// copies out of them (the copying path, for code that needs the trait; [`TcpStream::recv`]
/// hands out the buffers themselves). Made by [`TcpStream::reader`]; with the `tokio` feature
/// it is `tokio::io::AsyncRead` as well.
pub struct Reader<'a> {
    stream: &'a TcpStream,
    group: BufGroup,
    /// Received bytes not yet read: the chain's bytes, and how far into them.
    pending: Option<(Vec<u8>, usize)>,
    op: Option<Op>,
}

impl Reader<'_> {
    /// A reader of `stream` receiving into `group` ([`TcpStream::reader`]).
    pub(super) fn new(stream: &TcpStream, group: BufGroup) -> Reader<'_> {
        Reader {
            stream,
            group,
            pending: None,
            op: None,
        }
    }

    /// The read shared by the `futures-io` and tokio impls: waits for received bytes (unless
    /// some are left from the last receive), hands at most `room` of them to `put` (which
    /// copies them into the caller's buffer) and returns how many; 0 at end of stream.
    pub(super) fn poll_copy_out(
        &mut self,
        cx: &mut Context<'_>,
        room: usize,
        put: impl FnOnce(&[u8]),
    ) -> Poll<std::io::Result<usize>> {
        loop {
            if let Some((bytes, at)) = &mut self.pending {
                let n = room.min(bytes.len() - *at);
                put(&bytes[*at..*at + n]);
                *at += n;
                if *at == bytes.len() {
                    self.pending = None;
                }
                return Poll::Ready(Ok(n));
            }
            let leftover = self.stream.leftovers.pop();
            let event = match leftover {
                Some(e) => e,
                None => match ready!(self.poll_recv(cx))? {
                    Some(e) => e,
                    None => continue, // leftovers came: handed out at the top of the loop
                },
            };
            match event {
                // Copied out at once, so the buffers go home now.
                Event::Data(chain) => self.pending = Some((chain.to_vec(), 0)),
                Event::Eof => return Poll::Ready(Ok(0)),
                Event::Error(e) => return Poll::Ready(Err(e.into())),
                other => unreachable!("recv: {other:?}"),
            }
        }
    }

    /// The next event of the reader's receive, started first if none is in flight; `None`
    /// when the stream has leftovers to hand out first instead.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Option<Event>>> {
        if self.op.is_none() {
            // Never two receives on one socket: wait for a dropped one to end.
            if self.stream.leftovers.poll_quiet(cx).is_pending() {
                return Poll::Pending;
            }
            if !self.stream.leftovers.is_empty() {
                return Poll::Ready(Ok(None));
            }
            let op = start_recv(
                &self.stream.fd,
                &self.group,
                RecvMode::Bundle,
                &self.stream.leftovers,
            )?;
            self.op = Some(op);
        }
        let op = self.op.as_ref().expect("started above");
        let event = ready!(op.poll_with(cx, &self.stream.leftovers));
        self.op = None;
        Poll::Ready(Ok(Some(event)))
    }
}

impl futures_io::AsyncRead for Reader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_copy_out(cx, out.len(), |bytes| {
            out[..bytes.len()].copy_from_slice(bytes)
        })
    }
}

/// [`futures_io::AsyncWrite`] over a [`TcpStream`]: each write copies the caller's bytes and
/// sends them whole (the copying path; [`TcpStream::send_zc`] sends owned buffers without a
/// copy). Made by [`TcpStream::writer`]; with the `tokio` feature it is `tokio::io::AsyncWrite`
/// as well.
pub struct Writer<'a> {
    stream: &'a TcpStream,
    /// The send in flight and its length.
    op: Option<(Op, usize)>,
}

impl Writer<'_> {
    /// A writer of `stream` ([`TcpStream::writer`]).
    pub(super) fn new(stream: &TcpStream) -> Writer<'_> {
        Writer { stream, op: None }
    }

    /// The write shared by the `futures-io` and tokio impls: copies `buf` and sends it whole,
    /// or, while a send is in flight (an earlier call returned `Pending`), waits for that one.
    pub(super) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.op.is_none() {
            let fd = self.stream.fd.clone();
            let owned = buf.to_vec();
            let op = Op::start(|d, t| d.send(&fd, owned, t).map(Some))?;
            self.op = Some((op, buf.len()));
        }
        let (op, len) = self.op.as_ref().expect("started above");
        let len = *len;
        match op.poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(event) => {
                self.op = None;
                match event {
                    Event::Sent { result, .. } => {
                        Poll::Ready(result.map(|_| len).map_err(Into::into))
                    }
                    Event::Error(e) => Poll::Ready(Err(e.into())),
                    other => unreachable!("send: {other:?}"),
                }
            }
        }
    }

    /// Shuts the socket down for writing (the peer reads end of stream); shared by
    /// `poll_close` and tokio's `poll_shutdown`.
    pub(super) fn shutdown(&self) -> std::io::Result<()> {
        self.stream.shutdown_write().map_err(Into::into)
    }
}

impl futures_io::AsyncWrite for Writer<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_send(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Each write completed only once its bytes were handed to the kernel.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.shutdown())
    }
}
