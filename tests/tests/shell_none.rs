//! `capsem shell` on the no-VM backend, end to end through a real PTY.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use capsem_proto::ipc::ClientToProcess;
use capsem_tests::fixture::{send, wait_until};
use capsem_tests::procs::thread_and_fd_counts;
use capsem_tests::scenarios::{self, assert_no_frames, step, wait_ready};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::None;

#[test]
fn ctrl_d_exits_zero() {
    scenarios::ctrl_d_exits_zero(B);
}

#[test]
fn exit_7() {
    scenarios::exit_7(B);
}

#[test]
fn kill_9_exits_137() {
    scenarios::killed_by_signal(B);
}

#[test]
fn printf_end_then_exit_3() {
    scenarios::output_before_status(B);
}

#[test]
fn resize_reaches_the_shell() {
    scenarios::resize_reaches_the_shell(B);
}

#[test]
fn transport_loss_reconnects_once_and_keeps_the_shell() {
    scenarios::transport_loss_keeps_the_shell(B);
}

#[test]
fn two_hundred_reconnects_leak_no_thread_or_fd() {
    let fx = Fixture::new("reconnect_leak", B);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, B);
    let vm = fx.wait_vm(step(B));
    let st = fx.status(&vm);
    let agent = st.guest_pid.expect("agent pid");
    let baseline = thread_and_fd_counts(agent).unwrap();
    for cycle in 1..=200u64 {
        send(&vm, &ClientToProcess::DropGuestConnections).unwrap();
        wait_until(step(B), "the agent to reconnect", || {
            let st = fx.status(&vm);
            st.generation == cycle + 1 && st.bridged
        });
    }
    // The last generation's threads may still be starting when the host
    // pairs the terminal; the counts must settle at the baseline.
    let mut now = (0, 0);
    let settled = (0..500).any(|_| {
        now = thread_and_fd_counts(agent).unwrap();
        if now == baseline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
        false
    });
    assert!(
        settled,
        "threads/fds before {baseline:?}, after 200 reconnects {now:?}"
    );
    let st = fx.status(&vm);
    assert_eq!(st.agent_connects, 201, "{st:?}");
    s.line("echo ALIVE$((2+2))").unwrap();
    s.expect("ALIVE4", step(B)).unwrap();
    s.line("exit").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    assert_no_frames(&s.transcript());
    drop(s);
    fx.assert_nothing_left();
}

/// Opens a control connection as a hostile guest process would, sends
/// `bytes`, optionally half-closes, and returns once the host has closed it.
fn hostile_control(vm: &std::path::Path, bytes: &[u8], half_close: bool) {
    let mut conn = UnixStream::connect(vm.join("vsock.sock_5000")).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    conn.write_all(bytes).unwrap();
    if half_close {
        conn.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut buf = [0u8; 256];
    // The host must close: EOF (or a reset), never a hello ack.
    match conn.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("host answered a bad hello with {:?}", &buf[..n]),
    }
}

#[test]
fn bad_control_input_is_closed_with_a_reason_and_the_session_survives() {
    use capsem_proto::frame::Guest;
    use capsem_proto::guest::{GuestToHost, PROTOCOL_VERSION};
    use capsem_proto::Codec;

    let fx = Fixture::new("bad_input", B);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, B);
    let vm = fx.wait_vm(step(B));

    // Garbage: a valid-size frame of invalid MessagePack.
    hostile_control(&vm, &[0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1], false);
    // A length prefix far over the limit.
    hostile_control(&vm, &0x7fff_ffffu32.to_be_bytes(), false);
    // A well-formed hello with the wrong token.
    let wrong = Codec::<Guest>::encode(&GuestToHost::Hello {
        version: PROTOCOL_VERSION,
        token: "not-the-token".into(),
        connects: 1,
        shell_pid: 1,
    })
    .unwrap();
    hostile_control(&vm, &wrong, false);
    // A truncated frame, then EOF.
    hostile_control(&vm, &wrong[..wrong.len() / 2], true);

    let log = std::fs::read_to_string(vm.join("process.log")).unwrap();
    let rejected: Vec<&str> = log.lines().filter(|l| l.contains("rejected")).collect();
    assert!(
        rejected.len() >= 4,
        "expected 4 logged rejections, got:\n{log}"
    );
    assert!(log.contains("token"), "no wrong-token reason in:\n{log}");

    // The real session is untouched.
    let st = fx.status(&vm);
    assert_eq!(st.generation, 1, "{st:?}");
    s.line("echo STILL$((3+3))").unwrap();
    s.expect("STILL6", step(B)).unwrap();
    s.line("exit 0").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    drop(s);
    fx.assert_nothing_left();
}

#[test]
fn works_without_a_terminal() {
    let fx = Fixture::new("no_tty", B);
    let mut child = fx
        .capsem()
        .arg("shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo piped$((1+1))\nexit 4\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "stdout {stdout:?} stderr {:?}",
        out.stderr
    );
    assert!(stdout.contains("piped2"), "{stdout:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("no isolation"))
            .count(),
        1,
        "one warning line expected: {stderr:?}"
    );
    fx.assert_nothing_left();
}

#[test]
fn sigterm_to_the_cli_destroys_the_vm() {
    scenarios::signal_to_the_cli_destroys_the_vm(B, nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn sighup_to_the_cli_destroys_the_vm() {
    scenarios::signal_to_the_cli_destroys_the_vm(B, nix::sys::signal::Signal::SIGHUP);
}

#[test]
fn escaped_background_job_dies_with_the_vm() {
    scenarios::escaped_background_job_dies_with_the_vm(B);
}

#[test]
fn seed_case_ctrl_d_counts() {
    let counts = scenarios::seed_case_ctrl_d(B);
    assert_eq!(counts.vsock_connections_accepted, 2, "{counts:?}");
}

#[test]
fn agent_killed_exits_255() {
    scenarios::agent_killed_exits_255(B);
}
