//! Leased buffers against the real kernel: a leader read lends its bytes to members (sends, zero
//! copy or not, and file writes) that run in parallel; every rule of `Driver::lease_group` is
//! checked, with the buffer back exactly once at the end.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{pattern_vec, pump, reset, tcp_pair};
use ringpool::{Driver, DriverConfig, Error, Event, Fd, FixedBuf, Force, Member};

fn driver(force: &[Force]) -> Driver {
    let mut cfg = DriverConfig::default().ignore_env();
    for f in force {
        cfg = cfg.force(*f);
    }
    Driver::new(cfg).unwrap()
}

/// Registered memory on the best rung; plain memory with `no-fixed`.
const LEASE_RUNGS: &[(&str, &[Force])] = &[("registered", &[]), ("plain", &[Force::NoFixed])];

fn file_with(bytes: &[u8]) -> Fd {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    Fd::from(OwnedFd::from(f))
}

fn file_fd(f: &std::fs::File) -> Fd {
    Fd::from(OwnedFd::from(f.try_clone().unwrap()))
}

/// Everything a lease group reported, by token, until its buffer came back.
#[derive(Default)]
struct Outcome {
    filled: Option<ringpool::Result<usize>>,
    members: std::collections::BTreeMap<u64, ringpool::Result<usize>>,
    returned: Option<FixedBuf>,
    returns: usize,
    /// Zero-copy send members that reported letting go of the lease.
    let_go: usize,
}

fn run_group(d: &mut Driver, group_token: u64) -> Outcome {
    let mut o = Outcome::default();
    pump(d, 30, |c| {
        match c.event {
            Event::LeaseFilled { result, lease } => {
                if let (Ok(n), Some(l)) = (&result, &lease) {
                    assert_eq!(l.len(), *n, "the lease covers exactly the bytes read");
                }
                assert_eq!(c.token, group_token);
                o.filled = Some(result);
            }
            Event::LeaseReturned(buf) => {
                assert_eq!(c.token, group_token);
                o.returns += 1;
                o.returned = Some(buf);
            }
            Event::Returned(ringpool::SendBuf::Leased(_)) => {
                assert!(
                    o.members.contains_key(&c.token),
                    "returned before its result"
                );
                o.let_go += 1;
            }
            Event::Sent { result, .. } | Event::Written { result } => {
                // Only a member cancelled while it waited may end before its leader.
                assert!(
                    o.filled.is_some() || matches!(result, Err(Error::Cancelled)),
                    "a member completed before its leader"
                );
                assert!(
                    o.members.insert(c.token, result).is_none(),
                    "member {} reported twice",
                    c.token
                );
            }
            other => panic!("{other:?}"),
        }
        o.returned.is_some()
    });
    // Nothing else may follow: the buffer came back exactly once.
    d.wait(Some(Duration::from_millis(20))).unwrap();
    while let Some(c) = d.pop() {
        match c.event {
            Event::Sent { result, .. } | Event::Written { result } => {
                assert!(o.members.insert(c.token, result).is_none());
            }
            other => panic!("after the return: {other:?}"),
        }
    }
    assert_eq!(o.returns, 1);
    o
}

#[test]
fn members_start_after_the_leader_and_each_gets_the_same_bytes() {
    for (name, force) in LEASE_RUNGS {
        let mut d = driver(force);
        let data = pattern_vec(1, 0, 48 << 10);
        let src = file_with(&data);
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
            members.push(Member::write(&file_fd(f), 4096 * i as u64, 10 + i as u64));
        }
        let buf = d.fixed_buf_or_plain(64 << 10).unwrap();
        assert_eq!(buf.is_registered(), d.ladder().fixed, "{name}");
        d.lease_group(&src, buf, 0, members, 99).unwrap();
        let readers: Vec<_> = socks
            .into_iter()
            .map(|(_, peer)| {
                std::thread::spawn(move || {
                    let mut v = vec![0u8; 48 << 10];
                    let mut p = peer;
                    p.read_exact(&mut v).unwrap();
                    v
                })
            })
            .collect();
        let o = run_group(&mut d, 99);
        assert_eq!(o.let_go, 2, "{name}: each zero-copy member let go once");
        assert_eq!(o.filled.unwrap().unwrap(), 48 << 10, "{name}");
        assert_eq!(o.members.len(), 5, "{name}");
        for (t, r) in &o.members {
            assert_eq!(*r.as_ref().unwrap(), 48 << 10, "{name}: member {t}");
        }
        for r in readers {
            assert!(
                r.join().unwrap() == data,
                "{name}: a socket got other bytes"
            );
        }
        for (i, f) in outs.iter().enumerate() {
            let mut got = Vec::new();
            let mut f = f.try_clone().unwrap();
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut got).unwrap();
            assert!(got[4096 * i..] == data[..], "{name}: file {i}");
        }
        assert!(o.returned.unwrap()[..48 << 10] == data[..], "{name}");
    }
}

#[test]
fn a_short_read_lends_only_what_was_read_and_zeroes_the_rest() {
    let mut d = driver(&[]);
    let src = file_with(&pattern_vec(2, 0, 1000));
    let mut buf = d.fixed_buf_or_plain(8192).unwrap();
    buf.fill(0xAA); // stale bytes that must never be seen
    let (s, mut peer) = tcp_pair();
    let s = Fd::from(s);
    d.lease_group(&src, buf, 0, vec![Member::send_zc(&s, 1)], 7)
        .unwrap();
    let o = run_group(&mut d, 7);
    assert_eq!(o.filled.unwrap().unwrap(), 1000);
    assert_eq!(*o.members[&1].as_ref().unwrap(), 1000);
    let buf = o.returned.unwrap();
    assert!(
        buf[1000..].iter().all(|&b| b == 0),
        "the unfilled tail was zeroed"
    );
    drop(s);
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(
        got,
        pattern_vec(2, 0, 1000),
        "exactly the bytes read, nothing stale"
    );
}

#[test]
fn a_failed_leader_cancels_every_member_and_returns_the_buffer() {
    let mut d = driver(&[]);
    let dir = Fd::from(OwnedFd::from(
        std::fs::File::open(std::env::temp_dir()).unwrap(),
    ));
    let (_, write_end) = std::io::pipe().unwrap();
    let write_only = Fd::from(OwnedFd::from(write_end));
    for (name, leader, errno) in [
        ("directory", &dir, libc::EISDIR),
        ("write-only pipe", &write_only, libc::EBADF),
    ] {
        let (s, _peer) = tcp_pair();
        let s = Fd::from(s);
        let out = tempfile::tempfile().unwrap();
        let members = vec![Member::send_zc(&s, 1), Member::write(&file_fd(&out), 0, 2)];
        let buf = d.fixed_buf_or_plain(4096).unwrap();
        d.lease_group(leader, buf, 0, members, 5).unwrap();
        let o = run_group(&mut d, 5);
        let err = o.filled.unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(errno), "{name}: {err}");
        assert_eq!(o.members.len(), 2, "{name}");
        for r in o.members.values() {
            assert!(matches!(r, Err(Error::Cancelled)), "{name}: {r:?}");
        }
        assert_eq!(out.metadata().unwrap().len(), 0, "{name}: no member ran");
    }
}

#[test]
fn one_member_failing_does_not_cancel_the_others() {
    let mut d = driver(&[]);
    let data = pattern_vec(3, 0, 4096);
    let src = file_with(&data);
    let (good, mut good_peer) = tcp_pair();
    let (bad, bad_peer) = tcp_pair();
    // The bad socket's peer resets: its member fails with ECONNRESET or EPIPE.
    reset(bad_peer);
    std::thread::sleep(Duration::from_millis(50));
    let read_only = tempfile::NamedTempFile::new().unwrap();
    let ro = Fd::from(OwnedFd::from(
        std::fs::File::open(read_only.path()).unwrap(),
    ));
    let ok_file = tempfile::tempfile().unwrap();
    let members = vec![
        Member::send(&Fd::from(bad), 1),
        Member::send_zc(&Fd::from(good), 2),
        Member::write(&ro, 0, 3),
        Member::write(&file_fd(&ok_file), 0, 4),
    ];
    let buf = d.fixed_buf_or_plain(4096).unwrap();
    d.lease_group(&src, buf, 0, members, 8).unwrap();
    let o = run_group(&mut d, 8);
    let e1 = o.members[&1].as_ref().unwrap_err().raw_os_error();
    assert!(
        matches!(e1, Some(libc::ECONNRESET) | Some(libc::EPIPE)),
        "{e1:?}"
    );
    assert_eq!(*o.members[&2].as_ref().unwrap(), 4096);
    assert_eq!(
        o.members[&3].as_ref().unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    assert_eq!(*o.members[&4].as_ref().unwrap(), 4096);
    let mut got = vec![0u8; 4096];
    good_peer.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn zero_members_return_the_buffer_once_the_lease_is_dropped() {
    let mut d = driver(&[]);
    let src = file_with(b"lonely");
    let buf = d.fixed_buf_or_plain(64).unwrap();
    d.lease_group(&src, buf, 0, Vec::new(), 3).unwrap();
    let o = run_group(&mut d, 3);
    assert_eq!(o.filled.unwrap().unwrap(), 6);
    assert!(o.members.is_empty());
    assert_eq!(&o.returned.unwrap()[..6], b"lonely");
}

#[test]
fn a_thousand_members_on_one_buffer() {
    for (name, force) in LEASE_RUNGS {
        let mut d = driver(force);
        let data = pattern_vec(4, 0, 4096);
        let src = file_with(&data);
        let out = tempfile::tempfile().unwrap();
        let fd = file_fd(&out);
        let members = (0..1000u64)
            .map(|i| Member::write(&fd, i * 4096, i))
            .collect();
        let buf = d.fixed_buf_or_plain(4096).unwrap();
        d.lease_group(&src, buf, 0, members, 1 << 40).unwrap();
        let o = run_group(&mut d, 1 << 40);
        assert_eq!(o.members.len(), 1000, "{name}");
        assert!(o.members.values().all(|r| matches!(r, Ok(4096))), "{name}");
        let mut got = Vec::new();
        let mut f = out.try_clone().unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 1000 * 4096, "{name}");
        assert!(got.chunks(4096).all(|c| c == data), "{name}");
    }
}

#[test]
fn a_read_only_lease_can_be_lent_again_while_members_hold_it() {
    let mut d = driver(&[]);
    let data = pattern_vec(6, 0, 2048);
    let src = file_with(&data);
    let (a, pa) = tcp_pair();
    let (b, pb) = tcp_pair();
    let b = Fd::from(b);
    let buf = d.fixed_buf_or_plain(2048).unwrap();
    d.lease_group(&src, buf, 0, vec![Member::send_zc(&Fd::from(a), 1)], 2)
        .unwrap();
    let readers: Vec<_> = [pa, pb]
        .into_iter()
        .map(|p| {
            std::thread::spawn(move || {
                let mut v = vec![0u8; 2048];
                let mut p = p;
                p.read_exact(&mut v).unwrap();
                v
            })
        })
        .collect();
    let (mut returned, mut sends) = (None, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while returned.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the buffer never came back"
        );
        d.wait(Some(Duration::from_millis(50))).unwrap();
        while let Some(c) = d.pop() {
            match c.event {
                Event::LeaseFilled { lease, .. } => {
                    let lease = lease.unwrap();
                    assert!(lease.holders() >= 2, "the member holds it too");
                    // Lend it again, read-only: a second reader of the same bytes. The buffer
                    // may not come back before this send is done with it.
                    d.send_zc(&b, lease, 3).unwrap();
                }
                Event::Sent { result, .. } => {
                    assert_eq!(result.unwrap(), 2048);
                    sends += 1;
                }
                Event::Returned(_) => {}
                Event::LeaseReturned(buf) => {
                    assert_eq!(sends, 2, "returned before every holder was done");
                    returned = Some(buf);
                }
                other => panic!("{other:?}"),
            }
        }
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), data);
    }
}

#[test]
fn cancelling_a_leader_whose_read_already_finished_starts_no_member() {
    let mut d = driver(&[]);
    let src = file_with(&pattern_vec(7, 0, 4096));
    let (s, _peer) = tcp_pair();
    let out = tempfile::tempfile().unwrap();
    let members = vec![
        Member::send(&Fd::from(s), 1),
        Member::write(&file_fd(&out), 0, 2),
    ];
    let buf = d.fixed_buf_or_plain(4096).unwrap();
    let op = d.lease_group(&src, buf, 0, members, 4).unwrap();
    // The file read completes at once; the cancel reaches only our side of it.
    d.cancel(op);
    let o = run_group(&mut d, 4);
    assert!(matches!(o.filled.unwrap(), Err(Error::Cancelled)));
    assert!(o
        .members
        .values()
        .all(|r| matches!(r, Err(Error::Cancelled))));
    assert_eq!(out.metadata().unwrap().len(), 0, "no member ran");
}

#[test]
fn dropping_the_driver_mid_lease_group_is_quick_and_leaks_nothing() {
    let before = ringpool::leaked_ops();
    let mut d = driver(&[]);
    let src = file_with(&pattern_vec(8, 0, 4096));
    let (s, _peer) = tcp_pair();
    let s = Fd::from(s);
    let buf = d.fixed_buf_or_plain(4096).unwrap();
    d.lease_group(
        &src,
        buf,
        0,
        vec![Member::send(&s, 1), Member::send_zc(&s, 2)],
        3,
    )
    .unwrap();
    let start = std::time::Instant::now();
    drop(d);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "drop waited {:?}",
        start.elapsed()
    );
    assert_eq!(ringpool::leaked_ops(), before);
}

#[test]
fn cancel_fd_reaches_members_still_waiting_for_their_leader() {
    let mut d = driver(&[]);
    let (src, mut src_peer) = tcp_pair();
    let (gone, _gone_peer) = tcp_pair();
    let (kept, mut kept_peer) = tcp_pair();
    let (gone, kept) = (Fd::from(gone), Fd::from(kept));
    let buf = d.fixed_buf_or_plain(16).unwrap();
    let members = vec![Member::send(&gone, 1), Member::send(&kept, 2)];
    d.lease_group(&Fd::from(src), buf, 0, members, 6).unwrap();
    d.submit().unwrap();
    // The leader waits for data; the member's socket is cancelled meanwhile.
    d.cancel_fd(&gone);
    src_peer.write_all(&[5u8; 16]).unwrap();
    let o = run_group(&mut d, 6);
    assert_eq!(o.filled.unwrap().unwrap(), 16);
    assert!(
        matches!(o.members[&1], Err(Error::Cancelled)),
        "{:?}",
        o.members[&1]
    );
    assert_eq!(*o.members[&2].as_ref().unwrap(), 16);
    let mut got = [0u8; 16];
    kept_peer.read_exact(&mut got).unwrap();
    assert_eq!(got, [5u8; 16]);
}

#[test]
fn a_read_in_lease_gathers_parts_into_one_buffer_and_zeroes_what_was_not_filled() {
    for (name, force) in LEASE_RUNGS {
        let mut d = driver(force);
        let header = file_with(&pattern_vec(10, 0, 100));
        let part_b = file_with(&pattern_vec(11, 0, 1024));
        let part_c = file_with(&pattern_vec(12, 0, 500)); // short: its range is 1024
        let mut buf = d.fixed_buf_or_plain(4096).unwrap();
        buf.fill(0xEE); // stale bytes that must not come back
        let members = vec![
            Member::read_into(&part_b, 0, 1024..2048, 1),
            Member::read_into(&part_c, 0, 2048..3072, 2),
        ];
        d.lease_group(&header, buf, 0, members, 9).unwrap();
        let mut o = Outcome::default();
        let mut reads = std::collections::BTreeMap::new();
        pump(&mut d, 10, |c| {
            match c.event {
                Event::LeaseFilled { result, lease } => {
                    assert!(
                        lease.is_none(),
                        "{name}: a read-in lease is never handed out"
                    );
                    o.filled = Some(result);
                }
                Event::ReadInto { result } => {
                    reads.insert(c.token, result.unwrap());
                }
                Event::LeaseReturned(buf) => o.returned = Some(buf),
                other => panic!("{name}: {other:?}"),
            }
            o.returned.is_some()
        });
        assert_eq!(o.filled.unwrap().unwrap(), 100, "{name}");
        assert_eq!(reads[&1], 1024, "{name}");
        assert_eq!(reads[&2], 500, "{name}");
        let buf = o.returned.unwrap();
        assert_eq!(
            buf[..100],
            pattern_vec(10, 0, 100)[..],
            "{name}: the leader's bytes"
        );
        assert!(
            buf[100..1024].iter().all(|&b| b == 0),
            "{name}: leader tail zeroed"
        );
        assert_eq!(buf[1024..2048], pattern_vec(11, 0, 1024)[..], "{name}");
        assert_eq!(buf[2048..2548], pattern_vec(12, 0, 500)[..], "{name}");
        assert!(
            buf[2548..].iter().all(|&b| b == 0),
            "{name}: short member zeroed"
        );
    }
}

#[test]
fn bad_read_in_groups_are_typed_errors() {
    let mut d = driver(&[]);
    let src = file_with(b"x");
    let (s, _peer) = tcp_pair();
    let s = Fd::from(s);
    for (what, members) in [
        (
            "overlapping",
            vec![
                Member::read_into(&src, 0, 0..100, 1),
                Member::read_into(&src, 0, 50..150, 2),
            ],
        ),
        ("outside", vec![Member::read_into(&src, 0, 4000..5000, 1)]),
        (
            "mixed with a reader",
            vec![Member::read_into(&src, 0, 0..100, 1), Member::send(&s, 2)],
        ),
    ] {
        let buf = d.fixed_buf_or_plain(4096).unwrap();
        let err = d.lease_group(&src, buf, 0, members, 3).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{what}: {err}"
        );
    }
}
