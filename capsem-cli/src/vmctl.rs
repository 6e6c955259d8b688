//! A persistent VM's processes: booting (or adopting) its capsem-process,
//! bringing it to `running`, stopping it. Shared by `create`, `start`,
//! `stop`, `shell NAME`, `exec` and `rm --force`.
//!
//! The caller holds the VM's lock ([`capsem_host::lock::VmLock`]) for as
//! long as it changes the VM's processes or files, so two commands on one
//! VM never interleave.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use capsem_host::identity::ProcRecord;
use capsem_host::vmstate::VmConfig;
use capsem_proto::ipc::ClientToProcess;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::attach::Session;
use crate::cli::{AccelChoice, Vmm};
use crate::context::Ctx;
use crate::error::CliError;
use crate::progress::Progress;
use crate::signals::Signals;
use crate::spawn::{Kind, ReadyOutcome, Target};
use crate::vms::{Vm, VmState};

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
pub fn boot(ctx: &Ctx, config: &VmConfig, kind: Kind) -> Result<(), CliError> {
    let bin = crate::spawn::find_process_bin(
        std::env::var_os(crate::spawn::PROCESS_BIN_ENV),
        std::env::current_exe(),
    )?;
    let mut signals = Signals::install()?;
    let dir = ctx.vm_dir(&config.name);
    let vmm = vmm_of(config);
    let image = match kind {
        Kind::Adopt => None,
        _ => crate::vmimage::recorded(&ctx.home, config)?,
    };
    let target = Target {
        vm_dir: &dir,
        vm_id: &config.name,
        vmm,
        accel: accel_of(config),
        kind,
        config,
        image: image.as_ref(),
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
            let (_, killed) = child.teardown(crate::spawn::EXIT_GRACE);
            after_a_killed_boot(&dir, kind, killed);
            Err(CliError::Boot(reason))
        }
        Ok(ReadyOutcome::Interrupted(sig)) => {
            child.signal_group(Signal::SIGTERM);
            let (_, killed) = child.teardown(crate::spawn::EXIT_GRACE);
            after_a_killed_boot(&dir, kind, killed);
            Err(CliError::Interrupted(sig.as_str()))
        }
        Err(e) => {
            child.signal_group(Signal::SIGTERM);
            Err(e.into())
        }
    }
}

/// When capsem-process had to be killed during a failed boot, the guest
/// processes it started (their own process groups, so its group's SIGKILL
/// spared them) are killed through their recorded identities, so no QEMU is
/// left running for a VM that never came up. Not after a failed adoption:
/// that guest was running before this command and stays adoptable.
fn after_a_killed_boot(dir: &Path, kind: Kind, killed: bool) {
    if !killed || kind == Kind::Adopt {
        return;
    }
    match crate::sweep::kill_recorded(dir) {
        Ok((_, 0)) => remove_runtime_files(dir),
        Ok((_, left)) => eprintln!("capsem: warning: {left} processes of the VM outlived SIGKILL"),
        Err(e) => eprintln!(
            "capsem: warning: cannot read the VM's processes: {}",
            crate::error::one_line_chain(&e)
        ),
    }
}

/// A persistent VM by name, or why it is not one.
pub fn persistent(ctx: &Ctx, name: &str) -> Result<Vm, CliError> {
    let vm = ctx.load(name)?;
    if vm.temporary() {
        return Err(CliError::Temporary(name.into()));
    }
    Ok(vm)
}

/// Brings a persistent VM to `running`: adopts an orphaned guest, boots a
/// stopped one only when `boot_stopped`.
pub fn ensure_running(ctx: &Ctx, name: &str, boot_stopped: bool) -> Result<Vm, CliError> {
    let vm = persistent(ctx, name)?;
    if vm.state() == VmState::Running {
        return Ok(vm);
    }
    let _lock = ctx.lock(name)?;
    // Another command may have acted while we waited for the lock.
    let vm = persistent(ctx, name)?;
    let config = vm.config.clone().ok_or(CliError::NoSuchVm(name.into()))?;
    match vm.state() {
        VmState::Running => {}
        VmState::Orphaned => {
            eprintln!(
                "capsem: VM {name}'s host process had died; reconnecting to its running guest"
            );
            boot(ctx, &config, Kind::Adopt)?;
        }
        VmState::Stopped if boot_stopped => boot(ctx, &config, Kind::Persistent)?,
        VmState::Stopped => {
            return Err(CliError::WrongState {
                name: name.into(),
                state: VmState::Stopped,
                hint: "; start it with capsem start NAME",
            })
        }
    }
    persistent(ctx, name)
}

/// How long killed processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Stops a VM's processes: `Shutdown` over ctl.sock when capsem-process
/// lives (the agent ends the shell, the guest syncs and powers off), else
/// SIGTERM to the guest's processes; waits up to `grace` for every recorded
/// process to exit, then SIGKILLs the process groups of the survivors.
/// Every pid is signalled only through its identity check. The caller
/// holds the VM's lock. The VM's files stay, less its runtime files.
pub fn stop_vm(_ctx: &Ctx, vm: &Vm, grace: Duration) -> Result<(), CliError> {
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
        return Err(CliError::Survived {
            role: rec.role.clone(),
            pid: rec.pid,
        });
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
    names.extend((0..capsem_host::share::MAX_SHARES).flat_map(capsem_host::share::runtime_files));
    for name in names {
        match std::fs::remove_file(dir.join(&name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("capsem: cannot remove {}: {e}", dir.join(name).display()),
        }
    }
}
