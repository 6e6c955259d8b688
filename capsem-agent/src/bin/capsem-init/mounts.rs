//! The pseudo filesystems the guest needs, mounted in dependency order.
//!
//! [`EARLY`] (/proc, /sys, /dev) is what finding and mounting the disks
//! needs; it moves into the new root at the switch ([`crate::root`]). [`RUN`]
//! is mounted by the switch inside the new root (the agent is bound there),
//! or in place when the initramfs stays the root. [`LATE`] comes last, in the
//! final root.

use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// Errors mounting a filesystem or preparing its mount point.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {target}")]
    MountPoint {
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot create {link}")]
    Symlink {
        link: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One mount: the target directory is created with `mode` if missing.
#[derive(Debug)]
pub struct Mount {
    pub fstype: &'static str,
    pub target: &'static str,
    mode: u32,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC);

/// Mounted first, in the initramfs.
pub const EARLY: &[Mount] = &[
    Mount {
        fstype: "proc",
        target: "/proc",
        mode: 0o555,
        flags: NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        data: "",
    },
    Mount {
        fstype: "sysfs",
        target: "/sys",
        mode: 0o555,
        flags: NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        data: "",
    },
    Mount {
        fstype: "devtmpfs",
        target: "/dev",
        mode: 0o755,
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
];

/// /dev/pts is a private devpts instance whose `ptmx` anyone may open, so the
/// agent's `openpty` works through the devtmpfs `/dev/ptmx` node.
pub const LATE: &[Mount] = &[
    Mount {
        fstype: "devpts",
        target: "/dev/pts",
        mode: 0o755,
        flags: NOSUID_NOEXEC,
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
    },
    Mount {
        fstype: "tmpfs",
        target: "/dev/shm",
        mode: 0o1777,
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Mount {
        fstype: "tmpfs",
        target: "/tmp",
        mode: 0o1777,
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
];

/// `/run`: a tmpfs in whichever root is final.
pub const RUN: Mount = Mount {
    fstype: "tmpfs",
    target: "/run",
    mode: 0o755,
    flags: NOSUID_NODEV,
    data: "mode=0755",
};

/// Links devtmpfs does not provide but shells expect (`<(...)`, `/dev/stdin`).
const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
];

/// Mounts each of `mounts` at its target under `prefix` ("" for the
/// current root).
pub fn mount_list(prefix: &str, mounts: &[Mount]) -> Result<(), MountError> {
    for m in mounts {
        let target = format!("{prefix}{}", m.target);
        if !Path::new(&target).is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(m.mode)
                .create(&target)
                .map_err(|source| MountError::MountPoint {
                    target: m.target,
                    source,
                })?;
        }
        let data = (!m.data.is_empty()).then_some(m.data);
        mount(
            Some(m.fstype),
            target.as_str(),
            Some(m.fstype),
            m.flags,
            data,
        )
        .map_err(|source| MountError::Mount {
            fstype: m.fstype,
            target: m.target,
            source,
        })?;
    }
    Ok(())
}

/// Mounts [`LATE`], then creates [`DEV_LINKS`] (in the final root).
pub fn mount_late() -> Result<(), MountError> {
    mount_list("", LATE)?;
    for (target, link) in DEV_LINKS {
        match symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(MountError::Symlink { link, source }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_mounted_before_children() {
        let all: Vec<&Mount> = EARLY.iter().chain([&RUN]).chain(LATE).collect();
        for (i, m) in all.iter().enumerate() {
            let parent = Path::new(m.target).parent().unwrap();
            if parent != Path::new("/") {
                let pos = all.iter().position(|p| Path::new(p.target) == parent);
                assert!(pos.is_some_and(|p| p < i), "{} before its parent", m.target);
            }
        }
    }

    #[test]
    fn links_live_in_dev() {
        assert!(DEV_LINKS.iter().all(|(_, link)| link.starts_with("/dev/")));
    }
}
