//! Datagram receives against the real kernel (loopback UDP): each datagram in one buffer the
//! kernel picked, with its sender, on every rung; a dry group as backpressure; truncation;
//! bad input; and the async layer's `UdpSocket` (echo from the received buffers themselves, a
//! dropped receive that loses nothing).

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::time::Duration;

use common::{pattern_vec, pump, require_env, RUNGS};
use ringpool::rt::{self, UdpSocket};
use ringpool::{BufGroupConfig, Driver, Error, Event, Fd, RecvMode};

fn udp_fd(s: StdUdp) -> Fd {
    Fd::from(std::os::fd::OwnedFd::from(s))
}

/// Datagram `seq` of client `c`: a 5-byte header (client, sequence) and a pattern whose length
/// varies from 0 to 1,400 bytes (sequence 0 of every client is empty).
fn datagram(c: u8, seq: u32) -> Vec<u8> {
    let len = (seq as usize * 131) % 1401;
    let mut d = vec![c];
    d.extend(seq.to_le_bytes());
    d.extend(pattern_vec(u64::from(c) << 32 | u64::from(seq), 0, len));
    if seq == 0 {
        d.clear(); // an empty datagram is a datagram, not an end of stream
    }
    d
}

/// Three clients send 600 datagrams each (window of 48 in flight, so the socket never
/// overflows) to a multishot datagram receive; every one arrives whole, from its sender, and
/// the group is full again afterwards.
#[test]
fn every_datagram_arrives_whole_with_its_sender_on_every_rung() {
    const PER_CLIENT: u32 = 600;
    const WINDOW: usize = 48;
    for rung in RUNGS {
        let mut driver = rung.driver();
        let group = driver
            .buf_group(BufGroupConfig::new(2048, 64))
            .expect("group");
        let server = StdUdp::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let fd = udp_fd(server);
        driver
            .recv_from(&fd, &group, RecvMode::Multishot, 1)
            .unwrap();
        let clients: Vec<StdUdp> = (0..3)
            .map(|_| StdUdp::bind("127.0.0.1:0").unwrap())
            .collect();
        let senders: HashMap<SocketAddr, u8> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.local_addr().unwrap(), i as u8))
            .collect();
        let all: Vec<(u8, u32)> = (0..PER_CLIENT)
            .flat_map(|s| (0..3u8).map(move |c| (c, s)))
            .collect();
        let mut expected: HashMap<(u8, u32), Vec<u8>> = HashMap::new();
        let mut next = 0;
        let mut received = 0usize;
        let (mut empty_seen, mut bytes) = (0, 0usize);
        while received < all.len() {
            while next < all.len() && expected.len() < WINDOW {
                let (c, s) = all[next];
                let d = datagram(c, s);
                clients[c as usize].send_to(&d, addr).unwrap();
                expected.insert((c, s), d);
                next += 1;
            }
            pump(&mut driver, 10, |comp| {
                let Event::Datagram(d) = comp.event else {
                    panic!("rung {}: {:?}", rung.name, comp.event)
                };
                assert!(comp.more, "a multishot receive goes on");
                assert!(!d.truncated);
                let c = senders[&d.from.expect("sender")];
                let key = if d.data.is_empty() {
                    empty_seen += 1;
                    (c, 0)
                } else {
                    (
                        d.data[0],
                        u32::from_le_bytes(d.data[1..5].try_into().unwrap()),
                    )
                };
                assert_eq!(
                    key.0, c,
                    "rung {}: the sender is the client that sent it",
                    rung.name
                );
                let want = expected
                    .remove(&key)
                    .expect("a datagram sent once arrives once");
                assert!(
                    d.data[..] == want[..],
                    "rung {}: {key:?} differs",
                    rung.name
                );
                bytes += d.data.len();
                received += 1;
                expected.is_empty() || received == all.len()
            });
        }
        assert_eq!(empty_seen, 3, "rung {}: the empty datagrams", rung.name);
        let sent: usize = all.iter().map(|&(c, s)| datagram(c, s).len()).sum();
        assert_eq!(bytes, sent);
        let s = group.stats();
        assert_eq!((s.in_user, s.in_kernel), (0, s.total), "rung {}", rung.name);
    }
}

/// A group of 4 buffers, all 4 held by the user: the receive pauses (the 12 other datagrams
/// wait in the socket) and resumes when the buffers come back, with none lost or reordered.
#[test]
fn a_dry_group_pauses_datagram_receives_and_loses_none() {
    for rung in RUNGS {
        let mut driver = rung.driver();
        let group = driver.buf_group(BufGroupConfig::new(512, 4)).unwrap();
        let server = StdUdp::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let fd = udp_fd(server);
        driver
            .recv_from(&fd, &group, RecvMode::Multishot, 1)
            .unwrap();
        let client = StdUdp::bind("127.0.0.1:0").unwrap();
        for i in 0..16u8 {
            client.send_to(&[i; 100], addr).unwrap();
        }
        let mut held = Vec::new();
        pump(&mut driver, 5, |c| {
            let Event::Datagram(d) = c.event else {
                panic!("{:?}", c.event)
            };
            held.push(d);
            held.len() == 4
        });
        // Nothing more can arrive while every buffer is held.
        driver.wait(Some(Duration::from_millis(50))).unwrap();
        assert!(
            driver.pop().is_none(),
            "rung {}: no buffer, no datagram",
            rung.name
        );
        assert_eq!(group.stats().in_user, 4);
        let mut order: Vec<u8> = held.iter().map(|d| d.data[0]).collect();
        held.clear();
        pump(&mut driver, 5, |c| {
            let Event::Datagram(d) = c.event else {
                panic!("{:?}", c.event)
            };
            assert!(d.data.iter().all(|&b| b == d.data[0]) && d.data.len() == 100);
            order.push(d.data[0]);
            order.len() == 16
        });
        assert_eq!(order, (0..16).collect::<Vec<u8>>(), "rung {}", rung.name);
        assert!(
            group.stats().enobufs >= 1,
            "rung {}: the group ran dry",
            rung.name
        );
        assert_eq!(group.stats().in_user, 0);
    }
}

/// A datagram longer than a buffer's payload room (`buf_size − 44`, the same on every rung)
/// arrives cut to it and marked truncated; the next one is whole.
#[test]
fn a_datagram_longer_than_the_buffer_arrives_truncated_and_marked() {
    for rung in RUNGS {
        let mut driver = rung.driver();
        let group = driver.buf_group(BufGroupConfig::new(256, 4)).unwrap();
        let server = StdUdp::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let fd = udp_fd(server);
        driver
            .recv_from(&fd, &group, RecvMode::Multishot, 1)
            .unwrap();
        let client = StdUdp::bind("127.0.0.1:0").unwrap();
        let long = pattern_vec(9, 0, 1000);
        client.send_to(&long, addr).unwrap();
        client.send_to(b"short", addr).unwrap();
        let mut got = Vec::new();
        pump(&mut driver, 5, |c| {
            let Event::Datagram(d) = c.event else {
                panic!("{:?}", c.event)
            };
            got.push((d.data.to_vec(), d.truncated));
            got.len() == 2
        });
        assert_eq!(
            got[0],
            (long[..256 - 44].to_vec(), true),
            "rung {}",
            rung.name
        );
        assert_eq!(got[1], (b"short".to_vec(), false), "rung {}", rung.name);
    }
}

/// One-shot datagram receives end after one datagram; a connected socket's sends reach its
/// peer (and the sender is reported).
#[test]
fn a_single_datagram_receive_completes_once() {
    let mut driver = Driver::new(Default::default()).unwrap();
    let group = driver.buf_group(BufGroupConfig::new(2048, 4)).unwrap();
    let server = StdUdp::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let fd = udp_fd(server);
    driver.recv_from(&fd, &group, RecvMode::Once, 7).unwrap();
    let client = StdUdp::bind("127.0.0.1:0").unwrap();
    client.connect(addr).unwrap();
    client.send(b"one").unwrap();
    client.send(b"two").unwrap();
    let mut seen = Vec::new();
    pump(&mut driver, 5, |c| {
        assert_eq!(c.token, 7);
        assert!(!c.more, "a single receive ends with its datagram");
        let Event::Datagram(d) = c.event else {
            panic!("{:?}", c.event)
        };
        assert_eq!(d.from, Some(client.local_addr().unwrap()));
        seen.push(d.data.to_vec());
        true
    });
    assert_eq!(seen, vec![b"one".to_vec()]);
    driver.wait(Some(Duration::from_millis(30))).unwrap();
    assert!(
        driver.pop().is_none(),
        "the second datagram waits for another receive"
    );
    assert_eq!(driver.in_flight(), 0);
}

#[test]
fn buffers_too_small_bundles_and_incremental_groups_are_refused() {
    let mut driver = Driver::new(Default::default()).unwrap();
    let fd = udp_fd(StdUdp::bind("127.0.0.1:0").unwrap());
    let tiny = driver.buf_group(BufGroupConfig::new(44, 4)).unwrap();
    let err = driver
        .recv_from(&fd, &tiny, RecvMode::Multishot, 1)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferTooSmall {
                size: 44,
                min: 45,
                ..
            }
        ),
        "{err}"
    );
    let ok = driver.buf_group(BufGroupConfig::new(45, 4)).unwrap();
    for mode in [RecvMode::Bundle, RecvMode::MultishotBundle] {
        let err = driver.recv_from(&fd, &ok, mode, 1).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    let inc = driver
        .buf_group(BufGroupConfig::new(4096, 4).incremental(true))
        .unwrap();
    if inc.is_incremental() {
        let err = driver.recv_from(&fd, &inc, RecvMode::Once, 1).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    assert_eq!(driver.in_flight(), 0, "nothing was started");
}

#[test]
fn an_ipv6_sender_is_reported_as_such() {
    let Ok(server) = StdUdp::bind("[::1]:0") else {
        require_env(false, "IPv6 loopback");
        return;
    };
    let mut driver = Driver::new(Default::default()).unwrap();
    let group = driver.buf_group(BufGroupConfig::new(1024, 4)).unwrap();
    let addr = server.local_addr().unwrap();
    let fd = udp_fd(server);
    driver.recv_from(&fd, &group, RecvMode::Once, 1).unwrap();
    let client = StdUdp::bind("[::1]:0").unwrap();
    client.send_to(b"six", addr).unwrap();
    pump(&mut driver, 5, |c| {
        let Event::Datagram(d) = c.event else {
            panic!("{:?}", c.event)
        };
        assert_eq!(d.from, Some(client.local_addr().unwrap()));
        assert_eq!(&d.data[..], b"six");
        true
    });
}

/// The async layer: a server echoes every datagram from the buffer it arrived in (zero-copy
/// policy), 2,000 datagrams with a window of 32, every byte checked, both groups full after.
#[test]
fn an_rt_udp_echo_sends_back_every_datagram_from_its_own_buffer() {
    const N: u32 = 2000;
    rt::block_on(async {
        let server_group = rt::buf_group(BufGroupConfig::new(2048, 64)).unwrap();
        let server = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let sg = server_group.clone();
        let echo = rt::spawn(async move {
            let mut rx = server.recv_stream(&sg).unwrap();
            let mut n = 0;
            while n < N {
                let d = rx.next().await.unwrap().expect("the stream goes on");
                server.send_zc_to(d.data, d.from.unwrap()).await.unwrap();
                n += 1;
            }
        });
        let client_group = rt::buf_group(BufGroupConfig::new(2048, 64)).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        client.connect(addr).unwrap();
        let mut seq = 0;
        while seq < N {
            let batch: Vec<u32> = (seq..(seq + 32).min(N)).collect();
            for &s in &batch {
                client.send_zc(datagram(1, s)).await.unwrap();
            }
            let mut back = HashMap::new();
            for _ in &batch {
                let d = client.recv_from(&client_group).await.unwrap();
                assert_eq!(d.from, Some(addr));
                let s = if d.data.is_empty() {
                    0
                } else {
                    u32::from_le_bytes(d.data[1..5].try_into().unwrap())
                };
                back.insert(s, d.data.to_vec());
            }
            for &s in &batch {
                assert!(back[&s] == datagram(1, s), "datagram {s} differs");
            }
            seq += batch.len() as u32;
        }
        echo.await;
        for _ in 0..100 {
            if server_group.stats().in_user == 0 {
                break;
            }
            rt::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server_group.stats().in_user, 0);
        assert_eq!(client_group.stats().in_user, 0);
    })
    .unwrap();
}

/// A receive future dropped after the kernel delivered its datagram hands the datagram to the
/// socket's next receive; one dropped before anything arrived takes no buffer.
#[test]
fn a_dropped_datagram_receive_loses_no_datagram() {
    let peer = StdUdp::bind("127.0.0.1:0").unwrap();
    rt::block_on(async move {
        let g = rt::buf_group(BufGroupConfig::new(1024, 4)).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let r = rt::timeout(Duration::from_millis(30), socket.recv_from(&g)).await;
        assert!(matches!(r, Err(Error::TimedOut)), "{r:?}");
        assert_eq!(g.stats().in_user, 0, "a cancelled receive holds no buffer");
        peer.send_to(b"taken before the cancel", addr).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        {
            let mut fut = std::pin::pin!(socket.recv_from(&g));
            // Poll once (the receive is queued), let the kernel complete it (the datagram is
            // there), and drop the future before the runtime routes the completion.
            std::future::poll_fn(|cx| {
                let _ = std::future::Future::poll(fut.as_mut(), cx);
                std::task::Poll::Ready(())
            })
            .await;
            rt::with_driver(|d| d.submit()).unwrap();
        }
        let next = rt::timeout(Duration::from_secs(5), socket.recv_from(&g)).await;
        let d = next.expect("the datagram was lost").unwrap();
        assert_eq!(&d.data[..], b"taken before the cancel");
        assert_eq!(d.from, Some(peer.local_addr().unwrap()));
        drop(d);
        assert_eq!(g.stats().in_user, 0);
    })
    .unwrap();
}
