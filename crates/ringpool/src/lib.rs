//! # ringpool
//!
//! io_uring's buffer system for zero-copy I/O, safely, on the real kernel.
//!
//! The kernel writes into memory we hand it long after the call that handed it over returned.
//! ringpool's whole job is to make that safe and fast:
//!
//! - **Automatic buffer selection** ([`BufGroup`]): the kernel picks a buffer from a shared group
//!   when data arrives, so ten thousand idle sockets hold no buffers. Provided buffer rings
//!   (5.19+), incremental rings (6.12+), or legacy `PROVIDE_BUFFERS` groups on older kernels.
//!   A dry group (`-ENOBUFS`) is backpressure: the receive pauses and resumes by itself.
//! - **Ownership**: the [`Driver`] owns every byte the kernel may touch until the op's final
//!   completion, whatever the user does (cancel, drop, close).
//!
//! ```
//! use ringpool::{BufGroupConfig, Driver, Event, Fd, RecvMode};
//! use std::io::Write;
//!
//! let mut driver = Driver::new(Default::default())?;
//! let group = driver.buf_group(BufGroupConfig::new(4096, 64))?;
//! let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
//! let sock = Fd::from(std::os::fd::OwnedFd::from(a));
//! driver.recv(&sock, &group, RecvMode::Multishot, 1)?;
//! b.write_all(b"ping").unwrap();
//! drop(b);
//! let mut received = Vec::new();
//! 'outer: loop {
//!     driver.wait(None)?;
//!     while let Some(c) = driver.pop() {
//!         match c.event {
//!             Event::Data(chain) => received.extend(chain.to_vec()), // buffers go home on drop
//!             Event::Eof => break 'outer,
//!             other => panic!("{other:?}"),
//!         }
//!     }
//! }
//! assert_eq!(received, b"ping");
//! assert_eq!(group.stats().in_user, 0);
//! # Ok::<(), ringpool::Error>(())
//! ```
//!
//! See `docs/ARCHITECTURE.md` for the layers and the ownership rule.

#![warn(missing_docs)]

mod buf;
mod coalesce;
mod driver;
mod error;
mod fixed;
mod hash;
mod lease;
mod pages;
mod pool;
mod probe;
pub mod rt;
mod send_ring;
pub mod sys;
mod zc;
mod zcrx;

pub use buf::{BufChain, Datagram, PooledBuf, SendBuf};
pub use driver::{
    leaked_ops, Completion, Driver, DriverConfig, DriverStats, Event, Fd, OpId, RecvMode,
};
pub use error::{Error, Result};
pub use fixed::{FixedBuf, FixedStats, MAX_FIXED_LEN, MAX_FIXED_SLOTS};
pub use lease::{Lease, LeaseBacking, Member};
pub use pages::PipeStats;
pub use pool::{BufGroup, BufGroupConfig, GroupStats, Registration, MAX_BUF_SIZE};
pub use probe::{Features, Force, GroupRung, Ladder, MultishotRung, ZcRung, ZcrxProbe, ZcrxRung};
pub use send_ring::SendRing;
pub use sys::PageBacking;
pub use zcrx::{
    ZcrxArea, ZcrxBuf, ZcrxConfig, ZcrxRefusal, ZcrxSource, ZcrxStats, MAX_ZCRX_BUFFERS,
    ZCRX_BUF_SIZE,
};
/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub use zc::{
    ZcConfig, ZcMode, ZcStats, COPIED_STREAK, DEFAULT_THRESHOLD as ZC_DEFAULT_THRESHOLD, PLAIN_RUN,
};
