//! `capsem cp` on the no-VM backend: the same copies and errors as in a
//! VM (see `capsem_tests::cp`), fast; the hostile-guest scenario runs in
//! `cp_qemu` only.
#![allow(clippy::unwrap_used)]

use capsem_tests::cp;
use capsem_tests::Backend;

#[test]
fn a_tree_goes_in_and_out_byte_identical() {
    cp::round_trip(Backend::None);
}
