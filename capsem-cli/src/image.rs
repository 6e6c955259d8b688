//! The guest image as `capsem doctor` sees it: the directory capsem-process
//! boots from, its three files, and the kernel release in its manifest.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Environment override for the image directory (capsem-process reads it too).
pub const IMAGE_DIR_ENV: &str = "CAPSEM_IMAGE_DIR";
/// The files `images/build.sh` writes and capsem-process requires.
pub const FILES: [&str; 3] = ["vmlinuz", "initramfs.cpio.gz", "manifest.json"];
/// The Debian root filesystem (an image built before it boots its initramfs).
pub const ROOTFS: &str = "rootfs.erofs";
/// Largest manifest read (a real one is about 2 KiB).
pub const MAX_MANIFEST: u64 = 1 << 20;

/// Errors reading the manifest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is larger than {MAX_MANIFEST} bytes")]
    TooLarge { path: PathBuf },
    #[error("manifest.json is not JSON")]
    Parse(#[source] serde_json::Error),
    #[error("manifest.json has no kernel.release")]
    NoRelease,
}

/// `$CAPSEM_IMAGE_DIR`, else `<home>/images/default` (capsem-process's rule).
pub fn image_dir(env: Option<&OsStr>, home: &Path) -> PathBuf {
    match env.filter(|e| !e.is_empty()) {
        Some(e) => PathBuf::from(e),
        None => home.join("images/default"),
    }
}

/// The required files that `dir` lacks.
pub fn missing_files(dir: &Path) -> Vec<&'static str> {
    FILES
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect()
}

/// `kernel.release` from a manifest's text.
pub fn kernel_release(json: &[u8]) -> Result<String, ImageError> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(ImageError::Parse)?;
    v.pointer("/kernel/release")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or(ImageError::NoRelease)
}

/// Reads `<dir>/manifest.json` (bounded) and returns its kernel release.
pub fn read_kernel_release(dir: &Path) -> Result<String, ImageError> {
    let path = dir.join("manifest.json");
    let read_err = |source| ImageError::Read {
        path: path.clone(),
        source,
    };
    let mut text = Vec::new();
    File::open(&path)
        .map_err(read_err)?
        .take(MAX_MANIFEST + 1)
        .read_to_end(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_MANIFEST {
        return Err(ImageError::TooLarge { path });
    }
    kernel_release(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_dir_rule() {
        let home = Path::new("/h");
        assert_eq!(image_dir(None, home), Path::new("/h/images/default"));
        assert_eq!(
            image_dir(Some(OsStr::new("")), home),
            Path::new("/h/images/default")
        );
        assert_eq!(image_dir(Some(OsStr::new("/img")), home), Path::new("/img"));
    }

    #[test]
    fn manifest_parsing() {
        let real = br#"{"format": 1,
          "kernel": {"package": "linux-image-6.1.0-56-amd64", "version": "6.1.192-2", "release": "6.1.0-56-amd64"},
          "packages": []}"#;
        assert_eq!(kernel_release(real).unwrap(), "6.1.0-56-amd64");
        assert!(matches!(kernel_release(b"{}"), Err(ImageError::NoRelease)));
        assert!(matches!(
            kernel_release(br#"{"kernel": {"release": 6}}"#),
            Err(ImageError::NoRelease)
        ));
        assert!(matches!(
            kernel_release(b"not json"),
            Err(ImageError::Parse(_))
        ));
    }

    #[test]
    fn files_and_bounded_read() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(missing_files(d.path()), FILES.to_vec());
        std::fs::write(d.path().join("vmlinuz"), b"k").unwrap();
        assert_eq!(
            missing_files(d.path()),
            vec!["initramfs.cpio.gz", "manifest.json"]
        );
        assert!(matches!(
            read_kernel_release(d.path()),
            Err(ImageError::Read { .. })
        ));
        std::fs::write(
            d.path().join("manifest.json"),
            vec![b' '; MAX_MANIFEST as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            read_kernel_release(d.path()),
            Err(ImageError::TooLarge { .. })
        ));
        std::fs::write(
            d.path().join("manifest.json"),
            br#"{"kernel": {"release": "6.1.0-x"}}"#,
        )
        .unwrap();
        assert_eq!(read_kernel_release(d.path()).unwrap(), "6.1.0-x");
    }
}
