//! `ringpool::rt`: a small single-threaded async runtime over one [`Driver`] (one ring per
//! thread; [`launch`] starts one per core): [`block_on`], [`spawn`], timers ([`sleep`], [`timeout`]), and futures for TCP
//! ([`TcpListener`], [`TcpStream`]) whose receives hand out pooled buffers and whose sends go
//! through the zero-copy policy.
//!
//! **Dropping a future cancels its op** under the driver's ownership rule: the cancel is asked
//! for at once and the driver keeps every byte the kernel may touch until the op's final
//! completion. A receive the kernel completed before the cancel landed did take data off the
//! socket: that data is kept for the stream's next receive, so cancelling never loses bytes. Nothing is
//! ever awaited on another thread: futures and the runtime are `!Send`, one runtime per thread.
//!
//! Files go through registered memory ([`File`], [`fixed_buf`]). This is the core of the async
//! layer; [`TcpStream::reader`]/[`TcpStream::writer`] give `futures-io`'s `AsyncRead`/`AsyncWrite`
//! and, with the crate's `tokio` feature, tokio's `AsyncRead`/`AsyncWrite` too: the copying path
//! (pooled buffers → the caller's buffer), for code written against those traits. They run on
//! this runtime, not on tokio's. [`UdpSocket`] receives datagrams into pooled buffers (multishot
//! `RECVMSG`).
//!
//! ```
//! use ringpool::rt::{self, TcpListener, TcpStream};
//! use ringpool::BufGroupConfig;
//!
//! rt::block_on(async {
//!     let group = rt::buf_group(BufGroupConfig::new(4096, 64))?;
//!     let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap())?;
//!     let addr = listener.local_addr()?;
//!     let server = rt::spawn(async move {
//!         let stream = listener.accept().await?;
//!         while let Some(chain) = stream.recv(&group).await? {
//!             stream.send_zc(chain).await?; // echo the buffers back, no copy
//!         }
//!         Ok::<(), ringpool::Error>(())
//!     });
//!     let client = TcpStream::connect(addr).await?;
//!     client.write_all(b"ping".to_vec()).await?;
//!     let group2 = rt::buf_group(BufGroupConfig::new(4096, 8))?;
//!     let echoed = client.recv(&group2).await?.unwrap();
//!     assert_eq!(echoed.to_vec(), b"ping");
//!     drop(client);
//!     server.await?;
//!     Ok::<(), ringpool::Error>(())
//! })?;
//! # Ok::<(), ringpool::Error>(())
//! ```
//!
//! # Ownership
//!
//! - Every op a future starts gets a token (unique in the process) in its runtime's op table;
//!   the runtime routes each completion to its token and wakes the future waiting for it.
//! - From the op's start to its final completion the driver owns what the kernel may touch:
//!   the bytes being sent, the buffer being read into, the descriptor. A dropped future asks
//!   for a cancel and leaves all of it with the driver. What the caller handed over comes
//!   back in the result ([`File::read_fixed`] gives its buffer back, even on error).
//! - A dropped receive of a stream ([`TcpStream`], [`UdpSocket`], the [`Reader`]) is still
//!   routed: what the kernel had taken off the socket before the cancel landed becomes the
//!   stream's leftovers, handed out first by its next receive, and a new receive waits until
//!   no dropped one is in the kernel (two armed receives could hand out bytes out of order).
//!   Other ops' late completions are dropped (received buffers go home).
//! - A runtime that ends drops its tasks (their ops cancel), then cancels the ops whose
//!   holders outlive it (returned out of [`block_on`]) and collects their final completions:
//!   what a stream's receive took goes to the stream's leftovers. Those ops (a receive
//!   future or a [`RecvStream`] returned out of `block_on`) and [`LeaseGroup`]s touch
//!   only the runtime that started them: dropped in a later runtime they do nothing there;
//!   awaited there they end with [`Error::RuntimeGone`](crate::Error::RuntimeGone), after the
//!   stream's leftovers ([`LeaseGroup::returned`] panics: the buffer went with that driver).
//! - A waker called on another thread wakes the runtime's thread even while it sleeps in the
//!   kernel (the driver's eventfd).

// The layout, by capability:
//   executor.rs   Runtime (driver, op table, tasks, timers), block_on and its loop, spawn,
//                 JoinHandle, wakers that work from any thread, launch (a runtime per core)
//   op.rs         the op guard: OpState, EventQueue, the leftovers of dropped receives,
//                 routing, tokens, the runtime's end (shutdown), Op and its Drop
//   multishot.rs  the events of a multishot receive (RecvStream, DatagramStream share it)
//   time.rs       sleep, timeout, the Timers they and the loop share
//   tcp.rs        TcpListener, TcpStream, RecvStream
//   io.rs         Reader, Writer: futures-io's traits; tokio_io.rs: tokio's, beside it
//   udp.rs        UdpSocket, DatagramStream
//   fs.rs         File
//   lease.rs      lease, lease_group, LeaseSource, LeaseMember, LeaseGroup
//   testing.rs    what the unit tests share (a counting waker)

use crate::{BufGroup, BufGroupConfig, Driver, Result};

mod executor;
mod fs;
mod io;
mod lease;
mod multishot;
mod op;
mod tcp;
#[cfg(test)]
mod testing;
mod time;
#[cfg(feature = "tokio")]
mod tokio_io;
mod udp;

pub use executor::{block_on, block_on_with, launch, spawn, JoinHandle};
pub use fs::File;
pub use io::{Reader, Writer};
pub use lease::{lease, lease_group, LeaseGroup, LeaseMember, LeaseSource};
pub use tcp::{Received, RecvStream, TcpListener, TcpStream, ZcrxStream};
pub use time::{sleep, timeout};
pub use udp::{DatagramStream, UdpSocket};

use executor::runtime;

/// Runs `f` with this thread's driver (for its statistics, or the [`Driver`]-level API). Do
/// not await inside: the driver is borrowed for the call.
///
/// # Examples
/// ```
/// ringpool::rt::block_on(async {
///     let enters = ringpool::rt::with_driver(|d| d.stats().enters);
///     println!("{enters} io_uring_enter calls so far");
/// })?;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub fn with_driver<T>(f: impl FnOnce(&mut Driver) -> T) -> T {
    f(&mut runtime().driver.borrow_mut())
}

/// A buffer group on this thread's driver.
///
/// # Errors
/// As [`Driver::buf_group`].
pub fn buf_group(cfg: BufGroupConfig) -> Result<BufGroup> {
    runtime().driver.borrow_mut().buf_group(cfg)
}

/// A zero-copy receive area on this thread's driver, for [`TcpStream::recv_zc_stream`]. The
/// runtime must have been started with a ring set up for it
/// ([`block_on_with`]`(DriverConfig::default().zero_copy_receive(true), ..)`).
///
/// # Errors
/// As [`Driver::zcrx_area`].
///
/// # Examples
/// ```no_run
/// use ringpool::{DriverConfig, ZcrxConfig};
/// ringpool::rt::block_on_with(DriverConfig::default().zero_copy_receive(true), async {
///     let area = ringpool::rt::zcrx_area(ZcrxConfig::device_less(16 << 20))?;
///     println!("{:?}", area.stats());
///     Ok::<(), ringpool::Error>(())
/// })??;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub fn zcrx_area(cfg: crate::ZcrxConfig) -> Result<crate::ZcrxArea> {
    runtime().driver.borrow_mut().zcrx_area(cfg)
}

/// Registered memory on this thread's driver (plain memory where it cannot be registered:
/// [`Driver::fixed_buf_or_plain`]).
///
/// # Errors
/// As [`Driver::fixed_buf_or_plain`].
pub fn fixed_buf(len: usize) -> Result<crate::FixedBuf> {
    runtime().driver.borrow_mut().fixed_buf_or_plain(len)
}
