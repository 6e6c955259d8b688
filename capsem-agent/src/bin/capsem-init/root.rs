//! The switch from the initramfs to the guest's real root: the read-only
//! root image (erofs, or ext4) as the lower layer of an overlay whose upper
//! layer lives on the VM's writable disk (ext4), or on a tmpfs when the VM
//! has none.
//!
//! The disks are found by their virtio serial numbers (`capsem.root=`,
//! `capsem.disk=`), not by name: the order in which virtio-mmio devices
//! become `vda`, `vdb` is not a contract. The agent stays the one from the
//! initramfs: it is bound read-only onto `/run/capsem/capsem-agent` in the
//! new root, so any root filesystem works without capsem inside it.
//!
//! The switch itself is the classic one for an initramfs (whose root cannot
//! be unmounted or pivoted): move the new root onto `/`, `chroot` into it.

use std::fs::{self, DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::mounts::{self, MountError};

/// Where the agent is in the new root (bound from the initramfs).
pub const AGENT_IN_ROOT: &str = "/run/capsem/capsem-agent";
/// The agent's path in the initramfs.
const AGENT_IN_INITRAMFS: &str = "/usr/bin/capsem-agent";
/// Mount points inside the initramfs.
const LOWER: &str = "/capsem/lower";
const RW: &str = "/capsem/rw";
const NEW_ROOT: &str = "/capsem/root";
/// How long the disks may take to appear once virtio_blk is loaded (its
/// probe is synchronous, so this is a safety margin, not a expected wait).
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// Root image filesystems, tried in order (ext4 only for comparisons).
const ROOT_FSTYPES: [&str; 2] = ["erofs", "ext4"];

/// Errors switching to the real root.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("no block device with serial {serial:?} appeared within {DEVICE_WAIT:?}")]
    NoDevice { serial: String },
    #[error("cannot read {path}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {text:?}, not MAJOR:MINOR")]
    DevNumber { path: PathBuf, text: String },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create device node {path}")]
    Mknod {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: Errno,
    },
    #[error("cannot mount the root image {device} (tried {ROOT_FSTYPES:?})")]
    RootImage {
        device: PathBuf,
        #[source]
        source: Errno,
    },
    #[error(transparent)]
    Pseudo(#[from] MountError),
    #[error("cannot enter the new root")]
    Chroot(#[source] Errno),
    #[error("mounting the shares failed")]
    Shares(#[from] crate::shares::ShareMountError),
}

/// Which disks make the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisks<'a> {
    /// Serial of the read-only root image.
    pub root: &'a str,
    /// Serial of the writable disk; `None`: the upper layer is a tmpfs.
    pub disk: Option<&'a str>,
    /// Mounted in the new root before the switch (their overlay state on
    /// the writable disk, which is out of reach after it).
    pub shares: &'a [crate::cmdline::GuestShare],
}

/// Mounts the overlay root and switches into it. [`mounts::EARLY`] must be
/// mounted (they move along); [`mounts::RUN`] is mounted in the new root.
/// Returns the OCI image's run settings found on the writable disk (see
/// [`read_image_config`]).
pub fn switch(disks: &RootDisks<'_>) -> Result<Option<String>, RootError> {
    for dir in [LOWER, RW, NEW_ROOT] {
        make_dir(Path::new(dir), 0o700)?;
    }
    let root_dev = find_device(disks.root)?;
    mount_root_image(&root_dev)?;
    match disks.disk {
        Some(serial) => {
            let dev = find_device(serial)?;
            mount_at(&dev, RW, "ext4", MsFlags::empty(), None)?;
        }
        None => mount_at(
            Path::new("tmpfs"),
            RW,
            "tmpfs",
            MsFlags::empty(),
            Some("mode=0755"),
        )?,
    }
    let image_config = read_image_config(Path::new(&format!("{RW}/{IMAGE_CONFIG}")));
    let upper = format!("{RW}/upper");
    let work = format!("{RW}/work");
    make_dir(Path::new(&upper), 0o755)?;
    make_dir(Path::new(&work), 0o755)?;
    let options = overlay_options(LOWER, &upper, &work);
    mount_at(
        Path::new("overlay"),
        NEW_ROOT,
        "overlay",
        MsFlags::empty(),
        Some(&options),
    )?;
    for m in mounts::EARLY {
        let target = format!("{NEW_ROOT}{}", m.target);
        make_dir(Path::new(&target), 0o755)?;
        move_mount(m.target, &target)?;
    }
    mounts::mount_list(NEW_ROOT, std::slice::from_ref(&mounts::RUN))?;
    bind_agent()?;
    crate::shares::mount_all(disks.shares, NEW_ROOT, RW)?;
    nix::unistd::chdir(NEW_ROOT).map_err(RootError::Chroot)?;
    move_mount(".", "/")?;
    nix::unistd::chroot(".").map_err(RootError::Chroot)?;
    nix::unistd::chdir("/").map_err(RootError::Chroot)?;
    Ok(image_config)
}

/// Where capsem-process puts an OCI image's `config.json` on a new
/// writable disk (beside, not in, the overlay's `upper/`).
const IMAGE_CONFIG: &str = "capsem/image.json";
/// Largest image config handed to the agent (it travels in one
/// environment variable, whose limit is 128 KiB).
pub const MAX_IMAGE_CONFIG: u64 = 64 << 10;

/// The file's text when it exists, is UTF-8 without NUL and fits
/// [`MAX_IMAGE_CONFIG`]; anything else is logged and not delivered (the
/// agent checks every field again).
fn read_image_config(path: &Path) -> Option<String> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            crate::log!(
                "cannot open {}: {e}; the image's settings are not applied",
                path.display()
            );
            return None;
        }
    };
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_IMAGE_CONFIG + 1).read_to_end(&mut bytes) {
        crate::log!(
            "cannot read {}: {e}; the image's settings are not applied",
            path.display()
        );
        return None;
    }
    if bytes.len() as u64 > MAX_IMAGE_CONFIG || bytes.contains(&0) {
        crate::log!(
            "{} is over {MAX_IMAGE_CONFIG} bytes or holds a NUL; the image's settings are not applied",
            path.display()
        );
        return None;
    }
    match String::from_utf8(bytes) {
        Ok(text) => Some(text),
        Err(_) => {
            crate::log!(
                "{} is not UTF-8; the image's settings are not applied",
                path.display()
            );
            None
        }
    }
}

/// The overlay's mount data.
fn overlay_options(lower: &str, upper: &str, work: &str) -> String {
    format!("lowerdir={lower},upperdir={upper},workdir={work}")
}

/// The agent from the initramfs, read-only, at [`AGENT_IN_ROOT`].
fn bind_agent() -> Result<(), RootError> {
    let target = format!("{NEW_ROOT}{AGENT_IN_ROOT}");
    let target_path = Path::new(&target);
    if let Some(parent) = target_path.parent() {
        make_dir(parent, 0o755)?;
    }
    File::create(target_path).map_err(|source| RootError::Create {
        path: target_path.into(),
        source,
    })?;
    let fail = |source| RootError::Mount {
        what: AGENT_IN_INITRAMFS.into(),
        target: target.clone(),
        source,
    };
    mount(
        Some(AGENT_IN_INITRAMFS),
        target.as_str(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(fail)?;
    mount(
        None::<&str>,
        target.as_str(),
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(fail)
}

fn mount_root_image(dev: &Path) -> Result<(), RootError> {
    let mut last = Errno::ENODEV;
    for fstype in ROOT_FSTYPES {
        match mount(
            Some(dev),
            LOWER,
            Some(fstype),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            Ok(()) => {
                crate::log!("root image {} mounted as {fstype}", dev.display());
                return Ok(());
            }
            Err(e) => last = e,
        }
    }
    Err(RootError::RootImage {
        device: dev.into(),
        source: last,
    })
}

fn mount_at(
    what: &Path,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootError> {
    mount(Some(what), target, Some(fstype), flags, data).map_err(|source| RootError::Mount {
        what: what.display().to_string(),
        target: target.into(),
        source,
    })
}

fn move_mount(from: &str, to: &str) -> Result<(), RootError> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        RootError::Mount {
            what: from.into(),
            target: to.into(),
            source,
        }
    })
}

fn make_dir(path: &Path, mode: u32) -> Result<(), RootError> {
    if path.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| RootError::Create {
            path: path.into(),
            source,
        })
}

/// The `/dev` node of the virtio disk whose serial is `serial`, made if
/// devtmpfs has not made it yet. sysfs offers no change notification, so
/// this re-reads it until [`DEVICE_WAIT`] passes.
fn find_device(serial: &str) -> Result<PathBuf, RootError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(name) = block_with_serial(Path::new("/sys/block"), serial)? {
            return device_node(&name);
        }
        if Instant::now() >= deadline {
            return Err(RootError::NoDevice {
                serial: serial.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The name (`vda`) of the block device under `sys_block` whose `serial`
/// attribute is `serial`.
fn block_with_serial(sys_block: &Path, serial: &str) -> Result<Option<String>, RootError> {
    let entries = fs::read_dir(sys_block).map_err(|source| RootError::Sysfs {
        path: sys_block.into(),
        source,
    })?;
    for entry in entries.flatten() {
        let Ok(text) = fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if text.trim_end() == serial {
            return Ok(Some(entry.file_name().to_string_lossy().into_owned()));
        }
    }
    Ok(None)
}

/// `/dev/NAME`, created from `/sys/block/NAME/dev` when missing.
fn device_node(name: &str) -> Result<PathBuf, RootError> {
    let node = Path::new("/dev").join(name);
    if node.exists() {
        return Ok(node);
    }
    let path = Path::new("/sys/block").join(name).join("dev");
    let text = fs::read_to_string(&path).map_err(|source| RootError::Sysfs {
        path: path.clone(),
        source,
    })?;
    let (major, minor) = parse_dev(&text).ok_or_else(|| RootError::DevNumber {
        path,
        text: text.trim_end().chars().take(32).collect(),
    })?;
    match mknod(
        &node,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        makedev(major, minor),
    ) {
        Ok(()) | Err(Errno::EEXIST) => Ok(node),
        Err(source) => Err(RootError::Mknod { path: node, source }),
    }
}

/// `MAJOR:MINOR\n` from sysfs.
fn parse_dev(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.trim_end().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_numbers() {
        assert_eq!(parse_dev("254:16\n"), Some((254, 16)));
        assert_eq!(parse_dev("254"), None);
        assert_eq!(parse_dev("a:1"), None);
    }

    #[test]
    fn finds_a_disk_by_serial() {
        let d = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "capsem-disk\n"), ("vdb", "capsem-root\n")] {
            fs::create_dir(d.path().join(name)).unwrap();
            fs::write(d.path().join(name).join("serial"), serial).unwrap();
        }
        fs::create_dir(d.path().join("loop0")).unwrap();
        assert_eq!(
            block_with_serial(d.path(), "capsem-root")
                .unwrap()
                .as_deref(),
            Some("vdb")
        );
        assert_eq!(
            block_with_serial(d.path(), "capsem-disk")
                .unwrap()
                .as_deref(),
            Some("vda")
        );
        assert_eq!(block_with_serial(d.path(), "capsem").unwrap(), None);
        assert!(block_with_serial(&d.path().join("none"), "x").is_err());
    }

    #[test]
    fn image_config_is_bounded_and_clean() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("image.json");
        assert_eq!(read_image_config(&p), None);
        std::fs::write(&p, br#"{"Env":["A=1"]}"#).unwrap();
        assert_eq!(read_image_config(&p).as_deref(), Some(r#"{"Env":["A=1"]}"#));
        std::fs::write(&p, b"a\0b").unwrap();
        assert_eq!(read_image_config(&p), None);
        std::fs::write(&p, vec![b' '; MAX_IMAGE_CONFIG as usize + 1]).unwrap();
        assert_eq!(read_image_config(&p), None);
    }

    #[test]
    fn overlay_layers() {
        assert_eq!(
            overlay_options("/l", "/rw/upper", "/rw/work"),
            "lowerdir=/l,upperdir=/rw/upper,workdir=/rw/work"
        );
    }
}
