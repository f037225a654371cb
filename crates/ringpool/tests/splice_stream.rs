//! Splice streams (`Driver::splice_stream`) against the real kernel: bytes from one socket (or
//! file) to another through the driver's pipes, never through user memory. Every stream is
//! byte-checked end to end, and every pipe is home when it ends.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{
    in_emulated_guest, join_while_waiting, pattern_vec, pump, read_to_end, reset, tcp_pair,
};
use ringpool::{Driver, Error, Event, Fd};

const PIPE: usize = 1 << 20;

fn driver() -> Driver {
    Driver::new(common::splice_config()).unwrap()
}

fn writer(mut c: TcpStream, data: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for piece in data.chunks(4096) {
            c.write_all(piece).unwrap();
        }
    })
}

/// Reads exactly `len` bytes of `s` on a thread of its own.
fn read_exactly(mut s: TcpStream, len: usize) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = vec![0u8; len];
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.read_exact(&mut v).unwrap();
        v
    })
}

/// What a stream did: bytes its `Spliced` completions reported, and how it ended.
#[derive(Default)]
struct Seen {
    bytes: usize,
    end: Option<Result<(), Error>>,
}

fn record(seen: &mut Seen, event: Event, more: bool) {
    match event {
        Event::Spliced { bytes } => {
            assert!(more, "progress is not the last completion");
            assert!(bytes > 0);
            seen.bytes += bytes;
        }
        Event::Eof => seen.end = Some(Ok(())),
        Event::Error(e) => seen.end = Some(Err(e)),
        other => panic!("{other:?}"),
    }
}

fn two_directions_of_32_mib_arrive_whole_in_order_and_every_pipe_goes_home() {
    let d = both_ways(
        false,
        if in_emulated_guest() {
            4 << 20
        } else {
            32 << 20
        },
    );
    let st = d.pipe_stats();
    assert!(st.reused > 0, "pipes are reused chunk after chunk: {st:?}");
}

/// client <-> [a | proxy | b] <-> upstream, one stream per direction (`a` and `b` made
/// non-blocking first if `nonblocking`), `len` bytes each way then a half-close each way:
/// every byte arrives once, in order, both streams end at their source's end, every pipe is
/// home. Returns the driver for more checks.
fn both_ways(nonblocking: bool, len: usize) -> Driver {
    let mut d = driver();
    let (client, a) = tcp_pair();
    let (b, upstream) = tcp_pair();
    a.set_nonblocking(nonblocking).unwrap();
    b.set_nonblocking(nonblocking).unwrap();
    let (a, b) = (Fd::from(a), Fd::from(b));
    d.splice_stream(&a, &b, PIPE, 0).unwrap();
    d.splice_stream(&b, &a, PIPE, 1).unwrap();
    let (up, down) = (pattern_vec(1, 0, len), pattern_vec(2, 0, len));
    let w1 = writer(client.try_clone().unwrap(), up.clone());
    let w2 = writer(upstream.try_clone().unwrap(), down.clone());
    let r1 = read_exactly(upstream.try_clone().unwrap(), len);
    let r2 = read_exactly(client.try_clone().unwrap(), len);
    let mut seen = [Seen::default(), Seen::default()];
    pump(&mut d, 120, |c| {
        record(&mut seen[c.token as usize], c.event, c.more);
        seen.iter().all(|s| s.bytes == len)
    });
    w1.join().unwrap();
    w2.join().unwrap();
    assert!(
        r1.join().unwrap() == up,
        "client to upstream, byte for byte"
    );
    assert!(
        r2.join().unwrap() == down,
        "upstream to client, byte for byte"
    );
    client.shutdown(std::net::Shutdown::Write).unwrap();
    upstream.shutdown(std::net::Shutdown::Write).unwrap();
    pump(&mut d, 30, |c| {
        record(&mut seen[c.token as usize], c.event, c.more);
        seen.iter().all(|s| s.end.is_some())
    });
    for s in &seen {
        assert!(matches!(s.end, Some(Ok(()))), "{:?}", s.end);
        assert_eq!(s.bytes, len, "no byte twice");
    }
    let st = d.pipe_stats();
    assert_eq!(st.in_use, 0, "{st:?}");
    assert_eq!(d.in_flight(), 0);
    d
}

fn an_idle_source_holds_no_pipe_and_its_first_byte_still_arrives() {
    let mut d = driver();
    let (mut client, a) = tcp_pair();
    let (b, upstream) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    d.splice_stream(&a, &b, PIPE, 7).unwrap();
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        d.wait(Some(Duration::from_millis(50))).unwrap();
        assert!(d.pop().is_none(), "nothing happens on an idle source");
    }
    assert_eq!(d.pipe_stats().in_use, 0, "an idle stream holds no pipe");
    client.write_all(b"x").unwrap();
    drop(client);
    let mut seen = Seen::default();
    pump(&mut d, 10, |c| {
        record(&mut seen, c.event, c.more);
        seen.end.is_some()
    });
    assert!(matches!(seen.end, Some(Ok(()))), "{:?}", seen.end);
    assert_eq!(seen.bytes, 1);
    drop(b);
    let r = std::thread::spawn(move || read_to_end(upstream));
    assert_eq!(join_while_waiting(&mut d, r), b"x");
    assert_eq!(d.pipe_stats().in_use, 0);
}

fn a_source_reset_mid_stream_ends_it_and_what_arrived_is_a_prefix() {
    let mut d = driver();
    let (mut client, a) = tcp_pair();
    let (b, upstream) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    d.splice_stream(&a, &b, PIPE, 0).unwrap();
    let data = pattern_vec(3, 0, 256 << 10);
    client.write_all(&data).unwrap();
    let reader = std::thread::spawn(move || read_to_end(upstream));
    let mut seen = Seen::default();
    pump(&mut d, 10, |c| {
        record(&mut seen, c.event, c.more);
        seen.bytes > 0
    });
    reset(client);
    pump(&mut d, 10, |c| {
        record(&mut seen, c.event, c.more);
        seen.end.is_some()
    });
    // A reset after the bytes were read is an end (0) or ECONNRESET, depending on timing.
    match &seen.end {
        Some(Ok(())) => {}
        Some(Err(Error::Os { source, .. })) => {
            assert_eq!(source.raw_os_error(), Some(libc::ECONNRESET))
        }
        other => panic!("{other:?}"),
    }
    drop(b);
    let got = join_while_waiting(&mut d, reader);
    assert_eq!(got.len(), seen.bytes);
    assert!(got[..] == data[..got.len()], "a prefix, in order");
    assert_eq!(d.pipe_stats().in_use, 0);
}

fn a_stream_into_a_sink_that_stops_reading_is_cancelled_and_its_pipe_goes_home() {
    for by_fd in [false, true] {
        let mut d = driver();
        let (client, a) = tcp_pair();
        let (b, _stalled_peer) = tcp_pair();
        let (a, b) = (Fd::from(a), Fd::from(b));
        let op = d.splice_stream(&a, &b, PIPE, 0).unwrap();
        // More than the loopback socket buffers hold: the sink fills and stays full.
        let w = std::thread::spawn(move || {
            let mut c = client;
            let chunk = vec![5u8; 64 << 10];
            while c.write_all(&chunk).is_ok() {}
        });
        let mut seen = Seen::default();
        let mut quiet_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        while quiet_since.elapsed() < Duration::from_millis(500) {
            assert!(Instant::now() < deadline, "the sink never filled");
            d.wait(Some(Duration::from_millis(50))).unwrap();
            while let Some(c) = d.pop() {
                record(&mut seen, c.event, c.more);
                quiet_since = Instant::now();
            }
        }
        assert!(seen.bytes > 0 && seen.end.is_none());
        // The stuck chunk holds its pipe (none if the writer was between chunks).
        assert!(d.pipe_stats().in_use <= 1, "{:?}", d.pipe_stats());
        if by_fd {
            d.cancel_fd(&b); // the sink's descriptor reaches the stream too
        } else {
            d.cancel(op);
        }
        pump(&mut d, 10, |c| {
            record(&mut seen, c.event, c.more);
            seen.end.is_some()
        });
        assert!(
            matches!(seen.end, Some(Err(Error::Cancelled))),
            "{:?}",
            seen.end
        );
        assert_eq!(d.pipe_stats().in_use, 0, "the pipe is home");
        assert_eq!(d.in_flight(), 0);
        drop((a, b));
        w.join().unwrap();
    }
}

fn a_file_streams_to_a_socket_whole() {
    let mut d = driver();
    let data = pattern_vec(4, 0, 3 << 20);
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&data).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
    let file = Fd::from(std::os::fd::OwnedFd::from(f));
    let (b, peer) = tcp_pair();
    let b = Fd::from(b);
    let reader = std::thread::spawn(move || read_to_end(peer));
    d.splice_stream(&file, &b, 256 << 10, 0).unwrap();
    let mut seen = Seen::default();
    pump(&mut d, 30, |c| {
        record(&mut seen, c.event, c.more);
        seen.end.is_some()
    });
    assert!(matches!(seen.end, Some(Ok(()))), "{:?}", seen.end);
    drop(b);
    assert!(join_while_waiting(&mut d, reader) == data);
    assert_eq!(d.pipe_stats().in_use, 0);
}

fn bad_pipe_sizes_are_refused_and_a_directory_is_no_source() {
    let mut d = driver();
    let (b, _peer) = tcp_pair();
    let b = Fd::from(b);
    let (a, _c) = tcp_pair();
    let a = Fd::from(a);
    for bytes in [0, d.pipe_stats().max_pipe + 1] {
        let e = d.splice_stream(&a, &b, bytes, 0).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{bytes}: {e}");
    }
    let dir = Fd::from(std::os::fd::OwnedFd::from(
        std::fs::File::open(std::env::temp_dir()).unwrap(),
    ));
    d.splice_stream(&dir, &b, PIPE, 0).unwrap();
    let mut seen = Seen::default();
    pump(&mut d, 10, |c| {
        record(&mut seen, c.event, c.more);
        seen.end.is_some()
    });
    assert!(
        matches!(seen.end, Some(Err(Error::Os { .. }))),
        "{:?}",
        seen.end
    );
    assert_eq!(seen.bytes, 0);
    assert_eq!(d.pipe_stats().in_use, 0);
}

/// Wait-loops `d` for a little more than the pool's idle-pipe lifetime (1 s).
fn idle_past_pipe_lifetime(d: &mut Driver) {
    let until = Instant::now() + Duration::from_millis(1300);
    while Instant::now() < until {
        d.wait(Some(Duration::from_millis(100))).unwrap();
        while d.pop().is_some() {}
    }
}

/// Regression (found by the soak's `proxy-splice`): the pipe pool kept every idle pipe (up to
/// 2,048, two descriptors each) for good, so a splice proxy held ~300 descriptors after its
/// load ended, clients' descriptors under RLIMIT_NOFILE. Idle pipes close after a second.
fn idle_pipes_are_closed_a_second_after_the_last_stream_ended() {
    let mut d = driver();
    let (mut client, a) = tcp_pair();
    let (b, upstream) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    d.splice_stream(&a, &b, PIPE, 0).unwrap();
    client.write_all(&pattern_vec(5, 0, 100_000)).unwrap();
    drop(client);
    let mut seen = Seen::default();
    pump(&mut d, 10, |c| {
        record(&mut seen, c.event, c.more);
        seen.end.is_some()
    });
    drop(b);
    let r = std::thread::spawn(move || read_to_end(upstream));
    assert_eq!(join_while_waiting(&mut d, r).len(), 100_000);
    let st = d.pipe_stats();
    assert!(
        st.made > 0 && st.idle > 0,
        "kept for reuse at first: {st:?}"
    );
    idle_past_pipe_lifetime(&mut d);
    let st = d.pipe_stats();
    assert_eq!(st.idle, 0, "closed once idle for a second: {st:?}");
    assert_eq!(st.closed, st.made, "{st:?}");
}

/// With one pipe for the whole driver, two busy streams take turns at it: a chunk that finds
/// no pipe waits (backpressure) and both streams arrive whole, in order.
fn at_max_pipes_streams_wait_for_a_pipe_and_lose_nothing() {
    let len: usize = if in_emulated_guest() {
        1 << 20
    } else {
        8 << 20
    };
    let mut d = Driver::new(common::splice_config().max_pipes(1)).unwrap();
    let mut ends = Vec::new();
    for i in 0..2u64 {
        let (client, a) = tcp_pair();
        let (b, upstream) = tcp_pair();
        let (a, b) = (Fd::from(a), Fd::from(b));
        d.splice_stream(&a, &b, 64 << 10, i).unwrap();
        let data = pattern_vec(10 + i, 0, len);
        // Both sources hold data before the driver first waits, so both polls complete at
        // once and one chunk must wait for the pipe; the rest follows from a thread, which
        // drops its socket when done: the stream then ends.
        let mut client = client;
        client.write_all(&data[..16 << 10]).unwrap();
        let w = writer(client, data[16 << 10..].to_vec());
        let r = read_exactly(upstream, len);
        ends.push((a, b, w, r, data));
    }
    let mut seen = [Seen::default(), Seen::default()];
    pump(&mut d, 60, |c| {
        record(&mut seen[c.token as usize], c.event, c.more);
        seen.iter().all(|s| s.end.is_some())
    });
    for (s, (a, b, w, r, data)) in seen.iter().zip(ends) {
        assert!(matches!(s.end, Some(Ok(()))), "{:?}", s.end);
        assert_eq!(s.bytes, len);
        w.join().unwrap();
        assert!(r.join().unwrap() == data, "byte for byte");
        drop((a, b));
    }
    let st = d.pipe_stats();
    assert_eq!(st.made, 1, "one pipe, ever: {st:?}");
    assert!(st.pipe_waits > 0, "chunks waited for it: {st:?}");
    assert_eq!(st.in_use, 0, "{st:?}");
}

/// Regression (a proxy through `--max-pipes 1` hung both ways): a stream whose pipe emptied
/// while another waits for one gives it back, even with data ready at its source; it does
/// not keep the pipe for its next chunk. Stream 0's source holds 256 KiB before the first
/// wait (64 chunks of a one-page pipe; socket buffers within a default `rmem_max`); stream
/// 1's 16 KiB must arrive long before stream 0 delivered all of it.
fn a_stream_with_more_to_move_hands_the_pipe_to_a_waiting_one() {
    let mut d = Driver::new(common::splice_config().max_pipes(1)).unwrap();
    let big = 256 << 10;
    let mut ends = Vec::new();
    for (i, len) in [(0u64, big), (1, 16 << 10)] {
        let (client, a) = tcp_pair();
        let (b, upstream) = tcp_pair();
        for fd in [client.as_raw_fd(), a.as_raw_fd()] {
            for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
                common::set_sock_buf(fd, opt, 8 << 20);
            }
        }
        let data = pattern_vec(30 + i, 0, len);
        // All of it waits in `a` before the streams start (the writer drops its socket).
        let w = writer(client, data.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{len} bytes do not fit the socket buffers"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        w.join().unwrap();
        let (a, b) = (Fd::from(a), Fd::from(b));
        d.splice_stream(&a, &b, 4096, i).unwrap();
        ends.push((a, b, read_exactly(upstream, len), data));
    }
    let mut seen = [Seen::default(), Seen::default()];
    let mut first_delivery_behind = None;
    pump(&mut d, 60, |c| {
        let token = c.token as usize;
        if token == 1 && matches!(c.event, Event::Spliced { .. }) {
            first_delivery_behind.get_or_insert(seen[0].bytes);
        }
        record(&mut seen[token], c.event, c.more);
        seen.iter().all(|s| s.end.is_some())
    });
    let behind = first_delivery_behind.expect("stream 1 delivered");
    assert!(
        behind < big / 2,
        "stream 1 waited while stream 0 moved {behind} of its {big} bytes"
    );
    for (s, (a, b, r, data)) in seen.iter().zip(ends) {
        assert!(matches!(s.end, Some(Ok(()))), "{:?}", s.end);
        assert!(r.join().unwrap() == data, "byte for byte");
        drop((a, b));
    }
    assert_eq!(d.pipe_stats().in_use, 0);
}

/// A stream waiting for a pipe (the only one held by a stream stuck on a sink that does not
/// read) is cancelled at once; a pages lease that cannot have its pipe is refused with the
/// bound; cancelling the stuck stream brings the pipe home.
fn a_stream_waiting_for_a_pipe_is_cancellable_and_a_pages_lease_is_refused() {
    let mut d = Driver::new(common::splice_config().max_pipes(1)).unwrap();
    let (client, a) = tcp_pair();
    let (b, _stalled) = tcp_pair();
    let (a, b) = (Fd::from(a), Fd::from(b));
    let stuck = d.splice_stream(&a, &b, 64 << 10, 0).unwrap();
    let flood = std::thread::spawn(move || {
        let mut c = client;
        let chunk = vec![5u8; 64 << 10];
        while c.write_all(&chunk).is_ok() {}
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.pipe_stats().in_use == 0 {
        assert!(
            Instant::now() < deadline,
            "the stuck stream never took its pipe"
        );
        d.wait(Some(Duration::from_millis(20))).unwrap();
        while d.pop().is_some() {}
    }
    let (mut client2, a2) = tcp_pair();
    let (b2, _peer2) = tcp_pair();
    let (a2, b2) = (Fd::from(a2), Fd::from(b2));
    let waiting = d.splice_stream(&a2, &b2, 64 << 10, 1).unwrap();
    client2.write_all(b"waits").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.pipe_stats().pipe_waits == 0 {
        assert!(
            Instant::now() < deadline,
            "the second stream never asked for a pipe"
        );
        d.wait(Some(Duration::from_millis(20))).unwrap();
        while let Some(c) = d.pop() {
            assert!(matches!(c.event, Event::Spliced { .. }), "{:?}", c.event);
        }
    }
    let (_f, file) = {
        let path = std::env::temp_dir().join(format!("ringpool-maxpipes-{}", std::process::id()));
        std::fs::write(&path, b"lease").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let fd = Fd::from(std::os::fd::OwnedFd::from(f.try_clone().unwrap()));
        (f, fd)
    };
    let e = d
        .lease(
            &file,
            ringpool::LeaseBacking::Pages { len: 5 },
            0,
            vec![ringpool::Member::send(&b2, 9)],
            9,
        )
        .unwrap_err();
    assert!(matches!(e, Error::PipesExhausted { max: 1 }), "{e}");
    d.cancel(waiting);
    let mut ended = None;
    pump(&mut d, 10, |c| {
        if c.token == 1 && !c.more {
            ended = Some(c.event);
        }
        ended.is_some()
    });
    assert!(
        matches!(ended, Some(Event::Error(Error::Cancelled))),
        "{ended:?}"
    );
    d.cancel(stuck);
    pump(&mut d, 10, |c| c.token == 0 && !c.more);
    assert_eq!(d.pipe_stats().in_use, 0);
    assert_eq!(d.in_flight(), 0);
    drop((a, b));
    flood.join().unwrap();
}

/// Descriptors the user made non-blocking (as a tokio-converted socket is) stream the same:
/// an `EAGAIN` from either end waits for a poll and the splice runs again, nothing lost. Pages
/// leases saw non-blocking members stall on Debian's 7.3 (an open finding there); this pins
/// splice streams down on every kernel of the matrix.
fn non_blocking_descriptors_given_by_the_user_stream_whole_both_ways() {
    let d = both_ways(
        true,
        if in_emulated_guest() {
            4 << 20
        } else {
            16 << 20
        },
    );
    // Whether a splice met `EAGAIN` depends on timing (none did in the emulated guests): the
    // bytes are the check, this line shows how often it happened.
    eprintln!("non-blocking streams: {:?}", d.pipe_stats());
}

common::both_splice_paths!(
    two_directions_of_32_mib_arrive_whole_in_order_and_every_pipe_goes_home,
    an_idle_source_holds_no_pipe_and_its_first_byte_still_arrives,
    a_source_reset_mid_stream_ends_it_and_what_arrived_is_a_prefix,
    a_stream_into_a_sink_that_stops_reading_is_cancelled_and_its_pipe_goes_home,
    a_file_streams_to_a_socket_whole,
    bad_pipe_sizes_are_refused_and_a_directory_is_no_source,
    idle_pipes_are_closed_a_second_after_the_last_stream_ended,
    at_max_pipes_streams_wait_for_a_pipe_and_lose_nothing,
    a_stream_with_more_to_move_hands_the_pipe_to_a_waiting_one,
    a_stream_waiting_for_a_pipe_is_cancellable_and_a_pages_lease_is_refused,
    non_blocking_descriptors_given_by_the_user_stream_whole_both_ways,
);
