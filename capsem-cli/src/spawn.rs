//! Starting capsem-process for a temporary VM, waiting for its ready line,
//! and reaping it.
//!
//! capsem-process runs in its own session (so the terminal's signals do not
//! reach it), with stdio on /dev/null (it logs to `<vm-dir>/process.log`),
//! and one inherited fd, the write end of a pipe, on which it reports
//! `ready\n` or `error: <reason>\n`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::cli::{AccelChoice, Vmm};
use crate::progress::{Progress, TICK};
use crate::readyline::ReadyLine;
pub use crate::readyline::ReadyOutcome;
use crate::signals::{Signals, SignalsError};

/// Name of the binary looked for beside our own executable.
pub const PROCESS_BIN_NAME: &str = "capsem-process";
/// Environment override for the capsem-process binary.
pub const PROCESS_BIN_ENV: &str = "CAPSEM_PROCESS_BIN";
/// How long capsem-process gets to exit on its own before its process group
/// is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Errors starting or watching capsem-process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot find capsem-process at {path} (set CAPSEM_PROCESS_BIN)")]
    NotFound { path: PathBuf },
    #[error("cannot locate the capsem executable")]
    CurrentExe(#[source] io::Error),
    #[error("cannot create the ready pipe")]
    Pipe(#[source] nix::Error),
    #[error("cannot start {path}")]
    Start {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch capsem-process (pidfd_open)")]
    Pidfd(#[source] io::Error),
    #[error("poll failed")]
    Poll(#[source] nix::Error),
    #[error("cannot read the ready pipe")]
    ReadPipe(#[source] io::Error),
    #[error(transparent)]
    Signals(#[from] SignalsError),
}

/// The capsem-process binary: `$CAPSEM_PROCESS_BIN` if set (an explicit
/// override wins), else `capsem-process` beside our own executable.
pub fn find_process_bin(
    env_override: Option<OsString>,
    current_exe: io::Result<PathBuf>,
) -> Result<PathBuf, SpawnError> {
    if let Some(p) = env_override.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = current_exe.map_err(SpawnError::CurrentExe)?;
    let path = exe
        .parent()
        .map(|d| d.join(PROCESS_BIN_NAME))
        .unwrap_or_else(|| PathBuf::from(PROCESS_BIN_NAME));
    if path.is_file() {
        Ok(path)
    } else {
        Err(SpawnError::NotFound { path })
    }
}

/// A started capsem-process: our unreaped child, leader of its own session
/// and process group. Dropping it reaps it (see [`ProcessChild::teardown`]).
#[derive(Debug)]
pub struct ProcessChild {
    child: Child,
    pidfd: OwnedFd,
    reaped: Option<ExitStatus>,
    /// A persistent VM's capsem-process: left running on drop.
    released: bool,
}

/// The read end of the ready pipe (non-blocking).
#[derive(Debug)]
pub struct ReadyPipe {
    file: File,
    line: ReadyLine,
}

use capsem_host::pidfd::pidfd_open;

/// What kind of capsem-process to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A temporary VM (`--temporary`), running a shell or one command
    /// (`exec`, adds `--exec`).
    Temporary { exec: bool },
    /// A persistent VM booted as its `vm.json` says.
    Persistent,
    /// Take over the running guest of a persistent VM whose capsem-process
    /// died (`--adopt`).
    Adopt,
}

/// Who capsem-process runs.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub vm_dir: &'a Path,
    pub vm_id: &'a str,
    pub vmm: Vmm,
    pub accel: AccelChoice,
    pub kind: Kind,
    /// Its `vm.json`: the resources, disk size and image it boots with.
    pub config: &'a capsem_host::vmstate::VmConfig,
    /// Its OCI image (`--rootfs`), from the cache; `None`: the default.
    pub image: Option<&'a capsem_image::CachedImage>,
    /// `--audit-log FILE` (a temporary VM's audit records, kept).
    pub audit_log: Option<&'a Path>,
}

/// capsem-process's arguments: `--vm-dir DIR --vm-id ID --vmm V --ready-fd
/// N`, then `--temporary [--exec]`, nothing (persistent) or `--adopt`; a
/// boot (not an adoption) adds `--cpus N --memory-mib M [--disk-size B] [--share MODE:HEX:HEX]...`
/// from `vm.json` and `--rootfs FILE --image-config FILE` for an OCI image; `--net V` for
/// each of vm.json's `net` values and `--publish P` for each published port (both also when adopting); then `--accel A` for qemu (capsem-process decides what `auto` means; the
/// CLI never probes KVM for the shell).
pub fn process_args(target: &Target<'_>, ready_fd: i32) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--vm-dir".into(), target.vm_dir.into()];
    for a in ["--vm-id", target.vm_id, "--vmm", target.vmm.as_arg()] {
        args.push(a.into());
    }
    args.push("--ready-fd".into());
    args.push(ready_fd.to_string().into());
    match target.kind {
        Kind::Temporary { exec } => {
            args.push("--temporary".into());
            if exec {
                args.push("--exec".into());
            }
        }
        Kind::Persistent => {}
        Kind::Adopt => args.push("--adopt".into()),
    }
    if target.kind != Kind::Adopt {
        let c = target.config;
        let mut pairs = vec![
            ("--cpus", c.cpus.to_string()),
            ("--memory-mib", c.memory_mib.to_string()),
        ];
        pairs.extend(c.disk_size.map(|b| ("--disk-size", b.to_string())));
        pairs.extend(c.shares.iter().map(|s| ("--share", s.to_arg())));
        for (flag, value) in pairs {
            args.push(flag.into());
            args.push(value.into());
        }
        if let Some(img) = target.image {
            args.push("--rootfs".into());
            args.push(img.rootfs.clone().into());
            args.push("--image-config".into());
            args.push(img.dir.join("config.json").into());
        }
    }
    if matches!(target.kind, Kind::Persistent | Kind::Adopt) {
        args.extend(crate::lifetime::process_args(target.config));
    }
    args.extend(crate::netflags::process_args(&target.config.net));
    args.extend(crate::publish::process_args(&target.config.publish));
    if let Some(file) = target.audit_log {
        args.push("--audit-log".into());
        args.push(file.into());
    }
    if target.vmm == Vmm::Qemu {
        args.push("--accel".into());
        args.push(target.accel.as_arg().into());
    }
    args
}

/// Starts capsem-process with [`process_args`].
pub fn spawn(bin: &Path, target: &Target<'_>) -> Result<(ProcessChild, ReadyPipe), SpawnError> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;
    // Keep the write end off fds 0-2, which the child's stdio replaces.
    let write: OwnedFd = if write.as_raw_fd() < 3 {
        let fd =
            fcntl(write.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3)).map_err(SpawnError::Pipe)?;
        // SAFETY: fcntl just returned this new fd; we own it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    } else {
        write
    };
    fcntl(read.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(SpawnError::Pipe)?;

    let ready_fd = write.as_raw_fd();
    let mut cmd = Command::new(bin);
    cmd.args(process_args(target, ready_fd));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Runs in the child between fork and exec: async-signal-safe calls only.
    let in_child = move || {
        // SAFETY: setsid has no memory-safety preconditions.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl on an fd the child inherited.
        let flags = unsafe { libc::fcntl(ready_fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; only FD_CLOEXEC changes, on this one fd.
        if unsafe { libc::fcntl(ready_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        // SAFETY: sigemptyset initialises the set we point to; the mask
        // capsem blocks for its signalfd must not leak into the child.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
        }
        Ok(())
    };
    // SAFETY: `in_child` only makes async-signal-safe calls on plain values.
    unsafe { cmd.pre_exec(in_child) };
    let child = cmd.spawn().map_err(|source| SpawnError::Start {
        path: bin.to_path_buf(),
        source,
    })?;
    drop(write);
    let pidfd = match pidfd_open(child.id()) {
        Ok(fd) => fd,
        Err(e) => {
            let mut child = child;
            // The child is unreaped, so its pid (== its pgid) is still ours.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            return Err(SpawnError::Pidfd(e));
        }
    };
    Ok((
        ProcessChild {
            child,
            pidfd,
            reaped: None,
            released: false,
        },
        ReadyPipe {
            // SAFETY: `read` is an owned fd we hand over to File.
            file: File::from(read),
            line: ReadyLine::default(),
        },
    ))
}

impl ReadyPipe {
    /// Reads what is available: `Some` once a line or EOF arrived.
    fn read_available(&mut self) -> Result<Option<ReadyOutcome>, SpawnError> {
        let mut buf = [0u8; 512];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return Ok(Some(self.line.eof())),
                Ok(n) => {
                    if let Some(outcome) = self.line.push(&buf[..n]) {
                        return Ok(Some(outcome));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SpawnError::ReadPipe(e)),
            }
        }
    }

    /// Waits for the ready line, capsem-process's exit, or a terminating
    /// signal, drawing `progress` meanwhile.
    pub fn wait(
        &mut self,
        child: &ProcessChild,
        signals: &mut Signals,
        progress: &mut Progress,
    ) -> Result<ReadyOutcome, SpawnError> {
        let timeout = if progress.enabled() {
            PollTimeout::try_from(TICK).unwrap_or(PollTimeout::NONE)
        } else {
            PollTimeout::NONE
        };
        loop {
            progress.tick();
            let (pipe_ready, exited, signalled) = {
                let mut fds = [
                    PollFd::new(self.file.as_fd(), PollFlags::POLLIN),
                    PollFd::new(child.pidfd(), PollFlags::POLLIN),
                    PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                ];
                match nix::poll::poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(SpawnError::Poll(e)),
                }
                let hit = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (hit(&fds[0]), hit(&fds[1]), hit(&fds[2]))
            };
            if pipe_ready {
                if let Some(outcome) = self.read_available()? {
                    return Ok(outcome);
                }
            }
            if signalled {
                if let Some(sig) = signals
                    .drain()?
                    .into_iter()
                    .find(|s| *s != Signal::SIGWINCH)
                {
                    return Ok(ReadyOutcome::Interrupted(sig));
                }
            }
            if exited {
                // It may have written its reason just before exiting; a
                // descendant holding the pipe open must not make us wait.
                return Ok(self.read_available()?.unwrap_or_else(|| self.line.eof()));
            }
        }
    }
}

impl ProcessChild {
    /// Leaves it running (a persistent VM's capsem-process) when this handle
    /// drops; once this CLI exits it is reparented and reaped by init.
    pub fn release(mut self) {
        self.released = true;
    }

    /// Its pidfd: readable once it has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn pgid(&self) -> Pid {
        // setsid made it the leader of a group whose id is its pid.
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `sig` to its whole process group. The leader is our unreaped
    /// child, so the group id cannot belong to anyone else.
    pub fn signal_group(&self, sig: Signal) {
        if self.reaped.is_none() {
            let _ = killpg(self.pgid(), sig);
        }
    }

    /// Waits up to `grace` for it to exit (an event on its pidfd), kills its
    /// process group if it has not, and reaps it. Whatever is left in its
    /// group is killed before the leader is reaped, while the leader's
    /// zombie still pins the group id. Returns its status and whether it
    /// had to be killed.
    pub fn teardown(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(status) = self.reaped {
            return (Some(status), false);
        }
        let deadline = Instant::now() + grace;
        let exited = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => break false,
                Ok(_) => break true,
                Err(Errno::EINTR) => continue,
                Err(_) => break false,
            }
        };
        let _ = killpg(self.pgid(), Signal::SIGKILL);
        let status = self.child.wait().ok();
        self.reaped = status;
        (status, !exited)
    }
}

impl Drop for ProcessChild {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (_, killed) = self.teardown(EXIT_GRACE);
        if killed {
            eprintln!(
                "capsem: capsem-process did not exit within {}s; killed it",
                EXIT_GRACE.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_per_kind_and_accel_for_qemu_only() {
        let mut config = crate::testutil::config("x", false, None);
        config.cpus = 2;
        config.memory_mib = 256;
        let args = |vmm, kind, config: &capsem_host::vmstate::VmConfig| {
            let target = Target {
                vm_dir: Path::new("/h/vms/x"),
                vm_id: "x",
                vmm,
                accel: AccelChoice::Tcg,
                kind,
                config,
                image: None,
                audit_log: None,
            };
            process_args(&target, 7)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let temp = Kind::Temporary { exec: false };
        assert_eq!(
            args(Vmm::Qemu, temp, &config),
            "--vm-dir /h/vms/x --vm-id x --vmm qemu --ready-fd 7 --temporary --cpus 2 --memory-mib 256 --accel tcg"
        );
        assert_eq!(
            args(Vmm::None, Kind::Temporary { exec: true }, &config),
            "--vm-dir /h/vms/x --vm-id x --vmm none --ready-fd 7 --temporary --exec --cpus 2 --memory-mib 256"
        );
        assert_eq!(
            args(Vmm::None, Kind::Persistent, &config),
            "--vm-dir /h/vms/x --vm-id x --vmm none --ready-fd 7 --cpus 2 --memory-mib 256"
        );
        config.disk_size = Some(1 << 30);
        assert_eq!(
            args(Vmm::None, Kind::Persistent, &config),
            "--vm-dir /h/vms/x --vm-id x --vmm none --ready-fd 7 --cpus 2 --memory-mib 256 --disk-size 1073741824"
        );
        config.shares = vec![capsem_host::share::Share::parse_arg("ro:2f737263:2f77").unwrap()];
        assert_eq!(
            args(Vmm::Qemu, Kind::Persistent, &config),
            "--vm-dir /h/vms/x --vm-id x --vmm qemu --ready-fd 7 --cpus 2 --memory-mib 256 --disk-size 1073741824 --share ro:2f737263:2f77 --accel tcg"
        );
        assert_eq!(
            args(Vmm::Qemu, Kind::Adopt, &config),
            "--vm-dir /h/vms/x --vm-id x --vmm qemu --ready-fd 7 --adopt --accel tcg"
        );
    }

    #[test]
    fn explicit_override_wins() {
        let got =
            find_process_bin(Some("/opt/p".into()), Ok("/nonexistent/capsem".into())).unwrap();
        assert_eq!(got, PathBuf::from("/opt/p"));
        let err = find_process_bin(None, Ok("/nonexistent/capsem".into())).unwrap_err();
        assert!(
            matches!(err, SpawnError::NotFound { path } if path == Path::new("/nonexistent/capsem-process"))
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PROCESS_BIN_NAME), b"").unwrap();
        let got = find_process_bin(Some("".into()), Ok(dir.path().join("capsem"))).unwrap();
        assert_eq!(got, dir.path().join(PROCESS_BIN_NAME));
    }

    #[test]
    fn spawn_reports_error_line_and_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake");
        std::fs::write(
            &script,
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --ready-fd ] && fd=$2; shift; done\n\
             eval \"echo 'error: nope' >&$fd\"\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &script,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
        )
        .unwrap();
        let target = Target {
            vm_dir: dir.path(),
            vm_id: "tmp-0",
            vmm: Vmm::None,
            accel: AccelChoice::Auto,
            kind: Kind::Temporary { exec: false },
            config: &crate::testutil::config("tmp-0", true, None),
            image: None,
            audit_log: None,
        };
        let (mut child, mut pipe) = spawn(&script, &target).unwrap();
        let mut signals = Signals::install().unwrap();
        let mut progress = Progress::new("test");
        let got = pipe.wait(&child, &mut signals, &mut progress).unwrap();
        assert_eq!(got, ReadyOutcome::Failed("nope".into()));
        let (status, killed) = child.teardown(EXIT_GRACE);
        assert_eq!(status.unwrap().code(), Some(3));
        assert!(!killed);
    }
}
