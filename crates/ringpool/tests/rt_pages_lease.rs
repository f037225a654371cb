//! Pages leases on the async layer (`rt::lease` with `LeaseBacking::Pages`) against the real
//! kernel: a file leased chunk by chunk to loopback TCP clients (every copy checksummed), a
//! socket as the leader, a failing leader that cancels its members, and a group dropped while
//! a member is stuck on a client that does not read (nothing leaks, every pipe comes home).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream as StdStream;
use std::time::{Duration, Instant};

use common::{pattern_vec, require, tcp_pair};
use ringpool::rt::{self, File, LeaseMember, TcpStream};
use ringpool::{Error, Fd, Features, LeaseBacking};

fn supported() -> bool {
    let f = Features::get();
    require(
        f.opcode(io_uring::opcode::Splice::CODE) && f.opcode(io_uring::opcode::Tee::CODE),
        "IORING_OP_SPLICE and IORING_OP_TEE (pages leases)",
    )
}

/// A position-sensitive checksum (FNV-1a) and the length.
fn checksum(bytes: &[u8]) -> (u64, usize) {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h, bytes.len())
}

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

fn pages_in_use() -> usize {
    rt::with_driver(|d| d.pipe_stats().in_use)
}

#[test]
fn a_file_leased_in_pages_chunk_by_chunk_gives_each_client_an_identical_copy() {
    if !supported() {
        return;
    }
    const LEN: usize = (3 << 20) + 4321; // the last chunk is short
    const CHUNK: usize = 256 << 10;
    const CLIENTS: usize = 4;
    let data = pattern_vec(81, 0, LEN);
    let mut tmp = tempfile::tempfile().unwrap();
    tmp.write_all(&data).unwrap();
    let (ours, readers): (Vec<_>, Vec<_>) = (0..CLIENTS)
        .map(|_| {
            let (s, peer) = tcp_pair();
            (s, drain(peer))
        })
        .unzip();
    let chunks = rt::block_on(async move {
        let file = File::from(tmp);
        let clients: Vec<TcpStream> = ours.into_iter().map(stream).collect();
        // One leader at a time; up to two groups' members overlap.
        let mut in_flight: Vec<rt::LeaseGroup> = Vec::new();
        let (mut offset, mut chunks) = (0u64, 0);
        loop {
            if in_flight.len() == 2 {
                let g = in_flight.remove(0);
                for i in 0..g.len() {
                    assert_eq!(g.member(i).await.unwrap(), CHUNK, "member {i}");
                }
                assert!(g.done().await.is_none(), "a pages lease has no buffer");
            }
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
            let g = rt::lease(&file, LeaseBacking::Pages { len: CHUNK }, offset, members).unwrap();
            let n = g.filled().await.unwrap();
            if n == 0 {
                assert!(g.done().await.is_none());
                break;
            }
            chunks += 1;
            offset += n as u64;
            if n < CHUNK {
                for i in 0..g.len() {
                    assert_eq!(g.member(i).await.unwrap(), n);
                }
                g.done().await;
                break;
            }
            in_flight.push(g);
        }
        for g in in_flight {
            for i in 0..g.len() {
                assert_eq!(g.member(i).await.unwrap(), CHUNK);
            }
            g.done().await;
        }
        assert_eq!(pages_in_use(), 0);
        chunks
    })
    .unwrap();
    assert_eq!(chunks, LEN.div_ceil(CHUNK));
    let want = checksum(&data);
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(checksum(&r.join().unwrap()), want, "client {i}");
    }
}

#[test]
fn a_socket_leader_and_a_failing_leader_on_rt() {
    if !supported() {
        return;
    }
    let (src, mut writer) = tcp_pair();
    let (dst, peer) = tcp_pair();
    let reader = drain(peer);
    writer.write_all(b"relayed, not copied").unwrap();
    rt::block_on(async move {
        let src = stream(src);
        let dst = stream(dst);
        let g = rt::lease(
            &src,
            LeaseBacking::Pages { len: 4096 },
            u64::MAX,
            vec![LeaseMember::send(&dst)],
        )
        .unwrap();
        assert_eq!(g.filled().await.unwrap(), 19);
        assert_eq!(g.member(0).await.unwrap(), 19);
        assert!(g.done().await.is_none());
        // A directory cannot splice: a typed error, nothing started.
        let dir = File::from(std::fs::File::open(std::env::temp_dir()).unwrap());
        let e = rt::lease(&dir, LeaseBacking::Pages { len: 4096 }, 0, vec![]).err();
        assert!(matches!(e, Some(Error::NotSpliceable { .. })), "{e:?}");
        // A leader the kernel refuses (a file opened for writing only) cancels its members.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let wo = File::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open(tmp.path())
                .unwrap(),
        );
        let g = rt::lease(
            &wo,
            LeaseBacking::Pages { len: 4096 },
            0,
            vec![LeaseMember::send(&dst)],
        )
        .unwrap();
        let e = g.filled().await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert!(matches!(g.member(0).await, Err(Error::Cancelled)));
        assert!(g.done().await.is_none());
        assert_eq!(pages_in_use(), 0);
    })
    .unwrap();
    assert_eq!(reader.join().unwrap(), b"relayed, not copied");
}

#[test]
fn a_pages_group_dropped_with_a_stuck_member_leaks_nothing() {
    if !supported() {
        return;
    }
    let len = (1 << 20).min(
        ringpool::Driver::new(Default::default())
            .unwrap()
            .pipe_stats()
            .max_pipe,
    );
    let data = pattern_vec(82, 0, len);
    let mut tmp = tempfile::tempfile().unwrap();
    tmp.write_all(&data).unwrap();
    let (stuck, _stuck_peer) = tcp_pair();
    let (good, peer) = tcp_pair();
    let reader = drain(peer);
    rt::block_on(async move {
        let file = File::from(tmp);
        let (stuck, good) = (stream(stuck), stream(good));
        let members = vec![LeaseMember::send(&good), LeaseMember::send(&stuck)];
        let g = rt::lease(&file, LeaseBacking::Pages { len }, 0, members).unwrap();
        assert_eq!(g.filled().await.unwrap(), len);
        assert_eq!(g.member(0).await.unwrap(), len);
        drop(g); // the stuck member (if its socket is full) is cancelled
        let start = Instant::now();
        while pages_in_use() > 0 || rt::with_driver(|d| d.in_flight()) > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the pipes came home"
            );
            rt::sleep(Duration::from_millis(5)).await;
        }
    })
    .unwrap();
    assert!(reader.join().unwrap() == data);
    assert_eq!(ringpool::leaked_ops(), 0);
}
