//! `capsem run` on the no-VM backend: one command in a temporary VM, its
//! streams and its exit status, end to end through the real binaries.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::None;
/// What `--vmm none` prints on stderr before anything of the command's.
const WARNING: &str = "capsem: warning: --vmm none runs the shell on this host with no isolation\n";

/// `capsem run ARGS...` with stdin from `/dev/null`, to completion.
fn run(fx: &Fixture, args: &[&str]) -> Output {
    fx.capsem()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The command's own stderr: capsem's stderr after the backend warning.
fn cmd_stderr(out: &Output) -> Vec<u8> {
    let err = &out.stderr;
    assert!(
        err.starts_with(WARNING.as_bytes()),
        "{:?}",
        String::from_utf8_lossy(err)
    );
    err[WARNING.len()..].to_vec()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| panic!("{out:?}"))
}

#[test]
fn stdout_and_stderr_are_separate() {
    let fx = Fixture::new("run_streams", B);
    let out = run(
        &fx,
        &[
            "--",
            "sh",
            "-c",
            "printf out1; printf err1 >&2; printf out2; printf err2 >&2",
        ],
    );
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(out.stdout, b"out1out2");
    assert_eq!(cmd_stderr(&out), b"err1err2");
    fx.assert_nothing_left();
}

#[test]
fn all_256_byte_values_arrive_exactly() {
    let fx = Fixture::new("run_bytes", B);
    let format: String = (0u32..=255).map(|b| format!("\\{b:03o}")).collect();
    let out = run(&fx, &["--", "printf", &format]);
    assert_eq!(code(&out), 0, "{out:?}");
    let want: Vec<u8> = (0u8..=255).collect();
    assert_eq!(out.stdout, want);
    assert_eq!(cmd_stderr(&out), b"");
    fx.assert_nothing_left();
}

#[test]
fn binary_output_checksum_matches() {
    let fx = Fixture::new("run_binary", B);
    let out = run(
        &fx,
        &[
            "--",
            "sh",
            "-c",
            "head -c 300000 /dev/urandom > blob && sha256sum < blob >&2 && cat blob",
        ],
    );
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(out.stdout.len(), 300_000);
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sum.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let local = sum.wait_with_output().unwrap();
    assert_eq!(cmd_stderr(&out), local.stdout, "checksums differ");
    fx.assert_nothing_left();
}

#[test]
fn stdin_reaches_cat_with_its_eof() {
    let fx = Fixture::new("run_stdin", B);
    let input: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut child = fx
        .capsem()
        .args(["run", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.clone();
    // Written on its own thread so output is read while input is sent.
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).unwrap();
        // Dropping stdin is the EOF `cat` must see to exit.
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(code(&out), 0, "{:?}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "stdin did not come back byte for byte");
    fx.assert_nothing_left();
}

#[test]
fn exit_codes() {
    let fx = Fixture::new("run_codes", B);
    assert_eq!(code(&run(&fx, &["--", "true"])), 0);
    assert_eq!(code(&run(&fx, &["--", "sh", "-c", "exit 5"])), 5);
    assert_eq!(code(&run(&fx, &["--", "sh", "-c", "kill -9 $$"])), 137);

    let out = run(&fx, &["--", "capsem-no-such-command"]);
    assert_eq!(code(&out), 127);
    assert_eq!(
        String::from_utf8_lossy(&cmd_stderr(&out)),
        "capsem: cannot run capsem-no-such-command: No such file or directory\n"
    );

    // Exists, not executable.
    let out = run(&fx, &["--", "/etc/passwd"]);
    assert_eq!(code(&out), 126, "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&cmd_stderr(&out)),
        "capsem: cannot run /etc/passwd: Permission denied\n"
    );

    let start = Instant::now();
    let out = run(&fx, &["--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(code(&out), 124, "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(15));
    fx.assert_nothing_left();
}

#[test]
fn timeout_kills_background_grandchildren() {
    let fx = Fixture::new("run_timeout_tree", B);
    let out = run(
        &fx,
        &[
            "--timeout",
            "1",
            "--",
            "sh",
            "-c",
            "sleep 1000 & sleep 1000 & sleep 1000",
        ],
    );
    assert_eq!(code(&out), 124, "{out:?}");
    fx.assert_nothing_left();
}

#[test]
fn background_jobs_die_with_the_command() {
    let fx = Fixture::new("run_bg", B);
    let out = run(&fx, &["--", "sh", "-c", "sleep 1000 & echo started"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(out.stdout, b"started\n");
    fx.assert_nothing_left();
}

#[test]
fn twenty_concurrent_runs() {
    let fx = Fixture::new("run_concurrent", B);
    // With --vmm none every command sees the host's files: a barrier in this
    // test's home proves the 20 ran at once (one by one, none passes it).
    let dir = fx.home().join("barrier.d");
    let dir = dir.to_str().unwrap();
    let children: Vec<_> = (0..20)
        .map(|i| {
            fx.capsem()
                .args([
                    "run",
                    "--",
                    "sh",
                    "-c",
                    &format!(
                        "echo run-{i}; {}; echo err-{i} >&2",
                        capsem_tests::persist::barrier(dir, 20)
                    ),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("run-{i}\n"));
        assert_eq!(
            String::from_utf8_lossy(&cmd_stderr(&out)),
            format!("err-{i}\n")
        );
    }
    fx.assert_nothing_left();
}

#[test]
fn env_workdir_and_a_refused_variable() {
    let fx = Fixture::new("run_env", B);
    let out = run(
        &fx,
        &[
            "-e",
            "GREETING=hello world",
            "--workdir",
            "/",
            "--",
            "sh",
            "-c",
            "printf '%s|%s' \"$GREETING\" \"$(pwd)\"",
        ],
    );
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(out.stdout, b"hello world|/");

    let out = run(&fx, &["-e", "LD_PRELOAD=/x.so", "--", "true"]);
    assert_eq!(code(&out), 125, "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("capsem: ") && err.contains("LD_PRELOAD"),
        "{err}"
    );
    let out = run(&fx, &["-e", "BAD-NAME=1", "--", "true"]);
    assert_eq!(code(&out), 125, "{out:?}");
    fx.assert_nothing_left();
}

#[test]
fn an_image_needs_a_vm() {
    let fx = Fixture::new("run_image_none", B);
    let out = run(&fx, &["--image", "127.0.0.1:1/t/img:1", "--", "true"]);
    assert_eq!(code(&out), 125, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("capsem: --image needs a VM"), "{err}");
    fx.assert_nothing_left();
}

#[test]
fn sigterm_to_capsem_stops_the_command_group() {
    let fx = Fixture::new("run_sigterm", B);
    let mut child = fx
        .capsem()
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "sleep 1000 & echo ready; sleep 1000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}");
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    fx.assert_nothing_left();
}

#[test]
fn a_network_policy_is_refused_without_a_vm_and_nothing_starts() {
    let fx = Fixture::new("run_net_none", B);
    for args in [
        &["--net", "open", "--", "true"][..],
        &["--net", "allow=pypi.org:443", "--", "true"][..],
        &["--net", "allow=a..b", "--", "true"][..],
        &["--net", "none", "--net", "open", "--", "true"][..],
    ] {
        let out = run(&fx, args);
        assert_eq!(code(&out), 125, "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("capsem: ") && err.contains("--net"),
            "{err}"
        );
    }
    let out = fx
        .capsem()
        .args(["create", "n1", "--net", "open"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 125);
    // `--net none` is the default, and fine without a VM.
    let out = run(&fx, &["--net", "none", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    fx.assert_nothing_left();
}
