//! Persistent VMs in real VMs under QEMU (see `capsem_tests::persist`).
//! `CAPSEM_SKIP_VM_TESTS=1` skips them (local runs without the image).
#![allow(clippy::unwrap_used)]

use capsem_tests::persist;
use capsem_tests::Backend;

const B: Backend = Backend::Qemu;

fn skip() -> bool {
    std::env::var_os("CAPSEM_SKIP_VM_TESTS").is_some_and(|v| v == "1")
}

#[test]
fn create_detach_reattach_exit_stop_start_rm() {
    if !skip() {
        persist::lifecycle(B);
    }
}

#[test]
fn host_process_crash_is_recovered_by_adoption() {
    if !skip() {
        persist::host_process_crash(B);
    }
}

#[test]
fn guest_killed_and_everything_killed_are_swept() {
    if !skip() {
        persist::guest_and_everything_killed(B);
    }
}

#[test]
fn orphaned_temporary_vm_is_swept() {
    if !skip() {
        persist::orphaned_temporary_vm_is_swept(B);
    }
}

#[test]
fn exec_on_a_persistent_vm() {
    if !skip() {
        persist::exec_on_a_persistent_vm(B);
    }
}
