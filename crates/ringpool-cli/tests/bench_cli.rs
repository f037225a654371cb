//! `ringpool bench --quick --json --workload idle-heavy` end to end: the workload runs, its
//! bytes verify, both sides serve requests, and ringpool's buffer memory is at most 5% of the
//! baseline's. Timings are printed by the bench but never asserted here (noisy VM).

use std::process::Command;

fn run_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run the ringpool binary")
}

#[test]
fn idle_heavy_quick_json() {
    let out = run_bench(&["--quick", "--json", "--workload", "idle-heavy"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let workloads = json["workloads"].as_array().expect("a workloads array");
    let w = workloads
        .iter()
        .find(|w| w["name"] == "idle-heavy")
        .expect("idle-heavy is reported");
    assert_eq!(w["verified"], true, "bytes not verified: {w:#}");

    let metric = |key: &str, side: &str| -> f64 {
        w["metrics"][key][side]
            .as_f64()
            .unwrap_or_else(|| panic!("metric {key}.{side} missing: {w:#}"))
    };
    assert!(metric("requests", "ringpool") > 0.0, "{w:#}");
    assert!(metric("requests", "baseline") > 0.0, "{w:#}");
    let ringpool_bytes = metric("buffer_bytes", "ringpool");
    let baseline_bytes = metric("buffer_bytes", "baseline");
    assert!(ringpool_bytes > 0.0, "{w:#}");
    assert!(
        ringpool_bytes <= 0.05 * baseline_bytes,
        "ringpool holds {ringpool_bytes} buffer bytes, more than 5% of the baseline's \
         {baseline_bytes}"
    );
}

#[test]
fn unknown_workload_is_a_clear_error() {
    let out = run_bench(&["--quick", "--workload", "no-such-workload"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown workload `no-such-workload`") && stderr.contains("idle-heavy"),
        "stderr: {stderr}"
    );
}
