//! The VM directory: created or verified with mode 0700 and owned by us,
//! and the paths of everything inside it.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use capsem_proto::guest::{PORT_AUDIT, PORT_CONTROL, PORT_TERMINAL};

#[derive(Debug, thiserror::Error)]
pub enum VmDirError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is owned by uid {owner}, not by us (uid {us})")]
    WrongOwner { path: PathBuf, owner: u32, us: u32 },
    #[error("cannot set the mode of {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Paths inside one VM directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn ctl_sock(&self) -> PathBuf {
        self.root.join("ctl.sock")
    }
    /// The `--uds-path` of vhost-device-vsock; the agent's `unix:` transport base.
    pub fn vsock_base(&self) -> PathBuf {
        self.root.join("vsock.sock")
    }
    /// `vsock.sock_<port>`, what vhost-device-vsock connects to for a guest port.
    pub fn vsock_port(&self, port: u32) -> PathBuf {
        self.root.join(format!("vsock.sock_{port}"))
    }
    pub fn control_sock(&self) -> PathBuf {
        self.vsock_port(PORT_CONTROL)
    }
    pub fn terminal_sock(&self) -> PathBuf {
        self.vsock_port(PORT_TERMINAL)
    }
    pub fn exec_sock(&self) -> PathBuf {
        self.vsock_port(capsem_proto::guest::PORT_EXEC)
    }
    /// `vsock.sock_5006`: the guest's execve records (see `audit`).
    pub fn audit_sock(&self) -> PathBuf {
        self.vsock_port(PORT_AUDIT)
    }
    /// `vsock.sock_5007`: the guest's egress questions (see `net`).
    pub fn net_sock(&self) -> PathBuf {
        self.vsock_port(capsem_proto::guest::PORT_NET)
    }
    /// The stored audit records, one JSON object per line.
    pub fn audit_log(&self) -> PathBuf {
        self.root.join("audit.jsonl")
    }
    /// The previous `audit.jsonl`, after a rotation.
    pub fn audit_log_rotated(&self) -> PathBuf {
        self.root.join("audit.jsonl.1")
    }
    pub fn process_log(&self) -> PathBuf {
        self.root.join("process.log")
    }
    pub fn agent_log(&self) -> PathBuf {
        self.root.join("agent.log")
    }
    /// A file of the VM directory, by name (`pids.json`, `status.json`...).
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// The writable disk of a qemu guest (the overlay's upper layer).
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk.img")
    }
    pub fn scratch(&self) -> PathBuf {
        self.root.join("scratch")
    }
    /// Every socket this process binds, removed at teardown.
    pub fn sockets(&self) -> [PathBuf; 6] {
        [
            self.net_sock(),
            self.ctl_sock(),
            self.control_sock(),
            self.terminal_sock(),
            self.exec_sock(),
            self.audit_sock(),
        ]
    }

    /// Creates the directory (and missing parents) with mode 0700, or checks
    /// an existing one is a real directory we own and tightens it to 0700.
    pub fn prepare(&self) -> Result<(), VmDirError> {
        private_dir(&self.root)
    }
}

/// Creates `path` with mode 0700 or verifies it (not a symlink, owned by us) and sets 0700.
pub fn private_dir(path: &Path) -> Result<(), VmDirError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| VmDirError::Create {
            path: path.into(),
            source,
        })?;
    let meta = fs::symlink_metadata(path).map_err(|source| VmDirError::Create {
        path: path.into(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(VmDirError::NotADirectory { path: path.into() });
    }
    let us = nix::unistd::geteuid().as_raw();
    if meta.uid() != us {
        return Err(VmDirError::WrongOwner {
            path: path.into(),
            owner: meta.uid(),
            us,
        });
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|source| {
            VmDirError::Chmod {
                path: path.into(),
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_tightens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path().join("vms/a"));
        dir.prepare().unwrap();
        let mode = fs::metadata(dir.root()).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        fs::set_permissions(dir.root(), fs::Permissions::from_mode(0o755)).unwrap();
        dir.prepare().unwrap();
        let mode = fs::metadata(dir.root()).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        assert_eq!(dir.control_sock(), dir.root().join("vsock.sock_5000"));
        assert_eq!(dir.terminal_sock(), dir.root().join("vsock.sock_5001"));
        assert_eq!(dir.audit_sock(), dir.root().join("vsock.sock_5006"));
        assert!(dir.sockets().contains(&dir.audit_sock()));
    }

    #[test]
    fn refuses_a_file_or_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"").unwrap();
        assert!(VmDir::new(&file).prepare().is_err());
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(matches!(
            VmDir::new(&link).prepare(),
            Err(VmDirError::NotADirectory { .. })
        ));
    }
}
