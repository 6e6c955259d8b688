//! Guest containment in real VMs under QEMU: the shell and every exec run in
//! their own cgroup with a pids and a memory limit, so a fork bomb or a
//! memory hog is killed inside the guest and the agent and the VM live on.
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out.
#![allow(clippy::unwrap_used)]

use capsem_tests::persist::{attach, exec, ok};
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;

/// The cgroups under the agent's parent, as one exec sees them (its own
/// `exec-N` is among them).
fn cgroups(fx: &Fixture) -> Vec<String> {
    let out = exec(
        fx,
        "dev",
        &["--", "sh", "-c", "ls /sys/fs/cgroup/capsem | grep -- -"],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn assert_alive(fx: &Fixture) {
    let out = exec(fx, "dev", &["--", "echo", "alive"], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"alive\n");
}

/// init and the agent are exempt from the OOM killer, a command is not, and
/// each runs in its own limited cgroup.
#[test]
fn commands_run_in_a_limited_cgroup_and_the_agent_is_oom_exempt() {
    let fx = Fixture::new("contain_limits", B);
    ok(&fx, &["create", "dev"]);
    let script = "cat /proc/1/oom_score_adj /proc/$PPID/oom_score_adj /proc/self/oom_score_adj; \
                  d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); echo $d; \
                  cat $d/pids.max $d/memory.oom.group";
    let out = exec(&fx, "dev", &["--", "sh", "-c", script], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["-1000", "-1000", "0"], "{text}");
    assert!(
        lines[3].starts_with("/sys/fs/cgroup/capsem/exec-"),
        "{text}"
    );
    let pids_max: u64 = lines[4].parse().unwrap();
    assert!((256..=4096).contains(&pids_max), "{text}");
    assert_eq!(lines[5], "1", "{text}");
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

/// A fork bomb in a persistent VM's shell: the shell's cgroup is killed at
/// its pids limit, the session ends with a status and one line saying why,
/// the next attach gets a fresh shell, execs keep working and no cgroup is
/// left behind but the fresh shell's.
#[test]
fn fork_bomb_in_the_shell_is_contained() {
    let fx = Fixture::new("contain_forkbomb", B);
    ok(&fx, &["create", "dev"]);
    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, B);
    s.line(":(){ :|:& };:").unwrap();
    s.expect("reached the guest's process limit", step(B))
        .unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 137, "SIGKILL's status");

    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, B);
    s.send(capsem_tests::persist::DETACH).unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    assert_alive(&fx);
    let left = cgroups(&fx);
    assert_eq!(
        left.iter().filter(|c| c.starts_with("shell-")).count(),
        1,
        "{left:?}"
    );
    assert_eq!(
        left.iter().filter(|c| c.starts_with("exec-")).count(),
        1,
        "{left:?}"
    );
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

/// A fork bomb in a temporary shell: the VM ends with the killed shell's
/// status, after the one line saying why.
#[test]
fn fork_bomb_in_a_temporary_shell_ends_it_with_a_reason() {
    let fx = Fixture::new("contain_tmp_forkbomb", B);
    let mut s = fx.shell(100, 30);
    wait_ready(&mut s, B);
    s.line(":(){ :|:& };:").unwrap();
    s.expect("reached the guest's process limit", step(B))
        .unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 137, "SIGKILL's status");
    assert!(
        fx.vm_dirs().is_empty(),
        "the temporary VM's directory is gone"
    );
    fx.assert_nothing_left();
}

/// `tail /dev/zero` grows until its cgroup's memory limit: the kernel kills
/// it inside the guest, the exec reports the signal and why, and the agent
/// serves the next exec.
#[test]
fn memory_hog_exec_is_killed_and_the_agent_survives() {
    let fx = Fixture::new("contain_memhog", B);
    ok(&fx, &["create", "dev"]);
    let out = exec(&fx, "dev", &["--", "tail", "/dev/zero"], b"");
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ran out of memory"), "{err}");
    assert_alive(&fx);
    let left = cgroups(&fx);
    assert_eq!(
        left.iter().filter(|c| c.starts_with("exec-")).count(),
        1,
        "{left:?}"
    );
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}
