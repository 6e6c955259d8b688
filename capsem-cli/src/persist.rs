//! Persistent VMs: `create`, `shell NAME`, `start`, `stop`, and the
//! dispatch of the other VM commands (`list`, `inspect`, `rm`, `logs`).
//!
//! Every command first sweeps (see [`crate::sweep`]), then takes the VM's
//! lock ([`capsem_host::lock::VmLock`]) for as long as it changes the VM's
//! processes or files, so two commands on one VM never interleave.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsem_host::identity::ProcRecord;
use capsem_host::lock::{LockError, VmLock};
use capsem_host::vmstate::{NameError, VmConfig, VmStateError, VM_FILE};
use capsem_proto::ipc::ClientToProcess;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::attach::{AttachError, Session, SessionEnd};
use crate::cli::{AccelChoice, Command, Vmm};
use crate::exit;
use crate::home::{self, HomeError};
use crate::progress::Progress;
use crate::signals::Signals;
use crate::spawn::{Kind, ReadyOutcome, Target};
use crate::terminal::{self, RawGuard};
use crate::vms::{Vm, VmState};

/// Why a VM command failed. Each maps to an exit code (see `exit.rs`).
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("invalid VM name {name:?}: {source}")]
    Name {
        name: String,
        #[source]
        source: NameError,
    },
    #[error("no VM named {0:?} (see capsem list)")]
    NoSuchVm(String),
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    #[error("VM {name:?} is {state}{hint}")]
    WrongState {
        name: String,
        state: VmState,
        hint: &'static str,
    },
    #[error("{0:?} is a temporary VM; only persistent VMs (capsem create) take this command")]
    Temporary(String),
    #[error(transparent)]
    State(#[from] VmStateError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Terminal(#[from] crate::terminal::TerminalError),
    #[error(transparent)]
    Signals(#[from] crate::signals::SignalsError),
    #[error(transparent)]
    Spawn(#[from] crate::spawn::SpawnError),
    #[error("session lost: {0}")]
    SessionLost(String),
}

impl PersistError {
    /// 255 for a lost session, 125 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            PersistError::SessionLost(_) => exit::SESSION_LOST,
            _ => exit::CAPSEM_FAILED,
        }
    }
}

/// What every VM command needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub home: PathBuf,
    pub vmm: Vmm,
    pub accel: AccelChoice,
}

impl Ctx {
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        crate::vms::vm_dir(&self.home, name)
    }

    /// The VM's lock, held by the caller while it acts on the VM.
    pub fn lock(&self, name: &str) -> Result<VmLock, PersistError> {
        Ok(VmLock::acquire(&self.home, name)?)
    }

    /// Loads an existing VM, or says there is none by that name.
    pub fn load(&self, name: &str) -> Result<Vm, PersistError> {
        check_name(name)?;
        let dir = self.vm_dir(name);
        if !dir.is_dir() {
            return Err(PersistError::NoSuchVm(name.into()));
        }
        Ok(Vm::load(&dir)?)
    }
}

/// A name given on the command line: a persistent VM's name, or the id of
/// a temporary VM (`tmp-` and 16 hex digits) for the read-only commands.
pub fn check_name(name: &str) -> Result<(), PersistError> {
    if is_temp_id(name) {
        return Ok(());
    }
    capsem_host::vmstate::validate_name(name).map_err(|source| PersistError::Name {
        name: name.chars().take(64).collect(),
        source,
    })
}

fn is_temp_id(name: &str) -> bool {
    name.strip_prefix("tmp-")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Runs a VM command and returns capsem's exit code.
pub fn run(
    home_flag: Option<&Path>,
    vmm: Vmm,
    accel: AccelChoice,
    command: Command,
) -> Result<u8, PersistError> {
    let home = home::resolve_home(
        home_flag,
        std::env::var_os("CAPSEM_HOME").as_deref(),
        home::user_home().as_deref(),
    )?;
    let ctx = Ctx { home, vmm, accel };
    crate::sweep::sweep(&ctx);
    match command {
        Command::Create(args) => create(&ctx, &args),
        Command::Shell { name: Some(name) } => shell(&ctx, &name),
        Command::Start { name } => start(&ctx, &name),
        Command::Stop { name, grace } => stop(&ctx, &name, grace),
        Command::List { json } => crate::list::run(&ctx, json),
        Command::Inspect { name } => crate::inspect::run(&ctx, &name),
        Command::Rm { force, name } => crate::rm::run(&ctx, &name, force),
        Command::Logs {
            name,
            follow,
            source,
        } => crate::logs::run(&ctx, &name, follow, source),
        Command::Exec(args) => crate::exec_named::run(&ctx, args),
        Command::Audit { name, follow, json } => crate::audit::run(&ctx, &name, follow, json),
        Command::Shell { name: None } | Command::Run(_) | Command::Doctor => {
            Err(PersistError::Start("not a VM command".into()))
        }
    }
}

/// `capsem create NAME`: records the VM, boots it, returns once its agent
/// is ready. The name goes to stdout.
fn create(ctx: &Ctx, args: &crate::cli::CreateArgs) -> Result<u8, PersistError> {
    let name = args.name.as_str();
    capsem_host::vmstate::validate_name(name).map_err(|source| PersistError::Name {
        name: name.chars().take(64).collect(),
        source,
    })?;
    let _lock = ctx.lock(name)?;
    let dir = ctx.vm_dir(name);
    let vms = crate::home::vms_dir(&ctx.home);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&vms)
        .map_err(|source| PersistError::Io {
            what: format!("cannot create {}", vms.display()),
            source,
        })?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(PersistError::Exists(name.into()))
        }
        Err(source) => {
            return Err(PersistError::Io {
                what: format!("cannot create {}", dir.display()),
                source,
            })
        }
    }
    let config = VmConfig {
        name: name.into(),
        temporary: false,
        created: capsem_host::vmstate::now_rfc3339(),
        vmm: ctx.vmm.as_arg().into(),
        accel: ctx.accel.as_arg().into(),
        cpus: args.cpus,
        memory_mib: args.memory,
        owner: None,
    };
    if let Err(e) = capsem_host::vmstate::write_json(&dir.join(VM_FILE), &config) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    if ctx.vmm == Vmm::None {
        eprintln!("{}", crate::tempvm::NO_ISOLATION_WARNING);
    }
    boot(ctx, &config, Kind::Persistent {
        cpus: config.cpus,
        memory_mib: config.memory_mib,
    })
    .map_err(|e| match e {
        PersistError::Start(reason) => PersistError::Start(format!(
            "VM {name:?} was created but did not boot: {reason} (capsem logs {name}; capsem rm {name})"
        )),
        other => other,
    })?;
    println!("{name}");
    Ok(0)
}

/// The backend a VM was created with.
fn vmm_of(config: &VmConfig) -> Vmm {
    match config.vmm.as_str() {
        "none" => Vmm::None,
        _ => Vmm::Qemu,
    }
}

fn accel_of(config: &VmConfig) -> AccelChoice {
    match config.accel.as_str() {
        "kvm" => AccelChoice::Kvm,
        "tcg" => AccelChoice::Tcg,
        _ => AccelChoice::Auto,
    }
}

/// Starts a persistent VM's capsem-process (booting it, or adopting its
/// running guest) and leaves it running once it is ready. The caller holds
/// the VM's lock.
fn boot(ctx: &Ctx, config: &VmConfig, kind: Kind) -> Result<(), PersistError> {
    let bin = crate::spawn::find_process_bin(
        std::env::var_os(crate::spawn::PROCESS_BIN_ENV),
        std::env::current_exe(),
    )?;
    let mut signals = Signals::install()?;
    let dir = ctx.vm_dir(&config.name);
    let vmm = vmm_of(config);
    let target = Target {
        vm_dir: &dir,
        vm_id: &config.name,
        vmm,
        accel: accel_of(config),
        kind,
        audit_log: None,
    };
    let (mut child, mut ready) = crate::spawn::spawn(&bin, &target)?;
    let outcome = {
        let mut progress = Progress::new(match (kind, vmm) {
            (Kind::Adopt, _) => "reconnecting to the VM",
            (_, Vmm::Qemu) => "starting VM",
            (_, Vmm::None) => "starting",
        });
        ready.wait(&child, &mut signals, &mut progress)
    };
    match outcome {
        Ok(ReadyOutcome::Ready) => {
            child.release();
            Ok(())
        }
        Ok(ReadyOutcome::Failed(reason)) => {
            child.teardown(crate::spawn::EXIT_GRACE);
            Err(PersistError::Start(reason))
        }
        Ok(ReadyOutcome::Interrupted(sig)) => {
            child.signal_group(Signal::SIGTERM);
            child.teardown(crate::spawn::EXIT_GRACE);
            Err(PersistError::Start(format!(
                "interrupted by {}",
                sig.as_str()
            )))
        }
        Err(e) => {
            child.signal_group(Signal::SIGTERM);
            Err(e.into())
        }
    }
}

/// A persistent VM by name, or why it is not one.
fn persistent(ctx: &Ctx, name: &str) -> Result<Vm, PersistError> {
    let vm = ctx.load(name)?;
    if vm.temporary() {
        return Err(PersistError::Temporary(name.into()));
    }
    Ok(vm)
}

/// Brings a persistent VM to `running`: adopts an orphaned guest, boots a
/// stopped one only when `boot_stopped`.
pub fn ensure_running(ctx: &Ctx, name: &str, boot_stopped: bool) -> Result<Vm, PersistError> {
    let vm = persistent(ctx, name)?;
    if vm.state() == VmState::Running {
        return Ok(vm);
    }
    let _lock = ctx.lock(name)?;
    // Another command may have acted while we waited for the lock.
    let vm = persistent(ctx, name)?;
    let config = vm
        .config
        .clone()
        .ok_or(PersistError::NoSuchVm(name.into()))?;
    match vm.state() {
        VmState::Running => {}
        VmState::Orphaned => {
            eprintln!(
                "capsem: VM {name}'s host process had died; reconnecting to its running guest"
            );
            boot(ctx, &config, Kind::Adopt)?;
        }
        VmState::Stopped if boot_stopped => boot(
            ctx,
            &config,
            Kind::Persistent {
                cpus: config.cpus,
                memory_mib: config.memory_mib,
            },
        )?,
        VmState::Stopped => {
            return Err(PersistError::WrongState {
                name: name.into(),
                state: VmState::Stopped,
                hint: "; start it with capsem start NAME",
            })
        }
    }
    persistent(ctx, name)
}

/// `capsem shell NAME`: attaches this terminal to the VM's shell.
fn shell(ctx: &Ctx, name: &str) -> Result<u8, PersistError> {
    let vm = ensure_running(ctx, name, false)?;
    let mut signals = Signals::install()?;
    let stdin = std::io::stdin();
    let stdin_tty = terminal::is_tty(stdin.as_fd());
    let (cols, rows) = terminal::size_or_default(stdin.as_fd());
    let mut session =
        Session::connect_with(&vm.ctl_sock(), &ClientToProcess::Attach { cols, rows })?;
    session.set_persistent();
    if let Some(sig) = session.await_attached(&mut signals)? {
        return Ok(exit::from_signal(sig as i32));
    }
    let raw = if stdin_tty {
        Some(RawGuard::enter(stdin.as_fd())?)
    } else {
        None
    };
    let end = session.run(stdin_tty, &mut signals);
    drop(raw);
    match end {
        SessionEnd::Exited(code) => Ok(code),
        SessionEnd::Detached => {
            eprint!("\r\ncapsem: detached from {name}; it keeps running (capsem shell {name} reattaches)\r\n");
            Ok(0)
        }
        SessionEnd::Signalled(sig) => Ok(exit::from_signal(sig as i32)),
        SessionEnd::Lost(reason) => Err(PersistError::SessionLost(reason)),
    }
}

/// `capsem start NAME`: boots a stopped VM (or adopts an orphaned one).
fn start(ctx: &Ctx, name: &str) -> Result<u8, PersistError> {
    let vm = persistent(ctx, name)?;
    if vm.state() == VmState::Running {
        return Err(PersistError::WrongState {
            name: name.into(),
            state: VmState::Running,
            hint: " already",
        });
    }
    ensure_running(ctx, name, true)?;
    println!("{name}");
    Ok(0)
}

fn stop(ctx: &Ctx, name: &str, grace: u64) -> Result<u8, PersistError> {
    let _lock = ctx.lock(name)?;
    let vm = persistent(ctx, name)?;
    if vm.state() == VmState::Stopped {
        return Err(PersistError::WrongState {
            name: name.into(),
            state: VmState::Stopped,
            hint: " already",
        });
    }
    stop_vm(ctx, &vm, Duration::from_secs(grace))?;
    println!("{name}");
    Ok(0)
}

/// How long killed processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Stops a VM's processes: `Shutdown` over ctl.sock when capsem-process
/// lives (the agent ends the shell, the guest syncs and powers off), else
/// SIGTERM to the guest's processes; waits up to `grace` for every recorded
/// process to exit, then SIGKILLs the process groups of the survivors.
/// Every pid is signalled only through its identity check. The caller
/// holds the VM's lock. The VM's files stay, less its runtime files.
pub fn stop_vm(_ctx: &Ctx, vm: &Vm, grace: Duration) -> Result<(), PersistError> {
    let mut live: Vec<(ProcRecord, OwnedFd)> = vm
        .live_processes()
        .filter_map(|p| {
            p.record
                .open_verified()
                .ok()
                .map(|fd| (p.record.clone(), fd))
        })
        .collect();
    let asked = vm.state() == VmState::Running
        && Session::connect_with(&vm.ctl_sock(), &ClientToProcess::Shutdown).is_ok();
    if !asked {
        for (rec, _) in &live {
            if rec.role != "capsem-process" {
                let _ = rec.signal_verified(libc::SIGTERM);
            }
        }
    }
    wait_all_exit(&mut live, grace);
    if !live.is_empty() {
        for (rec, fd) in &live {
            eprintln!(
                "capsem: {} (pid {}) did not stop within {} s; killing it",
                rec.role,
                rec.pid,
                grace.as_secs()
            );
            capsem_host::identity::signal_group_by_pidfd(fd, rec.pid, libc::SIGKILL);
        }
        wait_all_exit(&mut live, KILL_WAIT);
    }
    remove_runtime_files(&vm.dir);
    if let Some((rec, _)) = live.first() {
        return Err(PersistError::Start(format!(
            "{} (pid {}) survived SIGKILL",
            rec.role, rec.pid
        )));
    }
    Ok(())
}

/// Waits until every pidfd is readable (its process exited) or `limit`
/// passes; the exited ones are removed from `procs`.
fn wait_all_exit(procs: &mut Vec<(ProcRecord, OwnedFd)>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !procs.is_empty() {
        procs.retain(|(_, fd)| !capsem_host::identity::pidfd_exited(fd));
        let left = deadline.saturating_duration_since(Instant::now());
        if procs.is_empty() || left.is_zero() {
            return;
        }
        let mut fds: Vec<PollFd<'_>> = procs
            .iter()
            .map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// What only a running VM has: pids.json, the token, sockets.
pub fn remove_runtime_files(dir: &Path) {
    let mut names = vec![
        capsem_host::vmstate::PIDS_FILE.to_owned(),
        capsem_host::vmstate::TOKEN_FILE.to_owned(),
        "ctl.sock".to_owned(),
        "vhost.sock".to_owned(),
    ];
    for port in [5000, 5001, 5005] {
        names.push(format!("vsock.sock_{port}"));
    }
    for name in names {
        match std::fs::remove_file(dir.join(&name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("capsem: cannot remove {}: {e}", dir.join(name).display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_temp_ids() {
        assert!(check_name("dev").is_ok());
        assert!(check_name("tmp-0123456789abcdef").is_ok());
        assert!(check_name("tmp-1").is_err());
        assert!(check_name("../x").is_err());
        assert!(check_name("").is_err());
    }
}
