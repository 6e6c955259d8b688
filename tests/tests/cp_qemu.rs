//! `capsem cp` in real VMs under QEMU (see `capsem_tests::cp`).
#![allow(clippy::unwrap_used)]

use capsem_tests::cp;
use capsem_tests::Backend;

const B: Backend = Backend::Qemu;

#[test]
fn a_tree_goes_in_and_out_byte_identical() {
    cp::round_trip(B);
}

/// Only in a VM: the scenario replaces the guest's `tar`, which with
/// `--vmm none` would be this host's.
#[test]
fn a_hostile_guest_stream_never_writes_outside_dst() {
    cp::hostile_guest_stream(B);
}
