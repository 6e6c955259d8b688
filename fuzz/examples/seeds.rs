//! Writes the checked-in seed corpus, `corpus/<target>/seed-*`: the golden
//! messages of capsem-proto's tests (docs/protocol.md), encoded by the
//! sending role, as whole streams and byte at a time, plus a frame whose
//! length is over the bound. `cargo run --example seeds` from `fuzz/`.

use std::path::Path;

use capsem_proto::audit::{AuditRecord, AuditToHost};
use capsem_proto::exec::{ExecStream, ExecToHost};
use capsem_proto::frame::{
    AuditGuest, Client, ExecGuest, Guest, NetGuest, PublishGuest, Role, TermGuest,
};
use capsem_proto::guest::{BootStage, GuestToHost};
use capsem_proto::ipc::ClientToProcess;
use capsem_proto::net::NetToHost;
use capsem_proto::publish::PublishToHost;
use capsem_proto::terminal::TermToHost;
use capsem_proto::Codec;

/// One chunk of everything (`0xff`), and byte at a time (`0x00`).
const WHOLE: [u8; 2] = [0, 0xff];
const BYTEWISE: [u8; 2] = [0, 0];

fn stream<R: Role>(msgs: &[R::Outbound]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        Codec::<R>::encode_into(m, &mut out).expect("encode a golden message");
    }
    out
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
}

/// The stream whole, byte at a time, and followed by a frame over `max`.
fn seeds(target: &str, body: &[u8], max: usize) {
    write(target, "whole", &[&WHOLE[..], body].concat());
    write(target, "bytewise", &[&BYTEWISE[..], body].concat());
    let over = u32::try_from(max + 1)
        .expect("bound fits a prefix")
        .to_be_bytes();
    write(
        target,
        "over-bound",
        &[&WHOLE[..], body, &over[..], b"xx"].concat(),
    );
}

fn record() -> AuditRecord {
    AuditRecord {
        serial: 7,
        time_ms: 1_700_000_000_123,
        pid: 42,
        ppid: 1,
        uid: 0,
        exe: "/bin/ls".into(),
        argv: vec!["ls".into(), "-l".into()],
        argv_truncated: false,
        cwd: "/root".into(),
        tty: "(none)".into(),
        success: true,
        audit_id: "1700000000.123:7".into(),
    }
}

fn main() {
    let guest = stream::<Guest>(&[
        GuestToHost::Hello {
            version: 1,
            token: "0123abcd".into(),
            connects: 1,
            shell_pid: 42,
        },
        GuestToHost::Pong { seq: 7 },
        GuestToHost::BootTimings {
            stages: vec![BootStage {
                name: "init".into(),
                micros: 1000,
            }],
        },
    ]);
    seeds("guest_to_host", &guest, Guest::MAX_OUTBOUND);

    let term = stream::<TermGuest>(&[
        TermToHost::Hello {
            token: "ab".into(),
            generation: 2,
        },
        TermToHost::Output {
            data: vec![0x24, 0x20],
        },
        TermToHost::Exit {
            exit_code: Some(3),
            signal: None,
        },
    ]);
    seeds("term_to_host", &term, TermGuest::MAX_OUTBOUND);

    let exec = stream::<ExecGuest>(&[
        ExecToHost::Hello { token: "ab".into() },
        ExecToHost::Output {
            stream: ExecStream::Stderr,
            data: vec![0, 255],
        },
        ExecToHost::Exit {
            exit_code: None,
            signal: Some(9),
            timed_out: true,
            stdout_bytes: 3,
            stderr_bytes: 0,
        },
    ]);
    seeds("exec_to_host", &exec, ExecGuest::MAX_OUTBOUND);

    let audit = stream::<AuditGuest>(&[
        AuditToHost::Hello {
            token: "ab".into(),
            generation: 1,
        },
        AuditToHost::Record(record()),
    ]);
    seeds("audit_to_host", &audit, AuditGuest::MAX_OUTBOUND);
    write(
        "audit_json",
        "record",
        &serde_json::to_vec(&record()).expect("JSON"),
    );

    let client = stream::<Client>(&[
        ClientToProcess::Attach { cols: 80, rows: 24 },
        ClientToProcess::Input {
            data: b"ls\r".to_vec(),
        },
        ClientToProcess::Resize {
            cols: 100,
            rows: 40,
        },
        ClientToProcess::Status,
        ClientToProcess::Shutdown,
    ]);
    seeds("client_to_process", &client, Client::MAX_OUTBOUND);

    let net = stream::<NetGuest>(&[
        NetToHost::Resolve {
            token: "ab".into(),
            name: "pypi.org".into(),
        },
        NetToHost::Connect {
            token: "ab".into(),
            name: Some("pypi.org".into()),
            seen: Some("pypi.org".into()),
            ip: "198.18.0.1".into(),
            port: 443,
        },
        NetToHost::Connect {
            token: "ab".into(),
            name: None,
            seen: None,
            ip: "::ffff:127.0.0.1".into(),
            port: 8080,
        },
        NetToHost::Dropped {
            token: "ab".into(),
            proto: "udp".into(),
            ip: "192.0.2.1".into(),
            port: Some(9),
            count: 3,
        },
    ]);
    seeds("net_to_host", &net, NetGuest::MAX_OUTBOUND);

    let publish = stream::<PublishGuest>(&[
        PublishToHost::Opened {
            connected: true,
            reason: String::new(),
        },
        PublishToHost::Opened {
            connected: false,
            reason: "cannot connect to 127.0.0.1:8000: Connection refused".into(),
        },
    ]);
    seeds("publish_to_host", &publish, PublishGuest::MAX_OUTBOUND);
    write("publish_to_host", "ok-line", b"OK 1025");

    // The frame target: a 2-byte bound, then frames.
    let bound = 64u16.to_be_bytes();
    write("frame", "guest", &[&bound[..], &guest].concat());
    write(
        "frame",
        "over-bound",
        &[&bound[..], &[0, 0, 0, 65][..]].concat(),
    );
    write("frame", "empty", &[&bound[..], &[0, 0, 0, 0][..]].concat());
}
