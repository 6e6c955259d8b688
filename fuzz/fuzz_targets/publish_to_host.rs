//! The publish port: what the host reads from the guest side of a
//! published port's connection before the relay: vhost-device-vsock's
//! `OK <port>` line (`parse_ok_line`, on every prefix of the input up to
//! its bound) and the agent's answer (`Codec<PublishHost>`), then the
//! bounds check capsem-process runs on it.
#![no_main]

use capsem_proto::frame::{PublishGuest, PublishHost};
use capsem_proto::publish::{parse_ok_line, MAX_OK_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = &data[..data.len().min(MAX_OK_LINE)];
    if parse_ok_line(line).is_some() {
        assert!(line.starts_with(b"OK ") && line.len() > 3, "{line:?}");
    }
    capsem_fuzz::drive::<PublishHost, PublishGuest>(data, |msg| {
        let _ = msg.within_bounds();
    });
});
