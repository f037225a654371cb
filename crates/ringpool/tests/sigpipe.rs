//! `SIGPIPE` and the splices the driver runs itself (`Ladder::inline_splice`): a splice to a
//! socket whose peer is gone raises `SIGPIPE` in the calling thread, and its default action
//! ends the process. A driver made while the process does not ignore it splices through
//! io-wq SQEs instead (the kernel never delivers a worker's signal); one made while it is
//! ignored (Rust's default) runs the splices itself. Either way a peer that reset mid-lease
//! fails its member with an error, and the process lives on. Alone in its binary: it changes
//! the process's signal disposition.

mod common;

use std::time::Duration;

use common::{pattern_vec, pump, reset, tcp_pair};
use ringpool::{Driver, DriverConfig, Event, Fd, LeaseBacking, Member};

fn set_sigpipe(action: libc::sighandler_t) {
    // SAFETY: SIG_DFL and SIG_IGN are valid dispositions for SIGPIPE; nothing else in this
    // binary relies on the disposition.
    let old = unsafe { libc::signal(libc::SIGPIPE, action) };
    assert_ne!(old, libc::SIG_ERR);
}

/// A pages lease of 4 MiB to a socket whose peer resets after the first bytes: the member
/// fails with an error (EPIPE or ECONNRESET), every pipe comes home.
fn lease_to_a_peer_that_resets(d: &mut Driver) {
    let data = pattern_vec(5, 0, 4 << 20);
    let mut f = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    let file = Fd::from(std::os::fd::OwnedFd::from(f));
    let (s, peer) = tcp_pair();
    let s = Fd::from(s);
    let mut member = None;
    for chunk in 0..4u64 {
        let lease = LeaseBacking::Pages { len: 1 << 20 };
        d.lease(
            &file,
            lease,
            chunk << 20,
            vec![Member::send(&s, 10 + chunk)],
            chunk,
        )
        .unwrap();
    }
    let mut reader = Some(peer);
    let mut returned = 0;
    pump(d, 30, |c| {
        match c.event {
            Event::Sent { result, .. } => {
                if let Some(p) = reader.take() {
                    reset(p); // after the first member's end: the rest meet a reset peer
                }
                if result.is_err() {
                    member.get_or_insert(result);
                }
            }
            Event::PagesReturned => returned += 1,
            _ => {}
        }
        returned == 4
    });
    let err = member.expect("a member met the reset peer").unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)),
        "{err}"
    );
    d.wait(Some(Duration::from_millis(10))).unwrap();
    assert_eq!(d.pipe_stats().in_use, 0);
}

#[test]
fn where_sigpipe_is_not_ignored_splices_go_through_io_wq_and_a_reset_peer_kills_nothing() {
    if !common::require(
        ringpool::Features::get().opcode(io_uring::opcode::Splice::CODE),
        "IORING_OP_SPLICE (pages leases)",
    ) {
        return;
    }
    set_sigpipe(libc::SIG_DFL);
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    assert!(!d.ladder().inline_splice, "SIGPIPE would end the process");
    lease_to_a_peer_that_resets(&mut d);
    assert_eq!(d.stats().inline_steps, 0);
    drop(d);

    set_sigpipe(libc::SIG_IGN);
    let mut d = Driver::new(DriverConfig::default().ignore_env()).unwrap();
    assert!(
        d.ladder().inline_splice,
        "SIGPIPE ignored: the driver splices itself"
    );
    lease_to_a_peer_that_resets(&mut d);
    assert!(d.stats().inline_steps > 0);
}
