//! Nothing leaked: after every scenario (streams, cancels, resets, dropped groups and drivers),
//! on every rung, the process holds exactly the descriptors it held before and no driver had to
//! leak an op's memory. One test in its own binary, so no other test opens descriptors
//! meanwhile.

mod common;

use std::io::Write;

use common::{pattern_vec, pump, tcp_pair, RUNGS};
use ringpool::{BufGroupConfig, Event, Fd, RecvMode};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Also the regression test of a bug where dropping a driver on the no-EXT_ARG rung waited for
/// its own timeout ops until the deadline and then leaked its groups.
#[test]
fn no_descriptor_or_memory_is_leaked_on_any_rung() {
    // Warm up the probe (it opens and closes its own sockets) before counting.
    let _ = ringpool::Features::get();
    let before = open_fds();
    for rung in RUNGS {
        let mut d = rung.driver();
        let g = d.buf_group(BufGroupConfig::new(1024, 4)).unwrap();
        // A stream that ends normally.
        let (s, mut c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::MultishotBundle, 0).unwrap();
        c.write_all(&pattern_vec(1, 0, 50_000)).unwrap();
        drop(c);
        pump(&mut d, 10, |comp| matches!(comp.event, Event::Eof));
        drop(s);
        // A receive cancelled mid-flight, its socket dropped at once.
        let (s, c) = tcp_pair();
        let s = Fd::from(s);
        let op = d.recv(&s, &g, RecvMode::Multishot, 1).unwrap();
        d.submit().unwrap();
        d.cancel(op);
        drop(s);
        pump(&mut d, 10, |comp| !comp.more);
        drop(c);
        // A receive still in flight when the driver goes away.
        let (s, c) = tcp_pair();
        let s = Fd::from(s);
        d.recv(&s, &g, RecvMode::Multishot, 2).unwrap();
        d.submit().unwrap();
        drop(s);
        drop(d);
        drop(c);
        assert_eq!(g.stats().in_user, 0, "{}", rung.name);
        drop(g);
        assert_eq!(open_fds(), before, "{}: descriptors leaked", rung.name);
        assert_eq!(
            ringpool::leaked_ops(),
            0,
            "{}: a driver leaked op memory",
            rung.name
        );
    }
}
