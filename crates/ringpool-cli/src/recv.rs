//! `--recv`: where the servers' received bytes land. A buffer group shared by every connection
//! (`groups`), a zero-copy receive area (`zcrx`: device-less, 7.1+; `zcrx=IFNAME:QUEUE`: fed by
//! a NIC queue), or `auto`: a device-less area where the kernel and this process can register
//! one, else the group.

use ringpool::{BufGroup, Driver, DriverConfig, Error, Features, ZcrxArea, ZcrxConfig, ZcrxProbe};

/// What `--recv` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvChoice {
    Groups,
    Auto,
    DeviceLess,
    Nic { interface: String, queue: u32 },
}

/// Parses `groups`, `auto`, `zcrx` or `zcrx=IFNAME:QUEUE`.
pub fn parse_recv(s: &str) -> Result<RecvChoice, String> {
    match s {
        "groups" => Ok(RecvChoice::Groups),
        "auto" => Ok(RecvChoice::Auto),
        "zcrx" => Ok(RecvChoice::DeviceLess),
        _ => {
            let nic = s.strip_prefix("zcrx=").and_then(|v| v.split_once(':'));
            match nic {
                Some((ifname, queue)) if !ifname.is_empty() => Ok(RecvChoice::Nic {
                    interface: ifname.to_string(),
                    queue: queue
                        .parse()
                        .map_err(|_| format!("--recv {s}: the queue must be a number"))?,
                }),
                _ => Err(format!(
                    "--recv {s}: expected groups, auto, zcrx or zcrx=IFNAME:QUEUE"
                )),
            }
        }
    }
}

impl RecvChoice {
    /// Whether the driver's ring must be set up for zero-copy receive: asked for, or `auto`
    /// where the probe registered a device-less area.
    pub fn wants_zcrx_ring(&self) -> bool {
        match self {
            RecvChoice::Groups => false,
            RecvChoice::Auto => Features::get().zcrx_device_less == ZcrxProbe::Works,
            RecvChoice::DeviceLess | RecvChoice::Nic { .. } => true,
        }
    }

    /// The driver configuration `base` with the ring this choice needs.
    pub fn config(&self, base: DriverConfig) -> DriverConfig {
        base.zero_copy_receive(self.wants_zcrx_ring())
    }
}

/// Where a server's receives put their bytes.
pub enum Source {
    Group(BufGroup),
    Zcrx(ZcrxArea),
}

/// The source `choice` gives on `driver`: an area of `buffers` 4 KiB buffers, or the group
/// `group()` makes. `auto` falls back to the group (saying why on stderr); an explicit `zcrx`
/// that cannot register is an error with the kernel's reason.
pub fn source(
    driver: &mut Driver,
    choice: &RecvChoice,
    buffers: u32,
    group: impl FnOnce(&mut Driver) -> Result<BufGroup, String>,
) -> Result<Source, String> {
    let bytes = buffers as usize * ringpool::ZCRX_BUF_SIZE;
    let cfg = match choice {
        RecvChoice::Groups => return group(driver).map(Source::Group),
        RecvChoice::Auto | RecvChoice::DeviceLess => ZcrxConfig::device_less(bytes),
        RecvChoice::Nic { interface, queue } => ZcrxConfig::nic(interface, *queue, bytes),
    };
    match driver.zcrx_area(cfg) {
        Ok(area) => Ok(Source::Zcrx(area)),
        Err(Error::ZcrxUnavailable { reason }) if *choice == RecvChoice::Auto => {
            eprintln!("receive: buffer groups (zero-copy receive unavailable: {reason})");
            group(driver).map(Source::Group)
        }
        Err(e) => Err(format!("--recv: {e}")),
    }
}

impl Source {
    /// One line for the start banner.
    pub fn describe(&self) -> String {
        match self {
            Source::Group(g) => format!(
                "buffer group {}: {} x {} B = {} B ({}), shared by all connections",
                g.id(),
                g.stats().total,
                g.buffer_bytes() / g.stats().total.max(1) as u64,
                g.buffer_bytes(),
                if g.is_ring() {
                    "buffer ring"
                } else {
                    "legacy provided buffers"
                }
            ),
            Source::Zcrx(a) => {
                let s = a.stats();
                format!(
                    "zero-copy receive area {}: {} x {} B = {} B ({}, {:?} pages), shared by all connections",
                    a.id(),
                    s.total,
                    ringpool::ZCRX_BUF_SIZE,
                    s.total as usize * ringpool::ZCRX_BUF_SIZE,
                    if s.device_less {
                        "device-less: the kernel copies each byte into the area once"
                    } else {
                        "fed by a NIC queue"
                    },
                    s.backing
                )
            }
        }
    }

    /// (total, in_kernel, in_user) buffers.
    pub fn counts(&self) -> (u32, u32, u32) {
        match self {
            Source::Group(g) => {
                let s = g.stats();
                (s.total, s.in_kernel, s.in_user)
            }
            Source::Zcrx(a) => {
                let s = a.stats();
                (s.total, s.in_kernel, s.in_user)
            }
        }
    }

    /// The statistics line printed at stop, and the fields for the `stats {json}` line.
    pub fn report(&self) -> (String, serde_json::Value) {
        match self {
            Source::Group(g) => {
                let s = g.stats();
                (
                    format!(
                        "group stats: total {} in_kernel {} in_user {} enobufs {} rearms {} grows {} bytes_received {}",
                        s.total, s.in_kernel, s.in_user, s.enobufs, s.rearms, s.grows, s.bytes_received
                    ),
                    serde_json::json!({
                        "recv": "groups", "buffer_bytes": g.buffer_bytes(),
                        "total": s.total, "in_kernel": s.in_kernel, "in_user": s.in_user,
                        "enobufs": s.enobufs, "rearms": s.rearms, "bytes_received": s.bytes_received,
                    }),
                )
            }
            Source::Zcrx(a) => {
                let s = a.stats();
                let copied = if s.device_less { s.bytes_received } else { 0 };
                (
                    format!(
                        "zcrx stats: total {} in_kernel {} in_user {} bytes_received {} refills {} flushes {} full {} rearms {} copied_by_kernel {}",
                        s.total, s.in_kernel, s.in_user, s.bytes_received, s.refills, s.flushes, s.full, s.rearms, copied
                    ),
                    serde_json::json!({
                        "recv": "zcrx",
                        "buffer_bytes": s.total as u64 * ringpool::ZCRX_BUF_SIZE as u64,
                        "total": s.total, "in_kernel": s.in_kernel, "in_user": s.in_user,
                        "enobufs": s.full, "rearms": s.rearms, "bytes_received": s.bytes_received,
                        "zcrx_refills": s.refills, "zcrx_flushes": s.flushes, "zcrx_full": s.full,
                        "zcrx_copied_bytes": copied, "zcrx_device_less": s.device_less,
                    }),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_choices_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_recv("groups"), Ok(RecvChoice::Groups));
        assert_eq!(parse_recv("auto"), Ok(RecvChoice::Auto));
        assert_eq!(parse_recv("zcrx"), Ok(RecvChoice::DeviceLess));
        assert_eq!(
            parse_recv("zcrx=eth0:3"),
            Ok(RecvChoice::Nic {
                interface: "eth0".into(),
                queue: 3
            })
        );
        assert!(parse_recv("zcrx=eth0:x").unwrap_err().contains("number"));
        assert!(parse_recv("zcrx=:1").unwrap_err().contains("expected"));
        assert!(parse_recv("pipes")
            .unwrap_err()
            .contains("groups, auto, zcrx"));
    }
}
