//! `~.` in `capsem run -t` and `capsem exec -t` on the no-VM backend,
//! through a real PTY: in `run -t` it destroys the temporary VM at once,
//! even with its agent stopped (SIGSTOP), and exits 255 with one line; in
//! `exec -t` it leaves at once with one line and exit 255, the command
//! ends with its client, and the VM keeps running and answers.
#![allow(clippy::unwrap_used)]

use capsem_tests::fixture::wait_until;
use capsem_tests::persist;
use capsem_tests::procs;
use capsem_tests::pty::PtySession;
use capsem_tests::scenarios::{assert_no_frames, step};
use capsem_tests::{Backend, Fixture};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const B: Backend = Backend::None;

/// The lines `~.` prints.
const DESTROYED: &str = "~. typed: destroyed temporary VM";
const LEFT: &str = "~. typed: left the command; VM box keeps running";

/// The lines of the transcript that contain `needle`: exactly one, and it
/// starts with `capsem: `.
fn one_line(s: &PtySession, needle: &str) -> String {
    let out = String::from_utf8_lossy(&s.transcript()).into_owned();
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one line expected: {out:?}");
    assert!(lines[0].trim_start().starts_with("capsem: "), "{lines:?}");
    assert!(!out.contains("session lost"), "{out:?}");
    assert_no_frames(out.as_bytes());
    out
}

#[test]
fn tilde_dot_in_run_t_destroys_a_vm_whose_agent_is_stopped() {
    let fx = Fixture::new("escape_run_t", B);
    let mut cmd = fx.capsem();
    cmd.args([
        "run",
        "-t",
        "--",
        "sh",
        "-c",
        "echo READY$((6*7)); exec cat",
    ]);
    let mut s = PtySession::spawn(cmd, 80, 24).unwrap();
    s.expect("READY42", step(B)).unwrap();
    let vm = fx.wait_vm(step(B));
    let text = std::fs::read_to_string(vm.join("pids.json")).unwrap();
    let pids: serde_json::Value = serde_json::from_str(&text).unwrap();
    let agent = pids["guest"][0]["pid"].as_i64().unwrap() as i32;
    kill(Pid::from_raw(agent), Signal::SIGSTOP).unwrap();
    // Typed into a wedged guest, then the escape after Enter.
    s.send("never\r~.").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 255);
    one_line(&s, DESTROYED);
    drop(s);
    fx.assert_nothing_left();
}

#[test]
fn tilde_dot_in_exec_t_leaves_and_the_vm_keeps_running() {
    let fx = Fixture::new("escape_exec_t", B);
    persist::ok(&fx, &["create", "box"]);
    let mut cmd = fx.capsem();
    cmd.args([
        "exec",
        "box",
        "-t",
        "--",
        "sh",
        "-c",
        "echo READY$((6*7)); exec cat - -",
    ]);
    let mut s = PtySession::spawn(cmd, 80, 24).unwrap();
    s.expect("READY42", step(B)).unwrap();
    // With `--vmm none` the guest's processes are this test's descendants.
    let cat_runs = || {
        procs::descendants()
            .iter()
            .any(|p| p.cmdline == ["cat", "-", "-"])
    };
    // READY comes from sh just before its exec: cat follows.
    wait_until(step(B), "the command to run cat", cat_runs);
    // Mid-line it is text (cat echoes it back); at a line's start it leaves.
    s.send("a~.b\r").unwrap();
    s.expect("a~.b", step(B)).unwrap();
    s.send("~.").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 255);
    one_line(&s, LEFT);
    drop(s);
    // The command goes with its client, as when any client leaves.
    wait_until(step(B), "the command to end", || !cat_runs());
    let out = persist::exec(&fx, "box", &["--", "echo", "alive"], b"");
    assert_eq!(out.stdout, b"alive\n", "{out:?}");
    persist::ok(&fx, &["rm", "--force", "box"]);
    fx.assert_nothing_left();
}
