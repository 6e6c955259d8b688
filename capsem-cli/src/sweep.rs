//! Cleaning up what crashes left, before every VM command.
//!
//! For each VM directory under `<home>/vms/` whose lock is free (a busy
//! lock means another command is working on that VM: it is skipped), under
//! that lock:
//!
//! | VM | what the sweep does |
//! |---|---|
//! | temporary, owner gone (whatever its state) | SIGKILL every live recorded process, wait for them (2 s at most), remove the directory and its lock file |
//! | temporary, owner alive | nothing: its owner tears it down |
//! | persistent, `stopped`, `pids.json` still there | its processes died without a teardown: remove `pids.json` and the stale sockets, keep the rest |
//! | persistent, `orphaned` | nothing: the next command for it adopts the guest |
//! | persistent, `running` | nothing |
//! | unreadable | one warning line |
//!
//! A process is signalled only through
//! [`ProcRecord::signal_verified`](capsem_host::identity::ProcRecord::signal_verified):
//! a recorded pid whose start time or marker does not match is skipped
//! silently.
//!
//! A temporary VM directory without `vm.json` whose directory changed less
//! than [`UNCONFIGURED_GRACE`] ago is left alone: its creator may not have
//! written `vm.json` yet.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use capsem_host::identity::{pidfd_exited, ProcRecord};
use capsem_host::lock::{self, LockError, VmLock};
use capsem_host::vmstate::{VmStateError, PIDS_FILE};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::context::Ctx;
use crate::error::one_line_chain;
use crate::vms::{Vm, VmState};

/// How long killed processes get to disappear before the sweep gives up on
/// them (they are not our children: their exit is watched through pidfds).
pub const KILL_WAIT: Duration = Duration::from_secs(2);

/// How recently a VM directory without `vm.json` must have changed for the
/// sweep to assume it is still being created.
pub const UNCONFIGURED_GRACE: Duration = Duration::from_secs(60);

/// Why one VM could not be swept.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Load(#[from] VmStateError),
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the sweep did to one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swept {
    /// Another command holds the VM's lock.
    Busy,
    /// Nothing to do (or the VM vanished meanwhile).
    Left,
    /// A temporary VM whose owner is gone: `killed` processes killed, the
    /// directory removed.
    Removed { killed: usize },
    /// A temporary VM whose owner is gone, but `left` of its processes
    /// outlived [`KILL_WAIT`]; the directory stays for the next sweep.
    Survivors { killed: usize, left: usize },
    /// A persistent VM whose processes all died without a teardown:
    /// `pids.json` and the sockets removed.
    Cleaned,
}

/// Sweeps `<home>/vms/`, printing one line on stderr per VM it changed
/// and per VM it could not read. Never fails: a sweep is best effort.
pub fn sweep(ctx: &Ctx) {
    let (vms, errors) = crate::vms::list(&ctx.home);
    for e in errors {
        eprintln!("capsem: warning: skipping a VM: {}", one_line_chain(&e));
    }
    for vm in vms {
        match sweep_one(ctx, &vm.name) {
            Ok(Swept::Busy | Swept::Left) => {}
            Ok(Swept::Removed { killed }) => eprintln!(
                "capsem: swept temporary VM {}: its owner is gone (killed {killed} processes)",
                vm.name
            ),
            Ok(Swept::Survivors { killed, left }) => eprintln!(
                "capsem: warning: temporary VM {}: its owner is gone, but {left} of its \
                 processes outlived SIGKILL (killed {killed}); kept for the next sweep",
                vm.name
            ),
            Ok(Swept::Cleaned) => eprintln!(
                "capsem: VM {} had stopped unexpectedly (no process left); cleaned up",
                vm.name
            ),
            Err(e) => eprintln!(
                "capsem: warning: cannot sweep VM {}: {}",
                vm.name,
                one_line_chain(&e)
            ),
        }
    }
}

/// Sweeps one VM, `<home>/vms/<name>`, under its lock.
pub fn sweep_one(ctx: &Ctx, name: &str) -> Result<Swept, SweepError> {
    let Some(_lock) = VmLock::try_acquire(&ctx.home, name)? else {
        return Ok(Swept::Busy);
    };
    let dir = ctx.vm_dir(name);
    if !dir.is_dir() {
        // Removed between the listing and the lock.
        return Ok(Swept::Left);
    }
    let vm = Vm::load(&dir)?;
    if vm.temporary() {
        if !vm.owner_gone() || (vm.config.is_none() && recently_changed(&dir)) {
            return Ok(Swept::Left);
        }
        let (killed, left) = kill_all(&vm);
        if left > 0 {
            return Ok(Swept::Survivors { killed, left });
        }
        remove_dir(&dir)?;
        // After the directory: whoever takes the lock next sees no VM.
        remove_file(&lock::lock_path(&ctx.home, name))?;
        return Ok(Swept::Removed { killed });
    }
    if vm.state() == VmState::Stopped && vm.pids.is_some() {
        remove_file(&dir.join(PIDS_FILE))?;
        remove_stale_sockets(&dir)?;
        return Ok(Swept::Cleaned);
    }
    Ok(Swept::Left)
}

/// SIGKILLs every process recorded in VM directory `dir` (see
/// [`kill_all`]); for a temporary VM destroyed without its capsem-process's
/// help (`~.`). Returns how many exited and how many are still there.
pub fn kill_recorded(dir: &Path) -> Result<(usize, usize), SweepError> {
    Ok(kill_all(&Vm::load(dir)?))
}

/// SIGKILLs every recorded process of `vm` that still is what was recorded
/// and waits up to [`KILL_WAIT`] for them to exit. Returns how many exited
/// and how many are still there.
fn kill_all(vm: &Vm) -> (usize, usize) {
    let records: Vec<&ProcRecord> = vm
        .process
        .iter()
        .chain(vm.guest.iter())
        .map(|p| &p.record)
        .collect();
    let mut pidfds = Vec::new();
    for record in records {
        // The pidfd is opened (and the identity checked) before the signal,
        // so it watches exactly the process that gets killed.
        let Ok(fd) = record.open_verified() else {
            continue;
        };
        // `Ok(false)`: already gone, e.g. killed with the process group of
        // capsem-process just before; `Err`: no longer the recorded process.
        if record.signal_verified(libc::SIGKILL).is_ok() {
            pidfds.push(fd);
        }
    }
    let left = wait_exited(&pidfds, KILL_WAIT);
    (pidfds.len() - left, left)
}

/// Waits until every pidfd is readable (its process exited) or `limit`
/// passes; returns how many processes are still running.
fn wait_exited(pidfds: &[OwnedFd], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut pending: Vec<&OwnedFd> = pidfds.iter().collect();
    loop {
        pending.retain(|fd| !pidfd_exited(fd));
        let left = deadline.saturating_duration_since(Instant::now());
        if pending.is_empty() || left.is_zero() {
            return pending.len();
        }
        let mut fds: Vec<PollFd> = pending
            .iter()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        // Rounded up so a sub-millisecond rest does not spin.
        let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return pending.len(),
        }
    }
}

/// Whether `dir` changed within [`UNCONFIGURED_GRACE`].
fn recently_changed(dir: &Path) -> bool {
    std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .map(|t| {
            SystemTime::now()
                .duration_since(t)
                .map_or(true, |age| age < UNCONFIGURED_GRACE)
        })
        .unwrap_or(false)
}

/// The sockets capsem-process and vhost-device-vsock leave behind when
/// they die: `ctl.sock`, `vhost.sock`, `vsock.sock` and `vsock.sock_<port>`.
pub fn is_stale_socket_name(name: &str) -> bool {
    matches!(name, "ctl.sock" | "vhost.sock" | "vsock.sock") || name.starts_with("vsock.sock_")
}

/// Removes the sockets named by [`is_stale_socket_name`] in `dir` (only
/// sockets: a regular file of that name is not ours to remove).
fn remove_stale_sockets(dir: &Path) -> Result<(), SweepError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SweepError::Remove {
        path: dir.into(),
        source,
    })?;
    for entry in entries.filter_map(Result::ok) {
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if is_socket && entry.file_name().to_str().is_some_and(is_stale_socket_name) {
            remove_file(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), SweepError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SweepError::Remove {
            path: path.into(),
            source,
        }),
    }
}

fn remove_dir(path: &Path) -> Result<(), SweepError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SweepError::Remove {
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{config, ctx, gone_record, live_owner, make_vm, Marked};
    use capsem_host::vmstate::{self, Pids, VM_FILE};
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::process::{Child, ChildStdin, Command, Stdio};

    /// Waits until no process holds VM `name`'s lock any more. A lock
    /// this process held can linger a moment in a child that a concurrent
    /// test forked and that has not exec'd yet (it shares the open file).
    fn settle(home: &Path, name: &str) {
        drop(VmLock::acquire(home, name).unwrap());
    }

    /// VM `name`'s lock, held by a child process, so that no fork of a
    /// concurrent test can share it; released when dropped.
    struct ChildLock {
        child: Child,
        stdin: Option<ChildStdin>,
    }

    impl ChildLock {
        fn take(home: &Path, name: &str) -> Self {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::process::CommandExt;
            let path = lock::lock_path(home, name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "echo locked; read x"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            // SAFETY: between fork and exec only open(2) and flock(2), both
            // async-signal-safe, on a path allocated before the fork. The
            // fd is left open (no O_CLOEXEC) so `sh` holds the lock.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600);
                    if fd < 0 || libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
            let mut child = cmd.spawn().unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line, "locked\n");
            let stdin = child.stdin.take();
            Self { child, stdin }
        }

        fn release(mut self) {
            self.stdin.take();
            self.child.wait().unwrap();
        }
    }

    impl Drop for ChildLock {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temporary_vm_without_owner_is_killed_and_removed_but_recycled_pids_are_not_signalled() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let mut process = Marked::spawn("capsem-process");
        let mut guest = Marked::spawn("capsem-agent");
        let mut stranger = Marked::spawn("qemu");
        let pids = Pids {
            process: process.record.clone(),
            guest: vec![guest.record.clone(), stranger.wrong_start_time()],
            cid: None,
        };
        // The owner's record has a recycled pid (ours, another start time).
        let owner = ProcRecord {
            start_time: live_owner().start_time + 1,
            ..live_owner()
        };
        let id = "tmp-0123456789abcdef";
        let dir = make_vm(
            home.path(),
            id,
            Some(&config(id, true, Some(owner))),
            Some(&pids),
        );

        assert_eq!(sweep_one(&ctx, id).unwrap(), Swept::Removed { killed: 2 });
        assert!(!dir.exists());
        assert!(!lock::lock_path(home.path(), id).exists());
        assert!(process.child.wait().unwrap().code().is_none(), "killed");
        assert!(guest.child.wait().unwrap().code().is_none(), "killed");
        assert!(stranger.running(), "a recycled pid is never signalled");
        stranger.finish();
        assert_eq!(
            names(&crate::home::vms_dir(home.path())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn temporary_vm_with_a_live_owner_is_left() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let mut process = Marked::spawn("capsem-process");
        let pids = Pids {
            process: process.record.clone(),
            guest: vec![],
            cid: None,
        };
        let id = "tmp-00000000000000aa";
        let dir = make_vm(
            home.path(),
            id,
            Some(&config(id, true, Some(live_owner()))),
            Some(&pids),
        );
        assert_eq!(sweep_one(&ctx, id).unwrap(), Swept::Left);
        assert!(dir.join(PIDS_FILE).exists());
        assert!(process.running());
        process.finish();
    }

    #[test]
    fn stopped_temporary_vm_without_owner_is_removed() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let id = "tmp-00000000000000bb";
        let pids = Pids {
            process: gone_record("capsem-process"),
            guest: vec![gone_record("capsem-agent")],
            cid: None,
        };
        let owner = gone_record("owner");
        let dir = make_vm(
            home.path(),
            id,
            Some(&config(id, true, Some(owner))),
            Some(&pids),
        );
        std::fs::write(dir.join("process.log"), b"x").unwrap();
        assert_eq!(sweep_one(&ctx, id).unwrap(), Swept::Removed { killed: 0 });
        assert!(!dir.exists());
    }

    #[test]
    fn a_fresh_directory_without_vm_json_is_left_to_its_creator() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let id = "tmp-00000000000000cc";
        let dir = make_vm(home.path(), id, None, None);
        assert_eq!(sweep_one(&ctx, id).unwrap(), Swept::Left);
        assert!(dir.exists());
        // Once it is old, it is an interrupted creation: swept.
        let old = SystemTime::now() - UNCONFIGURED_GRACE - Duration::from_secs(5);
        std::fs::File::open(&dir)
            .unwrap()
            .set_modified(old)
            .unwrap();
        settle(home.path(), id);
        assert_eq!(sweep_one(&ctx, id).unwrap(), Swept::Removed { killed: 0 });
        assert!(!dir.exists());
    }

    #[test]
    fn persistent_vm_that_died_without_teardown_is_cleaned_but_kept() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let pids = Pids {
            process: gone_record("capsem-process"),
            guest: vec![gone_record("qemu")],
            cid: Some(7),
        };
        let dir = make_vm(
            home.path(),
            "dev",
            Some(&config("dev", false, None)),
            Some(&pids),
        );
        let mut sockets = Vec::new();
        for s in ["ctl.sock", "vhost.sock", "vsock.sock", "vsock.sock_5000"] {
            sockets.push(UnixListener::bind(dir.join(s)).unwrap());
        }
        for f in ["process.log", "serial.log", "token", "vsock.sock_notes"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        vmstate::write_json(&dir.join("status.json"), &vmstate::VmStatusFile::default()).unwrap();
        std::fs::create_dir(dir.join("scratch")).unwrap();

        assert_eq!(sweep_one(&ctx, "dev").unwrap(), Swept::Cleaned);
        assert_eq!(
            names(&dir),
            [
                "process.log",
                "scratch",
                "serial.log",
                "status.json",
                "token",
                "vm.json",
                "vsock.sock_notes"
            ]
        );
        // A second sweep has nothing to do.
        settle(home.path(), "dev");
        assert_eq!(sweep_one(&ctx, "dev").unwrap(), Swept::Left);
    }

    #[test]
    fn orphaned_and_running_persistent_vms_are_left() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let mut guest = Marked::spawn("capsem-agent");
        let pids = Pids {
            process: gone_record("capsem-process"),
            guest: vec![guest.record.clone()],
            cid: None,
        };
        let orphan = make_vm(
            home.path(),
            "orphan",
            Some(&config("orphan", false, None)),
            Some(&pids),
        );
        let mut process = Marked::spawn("capsem-process");
        let pids = Pids {
            process: process.record.clone(),
            guest: vec![],
            cid: None,
        };
        let running = make_vm(
            home.path(),
            "run",
            Some(&config("run", false, None)),
            Some(&pids),
        );
        assert_eq!(sweep_one(&ctx, "orphan").unwrap(), Swept::Left);
        assert_eq!(sweep_one(&ctx, "run").unwrap(), Swept::Left);
        assert!(orphan.join(PIDS_FILE).exists());
        assert!(running.join(PIDS_FILE).exists());
        assert!(guest.running());
        assert!(process.running());
        guest.finish();
        process.finish();
    }

    #[test]
    fn a_busy_lock_skips_the_vm_and_the_sweep_goes_on_past_unreadable_ones() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let a = "tmp-00000000000000dd";
        let b = "tmp-00000000000000ee";
        let dir_a = make_vm(home.path(), a, Some(&config(a, true, None)), None);
        let dir_b = make_vm(home.path(), b, Some(&config(b, true, None)), None);
        let bad = make_vm(home.path(), "bad", None, None);
        std::fs::write(bad.join(VM_FILE), b"{").unwrap();

        let held = ChildLock::take(home.path(), a);
        assert_eq!(sweep_one(&ctx, a).unwrap(), Swept::Busy);
        assert!(matches!(sweep_one(&ctx, "bad"), Err(SweepError::Load(_))));
        sweep(&ctx);
        assert!(dir_a.exists(), "locked by another command");
        assert!(!dir_b.exists());
        assert!(bad.exists(), "unreadable: warned about, not touched");
        held.release();
        sweep(&ctx);
        assert!(!dir_a.exists());
        assert_eq!(names(&crate::home::vms_dir(home.path())), ["bad"]);
    }

    #[test]
    fn socket_names() {
        for s in ["ctl.sock", "vhost.sock", "vsock.sock", "vsock.sock_5001"] {
            assert!(is_stale_socket_name(s), "{s}");
        }
        for s in ["process.log", "ctl.sock.bak", "vsock.socket", "token"] {
            assert!(!is_stale_socket_name(s), "{s}");
        }
    }

    #[test]
    fn error_chains_are_one_line() {
        let e = SweepError::Remove {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let line = one_line_chain(&e);
        assert!(line.starts_with("cannot remove /x: "), "{line}");
        assert!(!line.contains('\n'));
    }
}
