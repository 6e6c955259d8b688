//! A persistent VM's lifetime limits (`create --idle-timeout`,
//! `--max-duration`) on the no-VM backend: capsem-process enforces them the
//! same way for every backend. Each test waits for the VM to stop (with a
//! generous timeout) and reads the recorded reason; nothing is timed.
#![allow(clippy::unwrap_used)]

use capsem_tests::fixture::wait_until;
use capsem_tests::persist::{attach, capsem, exec, inspect, ok, DETACH};
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::None;

/// Waits until the VM is stopped; its `inspect` object then.
fn wait_stopped(fx: &Fixture) -> serde_json::Value {
    wait_until(step(B), "the VM to stop itself", || {
        inspect(fx, "dev")["state"] == "stopped"
    });
    inspect(fx, "dev")
}

#[test]
fn a_bad_duration_is_refused() {
    let fx = Fixture::new("lifetime_bad", B);
    for bad in ["5", "5x", "0s", "-1s"] {
        let flag = format!("--idle-timeout={bad}");
        let out = capsem(&fx, &["create", "dev", &flag]);
        assert_eq!(out.status.code(), Some(125), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--idle-timeout"), "{err}");
    }
    assert!(fx.vm_dirs().is_empty(), "a refused create left a VM");
    fx.assert_nothing_left();
}

/// Nothing attached, nothing running: the VM stops and says why, in
/// `inspect`, `list` and `list --json`; `start` clears the reason.
#[test]
fn idle_timeout_stops_an_idle_vm_and_records_why() {
    let fx = Fixture::new("lifetime_idle", B);
    ok(&fx, &["create", "dev", "--idle-timeout", "2s"]);
    assert_eq!(inspect(&fx, "dev")["idle_timeout"], "2s");
    let stopped = wait_stopped(&fx);
    assert_eq!(stopped["stop_reason"], "idle timeout 2s", "{stopped}");
    let list = ok(&fx, &["list"]);
    assert!(list.contains("stopped (idle timeout 2s)"), "{list}");
    let json: serde_json::Value = serde_json::from_str(&ok(&fx, &["list", "--json"])).unwrap();
    assert_eq!(json[0]["stop_reason"], "idle timeout 2s", "{json}");
    // A new start runs again (and will stop again when idle).
    ok(&fx, &["start", "dev"]);
    let running = inspect(&fx, "dev");
    assert!(running.get("stop_reason").is_none(), "{running}");
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

/// An attached client keeps the VM up: a shell command that outlasts the
/// timeout still answers; once detached, the VM stops as idle.
#[test]
fn an_attached_client_keeps_it_up() {
    let fx = Fixture::new("lifetime_attached", B);
    ok(&fx, &["create", "dev", "--idle-timeout", "3s"]);
    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, B);
    s.line("sleep 5; echo STILL$((6*7))").unwrap();
    s.expect("STILL42", step(B)).unwrap();
    assert_eq!(inspect(&fx, "dev")["state"], "running");
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    let stopped = wait_stopped(&fx);
    assert_eq!(stopped["stop_reason"], "idle timeout 3s", "{stopped}");
    ok(&fx, &["rm", "dev"]);
    fx.assert_nothing_left();
}

/// A running exec keeps the VM up past the timeout.
#[test]
fn a_running_exec_keeps_it_up() {
    let fx = Fixture::new("lifetime_exec", B);
    ok(&fx, &["create", "dev", "--idle-timeout", "3s"]);
    let out = exec(&fx, "dev", &["--", "sh", "-c", "sleep 5; echo done"], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"done\n");
    let stopped = wait_stopped(&fx);
    assert_eq!(stopped["stop_reason"], "idle timeout 3s", "{stopped}");
    ok(&fx, &["rm", "dev"]);
    fx.assert_nothing_left();
}

/// The max duration stops the VM even with a client attached, which is
/// told why.
#[test]
fn max_duration_stops_it_even_while_attached() {
    let fx = Fixture::new("lifetime_max", B);
    ok(&fx, &["create", "dev", "--max-duration", "6s"]);
    assert_eq!(inspect(&fx, "dev")["max_duration"], "6s");
    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, B);
    let code = s.wait_code(step(B)).unwrap();
    assert_eq!(code, 255, "the session ended by the VM's stop");
    let transcript = String::from_utf8_lossy(&s.transcript()).into_owned();
    assert!(transcript.contains("max duration 6s"), "{transcript}");
    let stopped = wait_stopped(&fx);
    assert_eq!(stopped["stop_reason"], "max duration 6s", "{stopped}");
    ok(&fx, &["rm", "dev"]);
    fx.assert_nothing_left();
}
