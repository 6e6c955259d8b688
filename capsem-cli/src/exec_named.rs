//! `capsem exec NAME -- CMD...`: one command in a running persistent VM,
//! beside its shell and any other commands. The same checks, streams and
//! exit codes as `capsem run` ([`crate::run`], [`crate::exec`]); the VM is
//! never stopped by this command, whatever ends it (a signal, an error).
//! An orphaned VM (its capsem-process died) is adopted first.

use capsem_proto::exec::check_start;
use capsem_proto::ipc::ClientToProcess;

use crate::attach::Session;
use crate::cli::ExecArgs;
use crate::exec::{self, ExecEnd};
use crate::exit;
use crate::persist::{Ctx, PersistError};
use crate::run::{parse_env, RunError};
use crate::signals::Signals;

impl From<RunError> for PersistError {
    fn from(e: RunError) -> Self {
        PersistError::Start(e.to_string())
    }
}

/// Runs the command and returns capsem's exit code.
pub fn run(ctx: &Ctx, args: ExecArgs) -> Result<u8, PersistError> {
    let cmd = args.cmd;
    let env = parse_env(&cmd.env, |k| std::env::var_os(k))?;
    check_start(&cmd.command, &env, cmd.workdir.as_deref(), cmd.timeout)
        .map_err(|e| PersistError::Start(e.to_string()))?;
    let vm = crate::persist::ensure_running(ctx, &args.name, false)?;
    let mut signals = Signals::install()?;
    let request = ClientToProcess::Exec {
        argv: cmd.command,
        env,
        workdir: cmd.workdir,
        timeout_ms: cmd.timeout,
        tty: cmd.tty.then(crate::run::tty_size),
    };
    let mut session = Session::connect_with(&vm.ctl_sock(), &request)?;
    session.set_persistent();
    if let Some(sig) = session.await_attached(&mut signals)? {
        return Ok(exit::from_signal(sig as i32));
    }
    let raw = crate::run::raw_if_tty(cmd.tty)?;
    let end = exec::run(&mut session, &mut signals);
    drop(raw);
    match end {
        ExecEnd::Exited(code) => Ok(code),
        ExecEnd::Lost(reason) => Err(PersistError::SessionLost(reason)),
    }
}
