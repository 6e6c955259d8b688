//! `capsem shell` against a fake capsem-process.
//!
//! The fake is this test binary itself: `$CAPSEM_PROCESS_BIN` points to a tiny
//! shell script that re-executes the binary with `--exact fake_process_entry`
//! and the CLI's arguments in `$FAKE_ARGV`. The fake then plays a scenario
//! named by `$FAKE_SCENARIO`: it binds `<vm-dir>/ctl.sock`, writes the ready
//! line, speaks `Codec::<Process>`, and records what it saw in
//! `$FAKE_REPORT/` (which outlives the VM directory).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsem_proto::frame::Process;
use capsem_proto::ipc::{ClientToProcess, ProcessToClient, MAX_IPC_CHUNK};
use capsem_proto::Codec;

const DEADLINE: Duration = Duration::from_secs(30);
const WARNING: &str = "capsem: warning: --vmm none runs the shell on this host with no isolation";

// ---------------------------------------------------------------- the fake

/// Entry point of the fake capsem-process; a no-op in a normal test run.
#[test]
fn fake_process_entry() {
    let (Some(scenario), Some(report)) = (
        std::env::var_os("FAKE_SCENARIO"),
        std::env::var_os("FAKE_REPORT"),
    ) else {
        return;
    };
    let report = PathBuf::from(report);
    let code = match fake_main(&scenario.to_string_lossy(), &report) {
        Ok(code) => code,
        Err(e) => {
            let _ = fs::write(report.join("fake-error"), format!("{e:?}"));
            70
        }
    };
    #[allow(clippy::exit)]
    std::process::exit(code);
}

fn send(conn: &mut UnixStream, msg: &ProcessToClient) -> std::io::Result<()> {
    conn.write_all(&Codec::<Process>::encode(msg).expect("encode"))
}

fn recv(
    conn: &mut UnixStream,
    codec: &mut Codec<Process>,
) -> anyhow::Result<Option<ClientToProcess>> {
    let mut buf = [0u8; 65536];
    loop {
        if let Some(msg) = codec.next_message()? {
            return Ok(Some(msg));
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        codec.feed(&buf[..n])?;
    }
}

fn fake_main(scenario: &str, report: &Path) -> anyhow::Result<i32> {
    let argv: Vec<String> = std::env::var("FAKE_ARGV")?
        .lines()
        .map(str::to_owned)
        .collect();
    let after = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no {flag}"))
    };
    let vm_dir = PathBuf::from(after("--vm-dir")?);
    let vm_id = after("--vm-id")?;
    let ready_fd: i32 = after("--ready-fd")?.parse()?;
    fs::write(report.join("argv"), argv.join("\n"))?;
    fs::write(report.join("pid"), std::process::id().to_string())?;
    // SAFETY: the CLI passed us this fd, open and ours alone.
    let mut ready = unsafe { fs::File::from_raw_fd(ready_fd) };
    match scenario {
        "ready_error" => {
            fs::write(vm_dir.join("process.log"), "fake log\n")?;
            ready.write_all(b"error: the qemu backend is not available yet\n")?;
            return Ok(1);
        }
        "ready_eof" => return Ok(3),
        _ => {}
    }
    let listener = UnixListener::bind(vm_dir.join("ctl.sock"))?;
    ready.write_all(b"ready\n")?;
    drop(ready);
    let (mut conn, _) = listener.accept()?;
    let mut codec = Codec::<Process>::new();
    let first = recv(&mut conn, &mut codec)?;
    fs::write(report.join("attach"), format!("{first:?}"))?;
    send(&mut conn, &ProcessToClient::Attached { vm_id })?;
    match scenario {
        "exit7" => {
            send(
                &mut conn,
                &ProcessToClient::Output {
                    data: b"hello from fake\r\n".to_vec(),
                },
            )?;
            let mut input = Vec::new();
            while !input.contains(&0x04) {
                match recv(&mut conn, &mut codec)? {
                    Some(ClientToProcess::Input { data }) => input.extend_from_slice(&data),
                    Some(_) => {}
                    None => break,
                }
            }
            fs::write(report.join("input"), &input)?;
            send(
                &mut conn,
                &ProcessToClient::ShellExited {
                    exit_code: Some(7),
                    signal: None,
                },
            )?;
        }
        "signal9" => send(
            &mut conn,
            &ProcessToClient::ShellExited {
                exit_code: None,
                signal: Some(9),
            },
        )?,
        "lost" => send(
            &mut conn,
            &ProcessToClient::SessionLost {
                reason: "agent died".into(),
            },
        )?,
        "eof" => {}
        "big" => {
            for i in 0..big_chunks() {
                send(
                    &mut conn,
                    &ProcessToClient::Output {
                        data: vec![b'a' + (i % 26) as u8; MAX_IPC_CHUNK],
                    },
                )?;
            }
            send(
                &mut conn,
                &ProcessToClient::ShellExited {
                    exit_code: Some(0),
                    signal: None,
                },
            )?;
        }
        "hang" => {
            // A descendant in our process group, and a leader that never
            // exits: the CLI must kill the whole group.
            let sleeper = Command::new("sleep").arg("1000").spawn()?;
            fs::write(report.join("grandchild"), sleeper.id().to_string())?;
            send(
                &mut conn,
                &ProcessToClient::ShellExited {
                    exit_code: Some(7),
                    signal: None,
                },
            )?;
            loop {
                std::thread::park();
            }
        }
        "shutdown" => {
            fs::write(report.join("attached"), "")?;
            let mut log = fs::File::create(report.join("messages"))?;
            loop {
                let msg = recv(&mut conn, &mut codec)?;
                writeln!(log, "{msg:?}")?;
                match msg {
                    Some(ClientToProcess::Shutdown) => {
                        fs::write(report.join("shutdown"), "")?;
                        break;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
        other => anyhow::bail!("unknown scenario {other}"),
    }
    Ok(0)
}

fn big_chunks() -> usize {
    24
}

// ---------------------------------------------------------------- harness

/// Polls `cond` until it holds or `deadline` passes.
fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/proc/<pid>` is gone, or only a zombie remains.
fn dead(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

struct TestEnv {
    dir: tempfile::TempDir,
    /// Process-group leaders to kill if a test fails midway.
    fake_pid: Option<u32>,
}

impl TestEnv {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("home")).expect("home");
        fs::create_dir(dir.path().join("report")).expect("report");
        let exe = std::env::current_exe().expect("current_exe");
        let script = dir.path().join("fake-capsem-process");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nFAKE_ARGV=$(printf '%s\\n' \"$@\")\nexport FAKE_ARGV\n\
                 exec '{}' --exact fake_process_entry --nocapture --test-threads=1 -q\n",
                exe.display()
            ),
        )
        .expect("script");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
        Self {
            dir,
            fake_pid: None,
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn report(&self, name: &str) -> PathBuf {
        self.dir.path().join("report").join(name)
    }

    fn command(&self, scenario: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsem"));
        cmd.arg("--home")
            .arg(self.home())
            .args(args)
            .env(
                "CAPSEM_PROCESS_BIN",
                self.dir.path().join("fake-capsem-process"),
            )
            .env("FAKE_SCENARIO", scenario)
            .env("FAKE_REPORT", self.dir.path().join("report"))
            .env_remove("CAPSEM_VMM")
            .env_remove("CAPSEM_HOME")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn fake_pid(&mut self) -> Option<u32> {
        if self.fake_pid.is_none() {
            self.fake_pid = fs::read_to_string(self.report("pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
        }
        self.fake_pid
    }

    /// Runs `capsem` to completion with `input` on stdin.
    fn run(&mut self, scenario: &str, args: &[&str], input: &[u8]) -> Outcome {
        let mut cli = CliGuard::spawn(self.command(scenario, args));
        let mut stdin = cli.child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        let out = cli.finish(DEADLINE);
        self.fake_pid();
        out
    }

    /// The VM directories left under `<home>/vms/`.
    fn vm_dirs(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.home().join("vms")) {
            Ok(rd) => rd.map(|e| e.expect("entry").path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The CLI has returned: nothing of the VM may remain.
    fn assert_torn_down(&mut self) {
        assert_eq!(self.vm_dirs(), Vec::<PathBuf>::new(), "VM dir left behind");
        let pid = self.fake_pid().expect("the fake recorded its pid");
        assert!(dead(pid), "fake capsem-process {pid} still running");
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Kill the fake's group if a failed test left it behind; it is ours
        // only while its command line still names the fake.
        if let Some(pid) = self.fake_pid() {
            let ours = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("fake_process_entry"))
                .unwrap_or(false);
            if ours {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
        }
    }
}

struct Outcome {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

/// The `capsem` child; killed and reaped on drop.
struct CliGuard {
    child: Child,
    readers: Vec<JoinHandle<Vec<u8>>>,
}

impl CliGuard {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("spawn capsem");
        let mut readers = Vec::new();
        let mut out = child.stdout.take().expect("stdout");
        readers.push(std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        }));
        let mut err = child.stderr.take().expect("stderr");
        readers.push(std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        }));
        Self { child, readers }
    }

    fn spawn_no_pipes(mut cmd: Command) -> Self {
        Self {
            child: cmd.spawn().expect("spawn capsem"),
            readers: Vec::new(),
        }
    }

    fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let mut status = None;
        let exited = wait_until(deadline, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(exited, "capsem did not exit within {deadline:?}");
        status.expect("status")
    }

    fn finish(&mut self, deadline: Duration) -> Outcome {
        let status = self.wait(deadline);
        let mut readers = std::mem::take(&mut self.readers).into_iter();
        let stdout = readers.next().expect("r").join().expect("join");
        let stderr = readers.next().expect("r").join().expect("join");
        Outcome {
            status,
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

impl Drop for CliGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn shell_exit_code_output_and_input() {
    let mut env = TestEnv::new();
    let out = env.run("exit7", &["shell"], b"echo hi\n");
    assert_eq!(out.stderr, "", "stderr");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from fake\r\n");
    // stdin bytes, then one Ctrl-D for the EOF of a non-terminal stdin.
    assert_eq!(
        fs::read(env.report("input")).expect("input"),
        b"echo hi\n\x04"
    );
    assert_eq!(
        fs::read_to_string(env.report("attach")).expect("attach"),
        "Some(Attach { cols: 80, rows: 24 })"
    );
    let argv = fs::read_to_string(env.report("argv")).expect("argv");
    let argv: Vec<&str> = argv.lines().collect();
    assert_eq!(argv[0], "--vm-dir");
    assert!(argv[1].starts_with(&env.home().join("vms").join("tmp-").display().to_string()));
    assert_eq!(argv[2], "--vm-id");
    assert!(
        argv[3].len() == 20 && argv[1].ends_with(argv[3]),
        "{argv:?}"
    );
    assert_eq!(&argv[4..7], ["--vmm", "qemu", "--ready-fd"]);
    assert_eq!(argv[8], "--temporary");
    env.assert_torn_down();
}

#[test]
fn vmm_none_warns_once_and_is_passed_on() {
    let mut env = TestEnv::new();
    let out = env.run("exit7", &["--vmm", "none", "shell"], b"");
    assert_eq!(out.stderr, format!("{WARNING}\n"));
    assert_eq!(out.status.code(), Some(7));
    let argv = fs::read_to_string(env.report("argv")).expect("argv");
    assert!(argv.contains("--vmm\nnone\n"), "{argv}");
    env.assert_torn_down();
}

#[test]
fn killed_shell_exits_128_plus_signal() {
    let mut env = TestEnv::new();
    let out = env.run("signal9", &["shell"], b"");
    assert_eq!(out.stderr, "");
    assert_eq!(out.status.code(), Some(137));
    env.assert_torn_down();
}

#[test]
fn session_lost_exits_255() {
    let mut env = TestEnv::new();
    let out = env.run("lost", &["shell"], b"");
    assert_eq!(out.stderr, "capsem: session lost: agent died\n");
    assert_eq!(out.status.code(), Some(255));
    env.assert_torn_down();
}

#[test]
fn ctl_eof_without_status_exits_255() {
    let mut env = TestEnv::new();
    let out = env.run("eof", &["shell"], b"");
    assert_eq!(
        out.stderr,
        "capsem: session lost: capsem-process closed the connection\n"
    );
    assert_eq!(out.status.code(), Some(255));
    env.assert_torn_down();
}

#[test]
fn ready_error_exits_125_with_one_line_and_keeps_the_log() {
    let mut env = TestEnv::new();
    let out = env.run("ready_error", &["shell"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    let prefix = "capsem: the qemu backend is not available yet (see ";
    assert!(out.stderr.starts_with(prefix), "{}", out.stderr);
    let log = out.stderr[prefix.len()..].trim_end().trim_end_matches(')');
    assert_eq!(fs::read_to_string(log).expect("kept log"), "fake log\n");
    env.assert_torn_down();
}

#[test]
fn ready_eof_exits_125() {
    let mut env = TestEnv::new();
    let out = env.run("ready_eof", &["shell"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        out.stderr,
        "capsem: capsem-process exited before it was ready\n"
    );
    env.assert_torn_down();
}

#[test]
fn all_output_arrives_before_the_exit_status() {
    let mut env = TestEnv::new();
    let out = env.run("big", &["shell"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.len(), big_chunks() * MAX_IPC_CHUNK);
    for (i, chunk) in out.stdout.chunks(MAX_IPC_CHUNK).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == b'a' + (i % 26) as u8),
            "chunk {i}"
        );
    }
    env.assert_torn_down();
}

#[test]
fn a_hung_process_group_is_killed_and_reaped() {
    let mut env = TestEnv::new();
    let started = Instant::now();
    let out = env.run("hang", &["shell"], b"");
    assert_eq!(out.status.code(), Some(7));
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "grace period honoured"
    );
    assert_eq!(
        out.stderr,
        "capsem: capsem-process did not exit within 5s; killed it\n"
    );
    env.assert_torn_down();
    let grandchild: u32 = fs::read_to_string(env.report("grandchild"))
        .expect("grandchild")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        wait_until(DEADLINE, || dead(grandchild)),
        "the fake's descendant survived"
    );
}

#[test]
fn sigterm_sends_shutdown_and_exits_143() {
    let mut env = TestEnv::new();
    let mut cli = CliGuard::spawn(env.command("shutdown", &["shell"]));
    let mut stdin = cli.child.stdin.take().expect("stdin");
    // Input is forwarded only from the attached session's loop: once the
    // fake logged it, the CLI is past the attach (the fake's `attached`
    // file is written before the CLI has read the confirmation).
    stdin.write_all(b"x").expect("write stdin");
    assert!(
        wait_until(DEADLINE, || fs::read_to_string(env.report("messages"))
            .is_ok_and(|m| m.contains("Some(Input { data: [120] })"))),
        "the session never forwarded input"
    );
    // SAFETY: kill has no memory-safety preconditions; the pid is our
    // unreaped child.
    unsafe { libc::kill(cli.child.id() as i32, libc::SIGTERM) };
    let out = cli.finish(DEADLINE);
    assert_eq!(out.status.code(), Some(143), "{}", out.stderr);
    assert_eq!(out.stderr, "");
    assert!(env.report("shutdown").exists(), "Shutdown not received");
    env.assert_torn_down();
}

#[test]
fn missing_process_binary_exits_125() {
    let env = TestEnv::new();
    let out = CliGuard::spawn({
        let mut cmd = env.command("exit7", &["shell"]);
        cmd.env("CAPSEM_PROCESS_BIN", "/nonexistent/capsem-process");
        cmd
    })
    .finish(DEADLINE);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("capsem: cannot start /nonexistent/capsem-process: "),
        "{}",
        out.stderr
    );
    assert_eq!(env.vm_dirs(), Vec::<PathBuf>::new());
}

#[test]
fn usage_errors_exit_125_and_help_documents_exit_codes() {
    let out = Command::new(env!("CARGO_BIN_EXE_capsem"))
        .args(["--vmm", "kvm", "shell"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    let help = Command::new(env!("CARGO_BIN_EXE_capsem"))
        .arg("--help")
        .output()
        .expect("run");
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("125") && text.contains("255") && text.contains("128+N"),
        "{text}"
    );
}

#[test]
fn an_unknown_option_before_the_command_exits_125_and_runs_nothing() {
    let env = TestEnv::new();
    for args in [
        &["run", "--no-such-flag", "X", "--", "sh"][..],
        &["exec", "dev", "--no-such-flag", "X", "--", "sh"],
    ] {
        let out = CliGuard::spawn(env.command("exit7", args)).finish(DEADLINE);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr
                .starts_with("error: unexpected argument '--no-such-flag' found"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!env.report("pid").exists(), "capsem-process was started");
        assert_eq!(env.vm_dirs(), Vec::<PathBuf>::new());
    }
}

#[test]
fn terminal_is_raw_while_attached_and_restored_after_sigterm() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;

    let env = TestEnv::new();
    let pty = nix::pty::openpty(
        Some(&nix::pty::Winsize {
            ws_row: 40,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .expect("openpty");
    let before = tcgetattr(pty.slave.as_fd()).expect("tcgetattr");
    assert!(before.local_flags.contains(LocalFlags::ICANON));
    // Drain the master so the CLI never blocks writing to the terminal.
    let mut master = fs::File::from(pty.master.try_clone().expect("dup master"));
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = master.read_to_end(&mut sink);
    });
    let mut cmd = env.command("shutdown", &["shell"]);
    let slave = || Stdio::from(pty.slave.try_clone().expect("dup slave"));
    cmd.stdin(slave()).stdout(slave()).stderr(slave());
    // SAFETY: setsid is async-signal-safe; a new session has no
    // controlling terminal, so no job-control signal can stop the CLI.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    };
    let mut cli = CliGuard::spawn_no_pipes(cmd);
    assert!(
        wait_until(DEADLINE, || env.report("attached").exists()),
        "fake never saw the attach"
    );
    assert_eq!(
        fs::read_to_string(env.report("attach")).expect("attach"),
        "Some(Attach { cols: 100, rows: 40 })"
    );
    assert!(
        wait_until(DEADLINE, || {
            let now = tcgetattr(pty.slave.as_fd()).expect("tcgetattr");
            !now.local_flags.contains(LocalFlags::ICANON)
        }),
        "terminal never went raw"
    );
    // A resize is forwarded.
    let ws = libc::winsize {
        ws_row: 50,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&pty.master),
            libc::TIOCSWINSZ,
            &ws,
        )
    };
    // SAFETY: the pid is our unreaped child.
    unsafe { libc::kill(cli.child.id() as i32, libc::SIGWINCH) };
    assert!(
        wait_until(DEADLINE, || fs::read_to_string(env.report("messages"))
            .is_ok_and(|m| m.contains("Resize { cols: 120, rows: 50 }"))),
        "resize not forwarded"
    );
    // SAFETY: as above.
    unsafe { libc::kill(cli.child.id() as i32, libc::SIGTERM) };
    let status = cli.wait(DEADLINE);
    assert_eq!(status.code(), Some(143));
    let after = tcgetattr(pty.slave.as_fd()).expect("tcgetattr");
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
    assert!(env.report("shutdown").exists());
    drop(pty);
    drop(cli);
    let _ = drain.join();
}
