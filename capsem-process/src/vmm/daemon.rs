//! Starting one of a VM's daemons (vhost-device-vsock, virtiofsd, QEMU):
//! finding its program, its log file, its own session, and waiting for the
//! socket it serves.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::VmmError;
use crate::reaper::Child;

/// How long a daemon may take to create its socket.
const READY_WAIT: Duration = Duration::from_secs(10);

/// `$ENV`, else the first `name` on `$PATH`, else `~/.cargo/bin/name`.
pub fn find_program(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn log_file(path: &Path) -> Result<std::fs::File, VmmError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| VmmError::Prepare {
            path: path.into(),
            source,
        })
}

/// Own session, default signal mask: the children must not share our
/// terminal or inherit our blocked signals.
pub fn detach(cmd: &mut Command) {
    // SAFETY: setsid and sigprocmask are async-signal-safe and touch only
    // the new child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Waits until `sock` exists, or `child` (the program `what`) exits, or the
/// deadline passes: inotify and the child's pidfd in one poll set.
pub fn wait_for_socket(what: &str, sock: &Path, child: &Child, log: &Path) -> Result<(), VmmError> {
    let dir = sock.parent().unwrap_or(Path::new("."));
    let fail = |why: String| VmmError::Backend(format!("{why} (see {})", log.display()));
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| fail(format!("inotify: {e}")))?;
    inotify
        .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .map_err(|e| fail(format!("inotify watch: {e}")))?;
    let pidfd =
        capsem_host::pidfd::pidfd_open(child.pid).map_err(|e| fail(format!("pidfd_open: {e}")))?;
    let deadline = std::time::Instant::now() + READY_WAIT;
    loop {
        // Checked after the watch exists, so a creation in between is seen.
        if sock.exists() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(fail(format!(
                "{what} did not create {} within {READY_WAIT:?}",
                sock.display()
            )));
        }
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
        ];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(fail(format!("poll: {e}"))),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) && !sock.exists() {
            return Err(fail(format!("{what} exited before it was ready")));
        }
        // Drain the events; only the socket's existence matters.
        let _ = inotify.read_events();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_override_wins_for_programs() {
        // A path that exists, named through an env var unique to this test.
        std::env::set_var("CAPSEM_TEST_FIND_PROGRAM", "/bin/sh");
        assert_eq!(
            find_program("CAPSEM_TEST_FIND_PROGRAM", "no-such-program"),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            find_program("CAPSEM_TEST_UNSET_VAR", "no-such-program-xyz"),
            None
        );
    }
}
