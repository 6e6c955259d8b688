//! The ssh-style escape (`~.` at the start of a line) on the no-VM backend,
//! end to end through a real PTY: it destroys a temporary VM whose agent is
//! wedged (SIGSTOP), detaches from a persistent VM, and is ordinary text in
//! the middle of a line or when stdin is not a terminal.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::Stdio;

use capsem_tests::persist;
use capsem_tests::scenarios::{assert_no_frames, step, wait_ready};
use capsem_tests::{Backend, Fixture};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const B: Backend = Backend::None;

/// The line `~.` prints for a temporary VM.
const DESTROYED: &str = "~. typed: destroyed temporary VM";

/// The guest's host pids of the only VM, from its pids.json.
fn guest_pids(fx: &Fixture) -> Vec<i32> {
    let vm = fx.wait_vm(step(B));
    let text = std::fs::read_to_string(vm.join("pids.json")).unwrap();
    let pids: serde_json::Value = serde_json::from_str(&text).unwrap();
    pids["guest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["pid"].as_i64().unwrap() as i32)
        .collect()
}

#[test]
fn tilde_dot_destroys_a_vm_whose_agent_is_stopped() {
    let fx = Fixture::new("escape_stopped_agent", B);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, B);
    let agents = guest_pids(&fx);
    assert_eq!(agents.len(), 1, "one agent: {agents:?}");
    kill(Pid::from_raw(agents[0]), Signal::SIGSTOP).unwrap();
    // Typed into a wedged guest, then the escape after Enter.
    s.send("echo never\r~.").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 255);
    let out = String::from_utf8_lossy(&s.transcript()).into_owned();
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(DESTROYED)).collect();
    assert_eq!(lines.len(), 1, "one line expected: {out:?}");
    assert!(lines[0].trim_start().starts_with("capsem: "), "{lines:?}");
    assert!(!out.contains("session lost"), "{out:?}");
    assert_no_frames(out.as_bytes());
    drop(s);
    fx.assert_nothing_left();
}

#[test]
fn tilde_dot_as_the_first_input_destroys_the_vm() {
    let fx = Fixture::new("escape_first_input", B);
    let mut s = fx.shell(80, 24);
    // The session is attached once the VM directory has its socket; the
    // escape is the very first thing typed.
    fx.wait_vm(step(B));
    s.expect_any(&["# ", "$ "], step(B)).unwrap();
    s.send("~.").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 255);
    let out = String::from_utf8_lossy(&s.transcript()).into_owned();
    assert_eq!(out.matches(DESTROYED).count(), 1, "{out:?}");
    drop(s);
    fx.assert_nothing_left();
}

#[test]
fn tilde_dot_mid_line_is_ordinary_text_and_tilde_question_lists_escapes() {
    let fx = Fixture::new("escape_mid_line", B);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, B);
    s.line("echo MID~.LINE$((1+1))").unwrap();
    s.expect("MID~.LINE2", step(B)).unwrap();
    s.expect_any(&["# ", "$ "], step(B)).unwrap();
    s.send("~?").unwrap();
    s.expect("~~   send one ~", step(B)).unwrap();
    // Still attached, at the start of a line: Ctrl-D ends the shell.
    s.send("\x04").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    let out = String::from_utf8_lossy(&s.transcript()).into_owned();
    assert!(!out.contains(DESTROYED), "{out:?}");
    drop(s);
    fx.assert_nothing_left();
}

#[test]
fn tilde_dot_is_ordinary_input_when_stdin_is_not_a_terminal() {
    let fx = Fixture::new("escape_not_a_tty", B);
    let mut cmd = fx.capsem();
    cmd.arg("shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"~.\necho PIPED$((1+1))\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout} {stderr}");
    assert!(stdout.contains("PIPED2"), "{stdout}");
    assert!(!stderr.contains(DESTROYED), "{stderr}");
    fx.assert_nothing_left();
}

#[test]
fn tilde_dot_detaches_from_a_persistent_vm_with_its_agent_stopped() {
    let fx = Fixture::new("escape_persistent", B);
    assert_eq!(persist::ok(&fx, &["create", "dev"]).trim(), "dev");
    let mut s = persist::attach(&fx, "dev");
    wait_ready(&mut s, B);
    let agents = persist::guest_pids(&fx, "dev");
    assert_eq!(agents.len(), 1, "one agent: {agents:?}");
    kill(Pid::from_raw(agents[0]), Signal::SIGSTOP).unwrap();
    s.send("~.").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    let out = String::from_utf8_lossy(&s.transcript()).into_owned();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("detached from dev"))
        .collect();
    assert_eq!(lines.len(), 1, "one line expected: {out:?}");
    drop(s);
    // The VM keeps running: its processes are all still there.
    assert!(persist::running(persist::process_pid(&fx, "dev")));
    assert!(persist::running(agents[0]));
    kill(Pid::from_raw(agents[0]), Signal::SIGCONT).unwrap();
    persist::ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}
