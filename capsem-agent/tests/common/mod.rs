//! Helpers shared by the agent's end-to-end tests: deadlines, polls, /proc
//! readings, and the [`Agent`] guard whose Drop terminates the agent, kills
//! the shell's group if anything is left, and reaps, even when a test fails.

// Each test binary uses a different subset.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

pub fn deadline(d: Duration) -> Instant {
    Instant::now() + d
}

/// Polls `fd` for `events` until `until`; true when ready.
pub fn poll_fd(fd: BorrowedFd<'_>, events: i16, until: Instant) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 {
            return false;
        }
        assert_eq!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::Interrupted
        );
    }
}

/// Re-checks `cond` until it holds or `until` passes.
pub fn wait_until(until: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh fd owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `/proc/<pid>/stat` state letter, None when the pid is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

pub fn count_dir(path: String) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// The agent process; Drop terminates, kills leftovers, reaps.
pub struct Agent {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub shell_pid: Option<u32>,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the agent to exit (pidfd poll), returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let fd = pidfd(child.id()).expect("pidfd of the agent");
        if !poll_fd(fd.as_fd(), libc::POLLIN, deadline(within)) {
            return None;
        }
        let status = child.wait().unwrap();
        self.child = None;
        Some(status)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signals our own unreaped child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                if let Some(c) = self.child.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                self.child = None;
            }
        }
        if let Some(shell) = self.shell_pid {
            if matches!(proc_state(shell), Some(s) if s != 'Z') {
                // SAFETY: kill takes plain integers; the group is the shell's.
                unsafe { libc::kill(-(shell as i32), libc::SIGKILL) };
            }
        }
    }
}

/// Thread names of `pid`.
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| {
                let p = e.ok()?.path().join("comm");
                Some(std::fs::read_to_string(p).ok()?.trim().to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Polls `fd` until readable or `until`; true when readable.
pub fn poll_readable(fd: BorrowedFd<'_>, until: Instant) -> bool {
    poll_fd(fd, libc::POLLIN, until)
}
