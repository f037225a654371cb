//! The load generator's building blocks: opening many connections, and request/response
//! exchanges whose bytes are known, so every echoed byte can be checked.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::BenchResult;

/// How long one connect may take: long enough for two SYN retransmissions (1 s, then 2 s
/// more), which happen when the server's accept queue overflows on this noisy VM.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connect slower than this was almost surely a retransmitted SYN.
const SLOW_CONNECT: Duration = Duration::from_millis(500);
/// Connects in a row before pausing, kept below the smallest listen backlog in use (128).
const CONNECT_BURST: usize = 64;
/// The pause between bursts, which lets the server drain its accept queue.
const CONNECT_PAUSE: Duration = Duration::from_micros(200);

/// Connections opened by [`connect_all`].
pub struct Connected {
    /// The streams, non-blocking and TCP_NODELAY, ready for [`into_tokio`].
    pub streams: Vec<std::net::TcpStream>,
    /// How long opening all of them took.
    pub elapsed: Duration,
    /// How many took longer than [`SLOW_CONNECT`] (a SYN was dropped and sent again).
    pub slow: usize,
}

/// Opens `n` connections to `addr` one after another (blocking connects), in bursts with
/// short pauses between them.
pub fn connect_all(addr: SocketAddr, n: usize) -> BenchResult<Connected> {
    let started = Instant::now();
    let mut streams = Vec::with_capacity(n);
    let mut slow = 0;
    for i in 0..n {
        if i % CONNECT_BURST == 0 && i > 0 {
            std::thread::sleep(CONNECT_PAUSE);
        }
        let t = Instant::now();
        let s = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("connection {i} of {n} to {addr}: {e}"))?;
        if t.elapsed() > SLOW_CONNECT {
            slow += 1;
        }
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        streams.push(s);
    }
    Ok(Connected {
        streams,
        elapsed: started.elapsed(),
        slow,
    })
}

/// Hands a non-blocking std stream to the tokio runtime entered by the caller.
pub fn into_tokio(s: std::net::TcpStream) -> io::Result<TcpStream> {
    TcpStream::from_std(s)
}

/// Fills `buf` with the message number `seq` of connection `conn`: every byte depends on
/// both, so a reply from another connection or an older request does not match.
pub fn fill_message(conn: u32, seq: u64, buf: &mut [u8]) {
    let mut x = (u64::from(conn) << 32 | (seq & 0xffff_ffff)) ^ 0x9e37_79b9_7f4a_7c15;
    for b in buf.iter_mut() {
        // xorshift64: cheap; x starts non-zero for every connection id below 0x9e37_79b9.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Writes `out`, reads exactly `out.len()` bytes back into `back`, and says whether they are
/// the same bytes.
pub async fn round_trip(s: &mut TcpStream, out: &[u8], back: &mut [u8]) -> io::Result<bool> {
    let back = &mut back[..out.len()];
    s.write_all(out).await?;
    s.read_exact(back).await?;
    Ok(back == out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_differ_by_connection_and_sequence() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        let mut c = [0u8; 64];
        fill_message(1, 1, &mut a);
        fill_message(2, 1, &mut b);
        fill_message(1, 2, &mut c);
        assert_ne!(a, b);
        assert_ne!(a, c);
        let mut again = [0u8; 64];
        fill_message(1, 1, &mut again);
        assert_eq!(a, again);
    }
}
