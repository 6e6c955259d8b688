//! Keeping a temporary VM's logs after its directory is removed: always
//! when `$CAPSEM_LOG_DIR` names a place for them, and when the VM failed
//! (it did not boot, or the session was lost), under `<home>/logs/<vm-id>/`,
//! where only the newest [`KEEP_FAILED`] are kept so they cannot pile up.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Environment variable naming a directory that receives every temporary
/// VM's logs (tests and debugging).
pub const LOG_DIR_ENV: &str = "CAPSEM_LOG_DIR";
/// Failed VMs whose logs are kept under `<home>/logs`.
pub const KEEP_FAILED: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum LogKeepError {
    #[error("cannot keep logs in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where this VM's logs would be kept, and whether they must be.
#[derive(Debug, Clone)]
pub struct LogKeep {
    pub dest: PathBuf,
    explicit: bool,
    home_logs: PathBuf,
}

impl LogKeep {
    pub fn new(home: &Path, vm_id: &str) -> Self {
        let home_logs = home.join("logs");
        match std::env::var_os(LOG_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(root) => Self {
                dest: PathBuf::from(root).join(vm_id),
                explicit: true,
                home_logs,
            },
            None => Self {
                dest: home_logs.join(vm_id),
                explicit: false,
                home_logs,
            },
        }
    }

    /// Whether the logs are kept for a VM that ended this way.
    pub fn wanted(&self, failed: bool) -> bool {
        self.explicit || failed
    }

    /// Moves every `*.log` of `vm_dir` into the destination.
    pub fn keep(&self, vm_dir: &Path) -> Result<(), LogKeepError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LogKeepError::Io { path, source }
        };
        fs::create_dir_all(&self.dest).map_err(err(&self.dest))?;
        for entry in fs::read_dir(vm_dir).map_err(err(vm_dir))? {
            let path = entry.map_err(err(vm_dir))?.path();
            if path.extension().is_some_and(|e| e == "log") && path.is_file() {
                let name = path.file_name().unwrap_or_default();
                let to = self.dest.join(name);
                if fs::rename(&path, &to).is_err() {
                    fs::copy(&path, &to).map_err(err(&to))?;
                }
            }
        }
        if !self.explicit {
            prune(&self.home_logs, KEEP_FAILED);
        }
        Ok(())
    }
}

/// Removes all but the `keep` newest directories under `root`.
fn prune(root: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for (_, dir) in dirs.into_iter().take(excess) {
        let _ = fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_logs_and_prunes_old_failures() {
        let home = tempfile::tempdir().unwrap();
        for i in 0..KEEP_FAILED + 3 {
            let d = home.path().join("logs").join(format!("old-{i:02}"));
            fs::create_dir_all(&d).unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(i as u64);
            fs::File::open(&d).unwrap().set_modified(t).unwrap();
        }
        let vm = home.path().join("vms/tmp-1");
        fs::create_dir_all(&vm).unwrap();
        fs::write(vm.join("process.log"), b"p").unwrap();
        fs::write(vm.join("serial.log"), b"s").unwrap();
        fs::write(vm.join("ctl.sock"), b"").unwrap();
        let keep = LogKeep {
            dest: home.path().join("logs/tmp-1"),
            explicit: false,
            home_logs: home.path().join("logs"),
        };
        assert!(keep.wanted(true) && !keep.wanted(false));
        keep.keep(&vm).unwrap();
        assert_eq!(
            fs::read(home.path().join("logs/tmp-1/process.log")).unwrap(),
            b"p"
        );
        assert_eq!(
            fs::read(home.path().join("logs/tmp-1/serial.log")).unwrap(),
            b"s"
        );
        assert!(!home.path().join("logs/tmp-1/ctl.sock").exists());
        let left = fs::read_dir(home.path().join("logs")).unwrap().count();
        assert_eq!(left, KEEP_FAILED);
        assert!(
            home.path().join("logs/tmp-1").exists(),
            "the newest must survive"
        );
        assert!(
            !home.path().join("logs/old-00").exists(),
            "the oldest must go"
        );
    }
}
