//! Finding host programs the way capsem-process does, and asking one its
//! version with a bound on time and output.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use capsem_host::pidfd::pidfd_open;

/// How long `PROGRAM --version` may take.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of `--version` output read.
pub const MAX_VERSION_OUTPUT: usize = 4096;

/// Errors asking a program its version.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run it")]
    Start(#[source] io::Error),
    #[error("cannot watch it (pidfd_open)")]
    Pidfd(#[source] io::Error),
    #[error("poll failed")]
    Poll(#[source] nix::Error),
    #[error("cannot read its output")]
    Read(#[source] io::Error),
    #[error("`--version` did not finish within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("`--version` failed ({0})")]
    Failed(ExitStatus),
    #[error("`--version` printed nothing")]
    Empty,
}

/// Where a program was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The environment override named it (it may not exist).
    Env {
        var: &'static str,
        path: PathBuf,
    },
    /// Found on `$PATH` or in `~/.cargo/bin`.
    Found(PathBuf),
    NotFound,
}

impl Lookup {
    pub fn path(&self) -> Option<&Path> {
        match self {
            Lookup::Env { path, .. } | Lookup::Found(path) => Some(path),
            Lookup::NotFound => None,
        }
    }
}

/// capsem-process's rule: `$var` if set, else the first `name` on `$PATH`
/// (a regular file), else `<home>/.cargo/bin/name`.
pub fn find_program(
    var: &'static str,
    env_value: Option<OsString>,
    name: &str,
    path_var: Option<OsString>,
    home: Option<OsString>,
) -> Lookup {
    if let Some(p) = env_value.filter(|v| !v.is_empty()) {
        return Lookup::Env {
            var,
            path: PathBuf::from(p),
        };
    }
    let cargo_bin = home.map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::split_paths(&path_var.unwrap_or_default())
        .chain(cargo_bin)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map_or(Lookup::NotFound, Lookup::Found)
}

/// A regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A child in its own process group, killed (the whole group) and reaped
/// on every path.
struct GroupChild {
    child: Child,
    reaped: bool,
}

impl GroupChild {
    /// Kills what is left of its group while the leader's zombie still pins
    /// the group id, then reaps the leader.
    fn finish(&mut self) -> io::Result<ExitStatus> {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let status = self.child.wait();
        self.reaped = true;
        status
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.finish();
        }
    }
}

/// The first non-empty line `bin --version` prints on stdout, control
/// characters replaced. Waits for it to exit (an event on its pidfd) for at
/// most `timeout`; its group is killed and it is reaped on every path.
pub fn version_line(bin: &Path, timeout: Duration) -> Result<String, ProbeError> {
    let mut cmd = Command::new(bin);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = GroupChild {
        child: cmd.spawn().map_err(ProbeError::Start)?,
        reaped: false,
    };
    let stdout: Option<OwnedFd> = child.child.stdout.take().map(OwnedFd::from);
    let pidfd = pidfd_open(child.child.id()).map_err(ProbeError::Pidfd)?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, wait) {
            Ok(0) => return Err(ProbeError::Timeout(timeout)),
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ProbeError::Poll(e)),
        }
    }
    // It has exited: what it printed is in the pipe (a version fits in the
    // pipe buffer). Non-blocking, so a descendant holding the pipe open
    // cannot make us wait.
    let mut out = Vec::new();
    if let Some(fd) = stdout {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map_err(|e| ProbeError::Read(e.into()))?;
        let mut file = std::fs::File::from(fd);
        let mut chunk = [0u8; 1024];
        while out.len() < MAX_VERSION_OUTPUT {
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ProbeError::Read(e)),
            }
        }
        out.truncate(MAX_VERSION_OUTPUT);
    }
    let status = child.finish().map_err(ProbeError::Read)?;
    if !status.success() {
        return Err(ProbeError::Failed(status));
    }
    first_line(&out).ok_or(ProbeError::Empty)
}

/// The first non-blank line, trimmed, control characters as spaces.
pub fn first_line(out: &[u8]) -> Option<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| {
            l.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn lookup_order_env_path_cargo_bin() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        let home = d.path().join("home");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(home.join(".cargo/bin")).unwrap();
        let find = |env: Option<&str>| {
            find_program(
                "X_BIN",
                env.map(OsString::from),
                "prog",
                Some(bin.clone().into()),
                Some(home.clone().into()),
            )
        };
        assert_eq!(find(None), Lookup::NotFound);
        script(&home.join(".cargo/bin"), "prog", "");
        assert_eq!(find(None), Lookup::Found(home.join(".cargo/bin/prog")));
        script(&bin, "prog", "");
        assert_eq!(find(None), Lookup::Found(bin.join("prog")));
        assert_eq!(find(Some("")), Lookup::Found(bin.join("prog")));
        assert_eq!(
            find(Some("/nope")),
            Lookup::Env {
                var: "X_BIN",
                path: "/nope".into()
            }
        );
        assert!(is_executable(&bin.join("prog")));
        assert!(!is_executable(Path::new("/nope")));
        assert!(!is_executable(&bin));
    }

    #[test]
    fn version_first_line() {
        let d = tempfile::tempdir().unwrap();
        let ok = script(d.path(), "ok", "printf '\\n  tool 1.2\\033[0m \\nmore\\n'");
        assert_eq!(version_line(&ok, VERSION_TIMEOUT).unwrap(), "tool 1.2 [0m");
        let fails = script(d.path(), "fails", "echo tool 1; exit 3");
        assert!(matches!(
            version_line(&fails, VERSION_TIMEOUT),
            Err(ProbeError::Failed(s)) if s.code() == Some(3)
        ));
        let silent = script(d.path(), "silent", "exit 0");
        assert!(matches!(
            version_line(&silent, VERSION_TIMEOUT),
            Err(ProbeError::Empty)
        ));
        assert!(matches!(
            version_line(&d.path().join("absent"), VERSION_TIMEOUT),
            Err(ProbeError::Start(_))
        ));
    }

    #[test]
    fn a_hanging_program_is_killed_with_its_group_and_reaped() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        // A background grandchild in the same group, then a hang.
        let hang = script(
            d.path(),
            "hang",
            &format!("sleep 60 & echo $! > {}\nexec sleep 60", pidfile.display()),
        );
        let start = Instant::now();
        let got = version_line(&hang, Duration::from_millis(300));
        assert!(matches!(got, Err(ProbeError::Timeout(_))), "{got:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild was killed: its pidfd is readable once it has
        // exited (ESRCH when it is already reaped).
        if let Ok(fd) = pidfd_open(pid as u32) {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let n = nix::poll::poll(&mut fds, PollTimeout::from(10_000u16)).unwrap();
            assert_eq!(n, 1, "grandchild {pid} still alive");
        }
    }
}
