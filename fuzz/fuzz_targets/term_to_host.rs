//! The terminal port: what the host decodes from the guest
//! (`Codec<TermHost>`), then the hello check it runs on each message.
#![no_main]

use capsem_proto::frame::{TermGuest, TermHost};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsem_fuzz::drive::<TermHost, TermGuest>(data, |msg| {
        let _ = msg.kind();
        let _ = msg.check_hello("ab");
    });
});
