//! Starting a temporary VM, shared by `capsem shell` and `capsem run`: the
//! home and VM directory, capsem-process spawned and its ready line awaited
//! (with the boot progress on stderr), failures reported with their kept
//! logs.
//!
//! [`TempVm`]'s fields drop in order: capsem-process is reaped (killed by
//! process group after a grace period) before the VM directory is removed.

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use capsem_proto::ipc::ClientToProcess;

use crate::attach::{AttachError, Session};
use capsem_host::vmstate::VmConfig;

use crate::cli::{AccelChoice, Vmm};
use crate::exit::{self, Exit};
use crate::home::{self, HomeError, VmDir};
use crate::progress::Progress;
use crate::signals::{Signals, SignalsError};
use crate::spawn::{self, ProcessChild, ReadyOutcome, SpawnError, EXIT_GRACE};
use crate::vmimage::Chosen;

/// The warning `--vmm none` prints, once, on stderr.
pub const NO_ISOLATION_WARNING: &str =
    "capsem: warning: --vmm none runs the shell on this host with no isolation";

/// Why a temporary VM did not start.
#[derive(Debug, thiserror::Error)]
pub enum TempVmError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Signals(#[from] SignalsError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("cannot lock the new VM")]
    Lock(#[source] capsem_host::lock::LockError),
    #[error("cannot record this process as the VM's owner")]
    Owner(#[source] capsem_host::identity::IdentityError),
    #[error("this process has no argv to record as the VM's owner")]
    NoArgv,
    #[error(transparent)]
    Image(#[from] crate::vmimage::VmImageError),
    #[error(transparent)]
    Net(#[from] crate::netflags::NetFlagError),
    #[error("cannot record the VM")]
    Record(#[source] capsem_host::vmstate::VmStateError),
    /// capsem-process reported that it could not start the VM.
    #[error("{reason}{}", .log.as_ref().map(|l| format!(" (see {})", l.display())).unwrap_or_default())]
    Startup {
        reason: String,
        log: Option<PathBuf>,
    },
}

/// A temporary VM whose capsem-process reported ready.
#[derive(Debug)]
pub struct TempVm {
    /// Declared before `vm_dir`: reaped before the directory is removed.
    pub child: ProcessChild,
    pub vm_dir: VmDir,
    pub signals: Signals,
}

/// How starting ended.
#[derive(Debug)]
pub enum Started {
    Ready(TempVm),
    /// A signal arrived during the boot; the VM was stopped. The exit code.
    Interrupted(Exit),
}

/// How attaching ended.
#[derive(Debug)]
pub enum Attached {
    Session(Session),
    /// A signal arrived before the attach was confirmed; the VM was told to
    /// shut down. The exit code.
    Interrupted(Exit),
}

impl TempVm {
    /// Connects to the VM's `ctl.sock` with `first` (an attach or an exec
    /// request) and waits for the confirmation, a signal, or an error; on
    /// a failure or a signal the VM is stopped.
    pub fn attach(&mut self, first: &ClientToProcess) -> Result<Attached, AttachError> {
        let mut session = match Session::connect_with(&self.vm_dir.path().join("ctl.sock"), first) {
            Ok(s) => s,
            Err(e) => {
                self.child.signal_group(Signal::SIGTERM);
                return Err(e);
            }
        };
        match session.await_attached(&mut self.signals) {
            Ok(None) => Ok(Attached::Session(session)),
            Ok(Some(sig)) => {
                session.shutdown();
                Ok(Attached::Interrupted(exit::from_signal(sig as i32)))
            }
            Err(e) => {
                session.shutdown();
                Err(e)
            }
        }
    }
}

impl TempVm {
    /// Destroys the VM without asking anyone (`~.` on a wedged guest):
    /// capsem-process's group and every recorded guest process (QEMU and
    /// vhost-device-vsock, or the agent, each in a group of its own) are
    /// SIGKILLed, capsem-process is reaped, and dropping `self` then
    /// removes the directory. Returns how many recorded processes outlived
    /// SIGKILL.
    pub fn destroy_now(&mut self) -> usize {
        self.child.signal_group(Signal::SIGKILL);
        let left = match crate::sweep::kill_recorded(self.vm_dir.path()) {
            Ok((_, left)) => left,
            Err(e) => {
                eprintln!(
                    "capsem: warning: cannot read the VM's processes: {}",
                    crate::error::one_line_chain(&e)
                );
                0
            }
        };
        self.child.teardown(std::time::Duration::ZERO);
        left
    }

    /// `~.` typed (`shell`, `run -t`): destroys the VM now
    /// ([`TempVm::destroy_now`]), removes its directory, prints the one line
    /// that says so, and returns exit 255.
    pub fn escaped(mut self) -> crate::exit::Exit {
        let left = self.destroy_now();
        let id = self
            .vm_dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        drop(self);
        if left > 0 {
            eprintln!("capsem: warning: {left} processes of VM {id} outlived SIGKILL");
        }
        eprint!("\r\n{}\r\n", escaped_line(&id));
        crate::exit::Exit::Lost
    }
}

/// The one line `~.` prints for a temporary VM.
pub fn escaped_line(id: &str) -> String {
    format!("capsem: ~. typed: destroyed temporary VM {id} without waiting for it")
}

/// The home a temporary VM lives in, checked.
pub fn home(home_flag: Option<&Path>) -> Result<PathBuf, TempVmError> {
    let home = home::resolve_home(
        home_flag,
        std::env::var_os("CAPSEM_HOME").as_deref(),
        home::user_home().as_deref(),
    )?;
    home::check_readable(&home)?;
    Ok(home)
}

/// What a new temporary VM is made with, already checked: `--disk-size`,
/// the image (of [`crate::vmimage::resolve_new`]), the shares (of
/// [`crate::share::parse_all`]), the policy and the published ports.
#[derive(Debug)]
pub struct NewVm {
    pub disk_size: Option<u64>,
    pub image: Option<Chosen>,
    pub shares: Vec<capsem_host::share::Share>,
    /// The egress policy as `--net` values (of [`crate::netflags::resolve`]).
    pub net: Vec<String>,
    /// The published ports (of [`crate::publish::resolve`]).
    pub publish: Vec<capsem_host::publish::Publish>,
}

/// Creates and boots a temporary VM in `home` (see [`home`]) as `new`
/// says; `exec` starts it for `capsem run`.
pub fn start(
    home: PathBuf,
    vmm: Vmm,
    accel: AccelChoice,
    exec: bool,
    audit_log: Option<&Path>,
    new: NewVm,
) -> Result<Started, TempVmError> {
    let NewVm {
        disk_size,
        image,
        shares,
        net,
        publish,
    } = new;
    if vmm == Vmm::None {
        eprintln!("{NO_ISOLATION_WARNING}");
    }
    let mut signals = Signals::install()?;
    let bin = spawn::find_process_bin(
        std::env::var_os(spawn::PROCESS_BIN_ENV),
        std::env::current_exe(),
    )?;
    let id = home::new_temp_id()?;
    // Under the VM's lock until vm.json names us as the owner, so a sweep
    // by another capsem never takes the new directory for a dead VM's.
    let lock = capsem_host::lock::VmLock::acquire(&home, &id).map_err(TempVmError::Lock)?;
    let vm_dir = VmDir::create(&home, &id)?;
    let record = image.as_ref().map(|i| i.record.clone());
    let config = write_vm_json(
        vm_dir.path(),
        &id,
        vmm,
        accel,
        (disk_size, net),
        record,
        (shares, publish),
    )?;
    drop(lock);
    let target = spawn::Target {
        vm_dir: vm_dir.path(),
        vm_id: &id,
        vmm,
        accel,
        kind: spawn::Kind::Temporary { exec },
        config: &config,
        image: image.as_ref().map(|i| &i.cached),
        audit_log,
    };
    let (mut child, mut ready) = spawn::spawn(&bin, &target)?;
    let outcome = {
        let mut progress = Progress::new(match (vmm, exec) {
            (Vmm::Qemu, _) => "starting VM",
            (Vmm::None, false) => "starting shell",
            (Vmm::None, true) => "starting",
        });
        ready.wait(&child, &mut signals, &mut progress)
    };
    match outcome {
        Ok(ReadyOutcome::Ready) => Ok(Started::Ready(TempVm {
            child,
            vm_dir,
            signals,
        })),
        Ok(ReadyOutcome::Failed(reason)) => {
            child.teardown(EXIT_GRACE);
            let log = vm_dir.keep_log(&home, &id);
            Err(TempVmError::Startup { reason, log })
        }
        Ok(ReadyOutcome::Interrupted(sig)) => {
            child.signal_group(Signal::SIGTERM);
            Ok(Started::Interrupted(exit::from_signal(sig as i32)))
        }
        Err(e) => {
            child.signal_group(Signal::SIGTERM);
            Err(e.into())
        }
    }
}

/// This process's identity, as the owner of a temporary VM: the sweep
/// removes the VM once it is gone.
pub fn owner_record() -> Result<capsem_host::identity::ProcRecord, TempVmError> {
    let me = std::process::id();
    let argv = capsem_host::identity::argv(me).map_err(TempVmError::Owner)?;
    let argv0 = argv
        .first()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .ok_or(TempVmError::NoArgv)?;
    capsem_host::identity::capture("owner", me, &argv0).map_err(TempVmError::Owner)
}

/// `vm.json` for a temporary VM owned by this process, with the default
/// resources.
fn write_vm_json(
    dir: &Path,
    id: &str,
    vmm: Vmm,
    accel: AccelChoice,
    (disk_size, net): (Option<u64>, Vec<String>),
    image: Option<capsem_host::vmstate::VmImage>,
    (shares, publish): (
        Vec<capsem_host::share::Share>,
        Vec<capsem_host::publish::Publish>,
    ),
) -> Result<VmConfig, TempVmError> {
    let config = VmConfig {
        name: id.to_owned(),
        temporary: true,
        created: capsem_host::vmstate::now_rfc3339(),
        vmm: vmm.as_arg().to_owned(),
        accel: accel.as_arg().to_owned(),
        cpus: capsem_host::resources::default_cpus(),
        memory_mib: capsem_host::resources::default_memory_mib(),
        owner: Some(owner_record()?),
        disk_size,
        image,
        idle_timeout_ms: None,
        max_duration_ms: None,
        net,
        shares,
        publish,
    };
    capsem_host::vmstate::write_json(&dir.join(capsem_host::vmstate::VM_FILE), &config)
        .map_err(TempVmError::Record)?;
    Ok(config)
}
