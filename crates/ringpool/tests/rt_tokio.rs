//! tokio's `AsyncRead`/`AsyncWrite` on the async layer's reader and writer (the `tokio`
//! feature), driven by ringpool's runtime against the real kernel: an echo of several MiB
//! through `read_exact`/`write_all` with a checksum end to end, `shutdown` giving the peer end
//! of stream, and `tokio::io::copy` from one ringpool stream into another. Every test ends
//! with its buffer group full again.
#![cfg(feature = "tokio")]

mod common;

use std::io::Write;
use std::rc::Rc;
use std::time::Duration;

use common::{pattern_vec, read_to_end, tcp_pair};
use ringpool::rt::{self, TcpListener, TcpStream};
use ringpool::{BufGroup, BufGroupConfig, Fd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}
const FNV_START: u64 = 0xCBF2_9CE4_8422_2325;

/// Waits (bounded) until every buffer of `group` is back in the kernel's hands, then asserts it.
async fn assert_full(group: &BufGroup) {
    for _ in 0..100 {
        let s = group.stats();
        if (s.in_user, s.in_kernel) == (0, s.total) {
            return;
        }
        rt::sleep(Duration::from_millis(10)).await;
    }
    let s = group.stats();
    assert_eq!(
        (s.in_user, s.in_kernel),
        (0, s.total),
        "group not full again"
    );
}

#[test]
fn an_echo_of_several_mib_through_read_exact_and_write_all_keeps_its_checksum() {
    const LEN: usize = 6 << 20;
    rt::block_on(rt::timeout(Duration::from_secs(60), async {
        let server_group = rt::buf_group(BufGroupConfig::new(4096, 64)).unwrap();
        let client_group = rt::buf_group(BufGroupConfig::new(4096, 64)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let sg = server_group.clone();
        // The echo: whatever arrives goes back, until end of stream; then it shuts down too.
        let server = rt::spawn(async move {
            let s = listener.accept().await.unwrap();
            let (mut r, mut w) = (s.reader(sg), s.writer());
            let mut buf = vec![0; 50_000];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let s = Rc::new(TcpStream::connect(addr).await.unwrap());
        let data = pattern_vec(5, 0, LEN);
        let sent = fnv1a(FNV_START, &data);
        let ws = s.clone();
        let writer = rt::spawn(async move {
            let mut w = ws.writer();
            // Odd sizes, so writes and reads never line up with the pool's buffers.
            for chunk in data.chunks(100_003) {
                w.write_all(chunk).await.unwrap();
            }
            w.flush().await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut r = s.reader(client_group.clone());
        let mut chunk = vec![0; 77_777];
        let (mut got, mut received) = (0, FNV_START);
        while got < LEN {
            let n = chunk.len().min(LEN - got);
            r.read_exact(&mut chunk[..n]).await.unwrap();
            received = fnv1a(received, &chunk[..n]);
            got += n;
        }
        // The echo saw our shutdown as end of stream and shut down in turn.
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0, "end of stream");
        writer.await;
        server.await;
        assert_eq!(received, sent, "checksum of the echoed bytes");
        assert_full(&server_group).await;
        assert_full(&client_group).await;
    }))
    .unwrap()
    .expect("the echo timed out");
}

#[test]
fn shutdown_gives_the_peer_end_of_stream_and_leaves_the_stream_readable() {
    let (ours, mut peer) = tcp_pair();
    rt::block_on(async move {
        let ours = TcpStream::from_fd(Fd::from(ours));
        let mut w = ours.writer();
        w.write_all(b"last words").await.unwrap();
        w.shutdown().await.unwrap();
        // `ours` is still open: only the shutdown can end the peer's stream (read_to_end fails
        // after its timeout otherwise). Blocking here is fine: the write has completed.
        assert_eq!(read_to_end(peer.try_clone().unwrap()), b"last words");
        // Half closed: the other direction still works, read through tokio's traits.
        peer.write_all(b"a reply").unwrap();
        drop(peer);
        let g = rt::buf_group(BufGroupConfig::new(4096, 8)).unwrap();
        let mut all = Vec::new();
        let mut r = ours.reader(g.clone());
        let n = rt::timeout(Duration::from_secs(10), r.read_to_end(&mut all))
            .await
            .unwrap();
        assert_eq!((n.unwrap(), &all[..]), (7, &b"a reply"[..]));
        assert_full(&g).await;
    })
    .unwrap();
}

#[test]
fn tokio_copy_moves_a_stream_from_one_ringpool_socket_into_another() {
    const LEN: usize = 3 << 20;
    let (a, mut a_peer) = tcp_pair();
    let (b, b_peer) = tcp_pair();
    let data = pattern_vec(9, 0, LEN);
    let source = {
        let data = data.clone();
        std::thread::spawn(move || {
            a_peer.write_all(&data).unwrap();
            // Dropped: end of stream for `a`.
        })
    };
    let sink = std::thread::spawn(move || read_to_end(b_peer));
    let (a, b) = (
        TcpStream::from_fd(Fd::from(a)),
        TcpStream::from_fd(Fd::from(b)),
    );
    rt::block_on(async {
        let g = rt::buf_group(BufGroupConfig::new(4096, 16)).unwrap();
        let (mut r, mut w) = (a.reader(g.clone()), b.writer());
        let copy = rt::timeout(Duration::from_secs(60), tokio::io::copy(&mut r, &mut w));
        assert_eq!(copy.await.unwrap().unwrap(), LEN as u64);
        w.shutdown().await.unwrap();
        drop(r);
        assert_full(&g).await;
    })
    .unwrap();
    source.join().unwrap();
    let got = sink.join().unwrap();
    assert_eq!(got.len(), LEN);
    assert!(got == data, "copied bytes differ");
}
