//! What the tests of capsem-process share: the real `capsem-process` with
//! `--vmm none` and a stub agent (a shell script that records its token,
//! pid and arguments, leaves a detached `sleep` behind, and execs `sleep`),
//! the test playing the agent (`FakeGuest`) and the CLI (`Cli`).

// Each test binary uses a different part of this module.
#![allow(dead_code)]
// clippy.toml allows unwrap in #[test] fns only; the helpers here are test code too.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsem_proto::frame::{Client, Guest, TermGuest};
use capsem_proto::guest::{GuestToHost, HostToGuest, PROTOCOL_VERSION};
use capsem_proto::ipc::{ClientToProcess, ProcessToClient, VmStatus};
use capsem_proto::terminal::{HostToTerm, TermToHost, MAX_TERM_CHUNK};
use capsem_proto::Codec;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Mutex};

pub const DEADLINE: Duration = Duration::from_secs(15);

pub const STUB: &str = r#"#!/bin/sh
printf '%s' "$CAPSEM_TOKEN" > token.tmp && mv token.tmp token
echo "$@" > args
setsid sleep 1000 </dev/null >/dev/null 2>&1 &
echo $! > orphan.pid.tmp && mv orphan.pid.tmp orphan.pid
echo $$ > agent.pid.tmp && mv agent.pid.tmp agent.pid
exec sleep 1000
"#;

/// Polls `f` until it returns `Some`, failing after the deadline.
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn wait_until_async<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running capsem-process, killed (with its stub agent) on drop.
pub struct Vm {
    pub _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub scratch: PathBuf,
    pub child: Option<std::process::Child>,
    pub ready: Option<OwnedFd>,
}

impl Vm {
    pub fn start(extra: &[&str]) -> Vm {
        Vm::start_vmm("none", extra)
    }

    pub fn start_vmm(vmm: &str, extra: &[&str]) -> Vm {
        Vm::start_env(vmm, extra, &[])
    }

    /// Like [`Vm::start_vmm`], with extra environment variables.
    pub fn start_env(vmm: &str, extra: &[&str], env: &[(&str, &str)]) -> Vm {
        // Every descendant, even one that left with setsid and outlived a
        // killed capsem-process, stays ours to kill in Drop.
        capsem_tests::procs::become_subreaper();
        let tmp = tempfile::tempdir().unwrap();
        let stub = tmp.path().join("agent.sh");
        fs::write(&stub, STUB).unwrap();
        fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = tmp.path().join("vms/test-vm");
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let wr_fd = wr.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsem-process"));
        cmd.arg("--vm-dir")
            .arg(&dir)
            .args(["--vm-id", "test-vm", "--vmm", vmm, "--heartbeat-ms", "100"])
            .args(["--ready-fd", &wr_fd.to_string()])
            .args(extra)
            .env("CAPSEM_AGENT_BIN", &stub)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .process_group(0);
        // SAFETY: fcntl is async-signal-safe; it only clears CLOEXEC on the
        // ready pipe's write end in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(wr_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(wr);
        Vm {
            scratch: dir.join("scratch"),
            dir,
            _tmp: tmp,
            child: Some(child),
            ready: Some(rd),
        }
    }

    pub fn file(&self, name: &str) -> String {
        let path = self.scratch.join(name);
        wait_until(name, || fs::read_to_string(&path).ok())
    }

    pub fn token(&self) -> String {
        self.file("token")
    }

    pub fn pid_file(&self, name: &str) -> i32 {
        self.file(name).trim().parse().unwrap()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("process.log")).unwrap_or_default()
    }

    pub async fn wait_log(&self, needle: &str) {
        wait_until_async(&format!("log line {needle:?}"), || {
            self.log().contains(needle).then_some(())
        })
        .await;
    }

    /// Everything written to the ready fd, up to its close.
    pub async fn ready_line(&mut self) -> String {
        let fd = self.ready.take().unwrap();
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd).unwrap();
        let mut out = String::new();
        tokio::time::timeout(DEADLINE, rx.read_to_string(&mut out))
            .await
            .expect("ready fd not closed in time")
            .unwrap();
        out
    }

    /// Waits for capsem-process to exit; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let status = wait_until("capsem-process to exit", || child.try_wait().unwrap());
        self.child = None;
        assert_eq!(status.signal(), None);
        status.code()
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Whether `pid` is alive and runs in `scratch` (its identity).
pub fn ours(pid: i32, scratch: &Path) -> bool {
    fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| {
        cwd.to_string_lossy()
            .starts_with(&*scratch.to_string_lossy())
    })
}

pub fn gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie of another parent is gone for our purposes.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let end = Instant::now() + DEADLINE;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
            let _ = child.wait();
        }
        for name in ["agent.pid", "orphan.pid"] {
            let Ok(text) = fs::read_to_string(self.scratch.join(name)) else {
                continue;
            };
            if let Ok(pid) = text.trim().parse::<i32>() {
                if ours(pid, &self.scratch) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        // What the pid files no longer name (the VM dir may be gone). Only
        // this VM's: the tests of this binary run in parallel, and another
        // test's processes (and their exit statuses) are not ours to take.
        for _ in 0..20 {
            let left: Vec<i32> = capsem_tests::procs::descendants()
                .into_iter()
                .map(|p| p.pid)
                .filter(|pid| ours(*pid, &self.scratch))
                .collect();
            if left.is_empty() {
                break;
            }
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            for pid in &left {
                // ECHILD for a process whose parent is not us: it reaps it.
                let _ = nix::sys::wait::waitpid(Pid::from_raw(*pid), None);
            }
        }
    }
}

/// The test playing the agent.
pub struct FakeGuest {
    pub ctl: Arc<Mutex<OwnedWriteHalf>>,
    pub from_host: mpsc::UnboundedReceiver<HostToGuest>,
    pub term: UnixStream,
    /// Decodes the host's `Input` frames on `term`.
    pub term_codec: Codec<TermGuest>,
    pub answer_pings: Arc<AtomicBool>,
}

/// `data` as the guest's `Output` frames on the terminal.
pub fn output_frames(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in data.chunks(MAX_TERM_CHUNK) {
        let frame = TermToHost::Output {
            data: chunk.to_vec(),
        };
        Codec::<TermGuest>::encode_into(&frame, &mut out).unwrap();
    }
    out
}

/// The guest's `Exit` frame, the terminal's last.
pub fn exit_frame(exit_code: Option<i32>, signal: Option<i32>) -> Vec<u8> {
    Codec::<TermGuest>::encode(&TermToHost::Exit { exit_code, signal }).unwrap()
}

impl FakeGuest {
    pub async fn connect(vm: &Vm, token: &str, connects: u64) -> FakeGuest {
        let ctl = UnixStream::connect(vm.sock("vsock.sock_5000"))
            .await
            .unwrap();
        let (mut rd, wr) = ctl.into_split();
        let wr = Arc::new(Mutex::new(wr));
        let hello = GuestToHost::Hello {
            version: PROTOCOL_VERSION,
            token: token.into(),
            connects,
            shell_pid: 4242,
        };
        wr.lock()
            .await
            .write_all(&Codec::<Guest>::encode(&hello).unwrap())
            .await
            .unwrap();
        let (tx, mut from_host) = mpsc::unbounded_channel();
        let answer_pings = Arc::new(AtomicBool::new(true));
        let (pong_wr, answer) = (wr.clone(), answer_pings.clone());
        tokio::spawn(async move {
            let mut codec = Codec::<Guest>::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                codec.feed(&buf[..n]).unwrap();
                while let Some(msg) = codec.next_message().unwrap() {
                    match msg {
                        HostToGuest::Ping { seq } if answer.load(Ordering::SeqCst) => {
                            let pong = Codec::<Guest>::encode(&GuestToHost::Pong { seq }).unwrap();
                            let _ = pong_wr.lock().await.write_all(&pong).await;
                        }
                        HostToGuest::Ping { .. } => {}
                        other => {
                            let _ = tx.send(other);
                        }
                    }
                }
            }
        });
        let ack = tokio::time::timeout(DEADLINE, from_host.recv())
            .await
            .unwrap()
            .expect("no hello ack");
        let HostToGuest::HelloAck { generation, .. } = ack else {
            panic!("expected a hello ack, got {ack:?}");
        };
        let mut term = UnixStream::connect(vm.sock("vsock.sock_5001"))
            .await
            .unwrap();
        let term_hello = TermToHost::Hello {
            token: token.into(),
            generation,
        };
        term.write_all(&Codec::<TermGuest>::encode(&term_hello).unwrap())
            .await
            .unwrap();
        FakeGuest {
            ctl: wr,
            from_host,
            term,
            term_codec: Codec::new(),
            answer_pings,
        }
    }

    /// Writes `data` as `Output` frames on the terminal.
    pub async fn output(&mut self, data: &[u8]) {
        self.term.write_all(&output_frames(data)).await.unwrap();
    }

    pub async fn send(&self, msg: &GuestToHost) {
        let frame = Codec::<Guest>::encode(msg).unwrap();
        self.ctl.lock().await.write_all(&frame).await.unwrap();
    }

    /// The next non-ping message from the host; `None` at EOF.
    pub async fn next(&mut self) -> Option<HostToGuest> {
        tokio::time::timeout(DEADLINE, self.from_host.recv())
            .await
            .expect("no message from the host")
    }

    /// The payloads of the host's next `Input` frames, `len` bytes in all.
    pub async fn read_terminal(&mut self, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while got.len() < len {
            if let Some(HostToTerm::Input { data }) = self.term_codec.next_message().unwrap() {
                got.extend(data);
                continue;
            }
            let n = tokio::time::timeout(DEADLINE, self.term.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "terminal closed after {got:?}");
            self.term_codec.feed(&buf[..n]).unwrap();
        }
        assert_eq!(got.len(), len, "{got:?}");
        got
    }

    pub async fn terminal_closed(&mut self) {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(DEADLINE, self.term.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "terminal still open");
    }
}

/// The test playing the CLI.
pub struct Cli {
    pub stream: UnixStream,
    pub codec: Codec<Client>,
}

impl Cli {
    pub async fn connect(vm: &Vm) -> Cli {
        Cli {
            stream: UnixStream::connect(vm.sock("ctl.sock")).await.unwrap(),
            codec: Codec::new(),
        }
    }

    pub async fn send(&mut self, msg: &ClientToProcess) {
        let frame = Codec::<Client>::encode(msg).unwrap();
        self.stream.write_all(&frame).await.unwrap();
    }

    /// The next message, `None` at EOF.
    pub async fn recv(&mut self) -> Option<ProcessToClient> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(msg) = self.codec.next_message().unwrap() {
                return Some(msg);
            }
            let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut buf))
                .await
                .expect("no message from capsem-process")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.codec.feed(&buf[..n]).unwrap();
        }
    }

    pub async fn attach(vm: &Vm) -> Cli {
        let mut cli = Cli::connect(vm).await;
        cli.send(&ClientToProcess::Attach { cols: 80, rows: 24 })
            .await;
        assert_eq!(
            cli.recv().await,
            Some(ProcessToClient::Attached {
                vm_id: "test-vm".into()
            })
        );
        cli
    }

    /// Output bytes until `want` has been seen (other messages are skipped).
    pub async fn output_until(&mut self, want: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        while !got.windows(want.len()).any(|w| w == want) {
            match self.recv().await {
                Some(ProcessToClient::Output { data }) => got.extend(data),
                Some(_) => {}
                None => panic!("EOF before {want:?}"),
            }
        }
        got
    }
}

pub async fn status(vm: &Vm) -> VmStatus {
    let mut cli = Cli::connect(vm).await;
    cli.send(&ClientToProcess::Status).await;
    match cli.recv().await {
        Some(ProcessToClient::Status(s)) => s,
        other => panic!("{other:?}"),
    }
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
