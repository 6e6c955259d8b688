//! The VM's writable disk, `<vm-dir>/disk.img`: the upper layer of the
//! guest's overlay root (capsem-init mounts it; docs/image.md).
//!
//! A sparse file of `--disk-size` bytes, formatted ext4 on the host by
//! `mkfs.ext4` (e2fsprogs) the first time the VM boots: under a second on a
//! sparse file, no formatter needed in the guest, and a disk that exists is
//! always a formatted one (it is made under a temporary name and renamed).
//! A persistent VM's disk is reused as it is on every later boot; a
//! temporary VM's goes with its directory. A VM booting an OCI image gets
//! the image's `config.json` at `capsem/image.json` on its new disk
//! (`mkfs.ext4 -d`), which capsem-init hands to the agent.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::reaper::Reaper;

/// Override for the formatter (tests, unusual installs).
pub const MKFS_BIN_ENV: &str = "CAPSEM_MKFS_EXT4_BIN";
/// Where mkfs.ext4 lives when `/usr/sbin` is not on a user's `PATH`.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];
/// mkfs.ext4 on a sparse file takes well under a second; this bounds a hang.
const MKFS_TIMEOUT: Duration = Duration::from_secs(120);
/// The virtio serials capsem-init looks for (`capsem.root=`, `capsem.disk=`).
pub const ROOT_SERIAL: &str = "capsem-root";
pub const DISK_SERIAL: &str = "capsem-disk";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path} exists but is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot create the disk {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 not found: run scripts/install-deps.sh (e2fsprogs)")]
    NoMkfs,
    #[error("cannot start mkfs.ext4")]
    Spawn(#[from] crate::reaper::ReaperError),
    #[error("mkfs.ext4 failed ({status}); see {log}")]
    Mkfs { status: String, log: PathBuf },
    #[error("mkfs.ext4 did not finish within {MKFS_TIMEOUT:?}; see {log}")]
    MkfsTimeout { log: PathBuf },
}

/// What [`ensure`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// A new, empty disk was made.
    Created,
    /// The disk of an earlier boot is reused.
    Existing,
}

/// `$CAPSEM_MKFS_EXT4_BIN`, else `mkfs.ext4` on `$PATH`, else in `/usr/sbin` or `/sbin`.
pub fn find_mkfs() -> Option<PathBuf> {
    super::daemon::find_program(MKFS_BIN_ENV, "mkfs.ext4").or_else(|| {
        SBIN_DIRS
            .iter()
            .map(|d| Path::new(d).join("mkfs.ext4"))
            .find(|p| p.is_file())
    })
}

/// mkfs.ext4's arguments for `path`. No reserved blocks (one user, root);
/// lazy inode table and journal init, since a sparse file reads as zeros
/// anyway; no discard pass (nothing to discard in a new sparse file).
/// `seed`: a directory whose files the new filesystem starts with (`-d`).
pub fn mkfs_args(path: &Path, seed: Option<&Path>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = [
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        DISK_SERIAL,
        "-m",
        "0",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
    ]
    .iter()
    .map(Into::into)
    .collect();
    if let Some(dir) = seed {
        args.push("-d".into());
        args.push(dir.into());
    }
    args.push(path.into());
    args
}

/// Where, on the writable disk (outside the overlay's `upper/` and
/// `work/`, so the guest's root never shows it), capsem-init finds the
/// OCI image's run settings.
pub const IMAGE_CONFIG_ON_DISK: &str = "capsem/image.json";

/// Makes `path` a formatted disk of `size` bytes unless it already is one.
/// A new disk holds `image_config` (an OCI image's `config.json`) at
/// [`IMAGE_CONFIG_ON_DISK`]. Blocks the calling thread while mkfs.ext4
/// runs (about a second at most).
pub fn ensure(
    path: &Path,
    size: u64,
    image_config: Option<&Path>,
    reaper: &Reaper,
    log: &Path,
) -> Result<Prepared, DiskError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => return Ok(Prepared::Existing),
        Ok(_) => return Err(DiskError::NotAFile { path: path.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DiskError::Create {
                path: path.into(),
                source,
            })
        }
    }
    let part = path.with_extension("img.part");
    let create = |source| DiskError::Create {
        path: part.clone(),
        source,
    };
    // A leftover of an interrupted creation is never trusted.
    match fs::remove_file(&part) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(create(e)),
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .map_err(create)?;
    // set_len on a new file makes it sparse: no block is written.
    file.set_len(size).map_err(create)?;
    drop(file);
    let seed = path.with_extension("img.seed");
    let seeded = match image_config {
        Some(config) => seed_dir(&seed, config).map(Some),
        None => Ok(None),
    };
    let result = seeded
        .and_then(|s| format(&part, s.as_deref(), reaper, log))
        .and_then(|()| {
            let file = fs::File::open(&part).map_err(create)?;
            file.sync_all().map_err(create)?;
            fs::rename(&part, path).map_err(create)
        });
    if image_config.is_some() {
        let _ = fs::remove_dir_all(&seed);
    }
    if result.is_err() {
        let _ = fs::remove_file(&part);
    }
    result.map(|()| Prepared::Created)
}

/// `<seed>/capsem/image.json`, a copy of `config`, for `mkfs.ext4 -d`.
fn seed_dir(seed: &Path, config: &Path) -> Result<PathBuf, DiskError> {
    let err = |source| DiskError::Create {
        path: seed.into(),
        source,
    };
    let _ = fs::remove_dir_all(seed);
    let target = seed.join(IMAGE_CONFIG_ON_DISK);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    fs::copy(config, &target).map_err(|source| DiskError::Create {
        path: config.into(),
        source,
    })?;
    Ok(seed.to_path_buf())
}

fn format(part: &Path, seed: Option<&Path>, reaper: &Reaper, log: &Path) -> Result<(), DiskError> {
    let mkfs = find_mkfs().ok_or(DiskError::NoMkfs)?;
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|source| DiskError::Create {
            path: log.into(),
            source,
        })?;
    let err_file = log_file.try_clone().map_err(|source| DiskError::Create {
        path: log.into(),
        source,
    })?;
    let mut cmd = Command::new(mkfs);
    cmd.args(mkfs_args(part, seed))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(err_file))
        // Its own group, so a kill reaches it and nothing else.
        .process_group(0);
    let child = reaper.spawn("mkfs.ext4", &mut cmd)?;
    // Started from the (synchronous) backend start on a runtime worker:
    // block this worker only, while the reaper task runs on another.
    let status = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(async { tokio::time::timeout(MKFS_TIMEOUT, child.exited()).await })
    });
    match status {
        Ok(s) if s.code == Some(0) => Ok(()),
        Ok(s) => Err(DiskError::Mkfs {
            status: s.to_string(),
            log: log.into(),
        }),
        Err(_) => {
            reaper.kill_group(&child, nix::sys::signal::Signal::SIGKILL);
            Err(DiskError::MkfsTimeout { log: log.into() })
        }
    }
}

/// `-drive` value for a raw image, with QEMU's comma escaping (`,,`).
pub fn drive(id: &str, file: &Path, readonly: bool) -> String {
    let file = file.to_string_lossy().replace(',', ",,");
    let mut s = format!("if=none,id={id},format=raw,file={file}");
    if readonly {
        s.push_str(",readonly=on");
    } else {
        // The guest's discards punch holes: the file stays sparse.
        s.push_str(",discard=unmap");
    }
    s
}

/// `-device` value of the virtio-blk device for drive `id`.
pub fn device(id: &str, serial: &str) -> String {
    format!("virtio-blk-device,drive={id},serial={serial}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_escapes_commas_and_marks_the_root_read_only() {
        assert_eq!(
            drive("root", Path::new("/img/rootfs.erofs"), true),
            "if=none,id=root,format=raw,file=/img/rootfs.erofs,readonly=on"
        );
        assert_eq!(
            drive("disk", Path::new("/h,x/disk.img"), false),
            "if=none,id=disk,format=raw,file=/h,,x/disk.img,discard=unmap"
        );
        assert_eq!(
            device("disk", DISK_SERIAL),
            "virtio-blk-device,drive=disk,serial=capsem-disk"
        );
    }

    #[test]
    fn mkfs_is_quiet_forced_and_ends_with_the_file() {
        let args = mkfs_args(Path::new("/vm/disk.img.part"), None);
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(s.last().map(String::as_str), Some("/vm/disk.img.part"));
        assert!(s.contains(&"-F".to_owned()));
        assert!(s.join(" ").contains("-t ext4"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creates_a_sparse_ext4_disk_once_and_then_reuses_it() {
        let Some(_) = find_mkfs() else {
            panic!("mkfs.ext4 is missing: run scripts/install-deps.sh");
        };
        let (reaper, task) = Reaper::start().unwrap();
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.img");
        let log = d.path().join("mkfs.log");
        let size = 1 << 30;
        assert_eq!(
            ensure(&disk, size, None, &reaper, &log).unwrap(),
            Prepared::Created
        );
        let meta = fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), size);
        // Sparse: far fewer bytes allocated than its length.
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < size / 8, "{} blocks", meta.blocks());
        // ext4's magic, 0xEF53 at byte 1080.
        let mut magic = [0u8; 2];
        use std::os::unix::fs::FileExt;
        fs::File::open(&disk)
            .unwrap()
            .read_exact_at(&mut magic, 1080)
            .unwrap();
        assert_eq!(magic, [0x53, 0xEF]);
        assert!(!d.path().join("disk.img.part").exists());
        // A second boot keeps what the first wrote.
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .set_len(size + 4096)
            .unwrap();
        assert_eq!(
            ensure(&disk, size, None, &reaper, &log).unwrap(),
            Prepared::Existing
        );
        assert_eq!(fs::metadata(&disk).unwrap().len(), size + 4096);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_disk_holds_the_image_config_outside_the_overlay() {
        let (reaper, task) = Reaper::start().unwrap();
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.img");
        let config = d.path().join("config.json");
        fs::write(&config, br#"{"Env":["FOO=bar"]}"#).unwrap();
        let log = d.path().join("mkfs.log");
        assert_eq!(
            ensure(&disk, 64 << 20, Some(&config), &reaper, &log).unwrap(),
            Prepared::Created
        );
        assert!(!d.path().join("disk.img.seed").exists());
        // The reaper is the only waitpid(-1) caller: stopped (and awaited)
        // before std waits for debugfs, or it may reap debugfs first
        // (ECHILD, seen once in a full run).
        task.abort();
        let _ = task.await;
        let debugfs = ["/usr/sbin/debugfs", "/sbin/debugfs"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("debugfs (e2fsprogs) is missing: run scripts/install-deps.sh");
        let out = Command::new(debugfs)
            .arg("-R")
            .arg(format!("cat /{IMAGE_CONFIG_ON_DISK}"))
            .arg(&disk)
            .output()
            .unwrap();
        assert_eq!(out.stdout, br#"{"Env":["FOO=bar"]}"#, "{out:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_a_directory_and_removes_a_failed_attempt() {
        let (reaper, task) = Reaper::start().unwrap();
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("disk.img");
        fs::create_dir(&dir).unwrap();
        assert!(matches!(
            ensure(&dir, 1 << 20, None, &reaper, &d.path().join("log")),
            Err(DiskError::NotAFile { .. })
        ));
        // mkfs.ext4 refuses a size this small: the error names the log and
        // no partial disk is left.
        let disk = d.path().join("small.img");
        let err = ensure(&disk, 1024, None, &reaper, &d.path().join("log")).unwrap_err();
        assert!(matches!(err, DiskError::Mkfs { .. }), "{err}");
        assert!(!disk.exists());
        assert!(!d.path().join("small.img.part").exists());
        task.abort();
    }
}
