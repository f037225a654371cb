//! Pages leases (`LeaseBacking::Pages`) against the real kernel: the leader splices a file (or
//! a socket, or a pipe) into a pipe, members tee it into their own pipes and splice those to
//! loopback TCP sockets and temp files. Every rule of `Driver::lease` is checked, with bytes
//! compared to the source, the group's end reported exactly once, and every pipe back in the
//! pool at the end. Faults: a client that resets mid-splice, a file that shrinks while served,
//! a client that stops reading (its pipe and socket fill), a leader that cannot splice,
//! `EAGAIN` from non-blocking descriptors, 1,000 members; and 64 MiB to 16 clients.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{in_emulated_guest, join_while_waiting, pattern_vec, pump, require, reset, tcp_pair};
use ringpool::{Driver, DriverConfig, Error, Event, Fd, Features, LeaseBacking, Member};

/// Whether the kernel has what pages leases need (5.8); a visible skip otherwise.
fn supported() -> bool {
    let f = Features::get();
    require(
        f.opcode(io_uring::opcode::Splice::CODE) && f.opcode(io_uring::opcode::Tee::CODE),
        "IORING_OP_SPLICE and IORING_OP_TEE (pages leases)",
    )
}

fn driver() -> Driver {
    Driver::new(common::splice_config()).unwrap()
}

fn pages(len: usize) -> LeaseBacking {
    LeaseBacking::Pages { len }
}

fn file_with(bytes: &[u8]) -> (std::fs::File, Fd) {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    let fd = Fd::from(OwnedFd::from(f.try_clone().unwrap()));
    (f, fd)
}

fn file_fd(f: &std::fs::File) -> Fd {
    Fd::from(OwnedFd::from(f.try_clone().unwrap()))
}

fn contents(f: &std::fs::File) -> Vec<u8> {
    let mut f = f.try_clone().unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// Reads a peer to EOF (or `len` bytes) on a thread.
fn reader(mut peer: TcpStream, len: Option<usize>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        peer.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut v = Vec::new();
        match len {
            Some(n) => {
                v.resize(n, 0);
                peer.read_exact(&mut v).unwrap();
            }
            None => {
                peer.read_to_end(&mut v).unwrap();
            }
        }
        v
    })
}

/// A loopback pair whose buffers hold little (about 100 KiB in flight, not megabytes), so a
/// client that does not read stops its member's splice.
fn small_pair() -> (TcpStream, TcpStream) {
    let (s, c) = tcp_pair();
    common::set_sock_buf(s.as_raw_fd(), libc::SO_SNDBUF, 16 << 10);
    common::set_sock_buf(c.as_raw_fd(), libc::SO_RCVBUF, 16 << 10);
    (s, c)
}

/// A position-sensitive checksum (FNV-1a) and the length.
fn checksum(bytes: &[u8]) -> (u64, usize) {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h, bytes.len())
}

/// Everything one pages group reported, until its end.
#[derive(Default, Debug)]
struct Outcome {
    filled: Option<ringpool::Result<usize>>,
    members: BTreeMap<u64, ringpool::Result<usize>>,
    /// Member tokens in the order they completed.
    order: Vec<u64>,
    returns: usize,
}

fn record(o: &mut Outcome, group: u64, c: ringpool::Completion) -> bool {
    match c.event {
        Event::LeaseFilled { result, lease } => {
            assert!(lease.is_none(), "a pages lease exposes no bytes");
            assert_eq!(c.token, group);
            assert!(o.filled.is_none(), "filled twice");
            o.filled = Some(result);
        }
        Event::PagesReturned => {
            assert_eq!(c.token, group);
            o.returns += 1;
        }
        Event::Sent { result, buf } => {
            assert!(buf.is_none(), "a pages member hands back no memory");
            member(o, c.token, result);
        }
        Event::Written { result } => member(o, c.token, result),
        other => panic!("{other:?}"),
    }
    o.returns > 0
}

fn member(o: &mut Outcome, token: u64, result: ringpool::Result<usize>) {
    assert!(
        o.filled.is_some() || matches!(result, Err(Error::Cancelled)),
        "member {token} completed before its leader: {result:?}"
    );
    assert!(
        o.members.insert(token, result).is_none(),
        "member {token} twice"
    );
    o.order.push(token);
}

/// Runs one group to its end, then checks nothing else follows and every pipe is home.
fn run_group(d: &mut Driver, group: u64) -> Outcome {
    let mut o = Outcome::default();
    pump(d, 60, |c| record(&mut o, group, c));
    d.wait(Some(Duration::from_millis(20))).unwrap();
    if let Some(c) = d.pop() {
        panic!("after the group's end: {c:?}");
    }
    assert_eq!(o.returns, 1);
    let s = d.pipe_stats();
    assert_eq!(s.in_use, 0, "every pipe is back: {s:?}");
    assert_eq!(d.in_flight(), 0);
    o
}

fn members_start_after_the_leader_and_each_gets_the_same_bytes() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let data = pattern_vec(1, 0, 300 << 10);
    let (_f, src) = file_with(&data);
    // At an offset inside a page: the pipe must hold one more page.
    let (off, len) = (4096 * 3 + 100, 200 << 10);
    let want = &data[off..off + len];
    for round in 0..2 {
        let socks: Vec<_> = (0..3).map(|_| tcp_pair()).collect();
        let outs: Vec<_> = (0..2).map(|_| tempfile::tempfile().unwrap()).collect();
        let mut members = Vec::new();
        for (i, (s, _)) in socks.iter().enumerate() {
            let fd = Fd::from(s.try_clone().unwrap());
            members.push(if i == 0 {
                Member::send(&fd, i as u64)
            } else {
                Member::send_zc(&fd, i as u64)
            });
        }
        for (i, f) in outs.iter().enumerate() {
            members.push(Member::write(&file_fd(f), 1000 * i as u64, 10 + i as u64));
        }
        d.lease(&src, pages(len), off as u64, members, 99).unwrap();
        let readers: Vec<_> = socks
            .into_iter()
            .map(|(_, peer)| reader(peer, Some(len)))
            .collect();
        let o = run_group(&mut d, 99);
        assert_eq!(o.filled.unwrap().unwrap(), len);
        assert_eq!(o.members.len(), 5);
        for (t, r) in &o.members {
            assert_eq!(*r.as_ref().unwrap(), len, "member {t}");
        }
        for r in readers {
            assert!(r.join().unwrap() == want, "a socket got other bytes");
        }
        for (i, f) in outs.iter().enumerate() {
            let got = contents(f);
            assert!(got[1000 * i..] == *want, "file {i}");
        }
        let s = d.pipe_stats();
        if round == 1 {
            assert!(
                s.reused >= 6,
                "the second group reuses the pool's pipes: {s:?}"
            );
        }
    }
}

fn a_short_leader_read_lends_exactly_the_bytes_there_are() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let data = pattern_vec(2, 0, 1000);
    let (_f, src) = file_with(&data);
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    let out = tempfile::tempfile().unwrap();
    let members = vec![Member::send(&s, 1), Member::write(&file_fd(&out), 0, 2)];
    d.lease(&src, pages(64 << 10), 0, members, 7).unwrap();
    let o = run_group(&mut d, 7);
    assert_eq!(o.filled.unwrap().unwrap(), 1000);
    assert_eq!(*o.members[&1].as_ref().unwrap(), 1000);
    assert_eq!(*o.members[&2].as_ref().unwrap(), 1000);
    drop(s);
    assert_eq!(join_while_waiting(&mut d, reader(peer, None)), data);
    assert_eq!(contents(&out), data);
    // At the end of the file: 0 bytes, members complete with nothing.
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    d.lease(&src, pages(4096), 1000, vec![Member::send(&s, 3)], 8)
        .unwrap();
    let o = run_group(&mut d, 8);
    assert_eq!(o.filled.unwrap().unwrap(), 0);
    assert_eq!(*o.members[&3].as_ref().unwrap(), 0);
    drop(s);
    assert!(join_while_waiting(&mut d, reader(peer, None)).is_empty());
}

fn a_failed_leader_cancels_every_member_and_a_directory_is_a_typed_error() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let dir = Fd::from(OwnedFd::from(
        std::fs::File::open(std::env::temp_dir()).unwrap(),
    ));
    let (s, _peer) = tcp_pair();
    let s = Fd::from(s);
    let err = d
        .lease(&dir, pages(4096), 0, vec![Member::send(&s, 1)], 5)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotSpliceable {
                role: "leader",
                kind: "a directory"
            }
        ),
        "{err}"
    );
    assert_eq!(d.pipe_stats().in_use, 0, "a refused lease holds no pipe");
    // A pipe's write end cannot be read: the kernel says EBADF, the members are cancelled.
    let (_r, w) = common::pipe();
    let write_only = Fd::from(OwnedFd::from(w));
    let out = tempfile::tempfile().unwrap();
    let members = vec![Member::send(&s, 1), Member::write(&file_fd(&out), 0, 2)];
    d.lease(&write_only, pages(4096), u64::MAX, members, 5)
        .unwrap();
    let o = run_group(&mut d, 5);
    let e = o.filled.unwrap().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    assert_eq!(o.members.len(), 2);
    for r in o.members.values() {
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    }
    assert_eq!(out.metadata().unwrap().len(), 0, "no member ran");
    // Bad input, refused before anything starts.
    let (_f, src) = file_with(b"x");
    assert!(matches!(
        d.lease(&s, pages(4096), 0, vec![], 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        d.lease(&src, pages(0), 0, vec![], 1),
        Err(Error::InvalidArgument { .. })
    ));
    let max = d.pipe_stats().max_pipe;
    match d.lease(&src, pages(max + 1), 0, vec![], 1) {
        Err(Error::LeaseTooLong { len, max: fits }) => assert_eq!((len, fits), (max + 1, max)),
        other => panic!("{other:?}"),
    }
    let read_into = Member::read_into(&s, 0, 0..10, 1);
    assert!(matches!(
        d.lease(&src, pages(10), 0, vec![read_into], 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(d.pipe_stats().in_use, 0);
}

/// The same cause as `splice_stream::idle_pipes_are_closed_a_second_after_the_last_stream_ended`
/// (found by the soak): the pool kept pages leases' idle pipes, and their descriptors, for good.
fn a_pages_lease_s_idle_pipes_are_closed_a_second_after_it_ended() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let data = pattern_vec(9, 0, 10_000);
    let (_f, src) = file_with(&data);
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    d.lease(&src, pages(64 << 10), 0, vec![Member::send(&s, 1)], 7)
        .unwrap();
    let o = run_group(&mut d, 7);
    assert_eq!(*o.members[&1].as_ref().unwrap(), 10_000);
    drop(s);
    assert_eq!(join_while_waiting(&mut d, reader(peer, None)), data);
    assert!(d.pipe_stats().idle > 0, "kept for reuse at first");
    let until = std::time::Instant::now() + std::time::Duration::from_millis(1300);
    while std::time::Instant::now() < until {
        d.wait(Some(std::time::Duration::from_millis(100))).unwrap();
    }
    let st = d.pipe_stats();
    assert_eq!((st.idle, st.in_use), (0, 0), "{st:?}");
    assert_eq!(st.closed, st.made, "{st:?}");
}

fn one_member_failing_leaves_the_others_alone() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let data = pattern_vec(3, 0, 16 << 10);
    let (_f, src) = file_with(&data);
    let (good, good_peer) = tcp_pair();
    let (bad, bad_peer) = tcp_pair();
    reset(bad_peer);
    std::thread::sleep(Duration::from_millis(50));
    let read_only = tempfile::NamedTempFile::new().unwrap();
    let ro = Fd::from(OwnedFd::from(
        std::fs::File::open(read_only.path()).unwrap(),
    ));
    let ok_file = tempfile::tempfile().unwrap();
    let members = vec![
        Member::send(&Fd::from(bad), 1),
        Member::send(&Fd::from(good), 2),
        Member::write(&ro, 0, 3),
        Member::write(&file_fd(&ok_file), 0, 4),
    ];
    d.lease(&src, pages(16 << 10), 0, members, 8).unwrap();
    let peer = reader(good_peer, Some(16 << 10));
    let o = run_group(&mut d, 8);
    let e1 = o.members[&1].as_ref().unwrap_err().raw_os_error();
    assert!(matches!(e1, Some(libc::ECONNRESET | libc::EPIPE)), "{e1:?}");
    assert_eq!(*o.members[&2].as_ref().unwrap(), 16 << 10);
    assert_eq!(
        o.members[&3].as_ref().unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    assert_eq!(*o.members[&4].as_ref().unwrap(), 16 << 10);
    assert_eq!(peer.join().unwrap(), data);
    assert_eq!(contents(&ok_file), data);
}

fn a_client_that_disconnects_mid_splice_fails_alone() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let len = 1 << 20;
    let len = len.min(d.pipe_stats().max_pipe);
    let data = pattern_vec(4, 0, len);
    let (_f, src) = file_with(&data);
    let pairs: Vec<_> = (0..3).map(|_| small_pair()).collect();
    let members = pairs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| Member::send(&Fd::from(s.try_clone().unwrap()), i as u64))
        .collect();
    d.lease(&src, pages(len), 0, members, 50).unwrap();
    let mut peers = pairs.into_iter().map(|(_, p)| p);
    // Client 0 reads a little, then resets while its member is still splicing.
    let mut quitter = peers.next().unwrap();
    let quit = std::thread::spawn(move || {
        let mut some = vec![0u8; 8192];
        quitter.read_exact(&mut some).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        reset(quitter);
        some
    });
    let readers: Vec<_> = peers.map(|p| reader(p, Some(len))).collect();
    let o = run_group(&mut d, 50);
    assert_eq!(o.filled.unwrap().unwrap(), len);
    let e = o.members[&0].as_ref().unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)),
        "{e}"
    );
    assert_eq!(quit.join().unwrap(), data[..8192]);
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(*o.members[&(i as u64 + 1)].as_ref().unwrap(), len);
        assert!(r.join().unwrap() == data, "client {}", i + 1);
    }
}

fn a_file_that_shrinks_while_served_gives_members_what_each_leader_found() {
    if !supported() {
        return;
    }
    let mut d = driver();
    const CHUNK: usize = 64 << 10;
    let data = pattern_vec(5, 0, 8 * CHUNK);
    let (f, src) = file_with(&data);
    let pairs: Vec<_> = (0..2).map(|_| tcp_pair()).collect();
    let socks: Vec<Fd> = pairs
        .iter()
        .map(|(s, _)| Fd::from(s.try_clone().unwrap()))
        .collect();
    let readers: Vec<_> = pairs.into_iter().map(|(_, p)| reader(p, None)).collect();
    let mut served = 0usize;
    for chunk in 0.. {
        if chunk == 2 {
            // Half-way into the third chunk: later leaders find less, then nothing.
            f.set_len((2 * CHUNK + CHUNK / 2) as u64).unwrap();
        }
        let members = socks
            .iter()
            .enumerate()
            .map(|(i, s)| Member::send(s, i as u64))
            .collect();
        d.lease(&src, pages(CHUNK), served as u64, members, 100 + chunk)
            .unwrap();
        let o = run_group(&mut d, 100 + chunk);
        let n = o.filled.unwrap().unwrap();
        for r in o.members.values() {
            assert_eq!(*r.as_ref().unwrap(), n);
        }
        served += n;
        if n == 0 {
            break;
        }
        assert!(chunk < 8, "the file ended");
    }
    assert_eq!(served, 2 * CHUNK + CHUNK / 2);
    drop(socks);
    for r in readers {
        assert!(join_while_waiting(&mut d, r) == data[..served]);
    }
    // A file truncated under a lease whose leader already spliced: its pages are held by
    // reference. Members deliver the bytes the leader saw, or fail; none hangs.
    let (f, src) = file_with(&data);
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    d.lease(&src, pages(CHUNK), 0, vec![Member::send(&s, 1)], 200)
        .unwrap();
    let mut o = Outcome::default();
    pump(&mut d, 30, |c| {
        let filled = matches!(c.event, Event::LeaseFilled { .. });
        let end = record(&mut o, 200, c);
        if filled {
            f.set_len(100).unwrap();
        }
        end
    });
    drop(s);
    let got = join_while_waiting(&mut d, reader(peer, None));
    // The page straddling the new end is zeroed past it in place by the kernel (the pipe
    // holds that very page, as sendfile's would): every byte is the file's or that zero.
    let n = match &o.members[&1] {
        Ok(n) => *n,
        Err(_) => got.len(),
    };
    assert_eq!(got.len(), n, "exactly what the member reported");
    assert!(got[..100.min(n)] == data[..100.min(n)]);
    assert!(
        got.iter().zip(&data).all(|(&g, &w)| g == w || g == 0),
        "only the file's bytes, or zeros past its new end"
    );
    assert_eq!(d.pipe_stats().in_use, 0);
}

fn a_client_that_stops_reading_holds_only_its_own_member() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let len = (512 << 10).min(d.pipe_stats().max_pipe);
    let data = pattern_vec(6, 0, len);
    let (_f, src) = file_with(&data);
    let pairs: Vec<_> = (0..3).map(|_| small_pair()).collect();
    let members = pairs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| Member::send(&Fd::from(s.try_clone().unwrap()), i as u64))
        .collect();
    d.lease(&src, pages(len), 0, members, 60).unwrap();
    let mut peers: Vec<_> = pairs.into_iter().map(|(_, p)| p).collect();
    let slow = peers.remove(0);
    let readers: Vec<_> = peers.into_iter().map(|p| reader(p, Some(len))).collect();
    // The two readers finish while the slow client's socket and pipe stay full.
    let mut o = Outcome::default();
    pump(&mut d, 30, |c| {
        record(&mut o, 60, c);
        o.members.len() == 2
    });
    let mut first = o.order.clone();
    first.sort_unstable();
    assert_eq!(first, [1, 2], "the slow member is still splicing");
    assert!(d.pipe_stats().in_use >= 1, "the slow member holds its pipe");
    for r in readers {
        assert!(r.join().unwrap() == data);
    }
    // Then it reads: its member finishes, and the group ends.
    let slow = reader(slow, Some(len));
    pump(&mut d, 30, |c| record(&mut o, 60, c));
    assert_eq!(*o.members[&0].as_ref().unwrap(), len);
    assert!(slow.join().unwrap() == data);
    assert_eq!(d.pipe_stats().in_use, 0);

    // A laggard cancelled (by token, as a server's laggard policy does): it ends, the group
    // ends, every pipe is home, the others got everything.
    let pairs: Vec<_> = (0..2).map(|_| small_pair()).collect();
    let members = pairs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| Member::send(&Fd::from(s.try_clone().unwrap()), i as u64))
        .collect();
    d.lease(&src, pages(len), 0, members, 61).unwrap();
    let mut peers: Vec<_> = pairs.into_iter().map(|(_, p)| p).collect();
    let _laggard = peers.remove(0);
    let r = reader(peers.remove(0), Some(len));
    let mut o = Outcome::default();
    pump(&mut d, 30, |c| {
        record(&mut o, 61, c);
        o.members.contains_key(&1)
    });
    d.cancel_token(0);
    pump(&mut d, 30, |c| record(&mut o, 61, c));
    let e = o.members[&0].as_ref().unwrap_err();
    assert!(
        matches!(e, Error::ShortSend { .. } | Error::Cancelled),
        "{e}"
    );
    assert!(r.join().unwrap() == data);
    assert_eq!(d.pipe_stats().in_use, 0);
    assert_eq!(d.in_flight(), 0);
}

fn eagain_from_non_blocking_descriptors_is_retried_never_data() {
    if !supported() {
        return;
    }
    let mut d = driver();
    // The leader reads a non-blocking pipe that is empty at first.
    let (r, mut w) = common::pipe();
    set_nonblocking(r.as_raw_fd());
    let src = Fd::from(OwnedFd::from(r));
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    d.lease(&src, pages(4096), u64::MAX, vec![Member::send(&s, 1)], 70)
        .unwrap();
    d.submit().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let polls = d.pipe_stats().eagain_polls;
    w.write_all(b"late bytes").unwrap();
    let o = run_group(&mut d, 70);
    assert_eq!(o.filled.unwrap().unwrap(), 10, "only the bytes written");
    assert_eq!(*o.members[&1].as_ref().unwrap(), 10);
    // Whether the kernel says EAGAIN here or blocks its worker until the bytes come is the
    // kernel's choice (6.18 blocks); either way nothing but the bytes written was lent.
    eprintln!("EAGAIN polls while the pipe was empty: {polls}");
    drop(s);
    assert_eq!(
        join_while_waiting(&mut d, reader(peer, None)),
        b"late bytes"
    );

    // A member on a non-blocking socket whose client reads slowly: EAGAIN, poll, splice on.
    let len = (1 << 20).min(d.pipe_stats().max_pipe);
    let data = pattern_vec(7, 0, len);
    let (_f, file) = file_with(&data);
    let (s, mut peer) = small_pair();
    s.set_nonblocking(true).unwrap();
    let s = Fd::from(s);
    let before = d.pipe_stats().eagain_polls;
    d.lease(&file, pages(len), 0, vec![Member::send(&s, 2)], 71)
        .unwrap();
    let slow = std::thread::spawn(move || {
        peer.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut v = vec![0u8; len];
        let mut at = 0;
        while at < len {
            std::thread::sleep(Duration::from_millis(2));
            let n = peer.read(&mut v[at..(at + (32 << 10)).min(len)]).unwrap();
            assert!(n > 0);
            at += n;
        }
        v
    });
    let o = run_group(&mut d, 71);
    assert_eq!(*o.members[&2].as_ref().unwrap(), len);
    assert!(slow.join().unwrap() == data);
    assert!(
        d.pipe_stats().eagain_polls > before,
        "the full socket said EAGAIN: {:?}",
        d.pipe_stats()
    );
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on a descriptor this test owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above: only flags are passed.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
}

fn a_socket_leader_lends_what_arrived() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let (src, mut writer) = tcp_pair();
    let src = Fd::from(src);
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    let out = tempfile::tempfile().unwrap();
    writer.write_all(b"from a socket").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let members = vec![Member::send(&s, 1), Member::write(&file_fd(&out), 0, 2)];
    d.lease(&src, pages(64 << 10), u64::MAX, members, 80)
        .unwrap();
    let o = run_group(&mut d, 80);
    assert_eq!(o.filled.unwrap().unwrap(), 13);
    drop(s);
    assert_eq!(
        join_while_waiting(&mut d, reader(peer, None)),
        b"from a socket"
    );
    assert_eq!(contents(&out), b"from a socket");
}

fn chunks_leased_back_to_back_reach_each_socket_in_order() {
    back_to_back(false);
}

/// The same with member sockets the user made non-blocking (on Debian's 7.3 the driver's own
/// non-blocking members had stalled here: see `nonblocking_sinks`).
fn chunks_leased_back_to_back_reach_each_non_blocking_socket_in_order() {
    back_to_back(true);
}

fn back_to_back(nonblocking: bool) {
    if !supported() {
        return;
    }
    let mut d = driver();
    const CHUNK: usize = 256 << 10;
    const CHUNKS: usize = 12;
    let data = pattern_vec(8, 0, CHUNK * CHUNKS);
    let (_f, src) = file_with(&data);
    let pairs: Vec<_> = (0..3).map(|_| tcp_pair()).collect();
    for (s, _) in &pairs {
        s.set_nonblocking(nonblocking).unwrap();
    }
    let socks: Vec<Fd> = pairs
        .iter()
        .map(|(s, _)| Fd::from(s.try_clone().unwrap()))
        .collect();
    // Every chunk's group is started at once: the leaders complete in any order, so each
    // socket's members take turns in the order they started (leader completions).
    for c in 0..CHUNKS {
        let members = socks
            .iter()
            .enumerate()
            .map(|(i, s)| Member::send(s, (c * 10 + i) as u64))
            .collect();
        d.lease(
            &src,
            pages(CHUNK),
            (c * CHUNK) as u64,
            members,
            1000 + c as u64,
        )
        .unwrap();
    }
    let readers: Vec<_> = pairs.into_iter().map(|(_, p)| reader(p, None)).collect();
    let mut filled = Vec::new();
    let mut ended = 0;
    pump(&mut d, 60, |c| {
        match c.event {
            Event::LeaseFilled { result, .. } => filled.push((c.token, result.unwrap())),
            Event::PagesReturned => ended += 1,
            Event::Sent { result, .. } => assert_eq!(result.unwrap(), CHUNK),
            other => panic!("{other:?}"),
        }
        ended == CHUNKS
    });
    drop(socks);
    // What each socket got is the chunks in the order their leaders completed.
    let mut want = Vec::new();
    for (token, n) in &filled {
        assert_eq!(*n, CHUNK);
        let c = (*token - 1000) as usize;
        want.extend_from_slice(&data[c * CHUNK..(c + 1) * CHUNK]);
    }
    for r in readers {
        let got = join_while_waiting(&mut d, r);
        assert!(got == want, "a socket got chunks interleaved");
    }
    assert_eq!(d.pipe_stats().in_use, 0);
}

fn cancelling_reaches_the_leader_members_in_line_and_a_dropped_driver() {
    // On 6.1 (kernel matrix) this timed out while a member's socket was blocking: its
    // splice slept in a kernel worker that the cancel did not wake. Members' sockets are
    // non-blocking now; the check below is that they are.
    if !supported() {
        return;
    }
    let mut d = driver();
    // A leader waiting on an empty socket, cancelled with its members.
    let (src, _writer) = tcp_pair();
    let src = Fd::from(src);
    let (s, _peer) = tcp_pair();
    let s = Fd::from(s);
    let leader = d
        .lease(&src, pages(4096), u64::MAX, vec![Member::send(&s, 1)], 90)
        .unwrap();
    d.submit().unwrap();
    d.cancel(leader);
    let o = run_group(&mut d, 90);
    assert!(matches!(o.filled.unwrap(), Err(Error::Cancelled)));
    assert!(matches!(o.members[&1], Err(Error::Cancelled)));
    // Members waiting for their turn at a socket whose client does not read.
    let len = (1 << 20).min(d.pipe_stats().max_pipe);
    let (_f, file) = file_with(&pattern_vec(9, 0, len));
    let (s, _peer) = small_pair();
    let s = Fd::from(s);
    for g in 0..3 {
        d.lease(&file, pages(len), 0, vec![Member::send(&s, 10 + g)], 91 + g)
            .unwrap();
    }
    // SAFETY: F_GETFL on a live socket of ours.
    let flags = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFL) };
    if ringpool::Features::get().kernel.major < 7 {
        assert!(
            flags & libc::O_NONBLOCK != 0,
            "a pages member's socket is non-blocking (before 7.0)"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.pipe_stats().in_use > 3 && Instant::now() < deadline {
        d.wait(Some(Duration::from_millis(10))).unwrap();
    }
    d.cancel_fd(&s);
    let mut ends = 0;
    let mut results = Vec::new();
    pump(&mut d, 30, |c| {
        match c.event {
            Event::PagesReturned => ends += 1,
            Event::Sent { result, .. } => results.push(result),
            Event::LeaseFilled { .. } => {}
            other => panic!("{other:?}"),
        }
        ends == 3
    });
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    assert_eq!(d.pipe_stats().in_use, 0);
    // A driver dropped with members splicing to a client that does not read.
    let (s, _peer) = small_pair();
    let s = Fd::from(s);
    for g in 0..2 {
        d.lease(&file, pages(len), 0, vec![Member::send(&s, 20 + g)], 95 + g)
            .unwrap();
    }
    d.submit().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(d);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(ringpool::leaked_ops(), 0);
}

fn a_thousand_members_share_one_chunk() {
    if !supported() {
        return;
    }
    let mut d = driver();
    let data = pattern_vec(10, 0, 4096);
    let (_f, src) = file_with(&data);
    let pairs: Vec<_> = (0..1000).map(|_| tcp_pair()).collect();
    let members = pairs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| Member::send(&Fd::from(s.try_clone().unwrap()), i as u64))
        .collect();
    d.lease(&src, pages(4096), 0, members, 5000).unwrap();
    let o = run_group(&mut d, 5000);
    assert_eq!(o.members.len(), 1000);
    assert!(o.members.values().all(|r| *r.as_ref().unwrap() == 4096));
    for (_, mut peer) in pairs {
        let mut v = vec![0u8; 4096];
        peer.read_exact(&mut v).unwrap();
        assert!(v == data);
    }
    let s = d.pipe_stats();
    assert_eq!(s.in_use, 0);
    assert!(s.idle >= 1001, "{s:?}");
}

fn sixty_four_mib_to_sixteen_clients_byte_checked() {
    if !supported() {
        return;
    }
    // The kernel-matrix guests emulate their CPU: a smaller file there.
    let len: usize = if in_emulated_guest() {
        4 << 20
    } else {
        64 << 20
    };
    const CLIENTS: usize = 16;
    const CHUNK: usize = 256 << 10;
    const IN_FLIGHT: usize = 4;
    let data = pattern_vec(11, 0, len);
    let want = checksum(&data);
    let (_f, src) = file_with(&data);
    drop(data);
    let mut d = driver();
    let pairs: Vec<_> = (0..CLIENTS).map(|_| tcp_pair()).collect();
    let socks: Vec<Fd> = pairs
        .iter()
        .map(|(s, _)| Fd::from(s.try_clone().unwrap()))
        .collect();
    let readers: Vec<_> = pairs
        .into_iter()
        .map(|(_, mut p)| {
            std::thread::spawn(move || {
                p.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut all = Vec::with_capacity(len);
                p.read_to_end(&mut all).unwrap();
                checksum(&all)
            })
        })
        .collect();
    // One leader at a time (members on a socket splice in their leaders' completion order),
    // up to IN_FLIGHT groups whose members overlap.
    let (mut next, mut in_flight, mut done, mut reading) = (0usize, 0usize, 0usize, false);
    let chunks = len.div_ceil(CHUNK);
    let start = Instant::now();
    while done < chunks {
        if !reading && in_flight < IN_FLIGHT && next < chunks {
            let members = socks
                .iter()
                .enumerate()
                .map(|(i, s)| Member::send(s, i as u64))
                .collect();
            d.lease(&src, pages(CHUNK), (next * CHUNK) as u64, members, 1 << 32)
                .unwrap();
            next += 1;
            in_flight += 1;
            reading = true;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "too slow");
        d.wait(Some(Duration::from_millis(100))).unwrap();
        while let Some(c) = d.pop() {
            match c.event {
                Event::LeaseFilled { result, .. } => {
                    assert_eq!(result.unwrap(), CHUNK);
                    reading = false;
                }
                Event::Sent { result, .. } => assert_eq!(result.unwrap(), CHUNK),
                Event::PagesReturned => {
                    in_flight -= 1;
                    done += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    drop(socks);
    for r in readers {
        assert_eq!(
            join_while_waiting(&mut d, r),
            want,
            "a client's copy differs"
        );
    }
    let s = d.pipe_stats();
    assert_eq!(s.in_use, 0);
    assert!(
        s.made <= ((IN_FLIGHT + 1) * (CLIENTS + 1)) as u64,
        "pipes are reused: {s:?}"
    );
    eprintln!(
        "{} MiB to {CLIENTS} clients in {:?}: {s:?}",
        len >> 20,
        start.elapsed()
    );
}

/// The default path runs every member's tee and splice to a socket in the driver's thread (no
/// SQE but polls for them); `Force::NoInlineSplice` makes each one an SQE. Both deliver the
/// same bytes.
#[test]
fn members_splice_in_the_driver_s_thread_unless_forced_into_sqes() {
    if !supported() {
        return;
    }
    let data = pattern_vec(21, 0, 256 << 10);
    let (_f, src) = file_with(&data);
    for io_wq in [false, true] {
        // Timed waits as on 5.10 (a timeout op each): the waits below must not count them.
        let config = DriverConfig::default()
            .ignore_env()
            .force(ringpool::Force::NoExtArg);
        let config = if io_wq {
            config.force(ringpool::Force::NoInlineSplice)
        } else {
            config
        };
        let mut d = Driver::new(config).unwrap();
        assert_eq!(d.ladder().inline_splice, !io_wq);
        let socks: Vec<_> = (0..4).map(|_| tcp_pair()).collect();
        let members = socks
            .iter()
            .enumerate()
            .map(|(i, (s, _))| Member::send(&Fd::from(s.try_clone().unwrap()), i as u64))
            .collect();
        d.lease(&src, pages(data.len()), 0, members, 9).unwrap();
        let readers: Vec<_> = socks
            .into_iter()
            .map(|(_, peer)| reader(peer, Some(data.len())))
            .collect();
        // Untimed waits: a timed one pushes a timeout SQE where the kernel lacks EXT_ARG (5.10).
        let mut o = Outcome::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while o.returns == 0 {
            assert!(Instant::now() < deadline, "the group never ended: {o:?}");
            d.wait(None).unwrap();
            while let Some(c) = d.pop() {
                record(&mut o, 9, c);
            }
        }
        let (s, polls) = (d.stats(), d.pipe_stats().eagain_polls);
        assert!(o
            .members
            .values()
            .all(|r| *r.as_ref().unwrap() == data.len()));
        for r in readers {
            assert!(r.join().unwrap() == data, "a socket got other bytes");
        }
        assert_eq!(d.pipe_stats().in_use, 0);
        if io_wq {
            assert_eq!(s.inline_steps, 0, "{s:?}");
            assert!(s.sqes > 2 * 4, "a leader, 4 tees, 4 splices: {s:?}");
        } else {
            assert!(
                s.inline_steps >= 2 * 4,
                "4 tees and 4 splices at least: {s:?}"
            );
            // Every SQE but the leader's splices is a poll of a step that said EAGAIN.
            assert!(s.sqes - polls < 4, "{polls} polls: {s:?}");
        }
    }
}

common::both_splice_paths!(
    members_start_after_the_leader_and_each_gets_the_same_bytes,
    a_short_leader_read_lends_exactly_the_bytes_there_are,
    a_failed_leader_cancels_every_member_and_a_directory_is_a_typed_error,
    a_pages_lease_s_idle_pipes_are_closed_a_second_after_it_ended,
    one_member_failing_leaves_the_others_alone,
    a_client_that_disconnects_mid_splice_fails_alone,
    a_file_that_shrinks_while_served_gives_members_what_each_leader_found,
    a_client_that_stops_reading_holds_only_its_own_member,
    eagain_from_non_blocking_descriptors_is_retried_never_data,
    a_socket_leader_lends_what_arrived,
    chunks_leased_back_to_back_reach_each_socket_in_order,
    chunks_leased_back_to_back_reach_each_non_blocking_socket_in_order,
    cancelling_reaches_the_leader_members_in_line_and_a_dropped_driver,
    a_thousand_members_share_one_chunk,
    sixty_four_mib_to_sixteen_clients_byte_checked,
);
