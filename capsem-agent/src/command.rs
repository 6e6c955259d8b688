//! One non-interactive command (exec mode): started in its own session with
//! stdin, stdout and stderr as three pipes, watched through a pidfd, and
//! signalled only as a whole process group while it is unreaped (so the
//! group id cannot name anyone else).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::fdio;
use crate::pty::ShellStatus;

/// Errors of a command that did start.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot open a pidfd for the command (pid {pid})")]
    PidFd {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure the command's pipes")]
    Pipes(#[source] io::Error),
    #[error("cannot open a PTY for the command")]
    Pty(#[source] crate::pty::PtyError),
    #[error("cannot reap the command (pid {pid})")]
    Reap {
        pid: u32,
        #[source]
        source: nix::Error,
    },
}

/// Why the command could not start, as the user sees it.
#[derive(Debug)]
pub struct SpawnFailure {
    /// 127 (not found) or 126 (found, not executable).
    pub exit_code: i32,
    /// One line for the command's stderr.
    pub message: String,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// Run on a new PTY of this size (`cols`, `rows`) as its controlling
    /// terminal: `stdout` and `stdin` are then the master, `stderr` none.
    pub tty: Option<(u16, u16)>,
    /// Whom it runs as (the image's User); `None`: the agent's own (root).
    pub creds: Option<crate::imageconfig::Creds>,
}

/// A started command: the parent's ends of its pipes and its pidfd.
#[derive(Debug)]
pub struct Running {
    pid: Pid,
    pidfd: OwnedFd,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    status: Option<ShellStatus>,
    /// Its cgroup (inside a VM); dropped after the command is reaped.
    cgroup: Option<crate::cgroup::Group>,
}

/// The exit code and message for an exec error, like a shell's: ENOENT is
/// "not found" (127), anything else "cannot execute" (126).
pub fn spawn_failure(program: &str, err: &io::Error) -> SpawnFailure {
    let exit_code = if err.raw_os_error() == Some(libc::ENOENT) {
        127
    } else {
        126
    };
    // `desc()`: the bare strerror text, without io::Error's "(os error N)".
    let reason = Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO)).desc();
    let program: String = program.chars().take(256).collect();
    SpawnFailure {
        exit_code,
        message: format!("capsem: cannot run {program}: {reason}\n"),
    }
}

impl Running {
    /// Starts `spec` as a session leader with three pipes, in `cgroup` when
    /// one is given. `Ok(Err(_))` is a command that could not be executed
    /// (reported to the user as 126/127).
    pub fn spawn(
        spec: &CommandSpec,
        cgroup: Option<crate::cgroup::Group>,
    ) -> Result<Result<Self, SpawnFailure>, CommandError> {
        let program = &spec.argv[0];
        let mut cmd = std::process::Command::new(program);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd);
        let creds = spec.creds;
        let procs = cgroup.as_ref().and_then(|g| g.procs_fd());
        let mut master = None;
        if let Some((cols, rows)) = spec.tty {
            master = Some(crate::pty::attach(&mut cmd, cols, rows).map_err(CommandError::Pty)?);
        } else {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        let with_tty = master.is_some();
        // SAFETY: the closure runs in the child between fork and exec and only
        // makes async-signal-safe calls (setsid, ioctl, sigemptyset,
        // sigprocmask, sigaction, and enter_in_child's open, write, close,
        // setgroups, setgid, setuid); it allocates nothing and touches no lock.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session and process group: a kill reaches every
                // process it started that did not leave the group itself.
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // On a PTY, it becomes the session's controlling terminal,
                // so Ctrl-C and a hang-up reach the command's group.
                if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                crate::pty::reset_signals_in_child()?;
                // Last: the move into the cgroup needs root, and the image's
                // user is taken on after it.
                crate::cgroup::enter_in_child(procs, creds)
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Ok(Err(spawn_failure(program, &e))),
        };
        let raw_pid = child.id();
        let pid = Pid::from_raw(raw_pid as libc::pid_t);
        // The parent's slave copies were in `cmd`; they close with it, so
        // the master reads EIO once the command's side is all closed.
        drop(cmd);
        let (stdin, stdout, stderr) = match master {
            Some(m) => {
                let reader = m.try_clone().map_err(CommandError::Pipes)?;
                (Some(m), Some(reader), None)
            }
            None => (
                child.stdin.take().map(OwnedFd::from),
                child.stdout.take().map(OwnedFd::from),
                child.stderr.take().map(OwnedFd::from),
            ),
        };
        // Dropping `Child` neither kills nor reaps; this module reaps.
        drop(child);
        let pidfd = match capsem_host::pidfd::pidfd_open(pid.as_raw().unsigned_abs()) {
            Ok(fd) => fd,
            Err(source) => {
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(CommandError::PidFd {
                    pid: raw_pid,
                    source,
                });
            }
        };
        let running = Self {
            pid,
            pidfd,
            stdin,
            stdout,
            stderr,
            status: None,
            cgroup,
        };
        for fd in [&running.stdin, &running.stdout, &running.stderr]
            .into_iter()
            .flatten()
        {
            fdio::set_nonblocking(fd.as_fd()).map_err(CommandError::Pipes)?;
        }
        Ok(Ok(running))
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Readable once the command has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn status(&self) -> Option<ShellStatus> {
        self.status
    }

    /// Which of its cgroup's limits killed the command, if one did.
    pub fn limit_hit(&self) -> Option<crate::cgroup::LimitHit> {
        self.cgroup.as_ref().and_then(|g| g.limit_hit())
    }

    /// Signals the command's process group; a no-op once it is reaped.
    pub fn signal_group(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = killpg(self.pid, sig);
        }
    }

    /// Reaps the exited command: first SIGKILLs what is left of its group
    /// (background jobs die with the command, as in a container whose init
    /// ended), while the zombie still holds the group id.
    pub fn reap(&mut self) -> Result<ShellStatus, CommandError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let _ = killpg(self.pid, Signal::SIGKILL);
        let s = crate::pty::wait_exit(self.pid).map_err(|source| CommandError::Reap {
            pid: self.pid(),
            source,
        })?;
        self.status = Some(s);
        Ok(s)
    }

    /// SIGTERM (and SIGCONT) to the group, up to `grace` for the command to
    /// exit, then SIGKILL and reap.
    pub fn terminate(&mut self, grace: Duration) -> Result<ShellStatus, CommandError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        self.signal_group(Signal::SIGTERM);
        self.signal_group(Signal::SIGCONT);
        let mut fds = [fdio::pollfd(self.pidfd.as_fd(), fdio::IN)];
        let _ = fdio::poll(&mut fds, Some(Instant::now() + grace));
        self.reap()
    }
}

impl Drop for Running {
    /// An error path that drops an unreaped command still kills and reaps it.
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.terminate(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str]) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), crate::pty::SHELL_PATH.into())],
            cwd: std::env::temp_dir(),
            tty: None,
            creds: None,
        }
    }

    #[test]
    fn not_found_is_127_and_not_executable_is_126() {
        let f = Running::spawn(&spec(&["capsem-no-such-program"]), None)
            .unwrap()
            .unwrap_err();
        assert_eq!(f.exit_code, 127);
        assert_eq!(
            f.message,
            "capsem: cannot run capsem-no-such-program: No such file or directory\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "data").unwrap();
        let f = Running::spawn(&spec(&[file.to_str().unwrap()]), None)
            .unwrap()
            .unwrap_err();
        assert_eq!(f.exit_code, 126, "{}", f.message);
    }

    #[test]
    fn exit_status_and_group_kill_on_exit() {
        let mut r = Running::spawn(&spec(&["/bin/sh", "-c", "sleep 30 & exit 4"]), None)
            .unwrap()
            .unwrap();
        let mut fds = [fdio::pollfd(r.pidfd(), fdio::IN)];
        fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
        assert_eq!(r.reap().unwrap().exit_code, Some(4));
        // The background sleep held stdout; the group kill closes it.
        let stdout = r.stdout.take().unwrap();
        let mut buf = [0u8; 16];
        let mut fds = [fdio::pollfd(stdout.as_fd(), fdio::IN)];
        fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
        assert_eq!(fdio::read(stdout.as_fd(), &mut buf).unwrap(), 0);
    }

    #[test]
    fn runs_as_the_image_user() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test needs root (it changes the command's uid)");
        }
        let mut sp = spec(&["/bin/sh", "-c", "echo $(id -u):$(id -g):$(id -G)"]);
        sp.creds = Some(crate::imageconfig::Creds {
            uid: 65534,
            gid: 65533,
        });
        let mut r = Running::spawn(&sp, None).unwrap().unwrap();
        let stdout = r.stdout.take().unwrap();
        let mut out = Vec::new();
        loop {
            let mut buf = [0u8; 64];
            let mut fds = [fdio::pollfd(stdout.as_fd(), fdio::IN)];
            fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
            match fdio::read(stdout.as_fd(), &mut buf).unwrap() {
                0 => break,
                n => out.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(r.reap().unwrap().exit_code, Some(0));
        // No supplementary group of root's is kept.
        assert_eq!(String::from_utf8_lossy(&out), "65534:65533:65533\n");
    }

    #[test]
    fn terminate_kills_a_term_ignoring_command() {
        let mut r = Running::spawn(&spec(&["/bin/sh", "-c", "trap '' TERM; sleep 30"]), None)
            .unwrap()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let s = r.terminate(Duration::from_millis(100)).unwrap();
        assert_eq!(s.signal, Some(libc::SIGKILL), "{s:?}");
    }
}
