//! The VM's shares (`--share`): one virtiofsd per host directory, started
//! before QEMU, which connects to it as a `vhost-user-fs-device`.
//!
//! Each virtiofsd serves one directory on `<vm-dir>/fs-N.sock` with its
//! namespace sandbox (it pivots into the shared directory, so no path,
//! symlink or `..` from the guest resolves outside it; as a non-root user
//! it enters a user namespace, so the files the guest creates belong to
//! that user) and its default seccomp filter. `ro` and `overlay` shares
//! are served `--readonly`: the guest's own read-only mount is the first
//! line, virtiofsd's refusal the second. virtiofsd serves one connection
//! and exits when QEMU closes it, so it never outlives the VM; it is a
//! child like the others (own session, reaped, recorded in `pids.json`
//! with its socket path as the argv marker, adopted after a crash).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use capsem_host::share::Share;
use nix::sys::signal::Signal;

use super::daemon::{detach, find_program, log_file, wait_for_socket};
use super::{Launch, VmmError};
use crate::reaper::Child;

/// Override for the program (tests, unusual installs).
pub const VIRTIOFSD_BIN_ENV: &str = "CAPSEM_VIRTIOFSD_BIN";

/// A running virtiofsd and the socket QEMU connects to.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub sock: PathBuf,
}

impl Daemon {
    /// The socket's file name (`fs-N.sock`), which is also its name in the
    /// jail (QEMU's cwd).
    pub fn name(&self) -> String {
        self.sock
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// `<vm-dir>/fs-N.sock`.
pub fn socket(dir: &Path, index: usize) -> PathBuf {
    let [sock, _] = capsem_host::share::runtime_files(index);
    dir.join(sock)
}

/// virtiofsd's arguments for one share.
pub fn virtiofsd_args(share: &Share, sock: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--socket-path".into(),
        sock.into(),
        "--shared-dir".into(),
        share.host.clone().into(),
        "--sandbox".into(),
        "namespace".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    if share.mode.host_readonly() {
        args.push("--readonly".into());
    }
    args
}

/// QEMU's arguments for the `index`th share.
pub fn qemu_args(index: usize, sock: &Path) -> Vec<OsString> {
    let mut chardev = OsString::from(format!("socket,id=fs{index},path="));
    chardev.push(sock);
    vec![
        "-chardev".into(),
        chardev,
        "-device".into(),
        format!(
            "vhost-user-fs-device,chardev=fs{index},tag={}",
            capsem_host::share::tag(index)
        )
        .into(),
    ]
}

/// Starts one virtiofsd per share and waits for each socket; on failure
/// the ones already started are killed.
pub fn start_all(launch: &Launch<'_>) -> Result<Vec<Daemon>, VmmError> {
    let shares = &launch.cfg.shares;
    if shares.is_empty() {
        return Ok(Vec::new());
    }
    let bin = find_program(VIRTIOFSD_BIN_ENV, "virtiofsd").ok_or_else(|| {
        VmmError::Backend("virtiofsd not found: run scripts/install-deps.sh".into())
    })?;
    let mut daemons: Vec<Daemon> = Vec::new();
    for (index, share) in shares.iter().enumerate() {
        match start_one(launch, &bin, index, share) {
            Ok(d) => daemons.push(d),
            Err(e) => {
                kill_all(launch, &daemons);
                return Err(e);
            }
        }
    }
    Ok(daemons)
}

/// SIGKILL to each daemon's process group.
pub fn kill_all(launch: &Launch<'_>, daemons: &[Daemon]) {
    for d in daemons {
        launch.reaper.kill_group(&d.child, Signal::SIGKILL);
    }
}

fn start_one(
    launch: &Launch<'_>,
    bin: &Path,
    index: usize,
    share: &Share,
) -> Result<Daemon, VmmError> {
    let root = launch.dir.root();
    let sock = socket(root, index);
    // A socket left by a killed run would pass the wait below at once.
    crate::teardown::remove_file(&sock).map_err(|e| VmmError::Backend(e.to_string()))?;
    let log = root.join(format!("virtiofsd-{index}.log"));
    let mut cmd = Command::new(bin);
    cmd.args(virtiofsd_args(share, &sock))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file(&log)?))
        .stderr(Stdio::from(log_file(&log)?));
    detach(&mut cmd);
    let child = launch.reaper.spawn("virtiofsd", &mut cmd)?;
    tracing::info!(
        "vm {}: started virtiofsd (pid {}) for {} on {} ({})",
        launch.vm_id,
        child.pid,
        share.host.display(),
        share.guest,
        share.mode
    );
    if let Err(e) = wait_for_socket("virtiofsd", &sock, &child, &log) {
        launch.reaper.kill_group(&child, Signal::SIGKILL);
        return Err(e);
    }
    Ok(Daemon { child, sock })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_host::share::ShareMode;

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn readonly_for_ro_and_overlay_only_and_sandboxed() {
        let sock = socket(Path::new("/vm"), 2);
        assert_eq!(sock, Path::new("/vm/fs-2.sock"));
        let share = |mode| Share {
            host: "/src dir".into(),
            guest: "/w".into(),
            mode,
        };
        let rw = virtiofsd_args(&share(ShareMode::Rw), &sock);
        assert_eq!(
            joined(&rw),
            "--socket-path /vm/fs-2.sock --shared-dir /src dir --sandbox namespace --log-level warn"
        );
        for mode in [ShareMode::Ro, ShareMode::Overlay] {
            let args = virtiofsd_args(&share(mode), &sock);
            assert_eq!(args.last().unwrap(), "--readonly", "{mode}");
        }
        // The whole path stays one argv element (the identity marker).
        assert!(rw.iter().any(|a| a == "/src dir"));
    }

    #[test]
    fn qemu_device_per_share() {
        assert_eq!(
            joined(&qemu_args(1, Path::new("/vm/fs-1.sock"))),
            "-chardev socket,id=fs1,path=/vm/fs-1.sock -device vhost-user-fs-device,chardev=fs1,tag=capsem-fs1"
        );
    }
}
