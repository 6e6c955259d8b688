//! The host directories shared with the guest (`capsem.share=`), mounted
//! before the agent starts, each from its virtio-fs tag:
//!
//! * `rw`: virtiofs at the guest path.
//! * `ro`: virtiofs read-only (`MS_RDONLY`; virtiofsd is `--readonly` too).
//! * `overlay`: virtiofs read-only at `/capsem/shares/TAG/lower` in the
//!   initramfs (unreachable once the root is switched), under an overlay
//!   whose upper and work directories are `shares/TAG/` on the VM's
//!   writable disk, so a persistent VM keeps its changes and the host
//!   directory is never written. The upper directory is also bound
//!   read-only at `/run/capsem/shares/TAG`, where `capsem diff` reads it.
//!
//! Mount points are made without following symlinks, so a root image's
//! symlink cannot send a share outside the new root.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use capsem_host::share::ShareMode;
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::cmdline::GuestShare;

/// Where an overlay share's upper directory is visible in the guest.
pub const UPPER_VIEW: &str = "/run/capsem/shares";
/// Lower layers, in the initramfs.
const LOWER_BASE: &str = "/capsem/shares";
/// A tmpfs for overlay state when the VM has no root disk switch.
const TMP_STATE: &str = "/capsem/shares-state";

/// Why a share could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum ShareMountError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is a symlink or not a directory; a share's mount point must be a directory")]
    NotDir(PathBuf),
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: Errno,
    },
}

/// Mounts every share under `root` (the new root, or "" when the
/// initramfs stays the root); overlay state goes under `state`, a
/// directory on the writable disk.
pub fn mount_all(shares: &[GuestShare], root: &str, state: &str) -> Result<(), ShareMountError> {
    for share in shares {
        let target = mount_point(root, &share.path)?;
        let target = target.to_string_lossy().into_owned();
        match share.mode {
            ShareMode::Rw => virtiofs(&share.tag, &target, MsFlags::MS_NODEV)?,
            ShareMode::Ro => virtiofs(&share.tag, &target, MsFlags::MS_NODEV | MsFlags::MS_RDONLY)?,
            ShareMode::Overlay => overlay(share, root, state, &target)?,
        }
        crate::log!(
            "share {} mounted on {} ({})",
            share.tag,
            share.path,
            share.mode
        );
    }
    Ok(())
}

/// [`mount_all`] for a guest whose initramfs stays the root: overlay
/// state lives in a tmpfs.
pub fn mount_in_initramfs(shares: &[GuestShare]) -> Result<(), ShareMountError> {
    if shares.iter().any(|s| s.mode == ShareMode::Overlay) {
        make_dirs(Path::new(TMP_STATE), 0o700)?;
        do_mount(
            Some("tmpfs"),
            TMP_STATE,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0700"),
        )?;
    }
    mount_all(shares, "", TMP_STATE)
}

fn overlay(
    share: &GuestShare,
    root: &str,
    state: &str,
    target: &str,
) -> Result<(), ShareMountError> {
    let lower = format!("{LOWER_BASE}/{}/lower", share.tag);
    make_dirs(Path::new(&lower), 0o700)?;
    virtiofs(&share.tag, &lower, MsFlags::MS_NODEV | MsFlags::MS_RDONLY)?;
    let upper = format!("{state}/shares/{}/upper", share.tag);
    let work = format!("{state}/shares/{}/work", share.tag);
    make_dirs(Path::new(&upper), 0o755)?;
    make_dirs(Path::new(&work), 0o700)?;
    let options = format!("lowerdir={lower},upperdir={upper},workdir={work}");
    do_mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(&options),
    )?;
    let view = format!("{root}{UPPER_VIEW}/{}", share.tag);
    make_dirs(Path::new(&view), 0o700)?;
    do_mount(Some(upper.as_str()), &view, None, MsFlags::MS_BIND, None)?;
    do_mount(
        None,
        &view,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None,
    )
}

fn virtiofs(tag: &str, target: &str, flags: MsFlags) -> Result<(), ShareMountError> {
    do_mount(Some(tag), target, Some("virtiofs"), flags, None)
}

fn do_mount(
    what: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), ShareMountError> {
    mount(what, target, fstype, flags, data).map_err(|source| ShareMountError::Mount {
        what: what.unwrap_or("(remount)").into(),
        target: target.into(),
        source,
    })
}

/// `root` + `path`, each component made (0755) or checked to be a real
/// directory, never followed through a symlink.
pub fn mount_point(root: &str, path: &str) -> Result<PathBuf, ShareMountError> {
    let mut at = PathBuf::from(if root.is_empty() { "/" } else { root });
    for component in path.split('/').filter(|c| !c.is_empty()) {
        at.push(component);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(ShareMountError::NotDir(at)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .mode(0o755)
                    .create(&at)
                    .map_err(|source| ShareMountError::Create {
                        path: at.clone(),
                        source,
                    })?;
            }
            Err(source) => {
                return Err(ShareMountError::Create {
                    path: at.clone(),
                    source,
                })
            }
        }
    }
    Ok(at)
}

fn make_dirs(path: &Path, mode: u32) -> Result<(), ShareMountError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| ShareMountError::Create {
            path: path.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_made_but_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let made = mount_point(root, "/a/b").unwrap();
        assert_eq!(made, dir.path().join("a/b"));
        assert!(made.is_dir());
        // Existing directories are fine.
        assert_eq!(mount_point(root, "/a/b").unwrap(), made);
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        assert!(matches!(
            mount_point(root, "/link/x"),
            Err(ShareMountError::NotDir(_))
        ));
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(matches!(
            mount_point(root, "/file"),
            Err(ShareMountError::NotDir(_))
        ));
    }
}
