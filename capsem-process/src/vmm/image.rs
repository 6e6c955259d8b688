//! The guest image: a kernel, an initramfs and the read-only root
//! filesystem, built by `images/build.sh`; the root filesystem may come
//! from an OCI image instead (`--rootfs`).

use std::path::{Path, PathBuf};

/// Files of a built image.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    /// `vmlinux` (the uncompressed ELF, booted through PVH) when the image
    /// has one, else `vmlinuz` (image directories from before it, which
    /// still boot, only slower: under TCG the bzImage's XZ decompression
    /// costs seconds; docs/benchmarks.md).
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
    #[error("the root filesystem {0} is not a file (capsem image ls)")]
    NoRootfs(PathBuf),
}

impl Image {
    /// Checks that the image in `dir` is complete.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let elf = dir.join("vmlinux");
        let image = Self {
            dir: dir.to_path_buf(),
            kernel: if elf.is_file() {
                elf
            } else {
                dir.join("vmlinuz")
            },
            initramfs: dir.join("initramfs.cpio.gz"),
            rootfs: Some(dir.join("rootfs.erofs")).filter(|p| p.is_file()),
        };
        for (path, name) in [
            (&dir.join("vmlinuz"), "vmlinuz"),
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

    /// [`Image::open`], with `rootfs` (an OCI image's) replacing the
    /// directory's root filesystem when given.
    pub fn open_with(dir: &Path, rootfs: Option<&Path>) -> Result<Self, ImageError> {
        let mut image = Self::open(dir)?;
        if let Some(r) = rootfs {
            if !r.is_file() {
                return Err(ImageError::NoRootfs(r.to_path_buf()));
            }
            image.rootfs = Some(r.to_path_buf());
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
        // An image from before the disk root still opens, without one, and
        // one from before vmlinux boots its bzImage.
        let old = Image::open(d.path()).unwrap();
        assert_eq!(old.rootfs, None);
        assert_eq!(old.kernel, d.path().join("vmlinuz"));
        std::fs::write(d.path().join("vmlinux"), b"elf").unwrap();
        assert_eq!(
            Image::open(d.path()).unwrap().kernel,
            d.path().join("vmlinux")
        );
        std::fs::write(d.path().join("rootfs.erofs"), b"r").unwrap();
        assert_eq!(
            Image::open(d.path()).unwrap().rootfs,
            Some(d.path().join("rootfs.erofs"))
        );
        let oci = d.path().join("oci.erofs");
        assert!(matches!(
            Image::open_with(d.path(), Some(&oci)),
            Err(ImageError::NoRootfs(p)) if p == oci
        ));
        std::fs::write(&oci, b"o").unwrap();
        assert_eq!(
            Image::open_with(d.path(), Some(&oci)).unwrap().rootfs,
            Some(oci)
        );
    }
}
