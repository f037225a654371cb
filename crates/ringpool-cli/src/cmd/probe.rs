//! `ringpool probe`: the kernel's io_uring features and the fallback rung chosen for each.

use ringpool::{sys::Memlock, Driver, DriverConfig, Features, Force, Ladder};

/// Submission queue entries of the servers' rings (`echo`, `proxy`, `fanout`).
pub const SERVER_RING_ENTRIES: u32 = 1024;

/// Arguments of `ringpool probe`.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let f = Features::get();
    let forced = Force::from_env()?;
    let ladder = Ladder::choose(f, &forced);
    let features = feature_table(f);
    let memlock = match f.memlock {
        Memlock::Unlimited => "unlimited".to_string(),
        Memlock::Limited(b) => format!("{} KiB", b / 1024),
    };
    let opcodes = f.opcodes.iter().filter(|&&s| s).count();
    // What the servers need first: a ring of their size. The feature table alone can read
    // "supported" while RLIMIT_MEMLOCK leaves no room for that ring.
    let ring_setup = match Driver::new(DriverConfig::default().entries(SERVER_RING_ENTRIES)) {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    let probe = Probe {
        f,
        forced: &forced,
        ladder: &ladder,
        features: &features,
        memlock: &memlock,
        opcodes,
        ring_setup: &ring_setup,
    };
    if args.json {
        return probe.print_json();
    }
    probe.print_table();
    Ok(())
}

/// Each feature: its name, whether this kernel has it, and the kernel that brought it.
fn feature_table(f: &Features) -> Vec<(&'static str, bool, &'static str)> {
    vec![
        ("io_uring", f.io_uring, "5.1"),
        ("provide_buffers", f.provide_buffers, "5.7"),
        ("buf_ring", f.buf_ring, "5.19"),
        ("buf_ring_incremental", f.buf_ring_incremental, "6.12"),
        ("bundle", f.bundle, "6.10"),
        ("recv_multishot", f.recv_multishot, "6.0"),
        ("accept_multishot", f.accept_multishot, "5.19"),
        ("send_zc", f.send_zc, "6.0"),
        ("sendmsg_zc", f.sendmsg_zc, "6.1"),
        ("fixed_buffers", f.fixed_buffers, "5.19"),
        ("zc_report_usage", f.zc_report_usage, "6.2"),
        ("vectored_fixed", f.vectored_fixed, "6.15"),
        ("clone_buffers", f.clone_buffers, "6.13"),
        ("defer_taskrun", f.defer_taskrun, "6.1"),
        ("ext_arg", f.ext_arg, "5.11"),
    ]
}

/// What `probe` found, to print.
struct Probe<'a> {
    f: &'a Features,
    forced: &'a [Force],
    ladder: &'a Ladder,
    features: &'a [(&'static str, bool, &'static str)],
    memlock: &'a str,
    opcodes: usize,
    ring_setup: &'a str,
}

impl Probe<'_> {
    /// `--json`.
    fn print_json(&self) -> Result<(), Box<dyn std::error::Error>> {
        let (f, forced, ladder, features) = (self.f, self.forced, self.ladder, self.features);
        let json = serde_json::json!({
            "kernel": f.kernel.to_string(),
            "opcodes_supported": self.opcodes,
            "memlock": self.memlock,
            "ring_setup": self.ring_setup,
            "forced": forced.iter().map(|r| r.name()).collect::<Vec<_>>(),
            "features": features.iter().map(|(n, s, _)| (n.to_string(), serde_json::Value::Bool(*s))).collect::<serde_json::Map<_, _>>(),
            "ladder": ladder.describe().into_iter().map(|(c, r)| (c.to_string(), serde_json::Value::String(r.to_string()))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        Ok(())
    }

    /// The table.
    fn print_table(&self) {
        println!(
            "kernel {}   opcodes supported: {}   memlock: {}",
            self.f.kernel, self.opcodes, self.memlock
        );
        println!(
            "ring setup ({SERVER_RING_ENTRIES} entries, as the servers use): {}",
            self.ring_setup
        );
        if !self.forced.is_empty() {
            let names: Vec<_> = self.forced.iter().map(|r| r.name()).collect();
            println!("forced rungs (RINGPOOL_FORCE): {}", names.join(", "));
        }
        println!();
        println!("{:<22} {:<10} since", "feature", "supported");
        for (name, supported, since) in self.features {
            println!(
                "{:<22} {:<10} {}",
                name,
                if *supported { "yes" } else { "no" },
                since
            );
        }
        println!();
        println!("{:<22} rung in use", "capability");
        for (capability, rung) in self.ladder.describe() {
            println!("{capability:<22} {rung}");
        }
    }
}
