//! Persistent-VM scenarios (`capsem create`, `shell NAME`, detach, crash
//! recovery, sweep, stop/start/rm), shared by the no-VM and real-VM suites.
//! Each drives the real `capsem` binary and ends by asserting that nothing
//! is left running and no VM state remains.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::fixture::{wait_until, Backend, Fixture};
use crate::pty::PtySession;
use crate::scenarios::{assert_no_frames, step, wait_ready};

/// Ctrl-]: the detach key.
pub const DETACH: &[u8] = b"\x1d";

/// `capsem <args>` to completion.
pub fn capsem(fx: &Fixture, args: &[&str]) -> Output {
    let mut cmd = fx.capsem();
    cmd.args(args).stdin(Stdio::null());
    cmd.output().expect("run capsem")
}

/// Asserts a refusal: exit 125, no stdout, and exactly one stderr line
/// that starts `capsem: ` and holds `needle`.
pub fn refused(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("capsem: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err}");
}

/// `capsem <args>`, which must succeed; its stdout.
pub fn ok(fx: &Fixture, args: &[&str]) -> String {
    let out = capsem(fx, args);
    assert!(
        out.status.success(),
        "capsem {args:?} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `capsem inspect NAME` as JSON.
pub fn inspect(fx: &Fixture, name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(fx, &["inspect", name])).expect("inspect JSON")
}

/// `capsem shell NAME` on a fresh PTY.
pub fn attach(fx: &Fixture, name: &str) -> PtySession {
    let mut cmd: Command = fx.capsem();
    cmd.args(["shell", name]);
    PtySession::spawn(cmd, 100, 30).expect("spawn capsem shell NAME")
}

/// The VM's directory.
pub fn vm_dir(fx: &Fixture, name: &str) -> PathBuf {
    fx.home().join("vms").join(name)
}

fn pids(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("pids.json")).expect("pids.json");
    serde_json::from_str(&text).expect("pids.json JSON")
}

/// capsem-process's pid, from pids.json.
pub fn process_pid(fx: &Fixture, name: &str) -> i32 {
    pids(&vm_dir(fx, name))["process"]["pid"]
        .as_i64()
        .expect("pid") as i32
}

/// The guest's host pids (the agent, or qemu and vhost-device-vsock).
pub fn guest_pids(fx: &Fixture, name: &str) -> Vec<i32> {
    pids(&vm_dir(fx, name))["guest"]
        .as_array()
        .expect("guest")
        .iter()
        .map(|g| g["pid"].as_i64().expect("pid") as i32)
        .collect()
}

/// The pid of the guest's host process with `role` (`qemu`,
/// `vhost-device-vsock`, `capsem-agent`), from pids.json.
pub fn guest_pid(fx: &Fixture, name: &str, role: &str) -> i32 {
    pids(&vm_dir(fx, name))["guest"]
        .as_array()
        .expect("guest")
        .iter()
        .find(|g| g["role"] == role)
        .and_then(|g| g["pid"].as_i64())
        .unwrap_or_else(|| panic!("no {role} in pids.json")) as i32
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Whether `pid` runs. A zombie does not count, but only once it is the
/// last of its threads: a killed leader turns zombie while its other threads
/// are still exiting, and those still hold the process's fds (a listening
/// socket answers until the last of them is gone).
pub fn running(pid: i32) -> bool {
    crate::procs::reap_zombies();
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        });
    let Some(state) = state else { return false };
    if !state.starts_with('Z') && !state.starts_with('X') {
        return true;
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    threads > 1
}

fn connects(fx: &Fixture, name: &str) -> u64 {
    inspect(fx, name)["agent_connects"]
        .as_u64()
        .expect("agent_connects")
}

/// create, shell, set a variable, detach with Ctrl-], reattach: the
/// scrollback is replayed and the variable is still set; a second attach
/// meanwhile is refused; exit ends that shell with its status and the next
/// attach gets a fresh one; stop and start keep the VM's identity; rm
/// removes everything.
pub fn lifecycle(backend: Backend) {
    let fx = Fixture::new("persist_lifecycle", backend);
    assert_eq!(ok(&fx, &["create", "dev"]).trim(), "dev");
    let created = inspect(&fx, "dev");
    assert_eq!(created["state"], "running");
    assert_eq!(created["temporary"], false);
    let dup = capsem(&fx, &["create", "dev"]);
    assert_eq!(dup.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let bad = capsem(&fx, &["create", "../evil"]);
    assert_eq!(bad.status.code(), Some(125));
    assert!(!fx.home().join("evil").exists());

    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, backend);
    s.line("export FOO=bar$((40+2)); echo SCROLL-$FOO").unwrap();
    s.expect("SCROLL-bar42", step(backend)).unwrap();
    s.expect_any(&["# ", "$ "], step(backend)).unwrap();

    // One attached client at a time, with a clear refusal.
    let second = capsem(&fx, &["shell", "dev"]);
    assert_eq!(second.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already attached"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    s.send(DETACH).unwrap();
    s.expect("detached from dev", step(backend)).unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);
    assert_no_frames(&s.transcript());
    assert_eq!(inspect(&fx, "dev")["state"], "running");

    let mut s = attach(&fx, "dev");
    // The replayed scrollback, before anything new is typed.
    s.expect("SCROLL-bar42", step(backend)).unwrap();
    s.line("echo STILL-$FOO").unwrap();
    s.expect("STILL-bar42", step(backend)).unwrap();
    s.line("exit 7").unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 7);
    let after_exit = inspect(&fx, "dev");
    assert_eq!(after_exit["state"], "running", "{after_exit}");
    assert_eq!(after_exit["last_shell_exit"]["exit_code"], 7);

    // A fresh shell: the variable is gone.
    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, backend);
    s.line("echo FRESH-${FOO-unset}").unwrap();
    s.expect("FRESH-unset", step(backend)).unwrap();
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);

    assert_eq!(ok(&fx, &["stop", "dev"]).trim(), "dev");
    let stopped = inspect(&fx, "dev");
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["created"], created["created"]);
    let list = ok(&fx, &["list", "--json"]);
    assert!(list.contains("\"stopped\""), "{list}");
    let refused = capsem(&fx, &["shell", "dev"]);
    assert_eq!(refused.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("capsem start"));

    assert_eq!(ok(&fx, &["start", "dev"]).trim(), "dev");
    let restarted = inspect(&fx, "dev");
    assert_eq!(restarted["state"], "running");
    assert_eq!(restarted["name"], "dev");
    assert_eq!(restarted["created"], created["created"]);
    assert_eq!(restarted["boots"], 2);
    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, backend);
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);

    let busy = capsem(&fx, &["rm", "dev"]);
    assert_eq!(busy.status.code(), Some(125));
    assert!(vm_dir(&fx, "dev").exists());
    ok(&fx, &["rm", "--force", "dev"]);
    assert!(!vm_dir(&fx, "dev").exists());
    let gone = capsem(&fx, &["inspect", "dev"]);
    assert_eq!(gone.status.code(), Some(125));
    fx.assert_nothing_left();
}

/// kill -9 of capsem-process with a shell attached: the CLI reports the
/// lost session (255); the next `capsem shell NAME` adopts the running
/// guest and finds the same shell; the agent connected exactly once more.
pub fn host_process_crash(backend: Backend) {
    let fx = Fixture::new("persist_crash", backend);
    ok(&fx, &["create", "dev"]);
    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, backend);
    s.line("KEEP=kept$((5*5))").unwrap();
    s.line("echo SET-$KEEP").unwrap();
    s.expect("SET-kept25", step(backend)).unwrap();
    let before = connects(&fx, "dev");
    let guest = guest_pids(&fx, "dev");

    kill9(process_pid(&fx, "dev"));
    assert_eq!(s.wait_code(step(backend)).unwrap(), 255);
    assert!(String::from_utf8_lossy(&s.transcript()).contains("session lost"));
    for pid in &guest {
        assert!(running(*pid), "guest pid {pid} died with capsem-process");
    }
    let listed = ok(&fx, &["list"]);
    assert!(listed.contains("orphaned"), "{listed}");

    let mut s = attach(&fx, "dev");
    s.line("echo BACK-$KEEP").unwrap();
    s.expect("BACK-kept25", step(backend)).unwrap();
    let after = inspect(&fx, "dev");
    assert_eq!(
        after["agent_connects"].as_u64(),
        Some(before + 1),
        "the agent reconnected more than once: {after}"
    );
    assert_eq!(after["adoptions"], 1);
    assert_eq!(guest_pids(&fx, "dev"), guest, "the same guest processes");
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

/// kill -9 of the guest: capsem-process notices, tears down, and the VM is
/// stopped; kill -9 of everything: the next command reports and sweeps.
/// Nothing is left running either way.
pub fn guest_and_everything_killed(backend: Backend) {
    let fx = Fixture::new("persist_killed", backend);
    ok(&fx, &["create", "dev"]);
    let process = process_pid(&fx, "dev");
    for pid in guest_pids(&fx, "dev") {
        kill9(pid);
    }
    wait_until(step(backend), "capsem-process to stop", || {
        !running(process)
    });
    assert_eq!(inspect(&fx, "dev")["state"], "stopped");
    assert!(!vm_dir(&fx, "dev").join("pids.json").exists());

    ok(&fx, &["start", "dev"]);
    let all: Vec<i32> = std::iter::once(process_pid(&fx, "dev"))
        .chain(guest_pids(&fx, "dev"))
        .collect();
    for pid in &all {
        kill9(*pid);
    }
    wait_until(step(backend), "every VM process to die", || {
        all.iter().all(|p| !running(*p))
    });
    let out = capsem(&fx, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stopped unexpectedly"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert!(!vm_dir(&fx, "dev").join("pids.json").exists());
    ok(&fx, &["rm", "dev"]);
    fx.assert_nothing_left();
}

/// A temporary VM whose CLI and capsem-process were both killed is swept by
/// the next capsem command: its guest is killed and its directory removed.
pub fn orphaned_temporary_vm_is_swept(backend: Backend) {
    let fx = Fixture::new("persist_sweep_temp", backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    let dir = fx.wait_vm(step(backend));
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let guest = guest_pids(&fx, &name);
    let process = process_pid(&fx, &name);
    // The CLI first: capsem-process must not see its client leave first.
    kill9(s.pid() as i32);
    kill9(process);
    wait_until(step(backend), "the CLI and capsem-process to die", || {
        !running(process) && !running(s.pid() as i32)
    });
    assert!(guest.iter().any(|p| running(*p)), "nothing to sweep");
    let out = capsem(&fx, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("swept temporary VM"), "{err}");
    wait_until(step(backend), "the swept guest to die", || {
        guest.iter().all(|p| !running(*p))
    });
    assert!(!dir.exists());
    drop(s);
    fx.assert_nothing_left();
}

/// A pids.json that names an unrelated live process (a recycled pid) is
/// never signalled: not by stop, rm --force or the sweep.
pub fn recycled_pid_is_never_signalled(backend: Backend) {
    let fx = Fixture::new("persist_pid_reuse", backend);
    ok(&fx, &["create", "dev"]);
    ok(&fx, &["stop", "dev"]);
    let mut bystander = Command::new("sleep")
        .arg("1000")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep");
    let pid = bystander.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start: u64 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let dir = vm_dir(&fx, "dev");
    // The right pid and start time but not the VM's argv element, as
    // capsem-process and as the guest: a pid reused by another program.
    let fake = serde_json::json!({
        "process": {"role": "capsem-process", "pid": pid, "start_time": start, "marker": "dev"},
        "guest": [{"role": "capsem-agent", "pid": pid, "start_time": start + 1, "marker": "sleep"}],
        "cid": null
    });
    std::fs::write(dir.join("pids.json"), fake.to_string()).unwrap();
    assert_eq!(inspect(&fx, "dev")["state"], "stopped");
    let _ = capsem(&fx, &["stop", "dev"]);
    let _ = capsem(&fx, &["rm", "--force", "dev"]);
    let _ = capsem(&fx, &["list"]);
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "an unrelated process was signalled"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    let _ = capsem(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

/// Two `capsem start` at once on one stopped VM boot it once: the lock
/// serializes them, and the second finds it running.
pub fn concurrent_starts_boot_once(backend: Backend) {
    let fx = Fixture::new("persist_lock", backend);
    ok(&fx, &["create", "dev"]);
    ok(&fx, &["stop", "dev"]);
    let spawn = || {
        let mut cmd = fx.capsem();
        cmd.args(["start", "dev"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.spawn().expect("capsem start")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let codes = [a.status.code(), b.status.code()];
    assert!(codes.contains(&Some(0)), "{codes:?}");
    let state = inspect(&fx, "dev");
    assert_eq!(state["state"], "running");
    assert_eq!(state["boots"], 2, "booted more than once: {state}");
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

/// `capsem exec NAME ...` with stdin.
pub fn exec(fx: &Fixture, name: &str, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut cmd = fx.capsem();
    cmd.args(["exec", name])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("capsem exec");
    let mut input = child.stdin.take().expect("stdin");
    // Written from a thread while the output is read: a command that echoes
    // its input (`cat`) fills the pipes once the input is larger than what
    // the path buffers, and writing it all first would then never finish.
    let stdin = stdin.to_vec();
    let writer = std::thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || {
            // The command may exit without reading all of it (EPIPE).
            let _ = input.write_all(&stdin);
        })
        .expect("stdin writer thread");
    let out = child.wait_with_output().expect("capsem exec output");
    writer.join().expect("stdin writer");
    out
}

/// `capsem exec` on a persistent VM: separate byte-exact streams, stdin
/// with its EOF, exit codes 0/5/124/126/127/137, a timeout that kills the
/// command's background grandchildren, 20 concurrent commands with their
/// own outputs, a refused environment variable; the shell is unaffected.
pub fn exec_on_a_persistent_vm(backend: Backend) {
    let fx = Fixture::new("persist_exec", backend);
    ok(&fx, &["create", "dev"]);
    let out = exec(
        &fx,
        "dev",
        &["--", "sh", "-c", "echo out; echo err >&2; exit 5"],
        b"",
    );
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let out = exec(
        &fx,
        "dev",
        &["--", "sh", "-c", "printf '\\000\\001\\377'"],
        b"",
    );
    assert_eq!(out.stdout, [0u8, 1, 255]);
    assert_eq!(out.status.code(), Some(0));
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    // -t: one stream from a PTY, stdin's EOF as Ctrl-D.
    let out = exec(
        &fx,
        "dev",
        &[
            "-t",
            "--",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo on-a-tty; echo err >&2; exit 4",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "on-a-tty\r\nerr\r\n");
    assert!(out.stderr.is_empty());
    // A command that closes its terminal before it exits is not hung up.
    let out = exec(
        &fx,
        "dev",
        &[
            "-t",
            "--",
            "sh",
            "-c",
            "exec 0<&- 1>&- 2>&-; sleep 0.3; exit 5",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(5));
    let out = exec(&fx, "dev", &["-t", "--", "cat"], b"typed\n");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "typed\r\ntyped\r\n");
    let out = exec(&fx, "dev", &["--", "cat"], &input);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == input, "stdin did not round-trip");
    let out = exec(&fx, "dev", &["--", "sh", "-c", "kill -9 $$"], b"");
    assert_eq!(out.status.code(), Some(137));
    let out = exec(&fx, "dev", &["--", "no-such-program"], b"");
    assert_eq!(out.status.code(), Some(127));
    let out = exec(
        &fx,
        "dev",
        &["--", "sh", "-c", "echo x > nx; chmod -x nx"],
        b"",
    );
    assert_eq!(out.status.code(), Some(0));
    let out = exec(&fx, "dev", &["--", "./nx"], b"");
    assert_eq!(out.status.code(), Some(126));
    let out = exec(&fx, "dev", &["-e", "LD_PRELOAD=/x.so", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));

    let out = exec(
        &fx,
        "dev",
        &[
            "--timeout",
            "1",
            "--",
            "sh",
            "-c",
            "sleep 1001 & sleep 1001 & sleep 1001; echo unreachable",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(124));
    assert!(out.stdout.is_empty());
    let count = "n=0; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^sleep 1001' && n=$((n+1)); done; echo left=$n";
    let out = exec(&fx, "dev", &["--", "sh", "-c", count], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "left=0");

    // A barrier in the guest: each command arrives, then waits until all 20
    // have (bounded at 60 s, then exit 99), so the commands must overlap.
    let children: Vec<_> = (0..20)
        .map(|i| {
            let mut cmd = fx.capsem();
            cmd.args(["exec", "dev", "--", "sh", "-c"])
                .arg(format!(
                    "i={i}; echo start-$i; {}; echo end-$i; exit $i",
                    barrier("barrier.d", 20)
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().expect("capsem exec")
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(i as i32), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("start-{i}\nend-{i}\n")
        );
    }

    ok(&fx, &["exec", "dev", "--", "rm", "-r", "barrier.d"]);

    // The shell is still there, untouched by the commands.
    let mut s = attach(&fx, "dev");
    wait_ready(&mut s, backend);
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(backend)).unwrap(), 0);
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

/// Shell text for a barrier of `n` parties in directory `dir`: this party
/// arrives (a file named after `$$`), then waits until `n` have, polling
/// every 50 ms for at most 60 s, after which it exits 99: commands that ran
/// one by one never pass it.
pub fn barrier(dir: &str, n: usize) -> String {
    format!(
        "mkdir -p {dir} && : > {dir}/$$ && t=0 && \
         while set -- {dir}/*; [ $# -lt {n} ]; do \
           t=$((t+1)); [ $t -le 1200 ] || exit 99; sleep 0.05; done"
    )
}
