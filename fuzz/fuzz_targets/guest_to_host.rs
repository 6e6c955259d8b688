//! The control port: what the host decodes from the guest (`Codec<Host>`),
//! then the hello check it runs on each message.
#![no_main]

use capsem_proto::frame::{Guest, Host};
use capsem_proto::guest::GuestToHost;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsem_fuzz::drive::<Host, Guest>(data, |msg| {
        let _ = msg.kind();
        if let GuestToHost::Hello { .. } = msg {
            let _ = msg.check_hello("0123abcd");
        }
    });
});
