//! `capsem exec NAME -- CMD...`: one command in a running persistent VM,
//! beside its shell and any other commands. The same checks, streams and
//! exit codes as `capsem run` ([`crate::request`], [`crate::exec_loop`]);
//! the VM is never stopped by this command, whatever ends it (a signal, an
//! error, `~.` at the start of a line with `-t` on a terminal, which leaves
//! at once with exit 255). An orphaned VM (its capsem-process died) is
//! adopted first.

use crate::attach::Session;
use crate::cli::ExecArgs;
use crate::context::Ctx;
use crate::error::CliError;
use crate::exec_loop::{self, ExecEnd};
use crate::exit::{self, Exit};
use crate::request::{exec_request, raw_if_tty};
use crate::signals::Signals;
use crate::vmctl;

/// The one line `~.` prints: the client left, the VM runs on.
fn escaped_line(name: &str) -> String {
    format!("capsem: ~. typed: left the command; VM {name} keeps running")
}

/// Runs the command and returns how capsem exits.
pub fn run(ctx: &Ctx, args: ExecArgs) -> Result<Exit, CliError> {
    if args.cmd.command.is_empty() {
        return Err(CliError::NoCommand);
    }
    let (request, tty) = exec_request(args.cmd)?;
    let vm = vmctl::ensure_running(ctx, &args.name, false)?;
    let mut signals = Signals::install()?;
    let mut session = Session::connect_with(&vm.ctl_sock(), &request)?;
    session.set_persistent();
    if let Some(sig) = session.await_attached(&mut signals)? {
        return Ok(exit::from_signal(sig as i32));
    }
    let raw = raw_if_tty(tty)?;
    let end = exec_loop::run(&mut session, &mut signals, raw.is_some());
    drop(raw);
    match end {
        ExecEnd::Exited(code) => Ok(code),
        ExecEnd::Escaped => {
            eprint!("\r\n{}\r\n", escaped_line(&args.name));
            Ok(Exit::Lost)
        }
        ExecEnd::Lost(reason) => Err(CliError::SessionLost(reason)),
    }
}
