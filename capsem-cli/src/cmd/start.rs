//! `capsem start NAME`: boots a stopped persistent VM again with the same
//! name and settings (or adopts an orphaned one); the name goes to stdout.

use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;
use crate::vmctl;
use crate::vms::VmState;

/// `capsem start NAME`: boots a stopped VM (or adopts an orphaned one).
pub fn run(ctx: &Ctx, name: &str) -> Result<Exit, CliError> {
    let vm = vmctl::persistent(ctx, name)?;
    if vm.state() == VmState::Running {
        return Err(CliError::WrongState {
            name: name.into(),
            state: VmState::Running,
            hint: " already",
        });
    }
    vmctl::ensure_running(ctx, name, true)?;
    println!("{name}");
    Ok(Exit::OK)
}
