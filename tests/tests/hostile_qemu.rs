//! A hostile guest program against capsem-process, in a real VM: python3
//! in the guest opens 500 connections to each capsem vsock port (CID 2,
//! ports 5000, 5001, 5005, 5006) at once, holds them, writes each an
//! oversized length prefix, a truncated frame or random bytes (the three
//! in turn) and closes them; then 500 more one after another, each written
//! and closed. Afterwards capsem-process's threads, fds and RSS come back
//! to their baseline, and vhost-device-vsock's fds to theirs (within
//! [`SLACK_THREADS`], [`SLACK_FDS`], [`SLACK_RSS_KIB`]; waited for, not
//! slept); the flood reached the host (its log shows each port refusing
//! the oversized length, the truncated frame, and the connections beyond
//! its bound); and the session keeps working: `exec` answers and `shell
//! NAME` attaches. `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves it out.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use capsem_proto::guest::{PORT_AUDIT, PORT_CONTROL, PORT_EXEC, PORT_TERMINAL};
use capsem_tests::fixture::wait_until;
use capsem_tests::persist::{attach, exec, guest_pids, ok, process_pid, vm_dir, DETACH};
use capsem_tests::procs::Usage;
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;

/// Connections per port.
const PER_PORT: usize = 500;
/// Threads above the baseline still accepted: tokio's blocking pool may
/// keep a thread or two a while, and the heartbeat's timer is one.
const SLACK_THREADS: usize = 4;
/// fds above the baseline still accepted: an exec connection the agent's
/// pool reopened, the log file being rotated.
const SLACK_FDS: usize = 8;
/// RSS above the baseline still accepted: the allocator keeps some of what
/// a burst of 2,000 connection tasks used.
const SLACK_RSS_KIB: u64 = 16 * 1024;
/// How long the counts get to come back.
const SETTLE: Duration = Duration::from_secs(90);

/// The guest's program: `python3 flood.py N PORT...`; per port, N
/// connections at once (held, written, closed), then N one after another
/// (each written, then closed); prints one line per
/// port, `PORT opened=N sent=N`.
const FLOOD: &str = r#"
import os, socket, struct, sys
N = int(sys.argv[1])
def payload(i):
    if i % 3 == 0:
        return struct.pack('>I', 0xFFFFFFF0) + b'\x81\xa1t' * 8
    if i % 3 == 1:
        return struct.pack('>I', 4000) + b'\x82\xa1t\xa5hello'
    return os.urandom(512)
def connect(port):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((2, port))
        return s
    except OSError:
        s.close()
for port in map(int, sys.argv[2:]):
    # All at once, held open, then each one's bytes, then all closed.
    socks = [connect(port) for i in range(N)]
    opened = sum(s is not None for s in socks)
    for i, s in enumerate(s for s in socks if s):
        try:
            s.sendall(payload(i))
        except OSError:
            pass
    for s in socks:
        if s:
            s.close()
    # One after another: each one's bytes reach a free handshake slot.
    sent = 0
    for i in range(N):
        s = connect(port)
        if s is None:
            continue
        try:
            s.sendall(payload(i))
            sent += 1
        except OSError:
            pass
        s.close()
    print(f'{port} opened={opened} sent={sent}', flush=True)
"#;

fn usage(pid: i32) -> Usage {
    Usage::of(pid).unwrap()
}

fn within(now: Usage, base: Usage) -> bool {
    let slack = Usage {
        threads: SLACK_THREADS,
        fds: SLACK_FDS,
        rss_kib: SLACK_RSS_KIB,
    };
    now.within(base, slack)
}

#[test]
fn a_flood_of_hostile_connections_leaves_capsem_process_flat() {
    let fx = Fixture::new("hostile_flood", B);
    ok(&fx, &["create", "box"]);
    let out = exec(
        &fx,
        "box",
        &["--", "sh", "-c", "cat > /tmp/flood.py"],
        FLOOD.as_bytes(),
    );
    assert!(out.status.success(), "{out:?}");
    let pid = process_pid(&fx, "box");
    // The baseline once a command has run (the exec pool is warm).
    let out = exec(&fx, "box", &["--", "true"], b"");
    assert!(out.status.success(), "{out:?}");
    let base = usage(pid);
    // vhost-device-vsock holds the host end of every guest connection: its
    // fds must come back too.
    let vsock = guest_pids(&fx, "box")
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vhost-device-vsock"))
        })
        .unwrap();
    let vsock_base = usage(vsock);

    let ports = [PORT_CONTROL, PORT_TERMINAL, PORT_EXEC, PORT_AUDIT];
    let mut argv = vec![
        "--timeout".to_owned(),
        "300".into(),
        "--".into(),
        "python3".into(),
        "/tmp/flood.py".into(),
        PER_PORT.to_string(),
    ];
    argv.extend(ports.iter().map(u32::to_string));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = exec(&fx, "box", &argv, b"");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report.lines().count(), ports.len(), "{report}");
    for (line, port) in report.lines().zip(ports) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], port.to_string(), "{report}");
        let count = |key: &str| -> usize {
            fields
                .iter()
                .find_map(|f| f.strip_prefix(key))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(count("opened=") > 0, "no connection to port {port}: {line}");
        assert!(count("sent=") > 0, "nothing reached port {port}: {line}");
    }
    let flooded = usage(pid);
    eprint!("the guest's flood:\n{report}");

    let mut last = flooded;
    wait_until(SETTLE, "capsem-process's threads, fds and RSS", || {
        last = usage(pid);
        within(last, base)
    });
    eprintln!("capsem-process: baseline {base:?}, after the flood {flooded:?}, settled {last:?}");
    let mut vsock_last = vsock_base;
    wait_until(SETTLE, "vhost-device-vsock's fds", || {
        vsock_last = usage(vsock);
        vsock_last.fds <= vsock_base.fds + SLACK_FDS
    });
    eprintln!("vhost-device-vsock: baseline {vsock_base:?}, settled {vsock_last:?}");

    // The flood reached capsem-process: each port refused handshakes.
    let log = std::fs::read_to_string(vm_dir(&fx, "box").join("process.log")).unwrap();
    for port in ["control", "terminal", "exec", "audit"] {
        let refused = log.matches(&format!("{port} connection rejected")).count();
        eprintln!("process.log: {refused} {port} connections rejected");
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("{port} connection rejected: ")))
            .collect();
        // Each kind of bytes was read and refused for what it is.
        for (kind, needle) in [
            (
                "the oversized length",
                "frame length 4294967280 exceeds the maximum",
            ),
            ("the truncated frame", "closed inside the hello frame"),
            ("the flood beyond the bound", "already in progress"),
        ] {
            assert!(
                lines.iter().any(|l| l.contains(needle)),
                "no {port} connection refused for {kind} ({needle:?})"
            );
        }
        assert!(refused > 0, "no {port} connection was refused:\n{report}");
    }

    // The session keeps working.
    let out = exec(&fx, "box", &["--", "echo", "alive"], b"");
    assert_eq!(out.stdout, b"alive\n", "{out:?}");
    assert_eq!(out.status.code(), Some(0));
    let mut s = attach(&fx, "box");
    wait_ready(&mut s, B);
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    assert_eq!(process_pid(&fx, "box"), pid, "capsem-process was replaced");
    ok(&fx, &["rm", "--force", "box"]);
    fx.assert_nothing_left();
}
