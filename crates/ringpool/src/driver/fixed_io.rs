//! File I/O on registered memory: `READ_FIXED`/`WRITE_FIXED` and their vectored forms.

use super::*;

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
    pub(super) fn start_fixed(
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
}

/// Completions.
impl Driver {
    /// A read or write on registered memory completed: the buffer goes back to the user with the result.
    pub(super) fn complete_fixed_io(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            res,
            ..
        } = done;
        let OpKind::Fixed(op) = &mut self.ops[key].kind else {
            unreachable!("routed here by its kind");
        };
        let (write, buf) = (
            op.write,
            op.buf.take().expect("an op in flight owns its buffer"),
        );
        self.ops.remove(key);
        let result = if res >= 0 {
            Ok(res as usize)
        } else if res == -libc::ECANCELED {
            Err(Error::Cancelled)
        } else {
            Err(errno_error(if write { "write" } else { "read" }, res))
        };
        self.ready.push_back(Completion {
            token,
            op: id,
            event: Event::FixedIo { buf, result },
            more: false,
        });
    }
}

/// A read or write on registered memory: fixed where the buffer is in this ring's table, vectored fixed where the kernel has it, plain otherwise.
pub(super) fn fixed_io_sqe(
    kind: &mut OpKind,
    ladder: Ladder,
    table: Option<usize>,
) -> squeue::Entry {
    let OpKind::Fixed(op) = kind else {
        unreachable!("routed here by its kind");
    };

    let fd = types::Fd(op.fd.as_raw_fd());
    let slot = op.buf.as_ref().and_then(|b| b.slot_in(table));
    let (iov, n) = (op.iov.as_ptr(), op.iov.len() as u32);
    let (ptr, len) = (op.iov[0].iov_base.cast::<u8>(), op.iov[0].iov_len as u32);
    match (op.vectored, slot, op.write) {
        (false, Some(i), false) => opcode::ReadFixed::new(fd, ptr, len, i)
            .offset(op.offset)
            .build(),
        (false, Some(i), true) => opcode::WriteFixed::new(fd, ptr, len, i)
            .offset(op.offset)
            .build(),
        (false, None, false) => opcode::Read::new(fd, ptr, len).offset(op.offset).build(),
        (false, None, true) => opcode::Write::new(fd, ptr, len).offset(op.offset).build(),
        (true, Some(i), false) if ladder.vectored_fixed => opcode::ReadvFixed::new(fd, iov, n, i)
            .offset(op.offset)
            .build(),
        (true, Some(i), true) if ladder.vectored_fixed => opcode::WritevFixed::new(fd, iov, n, i)
            .offset(op.offset)
            .build(),
        (true, _, false) => opcode::Readv::new(fd, iov, n).offset(op.offset).build(),
        (true, _, true) => opcode::Writev::new(fd, iov, n).offset(op.offset).build(),
    }
}
