//! Lease groups on the async layer against the real kernel: a file leased chunk by chunk to
//! several loopback TCP clients (every copy checksummed), a failing leader that cancels its
//! members, and lease groups dropped mid-flight (leader reading, or a member stuck on a client
//! that does not read) that leak no op and give their buffer back to the kernel's table.

mod common;

use std::io::Read;
use std::net::TcpStream as StdStream;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{pattern_vec, tcp_pair};
use ringpool::rt::{self, File, LeaseMember, TcpStream};
use ringpool::{Error, Fd};

/// A position-sensitive checksum (FNV-1a over the bytes) and the length.
fn checksum(bytes: &[u8]) -> (u64, usize) {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h, bytes.len())
}

/// Reads a peer to EOF on a thread.
fn drain(mut peer: StdStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        peer.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut all = Vec::new();
        peer.read_to_end(&mut all).unwrap();
        all
    })
}

fn stream(s: StdStream) -> TcpStream {
    TcpStream::from_fd(Fd::from(s))
}

/// Registered slots in use on this thread's driver.
fn used_slots() -> u32 {
    rt::with_driver(|d| d.fixed_stats().used)
}

/// Waits (bounded) until `f` holds, letting the runtime route completions meanwhile.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        rt::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_file_leased_chunk_by_chunk_to_four_clients_gives_each_an_identical_copy() {
    const LEN: usize = (6 << 20) + 4321; // the last chunk is short
    const CHUNK: usize = 1 << 20;
    const CLIENTS: usize = 4;
    let data = pattern_vec(80, 0, LEN);
    let mut tmp = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut tmp, &data).unwrap();
    let mut readers = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..CLIENTS {
        let (s, peer) = tcp_pair();
        ours.push(s);
        readers.push(drain(peer));
    }
    let chunks_read = rt::block_on(async move {
        let file = File::from(tmp);
        let clients: Vec<TcpStream> = ours.into_iter().map(stream).collect();
        // Two buffers: chunk k + 1 is read while chunk k is still being sent.
        let mut free = vec![rt::fixed_buf(CHUNK).unwrap(), rt::fixed_buf(CHUNK).unwrap()];
        let mut in_flight: Vec<rt::LeaseGroup> = Vec::new();
        let (mut offset, mut chunks) = (0u64, 0);
        loop {
            let buf = match free.pop() {
                Some(b) => b,
                None => {
                    let g = in_flight.remove(0);
                    for i in 0..g.len() {
                        assert_eq!(g.member(i).await.unwrap(), CHUNK, "member {i}");
                    }
                    g.returned().await
                }
            };
            // Half the clients get zero-copy sends, half plain ones.
            let members = clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        LeaseMember::send_zc(c)
                    } else {
                        LeaseMember::send(c)
                    }
                })
                .collect();
            let g = rt::lease_group(&file, buf, offset, members).unwrap();
            let n = g.filled().await.unwrap();
            if n == 0 {
                drop(g.returned().await);
                break;
            }
            chunks += 1;
            offset += n as u64;
            if n < CHUNK {
                for i in 0..g.len() {
                    assert_eq!(g.member(i).await.unwrap(), n);
                }
                drop(g.returned().await);
                break;
            }
            in_flight.push(g);
        }
        for g in in_flight {
            for i in 0..g.len() {
                assert_eq!(g.member(i).await.unwrap(), CHUNK);
            }
            let buf = g.returned().await;
            assert_eq!(buf.len(), CHUNK);
        }
        chunks
        // The clients' streams close here: the peers read EOF.
    })
    .unwrap();
    assert_eq!(chunks_read, LEN.div_ceil(CHUNK));
    let expected = checksum(&data);
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(checksum(&r.join().unwrap()), expected, "client {i}");
    }
}

#[test]
fn a_failing_leader_cancels_its_members_and_returns_the_buffer() {
    let (s, peer) = tcp_pair();
    let reader = drain(peer);
    let out = tempfile::tempfile().unwrap();
    let check = out.try_clone().unwrap();
    rt::block_on(async move {
        // Reading a directory fails with EISDIR.
        let dir = File::from(std::fs::File::open(std::env::temp_dir()).unwrap());
        let client = stream(s);
        let out = File::from(out);
        let members = vec![
            LeaseMember::send_zc(&client),
            LeaseMember::send(&client),
            LeaseMember::write(&out, 0),
        ];
        let g = rt::lease_group(&dir, rt::fixed_buf(4096).unwrap(), 0, members).unwrap();
        // The buffer first: it does not need the other results to have been taken.
        let buf = g.returned().await;
        assert_eq!(buf.len(), 4096);
        let err = g.filled().await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR), "{err}");
        for i in 0..g.len() {
            let r = g.member(i).await;
            assert!(matches!(r, Err(Error::Cancelled)), "member {i}: {r:?}");
            assert!(!g.holds(i));
        }
    })
    .unwrap();
    assert_eq!(check.metadata().unwrap().len(), 0, "no member wrote");
    assert!(reader.join().unwrap().is_empty(), "no member sent");
}

#[test]
fn a_group_dropped_while_its_leader_reads_cancels_it_and_frees_the_buffer() {
    let before = ringpool::leaked_ops();
    let (src, _src_peer) = tcp_pair(); // the leader reads a socket nobody writes to
    let (dst, peer) = tcp_pair();
    let reader = drain(peer);
    rt::block_on(async move {
        let src = File::from_fd(Fd::from(OwnedFd::from(src)));
        let client = stream(dst);
        let buf = rt::fixed_buf(1 << 16).unwrap();
        let registered = buf.slot().is_some();
        let used = used_slots();
        let g = rt::lease_group(&src, buf, u64::MAX, vec![LeaseMember::send_zc(&client)]);
        let g = g.unwrap();
        let r = rt::timeout(Duration::from_millis(50), g.filled()).await;
        assert!(matches!(r, Err(Error::TimedOut)), "{r:?}");
        assert!(g.holds(0), "the member waits for its leader");
        drop(g);
        if registered {
            eventually("the buffer's slot is released", || used_slots() < used).await;
        }
        // The runtime goes on serving.
        client.write_all(b"still here".to_vec()).await.unwrap();
    })
    .unwrap();
    assert_eq!(ringpool::leaked_ops(), before);
    assert_eq!(reader.join().unwrap(), b"still here", "no member ran");
}

#[test]
fn a_group_dropped_while_a_member_is_stuck_cancels_it_and_frees_the_buffer() {
    const LEN: usize = 16 << 20; // far more than a socket buffer holds
    let before = ringpool::leaked_ops();
    let mut tmp = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut tmp, &pattern_vec(81, 0, LEN)).unwrap();
    let (stuck, stuck_peer) = tcp_pair(); // never read until the end
    let (ok, ok_peer) = tcp_pair();
    let reader = drain(ok_peer);
    rt::block_on(async move {
        let file = File::from(tmp);
        let (stuck, ok) = (stream(stuck), stream(ok));
        let buf = rt::fixed_buf(LEN).unwrap();
        let registered = buf.slot().is_some();
        let used = used_slots();
        let ops = rt::with_driver(|d| d.in_flight());
        let members = vec![LeaseMember::send_zc(&stuck), LeaseMember::send(&ok)];
        let g = Rc::new(rt::lease_group(&file, buf, 0, members).unwrap());
        assert_eq!(g.filled().await.unwrap(), LEN);
        assert_eq!(
            g.member(1).await.unwrap(),
            LEN,
            "the reading client got it all"
        );
        let r = rt::timeout(Duration::from_millis(100), g.member(0)).await;
        assert!(matches!(r, Err(Error::TimedOut)), "{r:?}");
        assert!(g.holds(0) && !g.holds(1));
        // A task waiting for the buffer goes away with the last clone of the group.
        let waiter = rt::spawn({
            let g = g.clone();
            async move {
                let _ = rt::timeout(Duration::from_millis(20), g.returned()).await;
            }
        });
        waiter.await;
        drop(g);
        // The stuck send was cancelled, with both sockets still open.
        eventually("the stuck member is cancelled", || {
            rt::with_driver(|d| d.in_flight()) == ops
        })
        .await;
        // What the cancelled send had queued stays in the peer's socket until it is closed.
        drop(stuck);
        drop(stuck_peer);
        if registered {
            eventually("the buffer's slot is released", || used_slots() < used).await;
        }
    })
    .unwrap();
    assert_eq!(ringpool::leaked_ops(), before);
    assert_eq!(
        checksum(&reader.join().unwrap()),
        checksum(&pattern_vec(81, 0, LEN))
    );
}

#[test]
fn the_leader_and_the_buffer_can_be_awaited_from_different_tasks() {
    let (s, peer) = tcp_pair();
    let reader = drain(peer);
    let (src, mut src_peer) = tcp_pair();
    let got = rt::block_on(async move {
        let src = File::from_fd(Fd::from(OwnedFd::from(src)));
        let client = stream(s);
        let g = Rc::new(
            rt::lease_group(
                &src,
                rt::fixed_buf(64).unwrap(),
                u64::MAX,
                vec![LeaseMember::send_zc(&client)],
            )
            .unwrap(),
        );
        // Two tasks wait on the group's one token: the buffer's first, then the leader's.
        let back = rt::spawn({
            let g = g.clone();
            async move { g.returned().await.len() }
        });
        let filled = rt::spawn({
            let g = g.clone();
            async move { g.filled().await.unwrap() }
        });
        rt::sleep(Duration::from_millis(20)).await;
        std::io::Write::write_all(&mut src_peer, &[7u8; 64]).unwrap();
        let n = filled.await;
        assert_eq!(g.member(0).await.unwrap(), n);
        let len = back.await;
        assert_eq!(len, 64);
        n
    })
    .unwrap();
    assert_eq!(got, 64);
    assert_eq!(reader.join().unwrap(), vec![7u8; 64]);
}
