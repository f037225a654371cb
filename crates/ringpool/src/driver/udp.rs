//! Datagrams: multishot `RECVMSG` with buffer selection, and the sender addresses it reports.

use super::*;

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
        let kind = OpKind::RecvMsg {
            fd: fd.clone(),
            group: group.shared.clone(),
            multishot: mode.multishot(),
            hdr: MsgHeader::new(),
        };
        Ok(self.start(kind, token))
    }
}

/// A socket address the kernel wrote (`sockaddr_in` or `sockaddr_in6` bytes), as std's type.
pub(super) fn sockaddr_to_std(name: &[u8]) -> Option<std::net::SocketAddr> {
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

/// Completions.
impl Driver {
    /// A datagram receive completed: the datagram with its sender, or what `buffer_completion` makes of the result.
    pub(super) fn complete_recv_msg(&mut self, done: Done) {
        let Done {
            key,
            id,
            token,
            cancelled,
            res,
            flags,
            ..
        } = done;
        let OpKind::RecvMsg {
            group,
            multishot,
            hdr,
            ..
        } = &mut self.ops[key].kind
        else {
            unreachable!("routed here by its kind");
        };
        let (group, rearm) = (group.clone(), *multishot && !cancelled);
        let kernel_multishot = self.ladder.recv == MultishotRung::Kernel && *multishot;
        // A single-shot receive of an empty datagram consumes no buffer (the kernel
        // recycles it) and returns 0, as it does on a socket shut down for reading; the
        // sender's address, which only a datagram has, tells them apart.
        let empty_datagram = res == 0
            && !kernel_multishot
            && cqueue::buffer_select(flags).is_none()
            && hdr.msg.msg_namelen > 0;
        if empty_datagram {
            let name = hdr.name_bytes();
            let datagram = Datagram {
                data: PooledBuf::empty(group.clone()),
                from: sockaddr_to_std(name),
                truncated: false,
            };
            self.deliver(key, id, token, Event::Datagram(datagram), false, rearm);
            return;
        }
        match cqueue::buffer_select(flags) {
            Some(bid) if res >= 0 => {
                // SAFETY: the kernel wrote `res` bytes into buffer `bid` before posting
                // this CQE (and, single-shot, the sender's address into `hdr`).
                let datagram = unsafe {
                    take_datagram(
                        &group,
                        bid,
                        res as u32,
                        hdr,
                        kernel_multishot,
                        &mut self.take_buf,
                    )
                };
                if !self.unsettled.is_empty() {
                    self.settled_by_take(&group, bid);
                }
                let event = Event::Datagram(datagram);
                self.deliver(key, id, token, event, cqueue::more(flags), rearm);
            }
            _ => self.buffer_completion(key, id, token, &group, res, flags, rearm),
        }
    }
}

/// A datagram receive: `RECVMSG` multishot where the kernel has it, else single-shot with the same payload room.
pub(super) fn recv_msg_sqe(kind: &mut OpKind, ladder: Ladder) -> squeue::Entry {
    let OpKind::RecvMsg {
        fd,
        group,
        multishot,
        hdr,
    } = kind
    else {
        unreachable!("routed here by its kind");
    };

    let fd = types::Fd(fd.as_raw_fd());
    if *multishot && ladder.recv == MultishotRung::Kernel {
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
