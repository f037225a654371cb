//! Sockets: multishot accept and connect.

use super::*;

impl Driver {
    /// Accepts connections on `listener` until cancelled: one [`Event::Accepted`] each
    /// (multishot accept, 5.19; re-armed single accepts where missing).
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
    pub fn connect(&mut self, fd: &Fd, addr: std::net::SocketAddr, token: u64) -> Result<OpId> {
        let kind = OpKind::Connect {
            fd: fd.clone(),
            addr: Box::new(sockaddr(addr)),
        };
        Ok(self.start(kind, token))
    }
}

/// Completions.
impl Driver {
    /// An accept completed: a new connection (the multishot accept stays armed), or an error.
    pub(super) fn complete_accept(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            cancelled,
            res,
            more,
            ..
        } = done;
        let keep = !cancelled && (more || res >= 0 || res == -libc::ECONNABORTED);
        let event = if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor that we now own.
            Event::Accepted(Fd::from(unsafe { OwnedFd::from_raw_fd(res) }))
        } else {
            Event::Error(errno_error("accept", res))
        };
        self.ready.push_back(Completion {
            token,
            op: id,
            event,
            more: keep,
        });
        if keep && !more {
            self.arm(key);
        } else if !keep && !more {
            self.ops.remove(key);
        }
    }

    /// A connect completed.
    pub(super) fn complete_connect(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            res,
            ..
        } = done;
        let event = if res == 0 {
            Event::Connected
        } else {
            Event::Error(errno_error("connect", res))
        };
        self.ops.remove(key);
        self.ready.push_back(Completion {
            token,
            op: id,
            event,
            more: false,
        });
    }
}

/// A (multishot where the kernel has it) accept.
pub(super) fn accept_sqe(kind: &mut OpKind, ladder: Ladder) -> squeue::Entry {
    let OpKind::Accept { fd } = kind else {
        unreachable!("routed here by its kind");
    };

    let fd = types::Fd(fd.as_raw_fd());
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

/// A connect to the address the op owns.
pub(super) fn connect_sqe(kind: &mut OpKind) -> squeue::Entry {
    let OpKind::Connect { fd, addr } = kind else {
        unreachable!("routed here by its kind");
    };

    let ptr: *const libc::sockaddr = (&addr.0 as *const libc::sockaddr_storage).cast();
    opcode::Connect::new(types::Fd(fd.as_raw_fd()), ptr, addr.1).build()
}
