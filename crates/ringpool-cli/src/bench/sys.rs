//! Process facts the bench needs from the OS: the open-file limit, a child's CPU time and
//! resident memory read from `/proc`, and this process's own CPU time (`getrusage`).

use std::io;
use std::time::Duration;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so one process can hold 10,000 sockets.
/// Children inherit the raised limit. Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the valid `lim`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Clock ticks per second, the unit of the CPU times in `/proc/PID/stat`.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// User plus system CPU time of process `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// utime (field 14) + stime (field 15) of a `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS in /proc/PID/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User plus system CPU time of the calling thread (`getrusage(RUSAGE_THREAD)`).
pub fn thread_cpu_time() -> io::Result<Duration> {
    rusage_cpu_time(libc::RUSAGE_THREAD)
}

/// User plus system CPU time of this whole process: every thread, including exited ones and
/// the kernel's io_uring workers (`getrusage(RUSAGE_SELF)`).
pub fn process_cpu_time() -> io::Result<Duration> {
    rusage_cpu_time(libc::RUSAGE_SELF)
}

fn rusage_cpu_time(who: libc::c_int) -> io::Result<Duration> {
    // SAFETY: `rusage` is plain old data; all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one `rusage` into the valid, exclusively borrowed `usage`.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// `statfs(2)`'s filesystem type of `dir`.
pub fn fs_magic(dir: &std::path::Path) -> super::BenchResult<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `statfs` is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path; statfs writes one `statfs` into the valid,
    // exclusively borrowed `st`.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("statfs {}: {e}", dir.display()).into());
    }
    // The magic numbers are 32-bit; `f_type`'s width and sign differ by target.
    Ok(st.f_type as u64 & 0xffff_ffff)
}

/// A filesystem's name and whether it lives in memory (no disk under `O_DIRECT`).
pub fn fs_kind(magic: u64) -> (&'static str, bool) {
    match magic {
        0x0102_1994 => ("tmpfs", true),
        0x8584_58f6 => ("ramfs", true),
        0xef53 => ("ext2/3/4", false),
        0x5846_5342 => ("xfs", false),
        0x9123_683e => ("btrfs", false),
        0x2fc1_2fc1 => ("zfs", false),
        0x794c_7630 => ("overlayfs", false),
        0x6573_5546 => ("fuse", false),
        0x6969 => ("nfs", false),
        0x0100_1001 => ("9p", false),
        _ => ("another filesystem", false),
    }
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let mask = current_affinity()?;
    // SAFETY: CPU_ISSET only reads the valid `mask`, within its CPU_SETSIZE bits.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &mask) })
        .collect())
}

/// The calling thread's CPU affinity mask.
pub fn current_affinity() -> io::Result<libc::cpu_set_t> {
    // SAFETY: `cpu_set_t` is plain old data; all-zero bytes are a valid (empty) set.
    let mut mask: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most the given size into the valid `mask`.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&mask), &mut mask) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mask)
}

/// Sets the affinity of thread `tid` (0: the calling thread) to `mask`.
pub fn set_affinity(tid: libc::pid_t, mask: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: sched_setaffinity only reads the valid `mask` of the given size.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(mask), mask) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A mask of the one CPU `cpu`.
pub fn one_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: `cpu_set_t` is plain old data; all-zero bytes are a valid (empty) set.
    let mut mask: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the valid, exclusively borrowed `mask`; `cpu` comes
    // from `allowed_cpus`, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut mask) };
    mask
}

/// Pins every thread of process `pid` to `cpu` (threads it starts later inherit the mask).
pub fn pin_process(pid: u32, cpu: usize) -> io::Result<()> {
    let mask = one_cpu(cpu);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid = task?.file_name().to_string_lossy().parse::<libc::pid_t>();
        if let Ok(tid) = tid {
            match set_affinity(tid, &mask) {
                // A thread that ended meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                r => r?,
            }
        }
    }
    Ok(())
}

/// Another process's CPU-time clock (`clock_getcpuclockid`): user + system time of all its
/// threads, exited ones included, in nanoseconds, where `/proc/PID/stat` counts clock ticks.
pub struct ProcessClock(libc::clockid_t);

impl ProcessClock {
    /// The CPU-time clock of process `pid`.
    pub fn of(pid: u32) -> std::io::Result<ProcessClock> {
        let mut id: libc::clockid_t = 0;
        // SAFETY: clock_getcpuclockid writes one clockid_t into the valid, exclusively
        // borrowed `id`; it returns an error number instead of setting errno.
        match unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut id) } {
            0 => Ok(ProcessClock(id)),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }

    /// The CPU time the process has used so far.
    pub fn now(&self) -> std::io::Result<std::time::Duration> {
        // SAFETY: `timespec` is plain old data; all-zero bytes are a valid value.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
        if unsafe { libc::clock_gettime(self.0, &mut ts) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::time::Duration::new(
            ts.tv_sec as u64,
            ts.tv_nsec as u32,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_counted_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 9 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(12));
    }

    #[test]
    fn vm_rss_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        cpu_ticks(pid).unwrap();
    }

    #[test]
    fn a_child_pinned_to_one_cpu_runs_only_there() {
        let cpu = *allowed_cpus().unwrap().last().expect("some CPU");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        pin_process(child.id(), cpu).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list");
        assert_eq!(allowed.trim(), cpu.to_string());
    }

    #[test]
    fn thread_cpu_time_grows_with_work() {
        let before = thread_cpu_time().unwrap();
        let mut x = 0u64;
        while thread_cpu_time().unwrap() < before + Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(process_cpu_time().unwrap() >= thread_cpu_time().unwrap());
    }
}
