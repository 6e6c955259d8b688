//! Process identity: a pid is trusted only together with its start time and
//! one argv element that must match exactly (never a substring), so a pid
//! that was recycled for an unrelated process is never signalled.
//!
//! The start time is field 22 of `/proc/PID/stat` (clock ticks since boot),
//! read after the last `)` so a command name with spaces or parentheses
//! cannot shift the fields.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// Who a pid was when it was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    /// What the process is to the VM: `capsem-process`, `capsem-agent`,
    /// `qemu`, `vhost-device-vsock`, `owner`.
    pub role: String,
    pub pid: u32,
    /// `/proc/PID/stat` field 22.
    pub start_time: u64,
    /// An element of the process's argv that must be exactly equal.
    pub marker: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("pid {0} is not running")]
    Gone(u32),
    #[error("cannot read /proc/{pid}")]
    Proc {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("/proc/{0}/stat is malformed")]
    Malformed(u32),
    #[error("pid {pid} has no argv element equal to {marker:?}")]
    NoMarker { pid: u32, marker: String },
}

/// What a recorded pid is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The same process is running.
    Alive,
    /// No process has that pid (or it is a zombie).
    Gone,
    /// The pid belongs to another process now; never signal it.
    Reused(String),
}

fn proc_err(pid: u32, source: io::Error) -> IdentityError {
    if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
        IdentityError::Gone(pid)
    } else {
        IdentityError::Proc { pid, source }
    }
}

/// The fields after the command name in `/proc/PID/stat`: state, ppid, ...
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_ascii_whitespace().collect())
}

/// `(state, start_time)` from the text of `/proc/PID/stat`.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let fields = stat_fields(stat)?;
    // Field 3 (state) is index 0 here, field 22 (starttime) is index 19.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The argv of a running process, one element per NUL-terminated string.
pub fn argv(pid: u32) -> Result<Vec<Vec<u8>>, IdentityError> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| proc_err(pid, e))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Whether `argv` has an element exactly equal to `marker`.
pub fn has_exact_element(argv: &[Vec<u8>], marker: &str) -> bool {
    argv.iter().any(|a| a.as_slice() == marker.as_bytes())
}

/// `(state, start_time)` of a running pid.
fn stat(pid: u32) -> Result<(char, u64), IdentityError> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| proc_err(pid, e))?;
    parse_stat(&text).ok_or(IdentityError::Malformed(pid))
}

/// Records a live process, checking that `marker` is one of its argv
/// elements.
pub fn capture(role: &str, pid: u32, marker: &str) -> Result<ProcRecord, IdentityError> {
    let (_, start_time) = stat(pid)?;
    if !has_exact_element(&argv(pid)?, marker) {
        return Err(IdentityError::NoMarker {
            pid,
            marker: marker.into(),
        });
    }
    Ok(ProcRecord {
        role: role.into(),
        pid,
        start_time,
        marker: marker.into(),
    })
}

/// Records a process just spawned with `marker` among its arguments. Its
/// argv is not checked: it may not have called exec yet, and its start time
/// (the fork's) is already final.
pub fn record(role: &str, pid: u32, marker: &str) -> Result<ProcRecord, IdentityError> {
    let (_, start_time) = stat(pid)?;
    Ok(ProcRecord {
        role: role.into(),
        pid,
        start_time,
        marker: marker.into(),
    })
}

impl ProcRecord {
    /// Whether the recorded process is still the one running under its pid.
    pub fn liveness(&self) -> Liveness {
        let (state, start) = match stat(self.pid) {
            Ok(s) => s,
            Err(IdentityError::Gone(_)) => return Liveness::Gone,
            Err(e) => return Liveness::Reused(e.to_string()),
        };
        if state == 'Z' || state == 'X' {
            return Liveness::Gone;
        }
        if start != self.start_time {
            return Liveness::Reused(format!(
                "pid {} started at tick {start}, not {}",
                self.pid, self.start_time
            ));
        }
        match argv(self.pid) {
            Ok(argv) if has_exact_element(&argv, &self.marker) => Liveness::Alive,
            Ok(_) => Liveness::Reused(format!(
                "pid {} has no argv element equal to {:?}",
                self.pid, self.marker
            )),
            Err(IdentityError::Gone(_)) => Liveness::Gone,
            Err(e) => Liveness::Reused(e.to_string()),
        }
    }

    /// A pidfd for the recorded process, opened before the identity check
    /// so that the fd cannot refer to a later process with the same pid.
    pub fn open_verified(&self) -> Result<OwnedFd, Liveness> {
        let fd = crate::pidfd::pidfd_open(self.pid).map_err(|_| Liveness::Gone)?;
        match self.liveness() {
            Liveness::Alive => Ok(fd),
            other => Err(other),
        }
    }

    /// Sends `signal` to the recorded process's group (when it leads one)
    /// and to the process itself, only if its identity checks out. Returns
    /// whether it was signalled.
    pub fn signal_verified(&self, signal: i32) -> Result<bool, Liveness> {
        let fd = match self.open_verified() {
            Ok(fd) => fd,
            Err(Liveness::Gone) => return Ok(false),
            Err(other) => return Err(other),
        };
        Ok(signal_group_by_pidfd(&fd, self.pid, signal))
    }
}

/// Whether the process behind `pidfd` has exited.
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd for the length given; zero timeout.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n != 0
}

/// Signals the process group led by `pid` and then `pid` itself through its
/// pidfd. The group is signalled only while the leader is alive (its pidfd
/// not readable), when its pid cannot have been recycled.
pub fn signal_group_by_pidfd(pidfd: &OwnedFd, pid: u32, signal: i32) -> bool {
    if pidfd_exited(pidfd) {
        return false;
    }
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: getpgid takes a pid and returns a pgid or -1.
    let leads_group = unsafe { libc::getpgid(raw) } == raw;
    if leads_group {
        // SAFETY: kill with a negative pid signals that process group.
        unsafe { libc::kill(-raw, signal) };
    }
    // SAFETY: pidfd_send_signal on our own pidfd, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0 || leads_group
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parses_stat_after_the_last_paren() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1000 1";
        assert_eq!(parse_stat(stat), Some(('S', 98765)));
        assert_eq!(parse_stat("42 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn exact_element_never_a_substring() {
        let argv = vec![b"qemu".to_vec(), b"-name".to_vec(), b"vm-10".to_vec()];
        assert!(has_exact_element(&argv, "vm-10"));
        assert!(!has_exact_element(&argv, "vm-1"));
        assert!(!has_exact_element(&argv, "-nam"));
    }

    #[test]
    fn a_live_process_checks_out_and_a_changed_record_does_not() {
        // `read` is a builtin: the shell forks nothing that could outlive
        // its SIGKILL below (a `sleep` child did, holding the test's stdout).
        let mut child = Command::new("sh")
            .args(["-c", "read x", "marker-xyz"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Until the child has exec'd, its argv is still ours.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let rec = loop {
            match capture("test", child.id(), "marker-xyz") {
                Ok(rec) => break rec,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        };
        assert_eq!(rec.liveness(), Liveness::Alive);
        assert!(capture("test", child.id(), "marker-x").is_err());
        // Same pid, different start time: a recycled pid.
        let reused = ProcRecord {
            start_time: rec.start_time + 1,
            ..rec.clone()
        };
        assert!(matches!(reused.liveness(), Liveness::Reused(_)));
        assert!(reused.signal_verified(libc::SIGKILL).is_err());
        // Same pid and start time but a substring marker.
        let substring = ProcRecord {
            marker: "marker".into(),
            ..rec.clone()
        };
        assert!(matches!(substring.liveness(), Liveness::Reused(_)));
        assert!(child.try_wait().unwrap().is_none(), "never signalled");
        assert_eq!(rec.signal_verified(libc::SIGKILL), Ok(true));
        child.wait().unwrap();
        assert_eq!(rec.liveness(), Liveness::Gone);
        assert_eq!(rec.signal_verified(libc::SIGKILL), Ok(false));
    }
}
