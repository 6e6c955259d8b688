//! The VMM daemons' jail: who QEMU and vhost-device-vsock run as, and
//! what they can reach.
//!
//! When capsem runs as root, each VM's daemons run as the VM's own uid and
//! gid, `capsem_host::jail::UID_BASE` + a slot leased host-wide in
//! [`UID_LOCK_DIR`] (the guest CID's when free): no `/etc/passwd` entry and
//! no install step is needed, and two running VMs never share a uid, even
//! from two capsem homes. They have no capabilities (the
//! bounding and ambient sets are emptied, and every uid and gid is changed),
//! no supplementary groups but `/dev/kvm`'s group under KVM, and
//! `no_new_privs`. When capsem runs as a normal user they run as that user,
//! as before, with `no_new_privs`.
//!
//! What they can reach: the capsem home is usually under `/root` (0700)
//! and the VM directory is 0700 root, so the daemons are started in
//! `<vm-dir>/jail/` (the `chdir` happens before the uid changes) and name
//! everything relative to it:
//!
//! * `jail/`: owned by the VM's uid, 0700; it holds vhost-device-vsock's
//!   sockets (`vhost.sock`, `vsock.sock`) and a second name (a hard link)
//!   for each of capsem-process's guest listeners `vsock.sock_<port>`,
//!   chowned to the VM's uid (still 0600), since vhost-device-vsock connects
//!   to `<uds-path>_<port>`.
//! * The image's kernel and initramfs, and both disks, are opened here and
//!   inherited: the disks as QEMU fdsets (`-add-fd`, `file=/dev/fdset/N`,
//!   no reopen by path at all), the kernel and initramfs as `/dev/fd/N`
//!   (QEMU opens those by name; the image's files are world-readable).
//!
//! Everything else in the VM directory (logs, `pids.json`, the token,
//! `ctl.sock`, `disk.img` itself) stays root's and unreachable.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The jail directory, inside the VM directory.
pub const JAIL_DIR: &str = "jail";
/// The prefix of capsem-process's guest listeners (`vsock.sock_<port>`).
const LISTENER_PREFIX: &str = "vsock.sock_";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {path} to uid {uid}")]
    Chown {
        path: PathBuf,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |source| JailError::Io {
        path: path.into(),
        source,
    }
}

/// Host-wide leases of the VM uids (root only): the CID is leased per
/// capsem home, but two homes on one host must not share a uid.
pub const UID_LOCK_DIR: &str = "/run/capsem/vm-uids";

/// A VM uid slot held until dropped (`UID_BASE + slot`).
#[derive(Debug)]
pub struct UidLease {
    pub slot: u32,
    _lock: File,
}

/// Leases slot `preferred` (the guest CID, so uid and CID usually agree),
/// else the lowest free slot, under `dir`.
pub fn lease_uid(dir: &Path, preferred: u32) -> Result<UidLease, JailError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let first = super::cid::FIRST_CID;
    let slots = std::iter::once(preferred).chain(first..first + super::cid::MAX_VMS);
    for slot in slots {
        if let Some(lease) = take_uid(dir, slot)? {
            return Ok(lease);
        }
    }
    Err(JailError::Io {
        path: dir.into(),
        source: std::io::Error::other("every VM uid is in use"),
    })
}

/// Takes slot `slot` if it is free (an adopted VM's, say).
pub fn take_uid(dir: &Path, slot: u32) -> Result<Option<UidLease>, JailError> {
    let path = dir.join(format!("uid-{slot}.lock"));
    let lock = super::cid::try_lock(&path).map_err(|e| JailError::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(lock.map(|file| UidLease { slot, _lock: file }))
}

/// The uid slot the running jail in `vm_dir` belongs to (its owner's).
pub fn jail_slot(vm_dir: &Path) -> Option<u32> {
    let uid = std::fs::symlink_metadata(jail_dir(vm_dir)).ok()?.uid();
    let base = capsem_host::jail::UID_BASE;
    (base..capsem_host::jail::UID_END)
        .contains(&uid)
        .then(|| uid - base)
}

/// Whom the VMM daemons run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// capsem runs as a normal user: the daemons keep that identity.
    Caller,
    /// capsem runs as root: the VM's own uid and gid, plus `extra_gid`
    /// (`/dev/kvm`'s group, under KVM) as the only supplementary group.
    Vm {
        uid: u32,
        gid: u32,
        extra_gid: Option<u32>,
    },
}

impl Identity {
    /// The identity for the VM holding uid slot `slot` (see
    /// [`lease_uid`]), when we run as `euid`.
    pub fn for_vm(euid: u32, slot: u32, extra_gid: Option<u32>) -> Self {
        if euid != 0 {
            return Self::Caller;
        }
        let id = capsem_host::jail::vm_uid(slot);
        Self::Vm {
            uid: id,
            gid: id,
            extra_gid,
        }
    }

    /// The owner to give the jail's files, if it is not us.
    pub fn owner(&self) -> Option<(u32, u32)> {
        match *self {
            Self::Caller => None,
            Self::Vm { uid, gid, .. } => Some((uid, gid)),
        }
    }
}

/// The group of `/dev/kvm` (Debian: `kvm`, 0660), for a KVM guest's
/// supplementary group; never root's group, and only if the group may
/// open it read-write. (A `/dev/kvm` only root can open leaves QEMU as the
/// VM's uid without KVM: its start fails and says so in qemu.log.)
pub fn kvm_gid() -> Option<u32> {
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    (meta.gid() != 0 && meta.mode() & 0o060 == 0o060).then(|| meta.gid())
}

/// `<vm-dir>/jail`.
pub fn jail_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join(JAIL_DIR)
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), JailError> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|source| JailError::Chown {
        path: path.into(),
        uid,
        source,
    })
}

/// Makes a fresh `jail/` for this boot (what an earlier boot left there,
/// possibly under another uid, goes), owned by `identity`, and links the
/// guest listeners into it.
pub fn prepare(vm_dir: &Path, identity: Identity) -> Result<PathBuf, JailError> {
    let dir = jail_dir(vm_dir);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dir).map_err(io(&dir))?,
        Ok(_) => std::fs::remove_file(&dir).map_err(io(&dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&dir)(e)),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io(&dir))?;
    chown(&dir, identity.owner())?;
    link_listeners(vm_dir)?;
    Ok(dir)
}

/// Gives each guest listener `<vm-dir>/vsock.sock_<port>` its name in
/// `jail/`, owned by the jail's owner: at start, and again after an
/// adoption (the new capsem-process bound new sockets, and the running
/// vhost-device-vsock connects by name).
pub fn link_listeners(vm_dir: &Path) -> Result<(), JailError> {
    let dir = jail_dir(vm_dir);
    let meta = std::fs::symlink_metadata(&dir).map_err(io(&dir))?;
    let owner = (meta.uid() != nix::unistd::geteuid().as_raw()).then(|| (meta.uid(), meta.gid()));
    for entry in std::fs::read_dir(vm_dir).map_err(io(vm_dir))? {
        let entry = entry.map_err(io(vm_dir))?;
        let name = entry.file_name();
        let is_socket = entry
            .file_type()
            .is_ok_and(|t| std::os::unix::fs::FileTypeExt::is_socket(&t));
        if !is_socket || !name.as_bytes().starts_with(LISTENER_PREFIX.as_bytes()) {
            continue;
        }
        link_as(&entry.path(), &dir.join(&name), owner)?;
    }
    Ok(())
}

/// Gives `<vm-dir>/name` (a virtiofsd's socket) its name in `jail/`, owned
/// by the jail's owner, for QEMU to connect to by a relative path.
pub fn link_into(vm_dir: &Path, name: &str) -> Result<(), JailError> {
    let dir = jail_dir(vm_dir);
    let meta = std::fs::symlink_metadata(&dir).map_err(io(&dir))?;
    let owner = (meta.uid() != nix::unistd::geteuid().as_raw()).then(|| (meta.uid(), meta.gid()));
    link_as(&vm_dir.join(name), &dir.join(name), owner)
}

fn link_as(target: &Path, link: &Path, owner: Option<(u32, u32)>) -> Result<(), JailError> {
    match std::fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(link)(e)),
    }
    std::fs::hard_link(target, link).map_err(io(link))?;
    chown(link, owner)
}

/// A daemon's program, as the VM's uid can execute it. A program every
/// user can reach (`/usr/bin/qemu-system-x86_64`) is run by its path; one
/// in a directory the VM's uid cannot traverse (vhost-device-vsock in
/// `/root/.cargo/bin`) is opened here and run as `/proc/self/fd/N`
/// (`ps` then shows `N` as its name; its argv[0] is still its path).
#[derive(Debug)]
pub struct Program {
    pub exec: PathBuf,
    pub path: PathBuf,
    /// Kept open (close-on-exec) until the child has been spawned.
    _fd: Option<File>,
}

impl Program {
    pub fn new(path: &Path, identity: Identity) -> Result<Self, JailError> {
        if identity == Identity::Caller || reachable_by_all(path) {
            return Ok(Self {
                exec: path.into(),
                path: path.into(),
                _fd: None,
            });
        }
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            exec: format!("/proc/self/fd/{}", fd.as_raw_fd()).into(),
            path: path.into(),
            _fd: Some(fd),
        })
    }

    /// A `Command` that runs this program, with argv[0] its path.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exec);
        cmd.arg0(&self.path);
        cmd
    }
}

/// Whether every directory above `path` and `path` itself have the
/// others-execute bit (so any uid can execute it by name).
fn reachable_by_all(path: &Path) -> bool {
    let Ok(real) = path.canonicalize() else {
        return false;
    };
    real.ancestors()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// Files a daemon inherits (opened here, named to it by fd number) and
/// the cgroup it joins, kept open until it has been spawned.
#[derive(Debug, Default)]
pub struct Inherit {
    files: Vec<File>,
}

impl Inherit {
    /// Keeps `file` for the child; returns the fd number it will have there.
    pub fn pass(&mut self, file: File) -> RawFd {
        let fd = file.as_raw_fd();
        self.files.push(file);
        fd
    }

    /// `/dev/fd/N` for `file`.
    pub fn pass_path(&mut self, file: File) -> String {
        format!("/dev/fd/{}", self.pass(file))
    }
}

/// What the child does between fork and exec, after `detach`.
#[derive(Debug)]
pub struct Confine<'a> {
    pub cwd: &'a Path,
    pub identity: Identity,
    pub inherit: &'a Inherit,
    /// An open `cgroup.procs` to join (written `0`: the writer itself).
    pub cgroup_procs: Option<&'a File>,
}

/// Registers the confinement on `cmd`: clear close-on-exec on the
/// inherited fds, `chdir` into the jail, join the cgroup, then (as root)
/// drop every capability and take the VM's uid and gid; `no_new_privs` last.
pub fn confine(cmd: &mut Command, how: &Confine<'_>) -> Result<(), JailError> {
    let cwd = CString::new(how.cwd.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        path: how.cwd.into(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let fds: Vec<RawFd> = how.inherit.files.iter().map(AsRawFd::as_raw_fd).collect();
    let procs = how.cgroup_procs.map(AsRawFd::as_raw_fd);
    let identity = how.identity;
    // SAFETY: only async-signal-safe syscalls on data prepared before the
    // fork (no allocation); the fds stay open in the parent until spawn
    // returns, as `Inherit` and the cgroup's file outlive the `Command`'s use.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            for &fd in &fds {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
            check(libc::chdir(cwd.as_ptr()))?;
            if let Some(fd) = procs {
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Identity::Vm {
                uid,
                gid,
                extra_gid,
            } = identity
            {
                check(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ))?;
                // Up to the first capability this kernel does not know.
                for cap in 0..64 {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                        break;
                    }
                }
                let groups = [gid, extra_gid.unwrap_or(gid)];
                let n = if extra_gid.is_some() { 2 } else { 1 };
                check(libc::setgroups(n, groups.as_ptr()))?;
                check(libc::setresgid(gid, gid, gid))?;
                // All uids non-zero and no SECBIT_KEEP_CAPS: the kernel
                // clears the permitted and effective sets here.
                check(libc::setresuid(uid, uid, uid))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_host::jail::UID_BASE;
    use std::os::unix::net::UnixListener;

    #[test]
    fn root_gets_a_uid_per_cid_and_a_user_keeps_theirs() {
        assert_eq!(Identity::for_vm(1000, 3, None), Identity::Caller);
        assert_eq!(Identity::Caller.owner(), None);
        let id = Identity::for_vm(0, 3, Some(108));
        assert_eq!(
            id,
            Identity::Vm {
                uid: UID_BASE + 3,
                gid: UID_BASE + 3,
                extra_gid: Some(108)
            }
        );
        assert_eq!(id.owner(), Some((UID_BASE + 3, UID_BASE + 3)));
        assert_ne!(
            Identity::for_vm(0, 4, None).owner(),
            id.owner(),
            "two VMs share a uid"
        );
    }

    #[test]
    fn prepare_links_only_listeners_and_drops_old_contents() {
        let vm = tempfile::tempdir().unwrap();
        let _l = UnixListener::bind(vm.path().join("vsock.sock_5000")).unwrap();
        let _c = UnixListener::bind(vm.path().join("ctl.sock")).unwrap();
        std::fs::write(vm.path().join("vsock.sock_notes"), "not a socket").unwrap();
        let old = jail_dir(vm.path());
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("stale"), "x").unwrap();

        let dir = prepare(vm.path(), Identity::Caller).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["vsock.sock_5000"]);
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        // The link is the listener itself: a connection by it is accepted.
        let _s = std::os::unix::net::UnixStream::connect(dir.join("vsock.sock_5000")).unwrap();
        _l.accept().unwrap();
    }

    #[test]
    fn confined_child_runs_in_the_jail_with_no_new_privs_and_its_fds() {
        let vm = tempfile::tempdir().unwrap();
        let dir = prepare(vm.path(), Identity::Caller).unwrap();
        let file = vm.path().join("payload");
        std::fs::write(&file, "inherited").unwrap();
        let mut inherit = Inherit::default();
        let path = inherit.pass_path(File::open(&file).unwrap());
        // A stand-in for cgroup.procs: the child writes `0` (itself) to it.
        let procs_path = vm.path().join("cgroup.procs");
        let procs = File::create(&procs_path).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "pwd; cat \"$0\"; echo; grep NoNewPrivs /proc/self/status",
            &path,
        ]);
        confine(
            &mut cmd,
            &Confine {
                cwd: &dir,
                identity: Identity::Caller,
                inherit: &inherit,
                cgroup_procs: Some(&procs),
            },
        )
        .unwrap();
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(std::fs::read_to_string(&procs_path).unwrap(), "0");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next().map(PathBuf::from),
            Some(dir.canonicalize().unwrap())
        );
        assert_eq!(lines.next(), Some("inherited"));
        assert_eq!(
            lines
                .next()
                .map(|l| l.split_whitespace().collect::<Vec<_>>()),
            Some(vec!["NoNewPrivs:", "1"])
        );
    }

    /// As root, the child runs as the VM's uid with no capabilities; as
    /// anyone else the identity change is refused (EPERM) and nothing runs.
    #[test]
    fn a_vm_identity_drops_root_and_every_capability() {
        let vm = tempfile::tempdir().unwrap();
        let uid = UID_BASE + 4095;
        let identity = Identity::Vm {
            uid,
            gid: uid,
            extra_gid: None,
        };
        let root = nix::unistd::geteuid().is_root();
        let dir = if root {
            prepare(vm.path(), identity).unwrap()
        } else {
            prepare(vm.path(), Identity::Caller).unwrap()
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status",
        ]);
        let inherit = Inherit::default();
        confine(
            &mut cmd,
            &Confine {
                cwd: &dir,
                identity,
                inherit: &inherit,
                cgroup_procs: None,
            },
        )
        .unwrap();
        let out = cmd.output();
        if !root {
            let err = out.unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
            return;
        }
        let out = out.unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let fields = |key: &str| -> Vec<String> {
            let line = text
                .lines()
                .find(|l| l.starts_with(key))
                .unwrap_or_default();
            line.split_whitespace().skip(1).map(str::to_owned).collect()
        };
        assert_eq!(fields("Uid:"), vec![uid.to_string(); 4], "{text}");
        assert_eq!(fields("Gid:"), vec![uid.to_string(); 4], "{text}");
        assert_eq!(fields("Groups:"), vec![uid.to_string()], "{text}");
        for cap in ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(fields(cap), vec!["0000000000000000"], "{cap} {text}");
        }
    }

    #[test]
    fn a_program_behind_a_private_directory_runs_by_its_fd() {
        let vm = Identity::for_vm(0, 3, None);
        let public = Program::new(Path::new("/bin/sh"), vm).unwrap();
        assert_eq!(public.exec, Path::new("/bin/sh"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let sh = dir.path().join("sh");
        std::fs::copy("/bin/sh", &sh).unwrap();
        assert_eq!(Program::new(&sh, Identity::Caller).unwrap().exec, sh);
        let private = Program::new(&sh, vm).unwrap();
        assert!(private.exec.starts_with("/proc/self/fd/"), "{private:?}");
        let out = private
            .command()
            .args(["-c", "echo \"$0\""])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            sh.to_string_lossy()
        );
    }

    #[test]
    fn uid_slots_prefer_the_cid_and_are_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let a = lease_uid(d.path(), 5).unwrap();
        assert_eq!(a.slot, 5);
        let b = lease_uid(d.path(), 5).unwrap();
        assert_eq!(b.slot, super::super::cid::FIRST_CID, "5 is held");
        assert!(take_uid(d.path(), 5).unwrap().is_none());
        drop(a);
        assert_eq!(take_uid(d.path(), 5).unwrap().unwrap().slot, 5);
        let vm = tempfile::tempdir().unwrap();
        prepare(vm.path(), Identity::Caller).unwrap();
        let ours = nix::unistd::geteuid().as_raw();
        let expect = (UID_BASE..capsem_host::jail::UID_END)
            .contains(&ours)
            .then(|| ours - UID_BASE);
        assert_eq!(jail_slot(vm.path()), expect);
    }
}
