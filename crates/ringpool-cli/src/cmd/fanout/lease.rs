//! `fanout --lease pages|memory|auto`: which kind of lease serves the chunks, and the rule
//! `auto` follows.
//!
//! - **pages** ([`ringpool::LeaseBacking::Pages`]): the leader splices each chunk's page-cache
//!   pages into a pipe, every client's member tees the page references into its own pipe and
//!   splices them to its socket. No byte is copied by the server, whatever the path.
//! - **memory** ([`ringpool::LeaseBacking::Memory`]): each chunk is read once into a
//!   registered buffer and sent from there to every client (zero-copy where the policy says it
//!   pays).
//!
//! **`auto`** (the default) picks pages where a zero-copy send from memory would be copied by
//! the kernel anyway: the clients reach the server over loopback, a virtual device (veth,
//! bridge, tun/tap: no `device` in sysfs) or a virtual NIC (virtio-net, Xen, Hyper-V,
//! vmxnet3). There every memory-lease member copies the chunk into socket buffers, once per
//! client, while a pages member passes page references. On loopback the pages server spent
//! 0.53× the memory server's CPU per GB (per round 0.35-0.73×; `ringpool bench --workload
//! fanout`, 9 rounds each, same run; the README gives the figures). Elsewhere (a physical NIC, where zero-copy send pays and the bytes
//! leave from the registered buffer itself) it picks memory. It also picks memory where pages
//! cannot serve: a kernel without `IORING_OP_SPLICE`/`IORING_OP_TEE` (5.8), a chunk larger than
//! the largest pipe (`/proc/sys/fs/pipe-max-size`), pipes past an unprivileged user's pipe
//! budget (`/proc/sys/fs/pipe-user-pages-soft`), or pipes the descriptor limit cannot hold
//! (each client's member holds one pipe, two descriptors, per chunk in flight).
//!
//! The addresses decide: `--listen` on a specific address looks at the interface holding it;
//! on an unspecified address (`0.0.0.0`, `::`) at every interface that is up, and pages only if
//! all of them copy.

use std::ffi::CStr;
use std::net::{IpAddr, SocketAddr};

/// `--lease`: the kind asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseArg {
    /// Pipe-backed leases: page references spliced to every client, never copied.
    Pages,
    /// Registered-memory leases: each chunk read into a buffer, sent from it to every client.
    Memory,
    /// Pages where zero-copy send would copy (loopback, virtual devices and NICs), memory
    /// elsewhere.
    Auto,
}

/// The kind of lease a server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseKind {
    Pages,
    Memory,
}

impl LeaseKind {
    /// `pages` / `memory`, as the summary and the `stats` line say it.
    pub fn label(self) -> &'static str {
        match self {
            LeaseKind::Pages => "pages",
            LeaseKind::Memory => "memory",
        }
    }
}

/// The kind chosen, and why (one phrase, for the start line and the summary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub kind: LeaseKind,
    pub why: String,
}

/// `IORING_OP_SPLICE` (5.7) and `IORING_OP_TEE` (5.8): the kernel ABI's opcode numbers.
const IORING_OP_SPLICE: u8 = 30;
const IORING_OP_TEE: u8 = 33;

/// Descriptors kept free for everything but the pipes (clients, the listener, the ring).
const FD_MARGIN: u64 = 64;

/// What the server will do, for the choice.
pub struct Plan {
    pub listen: SocketAddr,
    pub chunk: usize,
    pub in_flight: usize,
    pub clients: usize,
}

/// Chooses the lease kind for `arg`: `auto` by the rule of the module; `pages` only where it
/// can serve (else an error naming the flag and why).
pub fn choose(arg: LeaseArg, plan: &Plan) -> Result<Choice, String> {
    let blocker = pages_blocker(plan);
    match arg {
        LeaseArg::Memory => Ok(Choice {
            kind: LeaseKind::Memory,
            why: "asked for (--lease memory)".into(),
        }),
        LeaseArg::Pages => match blocker {
            Some(why) => Err(format!(
                "--lease pages: {why}; use --lease memory (or auto)"
            )),
            None => Ok(Choice {
                kind: LeaseKind::Pages,
                why: "asked for (--lease pages)".into(),
            }),
        },
        LeaseArg::Auto => Ok(match blocker {
            Some(why) => Choice {
                kind: LeaseKind::Memory,
                why: format!("auto: pages cannot serve here ({why})"),
            },
            None => auto_by_path(&path_of(plan.listen.ip())),
        }),
    }
}

/// `auto` once pages can serve: pages if every interface the clients may come through copies
/// zero-copy sends, memory otherwise.
fn auto_by_path(ifaces: &[(String, Path)]) -> Choice {
    let names = |f: &dyn Fn(&Path) -> bool| -> String {
        let v: Vec<String> = ifaces
            .iter()
            .filter(|(_, p)| f(p))
            .map(|(n, p)| format!("{n}: {}", p.words()))
            .collect();
        v.join(", ")
    };
    if ifaces.is_empty() {
        return Choice {
            kind: LeaseKind::Memory,
            why: "auto: no interface found for the listen address".into(),
        };
    }
    if ifaces.iter().all(|(_, p)| p.zero_copy_copies()) {
        Choice {
            kind: LeaseKind::Pages,
            why: format!(
                "auto: zero-copy send would copy on the clients' path ({})",
                names(&|_| true)
            ),
        }
    } else {
        Choice {
            kind: LeaseKind::Memory,
            why: format!(
                "auto: zero-copy send pays on the clients' path ({})",
                names(&|p| !p.zero_copy_copies())
            ),
        }
    }
}

/// Why pages leases cannot serve this plan, if they cannot.
fn pages_blocker(plan: &Plan) -> Option<String> {
    let f = ringpool::Features::get();
    if !f.opcode(IORING_OP_SPLICE) || !f.opcode(IORING_OP_TEE) {
        return Some(format!(
            "kernel {} lacks IORING_OP_SPLICE/IORING_OP_TEE (5.8)",
            f.kernel
        ));
    }
    let max = pipe_max_size();
    let need = pipe_bytes_for_chunk(plan.chunk, page_size());
    if need > max {
        return Some(format!(
            "a chunk of {} bytes needs a pipe of {need} bytes, more than \
             /proc/sys/fs/pipe-max-size ({max}); lower --chunk",
            plan.chunk
        ));
    }
    let pipes = pipes_needed(plan.clients, plan.in_flight);
    // An unprivileged user's pipes together may hold pipe-user-pages-soft pages; past it,
    // F_SETPIPE_SZ fails (EPERM) and so would the lease. (Root approximates CAP_SYS_RESOURCE.)
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let soft = read_proc_usize("/proc/sys/fs/pipe-user-pages-soft").unwrap_or(0);
    let pipe_bytes = pipes.saturating_mul(need as u64);
    if !root && soft > 0 && pipe_bytes > (soft * page_size()) as u64 {
        return Some(format!(
            "{pipes} pipes of {need} bytes for {} clients × {} chunks in flight exceed this \
             user's pipe budget (/proc/sys/fs/pipe-user-pages-soft: {soft} pages)",
            plan.clients, plan.in_flight
        ));
    }
    let limit = nofile_soft_limit();
    if 2 * pipes + plan.clients as u64 + FD_MARGIN > limit {
        return Some(format!(
            "{pipes} pipes ({} descriptors) for {} clients × {} chunks in flight do not fit \
             the descriptor limit ({limit})",
            2 * pipes,
            plan.clients,
            plan.in_flight
        ));
    }
    None
}

/// Pipes the chunks in flight hold at most: one per member and one per group.
fn pipes_needed(clients: usize, in_flight: usize) -> u64 {
    (clients as u64 + 1) * in_flight as u64
}

/// The pipe a chunk needs: one slot per page it spans, a power of two pages (as
/// `F_SETPIPE_SZ` rounds); a chunk that is not a multiple of the page size may start anywhere
/// in a page, so it is sized for the worst start.
fn pipe_bytes_for_chunk(chunk: usize, page: usize) -> usize {
    let first = if chunk % page == 0 { 0 } else { page - 1 };
    (first + chunk).div_ceil(page).max(1).next_power_of_two() * page
}

/// `/proc/sys/fs/pipe-max-size` (1 MiB where it cannot be read, the kernel's default).
fn pipe_max_size() -> usize {
    read_proc_usize("/proc/sys/fs/pipe-max-size").unwrap_or(1 << 20)
}

/// A number in a `/proc/sys` file.
fn read_proc_usize(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `RLIMIT_NOFILE`'s soft limit (unlimited where it cannot be read).
fn nofile_soft_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into a variable we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return u64::MAX;
    }
    r.rlim_cur
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a configuration value; it has no memory arguments.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// What an interface is, as far as zero-copy send goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    Loopback,
    /// No device behind it (veth, bridge, tun/tap, dummy, ...).
    VirtualDevice,
    /// A NIC whose driver is a hypervisor's (its name).
    VirtualNic(String),
    /// A NIC of any other driver (its name, or `unknown`).
    Nic(String),
}

/// Drivers of virtual NICs: the hypervisor moves the bytes, zero-copy send does not pay.
const VIRTUAL_NIC_DRIVERS: [&str; 5] =
    ["virtio_net", "vif", "xen-netfront", "hv_netvsc", "vmxnet3"];

impl Path {
    /// Classifies an interface from what sysfs says of it.
    pub fn classify(loopback: bool, has_device: bool, driver: Option<&str>) -> Path {
        match (loopback, has_device, driver) {
            (true, ..) => Path::Loopback,
            (false, false, _) => Path::VirtualDevice,
            (false, true, Some(d)) if VIRTUAL_NIC_DRIVERS.contains(&d) => {
                Path::VirtualNic(d.to_string())
            }
            (false, true, d) => Path::Nic(d.unwrap_or("unknown").to_string()),
        }
    }

    /// Whether a zero-copy send through it ends up copied (or gains nothing).
    pub fn zero_copy_copies(&self) -> bool {
        !matches!(self, Path::Nic(_))
    }

    fn words(&self) -> String {
        match self {
            Path::Loopback => "loopback".into(),
            Path::VirtualDevice => "virtual device".into(),
            Path::VirtualNic(d) => format!("virtual NIC, {d}"),
            Path::Nic(d) => format!("NIC, {d}"),
        }
    }
}

/// The interfaces clients of `ip` may come through, each classified: the one holding `ip`, or
/// every interface that is up for an unspecified address.
fn path_of(ip: IpAddr) -> Vec<(String, Path)> {
    if ip.is_loopback() {
        return vec![("lo".into(), Path::Loopback)];
    }
    let mut out: Vec<(String, Path)> = Vec::new();
    for (name, addr, flags) in interfaces() {
        let up = flags & libc::IFF_UP as u32 != 0;
        let wanted = if ip.is_unspecified() {
            up
        } else {
            addr == Some(ip)
        };
        if !wanted || out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let loopback = flags & libc::IFF_LOOPBACK as u32 != 0;
        let sys = std::path::Path::new("/sys/class/net").join(&name);
        let has_device = sys.join("device").exists();
        let driver = std::fs::read_link(sys.join("device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        out.push((
            name,
            Path::classify(loopback, has_device, driver.as_deref()),
        ));
    }
    out
}

/// Every interface address: its interface's name, the address (IPv4 or IPv6), its flags.
fn interfaces() -> Vec<(String, Option<IpAddr>, u32)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated into `head`, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is null or points to a sockaddr whose family says its layout.
        let addr = unsafe { sockaddr_ip(ifa.ifa_addr) };
        out.push((name, addr, ifa.ifa_flags));
        p = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and no reference into it outlives this call.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The IP address of a `sockaddr` (`None` for a null pointer or another family).
///
/// # Safety
/// `sa` is null or points to a valid `sockaddr` of the size its family implies.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null and valid by the caller's contract; the family is read first.
    match i32::from(unsafe { (*sa).sa_family }) {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            Some(IpAddr::from(
                u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_classified_from_sysfs() {
        assert_eq!(Path::classify(true, false, None), Path::Loopback);
        assert_eq!(Path::classify(false, false, None), Path::VirtualDevice);
        assert_eq!(
            Path::classify(false, true, Some("virtio_net")),
            Path::VirtualNic("virtio_net".into())
        );
        assert_eq!(
            Path::classify(false, true, Some("mlx5_core")),
            Path::Nic("mlx5_core".into())
        );
        assert!(Path::Loopback.zero_copy_copies());
        assert!(Path::VirtualDevice.zero_copy_copies());
        assert!(Path::VirtualNic("vmxnet3".into()).zero_copy_copies());
        assert!(!Path::Nic("ixgbe".into()).zero_copy_copies());
    }

    #[test]
    fn auto_picks_pages_only_where_every_path_copies() {
        let lo = ("lo".to_string(), Path::Loopback);
        let virt = ("eth0".to_string(), Path::VirtualNic("virtio_net".into()));
        let nic = ("eth1".to_string(), Path::Nic("ice".into()));
        assert_eq!(
            auto_by_path(std::slice::from_ref(&lo)).kind,
            LeaseKind::Pages
        );
        assert_eq!(
            auto_by_path(&[lo.clone(), virt.clone()]).kind,
            LeaseKind::Pages
        );
        let mixed = auto_by_path(&[lo, virt, nic]);
        assert_eq!(mixed.kind, LeaseKind::Memory);
        assert!(mixed.why.contains("eth1: NIC, ice"), "{}", mixed.why);
        assert_eq!(auto_by_path(&[]).kind, LeaseKind::Memory);
    }

    #[test]
    fn a_loopback_address_is_loopback() {
        assert_eq!(
            path_of("127.0.0.1".parse().unwrap()),
            vec![("lo".to_string(), Path::Loopback)]
        );
        assert_eq!(path_of("::1".parse().unwrap())[0].1, Path::Loopback);
    }

    #[test]
    fn pipes_are_sized_for_the_worst_start_of_a_chunk() {
        assert_eq!(pipe_bytes_for_chunk(1 << 20, 4096), 1 << 20);
        assert_eq!(pipe_bytes_for_chunk(65536, 4096), 65536);
        // 1 MiB + 1 byte, or an unaligned 1 MiB - 1, spans 257 pages: a 2 MiB pipe.
        assert_eq!(pipe_bytes_for_chunk((1 << 20) + 1, 4096), 2 << 20);
        assert_eq!(pipe_bytes_for_chunk((1 << 20) - 1, 4096), 2 << 20);
        assert_eq!(pipe_bytes_for_chunk(1, 4096), 4096);
        assert_eq!(pipes_needed(16, 8), 136);
    }
}
