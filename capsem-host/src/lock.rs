//! Per-VM command lock: `flock` on `<home>/run/vm-<name>.lock`, so two
//! capsem commands on one VM (create, start, stop, rm, adopt, sweep) run one
//! after the other. The lock file lives outside the VM directory so `rm` can
//! remove that directory while holding it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the lock {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Flock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Held until dropped (or the process dies: the kernel releases it).
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

/// `<home>/run/vm-<name>.lock`.
pub fn lock_path(home: &Path, name: &str) -> PathBuf {
    home.join("run").join(format!("vm-{name}.lock"))
}

impl VmLock {
    /// Blocks until this process holds the VM's lock.
    pub fn acquire(home: &Path, name: &str) -> Result<Self, LockError> {
        Self::take(home, name, true)?.ok_or_else(|| LockError::Flock {
            path: lock_path(home, name),
            source: io::Error::from(io::ErrorKind::WouldBlock),
        })
    }

    /// Takes the lock if it is free.
    pub fn try_acquire(home: &Path, name: &str) -> Result<Option<Self>, LockError> {
        Self::take(home, name, false)
    }

    fn take(home: &Path, name: &str, block: bool) -> Result<Option<Self>, LockError> {
        let path = lock_path(home, name);
        let open_err = |source| LockError::Open {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(open_err)?;
        let op = if block {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        loop {
            // SAFETY: flock on an fd we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                // `rm` unlinks the lock file while holding it: a lock won on
                // the unlinked inode guards nothing, so start over on the
                // file the path names now.
                if same_inode(&file, &path) {
                    return Ok(Some(Self { _file: file }));
                }
                return Self::take(home, name, block);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !block => return Ok(None),
                _ => return Err(LockError::Flock { path, source: e }),
            }
        }
    }
}

/// Whether `file` is still the file `path` names.
fn same_inode(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_until_dropped() {
        let home = tempfile::tempdir().unwrap();
        let a = VmLock::acquire(home.path(), "x").unwrap();
        assert!(VmLock::try_acquire(home.path(), "x").unwrap().is_none());
        assert!(VmLock::try_acquire(home.path(), "y").unwrap().is_some());
        drop(a);
        assert!(VmLock::try_acquire(home.path(), "x").unwrap().is_some());
    }

    #[test]
    fn a_lock_on_an_unlinked_file_is_not_kept() {
        let home = tempfile::tempdir().unwrap();
        let a = VmLock::acquire(home.path(), "x").unwrap();
        // Unlinked while held (as rm does): a new lock is on the new file.
        std::fs::remove_file(lock_path(home.path(), "x")).unwrap();
        let b = VmLock::try_acquire(home.path(), "x").unwrap();
        assert!(b.is_some());
        assert!(VmLock::try_acquire(home.path(), "x").unwrap().is_none());
        drop(a);
    }
}
