//! `capsem shell [NAME]`.
//!
//! Without NAME, a temporary VM from start to teardown. Order of events:
//! home and VM directory, capsem-process started and its ready line
//! awaited, attach on `ctl.sock`, raw mode, the session, then on every
//! path: terminal restored, connection closed, capsem-process reaped
//! (killed by process group after a grace period), VM directory removed.
//! Locals are declared so that Rust's reverse drop order does exactly that.
//!
//! With NAME, this terminal attaches to the persistent VM's shell (an
//! orphaned VM is adopted first); Ctrl-] or `~.` detaches and leaves it
//! running.
//!
//! `~.` at the start of a line (on a terminal, see [`crate::escape`]) in a
//! temporary VM destroys it without waiting for capsem-process or the
//! guest ([`crate::tempvm::TempVm::destroy_now`]) and exits 255 with one
//! line saying so.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use capsem_proto::ipc::ClientToProcess;

use crate::attach::{Session, SessionEnd};
use crate::cli::{AccelChoice, NewVmArgs, Vmm};
use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::{self, Exit};
use crate::signals::Signals;
use crate::tempvm::{self, Attached, Started};
use crate::terminal::{self, RawGuard};
use crate::vmctl;

/// Runs a shell in a temporary VM and returns how capsem exits.
pub fn run_temporary(
    home_flag: Option<&Path>,
    vmm: Vmm,
    accel: AccelChoice,
    new: &NewVmArgs,
) -> Result<Exit, CliError> {
    let net = crate::netflags::resolve(new, vmm)?;
    let shares = crate::share::parse_all(&new.volumes, vmm)?;
    let publish = crate::publish::resolve(&new.publish, vmm)?;
    let home = tempvm::home(home_flag)?;
    let image = crate::vmimage::resolve_new(&home, new, vmm)?;
    let new = tempvm::NewVm {
        disk_size: new.disk_size,
        image,
        shares,
        net,
        publish,
    };
    let mut vm = match tempvm::start(home, vmm, accel, false, None, new)? {
        Started::Ready(vm) => vm,
        Started::Interrupted(code) => return Ok(code),
    };

    let stdin = io::stdin();
    let stdin_tty = terminal::is_tty(stdin.as_fd());
    let size = terminal::size_or_default(stdin.as_fd());
    let (cols, rows) = size;
    let mut session = match vm.attach(&ClientToProcess::Attach { cols, rows })? {
        Attached::Session(s) => s,
        Attached::Interrupted(code) => return Ok(code),
    };
    let raw = if stdin_tty {
        match RawGuard::enter(stdin.as_fd()) {
            Ok(guard) => Some(guard),
            Err(e) => {
                session.shutdown();
                return Err(e.into());
            }
        }
    } else {
        None
    };

    let end = session.run(stdin_tty, &mut vm.signals);
    drop(raw);
    drop(session);
    if let SessionEnd::Escaped = end {
        return Ok(vm.escaped());
    }
    drop(vm);
    match end {
        SessionEnd::Exited(code) => Ok(code),
        SessionEnd::Signalled(sig) => Ok(exit::from_signal(sig as i32)),
        SessionEnd::Lost(reason) => Err(CliError::SessionLost(reason)),
        // Only a persistent VM's session detaches.
        SessionEnd::Detached | SessionEnd::Escaped => Ok(Exit::OK),
    }
}

/// The one line a detach from a persistent VM prints.
fn detached_line(name: &str) -> String {
    format!("capsem: detached from {name}; it keeps running (capsem shell {name} reattaches)")
}

/// `capsem shell NAME`: attaches this terminal to the VM's shell.
pub fn run_named(ctx: &Ctx, name: &str, new: &NewVmArgs) -> Result<Exit, CliError> {
    if new.disk_size.is_some()
        || new.image.is_some()
        || crate::netflags::given(new)
        || !new.volumes.is_empty()
        || !new.publish.is_empty()
    {
        return Err(CliError::NewVmFlag(name.into()));
    }
    let vm = vmctl::ensure_running(ctx, name, false)?;
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
        // `~.` leaves at once, Ctrl-] after sending what was typed before
        // it; either way the VM keeps running.
        SessionEnd::Detached | SessionEnd::Escaped => {
            eprint!("\r\n{}\r\n", detached_line(name));
            Ok(Exit::OK)
        }
        SessionEnd::Signalled(sig) => Ok(exit::from_signal(sig as i32)),
        SessionEnd::Lost(reason) => Err(CliError::SessionLost(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::AttachError;
    use crate::tempvm::TempVmError;

    #[test]
    fn errors_map_to_exit_codes() {
        assert_eq!(
            CliError::SessionLost(crate::lost::Lost::Closed)
                .exit()
                .code(),
            255
        );
        assert_eq!(
            CliError::TempVm(TempVmError::Startup {
                reason: "r".into(),
                log: None
            })
            .exit()
            .code(),
            125
        );
        assert_eq!(CliError::Attach(AttachError::Closed).exit().code(), 125);
    }

    #[test]
    fn startup_message_names_the_log() {
        let e = CliError::TempVm(TempVmError::Startup {
            reason: "the qemu backend is not available yet".into(),
            log: Some("/h/logs/tmp-1.process.log".into()),
        });
        assert_eq!(
            e.to_string(),
            "the qemu backend is not available yet (see /h/logs/tmp-1.process.log)"
        );
        let e = CliError::TempVm(TempVmError::Startup {
            reason: "r".into(),
            log: None,
        });
        assert_eq!(e.to_string(), "r");
    }
}
