//! Issue 18, unclear messages: a careless operator's mistake is named with its flag, its value
//! and what would work, and flags that make no sense are refused at start, not accepted.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

/// Runs `ringpool <args>` (stopped after 5 s if it wrongly starts serving); (rc, stderr).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_ringpool"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        // SAFETY: kill signals a process we spawned (at worst one that already exited).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(args: &[&str], parts: &[&str]) {
    let (rc, err) = run(args);
    assert!(
        matches!(rc, Some(1 | 2)),
        "{args:?} must be refused, rc {rc:?}: {err}"
    );
    for part in parts {
        assert!(err.contains(part), "{args:?}: {part:?} missing from: {err}");
    }
}

#[test]
fn an_address_in_use_names_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for server in [
        &["echo"][..],
        &["echo", "--rt"],
        &["proxy", "--upstream", "127.0.0.1:9"],
        &["proxy", "--rt", "--upstream", "127.0.0.1:9"],
        &["fanout", "--file", "/etc/hostname"],
        &["fanout", "--rt", "--file", "/etc/hostname"],
    ] {
        let mut args = server.to_vec();
        args.extend(["--listen", &addr]);
        assert_refused(&args, &["--listen", &addr, "in use"]);
    }
}

#[test]
fn a_group_the_flags_cannot_make_names_the_flags() {
    assert_refused(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--bufs",
            "32768",
        ],
        &["--bufs 32768", "--buf-size 65536", "1024 MiB"],
    );
    assert_refused(
        &[
            "proxy",
            "--rt",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--bufs",
            "32768",
        ],
        &["--bufs 32768", "--buf-size 65536", "1024 MiB"],
    );
    for rt in [&[][..], &["--rt"]] {
        let mut args = vec!["echo", "--listen", "127.0.0.1:0", "--bufs", "1000"];
        args.extend_from_slice(rt);
        assert_refused(&args, &["--bufs 1000", "power of two"]);
    }
}

#[test]
fn a_missing_file_names_its_path() {
    for rt in [&[][..], &["--rt"]] {
        let mut args = vec![
            "fanout",
            "--listen",
            "127.0.0.1:0",
            "--file",
            "/no/such/file",
        ];
        args.extend_from_slice(rt);
        assert_refused(&args, &["--file /no/such/file", "No such file"]);
    }
}

#[test]
fn fanout_refuses_zero_chunks_clients_and_timeouts() {
    for (flag, value, part) in [
        ("--chunk", "0", "at least 1"),
        ("--chunk", "3000000000", "1024 MiB"),
        ("--in-flight", "0", "at least 1"),
        ("--clients", "0", "at least 1"),
        ("--laggard-timeout", "0", "more than 0"),
    ] {
        let args = [
            "fanout",
            "--listen",
            "127.0.0.1:0",
            "--file",
            "/etc/hostname",
            flag,
            value,
        ];
        assert_refused(&args, &[flag, part]);
    }
}
