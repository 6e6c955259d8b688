//! `capsem shell` in real VMs under QEMU (TCG here, KVM where it is loaded),
//! end to end through a real PTY. `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh`
//! leaves them out for a quick local run (a nextest filter on the `*_qemu`
//! binaries, counted as skipped); CI runs them.

use capsem_tests::scenarios;
use capsem_tests::Backend;

const B: Backend = Backend::Qemu;

#[test]
fn vm_exit_7() {
    scenarios::exit_7(B);
}

#[test]
fn vm_printf_end_then_exit_3() {
    scenarios::output_before_status(B);
}

#[test]
fn vm_killed_by_signal() {
    scenarios::killed_by_signal(B);
}

#[test]
fn vm_resize_reaches_the_guest() {
    scenarios::resize_reaches_the_shell(B);
}

#[test]
fn vm_ctrl_d_exits_zero() {
    scenarios::ctrl_d_exits_zero(B);
}

#[test]
fn vm_seed_case_ctrl_d_counts() {
    let counts = scenarios::seed_case_ctrl_d(B);
    // One generation: control, terminal and audit (in a VM, audit is on).
    assert_eq!(counts.vsock_connections_accepted, 3, "{counts:?}");
}

#[test]
fn vm_agent_killed_exits_255() {
    scenarios::agent_killed_exits_255(B);
}

#[test]
fn vm_kernel_panic_exits_255() {
    scenarios::session_lost_exits_255(
        "kernel_panic",
        B,
        "echo c > /proc/sysrq-trigger\r",
        "kernel panicked",
    );
}

#[test]
fn vm_transport_loss_reconnects_once_and_keeps_the_shell() {
    scenarios::transport_loss_keeps_the_shell(B);
}

#[test]
fn vm_sigterm_to_the_cli_destroys_the_vm() {
    scenarios::signal_to_the_cli_destroys_the_vm(B, nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn vm_boot_failure_exits_125_and_names_the_kept_logs() {
    let fx = capsem_tests::Fixture::new("boot_failure", B);
    // An image whose kernel QEMU cannot load.
    let image = fx.home().join("broken-image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("vmlinuz"), b"not a kernel").unwrap();
    std::fs::write(image.join("initramfs.cpio.gz"), b"not an initramfs").unwrap();
    std::fs::write(image.join("manifest.json"), b"{}").unwrap();
    let out = fx
        .capsem()
        .env("CAPSEM_IMAGE_DIR", &image)
        .arg("shell")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("capsem: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr:?}");
    let logs = lines[0]
        .split("(logs: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no kept-logs path in {:?}", lines[0]));
    let qemu_log = std::fs::read_to_string(std::path::Path::new(logs).join("qemu.log")).unwrap();
    assert!(!qemu_log.trim().is_empty(), "QEMU's complaint was not kept");
    assert!(std::path::Path::new(logs).join("process.log").exists());
    fx.assert_nothing_left();
}

#[test]
fn vm_run_separates_streams_and_returns_the_status() {
    let fx = capsem_tests::Fixture::new("vm_run", B);
    let out = fx
        .capsem()
        .args(["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert_eq!(out.stdout, b"out\n");
    assert!(stderr.ends_with("err\n"), "{stderr:?}");
    fx.assert_nothing_left();
}

/// The guest keeps time on a continuous clock: under TCG the kernel would
/// take the emulated CPU's TSCs for unsynchronized and fall back to the
/// jiffies (4 ms steps, every sleep rounded up to the tick) unless told
/// `tsc=reliable`; under KVM it is kvm-clock.
#[test]
fn vm_guest_clock_is_not_the_jiffies() {
    let fx = capsem_tests::Fixture::new("vm_clock", B);
    let source = run_ok(
        &fx,
        &[
            "cat",
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        ],
    );
    let source = source.trim();
    assert!(
        !source.is_empty() && !source.contains("jiffies"),
        "clocksource {source:?}"
    );
    fx.assert_nothing_left();
}

/// The guest's CPU flags: under TCG no ERMS (each `rep movsb` iteration is
/// emulated one by one, so the guest must take its wider copy loops);
/// under KVM the host's own flags, ERMS included where the host has it.
/// The accelerator is the one the VM ran on, read from the guest's CPU
/// model (TCG's is "QEMU TCG CPU"), so `$CAPSEM_ACCEL` cannot mislead it.
#[test]
fn vm_guest_cpu_has_erms_only_under_kvm() {
    let fx = capsem_tests::Fixture::new("vm_cpu_flags", B);
    let guest = run_ok(
        &fx,
        &[
            "grep",
            "-m2",
            "-e",
            "^model name",
            "-e",
            "^flags",
            "/proc/cpuinfo",
        ],
    );
    let line = |text: &str, key: &str| {
        let found = text.lines().find(|l| l.starts_with(key));
        found
            .unwrap_or_else(|| panic!("no {key} line in {text:?}"))
            .to_string()
    };
    let has_erms = |flags: &str| flags.split_whitespace().any(|f| f == "erms");
    let flags = line(&guest, "flags");
    assert!(flags.contains("sse2"), "not a flags line: {flags:?}");
    let expected = if line(&guest, "model name").contains("QEMU TCG CPU") {
        false
    } else {
        has_erms(&line(
            &std::fs::read_to_string("/proc/cpuinfo").unwrap(),
            "flags",
        ))
    };
    assert_eq!(has_erms(&flags), expected, "guest cpuinfo {guest:?}");
    fx.assert_nothing_left();
}

/// `capsem run -- ARGV` with no stdin: its stdout, after checking it exited 0.
/// (`cfg(test)`: clippy's allow-unwrap-in-tests then covers this helper.)
#[cfg(test)]
fn run_ok(fx: &capsem_tests::Fixture, argv: &[&str]) -> String {
    let out = fx
        .capsem()
        .args(["run", "--"])
        .args(argv)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
