//! tokio's `AsyncRead`/`AsyncWrite` for [`Reader`]/[`Writer`] (the `tokio` feature): the same
//! copying path as their `futures-io` impls, sharing their code. They run on [`rt`](super)'s
//! runtime (`rt::block_on`, `rt::spawn`), not on tokio's.

use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Reader, Writer};

/// Receives into pooled buffers of the reader's group and copies out of them into the caller's
/// [`ReadBuf`](tokio::io::ReadBuf) (the copying path; [`TcpStream::recv`](super::TcpStream::recv)
/// hands out the buffers themselves). Nothing filled means end of stream.
///
/// # Examples
/// ```
/// use std::io::Write;
/// use ringpool::rt::{self, TcpStream};
/// use tokio::io::AsyncReadExt;
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
/// let ours = TcpStream::from_fd(ringpool::Fd::from(listener.accept().unwrap().0));
/// peer.write_all(b"hello").unwrap();
/// drop(peer);
/// rt::block_on(async {
///     let group = rt::buf_group(ringpool::BufGroupConfig::new(4096, 8))?;
///     let mut all = String::new();
///     ours.reader(group).read_to_string(&mut all).await?;
///     assert_eq!(all, "hello");
///     Ok::<(), std::io::Error>(())
/// })??;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl tokio::io::AsyncRead for Reader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let room = buf.remaining();
        self.poll_copy_out(cx, room, |bytes| buf.put_slice(bytes))
            .map_ok(drop)
    }
}

/// Copies the caller's bytes and sends them whole (the copying path;
/// [`TcpStream::send_zc`](super::TcpStream::send_zc) sends owned buffers without a copy). A write
/// completes once its bytes are handed to the kernel, so flushing has nothing to wait for;
/// shutting down shuts the socket down for writing, and the peer reads end of stream.
///
/// # Examples
/// ```
/// use std::io::Read;
/// use ringpool::rt::{self, TcpStream};
/// use tokio::io::AsyncWriteExt;
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
/// let ours = TcpStream::from_fd(ringpool::Fd::from(listener.accept().unwrap().0));
/// rt::block_on(async {
///     let mut w = ours.writer();
///     w.write_all(b"hello").await?;
///     w.shutdown().await
/// })??;
/// let mut all = String::new();
/// peer.read_to_string(&mut all)?; // ends: the writer shut the socket down
/// assert_eq!(all, "hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl tokio::io::AsyncWrite for Writer<'_> {
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

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.shutdown())
    }
}
