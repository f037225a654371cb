//! Datagram receives: `RECVMSG` selecting one buffer per datagram (multishot, 6.0, or single
//! shots re-armed), the sender's address out of the kernel's header or the `msghdr`, empty
//! datagrams told from the end; and socket addresses both ways (`sockaddr`, for `rt` too).

use std::os::fd::AsRawFd;
use std::rc::Rc;

use io_uring::{cqueue, opcode, squeue, types};

use crate::buf::{Datagram, PooledBuf};
use crate::error::{Error, Result};
use crate::pool::{BufGroup, GroupShared};
use crate::probe::{Ladder, MultishotRung};
use crate::sys;

use super::group::is_incremental;
use super::op::{OpId, OpKind};
use super::recv::RecvMode;
use super::submit::OpCqe;
use super::{Driver, Event, Fd};

/// What a datagram receive hands the kernel: the `msghdr` (and the iovec and address storage it
/// points to). Boxed, so the pointers stay valid while the op table grows; the kernel reads it
/// when the SQE is issued and (single-shot receives) writes the sender's address and flags back.
pub(super) struct MsgHeader {
    msg: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
}

/// Room a datagram receive needs in front of the payload: the kernel's `io_uring_recvmsg_out`
/// header and the sender's address (sized for IPv6, which also holds IPv4). Single-shot
/// receives put nothing there but leave the same room, so a group carries the same payload
/// size on every rung.
pub(crate) const DATAGRAM_HEADROOM: usize =
    sys::RECVMSG_OUT_LEN + std::mem::size_of::<libc::sockaddr_in6>();

impl MsgHeader {
    fn new() -> Box<MsgHeader> {
        // SAFETY: msghdr, iovec and sockaddr_storage are plain old data; all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }

    /// The sender's address a single-shot receive wrote back (`msg_namelen` bytes of it).
    fn name_bytes(&self) -> &[u8] {
        let len =
            (self.msg.msg_namelen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: `name` is plain bytes we own, at least `len` long; the single-shot receive
        // that wrote them has completed, and the next one is not armed while this borrow lives.
        unsafe { std::slice::from_raw_parts((&raw const self.name).cast::<u8>(), len) }
    }

    /// Points the header at its own iovec and address storage, for a receive of at most
    /// `payload` bytes (the kernel overwrites the lengths and flags of single-shot receives).
    fn reset(&mut self, payload: usize) {
        self.iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: payload,
        };
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_name = (&raw mut self.name).cast();
        self.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        self.msg.msg_control = std::ptr::null_mut();
        self.msg.msg_controllen = 0;
        self.msg.msg_flags = 0;
    }
}

/// Datagram receives on `fd` from `group`: the header the kernel reads (and, single-shot,
/// writes the sender's address into).
pub(super) struct RecvMsgOp {
    pub(super) fd: Fd,
    pub(super) group: Rc<GroupShared>,
    pub(super) multishot: bool,
    pub(super) hdr: Box<MsgHeader>,
}

impl RecvMsgOp {
    /// Multishot `RECVMSG` where the ladder has it, else a single one; both leave the same
    /// room for the payload.
    pub(super) fn sqe(&mut self, ladder: &Ladder) -> squeue::Entry {
        let fd = types::Fd(self.fd.as_raw_fd());
        let (group, hdr) = (&self.group, &mut self.hdr);
        if self.multishot && ladder.recv == MultishotRung::Kernel {
            // The kernel fits its header and the address into the selected buffer
            // itself, in front of at most `buf_size − DATAGRAM_HEADROOM` bytes.
            hdr.reset(group.buf_size as usize);
            opcode::RecvMsgMulti::new(fd, &hdr.msg, group.bgid).build()
        } else {
            // The same payload room as the multishot form, so no rung truncates more.
            hdr.reset(group.buf_size as usize - DATAGRAM_HEADROOM);
            opcode::RecvMsg::new(fd, &mut hdr.msg)
                .buf_group(group.bgid)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        }
    }

    /// Whether a completion of `res` with `flags` is an empty datagram. A single-shot receive
    /// of one consumes no buffer (the kernel recycles it) and returns 0, as it does on a socket
    /// shut down for reading; the sender's address, which only a datagram has, tells them
    /// apart.
    fn empty_datagram(&self, res: i32, flags: u32, kernel_multishot: bool) -> bool {
        res == 0
            && !kernel_multishot
            && cqueue::buffer_select(flags).is_none()
            && self.hdr.msg.msg_namelen > 0
    }
}

/// The datagram of a `RECVMSG` completion that used `res` bytes of buffer `bid`: the payload as a
/// pooled buffer (behind the kernel's header and the address, for multishot receives), the
/// sender, and whether it was cut short.
///
/// # Safety
/// The kernel must have written those bytes (their completion was reaped), and `bid` must not be
/// handed out elsewhere (the completion gave it to us).
unsafe fn take_datagram(
    group: &Rc<GroupShared>,
    bid: u16,
    res: u32,
    hdr: &MsgHeader,
    multishot: bool,
    scratch: &mut Vec<(u16, u32, u32)>,
) -> Datagram {
    scratch.clear();
    group.take(bid, res, false, scratch);
    debug_assert_eq!(scratch.len(), 1, "a datagram is one buffer");
    let (offset, len, from, truncated) = if multishot {
        // SAFETY: `res` bytes of buffer `bid` were written by the kernel (the caller's
        // contract), and no one else reads or writes them until the buffer goes home.
        let used = unsafe { std::slice::from_raw_parts(group.buf_ptr(bid), res as usize) };
        match types::RecvMsgOut::parse(used, &hdr.msg) {
            Ok(out) => {
                let offset = out.payload_data().as_ptr() as usize - used.as_ptr() as usize;
                let from = sockaddr_to_std(out.name_data());
                (
                    offset as u32,
                    out.payload_data().len() as u32,
                    from,
                    out.is_payload_truncated(),
                )
            }
            // Shorter than the header the kernel always writes: nothing to hand out.
            Err(()) => (0, 0, None, false),
        }
    } else {
        let truncated = hdr.msg.msg_flags & libc::MSG_TRUNC != 0;
        (0, res, sockaddr_to_std(hdr.name_bytes()), truncated)
    };
    // SAFETY: `offset + len <= res`, inside the buffer the kernel filled (the caller's contract);
    // `take` marked it as in user hands.
    let data = unsafe { PooledBuf::new(group.clone(), bid, offset, len) };
    Datagram {
        data,
        from,
        truncated,
    }
}

/// A socket address the kernel wrote (`sockaddr_in` or `sockaddr_in6` bytes), as std's type.
fn sockaddr_to_std(name: &[u8]) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    if name.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([name[0], name[1]]) as i32;
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match family {
        libc::AF_INET if name.len() >= std::mem::size_of::<libc::sockaddr_in>() => {
            let ip = Ipv4Addr::new(name[4], name[5], name[6], name[7]);
            Some(SocketAddrV4::new(ip, port(name)).into())
        }
        libc::AF_INET6 if name.len() >= std::mem::size_of::<libc::sockaddr_in6>() => {
            let flowinfo = u32::from_ne_bytes(name[4..8].try_into().expect("4 bytes"));
            let ip: [u8; 16] = name[8..24].try_into().expect("16 bytes");
            let scope = u32::from_ne_bytes(name[24..28].try_into().expect("4 bytes"));
            Some(SocketAddrV6::new(Ipv6Addr::from(ip), port(name), flowinfo, scope).into())
        }
        _ => None,
    }
}

/// A socket address in the form `sendmsg` takes.
pub(crate) fn sockaddr(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

impl Driver {
    /// Receives datagrams on `fd` (a UDP socket, bound or connected), each into one buffer the
    /// kernel selects from `group`: one [`Event::Datagram`] per datagram, with its sender.
    /// [`RecvMode::Multishot`] keeps receiving (multishot `RECVMSG`, 6.0; re-armed single
    /// receives where missing) until cancelled; [`RecvMode::Once`] takes one datagram. A dry
    /// group pauses the receive as for [`Driver::recv`] (datagrams wait in the socket's queue,
    /// where the kernel drops what overflows it, as it always does for UDP).
    ///
    /// A buffer carries at most `buf_size − 44` bytes of payload (the kernel puts a header and
    /// the sender's address in front of it); longer datagrams arrive `truncated`.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] for buffers without room for any payload;
    /// [`Error::InvalidArgument`] for bundle modes (a datagram is one buffer) or an incremental
    /// group.
    ///
    /// # Examples
    /// ```
    /// use ringpool::{BufGroupConfig, Driver, Event, Fd, RecvMode};
    /// let mut driver = Driver::new(Default::default())?;
    /// let group = driver.buf_group(BufGroupConfig::new(2048, 16))?;
    /// let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let addr = sock.local_addr().unwrap();
    /// let fd = Fd::from(std::os::fd::OwnedFd::from(sock));
    /// driver.recv_from(&fd, &group, RecvMode::Once, 1)?;
    /// let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// peer.send_to(b"ping", addr).unwrap();
    /// driver.wait(None)?;
    /// match driver.pop().unwrap().event {
    ///     Event::Datagram(d) => {
    ///         assert_eq!(&d.data[..], b"ping");
    ///         assert_eq!(d.from, Some(peer.local_addr().unwrap()));
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    ///
    /// [`Event::Datagram`]: crate::Event::Datagram
    pub fn recv_from(
        &mut self,
        fd: &Fd,
        group: &BufGroup,
        mode: RecvMode,
        token: u64,
    ) -> Result<OpId> {
        self.check_owner(group.shared.owner, "a buffer group")?;
        if mode.bundle() {
            return Err(Error::InvalidArgument {
                what: "a datagram receive takes one buffer per datagram: bundle modes do not apply",
            });
        }
        if is_incremental(&group.shared) {
            return Err(Error::InvalidArgument {
                what: "a datagram receive needs whole buffers: use a group that is not incremental",
            });
        }
        if group.shared.buf_size as usize <= DATAGRAM_HEADROOM {
            return Err(Error::BufferTooSmall {
                size: group.shared.buf_size as usize,
                min: DATAGRAM_HEADROOM + 1,
                what: "a datagram receive",
            });
        }
        let kind = OpKind::RecvMsg(RecvMsgOp {
            fd: fd.clone(),
            group: group.shared.clone(),
            multishot: mode.multishot(),
            hdr: MsgHeader::new(),
        });
        Ok(self.start(kind, token))
    }

    /// A CQE of a datagram receive: one datagram (or an empty one), or what a receive without
    /// a buffer says ([`Driver::buffer_completion`]).
    pub(super) fn complete_recvmsg(&mut self, c: OpCqe) {
        let kernel_rung = self.ladder.recv == MultishotRung::Kernel;
        let OpKind::RecvMsg(op) = &self.ops[c.key].kind else {
            unreachable!("complete_recvmsg on a datagram receive")
        };
        let (group, rearm) = (op.group.clone(), op.multishot && !c.cancelled);
        let kernel_multishot = kernel_rung && op.multishot;
        if op.empty_datagram(c.res, c.flags, kernel_multishot) {
            let datagram = Datagram {
                data: PooledBuf::empty(group.clone()),
                from: sockaddr_to_std(op.hdr.name_bytes()),
                truncated: false,
            };
            self.deliver(&c, Event::Datagram(datagram), false, rearm);
            return;
        }
        match cqueue::buffer_select(c.flags) {
            Some(bid) if c.res >= 0 => {
                // SAFETY: the kernel wrote `res` bytes into buffer `bid` before posting this CQE
                // (and, single-shot, the sender's address into `hdr`); the CQE hands `bid` to us.
                let datagram = unsafe {
                    take_datagram(
                        &group,
                        bid,
                        c.res as u32,
                        &op.hdr,
                        kernel_multishot,
                        &mut self.take_buf,
                    )
                };
                if !self.unsettled.is_empty() {
                    self.settled_by_take(&group, bid);
                }
                self.deliver(&c, Event::Datagram(datagram), c.more(), rearm);
            }
            _ => self.buffer_completion(&c, &group, rearm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of `sockaddr(a)`, as the kernel writes a sender's address.
    fn wire(a: std::net::SocketAddr) -> Vec<u8> {
        let (storage, len) = sockaddr(a);
        // SAFETY: `storage` is plain bytes, at least `len` long.
        unsafe { std::slice::from_raw_parts((&raw const storage).cast::<u8>(), len as usize) }
            .to_vec()
    }

    #[test]
    fn sender_addresses_read_back_as_written_for_both_families() {
        for a in [
            "127.0.0.1:9",
            "10.1.2.3:65535",
            "[::1]:443",
            "[fe80::1%3]:80",
        ] {
            let a: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(sockaddr_to_std(&wire(a)), Some(a));
        }
    }

    #[test]
    fn a_short_or_foreign_address_is_none() {
        let v4 = wire("127.0.0.1:9".parse().unwrap());
        assert_eq!(sockaddr_to_std(&v4[..8]), None, "cut short");
        assert_eq!(sockaddr_to_std(&[]), None);
        let mut unix = v4.clone();
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(sockaddr_to_std(&unix), None);
    }
}
