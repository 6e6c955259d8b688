//! Boots that go wrong, in real VMs under QEMU: a guest that never
//! connects is killed with its console's last line in the error and
//! nothing left running (not orphaned), and a boot whose kernel reports a
//! fault it cannot recover from (`vmm::serial::BOOT_FAULTS`), or that has
//! not connected within a third of the boot timeout, is booted again. QEMU is wrapped by a script here to make each case happen.
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out (a nextest
//! filter on the `*_qemu` binaries), and nextest counts them as skipped.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};

use capsem_tests::persist;
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;

/// QEMU with capsem's arguments less its vsock device: a guest that boots
/// but can never connect, which from the host is what a hung guest is.
const QEMU_WITHOUT_VSOCK: &str = r#"#!/bin/bash
args=()
for a in "$@"; do
    if [ "$a" = vhost-user-vsock-device,chardev=vsock ]; then
        unset 'args[${#args[@]}-1]'
        continue
    fi
    args+=("$a")
done
exec qemu-system-x86_64 "${args[@]}"
"#;

/// The first start prints the kernel's line for a failed local APIC timer
/// calibration on the console (its stdout) and hangs, as that boot does;
/// every later start is QEMU itself.
const QEMU_FAULT_ONCE: &str = r#"#!/bin/bash
if mkdir "$(dirname "$0")/marks/started" 2>/dev/null; then
    echo "[    0.212329] APIC frequency too slow, disabling apic timer"
    exec sleep 600
fi
exec qemu-system-x86_64 "$@"
"#;

/// The first start prints nothing and hangs, as a boot whose LAPIC timer
/// got a wrong rate does; every later start is QEMU itself.
const QEMU_SILENT_ONCE: &str = r#"#!/bin/bash
if mkdir "$(dirname "$0")/marks/started" 2>/dev/null; then
    exec sleep 600
fi
exec qemu-system-x86_64 "$@"
"#;

/// A directory any uid may enter (QEMU runs as the VM's own uid) holding
/// `script` as `qemu`, and `marks/`, which any uid may write.
struct Wrapper {
    dir: tempfile::TempDir,
}

impl Wrapper {
    fn new(script: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("capsem-qemu-")
            .tempdir_in("/tmp")
            .unwrap();
        let mode = |p: &std::path::Path, m| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(dir.path(), 0o755);
        std::fs::write(dir.path().join("qemu"), script).unwrap();
        mode(&dir.path().join("qemu"), 0o755);
        std::fs::create_dir(dir.path().join("marks")).unwrap();
        mode(&dir.path().join("marks"), 0o777);
        Self { dir }
    }

    fn qemu(&self) -> PathBuf {
        self.dir.path().join("qemu")
    }
}

fn capsem_with(fx: &Fixture, qemu: &Wrapper, boot_ms: &str, args: &[&str]) -> Output {
    fx.capsem()
        .args(args)
        .env("CAPSEM_QEMU_BIN", qemu.qemu())
        .env("CAPSEM_BOOT_TIMEOUT_MS", boot_ms)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A persistent VM whose guest never connects fails `create` with the
/// console's last line, and leaves nothing running: capsem-process kills
/// QEMU inside the CLI's grace (before, it gave an un-asked guest the 8 s
/// of a shutdown, the CLI killed capsem-process at 5 s, and QEMU stayed
/// running, orphaned).
#[test]
fn a_boot_that_never_connects_is_killed_not_orphaned() {
    let fx = Fixture::new("boot_never_connects", B);
    let qemu = Wrapper::new(QEMU_WITHOUT_VSOCK);
    let out = capsem_with(&fx, &qemu, "15000", &["create", "hung"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("did not connect within 15000 ms; its console's last line: "),
        "{err}"
    );
    // Stopped, not orphaned: nothing of it runs.
    let list = persist::ok(&fx, &["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("hung ") && l.contains(" stopped ")),
        "{list}"
    );
    persist::ok(&fx, &["rm", "hung"]);
    fx.assert_nothing_left();
}

/// `capsem run -- echo second-boot` with QEMU wrapped by `script`, whose
/// first start is a boot that must be killed and started again: the
/// command runs (exit 0, its output), process.log says why with `reason`
/// and counts two QEMU starts, and nothing is left. Returns the kept logs.
fn run_booted_twice(
    name: &str,
    script: &str,
    boot_ms: &str,
    reason: &str,
) -> std::collections::BTreeMap<String, String> {
    let fx = Fixture::new(name, B);
    let qemu = Wrapper::new(script);
    let out = capsem_with(&fx, &qemu, boot_ms, &["run", "--", "echo", "second-boot"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "second-boot\n");
    let logs = fx.kept_logs();
    let process = &logs["process.log"];
    assert!(
        process.contains(&format!(
            "{reason}: this boot cannot work; booting again (2 of 3)"
        )),
        "{process}"
    );
    assert_eq!(process.matches("started qemu (pid").count(), 2, "{process}");
    fx.assert_nothing_left();
    logs
}

/// The console's boot fault line makes capsem-process kill that boot and
/// boot again; the command then runs as if nothing had happened, and the
/// faulted boot's processes are gone.
#[test]
fn a_kernel_boot_fault_is_booted_again() {
    let logs = run_booted_twice(
        "boot_fault_reboots",
        QEMU_FAULT_ONCE,
        "120000",
        "APIC frequency too slow, disabling apic timer\"",
    );
    assert!(logs["serial.log"].contains("APIC frequency too slow"));
}

/// A boot that prints nothing and never connects gets a third of the boot
/// timeout (at least 20 s), then it is killed and started again.
#[test]
fn a_boot_that_does_not_connect_in_time_is_booted_again() {
    run_booted_twice(
        "boot_silent_reboots",
        QEMU_SILENT_ONCE,
        "60000",
        "the guest did not connect within 20 s (its console's last line: nothing)",
    );
}
