//! The audit log's lines: capsem-process reads the last JSON line of
//! `audit.jsonl` back (`serde_json::from_slice::<AuditRecord>`) to resume
//! after the newest stored serial; the file holds what the guest sent.
#![no_main]

use capsem_proto::audit::AuditRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<AuditRecord>(data) {
        let line = serde_json::to_vec(&r).expect("a record is JSON");
        let back: AuditRecord = serde_json::from_slice(&line).expect("its JSON reads back");
        assert_eq!(back, r);
    }
});
