//! The disk root in real VMs under QEMU: the Debian tools of the default
//! image run; a persistent VM's writable layer survives stop/start and a
//! crash of its capsem-process, and `rm` takes its disk; a temporary VM's
//! disk leaves nothing behind. `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh`
//! leaves them out (nextest profile `novm`).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use capsem_tests::fixture::wait_until;
use capsem_tests::persist::{self, ok};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;
/// Under TCG a boot plus a command takes tens of seconds.
const STEP: Duration = Duration::from_secs(180);

fn run(fx: &Fixture, args: &[&str]) -> Output {
    fx.capsem()
        .arg("run")
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bytes the file's blocks take on the host (not its apparent length).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Bytes every file under `dir` takes on the host.
fn usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

#[test]
fn the_default_image_has_python_git_gcc_and_curl() {
    let fx = Fixture::new("disk_tools", B);
    let out = run(&fx, &["python3", "-c", "print(6*7)"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "42\n");

    let out = run(
        &fx,
        &[
            "sh",
            "-c",
            "git --version && gcc --version && curl --version && grep ' / ' /proc/mounts",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stdout.contains("git version 2."), "{stdout}");
    assert!(stdout.contains("gcc (Debian 12"), "{stdout}");
    assert!(
        stdout.starts_with("git") && stdout.contains("\ncurl 7."),
        "{stdout}"
    );
    // The root is the overlay over the read-only image.
    assert!(stdout.contains("overlay / overlay"), "{stdout}");
    fx.assert_nothing_left();
}

#[test]
fn a_persistent_vms_writable_layer_survives_stop_start_and_a_crash() {
    let fx = Fixture::new("disk_persist", B);
    ok(&fx, &["create", "dev"]);
    let disk = persist::vm_dir(&fx, "dev").join("disk.img");
    // Sparse: 8 GiB long, a small part of it allocated.
    let len = std::fs::metadata(&disk).unwrap().len();
    assert_eq!(len, 8 << 30);
    assert!(
        allocated(&disk) < len / 16,
        "{} allocated",
        allocated(&disk)
    );

    let out = persist::exec(
        &fx,
        "dev",
        &[
            "--",
            "sh",
            "-c",
            "echo kept-$((6*7)) > /root/note && cp /bin/true /usr/local/bin/mytrue \
             && python3 -m venv --without-pip /root/v && sync",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);

    let check = "cat /root/note && /usr/local/bin/mytrue && echo mytrue-ran \
                 && /root/v/bin/python -c 'import sys; print(sys.prefix)'";
    let expected = "kept-42\nmytrue-ran\n/root/v\n";
    assert_eq!(ok(&fx, &["stop", "dev"]).trim(), "dev");
    assert_eq!(ok(&fx, &["start", "dev"]).trim(), "dev");
    let out = persist::exec(&fx, "dev", &["--", "sh", "-c", check], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert_eq!(text(&out).0, expected);

    // kill -9 of capsem-process: the guest keeps running and is adopted,
    // with its writable layer as it was.
    let pid = persist::process_pid(&fx, "dev");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(STEP, "capsem-process gone", || !persist::running(pid));
    assert_eq!(ok(&fx, &["start", "dev"]).trim(), "dev");
    assert_eq!(persist::inspect(&fx, "dev")["adoptions"], 1);
    let out = persist::exec(&fx, "dev", &["--", "sh", "-c", check], b"");
    assert_eq!(text(&out).0, expected, "{}", text(&out).1);
    // And a boot after the adoption still finds it.
    ok(&fx, &["stop", "dev"]);
    ok(&fx, &["start", "dev"]);
    let out = persist::exec(&fx, "dev", &["--", "sh", "-c", check], b"");
    assert_eq!(text(&out).0, expected, "{}", text(&out).1);

    ok(&fx, &["rm", "--force", "dev"]);
    assert!(!disk.exists());
    assert!(!persist::vm_dir(&fx, "dev").exists());
    fx.assert_nothing_left();
}

#[test]
fn a_temporary_vm_that_wrote_100_mib_leaves_nothing_even_after_kill_9_of_the_cli() {
    let fx = Fixture::new("disk_temporary", B);
    let mut child = fx
        .capsem()
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/root/big bs=1M count=100 2>/dev/null && sync \
             && echo written && exec sleep 600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().map(Result::unwrap);
    assert_eq!(first.as_deref(), Some("written"));
    let dir = fx.wait_vm(STEP);
    let disk = dir.join("disk.img");
    // dd wrote zeros: they reach the host as 100 MiB of blocks (the ext4
    // in the guest does not know they are zeros).
    assert!(
        allocated(&disk) >= 100 << 20,
        "{} bytes allocated",
        allocated(&disk)
    );

    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(STEP, "the temporary VM's directory removed", || {
        fx.vm_dirs().is_empty()
    });
    fx.assert_nothing_left();
    let left = usage(fx.home());
    assert!(left < 1 << 20, "{left} bytes left under the home");
}
