//! What QEMU boots, opened by capsem-process and inherited by QEMU (see
//! `jail`): QEMU itself may be unable to reach any of these paths.
//!
//! * Both disks as fdsets (`-add-fd fd=N,set=S` and `file=/dev/fdset/S`):
//!   QEMU dups the fd whose access mode matches what it wants, and never
//!   opens a path. The writable disk's set has a read-write and a read-only
//!   fd, so a reopen in either mode finds one.
//! * The kernel and the initramfs as `/dev/fd/N`: QEMU's loader opens them
//!   by name, which reopens the inherited file (its inode's mode is checked,
//!   not the directories above it).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::disk;
use super::image::Image;
use super::jail::Inherit;

#[derive(Debug, thiserror::Error)]
#[error("cannot open {path} for the guest")]
pub struct BootFilesError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// One disk: its fdset and the fds in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    pub id: &'static str,
    pub serial: &'static str,
    pub set: u32,
    pub fds: Vec<RawFd>,
    pub readonly: bool,
}

impl Drive {
    /// `-add-fd` values, then the `-drive` and `-device` pair.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for fd in &self.fds {
            args.push("-add-fd".into());
            args.push(format!("fd={fd},set={},opaque={}", self.set, self.id).into());
        }
        let file = PathBuf::from(format!("/dev/fdset/{}", self.set));
        args.push("-drive".into());
        args.push(disk::drive(self.id, &file, self.readonly).into());
        args.push("-device".into());
        args.push(disk::device(self.id, self.serial).into());
        args
    }
}

/// The names QEMU is given for the image and the disks.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: OsString,
    pub initrd: OsString,
    /// The root filesystem and the writable disk; none for an image
    /// without a root filesystem.
    pub drives: Vec<Drive>,
}

fn open(path: &Path, write: bool) -> Result<File, BootFilesError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| BootFilesError {
            path: path.into(),
            source,
        })
}

impl BootFiles {
    /// Opens the image's files and the writable disk into `inherit`.
    pub fn open(
        image: &Image,
        writable: &Path,
        inherit: &mut Inherit,
    ) -> Result<Self, BootFilesError> {
        let kernel = inherit.pass_path(open(&image.kernel, false)?).into();
        let initrd = inherit.pass_path(open(&image.initramfs, false)?).into();
        let mut drives = Vec::new();
        if let Some(rootfs) = &image.rootfs {
            drives.push(Drive {
                id: "root",
                serial: disk::ROOT_SERIAL,
                set: 1,
                fds: vec![inherit.pass(open(rootfs, false)?)],
                readonly: true,
            });
            drives.push(Drive {
                id: "disk",
                serial: disk::DISK_SERIAL,
                set: 2,
                fds: vec![
                    inherit.pass(open(writable, true)?),
                    inherit.pass(open(writable, false)?),
                ],
                readonly: false,
            });
        }
        Ok(Self {
            kernel,
            initrd,
            drives,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_are_fdsets_and_the_writable_one_has_both_modes() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["vmlinuz", "initramfs.cpio.gz", "rootfs.erofs", "disk.img"] {
            std::fs::write(dir.path().join(name), name).unwrap();
        }
        let image = Image {
            dir: dir.path().into(),
            kernel: dir.path().join("vmlinuz"),
            initramfs: dir.path().join("initramfs.cpio.gz"),
            rootfs: Some(dir.path().join("rootfs.erofs")),
        };
        let mut inherit = Inherit::default();
        let files = BootFiles::open(&image, &dir.path().join("disk.img"), &mut inherit).unwrap();
        let kernel = files.kernel.to_string_lossy().into_owned();
        assert!(kernel.starts_with("/dev/fd/"), "{kernel}");
        assert_eq!(std::fs::read_to_string(&kernel).unwrap(), "vmlinuz");
        assert_eq!(files.drives.len(), 2);
        let disk = &files.drives[1];
        assert_eq!(disk.fds.len(), 2);
        let joined: Vec<String> = disk
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let fd = disk.fds[0];
        assert_eq!(joined[0], "-add-fd");
        assert_eq!(joined[1], format!("fd={fd},set=2,opaque=disk"));
        assert!(joined
            .contains(&"if=none,id=disk,format=raw,file=/dev/fdset/2,discard=unmap".to_owned()));
        assert!(joined.contains(&"virtio-blk-device,drive=disk,serial=capsem-disk".to_owned()));
        let old = Image {
            rootfs: None,
            ..image
        };
        let files = BootFiles::open(&old, Path::new("/nonexistent"), &mut inherit).unwrap();
        assert!(files.drives.is_empty());
    }
}
