//! The audit port end to end: a fake host (Unix listeners at
//! `<dir>/vsock.sock_5000`, `_5001` and `_5006`) and the real agent binary.
//!
//! The kernel source is never used here: these tests run on the host, whose
//! audit configuration must not change. `CAPSEM_AUDIT=file:FIFO` makes the
//! agent read auditd log lines from a FIFO the test writes, which exercises
//! the same assembler, buffer and audit connection.
//!
//! Every agent runs inside an [`Agent`] guard whose Drop terminates it, kills
//! the shell's group if anything is left, and reaps, even when a test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsem_proto::audit::{AuditRecord, AuditToHost, HostToAudit};
use capsem_proto::frame::{AuditHost, Host, TermHost};
use capsem_proto::guest::{GuestToHost, HostToGuest, PROTOCOL_VERSION};
use capsem_proto::terminal::{HostToTerm, TermToHost};
use capsem_proto::Codec;

const TOKEN: &str = "audit-token-42";
const LONG: Duration = Duration::from_secs(20);

mod common;
use common::*;

/// The fake host: control, terminal and audit listeners.
struct FakeHost {
    dir: tempfile::TempDir,
    ctl: UnixListener,
    term: UnixListener,
    audit: Option<UnixListener>,
}

/// One accepted generation's control and terminal connections.
struct Conn {
    ctl: UnixStream,
    term: UnixStream,
    term_codec: Codec<TermHost>,
    /// The payloads of the terminal's `Output` frames.
    term_out: Vec<u8>,
}

/// One accepted audit connection.
struct Audit {
    sock: UnixStream,
    codec: Codec<AuditHost>,
}

impl FakeHost {
    fn new(with_audit: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ctl = UnixListener::bind(dir.path().join("vsock.sock_5000")).unwrap();
        let term = UnixListener::bind(dir.path().join("vsock.sock_5001")).unwrap();
        let audit =
            with_audit.then(|| UnixListener::bind(dir.path().join("vsock.sock_5006")).unwrap());
        std::fs::create_dir(dir.path().join("scratch")).unwrap();
        Self {
            dir,
            ctl,
            term,
            audit,
        }
    }

    /// A FIFO in the host's directory, and a writer that never blocks on
    /// open (it also holds a read end).
    fn fifo(&self) -> (PathBuf, File) {
        let path = self.dir.path().join("audit.fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let w = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, w)
    }

    fn spawn(&self, env: &[(&str, &str)]) -> Agent {
        let log = self.dir.path().join(format!(
            "agent-{}.log",
            count_dir(self.dir.path().display().to_string())
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsem-agent"));
        cmd.arg("--transport")
            .arg(format!(
                "unix:{}",
                self.dir.path().join("vsock.sock").display()
            ))
            .env("CAPSEM_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .env_remove("CAPSEM_BOOT_STAGES")
            .env_remove("CAPSEM_MODE")
            // Never the kernel source from a test: it is the host's.
            .env_remove("CAPSEM_AUDIT")
            .envs(env.iter().copied())
            .current_dir(self.dir.path().join("scratch"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        Agent {
            child: Some(cmd.spawn().unwrap()),
            log,
            shell_pid: None,
        }
    }

    fn accept(listener: &UnixListener, within: Duration) -> Option<UnixStream> {
        if !poll_readable(listener.as_fd(), deadline(within)) {
            return None;
        }
        Some(listener.accept().unwrap().0)
    }

    /// Accepts control, checks the hello, acks `generation`, accepts terminal.
    fn generation(&self, agent: &mut Agent, generation: u64) -> Conn {
        let mut ctl = Self::accept(&self.ctl, LONG).expect("agent connects to control");
        let mut codec = Codec::<Host>::new();
        let mut buf = [0u8; 4096];
        let hello = loop {
            if let Some(m) = codec.next_message().unwrap() {
                break m;
            }
            assert!(poll_readable(ctl.as_fd(), deadline(LONG)), "no hello");
            let n = ctl.read(&mut buf).unwrap();
            assert!(n > 0, "control closed before the hello");
            codec.feed(&buf[..n]).unwrap();
        };
        hello.check_hello(TOKEN).expect("valid hello");
        if let GuestToHost::Hello { shell_pid, .. } = hello {
            agent.shell_pid = Some(shell_pid);
        }
        let ack = HostToGuest::HelloAck {
            version: PROTOCOL_VERSION,
            generation,
        };
        ctl.write_all(&Codec::<Host>::encode(&ack).unwrap())
            .unwrap();
        let term = Self::accept(&self.term, LONG).expect("agent connects to terminal");
        Conn {
            ctl,
            term,
            term_codec: Codec::new(),
            term_out: Vec::new(),
        }
    }

    /// Accepts the audit connection and checks its hello.
    fn audit(&self, generation: u64) -> Audit {
        let listener = self.audit.as_ref().expect("an audit listener");
        let sock = Self::accept(listener, LONG).expect("agent connects to the audit port");
        let mut a = Audit {
            sock,
            codec: Codec::new(),
        };
        assert_eq!(
            a.recv(LONG),
            Some(AuditToHost::Hello {
                token: TOKEN.into(),
                generation
            })
        );
        a
    }

    /// True when nothing ever connected to the audit listener (a connection
    /// stays in the backlog even after its peer closed).
    fn audit_untouched(&self) -> bool {
        let listener = self.audit.as_ref().expect("an audit listener");
        !poll_readable(listener.as_fd(), Instant::now())
    }
}

impl Conn {
    fn send(&mut self, msg: HostToGuest) {
        self.ctl
            .write_all(&Codec::<Host>::encode(&msg).unwrap())
            .unwrap();
    }

    fn type_(&mut self, s: &str) {
        let input = HostToTerm::Input {
            data: s.as_bytes().to_vec(),
        };
        self.term
            .write_all(&Codec::<TermHost>::encode(&input).unwrap())
            .unwrap();
    }

    fn expect(&mut self, needle: &str) {
        let until = deadline(LONG);
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&self.term_out).contains(needle) {
            assert!(
                poll_readable(self.term.as_fd(), until),
                "timed out waiting for {needle:?}"
            );
            let n = self.term.read(&mut buf).unwrap();
            assert!(n > 0, "terminal EOF before {needle:?}");
            self.term_codec.feed(&buf[..n]).unwrap();
            while let Some(frame) = self.term_codec.next_message().unwrap() {
                match frame {
                    TermToHost::Output { data } => self.term_out.extend_from_slice(&data),
                    TermToHost::Hello { token, .. } => assert_eq!(token, TOKEN),
                    TermToHost::Exit { .. } => panic!("the shell exited before {needle:?}"),
                }
            }
        }
    }
}

impl Audit {
    fn recv(&mut self, within: Duration) -> Option<AuditToHost> {
        let until = deadline(within);
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.codec.next_message().unwrap() {
                return Some(m);
            }
            if !poll_readable(self.sock.as_fd(), until) {
                return None;
            }
            let n = self.sock.read(&mut buf).unwrap();
            if n == 0 {
                return None;
            }
            self.codec.feed(&buf[..n]).unwrap();
        }
    }

    fn record(&mut self) -> AuditRecord {
        match self.recv(LONG) {
            Some(AuditToHost::Record(r)) => r,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn ack(&mut self, serial: u64) {
        let frame = Codec::<AuditHost>::encode(&HostToAudit::Ack { serial }).unwrap();
        self.sock.write_all(&frame).unwrap();
    }
}

/// A string field as the kernel writes it: quoted, or hex when it holds a
/// quote, a space, a control or a non-ASCII byte.
fn kernel_string(s: &str) -> String {
    if s.bytes().any(|b| b == b'"' || !(0x21..=0x7e).contains(&b)) {
        s.bytes().map(|b| format!("{b:02X}")).collect()
    } else {
        format!("\"{s}\"")
    }
}

/// The auditd log lines of one successful execve.
fn exec_event(serial: u64, exe: &str, argv: &[&str], cwd: &str) -> String {
    let id = format!("1700000000.{:03}:{serial}", serial % 1000);
    let args: String = argv
        .iter()
        .enumerate()
        .map(|(i, a)| format!(" a{i}={}", kernel_string(a)))
        .collect();
    format!(
        "type=SYSCALL msg=audit({id}): arch=c000003e syscall=59 success=yes exit=0 \
         a0=5581 a1=5582 a2=5583 a3=8 items=2 ppid=77 pid={pid} auid=4294967295 uid=1000 \
         gid=1000 euid=1000 suid=1000 fsuid=1000 egid=1000 sgid=1000 fsgid=1000 tty=pts1 \
         ses=4294967295 comm=\"x\" exe={exe} key=(null)\n\
         type=EXECVE msg=audit({id}): argc={argc}{args}\n\
         type=CWD msg=audit({id}): cwd={cwd}\n\
         type=PATH msg=audit({id}): item=0 name=\"/bin/x\" inode=12 nametype=NORMAL\n\
         type=PROCTITLE msg=audit({id}): proctitle=78\n\
         type=EOE msg=audit({id}): \n",
        pid = 1000 + serial,
        exe = kernel_string(exe),
        argc = argv.len(),
        cwd = kernel_string(cwd),
    )
}

fn write_events(fifo: &mut File, serials: impl IntoIterator<Item = u64>) {
    for s in serials {
        let arg = format!("n{s}");
        fifo.write_all(exec_event(s, "/usr/bin/echo", &["echo", &arg], "/root").as_bytes())
            .unwrap();
    }
}

#[test]
fn audit_is_off_on_the_host_and_nothing_connects_to_the_audit_port() {
    let host = FakeHost::new(true);
    let mut agent = host.spawn(&[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("echo $((6*7))\n");
    conn.expect("42");
    // Main thread and the bridge's six; no audit reader.
    let names = thread_names(agent.pid());
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(!names.iter().any(|n| n == "capsem-audit-rx"), "{names:?}");
    conn.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    assert!(
        host.audit_untouched(),
        "the agent connected to the audit port"
    );
    let log = agent.log();
    assert_eq!(
        log.matches("audit off: not inside a VM").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("audit enabled"), "{log}");
}

#[test]
fn an_invalid_capsem_audit_is_a_configuration_error() {
    let host = FakeHost::new(false);
    let mut agent = host.spawn(&[("CAPSEM_AUDIT", "netlink")]);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(2));
    assert!(agent.log().contains("CAPSEM_AUDIT"), "{}", agent.log());
}

#[test]
fn records_flow_and_only_unacked_ones_are_resent_on_the_next_generation() {
    let host = FakeHost::new(true);
    let (fifo_path, mut fifo) = host.fifo();
    let mut agent = host.spawn(&[("CAPSEM_AUDIT", &format!("file:{}", fifo_path.display()))]);
    let pid = agent.pid();

    let conn = host.generation(&mut agent, 1);
    let mut audit = host.audit(1);
    // A record with an argument the kernel hex-encodes, then two plain ones.
    fifo.write_all(
        exec_event(
            10,
            "/usr/bin/printf",
            &["printf", "a b \"c\"", "café"],
            "/home/u/my dir",
        )
        .as_bytes(),
    )
    .unwrap();
    write_events(&mut fifo, [11, 12]);
    let r = audit.record();
    assert_eq!(
        r,
        AuditRecord {
            serial: 10,
            time_ms: 1_700_000_000_010,
            pid: 1010,
            ppid: 77,
            uid: 1000,
            exe: "/usr/bin/printf".into(),
            argv: vec!["printf".into(), "a b \"c\"".into(), "café".into()],
            argv_truncated: false,
            cwd: "/home/u/my dir".into(),
            tty: "pts1".into(),
            success: true,
            audit_id: "1700000000.010:10".into(),
        }
    );
    assert_eq!(audit.record().serial, 11);
    assert_eq!(audit.record().serial, 12);
    // The host stores 10 and 11, then the transport drops.
    audit.ack(11);
    drop(audit);
    drop(conn);
    // Produced while no generation runs.
    write_events(&mut fifo, [13]);

    let mut conn = host.generation(&mut agent, 2);
    let mut audit = host.audit(2);
    let again: Vec<u64> = (0..2).map(|_| audit.record().serial).collect();
    assert_eq!(again, [12, 13], "only the unacknowledged, in order");
    write_events(&mut fifo, [14]);
    let r = audit.record();
    assert_eq!(
        (r.serial, r.argv.clone()),
        (14, vec!["echo".into(), "n14".into()])
    );
    audit.ack(14);
    // Nothing else is pending.
    assert_eq!(audit.recv(Duration::from_millis(200)), None);

    // Main thread, the bridge's six, and the audit reader.
    let names = thread_names(pid);
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(names.iter().any(|n| n == "capsem-audit-rx"), "{names:?}");
    assert!(names.iter().any(|n| n == "capsem-audit"), "{names:?}");

    conn.send(HostToGuest::Shutdown);
    assert_eq!(
        agent.wait_exit(LONG).unwrap().code(),
        Some(0),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert_eq!(log.matches("audit enabled").count(), 1, "{log}");
    assert_eq!(log.matches("audit connected").count(), 2, "{log}");
    assert!(!log.contains("did not acknowledge"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    drop(conn);
}

#[test]
fn a_failing_audit_port_does_not_disturb_the_shell() {
    // No audit listener: every audit connect fails.
    let host = FakeHost::new(false);
    let (fifo_path, mut fifo) = host.fifo();
    let mut agent = host.spawn(&[("CAPSEM_AUDIT", &format!("file:{}", fifo_path.display()))]);
    let mut conn = host.generation(&mut agent, 1);
    write_events(&mut fifo, [1, 2]);
    conn.type_("echo $((6*7))\n");
    conn.expect("42");
    assert!(
        wait_until(deadline(LONG), || agent
            .log()
            .contains("audit connection failed")),
        "{}",
        agent.log()
    );
    // Still the same generation: the shell answers.
    conn.type_("echo $((7*7))\n");
    conn.expect("49");
    conn.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    let log = agent.log();
    assert!(!log.contains("transport lost"), "{log}");
    assert_eq!(
        log.matches("bridge started generation=").count(),
        1,
        "{log}"
    );
}

#[test]
fn audit_reconnects_leak_no_threads_or_fds() {
    let host = FakeHost::new(true);
    let (fifo_path, mut fifo) = host.fifo();
    let mut agent = host.spawn(&[("CAPSEM_AUDIT", &format!("file:{}", fifo_path.display()))]);
    let pid = agent.pid();
    let fds = || count_dir(format!("/proc/{pid}/fd"));
    let tasks = || count_dir(format!("/proc/{pid}/task"));
    let mut conn = host.generation(&mut agent, 1);
    let mut audit = host.audit(1);
    write_events(&mut fifo, [1]);
    assert_eq!(audit.record().serial, 1);
    audit.ack(1);
    conn.type_("echo $((2*21))\n");
    conn.expect("42");
    assert!(
        wait_until(deadline(LONG), || tasks() == 8),
        "tasks {}",
        tasks()
    );
    let before = (tasks(), fds());
    drop((audit, conn));
    for generation in 2..=30 {
        let conn = host.generation(&mut agent, generation);
        let mut audit = host.audit(generation);
        write_events(&mut fifo, [generation]);
        assert_eq!(audit.record().serial, generation);
        audit.ack(generation);
        drop((audit, conn));
    }
    let mut conn = host.generation(&mut agent, 31);
    let _audit = host.audit(31);
    conn.type_("echo $((3*14))\n");
    conn.expect("42");
    assert!(
        wait_until(deadline(LONG), || (tasks(), fds()) == before),
        "before {before:?}, after {:?}",
        (tasks(), fds())
    );
    conn.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    let log = agent.log();
    assert_eq!(log.matches("audit connected").count(), 31, "{log}");
}
