//! No pipe or descriptor leaked by pages leases: after groups that end well, fail, are
//! cancelled mid-splice or are cut off by dropping their driver, the process holds exactly the
//! descriptors it held before (the pool's pipes close with their driver) and no driver had to
//! leak an op. One test in its own binary, so no other test opens descriptors meanwhile.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{pattern_vec, pump, require, reset, tcp_pair};
use ringpool::{Driver, DriverConfig, Event, Fd, Features, LeaseBacking, Member};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Runs the driver until `groups` pages groups ended.
fn until_returned(d: &mut Driver, groups: usize) {
    let mut ended = 0;
    pump(d, 30, |c| {
        ended += usize::from(matches!(c.event, Event::PagesReturned));
        ended == groups
    });
}

#[test]
fn no_pipe_or_descriptor_is_leaked_by_pages_leases() {
    let f = Features::get();
    if !require(
        f.opcode(io_uring::opcode::Splice::CODE) && f.opcode(io_uring::opcode::Tee::CODE),
        "IORING_OP_SPLICE and IORING_OP_TEE (pages leases)",
    ) {
        return;
    }
    let data = pattern_vec(1, 0, 256 << 10);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    let before = open_fds();
    for round in 0..2 {
        let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
        let src = Fd::from(OwnedFd::from(file.try_clone().unwrap()));
        // Groups that end well, one member of which fails (its client reset).
        let (good, mut good_peer) = tcp_pair();
        let (bad, bad_peer) = tcp_pair();
        reset(bad_peer);
        let (good, bad) = (Fd::from(good), Fd::from(bad));
        for g in 0..3u64 {
            let members = vec![Member::send(&good, 1), Member::send(&bad, 2)];
            let off = g * (64 << 10);
            d.lease(
                &src,
                LeaseBacking::Pages { len: 64 << 10 },
                off,
                members,
                10 + g,
            )
            .unwrap();
            until_returned(&mut d, 1);
        }
        let mut got = vec![0u8; 192 << 10];
        good_peer.read_exact(&mut got).unwrap();
        assert!(got == data[..192 << 10]);
        // A failed leader (a pipe's write end cannot be read).
        let (r, w) = std::io::pipe().unwrap();
        let w = Fd::from(OwnedFd::from(w));
        let members = vec![Member::send(&good, 3)];
        d.lease(&w, LeaseBacking::Pages { len: 4096 }, u64::MAX, members, 20)
            .unwrap();
        until_returned(&mut d, 1);
        // Members cancelled while their client does not read.
        let (stuck, stuck_peer) = tcp_pair();
        let stuck = Fd::from(stuck);
        for g in 0..2u64 {
            let members = vec![Member::send(&stuck, 4)];
            d.lease(
                &src,
                LeaseBacking::Pages { len: 256 << 10 },
                0,
                members,
                30 + g,
            )
            .unwrap();
        }
        d.wait(Some(Duration::from_millis(50))).unwrap();
        d.cancel_fd(&stuck);
        until_returned(&mut d, 2);
        let s = d.pipe_stats();
        assert_eq!(s.in_use, 0, "round {round}: {s:?}");
        assert!(s.idle > 0 && s.reused > 0, "round {round}: {s:?}");
        // A group cut off by dropping the driver, its member stuck on a full socket.
        d.lease(
            &src,
            LeaseBacking::Pages { len: 256 << 10 },
            0,
            vec![Member::send(&stuck, 5)],
            40,
        )
        .unwrap();
        d.submit().unwrap();
        drop(d);
        drop((src, good, bad, stuck, w));
        drop((r, good_peer, stuck_peer));
        assert_eq!(open_fds(), before, "round {round}: descriptors leaked");
        assert_eq!(ringpool::leaked_ops(), 0, "round {round}: an op leaked");
    }
}
