//! The shell on a fresh PTY.
//!
//! The shell is started with `std::process::Command` whose `pre_exec` only
//! makes async-signal-safe calls (`setsid`, `ioctl(TIOCSCTTY)`, `sigprocmask`,
//! `sigaction`).
//! The parent keeps the PTY master (close-on-exec, nonblocking) and a pidfd
//! for the shell, so the shell's exit is a poll event even while a background
//! job keeps the slave side open. The shell stays unreaped until its status is
//! taken, so its pid (and its process group id) cannot be reused while the
//! agent signals it.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::fdio;

/// The PATH every shell starts with.
pub const SHELL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors starting, resizing, signalling or reaping the shell.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("cannot open a PTY")]
    Open(#[source] nix::Error),
    #[error("cannot open the PTY slave {path}")]
    Slave {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure the PTY")]
    Configure(#[source] io::Error),
    #[error("cannot start the shell {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a pidfd for the shell (pid {pid})")]
    PidFd {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot resize the PTY to {cols}x{rows}")]
    Resize {
        cols: u16,
        rows: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot reap the shell (pid {pid})")]
    Reap {
        pid: u32,
        #[source]
        source: nix::Error,
    },
}

/// How the shell ended: exactly one of the two is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShellStatus {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// What to run and in which environment.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// Whom it runs as (the image's User); `None`: the agent's own (root).
    pub creds: Option<crate::imageconfig::Creds>,
}

impl ShellConfig {
    /// `/bin/bash -i` when it exists, else `/bin/sh -i`, with a clean
    /// environment: TERM, HOME, PATH, SHELL and LANG only.
    pub fn interactive(home: &Path, cwd: PathBuf) -> Self {
        let program = if Path::new("/bin/bash").exists() {
            PathBuf::from("/bin/bash")
        } else {
            PathBuf::from("/bin/sh")
        };
        let env = vec![
            ("TERM".into(), "xterm-256color".into()),
            ("HOME".into(), home.as_os_str().to_owned()),
            ("PATH".into(), SHELL_PATH.into()),
            ("SHELL".into(), program.as_os_str().to_owned()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        Self {
            program,
            args: vec!["-i".into()],
            env,
            cwd,
            creds: None,
        }
    }
}

impl ShellConfig {
    /// The image's Env over the defaults (TERM stays the terminal's).
    pub fn with_image_env(mut self, env: &[(String, String)]) -> Self {
        let term = self.env.iter().find(|(k, _)| k == "TERM").cloned();
        crate::imageconfig::merge_env(&mut self.env, env);
        if let Some(term) = term {
            self.env.retain(|(k, _)| k != "TERM");
            self.env.push(term);
        }
        self
    }

    pub fn with_creds(mut self, creds: Option<crate::imageconfig::Creds>) -> Self {
        self.creds = creds;
        self
    }
}

/// The running (or exited, not yet reaped) shell and its PTY master.
#[derive(Debug)]
pub struct Shell {
    master: OwnedFd,
    pidfd: OwnedFd,
    pid: Pid,
    status: Mutex<Option<ShellStatus>>,
    /// Its cgroup (inside a VM); dropped after the shell is reaped.
    cgroup: Option<crate::cgroup::Group>,
}

/// Signals whose disposition a started shell or command must find at its
/// default.
const RESET_SIGNALS: [libc::c_int; 7] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGPIPE,
    libc::SIGCHLD,
    libc::SIGTSTP,
];

/// Opens a PTY of `cols`x`rows` and makes its slave `cmd`'s stdin, stdout
/// and stderr; returns the master. The slave's only copies are then the
/// command's, which close when `cmd` is dropped after its spawn.
pub fn attach(cmd: &mut Command, cols: u16, rows: u16) -> Result<OwnedFd, PtyError> {
    let (master, slave) = open_pair()?;
    set_winsize(master.as_fd(), cols, rows).map_err(PtyError::Configure)?;
    let stdio = |f: &File| f.try_clone().map(Stdio::from).map_err(PtyError::Configure);
    cmd.stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(stdio(&slave)?);
    Ok(master)
}

/// A PTY's master and slave, both close-on-exec from their first moment:
/// a command another thread starts meanwhile inherits neither (a stray
/// slave would keep the master from ever reading EIO, a stray master would
/// keep the terminal alive after its command).
fn open_pair() -> Result<(OwnedFd, File), PtyError> {
    let ptm = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(PtyError::Open)?;
    nix::pty::grantpt(&ptm).map_err(PtyError::Open)?;
    nix::pty::unlockpt(&ptm).map_err(PtyError::Open)?;
    let slave_path = nix::pty::ptsname_r(&ptm).map_err(PtyError::Open)?;
    // SAFETY: `into_raw_fd` hands over sole ownership of the open master.
    let master = unsafe { OwnedFd::from_raw_fd(ptm.into_raw_fd()) };
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&slave_path)
        .map_err(|source| PtyError::Slave {
            path: slave_path.clone(),
            source,
        })?;
    Ok((master, slave))
}

impl Shell {
    /// Opens a PTY and starts the shell as a session leader whose controlling
    /// terminal is the PTY slave, in `cgroup` when one is given.
    pub fn spawn(
        cfg: &ShellConfig,
        cgroup: Option<crate::cgroup::Group>,
    ) -> Result<Self, PtyError> {
        let mut cmd = Command::new(&cfg.program);
        cmd.args(&cfg.args)
            .env_clear()
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cfg.cwd);
        let master = attach(&mut cmd, 80, 24)?;
        let creds = cfg.creds;
        let procs = cgroup.as_ref().and_then(|g| g.procs_fd());
        // SAFETY: the closure runs in the child between fork and exec and only
        // makes async-signal-safe calls (setsid, ioctl, sigprocmask,
        // sigemptyset, sigaction, and enter_in_child's open, write, close,
        // setgroups, setgid, setuid); it allocates nothing and touches no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // stdin is the slave by now: make it the controlling terminal.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                reset_signals_in_child()?;
                // Last: the move into the cgroup needs root, and the image's
                // user is taken on after it.
                crate::cgroup::enter_in_child(procs, creds)
            });
        }
        let child = cmd.spawn().map_err(|source| PtyError::Spawn {
            program: cfg.program.display().to_string(),
            source,
        })?;
        let raw_pid = child.id();
        // Dropping `Child` neither kills nor reaps; this module reaps.
        drop(child);
        let pid = Pid::from_raw(raw_pid as libc::pid_t);
        let pidfd = match capsem_host::pidfd::pidfd_open(pid.as_raw().unsigned_abs()) {
            Ok(fd) => fd,
            Err(source) => {
                // Never leave the child behind.
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(PtyError::PidFd {
                    pid: raw_pid,
                    source,
                });
            }
        };
        fdio::set_nonblocking(master.as_fd()).map_err(PtyError::Configure)?;
        Ok(Self {
            master,
            pidfd,
            pid,
            status: Mutex::new(None),
            cgroup,
        })
    }

    /// Which of its cgroup's limits killed the shell, if one did.
    pub fn limit_hit(&self) -> Option<crate::cgroup::LimitHit> {
        self.cgroup.as_ref().and_then(|g| g.limit_hit())
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// The PTY master (nonblocking).
    pub fn master(&self) -> BorrowedFd<'_> {
        self.master.as_fd()
    }

    /// Readable once the shell has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Sets the terminal size (`TIOCSWINSZ`; the kernel sends SIGWINCH).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), PtyError> {
        set_winsize(self.master.as_fd(), cols, rows).map_err(|source| PtyError::Resize {
            cols,
            rows,
            source,
        })
    }

    /// The status, once taken.
    pub fn status(&self) -> Option<ShellStatus> {
        *self.lock_status()
    }

    /// Reaps the shell, blocking until it exits; returns the cached status
    /// after the first call.
    pub fn reap(&self) -> Result<ShellStatus, PtyError> {
        let mut status = self.lock_status();
        if let Some(s) = *status {
            return Ok(s);
        }
        let s = wait_exit(self.pid).map_err(|source| PtyError::Reap {
            pid: self.pid(),
            source,
        })?;
        *status = Some(s);
        Ok(s)
    }

    /// Hangs up the shell's process group (SIGHUP and SIGCONT), waits up to
    /// `grace` for the shell to exit, then SIGKILLs the group and reaps. The
    /// group is signalled only while the shell is unreaped, so its id cannot
    /// name another group.
    pub fn terminate(&self, grace: Duration) -> Result<ShellStatus, PtyError> {
        if let Some(s) = self.status() {
            return Ok(s);
        }
        // Every group in the shell's session, not only the shell's own: with
        // job control each job has its own group, and a shell too slow to
        // forward the hangup before the SIGKILL would leave its jobs behind.
        let groups = || session_groups(Path::new("/proc"), self.pid);
        for g in groups() {
            let _ = killpg(g, Signal::SIGHUP);
            let _ = killpg(g, Signal::SIGCONT);
        }
        let mut fds = [fdio::pollfd(self.pidfd.as_fd(), fdio::IN)];
        let _ = fdio::poll(&mut fds, Some(Instant::now() + grace));
        // Whatever is left goes now. The unreaped shell keeps its pid, and so
        // the session id, from being reused, so these groups are still ours.
        for g in groups() {
            let _ = killpg(g, Signal::SIGKILL);
        }
        self.reap()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Option<ShellStatus>> {
        match self.status.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Drop for Shell {
    /// An error path that drops an unreaped shell still kills and reaps it.
    fn drop(&mut self) {
        if self.status().is_none() {
            let _ = self.terminate(Duration::from_millis(500));
        }
    }
}

/// In a forked child before exec: an empty signal mask and default
/// dispositions. The agent blocks its termination signals (they arrive on a
/// signalfd); what it starts must begin with them unblocked.
///
/// # Safety
/// Only for a `pre_exec` closure: it makes async-signal-safe calls only
/// (sigemptyset, sigprocmask, sigaction) and allocates nothing.
pub unsafe fn reset_signals_in_child() -> io::Result<()> {
    // SAFETY: zeroed sigset_t/sigaction are valid inputs to these calls,
    // which only read and write the structures we pass.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in RESET_SIGNALS {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
    }
    Ok(())
}

/// Blocks until child `pid` has exited and reaps it.
pub fn wait_exit(pid: Pid) -> Result<ShellStatus, Errno> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(ShellStatus {
                    exit_code: Some(code),
                    signal: None,
                })
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Ok(ShellStatus {
                    exit_code: None,
                    signal: Some(sig as i32),
                })
            }
            // Stop/continue reports need WUNTRACED/WCONTINUED, not asked.
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The process groups of every process in session `sid` (the shell's,
/// always included), read from `/proc/<pid>/stat`.
fn session_groups(proc_root: &Path, sid: Pid) -> Vec<Pid> {
    let mut groups = vec![sid];
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return groups;
    };
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((pgid, session)) = parse_pgid_session(&stat) {
            if session == sid.as_raw() && pgid > 1 && !groups.contains(&Pid::from_raw(pgid)) {
                groups.push(Pid::from_raw(pgid));
            }
        }
    }
    groups
}

/// `(pgrp, session)` from a `/proc/<pid>/stat` line; the command name may
/// hold spaces and parentheses, so fields are counted after the last `)`.
fn parse_pgid_session(stat: &str) -> Option<(i32, i32)> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let _state = fields.next()?;
    let _ppid = fields.next()?;
    let pgid = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    Some((pgid, session))
}

fn set_winsize(master: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the valid pointer; the fd
    // is a PTY master borrowed for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_of_a_new_pty_are_close_on_exec() {
        let (master, slave) = open_pair().unwrap();
        for fd in [master.as_fd(), slave.as_fd()] {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }

    fn sh(script: &str) -> ShellConfig {
        ShellConfig {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), SHELL_PATH.into())],
            cwd: std::env::temp_dir(),
            creds: None,
        }
    }

    fn read_until_eio(master: BorrowedFd<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let mut fds = [fdio::pollfd(master, fdio::IN)];
            fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
            match fdio::read(master, &mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn shell_is_session_leader_with_a_controlling_tty_and_clean_env() {
        let shell = Shell::spawn(&sh("echo tty=$(tty) home=${HOME-unset}; exit 5"), None).unwrap();
        let out = String::from_utf8_lossy(&read_until_eio(shell.master())).into_owned();
        assert!(out.contains("tty=/dev/pts/"), "{out}");
        assert!(out.contains("home=unset"), "{out}");
        let status = shell.reap().unwrap();
        assert_eq!(
            status,
            ShellStatus {
                exit_code: Some(5),
                signal: None
            }
        );
        // Cached afterwards.
        assert_eq!(shell.reap().unwrap(), status);
    }

    #[test]
    fn pidfd_fires_even_when_a_background_job_holds_the_slave() {
        // The background sleep keeps the slave open after the shell exits.
        let shell = Shell::spawn(&sh("sleep 30 & exit 0"), None).unwrap();
        let mut fds = [fdio::pollfd(shell.pidfd(), fdio::IN)];
        let n = fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
        assert_eq!(n, 1, "shell exit must be visible on the pidfd");
        // The sleep is in the shell's group (no job control in sh -c); the
        // unreaped shell keeps the group id valid for this kill.
        killpg(Pid::from_raw(shell.pid() as i32), Signal::SIGKILL).unwrap();
        assert_eq!(shell.reap().unwrap().exit_code, Some(0));
    }

    #[test]
    fn stat_fields_after_an_odd_command_name() {
        assert_eq!(
            parse_pgid_session("42 (a) b (c) S 1 40 41 0 -1"),
            Some((40, 41))
        );
        assert_eq!(parse_pgid_session("garbage"), None);
    }

    #[test]
    fn terminate_kills_jobs_in_other_groups_of_the_session() {
        // A job in its own process group (as job control makes them) that
        // ignores the hangup, under a shell that ignores it too.
        let shell = Shell::spawn(
            &sh(
                "trap '' HUP; setpgid_job() { (trap '' HUP; exec sleep 1000) & }; \
             set -m; setpgid_job; echo job=$!; sleep 1000",
            ),
            None,
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let job: i32 = loop {
            let text = String::from_utf8_lossy(&seen).into_owned();
            if let Some(pid) = text
                .split("job=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse().ok())
            {
                break pid;
            }
            let mut fds = [fdio::pollfd(shell.master(), fdio::IN)];
            fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
            if let Ok(n) = fdio::read(shell.master(), &mut buf) {
                assert!(n > 0, "shell exited early");
                seen.extend_from_slice(&buf[..n]);
            }
        };
        let groups = session_groups(Path::new("/proc"), shell.pid);
        assert!(
            groups.len() >= 2,
            "the job should have its own group: {groups:?}"
        );
        shell.terminate(Duration::from_millis(100)).unwrap();
        let gone = (0..500).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{job}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .map(|r| r.trim_start().starts_with('Z'))
                });
            let dead = state.unwrap_or(true);
            if !dead {
                std::thread::sleep(Duration::from_millis(10));
            }
            dead
        });
        assert!(gone, "the job {job} in its own group survived");
    }

    #[test]
    fn terminate_hangs_up_the_group_and_reaps() {
        let shell = Shell::spawn(&sh("trap '' HUP; echo ready; sleep 30"), None).unwrap();
        // Wait until the trap is in place so the hangup is surely ignored.
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("ready") {
            let mut fds = [fdio::pollfd(shell.master(), fdio::IN)];
            fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
            if let Ok(n) = fdio::read(shell.master(), &mut buf) {
                assert!(n > 0, "shell exited early");
                seen.extend_from_slice(&buf[..n]);
            }
        }
        let status = shell.terminate(Duration::from_millis(100)).unwrap();
        assert_eq!(status.signal, Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn resize_is_seen_by_stty() {
        let shell = Shell::spawn(&sh("read _; stty size"), None).unwrap();
        shell.resize(123, 45).unwrap();
        fdio::write(shell.master(), b"\n").unwrap();
        let out = String::from_utf8_lossy(&read_until_eio(shell.master())).into_owned();
        assert!(out.contains("45 123"), "{out}");
        shell.reap().unwrap();
    }
}
