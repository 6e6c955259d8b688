//! The read-only root format, in one place: [`build`] turns a flattened
//! tree into the image file the guest mounts as its root.
//!
//! The format is EROFS, uncompressed (the guest kernel needs no
//! decompressor), made by `mkfs.erofs` from erofs-utils 1.5 (Debian 12),
//! which reads a directory (it has no `--tar` yet). Run as root, owners,
//! modes and timestamps are those of the tree; run as another user,
//! `--all-root` makes every file root's, since the tree's owners are only
//! the extracting user. To use ext4 instead, change [`build`] (e.g.
//! `mke2fs -t ext4 -d DIR -E root_owner=0:0 OUT SIZE`) and [`FILE_NAME`].

use std::io;
use std::path::Path;
use std::process::Command;

/// The image file's name in a cached image's directory.
pub const FILE_NAME: &str = "rootfs.erofs";
/// What [`build`] runs.
pub const MKFS: &str = "mkfs.erofs";

/// Why the root filesystem image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{MKFS} not found (install erofs-utils: scripts/install-deps.sh)")]
    Missing(#[source] io::Error),
    #[error("cannot run {MKFS}")]
    Spawn(#[source] io::Error),
    #[error("{MKFS} failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
}

/// Makes the read-only image `out` from the tree `dir`.
pub fn build(dir: &Path, out: &Path) -> Result<(), RootfsError> {
    let mut cmd = Command::new(MKFS);
    if !nix::unistd::geteuid().is_root() {
        cmd.arg("--all-root");
    }
    cmd.arg("-x-1").arg(out).arg(dir);
    let output = cmd.output().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => RootfsError::Missing(e),
        _ => RootfsError::Spawn(e),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(300)
        .collect();
    Err(RootfsError::Failed {
        status: output.status.to_string(),
        stderr: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_an_erofs_image_or_says_what_is_missing() {
        let tree = tempfile::tempdir().unwrap();
        std::fs::write(tree.path().join("hello"), b"hi").unwrap();
        let out = tempfile::tempdir().unwrap();
        let img = out.path().join(FILE_NAME);
        match build(tree.path(), &img) {
            Ok(()) => {
                let head = std::fs::read(&img).unwrap();
                // The EROFS superblock magic at offset 1024.
                assert_eq!(&head[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
            }
            Err(RootfsError::Missing(_)) => {
                panic!("{MKFS} is not installed (scripts/install-deps.sh)")
            }
            Err(e) => panic!("{e}"),
        }
        let err = build(&tree.path().join("nope"), &out.path().join("x")).unwrap_err();
        assert!(matches!(err, RootfsError::Failed { .. }), "{err}");
    }
}
