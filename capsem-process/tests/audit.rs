//! The audit port against the real `capsem-process` (`--vmm none`, stub
//! agent; see `common`): the test plays the agent on `vsock.sock_5000`/
//! `_5001` and its audit connections on `vsock.sock_5006`.

// clippy.toml allows unwrap in #[test] fns only; the helpers here are test code too.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use capsem_proto::audit::{AuditRecord, AuditToHost, HostToAudit, MAX_AUDIT_FIELD};
use capsem_proto::frame::AuditGuest;
use capsem_proto::ipc::ClientToProcess;
use capsem_proto::Codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use common::*;

fn record(serial: u64) -> AuditRecord {
    AuditRecord {
        serial,
        time_ms: 1_700_000_000_000 + serial,
        pid: 1000 + serial as u32,
        ppid: 1,
        uid: 0,
        exe: "/usr/bin/printf".into(),
        argv: vec![
            "printf".into(),
            format!("record {serial}\n"),
            "\x1b[31m'quoted'".into(),
        ],
        argv_truncated: false,
        cwd: "/root".into(),
        tty: "(none)".into(),
        success: true,
        audit_id: format!("1700000000.000:{serial}"),
    }
}

/// The test playing the agent's audit connection.
struct Audit {
    stream: UnixStream,
    codec: Codec<AuditGuest>,
}

impl Audit {
    /// Connects and sends the hello.
    async fn connect(vm: &Vm, token: &str, generation: u64) -> Audit {
        let mut audit = Audit::raw(vm).await;
        audit
            .send(&AuditToHost::Hello {
                token: token.into(),
                generation,
            })
            .await;
        audit
    }

    async fn raw(vm: &Vm) -> Audit {
        Audit {
            stream: UnixStream::connect(vm.sock("vsock.sock_5006"))
                .await
                .unwrap(),
            codec: Codec::new(),
        }
    }

    async fn send(&mut self, msg: &AuditToHost) {
        let frame = Codec::<AuditGuest>::encode(msg).unwrap();
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn record(&mut self, serial: u64) {
        self.send(&AuditToHost::Record(record(serial))).await;
    }

    /// The next ack's serial; `None` at EOF.
    async fn ack(&mut self) -> Option<u64> {
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(HostToAudit::Ack { serial }) = self.codec.next_message().unwrap() {
                return Some(serial);
            }
            let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut buf))
                .await
                .expect("no ack from capsem-process")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.codec.feed(&buf[..n]).unwrap();
        }
    }

    /// Sends `serial` and expects its ack.
    async fn stored(&mut self, serial: u64) {
        self.record(serial).await;
        assert_eq!(self.ack().await, Some(serial));
    }

    /// Expects the host to close the connection without another ack.
    async fn refused(&mut self) {
        assert_eq!(self.ack().await, None, "connection not closed");
    }
}

/// The records of `<dir>/audit.jsonl.1` then `<dir>/audit.jsonl`, each
/// line parsed.
fn stored(dir: &Path) -> Vec<AuditRecord> {
    let mut all = Vec::new();
    for name in ["audit.jsonl.1", "audit.jsonl"] {
        for line in fs::read_to_string(dir.join(name))
            .unwrap_or_default()
            .lines()
        {
            all.push(serde_json::from_str(line).unwrap());
        }
    }
    all
}

fn serials(dir: &Path) -> Vec<u64> {
    stored(dir).iter().map(|r| r.serial).collect()
}

/// A VM with its first generation bridged: the VM, the token, the guest.
async fn bridged(extra: &[&str], env: &[(&str, &str)]) -> (Vm, String, FakeGuest) {
    let mut vm = Vm::start_env("none", extra, env);
    let token = vm.token();
    let guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    (vm, token, guest)
}

async fn shutdown(vm: &mut Vm) {
    Cli::connect(vm)
        .await
        .send(&ClientToProcess::Shutdown)
        .await;
    assert_eq!(vm.wait_exit(), Some(0));
}

#[tokio::test]
async fn records_are_stored_in_order_and_acked_and_resends_are_dropped() {
    let (mut vm, token, _guest) = bridged(&[], &[]).await;
    assert_eq!(mode(&vm.sock("vsock.sock_5006")), 0o600);
    let mut audit = Audit::connect(&vm, &token, 1).await;
    for serial in [3, 4, 7] {
        audit.stored(serial).await;
    }
    // Stored before it was acked: no wait needed.
    let text = fs::read_to_string(vm.dir.join("audit.jsonl")).unwrap();
    let want: String = [3, 4, 7]
        .iter()
        .map(|s| serde_json::to_string(&record(*s)).unwrap() + "\n")
        .collect();
    assert_eq!(text, want, "one JSON line per record, nothing else");
    assert_eq!(mode(&vm.dir.join("audit.jsonl")), 0o600);

    // Re-sends (a lost ack) are acked again and not stored twice.
    audit.stored(4).await;
    audit.stored(7).await;
    audit.stored(8).await;
    assert_eq!(serials(&vm.dir), [3, 4, 7, 8]);
    assert_eq!(stored(&vm.dir)[3], record(8));

    shutdown(&mut vm).await;
    audit.refused().await;
    assert!(!vm.sock("vsock.sock_5006").exists(), "audit socket left");
    assert_eq!(serials(&vm.dir), [3, 4, 7, 8], "a persistent VM keeps them");
    assert!(!vm.dir.join("audit.jsonl.tmp").exists());
}

#[tokio::test]
async fn bad_audit_connections_are_refused_and_the_vm_goes_on() {
    let (vm, token, _guest) = bridged(&[], &[]).await;

    let mut wrong = Audit::connect(&vm, &"0".repeat(32), 1).await;
    wrong.refused().await;
    vm.wait_log("audit connection rejected: wrong session token")
        .await;

    let mut first_record = Audit::raw(&vm).await;
    first_record.record(1).await;
    first_record.refused().await;
    vm.wait_log("audit connection rejected: the first message is a record, not a hello")
        .await;

    let mut unknown = Audit::connect(&vm, &token, 5).await;
    unknown.refused().await;
    vm.wait_log("audit connection rejected: generation 5 was never given (the current one is 1)")
        .await;

    // Over the codec's frame limit: closed before it is buffered.
    let mut big = Audit::connect(&vm, &token, 1).await;
    big.stored(1).await;
    let len = (capsem_proto::audit::MAX_AUDIT_FRAME as u32 + 1).to_be_bytes();
    big.stream.write_all(&len).await.unwrap();
    big.refused().await;
    vm.wait_log(
        "audit connection of generation 1 closed: invalid frame: frame length 65537 exceeds",
    )
    .await;

    // Over the record bounds, inside the frame limit.
    let mut many = Audit::connect(&vm, &token, 1).await;
    let mut r = record(2);
    r.argv = vec!["x".into(); 257];
    many.send(&AuditToHost::Record(r)).await;
    many.refused().await;
    vm.wait_log("closed: invalid record (serial 2): 257 argv elements, more than 256")
        .await;

    let mut long = Audit::connect(&vm, &token, 1).await;
    let mut r = record(3);
    r.cwd = "/".repeat(MAX_AUDIT_FIELD + 1);
    long.send(&AuditToHost::Record(r)).await;
    long.refused().await;
    vm.wait_log("closed: invalid record (serial 3): cwd has 1025 bytes")
        .await;

    let mut garbage = Audit::connect(&vm, &token, 1).await;
    garbage
        .stream
        .write_all(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1])
        .await
        .unwrap();
    garbage.refused().await;
    vm.wait_log("closed: invalid frame: invalid message payload")
        .await;

    let mut twice = Audit::connect(&vm, &token, 1).await;
    twice
        .send(&AuditToHost::Hello {
            token: token.clone(),
            generation: 1,
        })
        .await;
    twice.refused().await;
    vm.wait_log("closed: a second hello on the connection")
        .await;

    // Generation 2 exists now; an audit connection of generation 1 is stale.
    let _second = FakeGuest::connect(&vm, &token, 2).await;
    let mut current = Audit::connect(&vm, &token, 2).await;
    current.stored(4).await;
    let mut stale = Audit::connect(&vm, &token, 1).await;
    stale.refused().await;
    vm.wait_log("audit connection rejected: generation 1 is older than generation 2")
        .await;

    // Still running, still storing; nothing invalid was stored.
    current.stored(5).await;
    assert_eq!(status(&vm).await.generation, 2);
    assert_eq!(serials(&vm.dir), [1, 4, 5]);
    let log = vm.log();
    assert_eq!(log.matches("audit connection rejected").count(), 4, "{log}");
}

#[tokio::test]
async fn a_newer_generation_replaces_the_audit_connection() {
    let (vm, token, _guest) = bridged(&[], &[]).await;
    let mut old = Audit::connect(&vm, &token, 1).await;
    old.stored(1).await;
    old.record(2).await;
    assert_eq!(old.ack().await, Some(2));

    let _second = FakeGuest::connect(&vm, &token, 2).await;
    let mut new = Audit::connect(&vm, &token, 2).await;
    // The agent sends what was not acked again; here, a lost ack.
    new.stored(2).await;
    old.refused().await;
    vm.wait_log("audit connection of generation 1 replaced by one of generation 2")
        .await;
    new.stored(3).await;
    assert_eq!(serials(&vm.dir), [1, 2, 3]);

    // The same generation again (the agent reopened it): the newest wins.
    let mut again = Audit::connect(&vm, &token, 2).await;
    again.stored(4).await;
    new.refused().await;
    assert_eq!(serials(&vm.dir), [1, 2, 3, 4]);
}

#[tokio::test]
async fn rotation_at_the_size_limit_keeps_the_newest_records() {
    let (mut vm, token, _guest) = bridged(&[], &[("CAPSEM_AUDIT_MAX_BYTES", "4096")]).await;
    let mut audit = Audit::connect(&vm, &token, 1).await;
    for serial in 1..=100 {
        audit.stored(serial).await;
    }
    let rotated = vm.dir.join("audit.jsonl.1");
    let current = vm.dir.join("audit.jsonl");
    for file in [&rotated, &current] {
        let len = fs::metadata(file).unwrap().len();
        assert!(len <= 4096, "{} has {len} bytes", file.display());
    }
    let got = serials(&vm.dir);
    assert!(got.len() > 10, "{got:?}");
    let want: Vec<u64> = (101 - got.len() as u64..=100).collect();
    assert_eq!(got, want, "the newest records, in order, none twice");
    vm.wait_log("audit: rotated").await;

    // The last serial is kept across the rotation: re-sends still dropped.
    audit.stored(100).await;
    audit.stored(60).await;
    assert_eq!(serials(&vm.dir), want);
    shutdown(&mut vm).await;
    assert!(!vm.dir.join("audit.jsonl.tmp").exists());
}

#[tokio::test]
async fn audit_log_keeps_a_temporary_vms_records_after_its_destruction() {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("audit.jsonl");
    fs::write(&file, "earlier\n").unwrap();
    let arg = file.to_str().unwrap();
    let (mut vm, token, _guest) = bridged(&["--temporary", "--audit-log", arg], &[]).await;
    let mut audit = Audit::connect(&vm, &token, 1).await;
    for serial in 1..=3 {
        audit.stored(serial).await;
    }
    let cli = Cli::attach(&vm).await;
    drop(cli);
    assert_eq!(vm.wait_exit(), Some(0));
    assert!(!vm.dir.exists(), "temporary VM dir left behind");
    let text = fs::read_to_string(&file).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("earlier"), "appended, not replaced");
    let got: Vec<AuditRecord> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got, [record(1), record(2), record(3)]);
}

#[tokio::test]
async fn a_flood_is_backpressured_and_memory_stays_flat() {
    let (vm, token, _guest) = bridged(&[], &[("CAPSEM_AUDIT_MAX_BYTES", "1048576")]).await;
    let pid = vm.child.as_ref().unwrap().id();
    let audit = Audit::connect(&vm, &token, 1).await;
    let total = 40_000u64;
    let Audit { stream, mut codec } = audit;
    let (mut rd, mut wr) = stream.into_split();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for serial in 1..=total {
            Codec::<AuditGuest>::encode_into(&AuditToHost::Record(record(serial)), &mut batch)
                .unwrap();
            if batch.len() > 64 * 1024 {
                wr.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        wr.write_all(&batch).await.unwrap();
        let _ = done_tx.send(());
        wr
    });
    // Acks not read: the host stops reading, the guest's writes block.
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), &mut done_rx)
            .await
            .is_err(),
        "{total} records were taken by a host whose acks are not read"
    );
    let mut peak = rss_kib(pid);
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = 0;
    while last < total {
        while let Some(HostToAudit::Ack { serial }) = codec.next_message().unwrap() {
            assert_eq!(serial, last + 1, "acks in order");
            last = serial;
        }
        if last == total {
            break;
        }
        let n = tokio::time::timeout(DEADLINE, rd.read(&mut buf))
            .await
            .expect("acks stopped")
            .unwrap();
        assert!(n > 0, "closed after ack {last}");
        codec.feed(&buf[..n]).unwrap();
        peak = peak.max(rss_kib(pid));
    }
    drop(writer.await.unwrap());
    peak = peak.max(rss_kib(pid));
    assert!(peak < 24 * 1024, "capsem-process RSS peaked at {peak} KiB");
    let got = serials(&vm.dir);
    assert_eq!(got.last(), Some(&total));
    for file in ["audit.jsonl", "audit.jsonl.1"] {
        assert!(fs::metadata(vm.dir.join(file)).unwrap().len() <= 1024 * 1024);
    }
}
