//! Host limits per VM with cgroup v2: where they can be applied
//! ([`probe`], also what `capsem doctor` reports), and the writer that
//! makes a VM's cgroup ([`Base::create`]).
//!
//! The base is `$CAPSEM_CGROUP` (a delegated subtree that has no processes
//! of its own), else, as root on a host whose cgroup v2 hierarchy has the
//! memory, pids and cpu controllers, `<cgroup2 mount>/capsem`. Each VM gets
//! `<base>/<vm-id>` with:
//!
//! * `memory.max`: guest RAM + [`OVERHEAD_MIB`] (QEMU's and
//!   vhost-device-vsock's own memory) + under TCG [`TCG_CACHE_MIB`] (QEMU's
//!   translation cache, 1 GiB by default on 64-bit hosts); `memory.swap.max`
//!   0 where the file exists, so the limit is not pushed to swap.
//! * `pids.max`: [`PIDS_MAX`] (QEMU's vCPU, I/O and worker threads, at most
//!   64 block workers, and vhost-device-vsock's few threads).
//! * `cpu.max`: `--cpus` cores and a quarter more for the device threads.
//!
//! A host with only a cgroup v1 (or hybrid) hierarchy cannot take these
//! limits: its cgroup v2 mount has no controllers. The VM still starts.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A delegated cgroup v2 directory capsem may create VM cgroups in.
pub const CGROUP_ENV: &str = "CAPSEM_CGROUP";
/// The controllers the limits need.
pub const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// Memory for the VMM processes themselves, beyond guest RAM.
pub const OVERHEAD_MIB: u64 = 256;
/// QEMU's TCG translation cache (its default `tb-size` on 64-bit hosts).
pub const TCG_CACHE_MIB: u64 = 1024;
/// Tasks (threads) across QEMU and vhost-device-vsock.
pub const PIDS_MAX: u32 = 512;
/// cgroup v2's default `cpu.max` period.
const CPU_PERIOD_US: u64 = 100_000;

/// Why the limits cannot be applied here, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no cgroup v2 hierarchy is mounted")]
    NotMounted,
    #[error(
        "the cgroup v2 hierarchy at {mount} lacks the {missing} controller(s) \
         (a cgroup v1 or hybrid host: they belong to v1)"
    )]
    NoControllers { mount: PathBuf, missing: String },
    #[error("not root, and {CGROUP_ENV} names no delegated cgroup")]
    NotDelegated,
    #[error("{path} is not a writable cgroup v2 directory with the {missing} controller(s)")]
    BadDelegation { path: PathBuf, missing: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The limits of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    pub pids_max: u32,
    /// `cpu.max`'s quota, per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
}

impl Limits {
    pub fn for_vm(memory_mib: u32, cpus: u32, tcg: bool) -> Self {
        let cache = if tcg { TCG_CACHE_MIB } else { 0 };
        Self {
            memory_max: (u64::from(memory_mib) + OVERHEAD_MIB + cache) << 20,
            pids_max: PIDS_MAX,
            cpu_quota_us: u64::from(cpus) * CPU_PERIOD_US + CPU_PERIOD_US / 4,
        }
    }
}

/// The cgroup v2 mount point in a `/proc/self/mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The controllers of `required` that `dir/cgroup.controllers` lacks.
fn missing_controllers(dir: &Path) -> Vec<&'static str> {
    let have = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let have: Vec<&str> = have.split_whitespace().collect();
    CONTROLLERS
        .into_iter()
        .filter(|c| !have.contains(c))
        .collect()
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads a NUL-terminated path we own.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Where VM cgroups go, and whether its parent's controllers must be
/// enabled first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// The directory holding one cgroup per VM.
    pub dir: PathBuf,
    /// The parent whose `cgroup.subtree_control` must enable the
    /// controllers for `dir` (the mount's root; none for a delegation).
    pub parent: Option<PathBuf>,
}

/// Where the limits can be applied on this host, or why not.
pub fn probe() -> Result<Base, Unavailable> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    probe_with(
        std::env::var_os(CGROUP_ENV).map(PathBuf::from),
        cgroup2_mount(&mountinfo),
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
    )
}

/// [`probe`] from its inputs (a temp dir stands in for cgroupfs in tests).
pub fn probe_with(
    delegated: Option<PathBuf>,
    mount: Option<PathBuf>,
    root: bool,
) -> Result<Base, Unavailable> {
    if let Some(dir) = delegated.filter(|d| !d.as_os_str().is_empty()) {
        let missing = missing_controllers(&dir);
        if !missing.is_empty() || !writable(&dir.join("cgroup.subtree_control")) {
            return Err(Unavailable::BadDelegation {
                path: dir,
                missing: CONTROLLERS.join(", "),
            });
        }
        return Ok(Base { dir, parent: None });
    }
    let mount = mount.ok_or(Unavailable::NotMounted)?;
    let missing = missing_controllers(&mount);
    if !missing.is_empty() {
        return Err(Unavailable::NoControllers {
            mount,
            missing: missing.join(", "),
        });
    }
    if !root {
        return Err(Unavailable::NotDelegated);
    }
    Ok(Base {
        dir: mount.join("capsem"),
        parent: Some(mount),
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Write {
        path: path.into(),
        value: value.into(),
        source,
    };
    // `create` so a temp dir works as a stand-in; cgroupfs files exist.
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.into(),
            source,
        }),
    }
}

fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let value: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    write(&dir.join("cgroup.subtree_control"), &value.join(" "))
}

/// A VM's cgroup: its `cgroup.procs`, open for the daemons to join between
/// fork and exec. Removed when dropped (it is empty once they are reaped).
#[derive(Debug)]
pub struct VmCgroup {
    dir: PathBuf,
    procs: File,
}

impl Base {
    /// Makes `<base>/<name>` with `limits` (a leftover of the same name is
    /// reused: its limits are rewritten).
    pub fn create(&self, name: &str, limits: &Limits) -> Result<VmCgroup, CgroupError> {
        if let Some(parent) = &self.parent {
            enable_controllers(parent)?;
            mkdir(&self.dir)?;
        }
        enable_controllers(&self.dir)?;
        let dir = self.dir.join(name);
        mkdir(&dir)?;
        write(&dir.join("memory.max"), &limits.memory_max.to_string())?;
        if dir.join("memory.swap.max").exists() {
            write(&dir.join("memory.swap.max"), "0")?;
        }
        write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        write(
            &dir.join("cpu.max"),
            &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
        )?;
        let procs_path = dir.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&procs_path)
            .map_err(|source| CgroupError::Write {
                path: procs_path,
                value: String::new(),
                source,
            })?;
        Ok(VmCgroup { dir, procs })
    }
}

impl VmCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `cgroup.procs`: a child writes `0` to it to join.
    pub fn procs(&self) -> &File {
        &self.procs
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        // Only an empty cgroup can go; cgroupfs has no files to remove
        // first (a stand-in directory keeps its files and stays, as does a
        // cgroup an adopted VM still runs in).
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_cgroup2_mount() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn limits_follow_memory_cpus_and_accel() {
        let kvm = Limits::for_vm(512, 2, false);
        assert_eq!(kvm.memory_max, (512 + OVERHEAD_MIB) << 20);
        assert_eq!(kvm.cpu_quota_us, 225_000);
        assert_eq!(kvm.pids_max, PIDS_MAX);
        let tcg = Limits::for_vm(512, 1, true);
        assert_eq!(tcg.memory_max, (512 + OVERHEAD_MIB + TCG_CACHE_MIB) << 20);
        assert_eq!(tcg.cpu_quota_us, 125_000);
    }

    #[test]
    fn a_mount_without_controllers_is_refused_with_the_reason() {
        let fake = tempfile::tempdir().unwrap();
        std::fs::write(fake.path().join("cgroup.controllers"), "").unwrap();
        let err = probe_with(None, Some(fake.path().into()), true).unwrap_err();
        assert!(
            matches!(&err, Unavailable::NoControllers { missing, .. } if missing == "memory, pids, cpu"),
            "{err}"
        );
        assert_eq!(
            probe_with(None, None, true).unwrap_err(),
            Unavailable::NotMounted
        );
        std::fs::write(fake.path().join("cgroup.controllers"), "cpu memory pids io").unwrap();
        assert_eq!(
            probe_with(None, Some(fake.path().into()), false).unwrap_err(),
            Unavailable::NotDelegated
        );
    }

    #[test]
    fn the_writer_enables_controllers_and_writes_the_limits() {
        let fake = tempfile::tempdir().unwrap();
        let root = fake.path();
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let base = probe_with(None, Some(root.into()), true).unwrap();
        assert_eq!(base.dir, root.join("capsem"));
        let limits = Limits::for_vm(256, 1, true);
        let vm = base.create("dev-1", &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(read("capsem/cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(
            read("capsem/dev-1/memory.max"),
            ((256 + OVERHEAD_MIB + TCG_CACHE_MIB) << 20).to_string()
        );
        assert_eq!(read("capsem/dev-1/pids.max"), PIDS_MAX.to_string());
        assert_eq!(read("capsem/dev-1/cpu.max"), "125000 100000");
        assert!(!root.join("capsem/dev-1/memory.swap.max").exists());
        assert_eq!(vm.dir(), root.join("capsem/dev-1"));
        // A delegated subtree is used as it is.
        let deleg = root.join("capsem");
        std::fs::write(deleg.join("cgroup.controllers"), "memory pids cpu").unwrap();
        let base = probe_with(Some(deleg.clone()), None, false).unwrap();
        assert_eq!(
            base,
            Base {
                dir: deleg,
                parent: None
            }
        );
    }
}
