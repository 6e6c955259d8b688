//! `--vmm qemu`: a QEMU microVM whose vsock device is served by
//! vhost-device-vsock.
//!
//! Two children (and a virtiofsd per share, [`super::virtiofs`]), each in
//! its own session (`setsid`) with no inherited terminal fd, all tracked by
//! the reaper, the two confined by [`super::jail`] with `<vm-dir>/jail/` as
//! their cwd:
//!
//! 1. `vhost-device-vsock --guest-cid CID --socket vhost-ID.sock
//!    --uds-path vsock.sock`: a guest connection to CID 2 port P arrives on
//!    our listener `<vm-dir>/vsock.sock_P` (linked into the jail).
//! 2. `qemu-system-x86_64 -M microvm` with guest RAM in a shared memfd (which
//!    vhost-user needs) and `vhost-user-vsock-device`, booting the image's
//!    kernel (its uncompressed `vmlinux` through PVH when it has one) and
//!    initramfs, with two virtio-blk disks: the image's read-only root
//!    filesystem and the VM's writable disk (`disk`), and a virtio-balloon
//!    that only takes the guest's free page reports. The console is a pipe
//!    copied into serial.log.
//!
//! microvm over q35/pc: it reached the agent's hello faster in every run
//! (median 4.93 s vs 5.17 s and 5.50 s under TCG; docs/qemu-notes.md), and
//! it has no firmware, PCI or legacy devices to attack or to boot.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;

use tokio::task::JoinHandle;

use super::accel::{self, Accel};
use super::bootfiles::BootFiles;
use super::cid::{self, CidLease};
use super::daemon::{detach, find_program, log_file, wait_for_socket};
use super::disk;
use super::image::Image;
use super::jail;
use super::serial::{self, ConsoleFacts};
use super::virtiofs;
use super::{GuestBackend, Launch, VmmError};
use crate::reaper::Child;

/// Overrides for the two programs (tests, unusual installs).
pub const QEMU_BIN_ENV: &str = "CAPSEM_QEMU_BIN";
pub const VHOST_BIN_ENV: &str = "CAPSEM_VHOST_VSOCK_BIN";

/// vhost-device-vsock's `--uds-path`, in the jail: a guest connection to
/// port P arrives on `vsock.sock_P`, a name of our listener (`jail`).
pub const VSOCK_BASE: &str = "vsock.sock";

fn backend_err(e: impl std::error::Error) -> VmmError {
    VmmError::Backend(crate::log::chain(&e))
}

#[derive(Debug)]
pub struct Qemu {
    children: Vec<Child>,
    records: Vec<capsem_host::identity::ProcRecord>,
    accel: Accel,
    identity: jail::Identity,
    _uid: Option<jail::UidLease>,
    /// Removed once the daemons are gone (the backend is dropped after
    /// they are reaped).
    _cgroup: Option<capsem_host::cgroup::VmCgroup>,
    cid: CidLease,
    facts: ConsoleFacts,
    serial: Option<JoinHandle<()>>,
}

/// The kernel command line: console, panic ends the VM, the disks the
/// guest's init mounts as its root (by virtio serial), and what it hands to
/// the agent.
///
/// A panic reboots at once (`panic=-1`) by triple fault (`reboot=t`: microvm
/// has no keyboard controller or ACPI reset register for the other methods),
/// and `-no-reboot` turns that reset into QEMU's exit.
///
/// Under TCG the guest's `rdtsc` reads the host's TSC, and microvm has no
/// HPET or ACPI PM timer to calibrate it against; with the host busy, the
/// PIT calibration fails and the boot hangs (3 of 4 loaded boots here). So
/// the TSC rate is given instead of measured (docs/qemu-notes.md).
/// `tsc=reliable` too: the emulated CPU (AMD family 0xF, no constant_tsc)
/// with two vCPUs makes the kernel assume unsynchronized TSCs and fall back
/// to the jiffies clocksource, a clock with 4 ms steps (every sleep and poll
/// timeout rounded up to the tick, no vDSO clock), while QEMU's TCG TSC is
/// one monotonic counter for all vCPUs, derived from the host's.
///
/// `loglevel=5` rather than `quiet`: warnings reach the console too (one
/// line in a good boot), among them the local APIC timer's failed
/// calibration, after which the boot hangs with nothing printed: a host
/// stall of the vCPU in the first 4 ms of the kernel's 100 ms measurement
/// makes the timer look too slow, the kernel disables it, microvm has no
/// timer to fall back on, and the second CPU waits for a jiffy forever
/// (about 1 boot in 250 on a loaded 2-core host). The console copier
/// ([`serial::BOOT_FAULTS`]) sees the line and the session boots again.
///
/// `cryptomgr.notests` skips the crypto self-tests run as each algorithm
/// registers: the largest single item of the kernel's boot under TCG (about
/// 0.3 s of 1.2 s; docs/benchmarks.md). They check the kernel's own
/// implementations against test vectors, not anything the guest or host
/// supplies, and the same kernel runs them on Debian's own test hardware.
/// The CTR-KDF's init is the one self-test that option does not reach (0.1
/// to 0.35 s under TCG; it only runs its test vector, so skipping it removes
/// nothing else), hence `initcall_blacklist=crypto_kdf108_init`.
pub fn kernel_cmdline(token: &str, hostname: &str, tsc_khz: Option<u64>, disks: bool) -> String {
    let mut line = format!(
        "console=ttyS0 loglevel=5 panic=-1 reboot=t cryptomgr.notests \
         initcall_blacklist=crypto_kdf108_init capsem.token={token} capsem.hostname={hostname}"
    );
    if disks {
        line.push_str(&format!(
            " capsem.root={} capsem.disk={}",
            disk::ROOT_SERIAL,
            disk::DISK_SERIAL
        ));
    }
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    line
}

/// QEMU's seccomp sandbox: no obsolete syscalls, no setuid, no fork or
/// exec, no scheduler or affinity changes (Debian's QEMU links libseccomp).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU's arguments; `files` names the kernel, the initramfs and the disks
/// (the image's root filesystem and the VM's writable disk, or neither for
/// an image without a root filesystem) as inherited fds.
pub fn qemu_args(
    accel: Accel,
    memory_mib: u32,
    cpus: u32,
    vhost_sock: &Path,
    files: &BootFiles,
    cmdline: &str,
) -> Vec<OsString> {
    let mut chardev = OsString::from("socket,id=vsock,path=");
    chardev.push(vhost_sock);
    let mut args: Vec<OsString> = [
        "-accel",
        accel.name(),
        "-M",
        "microvm,memory-backend=mem",
        "-cpu",
        accel.cpu(),
        "-m",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(format!("{memory_mib}M").into());
    args.push("-smp".into());
    args.push(cpus.to_string().into());
    for a in [
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-sandbox",
        SANDBOX,
        "-serial",
        "stdio",
    ] {
        args.push(a.into());
    }
    args.push("-object".into());
    args.push(format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on").into());
    args.push("-chardev".into());
    args.push(chardev);
    args.push("-device".into());
    args.push("vhost-user-vsock-device,chardev=vsock".into());
    // Free page reporting: the guest reports the pages it freed and QEMU
    // punches them out of the memfd, so an idle VM holds what it uses, not
    // what it once touched (docs/benchmarks.md).
    args.push("-device".into());
    args.push("virtio-balloon-device,free-page-reporting=on".into());
    for drive in &files.drives {
        args.extend(drive.args());
    }
    args.push("-kernel".into());
    args.push(files.kernel.clone());
    args.push("-initrd".into());
    args.push(files.initrd.clone());
    args.push("-append".into());
    args.push(cmdline.into());
    args
}

impl Qemu {
    pub fn start(launch: &Launch<'_>) -> Result<Self, VmmError> {
        let cfg = launch.cfg;
        let dir = launch.dir;
        let image = Image::open_with(&cfg.image_dir(), cfg.rootfs.as_deref())
            .map_err(|e| VmmError::Backend(e.to_string()))?;
        let accel = accel::resolve(cfg.accel, &capsem_host::accel::probe_host())
            .map_err(|e| VmmError::Backend(e.to_string()))?;
        let qemu_bin = find_program(QEMU_BIN_ENV, "qemu-system-x86_64").ok_or_else(|| {
            VmmError::Backend("qemu-system-x86_64 not found: run scripts/install-deps.sh".into())
        })?;
        let vhost_bin = find_program(VHOST_BIN_ENV, "vhost-device-vsock").ok_or_else(|| {
            VmmError::Backend("vhost-device-vsock not found: run scripts/install-deps.sh".into())
        })?;
        let writable = dir.disk();
        if image.rootfs.is_some() {
            let made = disk::ensure(
                &writable,
                cfg.disk_size,
                cfg.image_config.as_deref(),
                launch.reaper,
                &dir.root().join("mkfs.log"),
            )
            .map_err(|e| VmmError::Backend(e.to_string()))?;
            tracing::info!(
                "vm {}: writable disk {} ({})",
                launch.vm_id,
                writable.display(),
                match made {
                    disk::Prepared::Created => "created",
                    disk::Prepared::Existing => "reused",
                }
            );
        } else {
            tracing::warn!(
                "vm {}: the image {} has no rootfs.erofs: its initramfs is the whole guest \
                 and nothing the guest writes is kept (rebuild it with images/build.sh)",
                launch.vm_id,
                image.dir.display()
            );
        }
        let cid = cid::allocate(&cfg.run_dir()).map_err(|e| VmmError::Backend(e.to_string()))?;
        let extra_gid = (accel == Accel::Kvm).then(jail::kvm_gid).flatten();
        let euid = nix::unistd::geteuid().as_raw();
        let uid_lease = (euid == 0)
            .then(|| jail::lease_uid(Path::new(jail::UID_LOCK_DIR), cid.cid))
            .transpose()
            .map_err(backend_err)?;
        let slot = uid_lease.as_ref().map_or(cid.cid, |l| l.slot);
        let identity = jail::Identity::for_vm(euid, slot, extra_gid);
        let jail_dir = jail::prepare(dir.root(), identity).map_err(backend_err)?;
        let cgroup = crate::cgroup::host_limits(launch.vm_id, launch.cfg, accel == Accel::Tcg);
        let no_files = jail::Inherit::default();
        let confine = |inherit| jail::Confine {
            cwd: &jail_dir,
            identity,
            inherit,
            cgroup_procs: cgroup.as_ref().map(|c| c.procs()),
        };

        // Relative to the jail, which is the daemons' cwd; a name unique
        // to the VM, so it is also the identity marker.
        let vhost_name = format!("vhost-{}.sock", launch.vm_id);
        let vhost_sock = jail_dir.join(&vhost_name);
        let vhost_log = dir.root().join("vhost.log");
        let vhost_prog = jail::Program::new(&vhost_bin, identity).map_err(backend_err)?;
        let mut vhost = vhost_prog.command();
        vhost
            .arg("--guest-cid")
            .arg(cid.cid.to_string())
            .arg("--socket")
            .arg(&vhost_name)
            .arg("--uds-path")
            .arg(VSOCK_BASE)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file(&vhost_log)?))
            .stderr(Stdio::from(log_file(&vhost_log)?));
        detach(&mut vhost);
        jail::confine(&mut vhost, &confine(&no_files)).map_err(backend_err)?;
        let vhost_child = launch.reaper.spawn("vhost-device-vsock", &mut vhost)?;
        tracing::info!(
            "vm {}: started vhost-device-vsock (pid {}) guest-cid={}",
            launch.vm_id,
            vhost_child.pid,
            cid.cid
        );
        if let Err(e) = wait_for_socket("vhost-device-vsock", &vhost_sock, &vhost_child, &vhost_log)
        {
            launch
                .reaper
                .kill_group(&vhost_child, nix::sys::signal::Signal::SIGKILL);
            return Err(e);
        }
        let shares = match virtiofs::start_all(launch) {
            Ok(d) => d,
            Err(e) => {
                launch
                    .reaper
                    .kill_group(&vhost_child, nix::sys::signal::Signal::SIGKILL);
                return Err(e);
            }
        };
        // QEMU reaches each virtiofsd's socket by its name in the jail.
        if let Err(e) = shares
            .iter()
            .try_for_each(|d| jail::link_into(dir.root(), &d.name()))
        {
            virtiofs::kill_all(launch, &shares);
            launch
                .reaper
                .kill_group(&vhost_child, nix::sys::signal::Signal::SIGKILL);
            return Err(backend_err(e));
        }
        // From here on every failure kills these too.
        let mut extra: Vec<Child> = shares.iter().map(|d| d.child.clone()).collect();
        extra.push(vhost_child.clone());

        let (console_rx, console_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| VmmError::Backend(format!("pipe: {e}")))?;
        let serial_log = dir.root().join("serial.log");
        let facts = ConsoleFacts::default();
        let serial = serial::spawn(console_rx, &serial_log, facts.clone()).map_err(|source| {
            VmmError::Prepare {
                path: serial_log.clone(),
                source,
            }
        })?;
        let hostname = if cfg.temporary { "capsem" } else { &cfg.vm_id };
        let tsc_khz = match accel {
            Accel::Tcg => capsem_host::tsc::host_tsc_khz(),
            Accel::Kvm => None,
        };
        let mut cmdline = kernel_cmdline(launch.token, hostname, tsc_khz, image.rootfs.is_some());
        if cfg.net_policy().is_ok_and(|p| !p.is_none()) {
            // capsem-init brings up the guest's redirected network.
            cmdline.push_str(" capsem.net=1");
        }
        if cfg.agent_mode() != "shell" {
            // capsem-init passes it to the agent as CAPSEM_MODE.
            cmdline.push_str(&format!(" capsem.mode={}", cfg.agent_mode()));
        }
        for (i, share) in cfg.shares.iter().enumerate() {
            cmdline.push(' ');
            cmdline.push_str(&capsem_host::share::kernel_param(i, share));
        }
        let mut inherit = jail::Inherit::default();
        let files = BootFiles::open(&image, &writable, &mut inherit).map_err(backend_err)?;
        let qemu_prog = jail::Program::new(&qemu_bin, identity).map_err(backend_err)?;
        let mut qemu = qemu_prog.command();
        qemu.args(qemu_args(
            accel,
            cfg.memory_mib,
            cfg.cpus,
            Path::new(&vhost_name),
            &files,
            &cmdline,
        ))
        // `-name ID`: an exact argv element that identifies this VM's qemu.
        .args(
            shares
                .iter()
                .enumerate()
                .flat_map(|(i, d)| virtiofs::qemu_args(i, Path::new(&d.name()))),
        )
        .arg("-name")
        .arg(launch.vm_id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(console_tx))
        .stderr(Stdio::from(log_file(&dir.root().join("qemu.log"))?));
        detach(&mut qemu);
        jail::confine(&mut qemu, &confine(&inherit)).map_err(backend_err)?;
        let qemu_child = match launch.reaper.spawn("qemu", &mut qemu) {
            Ok(c) => c,
            Err(e) => {
                for child in &extra {
                    launch
                        .reaper
                        .kill_group(child, nix::sys::signal::Signal::SIGKILL);
                }
                serial.abort();
                return Err(e.into());
            }
        };
        // The Command held the pipe's write end; dropping it leaves QEMU as
        // the only writer, so the serial task ends when QEMU does.
        drop(qemu);
        drop(inherit);
        tracing::info!(
            "vm {}: started qemu (pid {}) accel={} image={} memory={}M cpus={}",
            launch.vm_id,
            qemu_child.pid,
            accel.name(),
            image.dir.display(),
            cfg.memory_mib,
            cfg.cpus
        );
        let marker = vhost_name;
        let records = [
            capsem_host::identity::record("qemu", qemu_child.pid, launch.vm_id),
            capsem_host::identity::record("vhost-device-vsock", vhost_child.pid, &marker),
        ]
        .into_iter()
        .chain(shares.iter().map(|d| {
            capsem_host::identity::record("virtiofsd", d.child.pid, &d.sock.to_string_lossy())
        }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| VmmError::Backend(format!("cannot record the guest's identity: {e}")));
        let records = match records {
            Ok(r) => r,
            Err(e) => {
                for child in std::iter::once(&qemu_child).chain(&extra) {
                    launch
                        .reaper
                        .kill_group(child, nix::sys::signal::Signal::SIGKILL);
                }
                serial.abort();
                return Err(e);
            }
        };
        Ok(Self {
            records,
            children: std::iter::once(qemu_child).chain(extra).collect(),
            accel,
            identity,
            _uid: uid_lease,
            _cgroup: cgroup,
            cid,
            facts,
            serial: Some(serial),
        })
    }
}

impl GuestBackend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }
    fn children(&self) -> &[Child] {
        &self.children
    }
    fn take_tasks(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        self.serial.take().into_iter().collect()
    }
    fn describe_exit(&self) -> Option<String> {
        Some(match self.facts.panic_line() {
            Some(line) => format!("the guest kernel panicked: {line}"),
            None => "the VM stopped".to_owned(),
        })
    }
    fn console(&self) -> Option<ConsoleFacts> {
        Some(self.facts.clone())
    }
    fn details(&self) -> String {
        let user = match self.identity.owner() {
            Some((uid, _)) => format!("uid={uid}"),
            None => "uid=caller".to_owned(),
        };
        format!(
            "accel={} guest-cid={} {user}",
            self.accel.name(),
            self.cid.cid
        )
    }
    fn records(&self) -> Vec<capsem_host::identity::ProcRecord> {
        self.records.clone()
    }
    fn accel(&self) -> Option<&'static str> {
        Some(self.accel.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_carries_token_console_and_panic_policy() {
        let c = kernel_cmdline("abc123", "capsem", None, false);
        assert!(!c.contains("tsc_early_khz"));
        assert!(!c.contains("tsc=reliable"));
        assert!(!c.contains("capsem.root"));
        let c = kernel_cmdline("abc123", "capsem", Some(2_600_000), true);
        assert!(c.contains(" tsc_early_khz=2600000 tsc=reliable"));
        assert!(c.starts_with("console=ttyS0 loglevel=5 "));
        assert!(!c.contains("quiet"));
        assert!(c.contains("panic=-1"));
        assert!(c.contains("reboot=t"));
        assert!(c.contains(" cryptomgr.notests initcall_blacklist=crypto_kdf108_init "));
        assert!(c.contains("capsem.token=abc123"));
        assert!(c.contains("capsem.hostname=capsem"));
        assert!(c.contains("capsem.root=capsem-root capsem.disk=capsem-disk"));
    }

    #[test]
    fn qemu_args_are_microvm_sandboxed_with_shared_memory_and_vhost_vsock() {
        use super::super::bootfiles::Drive;
        let files = BootFiles {
            kernel: "/dev/fd/7".into(),
            initrd: "/dev/fd/8".into(),
            drives: vec![Drive {
                id: "root",
                serial: disk::ROOT_SERIAL,
                set: 1,
                fds: vec![9],
                readonly: true,
            }],
        };
        let args = qemu_args(Accel::Tcg, 512, 1, Path::new("vhost-x.sock"), &files, "x");
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = s.join(" ");
        assert!(joined
            .contains("-accel tcg -M microvm,memory-backend=mem -cpu max,-erms -m 512M -smp 1"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(joined.contains("-chardev socket,id=vsock,path=vhost-x.sock"));
        assert!(joined.contains("-device vhost-user-vsock-device,chardev=vsock"));
        assert!(joined.contains("-device virtio-balloon-device,free-page-reporting=on"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(joined.contains(
            "-add-fd fd=9,set=1,opaque=root \
             -drive if=none,id=root,format=raw,file=/dev/fdset/1,readonly=on \
             -device virtio-blk-device,drive=root,serial=capsem-root"
        ));
        assert!(joined.contains("-kernel /dev/fd/7 -initrd /dev/fd/8"));
        assert_eq!(s.last().map(String::as_str), Some("x"));
        let old = BootFiles {
            drives: Vec::new(),
            ..files
        };
        let kvm = qemu_args(Accel::Kvm, 256, 2, Path::new("/s"), &old, "x");
        let joined: Vec<String> = kvm
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(joined
            .join(" ")
            .contains("-accel kvm -M microvm,memory-backend=mem -cpu host -m 256M -smp 2"));
        assert!(!joined.iter().any(|a| a == "-drive"), "{joined:?}");
    }
}
