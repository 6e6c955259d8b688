//! One test's capsem world: a private home, the real binaries, IPC to a VM's
//! capsem-process, logs kept when a test fails, and the check that nothing
//! was left behind.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsem_proto::frame::Client;
use capsem_proto::ipc::{ClientToProcess, ProcessToClient, VmStatus};
use capsem_proto::Codec;

use crate::procs;
use crate::pty::PtySession;

/// Lines of each log a failed test prints (the whole logs are kept under
/// `target/capsem-test-logs/`).
const FAILED_LOG_TAIL: usize = 20;

/// Which VM backend a test drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `--vmm none`: the agent runs as a host child process.
    None,
    /// `--vmm qemu`: a real VM.
    Qemu,
}

impl Backend {
    pub fn flag(self) -> &'static str {
        match self {
            Backend::None => "none",
            Backend::Qemu => "qemu",
        }
    }
}

/// Where the built binaries are: `$CAPSEM_BIN_DIR`, else the workspace's
/// `target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAPSEM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// `$CAPSEM_HOME/images/default`, else `~/.capsem/images/default`.
pub fn default_image_dir() -> PathBuf {
    let home = std::env::var_os("CAPSEM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".capsem")))
        .unwrap_or_else(|| PathBuf::from("/root/.capsem"));
    home.join("images/default")
}

/// One test's home, processes and logs.
#[derive(Debug)]
pub struct Fixture {
    name: String,
    backend: Backend,
    home: tempfile::TempDir,
    logs: PathBuf,
}

impl Fixture {
    pub fn new(name: &str, backend: Backend) -> Self {
        procs::become_subreaper();
        for bin in ["capsem", "capsem-process", "capsem-agent"] {
            let path = bin_dir().join(bin);
            assert!(
                path.exists(),
                "{} is missing: build the workspace first",
                path.display()
            );
        }
        // Short paths: Unix socket names are limited to 107 bytes.
        let home = tempfile::Builder::new()
            .prefix("capsem-t")
            .tempdir_in("/tmp")
            .expect("home");
        let logs = home.path().join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        Self {
            name: name.to_owned(),
            backend,
            home,
            logs,
        }
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Where capsem-process leaves a temporary VM's logs after teardown.
    pub fn log_dir(&self) -> &Path {
        &self.logs
    }

    /// `capsem --home HOME --vmm BACKEND` with the rest to be added.
    pub fn capsem(&self) -> Command {
        let mut cmd = Command::new(bin_dir().join("capsem"));
        cmd.arg("--home")
            .arg(self.home())
            .arg("--vmm")
            .arg(self.backend.flag());
        cmd.env("CAPSEM_LOG_DIR", &self.logs)
            .env_remove("CAPSEM_HOME")
            .env_remove("CAPSEM_VMM");
        // The image lives where images/build.sh puts it by default, not in
        // this test's private home.
        if std::env::var_os("CAPSEM_IMAGE_DIR").is_none() {
            cmd.env("CAPSEM_IMAGE_DIR", default_image_dir());
        }
        cmd
    }

    /// `capsem shell` on a fresh PTY of the given size.
    pub fn shell(&self, cols: u16, rows: u16) -> PtySession {
        let mut cmd = self.capsem();
        cmd.arg("shell");
        PtySession::spawn(cmd, cols, rows).expect("spawn capsem shell")
    }

    /// The VM directories that exist now.
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.home().join("vms"))
            .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    }

    /// Waits for the single VM's control socket and returns its directory.
    pub fn wait_vm(&self, timeout: Duration) -> PathBuf {
        let mut found = None;
        wait_until(timeout, "a VM with a ctl.sock", || {
            found = self
                .vm_dirs()
                .into_iter()
                .find(|d| d.join("ctl.sock").exists());
            found.is_some()
        });
        found.expect("vm dir")
    }

    /// The VM's status from its capsem-process.
    pub fn status(&self, vm_dir: &Path) -> VmStatus {
        match request(vm_dir, &ClientToProcess::Status).expect("status request") {
            ProcessToClient::Status(s) => s,
            other => panic!("expected a status, got {other:?}"),
        }
    }

    /// Asserts that nothing this test started is still running and no VM
    /// state is left. Waits briefly for processes that are already exiting.
    pub fn assert_nothing_left(&self) {
        procs::reap_zombies();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            procs::reap_zombies();
            let left = procs::descendants();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let list: Vec<String> = left
                    .iter()
                    .map(|p| format!("{} {:?}", p.pid, p.cmdline))
                    .collect();
                panic!("processes left behind:\n{}", list.join("\n"));
            }
            std::thread::yield_now();
            std::thread::sleep(Duration::from_millis(20));
        }
        let dirs = self.vm_dirs();
        assert!(dirs.is_empty(), "VM state left behind: {dirs:?}");
    }

    /// The logs a finished temporary VM left in the log dir, by file name
    /// (`process.log`, and `agent.log` or `serial.log`), for the only VM.
    pub fn kept_logs(&self) -> std::collections::BTreeMap<String, String> {
        let vms: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.path()))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(vms.len(), 1, "expected the logs of exactly one VM: {vms:?}");
        std::fs::read_dir(&vms[0])
            .expect("kept logs")
            .filter_map(|e| {
                let p = e.ok()?.path();
                let name = p.file_name()?.to_string_lossy().into_owned();
                Some((name, std::fs::read_to_string(&p).ok()?))
            })
            .collect()
    }

    /// Text of every log the test's VMs left (process, agent, serial).
    pub fn all_logs(&self) -> String {
        self.logs_with_tails(usize::MAX)
    }

    /// Every log the test's VMs left, each cut to its last `lines` lines:
    /// what a failed test prints, so a long log cannot push the end of the
    /// next one (where a hang shows) out of a truncated CI report.
    fn logs_with_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = Vec::new();
        let kept: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        for dir in self.vm_dirs().into_iter().chain(kept) {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                files.extend(
                    rd.filter_map(|e| Some(e.ok()?.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "log")),
                );
            }
        }
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            out.push_str(&tail(&f, &text, lines));
        }
        out
    }
}

/// `==> path <==` and the last `lines` lines of `text`, saying how many
/// were left out.
fn tail(path: &Path, text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = match skip {
        0 => format!("==> {} <==\n", path.display()),
        n => format!(
            "==> {} (its last {lines} lines; {n} before them) <==\n",
            path.display()
        ),
    };
    for line in &all[skip..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- logs of failed test {} ----\n{}",
                self.name,
                self.logs_with_tails(FAILED_LOG_TAIL)
            );
            let keep = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/capsem-test-logs")
                .join(&self.name);
            if std::fs::create_dir_all(&keep).is_ok() {
                let _ = std::fs::write(keep.join("logs.txt"), self.all_logs());
                eprintln!("whole logs kept in {}", keep.display());
            }
        }
        procs::kill_all_descendants();
    }
}

/// Polls `cond` until it holds; fails the test with `what` at the deadline.
/// For conditions that have no event to wait on (another process's state).
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one request on a fresh ctl.sock connection and reads one answer.
pub fn request(vm_dir: &Path, msg: &ClientToProcess) -> Result<ProcessToClient> {
    let mut conn = UnixStream::connect(vm_dir.join("ctl.sock")).context("connect ctl.sock")?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(&Codec::<Client>::encode(msg)?)?;
    let mut codec = Codec::<Client>::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(answer) = codec.next_message()? {
            return Ok(answer);
        }
        let n = conn.read(&mut buf).context("read ctl.sock")?;
        if n == 0 {
            bail!("ctl.sock closed without an answer");
        }
        codec.feed(&buf[..n])?;
    }
}

/// Sends one request that has no answer (the process acts and may close).
pub fn send(vm_dir: &Path, msg: &ClientToProcess) -> Result<()> {
    let mut conn = UnixStream::connect(vm_dir.join("ctl.sock")).context("connect ctl.sock")?;
    conn.write_all(&Codec::<Client>::encode(msg)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_says_how_many_lines_it_left_out() {
        let p = Path::new("/x/serial.log");
        assert_eq!(tail(p, "a\nb\nc\n", 5), "==> /x/serial.log <==\na\nb\nc\n");
        assert_eq!(
            tail(p, "a\nb\nc\n", 2),
            "==> /x/serial.log (its last 2 lines; 1 before them) <==\nb\nc\n"
        );
        assert_eq!(tail(p, "", 2), "==> /x/serial.log <==\n");
    }
}
