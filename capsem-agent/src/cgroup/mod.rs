//! The shell's and every command's own cgroup (inside a VM only).
//!
//! capsem-init mounts cgroup2, enables the pids and memory controllers for
//! `/sys/fs/cgroup/capsem` and names that directory in `$CAPSEM_CGROUP`;
//! without it (the `--vmm none` agent on the host) nothing here runs. The
//! agent makes one child per shell (`shell-N`) and per command (`exec-N`)
//! with [`Limits`], moves the forked child into it before exec (a write of
//! `0` to its `cgroup.procs`, opened before the fork: see
//! [`enter_in_child`]), and removes it once the command is reaped, after
//! killing whatever is left in it ([`Group`]'s drop). [`watch`] kills a
//! group whose pids limit was hit or where the kernel OOM-killed, so a fork
//! bomb that would spin at the limit forever ends with a status.
//!
//! * [`Limits`]: `memory.max` is the guest's memory less [`RESERVED`] (for
//!   init, the agent and the kernel); `pids.max` one per MiB of that,
//!   [`MIN_PIDS`]..[`MAX_PIDS`]; `memory.oom.group=1` (an OOM kills the whole
//!   command) and `memory.swap.max=0`.

pub mod watch;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::{info, warn};

use crate::fdio;
use crate::imageconfig::Creds;

/// Names the parent cgroup that capsem-init prepared.
pub const ENV: &str = "CAPSEM_CGROUP";
/// Memory the commands' limit leaves to init, the agent and the kernel.
pub const RESERVED: u64 = 128 << 20;
/// The smallest `memory.max` (a tiny VM still runs a shell).
pub const MIN_MEMORY: u64 = 64 << 20;
/// Bounds of `pids.max`.
pub const MIN_PIDS: u64 = 256;
pub const MAX_PIDS: u64 = 4096;
/// How long removal waits for a killed group to empty.
const EMPTY_WAIT: Duration = Duration::from_secs(5);

/// Errors preparing or writing a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no MemTotal in /proc/meminfo")]
    MemTotal,
    #[error("cannot create the cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch {path} (inotify)")]
    Watch {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start the cgroup watcher")]
    Start(#[source] io::Error),
}

/// The limits of each shell's and command's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    pub pids_max: u64,
}

impl Limits {
    /// The limits for a guest with `total` bytes of memory.
    pub fn for_memory(total: u64) -> Self {
        let memory_max = total.saturating_sub(RESERVED).max(MIN_MEMORY);
        let pids_max = (memory_max >> 20).clamp(MIN_PIDS, MAX_PIDS);
        Self {
            memory_max,
            pids_max,
        }
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib.checked_mul(1024)?)
}

/// Why a group was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// A fork failed at `pids.max`.
    Pids { max: u64 },
    /// The kernel OOM-killed in the group (at `memory.max`).
    Memory { max: u64 },
}

impl LimitHit {
    /// One line for the user: `what` is "the shell" or "the command".
    pub fn message(&self, what: &str) -> String {
        match self {
            LimitHit::Pids { max } => format!(
                "capsem: {what} was killed: it reached the guest's process limit ({max} processes)"
            ),
            LimitHit::Memory { max } => format!(
                "capsem: {what} was killed: it ran out of memory (limit {} MiB)",
                max >> 20
            ),
        }
    }
}

/// The value of `key` in a cgroup events file (`key value` lines).
pub fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn write_file(dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(name);
    // `create`: a cgroup's files exist already (it only opens them); a plain
    // directory in the unit tests gets them made.
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path,
            value: value.to_owned(),
            source,
        })
}

/// Writes `limits` into the cgroup `dir`. `memory.swap.max` exists only
/// with swap accounting; without it there is no swap to limit.
pub fn write_limits(dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
    write_file(dir, "pids.max", &limits.pids_max.to_string())?;
    write_file(dir, "memory.max", &limits.memory_max.to_string())?;
    write_file(dir, "memory.oom.group", "1")?;
    match write_file(dir, "memory.swap.max", "0") {
        Err(CgroupError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        other => other?,
    }
    Ok(())
}

/// Which limit, if any, the cgroup `dir` has hit (its events files).
pub fn read_hit(dir: &Path, limits: &Limits) -> Option<LimitHit> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    if counter(&read("pids.events"), "max").is_some_and(|n| n > 0) {
        return Some(LimitHit::Pids {
            max: limits.pids_max,
        });
    }
    let mem = read("memory.events");
    let oom = |key| counter(&mem, key).is_some_and(|n| n > 0);
    if oom("oom_kill") || oom("oom_group_kill") {
        return Some(LimitHit::Memory {
            max: limits.memory_max,
        });
    }
    None
}

/// SIGKILLs every process in the cgroup `dir` (`cgroup.kill`).
pub fn kill(dir: &Path) -> Result<(), CgroupError> {
    write_file(dir, "cgroup.kill", "1")
}

/// Whether `cgroup.events` says processes are left.
pub fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| counter(&t, "populated") != Some(0))
        .unwrap_or(false)
}

/// The parent cgroup and what every child gets.
#[derive(Debug)]
pub struct Cgroups {
    parent: PathBuf,
    limits: Limits,
    next: AtomicU64,
    watcher: watch::Watcher,
}

impl Cgroups {
    /// From `$CAPSEM_CGROUP`: `None` when it is not set. Starts the watcher
    /// and exempts the agent from the OOM killer.
    pub fn from_env() -> Result<Option<Arc<Self>>, CgroupError> {
        let Some(parent) = std::env::var_os(ENV).map(PathBuf::from) else {
            return Ok(None);
        };
        let meminfo = Path::new("/proc/meminfo");
        let text = std::fs::read_to_string(meminfo).map_err(|source| CgroupError::Read {
            path: meminfo.into(),
            source,
        })?;
        let limits = Limits::for_memory(mem_total(&text).ok_or(CgroupError::MemTotal)?);
        // What the agent starts resets its own (enter_in_child).
        let adj = Path::new("/proc/self/oom_score_adj");
        std::fs::write(adj, "-1000").map_err(|source| CgroupError::Write {
            path: adj.into(),
            value: "-1000".into(),
            source,
        })?;
        let watcher = watch::Watcher::start(parent.clone(), limits)?;
        info!(
            parent = %parent.display(),
            memory_max = limits.memory_max,
            pids_max = limits.pids_max,
            "each shell and command runs in its own cgroup"
        );
        Ok(Some(Arc::new(Self {
            parent,
            limits,
            next: AtomicU64::new(1),
            watcher,
        })))
    }

    /// A new, empty, limited and watched child: `kind-N`.
    pub fn create(&self, kind: &str) -> Result<Group, CgroupError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.parent.join(format!("{kind}-{n}"));
        std::fs::create_dir(&dir).map_err(|source| CgroupError::Create {
            path: dir.clone(),
            source,
        })?;
        // From here the group is removed again on any error.
        let mut group = Group {
            dir,
            limits: self.limits,
            procs: None,
        };
        write_limits(&group.dir, &self.limits)?;
        self.watcher.add(&group.dir)?;
        let path = group.dir.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| CgroupError::Write {
                path,
                value: "0".into(),
                source,
            })?;
        group.procs = Some(procs.into());
        Ok(group)
    }
}

/// One command's cgroup; killed, emptied and removed on drop (after the
/// command is reaped: its owner drops it last).
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    limits: Limits,
    /// `cgroup.procs`, opened before the fork (close-on-exec).
    procs: Option<OwnedFd>,
}

impl Group {
    /// The fd [`enter_in_child`] writes to.
    pub fn procs_fd(&self) -> Option<RawFd> {
        self.procs.as_ref().map(|f| f.as_raw_fd())
    }

    /// Which limit killed the group, if one did.
    pub fn limit_hit(&self) -> Option<LimitHit> {
        read_hit(&self.dir, &self.limits)
    }

    /// Kills what is left, waits (bounded) until the group is empty, and
    /// removes it.
    fn remove(&self) -> Result<(), String> {
        if populated(&self.dir) {
            kill(&self.dir).map_err(|e| crate::session::chain(&e))?;
            wait_empty(&self.dir)?;
        }
        std::fs::remove_dir(&self.dir).map_err(|e| format!("rmdir: {e}"))
    }
}

/// Waits for `cgroup.events` to say `populated 0` (it is modified then).
fn wait_empty(dir: &Path) -> Result<(), String> {
    let events = dir.join("cgroup.events");
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| format!("inotify: {e}"))?;
    inotify
        .add_watch(&events, AddWatchFlags::IN_MODIFY)
        .map_err(|e| format!("inotify watch: {e}"))?;
    let deadline = Instant::now() + EMPTY_WAIT;
    // Checked after the watch is in place, so the last change is not missed.
    while populated(dir) {
        if Instant::now() >= deadline {
            return Err("processes are still in it".into());
        }
        let mut fds = [fdio::pollfd(std::os::fd::AsFd::as_fd(&inotify), fdio::IN)];
        fdio::poll(&mut fds, Some(deadline)).map_err(|e| format!("poll: {e}"))?;
        while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
    }
    Ok(())
}

impl Drop for Group {
    fn drop(&mut self) {
        match self.remove() {
            Ok(()) => {}
            Err(e) => warn!(cgroup = %self.dir.display(), "cannot remove the cgroup: {e}"),
        }
    }
}

/// Between fork and exec: moves the calling process into the group whose
/// `cgroup.procs` is `procs` (resetting the OOM score it inherited from the
/// agent), then takes on `creds` (supplementary groups dropped, then the
/// group, then the user; after the move, which needs root).
///
/// # Safety
///
/// Only for a `pre_exec` closure: it makes raw, async-signal-safe system
/// calls only and allocates nothing.
pub unsafe fn enter_in_child(procs: Option<RawFd>, creds: Option<Creds>) -> io::Result<()> {
    // SAFETY: plain system calls on a valid fd and NUL-terminated path; the
    // caller guarantees the fork-to-exec context.
    unsafe {
        if let Some(fd) = procs {
            // "0" names the writing process itself.
            if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            let f = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if f < 0 || libc::write(f, b"0".as_ptr().cast(), 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(f);
        }
        if let Some(c) = creds {
            if libc::setgroups(0, std::ptr::null()) < 0
                || libc::setgid(c.gid) < 0
                || libc::setuid(c.uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_room_and_bound_the_pids() {
        let l = Limits::for_memory(1024 << 20);
        assert_eq!(l.memory_max, 896 << 20);
        assert_eq!(l.pids_max, 896);
        let tiny = Limits::for_memory(100 << 20);
        assert_eq!(tiny.memory_max, MIN_MEMORY);
        assert_eq!(tiny.pids_max, MIN_PIDS);
        assert_eq!(Limits::for_memory(64 << 30).pids_max, MAX_PIDS);
    }

    #[test]
    fn mem_total_is_read_in_kib() {
        let text = "MemTotal:        1004356 kB\nMemFree:          900000 kB\n";
        assert_eq!(mem_total(text), Some(1004356 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: x kB\n"), None);
        assert_eq!(mem_total("MemTotal: 5 MB\n"), None);
    }

    #[test]
    fn counters_by_exact_key() {
        let text = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(counter(text, "max"), Some(12));
        assert_eq!(counter(text, "oom"), Some(1));
        assert_eq!(counter(text, "oom_group_kill"), Some(0));
        assert_eq!(counter(text, "ma"), None);
        assert_eq!(counter("max x\n", "max"), None);
    }

    #[test]
    fn limits_are_written_as_the_kernel_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let l = Limits::for_memory(2 << 30);
        write_limits(dir.path(), &l).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        assert_eq!(read("pids.max"), "1920");
        assert_eq!(read("memory.max"), (1920u64 << 20).to_string());
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("memory.swap.max"), "0");
        kill(dir.path()).unwrap();
        assert_eq!(read("cgroup.kill"), "1");
    }

    #[test]
    fn a_hit_is_read_from_the_events_files() {
        let dir = tempfile::tempdir().unwrap();
        let l = Limits::for_memory(1 << 30);
        assert_eq!(read_hit(dir.path(), &l), None, "no files: no hit");
        let write = |n: &str, t: &str| std::fs::write(dir.path().join(n), t).unwrap();
        write("pids.events", "max 0\n");
        write("memory.events", "low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n");
        assert_eq!(
            read_hit(dir.path(), &l),
            None,
            "memory.max reached, no kill"
        );
        write("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n");
        let hit = read_hit(dir.path(), &l).unwrap();
        assert_eq!(hit, LimitHit::Memory { max: l.memory_max });
        assert_eq!(
            hit.message("the command"),
            "capsem: the command was killed: it ran out of memory (limit 896 MiB)"
        );
        write("pids.events", "max 7\n");
        let hit = read_hit(dir.path(), &l).unwrap();
        assert_eq!(hit, LimitHit::Pids { max: 896 });
        assert_eq!(
            hit.message("the shell"),
            "capsem: the shell was killed: it reached the guest's process limit (896 processes)"
        );
    }

    #[test]
    fn the_child_moves_itself_before_exec_and_the_group_goes_after_the_reap() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("exec-1");
        std::fs::create_dir(&dir).unwrap();
        let procs = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("cgroup.procs"))
            .unwrap();
        // A plain directory stands in for the cgroup: its rmdir works once
        // the test removed the one file.
        let group = Group {
            dir: dir.clone(),
            limits: Limits::for_memory(1 << 30),
            procs: Some(procs.into()),
        };
        let spec = crate::command::CommandSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
            env: vec![("PATH".into(), crate::pty::SHELL_PATH.into())],
            cwd: std::env::temp_dir(),
            tty: None,
            creds: None,
        };
        let mut r = crate::command::Running::spawn(&spec, Some(group))
            .unwrap()
            .unwrap();
        let mut fds = [fdio::pollfd(r.pidfd(), fdio::IN)];
        fdio::poll(&mut fds, Some(Instant::now() + Duration::from_secs(30))).unwrap();
        assert_eq!(r.reap().unwrap().exit_code, Some(3));
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "0"
        );
        assert_eq!(r.limit_hit(), None);
        std::fs::remove_file(dir.join("cgroup.procs")).unwrap();
        drop(r);
        assert!(
            !dir.exists(),
            "the group's directory was removed after the reap"
        );
    }

    #[test]
    fn populated_follows_cgroup_events() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            !populated(dir.path()),
            "no cgroup.events: nothing to wait for"
        );
        std::fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(populated(dir.path()));
        std::fs::write(dir.path().join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(!populated(dir.path()));
    }
}
