//! Scenarios shared by the no-VM and the real-VM test suites. Each takes a
//! backend, drives the real `capsem shell` through a PTY, and checks that
//! nothing is left behind.

use std::time::Duration;

use crate::fixture::{Backend, Fixture};
use crate::pty::{find, PtySession};

/// How long one interactive step may take: generous under TCG.
pub fn step(backend: Backend) -> Duration {
    match backend {
        Backend::None => Duration::from_secs(15),
        Backend::Qemu => Duration::from_secs(120),
    }
}

/// Waits until the shell answers and shows its next prompt, proving the
/// session is up and readline is ready for keys (a Ctrl-D typed before the
/// prompt is drawn reaches a cooked terminal, as it would for a person who
/// types ahead).
pub fn wait_ready(s: &mut PtySession, backend: Backend) {
    s.line("echo READY$((6*7))").unwrap();
    s.expect("READY42", step(backend)).unwrap();
    s.expect_any(&["# ", "$ "], step(backend)).unwrap();
}

/// MessagePack map headers of a frame (`{"t": ...}`), and the heartbeat
/// words: none of them may ever reach the user's terminal.
pub fn assert_no_frames(transcript: &[u8]) {
    for needle in [&b"\x81\xa1t"[..], b"\x82\xa1t", b"\xa4pong", b"\xa4ping"] {
        assert!(
            find(transcript, needle).is_none(),
            "protocol bytes {needle:?} in the terminal output: {:?}",
            String::from_utf8_lossy(transcript)
        );
    }
}

/// Runs `keys` in a fresh shell and returns the CLI's exit code and output.
pub fn run_to_exit(name: &str, backend: Backend, keys: &[&str]) -> (i32, Vec<u8>) {
    let fx = Fixture::new(name, backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    for k in keys {
        s.send(k).unwrap();
    }
    let code = s.wait_code(step(backend)).unwrap();
    let out = s.transcript();
    assert_no_frames(&out);
    drop(s);
    fx.assert_nothing_left();
    (code, out)
}

pub fn ctrl_d_exits_zero(backend: Backend) {
    let (code, _) = run_to_exit("ctrl_d", backend, &["\x04"]);
    assert_eq!(code, 0);
}

pub fn exit_7(backend: Backend) {
    let (code, _) = run_to_exit("exit_7", backend, &["exit 7\r"]);
    assert_eq!(code, 7);
}

pub fn killed_by_signal(backend: Backend) {
    let (code, _) = run_to_exit("kill_9", backend, &["kill -9 $$\r"]);
    assert_eq!(code, 137);
}

pub fn output_before_status(backend: Backend) {
    // The command line echoes `printf END`; the output itself is `END` right
    // before the shell exits, with no newline after it.
    let (code, out) = run_to_exit("printf_end", backend, &["printf E\"\"ND; exit 3\r"]);
    assert_eq!(code, 3);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("END"), "END missing from {text:?}");
}

pub fn resize_reaches_the_shell(backend: Backend) {
    let fx = Fixture::new("resize", backend);
    let mut s = fx.shell(100, 40);
    wait_ready(&mut s, backend);
    s.line("stty size").unwrap();
    s.expect("40 100", step(backend)).unwrap();
    s.resize(132, 50).unwrap();
    // SIGWINCH travels CLI -> process -> agent asynchronously: ask until the
    // new size shows, a bounded number of times.
    let mut seen = false;
    for i in 0..50 {
        s.line(&format!("echo S$((0+{i})):$(stty size):E$((1))"))
            .unwrap();
        s.expect(&format!("S{i}:"), step(backend)).unwrap();
        s.expect(":E1", step(backend)).unwrap();
        let t = s.transcript();
        if find(&t, format!("S{i}:50 132:E1").as_bytes()).is_some() {
            seen = true;
            break;
        }
    }
    assert!(seen, "the new size never reached the shell");
    s.line("exit").unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);
    drop(s);
    fx.assert_nothing_left();
}

/// Breaks the guest transport once: the agent reconnects exactly once and
/// the shell keeps its state.
pub fn transport_loss_keeps_the_shell(backend: Backend) {
    use capsem_proto::ipc::ClientToProcess;
    let fx = Fixture::new("transport_loss", backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    s.line("KEEP=kept$((5*5))").unwrap();
    let vm = fx.wait_vm(step(backend));
    let before = fx.status(&vm);
    assert_eq!(before.generation, 1, "{before:?}");
    assert_eq!(before.agent_connects, 1, "{before:?}");

    crate::fixture::send(&vm, &ClientToProcess::DropGuestConnections).unwrap();
    crate::fixture::wait_until(step(backend), "the agent to reconnect", || {
        let st = fx.status(&vm);
        st.generation == 2 && st.bridged
    });
    s.line("echo V=$KEEP").unwrap();
    s.expect("V=kept25", step(backend)).unwrap();
    // After a full round trip through the new generation, still exactly one
    // reconnect: no storm.
    let after = fx.status(&vm);
    assert_eq!(after.generation, 2, "{after:?}");
    assert_eq!(after.agent_connects, 2, "{after:?}");

    s.line("exit 0").unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);
    assert_no_frames(&s.transcript());
    drop(s);
    fx.assert_nothing_left();
}

/// A job that left the shell's process group and session (`setsid`) and
/// ignores SIGHUP still dies with the VM.
pub fn escaped_background_job_dies_with_the_vm(backend: Backend) {
    let (code, _) = run_to_exit(
        "escaped_job",
        backend,
        &["setsid nohup sleep 1000 >/dev/null 2>&1 & sleep 1000 & exit 0\r"],
    );
    assert_eq!(code, 0);
}

/// The counts the seed report (the original capsem's Ctrl-D storm) gave,
/// taken from our own logs after a temporary shell ended with Ctrl-D.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeedCounts {
    pub reconnects_after_shell_exit: usize,
    pub bridge_threads_started: usize,
    pub bridge_threads_joined: usize,
    pub frames_in_terminal_output: usize,
    pub vsock_connections_accepted: usize,
    pub vsock_connections_closed: usize,
}

fn sum_threads(log: &str, what: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split("threads=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

pub fn seed_case_ctrl_d(backend: Backend) -> SeedCounts {
    let fx = Fixture::new("seed_case", backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    s.send("\x04").unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);
    let out = s.transcript();
    drop(s);
    fx.assert_nothing_left();

    let logs = fx.kept_logs();
    let process = logs.get("process.log").expect("process.log kept");
    let agent = match backend {
        Backend::None => logs.get("agent.log"),
        Backend::Qemu => logs.get("serial.log"),
    }
    .expect("agent log kept");
    let after_exit = process
        .split_once("shell exited")
        .map(|(_, rest)| rest)
        .unwrap_or("");
    let frames = [&b"\x81\xa1t"[..], b"\x82\xa1t", b"\xa4pong", b"\xa4ping"]
        .iter()
        .map(|needle| out.windows(needle.len()).filter(|w| w == needle).count())
        .sum();
    let counts = SeedCounts {
        reconnects_after_shell_exit: after_exit.matches("guest connected generation=").count(),
        bridge_threads_started: sum_threads(agent, "bridge started"),
        bridge_threads_joined: sum_threads(agent, "bridge joined"),
        frames_in_terminal_output: frames,
        vsock_connections_accepted: process.matches("vsock connection accepted").count(),
        vsock_connections_closed: process.matches("vsock connection closed").count(),
    };
    println!("seed case counts ({}): {counts:?}", backend.flag());
    if matches!(backend, Backend::Qemu) {
        // The temporary VM is killed at the agent's farewell, not after a
        // power-off, and the agent's last line still reached the console.
        assert!(
            process.contains("the agent is done (its control connection closed)"),
            "the VM was not ended at the agent's farewell:\n{process}"
        );
        assert!(agent.contains("agent exiting"), "{agent}");
    }
    assert_eq!(counts.reconnects_after_shell_exit, 0, "{counts:?}");
    assert!(
        counts.bridge_threads_started > 0,
        "no bridge start logged: {counts:?}"
    );
    assert_eq!(
        counts.bridge_threads_started, counts.bridge_threads_joined,
        "{counts:?}"
    );
    assert_eq!(counts.frames_in_terminal_output, 0, "{counts:?}");
    assert!(counts.vsock_connections_accepted >= 2, "{counts:?}");
    assert_eq!(
        counts.vsock_connections_accepted, counts.vsock_connections_closed,
        "{counts:?}"
    );
    counts
}

/// The session is lost without a status (the agent or the whole guest
/// died): the CLI exits 255 with one `session lost` line naming `why`, and
/// nothing is left behind.
pub fn session_lost_exits_255(name: &str, backend: Backend, keys: &str, why: &str) {
    let fx = Fixture::new(name, backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    s.send(keys).unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 255);
    let out = String::from_utf8_lossy(&s.transcript()).into_owned();
    let lost: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("capsem: session lost"))
        .collect();
    assert_eq!(lost.len(), 1, "one session-lost line expected: {out:?}");
    assert!(lost[0].contains(why), "{:?} does not say {why:?}", lost[0]);
    drop(s);
    fx.assert_nothing_left();
}

/// The agent is SIGKILLed from inside (it is the shell's parent).
pub fn agent_killed_exits_255(backend: Backend) {
    session_lost_exits_255("agent_killed", backend, "kill -9 $PPID\r", "exited");
}

/// SIGTERM or SIGHUP to the CLI destroys the temporary VM; the CLI exits
/// 128+N.
pub fn signal_to_the_cli_destroys_the_vm(backend: Backend, sig: nix::sys::signal::Signal) {
    let fx = Fixture::new("signal_to_cli", backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid() as i32), sig).unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 128 + sig as i32);
    drop(s);
    fx.assert_nothing_left();
}
