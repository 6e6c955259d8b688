//! The only caller of `waitpid` in this process.
//!
//! Children are spawned with `std::process::Command` through [`Reaper::spawn`]
//! (never `tokio::process`, whose own reaping would race ours). One task
//! wakes on SIGCHLD and loops `waitpid(-1, WNOHANG)`: the exit of a known
//! child is published on its watch channel, any other reaped process (an
//! orphan reparented to us, the child subreaper) is logged.
//!
//! The registry lock is held while spawning and while killing, so a pid we
//! signal is always an unreaped child of ours: it cannot have been recycled.
//!
//! Processes adopted from a crashed capsem-process ([`Reaper::adopt`]) are
//! not our children: their exit is watched through a pidfd opened before
//! their identity was checked, and they are signalled only while that pidfd
//! says they are alive (so their pid cannot have been recycled).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("cannot install the SIGCHLD handler")]
    Signal(#[source] io::Error),
    #[error("cannot start {name}")]
    Spawn {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// How a child ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => {
                let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "signal {s} ({name})")
            }
            (None, None) => f.write_str("unknown status"),
        }
    }
}

/// A child spawned through the reaper.
#[derive(Debug, Clone)]
pub struct Child {
    pub name: String,
    pub pid: u32,
    /// `Some` once the child was reaped.
    pub exit: watch::Receiver<Option<ExitStatus>>,
}

impl Child {
    /// Resolves when the child has been reaped.
    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        let status = match rx.wait_for(Option::is_some).await {
            Ok(s) => *s,
            // The reaper is gone: only happens when the process is ending.
            Err(_) => None,
        };
        status.unwrap_or(ExitStatus {
            code: None,
            signal: None,
        })
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

#[derive(Debug)]
struct Known {
    name: String,
    tx: watch::Sender<Option<ExitStatus>>,
}

#[derive(Debug, Default)]
struct Registry {
    /// Known children not reaped yet.
    live: HashMap<i32, Known>,
    /// Adopted processes (not our children), by pid, with their pidfds.
    adopted: HashMap<i32, Arc<std::os::fd::OwnedFd>>,
}

/// Result of one `waitpid` sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// `ECHILD`: we have no children at all.
    NoChildren,
    /// Some children are still running.
    ChildrenRemain,
}

#[derive(Debug)]
struct Inner {
    registry: Mutex<Registry>,
    /// Bumped after every sweep, so a waiter can await the next one.
    swept: watch::Sender<u64>,
    /// One pidfd watcher per adopted process, joined by [`Reaper::stop`].
    watchers: Mutex<tokio::task::JoinSet<()>>,
}

/// Handle to the reaper; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

impl Reaper {
    /// Installs the SIGCHLD stream and starts the reaping task. Must run
    /// before anything is spawned.
    pub fn start() -> Result<(Self, JoinHandle<()>), ReaperError> {
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let reaper = Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry::default()),
                swept: watch::channel(0).0,
                watchers: Mutex::new(tokio::task::JoinSet::new()),
            }),
        };
        let task_reaper = reaper.clone();
        let task = tokio::spawn(async move {
            // A child may have exited before the stream existed.
            task_reaper.sweep();
            while sigchld.recv().await.is_some() {
                task_reaper.sweep();
            }
        });
        Ok((reaper, task))
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the map consistent enough.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns `cmd` and registers its pid before any sweep can reap it.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Result<Child, ReaperError> {
        let mut reg = self.lock();
        let child = cmd.spawn().map_err(|source| ReaperError::Spawn {
            name: name.into(),
            source,
        })?;
        let pid = child.id();
        // Dropping a std Child neither waits nor kills: the reaper owns it now.
        drop(child);
        let (tx, rx) = watch::channel(None);
        reg.live.insert(
            pid as i32,
            Known {
                name: name.into(),
                tx,
            },
        );
        Ok(Child {
            name: name.into(),
            pid,
            exit: rx,
        })
    }

    /// Watches a process that is not our child (adopted from a crashed
    /// capsem-process): `pidfd` must have been opened before its identity
    /// was checked. Its status is unknown when it exits (its parent reaps it).
    pub fn adopt(
        &self,
        name: &str,
        pid: u32,
        pidfd: std::os::fd::OwnedFd,
    ) -> Result<Child, ReaperError> {
        let spawn_err = |source: io::Error| ReaperError::Spawn {
            name: name.into(),
            source,
        };
        let watch_fd = pidfd.try_clone().map_err(spawn_err)?;
        // SAFETY: `watch_fd` is an OwnedFd moved into the AsyncFd, which owns
        // it (and closes it only after deregistering) for its whole life.
        let async_fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                watch_fd,
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| spawn_err(e.into()))?;
        let (tx, rx) = watch::channel(None);
        self.lock().adopted.insert(pid as i32, Arc::new(pidfd));
        let reaper = self.clone();
        let task_name = name.to_owned();
        let mut watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        watchers.spawn(async move {
            let _ = async_fd.readable().await;
            reaper.lock().adopted.remove(&(pid as i32));
            info!("{task_name} (pid {pid}, adopted) exited");
            tx.send_replace(Some(ExitStatus::default()));
        });
        Ok(Child {
            name: name.into(),
            pid,
            exit: rx,
        })
    }

    /// Stops the reaping task (`task`, from [`Reaper::start`]) and the
    /// adopted processes' watchers, and waits for all of them.
    pub async fn stop(&self, task: JoinHandle<()>) {
        task.abort();
        let _ = task.await;
        let mut watchers = std::mem::take(
            &mut *self
                .inner
                .watchers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        watchers.shutdown().await;
    }

    /// Reaps every exited child without blocking and publishes known exits.
    pub fn sweep(&self) -> Sweep {
        self.numbered_sweep().0
    }

    /// [`Reaper::sweep`], with the number it gave this sweep (what
    /// [`Reaper::sweeps`] then holds): waiting for a different number
    /// waits for the next sweep of anyone else, and misses none.
    pub fn numbered_sweep(&self) -> (Sweep, u64) {
        let mut reg = self.lock();
        let outcome = loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break Sweep::ChildrenRemain,
                Ok(WaitStatus::Exited(pid, code)) => reaped(
                    &mut reg,
                    pid,
                    ExitStatus {
                        code: Some(code),
                        signal: None,
                    },
                ),
                Ok(WaitStatus::Signaled(pid, sig, _)) => reaped(
                    &mut reg,
                    pid,
                    ExitStatus {
                        code: None,
                        signal: Some(sig as i32),
                    },
                ),
                // Stops and continues are not exits (we do not ask for them).
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => break Sweep::NoChildren,
                Err(e) => {
                    warn!("waitpid failed: {e}");
                    break Sweep::ChildrenRemain;
                }
            }
        };
        drop(reg);
        let mut number = 0;
        self.inner.swept.send_modify(|n| {
            *n = n.wrapping_add(1);
            number = *n;
        });
        (outcome, number)
    }

    /// A receiver that changes after every sweep.
    pub fn sweeps(&self) -> watch::Receiver<u64> {
        self.inner.swept.subscribe()
    }

    /// Sends `sig` to the process group led by `child` if the child has not
    /// been reaped (so the group id still names our child's group).
    pub fn kill_group(&self, child: &Child, sig: Signal) -> bool {
        let reg = self.lock();
        if let Some(pidfd) = reg.adopted.get(&(child.pid as i32)) {
            return capsem_host::identity::signal_group_by_pidfd(pidfd, child.pid, sig as i32);
        }
        if !reg.live.contains_key(&(child.pid as i32)) {
            return false;
        }
        let ok = kill(Pid::from_raw(-(child.pid as i32)), sig).is_ok();
        // The leader itself, in case it left its group.
        let _ = kill(Pid::from_raw(child.pid as i32), sig);
        ok
    }

    /// Runs `f` with reaping paused: every pid that is our child while `f`
    /// runs stays our (unreaped, unrecyclable) child.
    pub fn with_reaping_paused<R>(&self, f: impl FnOnce() -> R) -> R {
        let _reg = self.lock();
        f()
    }
}

fn reaped(reg: &mut Registry, pid: Pid, status: ExitStatus) {
    match reg.live.remove(&pid.as_raw()) {
        Some(known) => {
            info!("{} (pid {pid}) exited: {status}", known.name);
            known.tx.send_replace(Some(status));
        }
        None => info!("reaped orphan pid {pid}: {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_display() {
        let s = ExitStatus {
            code: Some(3),
            signal: None,
        };
        assert_eq!(s.to_string(), "exit code 3");
        let s = ExitStatus {
            code: None,
            signal: Some(9),
        };
        assert_eq!(s.to_string(), "signal 9 (SIGKILL)");
    }

    // One test owns every waitpid in this test binary: tests in other files
    // of this crate spawn no children.
    #[tokio::test]
    async fn reaps_known_children_and_reports_status() {
        let (reaper, task) = Reaper::start().unwrap();
        let child = reaper
            .spawn("sh", Command::new("sh").args(["-c", "exit 7"]))
            .unwrap();
        assert_eq!(child.exited().await.code, Some(7));
        assert!(child.has_exited());
        // A killed group reports the signal.
        let mut cmd = Command::new("sleep");
        cmd.arg("100");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = reaper.spawn("sleep", &mut cmd).unwrap();
        assert!(reaper.kill_group(&child, Signal::SIGKILL));
        assert_eq!(child.exited().await.signal, Some(9));
        assert!(!reaper.kill_group(&child, Signal::SIGKILL), "reaped child");
        // Each sweep gets a new, growing number, and waiting for a number
        // other than ours ends at the next sweep: reap_all waits so.
        let (_, ours) = reaper.numbered_sweep();
        let mut sweeps = reaper.sweeps();
        let (_, next) = reaper.numbered_sweep();
        assert!(next > ours, "{next} after {ours}");
        assert!(*sweeps.wait_for(|n| *n != ours).await.unwrap() >= next);
        task.abort();
    }
}
