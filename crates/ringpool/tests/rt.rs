//! The async layer against the real kernel: an echo of many connections with every byte
//! checked, a dropped receive future that cancels its op and loses nothing, timers, and a
//! runtime dropped with tasks still waiting.

mod common;

use std::cell::RefCell;
use std::future::Future;
use std::io::{Read, Write};
use std::rc::Rc;
use std::time::Duration;

use common::{pattern_vec, tcp_pair};
use ringpool::rt::{self, TcpListener, TcpStream};
use ringpool::{BufGroupConfig, Error, Fd};

#[test]
fn an_echo_of_eight_connections_returns_every_byte() {
    const CONNS: u64 = 8;
    const LEN: usize = 1 << 20;
    rt::block_on(async {
        let server_group = rt::buf_group(BufGroupConfig::new(4096, 64)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let sg = server_group.clone();
        rt::spawn(async move {
            loop {
                let stream = listener.accept().await.unwrap();
                let g = sg.clone();
                rt::spawn(async move {
                    while let Some(chain) = stream.recv(&g).await.unwrap() {
                        stream.send_zc(chain).await.unwrap();
                    }
                });
            }
        });
        let client_group = rt::buf_group(BufGroupConfig::new(4096, 256)).unwrap();
        let clients: Vec<_> = (0..CONNS)
            .map(|c| {
                let g = client_group.clone();
                rt::spawn(async move {
                    let s = Rc::new(TcpStream::connect(addr).await.unwrap());
                    let data = pattern_vec(c, 0, LEN);
                    let w = s.clone();
                    let sent = data.clone();
                    let writer = rt::spawn(async move {
                        for chunk in sent.chunks(64 << 10) {
                            w.write_all(chunk.to_vec()).await.unwrap();
                        }
                    });
                    let mut got = Vec::with_capacity(LEN);
                    while got.len() < LEN {
                        let chain = s.recv(&g).await.unwrap().expect("echo ended early");
                        got.extend(chain.to_vec());
                    }
                    writer.await;
                    assert!(got == data, "connection {c}: bytes differ");
                })
            })
            .collect();
        for c in clients {
            c.await;
        }
        // Buffers are back once the echo's zero-copy notifications are in.
        for _ in 0..100 {
            if server_group.stats().in_user == 0 && client_group.stats().in_user == 0 {
                break;
            }
            rt::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server_group.stats().in_user, 0);
        assert_eq!(client_group.stats().in_user, 0);
    })
    .unwrap();
}

#[test]
fn a_dropped_receive_future_cancels_its_op_and_loses_nothing() {
    let (ours, mut peer) = tcp_pair();
    rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(4096, 8)).unwrap();
        let stream = TcpStream::from_fd(Fd::from(ours));
        let r = rt::timeout(Duration::from_millis(50), stream.recv(&g)).await;
        assert!(matches!(r, Err(Error::TimedOut)), "{r:?}");
        // The cancelled receive took no buffer and left the data where it was.
        peer.write_all(b"after the cancel").unwrap();
        let chain = stream.recv(&g).await.unwrap().unwrap();
        assert_eq!(chain.to_vec(), b"after the cancel");
        drop(chain);
        let s = g.stats();
        assert_eq!((s.in_user, s.in_kernel), (0, s.total));
        drop(peer);
        assert!(stream.recv(&g).await.unwrap().is_none(), "EOF");
    })
    .unwrap();
}

#[test]
fn timers_fire_in_deadline_order() {
    let order = Rc::new(RefCell::new(Vec::new()));
    let o = order.clone();
    rt::block_on(async move {
        let tasks: Vec<_> = [30u64, 10, 20]
            .into_iter()
            .map(|ms| {
                let o = o.clone();
                rt::spawn(async move {
                    rt::sleep(Duration::from_millis(ms)).await;
                    o.borrow_mut().push(ms);
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    })
    .unwrap();
    assert_eq!(*order.borrow(), vec![10, 20, 30]);
}

#[test]
fn a_runtime_dropped_with_tasks_waiting_on_the_kernel_leaks_nothing() {
    let before = ringpool::leaked_ops();
    let (ours, mut peer) = tcp_pair();
    rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(4096, 8)).unwrap();
        let stream = TcpStream::from_fd(Fd::from(ours));
        rt::spawn(async move {
            let _ = stream.recv(&g).await; // never completes: the runtime ends first
        });
        rt::sleep(Duration::from_millis(20)).await;
    })
    .unwrap();
    assert_eq!(ringpool::leaked_ops(), before);
    // The socket was closed with the runtime: the peer sees EOF.
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(peer.read(&mut b).unwrap(), 0);
}

#[test]
fn a_file_written_and_read_back_through_registered_memory() {
    rt::block_on(async {
        let file = rt::File::from(tempfile::tempfile().unwrap());
        let mut buf = rt::fixed_buf(1 << 20).unwrap();
        buf.copy_from_slice(&pattern_vec(50, 0, 1 << 20));
        let (buf, n) = file.write_fixed(buf, 0..(1 << 20), 0).await;
        assert_eq!(n.unwrap(), 1 << 20);
        let back = rt::fixed_buf(1 << 20).unwrap();
        let (back, n) = file.read_fixed(back, 0..(1 << 20), 0).await;
        assert_eq!(n.unwrap(), 1 << 20);
        assert!(back[..] == buf[..]);
        let (_, err) = file.read_fixed(back, 10..(2 << 20), 0).await;
        assert!(matches!(err, Err(Error::InvalidArgument { .. })));
    })
    .unwrap();
}

#[test]
fn launch_runs_one_ring_per_thread_each_serving_its_own_echo() {
    let outs = rt::launch(2, |i| async move {
        let group = rt::buf_group(BufGroupConfig::new(4096, 16)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        rt::spawn(async move {
            let s = listener.accept().await.unwrap();
            while let Some(chain) = s.recv(&group).await.unwrap() {
                s.send_zc(chain).await.unwrap();
            }
        });
        let c = TcpStream::connect(addr).await.unwrap();
        let data = pattern_vec(60 + i as u64, 0, 100_000);
        c.write_all(data.clone()).await.unwrap();
        let mine = rt::buf_group(BufGroupConfig::new(4096, 64)).unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            got.extend(c.recv(&mine).await.unwrap().unwrap().to_vec());
        }
        assert!(got == data, "thread {i}");
        (i, std::thread::current().id())
    })
    .unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!((outs[0].0, outs[1].0), (0, 1));
    assert_ne!(outs[0].1, outs[1].1, "one thread each");
}

#[test]
fn async_read_and_write_adapters_carry_every_byte() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    rt::block_on(async {
        let group = rt::buf_group(BufGroupConfig::new(4096, 16)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let g = group.clone();
        let server = rt::spawn(async move {
            let s = listener.accept().await.unwrap();
            let mut all = Vec::new();
            s.reader(g).read_to_end(&mut all).await.unwrap();
            all
        });
        let c = TcpStream::connect(addr).await.unwrap();
        let data = pattern_vec(70, 0, 1 << 20);
        let mut w = c.writer();
        for chunk in data.chunks(10_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.close().await.unwrap();
        assert!(server.await == data);
        assert_eq!(group.stats().in_user, 0);
    })
    .unwrap();
}

/// Regression (found on 5.10 in the kernel matrix): a receive whose future was dropped after
/// the kernel had already taken data off the socket lost that data; the next receive then
/// waited forever.
#[test]
fn a_receive_dropped_after_its_data_arrived_hands_the_data_to_the_next_receive() {
    let (ours, mut peer) = tcp_pair();
    rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(4096, 8)).unwrap();
        let stream = TcpStream::from_fd(Fd::from(ours));
        peer.write_all(b"taken before the cancel").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        {
            let mut fut = std::pin::pin!(stream.recv(&g));
            // Poll once (the receive is queued), let the kernel complete it (the data is
            // there), and drop the future before the runtime routes the completion.
            std::future::poll_fn(|cx| {
                let _ = fut.as_mut().poll(cx);
                std::task::Poll::Ready(())
            })
            .await;
            rt::with_driver(|d| d.submit()).unwrap();
        }
        let next = rt::timeout(Duration::from_secs(5), stream.recv(&g)).await;
        let chain = next.expect("the data was lost").unwrap().unwrap();
        assert_eq!(chain.to_vec(), b"taken before the cancel");
    })
    .unwrap();
}

/// Regression (found by the `fanout --rt` work): a sleep dropped before its deadline (as
/// `timeout` drops it when its future wins) left its timer behind, which later woke the runtime
/// for nothing at that deadline.
#[test]
fn a_sleep_dropped_early_leaves_no_timer_behind() {
    rt::block_on(async {
        // 50 timeouts whose futures win after one pending poll (so each timeout's sleep was
        // polled, and registered its timer): the sleeps (1..=50 ms) are dropped early.
        for ms in 1..=50 {
            let mut yielded = false;
            let once = std::future::poll_fn(move |cx| {
                if std::mem::replace(&mut yielded, true) {
                    std::task::Poll::Ready(7)
                } else {
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                }
            });
            let r = rt::timeout(Duration::from_millis(ms), once).await;
            assert_eq!(r.unwrap(), 7);
        }
        let enters = rt::with_driver(|d| d.stats().enters);
        rt::sleep(Duration::from_millis(100)).await;
        let woke = rt::with_driver(|d| d.stats().enters) - enters;
        assert!(
            woke < 20,
            "{woke} wake-ups in one sleep: stale timers fired"
        );
    })
    .unwrap();
}

/// Found by the proxy bench (`proxy --rt` dropped its receive at every send completion and
/// started another at once; 5 to 266 mismatching reads per second of traffic): a receive
/// started while a dropped one was still in the kernel can take earlier bytes than the dropped
/// one (with `DEFER_TASKRUN` the new one can run inline at submit while the old one's wake-up
/// waits), and the dropped one's later bytes, handed out first as leftovers, overtook them. A
/// new receive now waits until the stream's dropped receives have finished. This test drops
/// receives at random points while a peer streams numbered bytes and checks the order; on this
/// machine it did not hit the race without the fix (the bench did), so it guards the path
/// rather than replaying the exact interleaving.
#[test]
fn receives_dropped_mid_stream_keep_the_bytes_in_order() {
    // Small enough for the kernel-matrix guests (emulated, several times slower).
    const LEN: usize = 4 << 20;
    let (ours, mut peer) = tcp_pair();
    let writer = std::thread::spawn(move || {
        for chunk in pattern_vec(70, 0, LEN).chunks(4096) {
            peer.write_all(chunk).unwrap();
        }
    });
    rt::block_on(async move {
        // A large group: Debian's 5.10 loses the legacy provided buffer of each cancelled receive
        // (matrix: a 64-buffer group ran dry after ~60 dropped receives and the test hung;
        // with 4,096 it passes in 1 s), which is not what this test is about.
        let g = rt::buf_group(BufGroupConfig::new(4096, 4096)).unwrap();
        let stream = TcpStream::from_fd(Fd::from(ours));
        let mut got = Vec::with_capacity(LEN);
        let mut dropped = 0u32;
        while got.len() < LEN {
            match rt::timeout(Duration::from_micros(200), stream.recv_one(&g)).await {
                Ok(r) => got.extend(r.unwrap().expect("the stream ended early").to_vec()),
                Err(_) => dropped += 1,
            }
        }
        assert!(
            got == pattern_vec(70, 0, LEN),
            "bytes out of order ({dropped} receives dropped)"
        );
        eprintln!("{dropped} receives dropped mid-stream");
    })
    .unwrap();
    writer.join().unwrap();
}

/// Regression (review): a waker called on another thread (a channel's sender) queued the task
/// but left the runtime asleep in the kernel until its next completion or its 100 ms idle
/// timeout. Now the waker wakes the runtime's ring (an eventfd read): twenty hand-offs from
/// another thread take milliseconds, not twenty idle timeouts.
#[test]
fn a_task_woken_from_another_thread_runs_without_waiting_for_the_idle_timeout() {
    const HANDOFFS: u32 = 20;
    let (to_rt, from_thread) = futures::channel::mpsc::unbounded::<u32>();
    let (to_thread, from_rt) = std::sync::mpsc::channel::<u32>();
    let thread = std::thread::spawn(move || {
        for i in 0..HANDOFFS {
            to_rt.unbounded_send(i).unwrap();
            assert_eq!(from_rt.recv().unwrap(), i); // the runtime answered
        }
    });
    let took = rt::block_on(async move {
        use futures::StreamExt as _;
        let mut from_thread = from_thread;
        let start = std::time::Instant::now();
        for i in 0..HANDOFFS {
            // Nothing else runs: the runtime sleeps in `wait` until the waker wakes it.
            assert_eq!(from_thread.next().await, Some(i));
            to_thread.send(i).unwrap();
        }
        start.elapsed()
    })
    .unwrap();
    thread.join().unwrap();
    assert!(
        took < Duration::from_millis(50 * u64::from(HANDOFFS)),
        "{HANDOFFS} hand-offs took {took:?} (an idle timeout is 100 ms)"
    );
}

/// Regression (review): keeping the remote wake-up read armed made it count as an op in flight,
/// so an untimed `wait` on a runtime's driver with nothing else in flight never returned.
#[test]
fn an_untimed_wait_on_an_idle_runtime_driver_returns_at_once() {
    let took = rt::block_on(async {
        let start = std::time::Instant::now();
        rt::with_driver(|d| d.wait(None)).unwrap();
        start.elapsed()
    })
    .unwrap();
    assert!(took < Duration::from_secs(1), "{took:?}");
}
