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

/// Waits until the shell answers, proving the session is up.
pub fn wait_ready(s: &mut PtySession, backend: Backend) {
    s.line("echo READY$((6*7))").unwrap();
    s.expect("READY42", step(backend)).unwrap();
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
