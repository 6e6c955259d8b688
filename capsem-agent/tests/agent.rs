//! End-to-end tests: a fake host (two Unix listeners at `<dir>/vsock.sock_5000`
//! speaking `Codec::<Host>` and `_5001` speaking `Codec::<TermHost>`) and the
//! real agent binary.
//!
//! Every agent runs inside an [`Agent`] guard whose Drop terminates it, kills
//! the shell's group if anything is left, and reaps, even when a test fails.
//! Waits are bounded by deadlines.

// Test helpers outside #[test] fns: a failed setup should panic loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsem_proto::frame::{Host, TermHost};
use capsem_proto::guest::{GuestToHost, HostToGuest, PROTOCOL_VERSION};
use capsem_proto::terminal::{HostToTerm, TermToHost};
use capsem_proto::Codec;

const TOKEN: &str = "test-token-0123";
const LONG: Duration = Duration::from_secs(20);

mod common;
use common::*;

/// The fake host: the two listeners vhost-device-vsock would provide.
struct FakeHost {
    dir: tempfile::TempDir,
    ctl: UnixListener,
    term: UnixListener,
}

/// One accepted generation.
struct Conn {
    ctl: UnixStream,
    term: UnixStream,
    codec: Codec<Host>,
    term_codec: Codec<TermHost>,
    hello: GuestToHost,
    /// The payloads of the terminal's `Output` frames, in order.
    out: Vec<u8>,
    /// The terminal's `Exit` frame, once read.
    exit: Option<(Option<i32>, Option<i32>)>,
}

impl FakeHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ctl = UnixListener::bind(dir.path().join("vsock.sock_5000")).unwrap();
        let term = UnixListener::bind(dir.path().join("vsock.sock_5001")).unwrap();
        std::fs::create_dir(dir.path().join("scratch")).unwrap();
        Self { dir, ctl, term }
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let log = self.dir.path().join(format!(
            "agent-{}.log",
            count_dir(self.dir.path().display().to_string())
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsem-agent"));
        cmd.arg("--transport")
            .arg(format!("unix:{}", self.base().display()))
            .args(args)
            .env("CAPSEM_TOKEN", TOKEN)
            .env_remove("CAPSEM_BOOT_STAGES")
            // The kernel audit source is the host's here: never from a test.
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
        if !poll_fd(listener.as_fd(), libc::POLLIN, deadline(within)) {
            return None;
        }
        let (s, _) = listener.accept().unwrap();
        Some(s)
    }

    /// True when no connection waits on either listener.
    fn idle(&self) -> bool {
        !poll_fd(self.ctl.as_fd(), libc::POLLIN, Instant::now())
            && !poll_fd(self.term.as_fd(), libc::POLLIN, Instant::now())
    }

    /// Accepts control, reads the hello, acks `generation`, accepts terminal.
    fn generation(&self, agent: &mut Agent, generation: u64) -> Conn {
        let ctl = Self::accept(&self.ctl, LONG).expect("agent connects to control");
        let mut conn = Conn {
            ctl,
            term: UnixStream::pair().unwrap().0,
            codec: Codec::new(),
            term_codec: Codec::new(),
            hello: GuestToHost::Pong { seq: 0 },
            out: Vec::new(),
            exit: None,
        };
        let hello = conn.recv();
        hello.check_hello(TOKEN).expect("valid hello");
        if let GuestToHost::Hello { shell_pid, .. } = hello {
            agent.shell_pid = Some(shell_pid);
        }
        conn.hello = hello;
        conn.send(HostToGuest::HelloAck {
            version: PROTOCOL_VERSION,
            generation,
        });
        conn.term = Self::accept(&self.term, LONG).expect("agent connects to terminal");
        // The terminal opens with a hello naming the acked generation.
        let until = deadline(LONG);
        let mut buf = [0u8; 4096];
        let first = loop {
            if let Some(m) = conn.term_codec.next_message().unwrap() {
                break m;
            }
            assert!(
                poll_fd(conn.term.as_fd(), libc::POLLIN, until),
                "no terminal hello"
            );
            let n = conn.term.read(&mut buf).unwrap();
            assert!(n > 0, "terminal closed before its hello");
            conn.term_codec.feed(&buf[..n]).unwrap();
        };
        assert_eq!(
            first,
            TermToHost::Hello {
                token: TOKEN.into(),
                generation
            }
        );
        // Frames that came in the same read as the hello.
        conn.take_frames(&[]);
        conn
    }
}

impl Conn {
    fn send(&mut self, msg: HostToGuest) {
        self.ctl
            .write_all(&Codec::<Host>::encode(&msg).unwrap())
            .unwrap();
    }

    fn try_recv(&mut self, within: Duration) -> Option<GuestToHost> {
        let until = deadline(within);
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.codec.next_message().unwrap() {
                return Some(m);
            }
            if !poll_fd(self.ctl.as_fd(), libc::POLLIN, until) {
                return None;
            }
            let n = self.ctl.read(&mut buf).unwrap();
            if n == 0 {
                return None;
            }
            self.codec.feed(&buf[..n]).unwrap();
        }
    }

    fn recv(&mut self) -> GuestToHost {
        self.try_recv(LONG).expect("a control message")
    }

    fn type_(&mut self, s: &str) {
        let frame = Codec::<TermHost>::encode(&HostToTerm::Input {
            data: s.as_bytes().to_vec(),
        })
        .unwrap();
        self.term.write_all(&frame).unwrap();
    }

    /// Decodes the terminal frames in `bytes`: `Output` payloads go to
    /// `out`, `Exit` is kept and must be the last frame.
    fn take_frames(&mut self, bytes: &[u8]) {
        self.term_codec.feed(bytes).unwrap();
        while let Some(frame) = self.term_codec.next_message().unwrap() {
            assert_eq!(self.exit, None, "a terminal frame after Exit: {frame:?}");
            match frame {
                TermToHost::Output { data } => self.out.extend_from_slice(&data),
                TermToHost::Exit { exit_code, signal } => self.exit = Some((exit_code, signal)),
                other => panic!("unexpected terminal frame {other:?}"),
            }
        }
    }

    /// One read of the terminal, waiting until `until`; false at EOF.
    fn read_term(&mut self, until: Instant) -> bool {
        assert!(
            poll_fd(self.term.as_fd(), libc::POLLIN, until),
            "timed out reading the terminal; got {:?}",
            self.text()
        );
        let mut buf = [0u8; 65536];
        let n = self.term.read(&mut buf).unwrap();
        self.take_frames(&buf[..n]);
        n > 0
    }

    /// Reads the terminal until `needle` appears in everything read so far.
    fn expect(&mut self, needle: &str) {
        let until = deadline(LONG);
        while !String::from_utf8_lossy(&self.out).contains(needle) {
            assert!(
                self.read_term(until),
                "EOF before {needle:?}; got {:?}",
                self.text()
            );
        }
    }

    /// Reads the terminal until its `Exit` frame.
    fn read_to_exit(&mut self) -> (Option<i32>, Option<i32>) {
        let until = deadline(LONG);
        while self.exit.is_none() {
            let open = self.read_term(until);
            assert!(
                open || self.exit.is_some(),
                "EOF before Exit; got {:?}",
                self.text()
            );
        }
        self.exit.unwrap()
    }

    /// Nothing is left on the terminal after `Exit`: no frame, no partial
    /// frame (the status was the last thing written, after all output).
    fn nothing_after_exit(&mut self) {
        assert_eq!(self.term_codec.buffered(), 0, "bytes after Exit");
        self.term.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        match self.term.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{n} bytes after Exit"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
        self.term.set_nonblocking(false).unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

/// `(exit_code, signal)` we expect in a `ShellExited`.
fn shell_exited(code: Option<i32>, signal: Option<i32>) -> (Option<i32>, Option<i32>) {
    (code, signal)
}

/// Reads the terminal to its `Exit` frame: the status, after every output
/// chunk (frames in order on one stream), and nothing after it.
fn expect_exit(conn: &mut Conn, want: (Option<i32>, Option<i32>)) {
    assert_eq!(conn.read_to_exit(), want);
    conn.nothing_after_exit();
}

#[test]
fn hello_ack_and_echo() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    match &conn.hello {
        GuestToHost::Hello {
            version,
            token,
            connects,
            shell_pid,
        } => {
            assert_eq!(*version, PROTOCOL_VERSION);
            assert_eq!(token, TOKEN);
            assert_eq!(*connects, 1);
            assert!(*shell_pid > 1);
        }
        other => panic!("{other:?}"),
    }
    conn.type_("echo hi\n");
    conn.expect("hi");
    // The marker is computed, so the echoed command line cannot match it.
    conn.type_("echo $((6*7)) $HOME $TERM\n");
    conn.expect("42 ");
    let scratch = host.dir.path().join("scratch");
    let scratch = scratch.canonicalize().unwrap();
    conn.expect(&format!("42 {} xterm-256color", scratch.display()));
    // The agent blocks its termination signals; the shell's children must
    // not inherit that.
    conn.type_("grep -E 'SigBlk' /proc/self/status\n");
    conn.expect("SigBlk:\t0000000000000000");
}

#[test]
fn exit_7_delivers_output_then_status_and_never_reconnects() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("echo $((40+2)); exit 7\n");
    expect_exit(&mut conn, shell_exited(Some(7), None));
    assert!(conn.text().contains("42"), "{}", conn.text());
    // The host closes; the agent exits 0 without reconnecting.
    drop(conn);
    let status = agent.wait_exit(LONG).expect("agent exits");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(host.idle(), "the agent reconnected after the shell exited");
    let log = agent.log();
    assert_eq!(
        log.matches("bridge started generation=1 threads=6").count(),
        1
    );
    assert_eq!(
        log.matches("bridge joined generation=1 threads=6").count(),
        1
    );
    assert_eq!(proc_state(agent.shell_pid.unwrap()), None, "shell reaped");
}

#[test]
fn printf_end_exit_3_then_agent_exits_on_its_own() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("printf 'E%sD' N; exit 3\n");
    expect_exit(&mut conn, shell_exited(Some(3), None));
    assert!(conn.text().contains("END"), "{}", conn.text());
    // The host keeps the connection open: the agent waits a bounded time.
    let start = Instant::now();
    let status = agent.wait_exit(LONG).expect("agent exits");
    assert_eq!(status.code(), Some(0));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(host.idle());
    drop(conn);
}

#[test]
fn kill_9_reports_the_signal() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("kill -9 $$\n");
    expect_exit(&mut conn, shell_exited(None, Some(9)));
    drop(conn);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    assert!(host.idle());
}

#[test]
fn lots_of_output_arrives_before_the_status() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("seq 1 30000; exit 0\n");
    // Read the terminal concurrently (the output exceeds socket buffers).
    conn.expect("\n30000\r\n");
    expect_exit(&mut conn, shell_exited(Some(0), None));
    // Every line, in order, nothing lost or duplicated.
    let text = conn.text();
    let start = text.find("1\r\n2\r\n3\r\n").expect("start of seq");
    let nums: Vec<&str> = text[start..].split("\r\n").take(30000).collect();
    for (i, n) in nums.iter().enumerate() {
        assert_eq!(*n, (i + 1).to_string());
    }
    assert_eq!(nums.len(), 30000);
    drop(conn);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
}

#[test]
fn dropped_connection_reconnects_once_with_the_same_shell() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    let GuestToHost::Hello { shell_pid, .. } = conn.hello else {
        unreachable!()
    };
    conn.type_("X=$((1000+234)); echo set$((1+1))\n");
    conn.expect("set2");
    drop(conn);
    let mut conn = host.generation(&mut agent, 2);
    match conn.hello {
        GuestToHost::Hello {
            connects,
            shell_pid: pid,
            ..
        } => {
            assert_eq!(connects, 2);
            assert_eq!(pid, shell_pid);
        }
        ref other => panic!("{other:?}"),
    }
    conn.type_("echo $X\n");
    conn.expect("1234");
    assert!(host.idle(), "exactly one reconnect");
    conn.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    let log = agent.log();
    assert_eq!(log.matches("transport lost").count(), 1, "{log}");
}

#[test]
fn shell_exit_while_disconnected_is_delivered_by_the_next_generation() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    let shell = agent.shell_pid.unwrap();
    conn.type_("sleep 0.3; echo $((3*7)); exit 4\n");
    // The line reached the PTY once the tty echoes it.
    conn.expect("exit 4");
    drop(conn);
    // Not accepting yet: wait until the shell has exited (a zombie, since
    // the agent reaps only after draining its output).
    assert!(wait_until(deadline(LONG), || proc_state(shell) == Some('Z')));
    let mut conn = host.generation(&mut agent, 2);
    expect_exit(&mut conn, shell_exited(Some(4), None));
    assert!(conn.text().contains("21"), "{}", conn.text());
    drop(conn);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    assert!(host.idle());
}

fn tasks(pid: u32) -> usize {
    count_dir(format!("/proc/{pid}/task"))
}

fn fds(pid: u32) -> usize {
    count_dir(format!("/proc/{pid}/fd"))
}

#[test]
fn two_hundred_reconnects_leak_no_threads_or_fds() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let pid = agent.pid();
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("echo $((2*21))\n");
    conn.expect("42");
    // Main thread plus the bridge's six.
    assert!(
        wait_until(deadline(LONG), || tasks(pid) == 7),
        "tasks {}",
        tasks(pid)
    );
    let before = (tasks(pid), fds(pid));
    drop(conn);
    for generation in 2..=201 {
        let conn = host.generation(&mut agent, generation);
        drop(conn);
    }
    let mut conn = host.generation(&mut agent, 202);
    conn.type_("echo $((3*14))\n");
    conn.expect("42");
    assert!(
        wait_until(deadline(LONG), || (tasks(pid), fds(pid)) == before),
        "before {before:?}, after {:?}",
        (tasks(pid), fds(pid))
    );
    conn.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    let log = agent.log();
    assert_eq!(log.matches("bridge started generation=").count(), 202);
    assert_eq!(log.matches("bridge joined generation=").count(), 202);
    assert_eq!(log.matches(" threads=6").count(), 404);
}

#[test]
fn resize_reaches_stty_and_ping_gets_pong() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.send(HostToGuest::Resize {
        cols: 123,
        rows: 45,
    });
    // Control frames are handled in order: the pong proves the resize ran.
    conn.send(HostToGuest::Ping { seq: 77 });
    assert_eq!(conn.recv(), GuestToHost::Pong { seq: 77 });
    conn.type_("stty size\n");
    conn.expect("45 123");
    for seq in 0..200 {
        conn.send(HostToGuest::Ping { seq });
    }
    for seq in 0..200 {
        assert_eq!(conn.recv(), GuestToHost::Pong { seq });
    }
    conn.type_("echo $((5*5))\n");
    conn.expect("25");
    assert!(
        !conn.text().contains("pong"),
        "a control frame on the terminal"
    );
    assert!(
        !conn.out.contains(&0xa4),
        "MessagePack bytes on the terminal"
    );
}

#[test]
fn shutdown_kills_the_shell_and_its_jobs() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("sleep 1000 & echo bg=$! x$((1+1))\n");
    conn.expect("x2");
    let text = conn.text();
    let bg: u32 = text
        .split("bg=")
        .last()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no bg pid in {text:?}"));
    conn.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    assert_eq!(proc_state(agent.shell_pid.unwrap()), None, "shell reaped");
    assert!(
        wait_until(deadline(LONG), || matches!(
            proc_state(bg),
            None | Some('Z')
        )),
        "background job survived: {}",
        std::fs::read_to_string(format!("/proc/{bg}/status")).unwrap_or_default()
    );
    assert!(host.idle());
}

#[test]
fn sigterm_stops_the_shell_and_exits_0() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("echo $((9*9))\n");
    conn.expect("81");
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    assert_eq!(proc_state(agent.shell_pid.unwrap()), None);
    assert!(agent.log().contains("termination signal received"));
}

#[test]
fn sigterm_while_waiting_to_reconnect_exits_0() {
    // No listener accepts: the agent keeps backing off until the signal.
    let host = FakeHost::new();
    drop(std::fs::remove_file(
        host.dir.path().join("vsock.sock_5000"),
    ));
    let mut agent = host.spawn(&[], &[]);
    assert!(wait_until(deadline(LONG), || agent
        .log()
        .contains("connection attempt failed")));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
}

#[test]
fn silent_host_counts_as_lost_and_boot_stages_are_sent_once() {
    let host = FakeHost::new();
    let mut agent = host.spawn(
        &["--host-timeout-ms", "300"],
        &[("CAPSEM_BOOT_STAGES", "kernel=100,init=2500")],
    );
    let mut conn = host.generation(&mut agent, 1);
    match conn.recv() {
        GuestToHost::BootTimings { stages } => {
            let names: Vec<_> = stages.iter().map(|s| (s.name.as_str(), s.micros)).collect();
            assert_eq!(names, vec![("kernel", 100), ("init", 2500)]);
        }
        other => panic!("{other:?}"),
    }
    // No pings: after 300 ms the agent declares the host gone and returns.
    let start = Instant::now();
    let mut conn2 = host.generation(&mut agent, 2);
    assert!(start.elapsed() >= Duration::from_millis(200));
    conn2.send(HostToGuest::Ping { seq: 5 });
    assert_eq!(
        conn2.recv(),
        GuestToHost::Pong { seq: 5 },
        "no second report"
    );
    assert!(agent.log().contains("host silent for"));
    conn2.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    drop(conn);
}

#[test]
fn usage_and_config_errors_exit_2() {
    let bin = env!("CARGO_BIN_EXE_capsem-agent");
    let out = Command::new(bin)
        .args(["--transport", "unix:/nonexistent/x"])
        .env_remove("CAPSEM_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CAPSEM_TOKEN"));
    let out = Command::new(bin)
        .args(["--transport", "tcp:1"])
        .env("CAPSEM_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin)
        .args(["--host-timeout-ms", "0"])
        .env("CAPSEM_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    for bad in ["", "a b", "a/b", &"v".repeat(65)] {
        let out = Command::new(bin)
            .args(["--transport", "unix:/nonexistent/x", "--vm-id", bad])
            .env("CAPSEM_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--vm-id {bad:?}");
    }
    let out = Command::new(bin)
        .args(["--transport", "unix:/nonexistent/x"])
        .env("CAPSEM_TOKEN", TOKEN)
        .env("CAPSEM_MODE", "persist")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CAPSEM_MODE"));
    let out = Command::new(bin)
        .args(["--bogus"])
        .env("CAPSEM_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn log_lines_have_rfc3339_timestamps() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("exit 0\n");
    expect_exit(&mut conn, shell_exited(Some(0), None));
    drop(conn);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    let log = agent.log();
    for line in log.lines() {
        let ts = line.split_whitespace().next().unwrap_or("");
        assert!(
            ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.contains('T') && ts.ends_with('Z'),
            "{line}"
        );
    }
    assert!(log.contains("connected"), "{log}");
    let _ = Path::new(&agent.log);
}

#[test]
fn ctrl_d_ends_the_session_without_a_reconnect() {
    // The seed bug: Ctrl-D looked like a lost transport and reconnected forever.
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("echo $((8*8))\n");
    conn.expect("64\r\n");
    // Ctrl-D only means EOF to readline: wait for the next prompt (readline
    // sets up the terminal before printing it), as a person would.
    let until = deadline(LONG);
    loop {
        let text = conn.text();
        let after = text.rsplit("64\r\n").next().unwrap_or("");
        if after.trim_end_matches(' ').ends_with(['#', '$']) {
            break;
        }
        assert!(conn.read_term(until), "no prompt: {text:?}");
    }
    conn.type_("\x04");
    expect_exit(&mut conn, shell_exited(Some(0), None));
    drop(conn);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    assert!(host.idle(), "no reconnect after Ctrl-D");
    assert!(!agent.log().contains("transport lost"));
}

#[test]
fn output_not_yet_written_survives_a_lost_transport() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[]);
    let mut conn = host.generation(&mut agent, 1);
    const N: usize = 200_000;
    conn.type_(&format!("seq 1 {N}; echo DONE$((1+1))\n"));
    // Stop reading early: the socket, the agent's pending buffer and the PTY
    // fill up and seq blocks.
    conn.expect("1\r\n2\r\n3\r\n");
    // Wait until the terminal socket stops filling: the agent is then blocked
    // on it with its pending buffer full.
    let mut last = 0;
    let mut same = 0;
    assert!(wait_until(deadline(LONG), || {
        let queued = inq(&conn.term);
        same = if queued > 0 && queued == last {
            same + 1
        } else {
            0
        };
        last = queued;
        same >= 5
    }));
    // Lose only the control connection. The agent joins its threads and only
    // then closes the terminal, so the old terminal socket holds exactly
    // what was written; the rest must come first in the next generation.
    let Conn {
        ctl,
        mut term,
        mut term_codec,
        mut out,
        ..
    } = conn;
    drop(ctl);
    // Read the old terminal only once the generation is over, so nothing
    // drains the agent's pending buffer before it is carried.
    assert!(wait_until(deadline(LONG), || agent
        .log()
        .contains("bridge joined generation=1")));
    let until = deadline(LONG);
    let mut buf = [0u8; 65536];
    loop {
        assert!(
            poll_fd(term.as_fd(), libc::POLLIN, until),
            "old terminal EOF"
        );
        let n = term.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        // Whole frames only: a frame cut by the loss is the host's to drop,
        // and its bytes come again on the next generation.
        term_codec.feed(&buf[..n]).unwrap();
        while let Some(frame) = term_codec.next_message().unwrap() {
            match frame {
                TermToHost::Output { data } => out.extend_from_slice(&data),
                other => panic!("unexpected terminal frame {other:?}"),
            }
        }
    }
    let mut conn = host.generation(&mut agent, 2);
    // Output that came in the same read as the new terminal's hello.
    out.extend_from_slice(&conn.out);
    conn.out = out;
    conn.expect("DONE2");
    let text = conn.text();
    let start = text.find("1\r\n2\r\n3\r\n").expect("start of seq");
    let nums: Vec<&str> = text[start..].split("\r\n").take(N).collect();
    assert_eq!(nums.len(), N);
    for (i, n) in nums.iter().enumerate() {
        assert_eq!(
            *n,
            (i + 1).to_string(),
            "byte loss or duplication near line {i}"
        );
    }
    conn.send(HostToGuest::Shutdown);
    assert_eq!(agent.wait_exit(LONG).unwrap().code(), Some(0));
    let log = agent.log();
    let carried: usize = log
        .split("pending_output=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pending_output in {log}"));
    assert!(carried > 0, "nothing was carried over: {log}");
}

/// Bytes queued for reading on a socket (FIONREAD).
fn inq(s: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the valid pointer.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    n as usize
}

/// Live (not zombie) processes whose session is `sid`, from `/proc/*/stat`.
fn live_in_session(sid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        // state ppid pgrp session
        let f: Vec<&str> = after.split_whitespace().take(4).collect();
        if f.len() == 4 && f[0] != "Z" && f[3].parse::<u32>().ok() == Some(sid) {
            found.push(pid);
        }
    }
    found
}

fn hello_fields(hello: &GuestToHost) -> (u64, u32) {
    match hello {
        GuestToHost::Hello {
            connects,
            shell_pid,
            ..
        } => (*connects, *shell_pid),
        other => panic!("expected Hello, got {other:?}"),
    }
}

#[test]
fn persistent_mode_starts_a_fresh_shell_after_each_exit() {
    let host = FakeHost::new();
    let mut agent = host.spawn(
        &["--vm-id", "vm-test_1.a"],
        &[("CAPSEM_MODE", "persistent")],
    );
    let mut conn = host.generation(&mut agent, 1);
    let (connects1, shell1) = hello_fields(&conn.hello);
    assert_eq!(connects1, 1);
    conn.type_("X=old\n");
    conn.type_("exit 3\n");
    expect_exit(&mut conn, shell_exited(Some(3), None));
    // The host closes after the status, as it does between shells.
    drop(conn);

    let mut conn = host.generation(&mut agent, 2);
    let (connects2, shell2) = hello_fields(&conn.hello);
    assert_ne!(shell2, shell1, "a fresh shell");
    assert_eq!(connects2, connects1 + 1);
    assert_eq!(proc_state(shell1), None, "the first shell was reaped");
    // The echoed command line cannot match: the marker is computed, and the
    // fresh shell has none of the old one's variables.
    conn.type_("echo hi-$((40+2)) ${X-fresh}\n");
    conn.expect("hi-42 fresh");

    // The host keeps this connection open after the status: the agent
    // lingers, then moves on to a third shell by itself.
    conn.type_("exit 0\n");
    expect_exit(&mut conn, shell_exited(Some(0), None));
    let mut conn3 = host.generation(&mut agent, 3);
    let (connects3, shell3) = hello_fields(&conn3.hello);
    assert_eq!(connects3, connects2 + 1);
    assert!(shell3 != shell1 && shell3 != shell2);
    drop(conn);
    conn3.type_("echo hi-$((40+3))\n");
    conn3.expect("hi-43");

    conn3.send(HostToGuest::Shutdown);
    let status = agent.wait_exit(LONG).expect("agent exits");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(host.idle(), "no reconnect after Shutdown");
    for shell in [shell1, shell2, shell3] {
        assert_eq!(proc_state(shell), None, "shell {shell} reaped");
        assert!(
            wait_until(deadline(LONG), || live_in_session(shell).is_empty()),
            "left in shell {shell}'s session: {:?}",
            live_in_session(shell)
        );
    }
    let log = agent.log();
    assert!(log.contains("vm_id=vm-test_1.a"), "{log}");
    assert!(log.contains("shells: 3"), "{log}");
    assert_eq!(log.matches("shell started").count(), 3, "{log}");
    // A shell's exit is not a lost transport, and never waits for a backoff.
    assert!(!log.contains("transport lost"), "{log}");
    assert!(!log.contains("connection attempt failed"), "{log}");
    let text = conn3.text();
    assert!(!text.contains("pong"), "{text}");
}

#[test]
fn persistent_mode_shutdown_right_after_a_shell_exit_stops_the_agent() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&[], &[("CAPSEM_MODE", "persistent")]);
    let mut conn = host.generation(&mut agent, 1);
    let (_, shell) = hello_fields(&conn.hello);
    conn.type_("exit 5\n");
    expect_exit(&mut conn, shell_exited(Some(5), None));
    // While the agent lingers on the delivered status.
    conn.send(HostToGuest::Shutdown);
    let status = agent.wait_exit(LONG).expect("agent exits");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(host.idle(), "a fresh shell was started after Shutdown");
    assert_eq!(proc_state(shell), None);
    let log = agent.log();
    assert_eq!(log.matches("shell started").count(), 1, "{log}");
    assert!(log.contains("shells: 1"), "{log}");
    drop(conn);
}

#[test]
fn shell_mode_exits_after_the_status_and_counts_one_shell() {
    let host = FakeHost::new();
    let mut agent = host.spawn(&["--vm-id", "v1"], &[("CAPSEM_MODE", "shell")]);
    let mut conn = host.generation(&mut agent, 1);
    conn.type_("exit 3\n");
    expect_exit(&mut conn, shell_exited(Some(3), None));
    drop(conn);
    let status = agent.wait_exit(LONG).expect("agent exits");
    assert_eq!(status.code(), Some(0));
    assert!(host.idle(), "shell mode reconnected after the shell exited");
    let log = agent.log();
    assert!(log.contains("ShellExited"), "{log}");
    assert!(log.contains("shells: 1"), "{log}");
}
