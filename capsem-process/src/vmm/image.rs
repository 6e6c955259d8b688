//! The guest image: a kernel, an initramfs and the read-only root
//! filesystem, built by `images/build.sh`.

use std::path::{Path, PathBuf};

/// Files of a built image.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The read-only root (erofs), on a virtio-blk device. `None`: an image
    /// from before the disk root, whose initramfs is the whole guest.
    pub rootfs: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no guest image at {dir} ({missing} is missing): build it with images/build.sh")]
    Missing { dir: PathBuf, missing: &'static str },
}

impl Image {
    /// Checks that the image in `dir` is complete.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let image = Self {
            dir: dir.to_path_buf(),
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            rootfs: Some(dir.join("rootfs.erofs")).filter(|p| p.is_file()),
        };
        for (path, name) in [
            (&image.kernel, "vmlinuz"),
            (&image.initramfs, "initramfs.cpio.gz"),
            (&dir.join("manifest.json"), "manifest.json"),
        ] {
            if !path.is_file() {
                return Err(ImageError::Missing {
                    dir: dir.to_path_buf(),
                    missing: name,
                });
            }
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_missing_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), b"k").unwrap();
        let err = Image::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("initramfs.cpio.gz is missing"), "{err}");
        assert!(err.contains("images/build.sh"), "{err}");
        std::fs::write(d.path().join("initramfs.cpio.gz"), b"i").unwrap();
        std::fs::write(d.path().join("manifest.json"), b"{}").unwrap();
        // An image from before the disk root still opens, without one.
        assert_eq!(Image::open(d.path()).unwrap().rootfs, None);
        std::fs::write(d.path().join("rootfs.erofs"), b"r").unwrap();
        assert_eq!(
            Image::open(d.path()).unwrap().rootfs,
            Some(d.path().join("rootfs.erofs"))
        );
    }
}
