//! The agent-lifetime watcher thread (`capsem-cgroup-watch`).
//!
//! One inotify fd watches every group's `pids.events` and `memory.events`
//! (cgroup2 marks them modified on each new event). On a change it reads
//! each group under the parent and writes `cgroup.kill` to one that hit its
//! pids limit or saw an OOM kill: a fork bomb at `pids.max` would otherwise
//! spin there forever. The command's own loop then sees its exit as for any
//! other death. The thread waits in one poll on the inotify fd and its stop
//! eventfd; it is stopped and joined when the watcher drops.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::warn;

use super::{kill, read_hit, CgroupError, Limits};
use crate::fdio;
use crate::stop::StopSignal;

/// The running watcher; stopped and joined on drop.
#[derive(Debug)]
pub struct Watcher {
    inotify: Arc<Inotify>,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(parent: PathBuf, limits: Limits) -> Result<Self, CgroupError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map(Arc::new)
            .map_err(|source| CgroupError::Watch {
                path: parent.clone(),
                source,
            })?;
        let stop = Arc::new(StopSignal::new().map_err(|e| CgroupError::Start(io_error(e)))?);
        let (i, s) = (inotify.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("capsem-cgroup-watch".into())
            .spawn(move || run(&parent, &limits, &i, &s))
            .map_err(CgroupError::Start)?;
        Ok(Self {
            inotify,
            stop,
            thread: Some(thread),
        })
    }

    /// Watches the new group `dir` (before anything runs in it).
    pub fn add(&self, dir: &Path) -> Result<(), CgroupError> {
        for name in ["pids.events", "memory.events"] {
            let path = dir.join(name);
            self.inotify
                .add_watch(&path, AddWatchFlags::IN_MODIFY)
                .map_err(|source| CgroupError::Watch { path, source })?;
        }
        Ok(())
    }
}

fn io_error(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the cgroup watcher thread panicked");
            }
        }
    }
}

fn run(parent: &Path, limits: &Limits, inotify: &Inotify, stop: &StopSignal) {
    // Groups already killed: each is reported once.
    let mut killed = HashSet::new();
    loop {
        let mut fds = [
            fdio::pollfd(inotify.as_fd(), fdio::IN),
            fdio::pollfd(stop.fd(), fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, None) {
            warn!("cgroup watcher poll failed: {e}; it stops");
            return;
        }
        if fdio::ready(&fds[1]) {
            return;
        }
        // Drain: the events say only that something changed.
        while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
        scan(parent, limits, &mut killed);
    }
}

/// Kills each group under `parent` that hit a limit and was not killed yet.
fn scan(parent: &Path, limits: &Limits, killed: &mut HashSet<OsString>) {
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) => {
            warn!(parent = %parent.display(), "cannot list the cgroups: {e}");
            return;
        }
    };
    let mut present = HashSet::new();
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        present.insert(name.clone());
        if killed.contains(&name) {
            continue;
        }
        let dir = entry.path();
        if let Some(hit) = read_hit(&dir, limits) {
            match kill(&dir) {
                Ok(()) => warn!(cgroup = %dir.display(), ?hit, "limit reached: cgroup killed"),
                Err(e) => warn!(cgroup = %dir.display(), ?hit, "cannot kill the cgroup: {e}"),
            }
            killed.insert(name);
        }
    }
    killed.retain(|n| present.contains(n));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_kills_only_groups_that_hit_a_limit_and_each_once() {
        let parent = tempfile::tempdir().unwrap();
        let l = Limits::for_memory(1 << 30);
        let mk = |name: &str, pids: &str| {
            let d = parent.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("pids.events"), pids).unwrap();
            d
        };
        let bomb = mk("shell-1", "max 5\n");
        let calm = mk("exec-2", "max 0\n");
        std::fs::write(parent.path().join("cgroup.procs"), "").unwrap();
        let mut killed = HashSet::new();
        scan(parent.path(), &l, &mut killed);
        assert_eq!(
            std::fs::read_to_string(bomb.join("cgroup.kill")).unwrap(),
            "1"
        );
        assert!(!calm.join("cgroup.kill").exists());
        assert_eq!(killed.len(), 1);
        // Once killed, not again; a removed group is forgotten.
        std::fs::remove_file(bomb.join("cgroup.kill")).unwrap();
        scan(parent.path(), &l, &mut killed);
        assert!(!bomb.join("cgroup.kill").exists());
        std::fs::remove_dir_all(&bomb).unwrap();
        scan(parent.path(), &l, &mut killed);
        assert!(killed.is_empty());
    }

    #[test]
    fn the_thread_wakes_on_a_change_and_stops_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let d = parent.path().join("exec-1");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("pids.events"), "max 0\n").unwrap();
        std::fs::write(d.join("memory.events"), "oom_kill 0\n").unwrap();
        let w = Watcher::start(parent.path().into(), Limits::for_memory(1 << 30)).unwrap();
        w.add(&d).unwrap();
        // A watch on the kill file's directory tells when the thread wrote it.
        let seen = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).unwrap();
        seen.add_watch(&d, AddWatchFlags::IN_CLOSE_WRITE).unwrap();
        std::fs::write(d.join("memory.events"), "oom_kill 1\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        'wait: loop {
            let mut fds = [fdio::pollfd(seen.as_fd(), fdio::IN)];
            assert!(
                fdio::poll(&mut fds, Some(deadline)).unwrap() > 0,
                "no kill within 30 s"
            );
            for e in seen.read_events().unwrap_or_default() {
                if e.name.as_deref() == Some("cgroup.kill".as_ref()) {
                    break 'wait;
                }
            }
        }
        assert_eq!(std::fs::read_to_string(d.join("cgroup.kill")).unwrap(), "1");
        drop(w);
    }
}
