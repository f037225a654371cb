//! Sockets: accepts (multishot, 5.19, or single accepts re-armed) and connects.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{opcode, squeue, types};

use crate::error::Result;
use crate::probe::{Ladder, MultishotRung};

use super::op::{errno_error, OpId, OpKind};
use super::submit::OpCqe;
use super::udp::sockaddr;
use super::{Completion, Driver, Event, Fd};

/// An accept on `listener`: multishot where the ladder has it.
pub(super) fn accept_sqe(listener: &Fd, ladder: &Ladder) -> squeue::Entry {
    let fd = types::Fd(listener.as_raw_fd());
    match ladder.accept {
        MultishotRung::Kernel => opcode::AcceptMulti::new(fd)
            .flags(libc::SOCK_CLOEXEC)
            .build(),
        MultishotRung::Rearmed => {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
        }
    }
}

/// A connect of `fd` to `addr`.
pub(super) struct ConnectOp {
    pub(super) fd: Fd,
    /// Boxed: the kernel reads the address after the submit, while the table may grow.
    addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
}

impl ConnectOp {
    pub(super) fn sqe(&self) -> squeue::Entry {
        let addr = &self.addr;
        let ptr: *const libc::sockaddr = (&addr.0 as *const libc::sockaddr_storage).cast();
        opcode::Connect::new(types::Fd(self.fd.as_raw_fd()), ptr, addr.1).build()
    }
}

impl Driver {
    /// Accepts connections on `listener` until cancelled: one [`Event::Accepted`] each
    /// (multishot accept, 5.19; re-armed single accepts where missing).
    ///
    /// [`Event::Accepted`]: crate::Event::Accepted
    pub fn accept_multishot(&mut self, listener: &Fd, token: u64) -> Result<OpId> {
        Ok(self.start(
            OpKind::Accept {
                fd: listener.clone(),
            },
            token,
        ))
    }

    /// Connects the socket `fd` to `addr`; one completion: [`Event::Connected`] or
    /// [`Event::Error`].
    ///
    /// # Examples
    /// ```
    /// use ringpool::{Driver, Event, Fd};
    /// use std::os::fd::FromRawFd;
    /// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// let mut driver = Driver::new(Default::default())?;
    /// let sock = Fd::tcp_socket(listener.local_addr().unwrap())?;
    /// driver.connect(&sock, listener.local_addr().unwrap(), 1)?;
    /// driver.wait(None)?;
    /// assert!(matches!(driver.pop().unwrap().event, Event::Connected));
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    ///
    /// [`Event::Connected`]: crate::Event::Connected
    /// [`Event::Error`]: crate::Event::Error
    pub fn connect(&mut self, fd: &Fd, addr: std::net::SocketAddr, token: u64) -> Result<OpId> {
        let kind = OpKind::Connect(ConnectOp {
            fd: fd.clone(),
            addr: Box::new(sockaddr(addr)),
        });
        Ok(self.start(kind, token))
    }

    /// A CQE of an accept: a connection or an error. The op goes on while the kernel says
    /// more, and is re-armed after a connection (or an aborted one) on the single-shot rung.
    pub(super) fn complete_accept(&mut self, c: OpCqe) {
        let (res, more) = (c.res, c.more());
        let keep = !c.cancelled && (more || res >= 0 || res == -libc::ECONNABORTED);
        let event = if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor that we now own.
            Event::Accepted(Fd::from(unsafe { OwnedFd::from_raw_fd(res) }))
        } else {
            Event::Error(errno_error("accept", res))
        };
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event,
            more: keep,
        });
        if keep && !more {
            self.arm(c.key);
        } else if !keep && !more {
            self.ops.remove(c.key);
        }
    }

    /// The CQE of a connect.
    pub(super) fn complete_connect(&mut self, c: OpCqe) {
        let event = if c.res == 0 {
            Event::Connected
        } else {
            Event::Error(errno_error("connect", c.res))
        };
        self.ops.remove(c.key);
        self.ready.push_back(Completion {
            token: c.token,
            op: c.id,
            event,
            more: false,
        });
    }
}
