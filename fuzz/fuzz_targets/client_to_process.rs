//! ctl.sock: what capsem-process decodes from a client (`Codec<Process>`).
#![no_main]

use capsem_proto::frame::{Client, Process};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsem_fuzz::drive::<Process, Client>(data, |_| {});
});
