//! The audit port: what the host decodes from the guest
//! (`Codec<AuditHost>`); each record then takes the path capsem-process's
//! audit log gives it: one JSON line, read back when a VM is adopted.
#![no_main]

use capsem_proto::audit::{AuditRecord, AuditToHost};
use capsem_proto::frame::{AuditGuest, AuditHost};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsem_fuzz::drive::<AuditHost, AuditGuest>(data, |msg| {
        if let AuditToHost::Record(r) = msg {
            let line = serde_json::to_vec(r).expect("a record is JSON");
            assert!(!line.contains(&b'\n'), "a record is one line");
            let back: AuditRecord = serde_json::from_slice(&line).expect("its JSON reads back");
            assert_eq!(&back, r);
        }
    });
});
