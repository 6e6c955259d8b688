//! What every VM command shares: [`Ctx`] (the resolved home, the backend,
//! the accelerator), loading and locking a VM by name, and the names the
//! command line may give.

use std::path::{Path, PathBuf};

use capsem_host::lock::VmLock;

use crate::cli::{AccelChoice, Vmm};
use crate::error::CliError;
use crate::home;
use crate::vms::Vm;

/// What every VM command needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub home: PathBuf,
    pub vmm: Vmm,
    pub accel: AccelChoice,
}

impl Ctx {
    /// The home from `--home`, `$CAPSEM_HOME` or `~/.capsem`; one that
    /// exists but cannot be read is an error (exit 125).
    pub fn new(home_flag: Option<&Path>, vmm: Vmm, accel: AccelChoice) -> Result<Self, CliError> {
        let home = home::resolve_home(
            home_flag,
            std::env::var_os("CAPSEM_HOME").as_deref(),
            home::user_home().as_deref(),
        )?;
        home::check_readable(&home)?;
        Ok(Self { home, vmm, accel })
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        crate::vms::vm_dir(&self.home, name)
    }

    /// The VM's lock, held by the caller while it acts on the VM.
    pub fn lock(&self, name: &str) -> Result<VmLock, CliError> {
        Ok(VmLock::acquire(&self.home, name)?)
    }

    /// Loads an existing VM, or says there is none by that name.
    pub fn load(&self, name: &str) -> Result<Vm, CliError> {
        check_name(name)?;
        let dir = self.vm_dir(name);
        if !dir.is_dir() {
            return Err(CliError::NoSuchVm(name.into()));
        }
        Ok(Vm::load(&dir)?)
    }
}

/// A name given on the command line: a persistent VM's name, or the id of
/// a temporary VM (`tmp-` and 16 hex digits) for the read-only commands.
pub fn check_name(name: &str) -> Result<(), CliError> {
    if is_temp_id(name) {
        return Ok(());
    }
    check_persistent_name(name)
}

/// A persistent VM's name (what `capsem create` accepts).
pub fn check_persistent_name(name: &str) -> Result<(), CliError> {
    capsem_host::vmstate::validate_name(name).map_err(|source| CliError::Name {
        name: name.chars().take(64).collect(),
        source,
    })
}

fn is_temp_id(name: &str) -> bool {
    name.strip_prefix("tmp-")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
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
