//! Regression tests of the soundness issue (#13): ownership defects found by using the API as a
//! hostile user would, each named after its bug. Every test checks the rule the defect broke: a
//! buffer is in exactly one place, a buffer the user holds never changes, bytes arrive once and
//! in order.

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{pattern_vec, pump, require, RUNGS};
use ringpool::{BufChain, BufGroupConfig, Driver, DriverConfig, Event, Fd, Features};

/// A pipe: (read end as an `Fd`, write end as a `File`).
fn pipe() -> (Fd, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (r, w) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    (Fd::from(r), std::fs::File::from(w))
}

/// One buffer-selecting read of `fd` at its position: its data, or `None` at end of file.
fn read_one(d: &mut Driver, fd: &Fd, g: &ringpool::BufGroup) -> Option<BufChain> {
    d.read(fd, g, u64::MAX, 7).unwrap();
    let mut got = None;
    pump(d, 10, |c| {
        assert!(!c.more, "a read completes once");
        got = match c.event {
            Event::Data(chain) => Some(chain),
            Event::Eof => None,
            other => panic!("read: {other:?}"),
        };
        true
    });
    got
}

/// Defect 1: a buffer-selecting read at end of file on an incremental ring completes with
/// `res = 0` and names the buffer the kernel keeps at its ring head (partly filled). The driver
/// recycled it: the bid sat in the ring twice with its fill offset reset, so the next read came
/// back with the old bytes and a buffer the user held changed under it.
#[test]
fn incremental_ring_read_at_eof_keeps_the_kernels_buffer() {
    if !require(
        Features::get().buf_ring_incremental,
        "incremental buffer ring",
    ) {
        return;
    }
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let g = d
        .buf_group(BufGroupConfig::new(4096, 2).incremental(true))
        .unwrap();
    assert!(g.is_incremental());
    let (data, mut writer) = pipe();
    // A full first buffer, kept by the user.
    writer.write_all(&[0xA1; 4096]).unwrap();
    let kept = read_one(&mut d, &data, &g).expect("4096 bytes");
    assert_eq!(kept.to_vec(), vec![0xA1; 4096]);
    // Ten bytes into the second buffer, dropped: the kernel keeps filling that buffer.
    writer.write_all(&[0xB2; 10]).unwrap();
    let first = read_one(&mut d, &data, &g).expect("10 bytes");
    assert_eq!(first.to_vec(), vec![0xB2; 10]);
    drop(first);
    // A read at end of file names the buffer at the ring head without consuming it.
    let (eof, eof_writer) = pipe();
    drop(eof_writer);
    assert!(read_one(&mut d, &eof, &g).is_none(), "end of file");
    // New bytes come back as themselves, not as the old ten.
    writer.write_all(&[0xC3; 10]).unwrap();
    let second = read_one(&mut d, &data, &g).expect("10 new bytes");
    assert_eq!(second.to_vec(), vec![0xC3; 10], "the old bytes came back");
    // Fill the rest of the buffer and read once more: what the user holds does not change.
    writer.write_all(&[0xD4; 4096 - 20]).unwrap();
    let rest = read_one(&mut d, &data, &g).expect("the rest of the buffer");
    assert_eq!(rest.to_vec(), vec![0xD4; 4096 - 20]);
    assert_eq!(second.to_vec(), vec![0xC3; 10], "a held buffer changed");
    assert_eq!(kept.to_vec(), vec![0xA1; 4096], "a held buffer changed");
    drop((kept, second, rest));
    let s = g.stats();
    assert_eq!(
        (s.in_user, s.in_kernel, s.total),
        (0, 2, 2),
        "group full again"
    );
    // Both buffers circulate: two more full reads work and give their own bytes.
    for byte in [0xE5, 0xF6] {
        writer.write_all(&[byte; 4096]).unwrap();
        let chain = read_one(&mut d, &data, &g).expect("a full buffer");
        assert_eq!(chain.to_vec(), vec![byte; 4096]);
    }
}

/// The same question for every group kind and every file a read can reach its end on: a read
/// at end of file names a buffer without filling it, and that buffer must end up in exactly one
/// place: the kernel's ring (a pipe: it stays at the head), or back in the group (a regular
/// file consumed it when the read started; a legacy group's buffer always left the kernel).
/// Each round reads more ends of file than the group has buffers, so a buffer lost from
/// circulation stalls the next read, and one in the ring twice shows as stale or changed bytes.
#[test]
fn reads_at_end_of_file_leave_every_buffer_in_one_place_on_every_rung() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short");
    std::fs::write(&path, pattern_vec(5, 0, 100)).unwrap();
    let incremental = Features::get().buf_ring_incremental;
    for rung in RUNGS {
        for inc in [false, true] {
            if inc && !incremental {
                continue;
            }
            let mut d = rung.driver();
            let g = d
                .buf_group(BufGroupConfig::new(256, 2).incremental(inc))
                .unwrap();
            let what = format!("{} incremental={}", rung.name, g.is_incremental());
            let file = Fd::from(OwnedFd::from(std::fs::File::open(&path).unwrap()));
            let (data, mut writer) = pipe();
            let mut held: Vec<(BufChain, Vec<u8>)> = Vec::new();
            for round in 0..6u64 {
                let (eof, eof_writer) = pipe();
                drop(eof_writer);
                assert!(read_one(&mut d, &eof, &g).is_none(), "{what}: pipe eof");
                // The file's 100 bytes, then its end, at explicit offsets.
                d.read(&file, &g, 0, 7).unwrap();
                let mut got = None;
                pump(&mut d, 5, |c| {
                    got = Some(c.event);
                    true
                });
                match got {
                    Some(Event::Data(chain)) => {
                        assert_eq!(chain.to_vec(), pattern_vec(5, 0, 100), "{what}");
                    }
                    other => panic!("{what}: file read: {other:?}"),
                }
                d.read(&file, &g, 100, 7).unwrap();
                pump(&mut d, 5, |c| {
                    assert!(matches!(c.event, Event::Eof), "{what}: {:?}", c.event);
                    true
                });
                // Ten patterned bytes from the data pipe; every other round they are kept.
                let bytes = pattern_vec(6, round * 10, 10);
                writer.write_all(&bytes).unwrap();
                let chain = read_one(&mut d, &data, &g).expect("data");
                assert_eq!(chain.to_vec(), bytes, "{what}: round {round}: stale bytes");
                if round % 2 == 0 && held.is_empty() {
                    held.push((chain, bytes));
                }
                for (chain, bytes) in &held {
                    assert_eq!(&chain.to_vec(), bytes, "{what}: a held buffer changed");
                }
            }
            drop(held);
            let s = g.stats();
            assert_eq!(s.in_user, 0, "{what}");
            assert_eq!(s.in_kernel, s.total, "{what}: group full again");
        }
    }
}

/// While another op of the group is in flight (a multishot receive), a buffer named by a read
/// at the end of a regular file cannot be settled (that op might have consumed it since); it
/// waits, and goes home once the group's ops ended. The receive meanwhile gets every byte.
#[test]
fn a_buffer_named_at_end_of_file_waits_for_the_groups_ops_then_goes_home() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short");
    std::fs::write(&path, b"0123456789").unwrap();
    for rung in RUNGS {
        for inc in [false, true] {
            if inc && !Features::get().buf_ring_incremental {
                continue;
            }
            let mut d = rung.driver();
            let g = d
                .buf_group(BufGroupConfig::new(256, 4).incremental(inc))
                .unwrap();
            let what = format!("{} incremental={}", rung.name, g.is_incremental());
            let (s, mut c) = common::tcp_pair();
            let s = Fd::from(s);
            let recv = d.recv(&s, &g, ringpool::RecvMode::Multishot, 1).unwrap();
            let file = Fd::from(OwnedFd::from(std::fs::File::open(&path).unwrap()));
            for _ in 0..3 {
                d.read(&file, &g, 10, 2).unwrap();
                pump(&mut d, 5, |c| {
                    assert_eq!(c.token, 2, "{what}: {:?}", c.event);
                    assert!(matches!(c.event, Event::Eof), "{what}: {:?}", c.event);
                    true
                });
            }
            let sent = pattern_vec(9, 0, 3000);
            c.write_all(&sent).unwrap();
            let mut got = Vec::new();
            pump(&mut d, 10, |comp| {
                match comp.event {
                    Event::Data(chain) => got.extend(chain.to_vec()),
                    other => panic!("{what}: {other:?}"),
                }
                got.len() >= sent.len()
            });
            assert_eq!(got, sent, "{what}: bytes in order, once");
            d.cancel(recv);
            pump(&mut d, 5, |comp| !comp.more);
            let s = g.stats();
            assert_eq!(s.in_user, 0, "{what}");
            assert_eq!(s.in_kernel, s.total, "{what}: group full again");
        }
    }
}

/// Defect 2: an `OpId` was not tied to its driver. The first ops of two drivers had the same
/// id, and `b.cancel(id_from_a)` cancelled b's unrelated receive. A foreign id does nothing.
#[test]
fn an_op_id_of_another_driver_cancels_nothing() {
    let mut a = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let mut b = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let ga = a.buf_group(BufGroupConfig::new(512, 4)).unwrap();
    let gb = b.buf_group(BufGroupConfig::new(512, 4)).unwrap();
    let (sa, _ca) = common::tcp_pair();
    let (sb, mut cb) = common::tcp_pair();
    let (sa, sb) = (Fd::from(sa), Fd::from(sb));
    let id_a = a.recv(&sa, &ga, ringpool::RecvMode::Multishot, 1).unwrap();
    let id_b = b.recv(&sb, &gb, ringpool::RecvMode::Multishot, 1).unwrap();
    assert_ne!(id_a, id_b, "ids of two drivers are distinct");
    b.submit().unwrap();
    b.cancel(id_a);
    b.wait(Some(std::time::Duration::from_millis(50))).unwrap();
    assert!(b.pop().is_none(), "b's receive was not cancelled");
    cb.write_all(b"still receiving").unwrap();
    pump(&mut b, 5, |c| {
        assert!(c.more, "the multishot receive goes on");
        match c.event {
            Event::Data(chain) => assert_eq!(chain.to_vec(), b"still receiving"),
            other => panic!("{other:?}"),
        }
        true
    });
    // Each driver still cancels its own op.
    for (d, id) in [(&mut a, id_a), (&mut b, id_b)] {
        d.cancel(id);
        pump(d, 5, |c| {
            assert!(
                matches!(c.event, Event::Error(ringpool::Error::Cancelled)),
                "{:?}",
                c.event
            );
            !c.more
        });
        assert_eq!(d.in_flight(), 0);
    }
}

/// Defect 3: an `rt` op dropped in another runtime acted on that runtime's op with the same
/// token: a `RecvStream` returned out of one `block_on` and dropped in a second one cancelled
/// the second runtime's receive through a stale id, whose future was then never woken (and
/// polling it panicked: "a live op has its state"). An op touches only the runtime that made
/// it; held past that runtime's end it does nothing unsafe and loses nothing: bytes its
/// receive had taken off the socket come back from the stream's next receive.
#[test]
fn an_rt_op_dropped_in_another_runtime_touches_only_its_own() {
    use ringpool::rt::{self, TcpStream};
    let (s1, mut c1) = common::tcp_pair();
    let (s2, mut c2) = common::tcp_pair();
    c1.write_all(b"early").unwrap();
    let (stream1, mut stream1_recv, group1) = rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(1024, 8))?;
        let st = TcpStream::from_fd(Fd::from(s1));
        let rs = st.recv_stream(&g)?;
        // Give the receive time to take the bytes into its (unread) events.
        rt::sleep(Duration::from_millis(50)).await;
        Ok::<_, ringpool::Error>((st, rs, g))
    })
    .unwrap()
    .unwrap();
    rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(1024, 8))?;
        let st2 = TcpStream::from_fd(Fd::from(s2));
        let mut rs2 = st2.recv_stream(&g)?;
        // Polling the old stream here hands out what its receive took, then says its runtime
        // is gone; it does not reach this runtime's ops.
        let early = rt::timeout(Duration::from_secs(5), stream1_recv.next()).await;
        assert!(
            matches!(&early, Ok(Ok(Some(chain))) if chain.to_vec() == b"early"),
            "{early:?}"
        );
        let gone = rt::timeout(Duration::from_secs(5), stream1_recv.next()).await;
        assert!(
            matches!(gone, Ok(Err(ringpool::Error::RuntimeGone))),
            "{gone:?}"
        );
        drop(stream1_recv);
        c2.write_all(b"hello").unwrap();
        let got = rt::timeout(Duration::from_secs(5), rs2.next()).await;
        match got {
            Ok(Ok(Some(chain))) => assert_eq!(chain.to_vec(), b"hello"),
            other => panic!("the second runtime's receive: {other:?}"),
        }
        // The old stream's socket works in this runtime: a new receive gets new bytes.
        c1.write_all(b"later").unwrap();
        let next = rt::timeout(Duration::from_secs(5), stream1.recv(&g)).await;
        assert!(
            matches!(&next, Ok(Ok(Some(chain))) if chain.to_vec() == b"later"),
            "{next:?}"
        );
        Ok::<_, ringpool::Error>(())
    })
    .unwrap()
    .unwrap();
    let s = group1.stats();
    assert_eq!(s.in_user, 0, "the first runtime's buffers came home");
}

/// The same for a lease group held past its runtime's end: dropped in another runtime it
/// cancels nothing there, and awaiting its leader there says the runtime is gone.
#[test]
fn an_rt_lease_group_dropped_in_another_runtime_touches_only_its_own() {
    use ringpool::rt::{self, File, LeaseMember, TcpStream};
    let (data, _writer) = pipe(); // no bytes ever: the leader's read waits
    let (m, _peer) = common::tcp_pair();
    let (s2, mut c2) = common::tcp_pair();
    let (group, _file, _member) = rt::block_on(async move {
        let file = File::from_fd(data);
        let member = TcpStream::from_fd(Fd::from(m));
        let group = rt::lease_group(
            &file,
            rt::fixed_buf(4096)?,
            u64::MAX,
            vec![LeaseMember::send(&member)],
        )?;
        Ok::<_, ringpool::Error>((group, file, member))
    })
    .unwrap()
    .unwrap();
    rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(1024, 8))?;
        let st2 = TcpStream::from_fd(Fd::from(s2));
        let mut rs2 = st2.recv_stream(&g)?;
        let filled = rt::timeout(Duration::from_secs(5), group.filled()).await;
        assert!(
            matches!(filled, Ok(Err(ringpool::Error::RuntimeGone))),
            "{filled:?}"
        );
        assert!(!group.holds(0));
        drop(group);
        c2.write_all(b"hello").unwrap();
        let got = rt::timeout(Duration::from_secs(5), rs2.next()).await;
        match got {
            Ok(Ok(Some(chain))) => assert_eq!(chain.to_vec(), b"hello"),
            other => panic!("the second runtime's receive: {other:?}"),
        }
        Ok::<_, ringpool::Error>(())
    })
    .unwrap()
    .unwrap();
}

/// Suspected: a send cancelled part-way completed `Ok(sent)` with `sent` short of its length,
/// and `Ok(len)` is documented as "all of it left". A send of 8 MiB to a peer that does not
/// read stops after the socket buffers fill; cancelled there, it reports how many bytes went
/// (`Error::ShortSend`), and the peer then reads exactly those bytes.
#[test]
fn a_send_cancelled_part_way_reports_how_much_left() {
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    let (s, mut c) = common::tcp_pair();
    let s = Fd::from(s);
    let len = 8 << 20;
    let data = pattern_vec(11, 0, len);
    let id = d.send(&s, data.clone(), 3).unwrap();
    d.submit().unwrap();
    d.wait(Some(Duration::from_millis(200))).unwrap();
    assert!(
        d.pop().is_none(),
        "8 MiB cannot leave while the peer does not read"
    );
    d.cancel(id);
    let mut result = None;
    pump(&mut d, 5, |comp| match comp.event {
        Event::Sent { result: r, .. } => {
            result = Some(r);
            true
        }
        other => panic!("{other:?}"),
    });
    let sent = match result.unwrap() {
        Err(ringpool::Error::ShortSend { sent, len: l }) => {
            assert_eq!(l, len);
            assert!(sent > 0 && sent < len, "{sent}");
            sent
        }
        Err(ringpool::Error::Cancelled) => 0,
        other => panic!("a send cancelled part-way: {other:?}"),
    };
    drop(s);
    let got = common::read_to_end(c.try_clone().unwrap());
    drop(c.flush());
    let k = Features::get().kernel;
    if sent == 0 && !got.is_empty() && (k.major, k.minor) < (6, 0) {
        // 5.x completes a send cancelled while it blocks with -ECANCELED and no count of what
        // had gone (seen on 5.10 in the kernel matrix): nothing to report it from.
        eprintln!(
            "skipped: this kernel ({k}) does not report the bytes a cancelled send had sent \
             ({} had left)",
            got.len()
        );
        return;
    }
    assert_eq!(got.len(), sent, "the peer got what the send reported");
    assert_eq!(got, data[..sent]);
}

/// Suspected: `recv_stream` (TCP and UDP) started its receive while a dropped receive of the
/// same socket was still in the kernel (`recv` waits for it): two receives armed on one socket
/// can hand out its bytes out of order. The stream's receive now waits for the dropped one to
/// end; the bytes arrive once and in order.
#[test]
fn a_receive_stream_waits_for_a_dropped_receive_of_its_socket() {
    use futures::AsyncReadExt;
    use ringpool::rt::{self, TcpStream, UdpSocket};
    let (s, mut c) = common::tcp_pair();
    rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(1024, 16))?;
        let st = TcpStream::from_fd(Fd::from(s));
        let in_flight = || rt::with_driver(|d| d.in_flight());
        // A receive dropped while armed: its cancel is on its way, it is still in the kernel.
        assert!(rt::timeout(Duration::from_millis(20), st.recv(&g))
            .await
            .is_err());
        assert_eq!(in_flight(), 1, "the dropped receive");
        let mut rx = st.recv_stream(&g)?;
        assert_eq!(in_flight(), 1, "no second receive armed on the socket");
        let sent = pattern_vec(12, 0, 64 << 10);
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                for piece in sent.chunks(1000) {
                    c.write_all(piece).unwrap();
                }
                c
            })
        };
        let mut got = Vec::new();
        while got.len() < sent.len() {
            match rt::timeout(Duration::from_secs(5), rx.next()).await {
                Ok(Ok(Some(chain))) => got.extend(chain.to_vec()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, sent, "bytes once, in order");
        drop(rx);
        // The copying reader waits the same way.
        let mut c = writer.join().unwrap();
        assert!(rt::timeout(Duration::from_millis(20), st.recv(&g))
            .await
            .is_err());
        c.write_all(b"after").unwrap();
        let mut five = [0u8; 5];
        rt::timeout(
            Duration::from_secs(5),
            st.reader(g.clone()).read_exact(&mut five),
        )
        .await?
        .unwrap();
        assert_eq!(&five, b"after");
        // UDP: the same rule for datagram streams.
        let u = UdpSocket::bind("127.0.0.1:0".parse().unwrap())?;
        assert!(rt::timeout(Duration::from_millis(20), u.recv_from(&g))
            .await
            .is_err());
        let before = in_flight();
        let mut dx = u.recv_stream(&g)?;
        assert_eq!(in_flight(), before, "no second datagram receive armed");
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"d1", u.local_addr()?).unwrap();
        match rt::timeout(Duration::from_secs(5), dx.next()).await {
            Ok(Ok(Some(d))) => assert_eq!(&d.data[..], b"d1"),
            other => panic!("{other:?}"),
        }
        Ok::<_, ringpool::Error>(())
    })
    .unwrap()
    .unwrap();
}

/// The same question for a send cancelled between two of its parts (zero-copy one buffer per
/// op, on the `no-sendmsg-zc` rung): it was reported `Cancelled` though its first buffer had
/// left. It says how much went, and the peer reads exactly that.
#[test]
fn a_send_cancelled_between_its_parts_reports_how_much_left() {
    if !require(Features::get().send_zc, "zero-copy send") {
        return;
    }
    let cfg = DriverConfig::default()
        .ignore_env()
        .force(ringpool::Force::NoSendmsgZc)
        .zerocopy(ringpool::ZcConfig::default().mode(ringpool::ZcMode::On));
    let mut d = Driver::new(cfg).unwrap();
    let g = d.buf_group(BufGroupConfig::new(2048, 4)).unwrap();
    let (r, mut rpeer) = common::tcp_pair();
    let r = Fd::from(r);
    let data = pattern_vec(13, 0, 4096);
    rpeer.write_all(&data).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    d.recv(&r, &g, ringpool::RecvMode::Bundle, 1).unwrap();
    let mut chain = None;
    pump(&mut d, 5, |c| {
        if let Event::Data(ch) = c.event {
            chain = Some(ch);
        }
        true
    });
    let chain = chain.unwrap();
    if chain.buf_count() < 2 {
        eprintln!("skipped: the receive took one buffer (no bundles), nothing to send in parts");
        return;
    }
    let len = chain.len();
    let (s, mut speer) = common::tcp_pair();
    let s = Fd::from(s);
    let id = d.send_zc(&s, chain, 2).unwrap();
    // One wait: the first part's result comes, the second part is queued until the next flush.
    d.wait(Some(Duration::from_secs(5))).unwrap();
    d.cancel(id);
    let mut result = None;
    pump(&mut d, 5, |c| match c.event {
        Event::Sent { result: r, .. } => {
            result = Some(r);
            true
        }
        other => panic!("{other:?}"),
    });
    let sent = match result.unwrap() {
        Err(ringpool::Error::ShortSend { sent, len: l }) => {
            assert_eq!(l, len);
            sent
        }
        Ok(n) => {
            assert_eq!(n, len, "Ok means all of it");
            n
        }
        Err(ringpool::Error::Cancelled) => panic!("cancelled after a part had left"),
        Err(e) => panic!("{e}"),
    };
    speer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = vec![0u8; len];
    let mut at = 0;
    while at < len {
        match std::io::Read::read(&mut speer, &mut got[at..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => at += n,
        }
    }
    assert_eq!(at, sent, "the peer got what the send reported");
    assert_eq!(&got[..at], &data[..at]);
    // The sent buffer goes home after its notification.
    for _ in 0..50 {
        if g.stats().in_user == 0 {
            break;
        }
        d.wait(Some(Duration::from_millis(20))).unwrap();
    }
    assert_eq!(g.stats().in_user, 0, "buffers home");
}

/// A listener whose accept was armed by a runtime that has ended accepts in the next one (its
/// accept is armed anew there), instead of reading that runtime's op with a stale token.
#[test]
fn a_listener_outliving_its_runtime_accepts_in_the_next() {
    use ringpool::rt::{self, TcpListener};
    let listener = rt::block_on(async {
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap())?;
        // Arm the accept, then leave before any connection.
        assert!(rt::timeout(Duration::from_millis(20), l.accept())
            .await
            .is_err());
        Ok::<_, ringpool::Error>(l)
    })
    .unwrap()
    .unwrap();
    let addr = listener.local_addr().unwrap();
    rt::block_on(async move {
        let client = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"hi").unwrap();
            c
        });
        let accepted = rt::timeout(Duration::from_secs(5), listener.accept()).await;
        let stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("accept in the second runtime: {e}"),
            Err(e) => panic!("accept in the second runtime: {e}"),
        };
        let g = rt::buf_group(BufGroupConfig::new(512, 4))?;
        let got = rt::timeout(Duration::from_secs(5), stream.recv(&g)).await;
        assert!(
            matches!(&got, Ok(Ok(Some(chain))) if chain.to_vec() == b"hi"),
            "{got:?}"
        );
        drop(client.join().unwrap());
        Ok::<_, ringpool::Error>(())
    })
    .unwrap()
    .unwrap();
}

/// A task's handle awaited after the task's runtime ended (the task was dropped unfinished)
/// says so instead of waiting for ever.
#[test]
#[should_panic(expected = "awaited after its task was dropped unfinished")]
fn a_join_handle_of_a_task_whose_runtime_ended_does_not_wait_for_ever() {
    use ringpool::rt;
    let handle = rt::block_on(async {
        let task = rt::spawn(async {
            rt::sleep(Duration::from_secs(3600)).await;
            7
        });
        Some(task) // returned out of its runtime, unfinished
    })
    .unwrap()
    .unwrap();
    let _ = rt::block_on(async move { rt::timeout(Duration::from_secs(5), handle).await });
}

/// Found by the model checker: a receive that completed in its runtime while its future was
/// not polled (the future was held, not dropped) lost its bytes when the runtime ended, because
/// a runtime whose ops had all finished handed nothing to the streams. The bytes come back
/// from the stream's next receive, in order.
#[test]
fn a_receive_completed_but_not_taken_when_its_runtime_ends_keeps_its_bytes() {
    use ringpool::rt::{self, TcpStream};
    type RecvFut =
        std::pin::Pin<Box<dyn std::future::Future<Output = ringpool::Result<Option<BufChain>>>>>;
    let (s, mut c) = common::tcp_pair();
    let data = pattern_vec(21, 0, 2665);
    let (stream, fut) = rt::block_on(async {
        let g = rt::buf_group(BufGroupConfig::new(1024, 4))?;
        let st = std::rc::Rc::new(TcpStream::from_fd(Fd::from(s)));
        let (s2, g2) = (st.clone(), g.clone());
        let mut fut: RecvFut = Box::pin(async move { s2.recv_one(&g2).await });
        assert!(rt::timeout(Duration::from_millis(1), &mut fut)
            .await
            .is_err());
        c.write_all(&data).unwrap();
        // Let the receive complete (its future is not polled meanwhile).
        rt::sleep(Duration::from_millis(50)).await;
        Ok::<_, ringpool::Error>((st, fut))
    })
    .unwrap()
    .unwrap();
    drop(fut); // outside any runtime
    drop(c);
    let got = rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(4096, 8))?;
        let mut got = Vec::new();
        while let Some(chain) = rt::timeout(Duration::from_secs(5), stream.recv(&g)).await?? {
            got.extend(chain.to_vec());
        }
        Ok::<_, ringpool::Error>(got)
    })
    .unwrap()
    .unwrap();
    assert_eq!(got.len(), data.len(), "bytes lost");
    assert!(got == data, "bytes out of order");
}
