//! `capsem shell` in real VMs under QEMU (TCG here, KVM where it is loaded),
//! end to end through a real PTY. `CAPSEM_SKIP_VM_TESTS=1` skips them for a
//! quick local run; CI runs them.

use capsem_tests::scenarios;
use capsem_tests::Backend;

const B: Backend = Backend::Qemu;

/// True when the real-VM tests were asked to be skipped.
fn skipped() -> bool {
    let skip = std::env::var("CAPSEM_SKIP_VM_TESTS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("CAPSEM_SKIP_VM_TESTS=1: skipped");
    }
    skip
}

#[test]
fn vm_exit_7() {
    if !skipped() {
        scenarios::exit_7(B);
    }
}

#[test]
fn vm_printf_end_then_exit_3() {
    if !skipped() {
        scenarios::output_before_status(B);
    }
}

#[test]
fn vm_killed_by_signal() {
    if !skipped() {
        scenarios::killed_by_signal(B);
    }
}

#[test]
fn vm_resize_reaches_the_guest() {
    if !skipped() {
        scenarios::resize_reaches_the_shell(B);
    }
}

#[test]
fn vm_ctrl_d_exits_zero() {
    if !skipped() {
        scenarios::ctrl_d_exits_zero(B);
    }
}
