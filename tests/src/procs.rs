//! Process bookkeeping for tests: a subreaper, descendant listing, group kill.

use std::collections::{BTreeSet, HashMap};
use std::fs;

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, Pid};

/// Makes this process the reaper of every orphaned descendant, so processes
/// that a test's children start in new sessions cannot escape the
/// leftover check.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument
    // and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        rc,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
}

/// One line of /proc/PID/stat, the parts we need.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub state: char,
    pub cmdline: Vec<String>,
}

fn read_stat(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default();
    Some(ProcInfo {
        pid,
        ppid,
        pgid,
        state,
        cmdline,
    })
}

fn all_processes() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// Every live (non-zombie) descendant of this process.
pub fn descendants() -> Vec<ProcInfo> {
    let me = getpid().as_raw();
    let procs = all_processes();
    let by_pid: HashMap<i32, &ProcInfo> = procs.iter().map(|p| (p.pid, p)).collect();
    procs
        .iter()
        .filter(|p| p.state != 'Z' && p.pid != me)
        .filter(|p| {
            let mut cur = p.ppid;
            for _ in 0..64 {
                if cur == me {
                    return true;
                }
                match by_pid.get(&cur) {
                    Some(parent) => cur = parent.ppid,
                    None => return false,
                }
            }
            false
        })
        .cloned()
        .collect()
}

/// Reaps every exited child without blocking.
pub fn reap_zombies() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// SIGKILLs every descendant and its process group, then reaps.
pub fn kill_all_descendants() {
    let me = getpid().as_raw();
    // SAFETY: getpgrp has no arguments and cannot fail.
    let my_group = unsafe { libc::getpgrp() };
    for _ in 0..20 {
        let left = descendants();
        if left.is_empty() {
            break;
        }
        let groups: BTreeSet<i32> = left
            .iter()
            .map(|p| p.pgid)
            .filter(|g| *g != my_group && *g > 1)
            .collect();
        for g in groups {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
        for p in &left {
            if p.pid != me {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        // Blocking reap of what we just killed; every one of them is our
        // descendant, and orphans are reparented to us.
        while let Ok(status) = waitpid(Pid::from_raw(-1), None) {
            if matches!(status, WaitStatus::StillAlive) {
                break;
            }
        }
    }
    reap_zombies();
}

/// Thread and open-fd counts of a process.
pub fn thread_and_fd_counts(pid: u32) -> std::io::Result<(usize, usize)> {
    let threads = fs::read_dir(format!("/proc/{pid}/task"))?.count();
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((threads, fds))
}

/// A KiB field of `/proc/PID/status` (`VmRSS`, `RssShmem`, ...), if the
/// process and the field exist.
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// What a process holds: threads, open fds, resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub threads: usize,
    pub fds: usize,
    pub rss_kib: u64,
}

impl Usage {
    /// Now, from `/proc/PID/{task,fd,status}` (`VmRSS`).
    pub fn of(pid: i32) -> std::io::Result<Self> {
        let (threads, fds) = thread_and_fd_counts(pid as u32)?;
        let rss_kib = status_kib(pid, "VmRSS")
            .ok_or_else(|| std::io::Error::other(format!("no VmRSS for {pid}")))?;
        Ok(Self {
            threads,
            fds,
            rss_kib,
        })
    }

    /// Whether no count is over `base`'s by more than `slack`'s.
    pub fn within(self, base: Self, slack: Self) -> bool {
        self.threads <= base.threads + slack.threads
            && self.fds <= base.fds + slack.fds
            && self.rss_kib <= base.rss_kib + slack.rss_kib
    }

    /// The larger of each count.
    pub fn max(self, other: Self) -> Self {
        Self {
            threads: self.threads.max(other.threads),
            fds: self.fds.max(other.fds),
            rss_kib: self.rss_kib.max(other.rss_kib),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_kib_reads_a_field_of_this_process() {
        let me = std::process::id() as i32;
        assert!(status_kib(me, "VmRSS").is_some_and(|kib| kib > 0));
        assert_eq!(status_kib(me, "VmRS"), None, "a whole field name only");
        assert_eq!(status_kib(me, "NoSuchField"), None);
        assert_eq!(status_kib(i32::MAX, "VmRSS"), None, "no such process");
    }

    #[test]
    fn an_escaped_orphan_is_seen_then_killed() {
        become_subreaper();
        // sh starts a new-session sleep and exits at once: the sleep is an
        // orphan that only the subreaper keeps in view.
        let status = std::process::Command::new("sh")
            .args(["-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 &"])
            .status()
            .unwrap();
        assert!(status.success());
        let seen = (0..500).any(|_| {
            let found = descendants()
                .iter()
                .any(|p| p.cmdline.first().is_some_and(|c| c == "sleep"));
            if !found {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            found
        });
        assert!(seen, "the orphaned sleep was not seen as a descendant");
        kill_all_descendants();
        assert!(descendants().is_empty(), "{:?}", descendants());
    }

    #[test]
    fn stat_parses_ourselves() {
        let me = read_stat(getpid().as_raw()).expect("own stat");
        assert_eq!(me.pid, getpid().as_raw());
        assert!(me.ppid > 0);
        assert!(!me.cmdline.is_empty());
    }
}
