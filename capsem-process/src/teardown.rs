//! The descendant sweep of teardown: every process whose parent is us (all
//! descendants end up our children, since we are a child subreaper) is
//! killed by process group, then by pid, and reaped until `ECHILD`.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpgrp, getpid, Pid};
use tracing::{info, warn};

use crate::reaper::{Reaper, Sweep};

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("cannot remove {path}")]
    Remove {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `(pid, ppid, pgid)` from one `/proc/<pid>/stat` line. The command name
/// may contain spaces and parentheses, so fields are counted after the
/// last `)`.
pub fn parse_stat(line: &str) -> Option<(i32, i32, i32)> {
    let pid = line.split_once(' ')?.0.parse().ok()?;
    let rest = &line[line.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((pid, ppid, pgid))
}

/// Our children as `(pid, pgid)`.
fn children() -> Vec<(i32, i32)> {
    let me = getpid().as_raw();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .filter(|&(_, ppid, _)| ppid == me)
        .map(|(pid, _, pgid)| (pid, pgid))
        .collect()
}

/// SIGKILLs every child's process group (other than ours) and the child.
/// Runs with reaping paused, so each pid is still our unreaped child.
pub fn kill_children(reaper: &Reaper) -> usize {
    reaper.with_reaping_paused(|| {
        let ours = getpgrp().as_raw();
        let kids = children();
        let mut groups: Vec<i32> = kids
            .iter()
            .map(|&(_, g)| g)
            .filter(|&g| g != ours && g > 1)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        for g in groups {
            let _ = kill(Pid::from_raw(-g), Signal::SIGKILL);
        }
        for &(pid, _) in &kids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        kids.len()
    })
}

/// Kills and reaps descendants until we have no children (`ECHILD`), or
/// the deadline passes.
pub async fn reap_all(reaper: &Reaper, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    let mut sweeps = reaper.sweeps();
    loop {
        let killed = kill_children(reaper);
        if killed > 0 {
            info!("killed {killed} remaining child process(es) and their groups");
        }
        let (swept, ours) = reaper.numbered_sweep();
        if swept == Sweep::NoChildren {
            return;
        }
        // The reaper task sweeps again on the next SIGCHLD; our own sweep
        // is not a reason to scan again (that was a busy loop while a
        // killed QEMU took its time to exit).
        if tokio::time::timeout_at(deadline, sweeps.wait_for(|n| *n != ours))
            .await
            .is_err()
        {
            warn!("children remain after {within:?}: {:?}", children());
            return;
        }
    }
}

/// Removes a socket file if it is there.
pub fn remove_file(path: &Path) -> Result<(), TeardownError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TeardownError::Remove {
            path: path.into(),
            source,
        }),
    }
}

/// Removes the VM directory of a temporary VM.
pub fn remove_dir(path: &Path) -> Result<(), TeardownError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TeardownError::Remove {
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        assert_eq!(
            parse_stat("123 (sleep) S 45 123 123 0 -1 4194560 100"),
            Some((123, 45, 123))
        );
        assert_eq!(parse_stat("7 (a) b) (c) R 1 6 6 0"), Some((7, 1, 6)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn our_own_stat_parses() {
        let me = fs::read_to_string("/proc/self/stat").unwrap();
        let (pid, _, pgid) = parse_stat(&me).unwrap();
        assert_eq!(pid, getpid().as_raw());
        assert_eq!(pgid, getpgrp().as_raw());
    }
}
