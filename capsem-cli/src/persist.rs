//! Persistent VMs: `create`, `shell NAME`, `start`, `stop`, and the
//! dispatch of the other VM commands (`list`, `inspect`, `rm`, `logs`).
//!
//! Every command first sweeps (see [`crate::sweep`]), then takes the VM's
//! lock ([`capsem_host::lock::VmLock`]) for as long as it changes the VM's
//! processes or files, so two commands on one VM never interleave.

use std::path::{Path, PathBuf};

use capsem_host::lock::{LockError, VmLock};
use capsem_host::vmstate::{NameError, VmStateError};

use crate::attach::AttachError;
use crate::cli::{AccelChoice, Command, Vmm};
use crate::exit;
use crate::home::{self, HomeError};
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
        Command::Shell { name: None } | Command::Run(_) | Command::Doctor => {
            Err(PersistError::Start("not a VM command".into()))
        }
    }
}

fn create(_ctx: &Ctx, _args: &crate::cli::CreateArgs) -> Result<u8, PersistError> {
    Err(PersistError::Start("create: not built yet".into()))
}

fn shell(_ctx: &Ctx, _name: &str) -> Result<u8, PersistError> {
    Err(PersistError::Start("shell NAME: not built yet".into()))
}

fn start(_ctx: &Ctx, _name: &str) -> Result<u8, PersistError> {
    Err(PersistError::Start("start: not built yet".into()))
}

fn stop(ctx: &Ctx, name: &str, grace: u64) -> Result<u8, PersistError> {
    let _lock = ctx.lock(name)?;
    let vm = ctx.load(name)?;
    stop_vm(ctx, &vm, std::time::Duration::from_secs(grace))?;
    Ok(0)
}

/// Stops a VM's processes: `Shutdown` over ctl.sock when capsem-process
/// lives, wait up to `grace` for every recorded process to exit, then
/// SIGKILL the process groups of the (identity-checked) survivors. The
/// caller holds the VM's lock. The VM's files stay.
pub fn stop_vm(_ctx: &Ctx, _vm: &Vm, _grace: std::time::Duration) -> Result<(), PersistError> {
    Err(PersistError::Start("stop: not built yet".into()))
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
