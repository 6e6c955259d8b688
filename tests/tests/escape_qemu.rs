//! The ssh-style escape in a real VM: with QEMU stopped by SIGSTOP the guest
//! is wedged entirely (no vCPU runs, no vsock byte moves), and `~.` typed at
//! the start of a line still destroys the temporary VM: exit 255, one line
//! saying so, and nothing left (QEMU, vhost-device-vsock, capsem-process,
//! the VM directory). `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves it out.
#![allow(clippy::unwrap_used)]

use capsem_tests::scenarios::{assert_no_frames, step, wait_ready};
use capsem_tests::{Backend, Fixture};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const B: Backend = Backend::Qemu;

/// The guest's host pid whose command line is QEMU's, from pids.json.
fn qemu_pid(fx: &Fixture) -> i32 {
    let vm = fx.wait_vm(step(B));
    let text = std::fs::read_to_string(vm.join("pids.json")).unwrap();
    let pids: serde_json::Value = serde_json::from_str(&text).unwrap();
    let guests: Vec<i32> = pids["guest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["pid"].as_i64().unwrap() as i32)
        .collect();
    let qemu: Vec<i32> = guests
        .iter()
        .copied()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
        })
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU among {guests:?}");
    qemu[0]
}

#[test]
fn vm_tilde_dot_destroys_a_vm_whose_qemu_is_stopped() {
    let fx = Fixture::new("escape_stopped_qemu", B);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, B);
    let qemu = qemu_pid(&fx);
    kill(Pid::from_raw(qemu), Signal::SIGSTOP).unwrap();
    s.send("echo never\r~.").unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 255);
    let out = String::from_utf8_lossy(&s.transcript()).into_owned();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("~. typed: destroyed temporary VM"))
        .collect();
    assert_eq!(lines.len(), 1, "one line expected: {out:?}");
    assert!(lines[0].trim_start().starts_with("capsem: "), "{lines:?}");
    assert!(!out.contains("session lost"), "{out:?}");
    assert_no_frames(out.as_bytes());
    drop(s);
    fx.assert_nothing_left();
}
