//! `capsem stop NAME [--grace SECS]`: the agent ends the shell, syncs and
//! powers the VM off; whatever is left after the grace period is killed
//! ([`crate::vmctl::stop_vm`]). The name goes to stdout.

use std::time::Duration;

use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;
use crate::vmctl;
use crate::vms::VmState;

/// `capsem stop NAME`: see the module doc.
pub fn run(ctx: &Ctx, name: &str, grace: u64) -> Result<Exit, CliError> {
    let _lock = ctx.lock(name)?;
    let vm = vmctl::persistent(ctx, name)?;
    if vm.state() == VmState::Stopped {
        return Err(CliError::WrongState {
            name: name.into(),
            state: VmState::Stopped,
            hint: " already",
        });
    }
    vmctl::stop_vm(ctx, &vm, Duration::from_secs(grace))?;
    println!("{name}");
    Ok(Exit::OK)
}
