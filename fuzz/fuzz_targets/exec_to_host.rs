//! The exec port: what the host decodes from the guest (`Codec<ExecHost>`).
#![no_main]

use capsem_proto::frame::{ExecGuest, ExecHost};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsem_fuzz::drive::<ExecHost, ExecGuest>(data, |msg| {
        let _ = msg.kind();
    });
});
