//! The thin layer under everything: the few kernel constants and structures the `io-uring` crate
//! does not export, a `syscall!` macro, anonymous memory mappings, the kernel version and the
//! memlock budget.
//!
//! Every raw value the `io-uring` crate lacks is defined here and nowhere else, with the kernel
//! version that introduced it.

use std::io;
use std::ptr::NonNull;

/// Whether this process ignores `SIGPIPE` now (`SIG_IGN`, which Rust's runtime sets before
/// `main`): a write or splice to a socket or pipe whose reader is gone then fails with `EPIPE`
/// instead of raising a signal that ends the process.
pub fn sigpipe_ignored() -> bool {
    // SAFETY: an all-zero `sigaction` is a valid value of this plain C struct.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `current`, which is valid
    // for writes.
    let rc = unsafe { libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut current) };
    rc == 0 && current.sa_sigaction == libc::SIG_IGN
}

/// Whether `fd` is a stream socket (`SO_TYPE` is `SOCK_STREAM`): its bytes have no message
/// boundaries, so several sends may leave as one. `false` for anything else, or if unknown.
pub(crate) fn is_stream_socket(fd: std::os::fd::RawFd) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are valid for writes and `len` holds `ty`'s size; the kernel
    // writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && ty == libc::SOCK_STREAM
}

/// Calls a libc function and turns `-1` into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        #[allow(unused_unsafe)]
        // SAFETY: the caller passes arguments valid for this libc call (see each call site).
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// `IORING_CQE_F_BUF_MORE` (6.12): an incremental ring kept the buffer; later completions
/// append to it.
pub const IORING_CQE_F_BUF_MORE: u32 = 1 << 4;
/// Size of `struct io_uring_recvmsg_out` (6.0): the header a multishot `RECVMSG` writes in front
/// of the sender's address and the payload (`namelen`, `controllen`, `payloadlen`, `flags`, each
/// a `u32`).
pub const RECVMSG_OUT_LEN: usize = 16;
/// `IOU_PBUF_RING_INC` (6.12): register an incrementally consumed buffer ring.
pub const IOU_PBUF_RING_INC: u16 = 2;
/// `IORING_RECVSEND_BUNDLE` (6.10), an `ioprio` flag of send/recv.
pub const IORING_RECVSEND_BUNDLE: u16 = 1 << 4;
/// `IORING_RECVSEND_FIXED_BUF` (6.0), an `ioprio` flag of send_zc/sendmsg_zc.
pub const IORING_RECVSEND_FIXED_BUF: u16 = 1 << 2;
/// `IORING_SEND_ZC_REPORT_USAGE` (6.2), an `ioprio` flag of send_zc.
pub const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED` (6.2): the notification's result says the kernel copied.
pub const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// `IORING_FEAT_RECVSEND_BUNDLE` (6.10) in the setup feature bits.
pub const IORING_FEAT_RECVSEND_BUNDLE: u32 = 1 << 14;
/// `IORING_FEAT_EXT_ARG` (5.11): `io_uring_enter` takes a timeout argument.
pub const IORING_FEAT_EXT_ARG: u32 = 1 << 8;
/// Largest buffer ring the kernel accepts (`ring_entries` must be a power of two below 65536;
/// the kernel's own limit is 32768).
pub const MAX_RING_ENTRIES: u32 = 32768;

/// Sets `buf_index` (byte 40 of the 64-byte SQE) on an SQE the `io-uring` crate built without
/// one (its `SendMsgZc` lacks the field; fixed-buffer `SENDMSG_ZC` needs it, 6.1+).
pub fn sqe_set_buf_index(sqe: &mut io_uring::squeue::Entry, buf_index: u16) {
    const BUF_INDEX_OFFSET: usize = 40;
    let raw: *mut io_uring::squeue::Entry = sqe;
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around `struct io_uring_sqe` (64 bytes, asserted
    // below), whose `buf_index` is the u16 at byte 40; the pointer comes from a live `&mut`, and
    // the write is unaligned-safe.
    unsafe {
        raw.cast::<u8>()
            .add(BUF_INDEX_OFFSET)
            .cast::<u16>()
            .write_unaligned(buf_index)
    };
}
const _: () = assert!(std::mem::size_of::<io_uring::squeue::Entry>() == 64);

/// `IORING_REGISTER_BUFFERS_UPDATE` (5.13): replace fixed buffer table entries, with tags.
pub const IORING_REGISTER_BUFFERS_UPDATE: u32 = 16;
/// `IORING_REGISTER_CLONE_BUFFERS` (6.12): copy registered buffers from another ring.
pub const IORING_REGISTER_CLONE_BUFFERS: u32 = 30;
/// `IORING_REGISTER_DST_REPLACE` (6.13), a flag of `IORING_REGISTER_CLONE_BUFFERS`: clone a
/// range of slots into a table the destination already has, replacing what is there.
pub const IORING_REGISTER_DST_REPLACE: u32 = 1 << 1;

/// `struct io_uring_clone_buffers` (6.12; the offsets and count are 6.13's).
#[repr(C)]
#[derive(Debug, Default)]
struct CloneBuffers {
    src_fd: u32,
    flags: u32,
    src_off: u32,
    dst_off: u32,
    nr: u32,
    pad: [u32; 3],
}

/// `struct io_uring_rsrc_update2` (5.13).
#[repr(C)]
#[derive(Debug, Default)]
struct RsrcUpdate2 {
    offset: u32,
    resv: u32,
    data: u64,
    tags: u64,
    nr: u32,
    resv2: u32,
}

/// Clones `nr` fixed buffer slots of the ring `src` (from `src_off`) into the ring `dst` (at
/// `dst_off`), replacing what `dst` holds there. Both rings keep the same pinned pages: no page
/// is pinned (or accounted against memlock) again. The clones carry no tags.
///
/// # Safety
/// Both descriptors must be live io_uring descriptors; the slots cloned must hold registrations
/// whose memory outlives every op `dst` starts on them (the caller's table bookkeeping).
pub unsafe fn clone_buffers(
    dst: std::os::fd::RawFd,
    src: std::os::fd::RawFd,
    src_off: u32,
    dst_off: u32,
    nr: u32,
) -> io::Result<()> {
    let arg = CloneBuffers {
        src_fd: src as u32,
        flags: IORING_REGISTER_DST_REPLACE,
        src_off,
        dst_off,
        nr,
        ..CloneBuffers::default()
    };
    // SAFETY: io_uring_register reads one `struct io_uring_clone_buffers` from `arg`, which
    // lives across the call; the caller vouches for the descriptors and the memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            dst,
            IORING_REGISTER_CLONE_BUFFERS,
            &arg as *const CloneBuffers,
            1,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets fixed buffer slot `slot` of the ring `ring` to `iov` (an empty iovec empties it), untagged:
/// the call the `io-uring` crate makes for its own ring, for another ring of this thread.
///
/// # Safety
/// `ring` must be a live io_uring descriptor; `iov`'s memory must outlive every op started on the
/// slot (the caller's table bookkeeping).
pub unsafe fn update_buffer(
    ring: std::os::fd::RawFd,
    slot: u32,
    iov: &libc::iovec,
) -> io::Result<()> {
    let tag: u64 = 0;
    let arg = RsrcUpdate2 {
        offset: slot,
        data: iov as *const libc::iovec as u64,
        tags: &tag as *const u64 as u64,
        nr: 1,
        ..RsrcUpdate2::default()
    };
    // SAFETY: io_uring_register reads one `io_uring_rsrc_update2` from `arg`, and through it
    // one iovec and one tag, all of which live across the call; the caller vouches for the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring,
            IORING_REGISTER_BUFFERS_UPDATE,
            &arg as *const RsrcUpdate2,
            std::mem::size_of::<RsrcUpdate2>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `IORING_REGISTER_PBUF_STATUS` (6.8): the kernel's head of a provided buffer ring.
pub const IORING_REGISTER_PBUF_STATUS: u32 = 26;

/// `struct io_uring_buf_status` (6.8).
#[repr(C)]
#[derive(Debug, Default)]
struct BufStatus {
    buf_group: u32,
    head: u32,
    resv: [u32; 8],
}

/// The kernel's head of the provided buffer ring of group `bgid` in the ring `ring`: the ring
/// position of the next entry the kernel will pick (every entry before it is consumed). The one
/// witness of whether a completion that named a buffer without consuming bytes left it in the
/// ring (6.8; every kernel with incremental rings has it).
pub fn buf_ring_head(ring: std::os::fd::RawFd, bgid: u16) -> io::Result<u16> {
    let mut arg = BufStatus {
        buf_group: bgid as u32,
        ..BufStatus::default()
    };
    // SAFETY: io_uring_register reads the group id from and writes the head into the one
    // `io_uring_buf_status` at `arg`, which lives across the call; it touches no other memory of
    // ours, so a wrong descriptor or group id only makes it fail.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring,
            IORING_REGISTER_PBUF_STATUS,
            &mut arg as *mut BufStatus,
            1,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(arg.head as u16)
    }
}

/// One entry of a provided buffer ring, `struct io_uring_buf` (5.19). The ring's tail lives in
/// the `resv` field of entry 0, so entry 0's `resv` must never be written as data.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BufRingEntry {
    /// Address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// Buffer id reported back in the completion.
    pub bid: u16,
    /// Reserved; in entry 0 this is the ring's tail.
    pub resv: u16,
}
const _: () = assert!(std::mem::size_of::<BufRingEntry>() == 16);
/// Byte offset of the shared tail inside the ring (`resv` of entry 0).
pub const BUF_RING_TAIL_OFFSET: usize = 14;

/// The running kernel's version, from `uname(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level (0 when the release string has none).
    pub patch: u32,
}

impl KernelVersion {
    /// Reads the running kernel's version.
    ///
    /// # Examples
    /// ```
    /// let v = ringpool::sys::KernelVersion::current();
    /// assert!(v.major >= 5);
    /// ```
    pub fn current() -> KernelVersion {
        // SAFETY: utsname is plain old data; all-zero is a valid value.
        let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: `uts` is a valid, writable utsname.
        if unsafe { libc::uname(&mut uts) } != 0 {
            return KernelVersion {
                major: 0,
                minor: 0,
                patch: 0,
            };
        }
        // SAFETY: uname NUL-terminates `release`.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
        Self::parse(&release.to_string_lossy())
    }

    /// Parses a release string such as `6.18.44-fc-v782`.
    ///
    /// # Examples
    /// ```
    /// let v = ringpool::sys::KernelVersion::parse("6.1.0-56-cloud-amd64");
    /// assert_eq!((v.major, v.minor, v.patch), (6, 1, 0));
    /// ```
    pub fn parse(release: &str) -> KernelVersion {
        let mut nums = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|s| s.parse::<u32>().unwrap_or(0));
        KernelVersion {
            major: nums.next().unwrap_or(0),
            minor: nums.next().unwrap_or(0),
            patch: nums.next().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// How much memory this process may pin (registered buffers count against it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memlock {
    /// `CAP_IPC_LOCK` or an infinite `RLIMIT_MEMLOCK`: no limit.
    Unlimited,
    /// The soft `RLIMIT_MEMLOCK`, in bytes.
    Limited(u64),
}

impl Memlock {
    /// Reads the budget of the current process.
    ///
    /// # Examples
    /// ```
    /// match ringpool::sys::Memlock::current() {
    ///     ringpool::sys::Memlock::Unlimited => println!("no memlock limit"),
    ///     ringpool::sys::Memlock::Limited(bytes) => println!("{bytes} bytes may be pinned"),
    /// }
    /// ```
    pub fn current() -> Memlock {
        if has_cap_ipc_lock() {
            return Memlock::Unlimited;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
            || lim.rlim_cur == libc::RLIM_INFINITY
        {
            return Memlock::Unlimited;
        }
        Memlock::Limited(lim.rlim_cur)
    }
}

impl Memlock {
    /// The limit in bytes, `None` when unlimited.
    ///
    /// # Examples
    /// ```
    /// use ringpool::sys::Memlock;
    /// assert_eq!(Memlock::Limited(4096).bytes(), Some(4096));
    /// assert_eq!(Memlock::Unlimited.bytes(), None);
    /// ```
    pub fn bytes(self) -> Option<u64> {
        match self {
            Memlock::Unlimited => None,
            Memlock::Limited(b) => Some(b),
        }
    }
}

/// Bytes of locked memory the kernel charges for a ring of these sizes: the SQE array
/// (64 bytes per entry) and the shared rings (a header, 16 bytes per CQE, 4 per SQ index),
/// each rounded up to pages. An estimate for error messages, not an accounting rule.
///
/// # Examples
/// ```
/// assert_eq!(ringpool::sys::ring_locked_bytes(8, 16), 2 * 4096);
/// ```
pub fn ring_locked_bytes(sq_entries: u32, cq_entries: u32) -> u64 {
    const PAGE: u64 = 4096;
    const RINGS_HEADER: u64 = 320;
    let round = |b: u64| b.div_ceil(PAGE) * PAGE;
    let sqes = u64::from(sq_entries) * 64;
    let rings = RINGS_HEADER + u64::from(cq_entries) * 16 + u64::from(sq_entries) * 4;
    round(sqes) + round(rings)
}

/// Whether the effective capability set holds `CAP_IPC_LOCK` (bit 14), read from /proc.
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// What backs a mapping's memory.
///
/// # Examples
/// ```
/// let (_mem, backing) = ringpool::sys::Mmap::anonymous_huge(4 << 20).unwrap();
/// println!("{backing:?}");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageBacking {
    /// Normal pages.
    Normal,
    /// Normal pages the kernel may back with transparent huge pages (`MADV_HUGEPAGE`).
    TransparentHuge,
    /// Reserved huge pages (`MAP_HUGETLB`): fewer pages to pin and map.
    HugeTlb,
}

/// An anonymous, private, page-aligned memory mapping, unmapped on drop.
///
/// The kernel reads and writes this memory while we hold only a raw pointer, so no Rust
/// reference to the whole mapping is ever created: users take disjoint slices through
/// [`Mmap::as_ptr`].
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an `Mmap` owns its mapping and hands out only a raw pointer to it; whoever reads or
// writes through that pointer synchronises (the buffer types give each byte range one owner at
// a time), so moving or sharing the owner between threads is sound.
unsafe impl Send for Mmap {}
// SAFETY: as above: `&Mmap` gives nothing but the pointer and the length.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Maps `len` bytes of zeroed memory. `len` must be non-zero.
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: an anonymous private mapping with a null hint has no preconditions.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// Maps `len` bytes backed by huge pages where the system has them: reserved huge pages
    /// (`MAP_HUGETLB` of the default huge page size, `len` rounded up to it) if a mapping of them
    /// succeeds, else normal pages marked for transparent huge pages (`MADV_HUGEPAGE`). Returns
    /// the backing obtained.
    pub fn anonymous_huge(len: usize) -> io::Result<(Mmap, PageBacking)> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // The default huge page size (`Hugepagesize:` in /proc/meminfo): a mapping's length
        // must be a multiple of it, or unmapping it later fails.
        let huge = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("Hugepagesize:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            })
            .map_or(2 << 20, |kib| kib * 1024);
        let rounded = len.div_ceil(huge) * huge;
        // SAFETY: an anonymous private mapping with a null hint has no preconditions.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                rounded,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                -1,
                0,
            )
        };
        if ptr != libc::MAP_FAILED {
            let mmap = Mmap {
                ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
                len: rounded,
            };
            return Ok((mmap, PageBacking::HugeTlb));
        }
        let mmap = Mmap::anonymous(len)?;
        // SAFETY: advice on a mapping we own, over its exact extent.
        let advised = unsafe { libc::madvise(mmap.as_ptr().cast(), len, libc::MADV_HUGEPAGE) } == 0;
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"));
        let backing = if advised && thp {
            PageBacking::TransparentHuge
        } else {
            PageBacking::Normal
        };
        Ok((mmap, backing))
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; its owner (the pool) keeps it alive until the kernel can no
        // longer touch it, so unmapping it here frees memory nobody else uses.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Total physical memory, from `sysinfo(2)`, for refusing pools that can never fit.
pub fn physical_memory() -> u64 {
    // SAFETY: sysinfo is plain old data; all-zero is valid.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram as u64 * info.mem_unit as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_strings() {
        assert_eq!(
            KernelVersion::parse("6.18.44-fc-v782"),
            KernelVersion {
                major: 6,
                minor: 18,
                patch: 44
            }
        );
        assert_eq!(
            KernelVersion::parse("5.10"),
            KernelVersion {
                major: 5,
                minor: 10,
                patch: 0
            }
        );
        assert!(KernelVersion::parse("6.12.1") > KernelVersion::parse("6.1.99"));
    }

    #[test]
    fn mmap_is_zeroed_and_writable() {
        let m = Mmap::anonymous(8192).unwrap();
        // SAFETY: the mapping is 8192 bytes, private to this test.
        let s = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
        assert!(s.iter().all(|&b| b == 0));
        s[8191] = 7;
        assert_eq!(s[8191], 7);
        assert!(Mmap::anonymous(0).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Zero-copy receive (zcrx): `IORING_REGISTER_ZCRX_IFQ` (6.15), `ZCRX_REG_NODEV` and
// `IORING_REGISTER_ZCRX_CTRL` (7.1). The layouts are those of the 7.3 uapi header
// (`linux/io_uring/zcrx.h`); the io-uring crate has an older `io_uring_zcrx_ifq_reg` without
// `rx_buf_len` and `event_desc`, so ringpool defines its own.

/// `IORING_REGISTER_ZCRX_IFQ` (6.15): registers an interface queue with its area and refill queue.
pub const IORING_REGISTER_ZCRX_IFQ: u32 = 32;
/// `IORING_REGISTER_ZCRX_CTRL` (7.1): auxiliary zcrx requests (`ZCRX_CTRL_FLUSH_RQ`, ...).
pub const IORING_REGISTER_ZCRX_CTRL: u32 = 36;
/// `ZCRX_REG_NODEV` (7.1): a zcrx instance without a network device; the kernel copies every
/// received byte into the area, and consumes the refill queue only when flushed.
pub const ZCRX_REG_NODEV: u32 = 2;
/// `ZCRX_CTRL_FLUSH_RQ` (7.1): the kernel takes back every buffer in the refill queue now.
pub const ZCRX_CTRL_FLUSH_RQ: u32 = 0;
/// `IORING_MEM_REGION_TYPE_USER` (6.13): a region of memory the user mapped.
pub const IORING_MEM_REGION_TYPE_USER: u32 = 1;
/// `IORING_ZCRX_AREA_SHIFT` (6.15): a received buffer's offset carries its area's id from this
/// bit up.
pub const IORING_ZCRX_AREA_SHIFT: u32 = 48;
/// Room for the refill queue's header in its region (the kernel's `struct io_uring`: head and
/// tail, each on its own 64-byte cache line); the entries follow, where the offsets say.
pub const ZCRX_RQ_HEADER: usize = 128;

/// `struct io_uring_zcrx_rqe` (6.15): one buffer handed back through the refill queue.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ZcrxRqe {
    /// The area's token (`rq_area_token`) or'ed with the buffer's offset in the area.
    pub off: u64,
    /// The buffer's length.
    pub len: u32,
    /// Zero.
    pub pad: u32,
}
const _: () = assert!(std::mem::size_of::<ZcrxRqe>() == 16);

/// `struct io_uring_zcrx_area_reg` (6.15).
#[repr(C)]
#[derive(Debug, Default)]
pub struct ZcrxAreaReg {
    /// Start of the area (page-aligned user memory).
    pub addr: u64,
    /// Length of the area (a multiple of the page size).
    pub len: u64,
    /// Out: the token to or into refill entries of this area.
    pub rq_area_token: u64,
    /// `IORING_ZCRX_AREA_DMABUF` or 0.
    pub flags: u32,
    /// The dmabuf, with `IORING_ZCRX_AREA_DMABUF`.
    pub dmabuf_fd: u32,
    /// Zero.
    pub resv2: [u64; 2],
}

/// `struct io_uring_region_desc` (6.13).
#[repr(C)]
#[derive(Debug, Default)]
pub struct RegionDesc {
    /// The memory, with `IORING_MEM_REGION_TYPE_USER`.
    pub user_addr: u64,
    /// Its length.
    pub size: u64,
    /// `IORING_MEM_REGION_TYPE_USER` or 0 (the kernel allocates; mapped at `mmap_offset`).
    pub flags: u32,
    /// Zero.
    pub id: u32,
    /// Out: where to map a kernel-allocated region.
    pub mmap_offset: u64,
    /// Zero.
    pub resv: [u64; 4],
}

/// `struct io_uring_zcrx_offsets` (6.15): where the refill queue's parts are in its region.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ZcrxOffsets {
    /// The kernel's head (`u32`).
    pub head: u32,
    /// The user's tail (`u32`).
    pub tail: u32,
    /// The entries.
    pub rqes: u32,
    /// Zero.
    pub resv2: u32,
    /// Zero.
    pub resv: [u64; 2],
}

/// `struct io_uring_zcrx_ifq_reg` (7.1 layout).
#[repr(C)]
#[derive(Debug, Default)]
pub struct ZcrxIfqReg {
    /// Interface index (0 with `ZCRX_REG_NODEV`).
    pub if_idx: u32,
    /// Receive queue of the interface.
    pub if_rxq: u32,
    /// Refill queue entries (a power of two; the kernel may round it, and writes back the size).
    pub rq_entries: u32,
    /// `ZCRX_REG_*`.
    pub flags: u32,
    /// A `ZcrxAreaReg`.
    pub area_ptr: u64,
    /// A `RegionDesc` for the refill queue.
    pub region_ptr: u64,
    /// Out: the refill queue's layout.
    pub offsets: ZcrxOffsets,
    /// Out: the instance's id, for `RECV_ZC` and control requests.
    pub zcrx_id: u32,
    /// Receive buffer length (0: the page size; the only choice with `ZCRX_REG_NODEV`).
    pub rx_buf_len: u32,
    /// A `zcrx_event_desc`, or 0.
    pub event_desc: u64,
    /// Zero.
    pub resv: [u64; 2],
}
const _: () = assert!(std::mem::size_of::<ZcrxIfqReg>() == 96);

/// `struct zcrx_ctrl` (7.1) with its 48-byte union zeroed (what `ZCRX_CTRL_FLUSH_RQ` takes).
#[repr(C)]
#[derive(Debug, Default)]
struct ZcrxCtrl {
    zcrx_id: u32,
    op: u32,
    resv: [u64; 2],
    args: [u64; 6],
}
const _: () = assert!(std::mem::size_of::<ZcrxCtrl>() == 72);

/// Registers a zcrx interface queue on `ring`: `reg` names the area and the refill queue's
/// region; the kernel fills in the offsets, the id and the area's token.
///
/// # Safety
/// `ring` must be a live io_uring descriptor. The area and the region `reg` points to must stay
/// mapped for as long as the ring lives (the kernel pins them and writes received bytes into
/// the area, its head into the region).
pub unsafe fn register_zcrx_ifq(ring: std::os::fd::RawFd, reg: &mut ZcrxIfqReg) -> io::Result<()> {
    // SAFETY: io_uring_register reads and writes one `struct io_uring_zcrx_ifq_reg` (and the
    // area and region descriptors it points to, which the caller keeps alive across the call);
    // the caller vouches for the descriptor and the memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring,
            IORING_REGISTER_ZCRX_IFQ,
            reg as *mut ZcrxIfqReg,
            1,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Asks the kernel to take back every buffer in the refill queue of zcrx instance `zcrx_id`
/// (`ZCRX_CTRL_FLUSH_RQ`, 7.1; a device-less instance takes them back only so).
pub fn zcrx_flush_rq(ring: std::os::fd::RawFd, zcrx_id: u32) -> io::Result<()> {
    let ctrl = ZcrxCtrl {
        zcrx_id,
        op: ZCRX_CTRL_FLUSH_RQ,
        ..ZcrxCtrl::default()
    };
    // SAFETY: io_uring_register reads one `struct zcrx_ctrl` from `ctrl`, which lives across the
    // call; it names no memory. A descriptor that is not a ring is refused with an error.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring,
            IORING_REGISTER_ZCRX_CTRL,
            &ctrl as *const ZcrxCtrl,
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
