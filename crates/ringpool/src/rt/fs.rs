//! Files: [`File`], read and written through registered memory (a [`FixedBuf`](crate::FixedBuf)
//! taken by each op and given back with its result). Registered memory itself comes from
//! [`fixed_buf`](super::fixed_buf).

use super::op::Op;
use crate::{Error, Event, Fd, Result};

/// A file, read and written through registered memory ([`FixedBuf`](crate::FixedBuf): page
/// aligned, so `O_DIRECT` files work too). Each op takes the buffer and gives it back with the
/// result; dropping the future cancels the op, and the buffer is then freed by the runtime once
/// the kernel is done with it.
pub struct File {
    pub(super) fd: Fd,
}

impl File {
    /// Wraps an open file.
    ///
    /// # Examples
    /// ```
    /// ringpool::rt::block_on(async {
    ///     let file = ringpool::rt::File::from(std::fs::File::open("Cargo.toml").unwrap());
    ///     let buf = ringpool::rt::fixed_buf(4096)?;
    ///     let (buf, n) = file.read_fixed(buf, 0..4096, 0).await;
    ///     assert!(n? > 0 && buf.starts_with(b"["));
    ///     Ok::<(), ringpool::Error>(())
    /// })??;
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn from_fd(fd: Fd) -> File {
        File { fd }
    }

    /// Reads into `buf[range]` at `offset`; gives the buffer back with the bytes read.
    pub async fn read_fixed(
        &self,
        buf: crate::FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> (crate::FixedBuf, Result<usize>) {
        self.fixed_io(buf, range, offset, false).await
    }

    /// Writes `buf[range]` at `offset`; gives the buffer back with the bytes written.
    pub async fn write_fixed(
        &self,
        buf: crate::FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> (crate::FixedBuf, Result<usize>) {
        self.fixed_io(buf, range, offset, true).await
    }

    async fn fixed_io(
        &self,
        buf: crate::FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
        write: bool,
    ) -> (crate::FixedBuf, Result<usize>) {
        // A range outside the buffer is refused before the buffer is handed over.
        if range.start > range.end || range.end > buf.len() {
            let err = Error::InvalidArgument {
                what: "a range outside the registered buffer",
            };
            return (buf, Err(err));
        }
        let fd = self.fd.clone();
        let op = Op::start(|d, t| {
            if write {
                d.write_fixed(&fd, buf, range, offset, t).map(Some)
            } else {
                d.read_fixed(&fd, buf, range, offset, t).map(Some)
            }
        })
        .expect("the range was checked above, the only way these ops fail to start");
        match op.next().await {
            Event::FixedIo { buf, result } => (buf, result),
            other => unreachable!("fixed I/O: {other:?}"),
        }
    }
}

impl From<std::fs::File> for File {
    fn from(f: std::fs::File) -> File {
        File::from_fd(Fd::from(std::os::fd::OwnedFd::from(f)))
    }
}
