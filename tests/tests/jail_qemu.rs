//! The host jail of a real VM under QEMU: run as root, QEMU and
//! vhost-device-vsock run as the VM's own non-zero uid with no capabilities
//! and `no_new_privs`, QEMU under its seccomp sandbox (`Seccomp: 2`); the
//! VM's own files stay root's; the shell and exec work; and the scheme
//! survives stop/start and an adoption after capsem-process is SIGKILLed
//! (which leases the guest's CID and its uid again).
//! Run as a normal user, the daemons keep that user's uid.
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;

use capsem_tests::fixture::wait_until;
use capsem_tests::persist::{self, ok, DETACH};
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;
/// capsem-process's `vmm::jail::UID_BASE`: the first uid of a VM.
const UID_BASE: u32 = 0x7000_0000;

/// `Key:` fields of `/proc/PID/status`.
fn status_field(pid: i32, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The guest's daemons, `(role, pid)`, from pids.json.
fn daemons(fx: &Fixture, name: &str) -> Vec<(String, i32)> {
    let dir = persist::vm_dir(fx, name);
    let pids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pids.json")).unwrap()).unwrap();
    pids["guest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["role"].as_str().unwrap().to_owned(),
                g["pid"].as_i64().unwrap() as i32,
            )
        })
        .collect()
}

/// Checks both daemons' identity and filters; returns their uid.
fn assert_jailed(fx: &Fixture, name: &str) -> u32 {
    let euid = nix::unistd::geteuid().as_raw();
    let list = daemons(fx, name);
    let roles: Vec<&str> = list.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["qemu", "vhost-device-vsock"], "{list:?}");
    let mut uids = Vec::new();
    for (role, pid) in &list {
        let uid = status_field(*pid, "Uid:");
        assert!(uid.iter().all(|u| *u == uid[0]), "{role}: uids {uid:?}");
        assert_eq!(status_field(*pid, "Gid:")[0], uid[0], "{role}: gid");
        let uid: u32 = uid[0].parse().unwrap();
        if euid == 0 {
            assert!(uid >= UID_BASE, "{role} runs as uid {uid}, not a VM uid");
            for cap in ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
                assert_eq!(
                    status_field(*pid, cap),
                    ["0000000000000000"],
                    "{role} {cap}"
                );
            }
        } else {
            assert_eq!(uid, euid, "{role} should keep the caller's uid");
        }
        assert_eq!(status_field(*pid, "NoNewPrivs:"), ["1"], "{role}");
        if role == "qemu" {
            assert_eq!(status_field(*pid, "Seccomp:"), ["2"], "qemu has no filter");
        }
        uids.push(uid);
    }
    assert_eq!(uids[0], uids[1], "the two daemons of one VM share its uid");
    // What the VM's uid must not own: capsem-process's records and logs,
    // and the disk (QEMU got it as an open fd).
    let dir = persist::vm_dir(fx, name);
    for file in ["pids.json", "token", "process.log", "disk.img", "ctl.sock"] {
        let meta = std::fs::symlink_metadata(dir.join(file)).unwrap();
        assert_eq!(meta.uid(), euid, "{file} is not ours");
        assert_eq!(meta.mode() & 0o077, 0, "{file} is reachable by others");
    }
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
    uids[0]
}

/// The guest CID of the VM's vhost-device-vsock and, as root, its uid are
/// leased (their locks are held), so no other VM can take them.
fn assert_cid_leased(fx: &Fixture, name: &str) {
    let (_, vhost) = daemons(fx, name)
        .into_iter()
        .find(|(role, _)| role == "vhost-device-vsock")
        .unwrap();
    let argv = std::fs::read(format!("/proc/{vhost}/cmdline")).unwrap();
    let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
    let at = argv.iter().position(|a| *a == b"--guest-cid").unwrap();
    let cid = std::str::from_utf8(argv[at + 1]).unwrap();
    let lock = std::fs::File::open(fx.home().join(format!("run/cid-{cid}.lock"))).unwrap();
    let taken = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock);
    assert!(taken.is_err(), "guest CID {cid} is free while its VM runs");
    if nix::unistd::geteuid().is_root() {
        // The uid's host-wide lease (capsem-process's `vmm::jail::UID_LOCK_DIR`).
        let uid: u32 = status_field(vhost, "Uid:")[0].parse().unwrap();
        let path = format!("/run/capsem/vm-uids/uid-{}.lock", uid - UID_BASE);
        let lock = std::fs::File::open(&path).unwrap();
        let taken = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(taken.is_err(), "{path} is free while its VM runs");
    }
}

fn exec_echo(fx: &Fixture, name: &str, word: &str) {
    let out = persist::exec(fx, name, &["echo", word], b"");
    assert!(out.status.success(), "exec failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), word);
}

#[test]
fn daemons_are_unprivileged_and_sandboxed_across_stop_start_and_adoption() {
    let fx = Fixture::new("jail", B);
    ok(&fx, &["create", "jail"]);
    let uid = assert_jailed(&fx, "jail");
    assert_cid_leased(&fx, "jail");

    let mut s = persist::attach(&fx, "jail");
    wait_ready(&mut s, B);
    s.line("echo JAILED-$((6*7)) > /root/mark; cat /root/mark")
        .unwrap();
    s.expect("JAILED-42", step(B)).unwrap();
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    exec_echo(&fx, "jail", "exec-works");

    ok(&fx, &["stop", "jail"]);
    ok(&fx, &["start", "jail"]);
    assert_jailed(&fx, "jail");
    let out = persist::exec(&fx, "jail", &["cat", "/root/mark"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "JAILED-42");

    // A crash of capsem-process: the next command adopts the daemons,
    // which keep their uid and reach the new listeners.
    let guest = persist::guest_pids(&fx, "jail");
    let process = persist::process_pid(&fx, "jail");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(process),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // kill(2) returns before the process is gone: a command sent meanwhile
    // would reach the dying process instead of adopting.
    wait_until(step(B), "capsem-process to die", || {
        !persist::running(process)
    });
    exec_echo(&fx, "jail", "adopted");
    assert_eq!(persist::guest_pids(&fx, "jail"), guest, "not adopted");
    assert_cid_leased(&fx, "jail");
    let after = assert_jailed(&fx, "jail");
    if nix::unistd::geteuid().is_root() {
        assert!(after >= UID_BASE && uid >= UID_BASE);
    }

    ok(&fx, &["rm", "--force", "jail"]);
    fx.assert_nothing_left();
}

#[test]
fn a_temporary_vm_runs_jailed_and_leaves_nothing() {
    let fx = Fixture::new("jail_tmp", B);
    let out = fx
        .capsem()
        .args(["run", "--", "sh", "-c", "echo ran-$((2*21))"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ran-42");
    let log = fx.kept_logs();
    let process = log.get("process.log").cloned().unwrap_or_default();
    let expect = if nix::unistd::geteuid().is_root() {
        " uid=18790"
    } else {
        " uid=caller"
    };
    assert!(process.contains(expect), "{process}");
    fx.assert_nothing_left();
}
