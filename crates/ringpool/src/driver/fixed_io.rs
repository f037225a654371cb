//! Reads and writes on a [`FixedBuf`]: `READ/WRITE_FIXED` on registered memory, the vectored
//! `READV/WRITEV_FIXED` (6.15), and the plain opcodes on the same memory where the buffer is
//! not in this ring's table or the kernel lacks the vectored forms. The buffer comes back in
//! `Event::FixedIo`.

use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::fixed::FixedBuf;
use crate::probe::Ladder;

use super::op::{errno_error, OpId, OpKind};
use super::submit::OpCqe;
use super::{Completion, Driver, Event, Fd};

/// A read or write on registered memory. Boxed, so the iovecs the kernel reads stay put.
pub(super) struct FixedOp {
    pub(super) fd: Fd,
    buf: Option<FixedBuf>,
    write: bool,
    /// One range: `READ/WRITE(_FIXED)`; several: the vectored forms.
    iov: SmallVec<[libc::iovec; 1]>,
    vectored: bool,
    offset: u64,
}

impl FixedOp {
    /// The fixed opcode where the buffer is in this ring's table (`table`: its id), the plain
    /// one on the same memory otherwise; vectored forms for several ranges.
    pub(super) fn sqe(&self, ladder: &Ladder, table: Option<usize>) -> squeue::Entry {
        let fd = types::Fd(self.fd.as_raw_fd());
        let slot = self.buf.as_ref().and_then(|b| b.slot_in(table));
        let (iov, n) = (self.iov.as_ptr(), self.iov.len() as u32);
        let (ptr, len) = (
            self.iov[0].iov_base.cast::<u8>(),
            self.iov[0].iov_len as u32,
        );
        let offset = self.offset;
        match (self.vectored, slot, self.write) {
            (false, Some(i), false) => opcode::ReadFixed::new(fd, ptr, len, i)
                .offset(offset)
                .build(),
            (false, Some(i), true) => opcode::WriteFixed::new(fd, ptr, len, i)
                .offset(offset)
                .build(),
            (false, None, false) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
            (false, None, true) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
            (true, Some(i), false) if ladder.vectored_fixed => {
                opcode::ReadvFixed::new(fd, iov, n, i)
                    .offset(offset)
                    .build()
            }
            (true, Some(i), true) if ladder.vectored_fixed => {
                opcode::WritevFixed::new(fd, iov, n, i)
                    .offset(offset)
                    .build()
            }
            (true, _, false) => opcode::Readv::new(fd, iov, n).offset(offset).build(),
            (true, _, true) => opcode::Writev::new(fd, iov, n).offset(offset).build(),
        }
    }
}

impl Driver {
    /// Reads from `fd` at `offset` (`u64::MAX`: the file position) into `buf[range]`, with
    /// `READ_FIXED` on registered memory (plain `READ` otherwise). One completion,
    /// [`Event::FixedIo`], that gives `buf` back. `O_DIRECT` files need the range and offset
    /// aligned to the device's block size (`buf` itself is page aligned).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a range outside `buf` (the buffer is dropped).
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// let mut driver = Driver::new(Default::default())?;
    /// let file = std::fs::File::open("/proc/self/cmdline").unwrap();
    /// let buf = driver.fixed_buf_or_plain(4096)?;
    /// driver.read_fixed(&Fd::from(std::os::fd::OwnedFd::from(file)), buf, 0..4096, 0, 7)?;
    /// driver.wait(None)?;
    /// let Event::FixedIo { buf, result } = driver.pop().unwrap().event else { panic!() };
    /// assert!(result? > 0 && buf[0] != 0);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    ///
    /// [`Event::FixedIo`]: crate::Event::FixedIo
    pub fn read_fixed(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, &[range], false, false, offset, token)
    }

    /// Writes `buf[range]` to `fd` at `offset` (`u64::MAX`: the file position), with
    /// `WRITE_FIXED` on registered memory. One completion, [`Event::FixedIo`]. See
    /// [`Driver::read_fixed`].
    ///
    /// [`Event::FixedIo`]: crate::Event::FixedIo
    pub fn write_fixed(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, &[range], true, false, offset, token)
    }

    /// Reads from `fd` at `offset` into the `ranges` of `buf`, in order, in one op:
    /// `READV_FIXED` (6.15+), or `READV` on the same memory where that is missing. One
    /// completion, [`Event::FixedIo`], with the total bytes.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// let mut driver = Driver::new(Default::default())?;
    /// let file = std::fs::File::open("/proc/self/cmdline").unwrap();
    /// let buf = driver.fixed_buf_or_plain(8192)?;
    /// let fd = Fd::from(std::os::fd::OwnedFd::from(file));
    /// driver.read_fixed_vectored(&fd, buf, &[4096..4098, 0..4], 0, 7)?;
    /// driver.wait(None)?;
    /// let Event::FixedIo { result, .. } = driver.pop().unwrap().event else { panic!() };
    /// assert!(result? > 0);
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    ///
    /// [`Event::FixedIo`]: crate::Event::FixedIo
    pub fn read_fixed_vectored(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        ranges: &[std::ops::Range<usize>],
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, ranges, false, true, offset, token)
    }

    /// Writes the `ranges` of `buf`, in order, to `fd` at `offset` in one op: `WRITEV_FIXED`
    /// (6.15+), or `WRITEV` on the same memory. See [`Driver::read_fixed_vectored`].
    pub fn write_fixed_vectored(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        ranges: &[std::ops::Range<usize>],
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        self.start_fixed(fd, buf, ranges, true, true, offset, token)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_fixed(
        &mut self,
        fd: &Fd,
        buf: FixedBuf,
        ranges: &[std::ops::Range<usize>],
        write: bool,
        vectored: bool,
        offset: u64,
        token: u64,
    ) -> Result<OpId> {
        if ranges.is_empty() || ranges.len() > libc::UIO_MAXIOV as usize {
            return Err(Error::InvalidArgument {
                what: "between 1 and 1024 ranges per vectored op",
            });
        }
        if ranges.iter().any(|r| r.start > r.end || r.end > buf.len()) {
            return Err(Error::InvalidArgument {
                what: "a range outside the registered buffer",
            });
        }
        let base = buf.as_ptr();
        let iov = ranges
            .iter()
            .map(|r| libc::iovec {
                // Pointer arithmetic only; the range was checked to lie inside `buf`.
                iov_base: base.wrapping_add(r.start).cast(),
                iov_len: r.len(),
            })
            .collect();
        let kind = OpKind::Fixed(Box::new(FixedOp {
            fd: fd.clone(),
            buf: Some(buf),
            write,
            iov,
            vectored,
            offset,
        }));
        Ok(self.start(kind, token))
    }

    /// The CQE of a read or write on registered memory: the buffer goes back to the user.
    pub(super) fn complete_fixed_io(&mut self, c: OpCqe) {
        let OpKind::Fixed(op) = &mut self.ops[c.key].kind else {
            unreachable!("complete_fixed_io on a fixed read or write")
        };
        let (write, buf) = (
            op.write,
            op.buf.take().expect("an op in flight owns its buffer"),
        );
        self.ops.remove(c.key);
        let res = c.res;
        let result = if res >= 0 {
            Ok(res as usize)
        } else if res == -libc::ECANCELED {
            Err(Error::Cancelled)
        } else {
            Err(errno_error(if write { "write" } else { "read" }, res))
        };
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event: Event::FixedIo { buf, result },
            more: false,
        });
    }
}
