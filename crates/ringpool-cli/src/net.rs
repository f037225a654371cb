//! Socket options the servers set.

use std::os::fd::AsRawFd;

fn set_int_opt(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt reads `value` (a valid c_int) for the given length; fd is a live socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Disables Nagle's algorithm: replies go out at once.
pub fn set_nodelay(fd: &impl AsRawFd) {
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
}

/// SO_LINGER with a zero timeout: closing the socket sends RST instead of FIN.
pub fn set_reset_on_close(fd: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid `linger` of the given size; fd is a live socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Raises the listen backlog of a bound listener (std uses 128; thousands of clients connecting
/// at once need more).
pub fn set_backlog(listener: &std::net::TcpListener, backlog: libc::c_int) -> std::io::Result<()> {
    // SAFETY: listen on a bound socket we own; calling it again only changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
