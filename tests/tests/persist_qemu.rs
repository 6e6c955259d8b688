//! Persistent VMs in real VMs under QEMU (see `capsem_tests::persist`).
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out (a nextest filter
//! on the `*_qemu` binaries), and nextest counts them as skipped.
#![allow(clippy::unwrap_used)]

use capsem_tests::persist;
use capsem_tests::Backend;

const B: Backend = Backend::Qemu;

#[test]
fn create_detach_reattach_exit_stop_start_rm() {
    persist::lifecycle(B);
}

#[test]
fn host_process_crash_is_recovered_by_adoption() {
    persist::host_process_crash(B);
}

#[test]
fn guest_killed_and_everything_killed_are_swept() {
    persist::guest_and_everything_killed(B);
}

#[test]
fn orphaned_temporary_vm_is_swept() {
    persist::orphaned_temporary_vm_is_swept(B);
}

#[test]
fn exec_on_a_persistent_vm() {
    persist::exec_on_a_persistent_vm(B);
}
