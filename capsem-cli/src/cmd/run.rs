//! `capsem run`: one command in a temporary VM, from start to teardown.
//! With `--image` and no command, the image's Entrypoint and Cmd run.
//!
//! Order of events: the request is checked (a refused environment variable
//! or an oversized command is exit 125 before anything starts), home and VM
//! directory, capsem-process started with `--exec` and its ready line
//! awaited, `Exec` on `ctl.sock`, the exec loop ([`crate::exec_loop`]), then
//! on every path: connection closed, capsem-process reaped (killed by
//! process group after a grace period), VM directory removed. Locals are
//! declared so that Rust's reverse drop order does exactly that. With `-t`
//! on a terminal, `~.` at the start of a line destroys the VM at once
//! (exit 255, [`crate::tempvm::TempVm::escaped`]).

use std::path::Path;

use crate::cli::{AccelChoice, RunArgs, Vmm};
use crate::error::CliError;
use crate::exec_loop::{self, ExecEnd};
use crate::exit::Exit;
use crate::request::{exec_request, prepare_audit_log, raw_if_tty};
use crate::tempvm::{self, Attached, Started};

/// Runs one command in a temporary VM and returns how capsem exits.
pub fn run(
    home_flag: Option<&Path>,
    vmm: Vmm,
    accel: AccelChoice,
    mut args: RunArgs,
) -> Result<Exit, CliError> {
    // Checked before anything is made or pulled; tempvm::start records it.
    let net = crate::netflags::resolve(&args.new, vmm)?;
    let shares = crate::share::parse_all(&args.new.volumes, vmm)?;
    let publish = crate::publish::resolve(&args.new.publish, vmm)?;
    let home = tempvm::home(home_flag)?;
    let image = crate::vmimage::resolve_new(&home, &args.new, vmm)?;
    if args.cmd.command.is_empty() {
        // Like `docker run IMAGE`: the image's Entrypoint and Cmd.
        let chosen = image.as_ref().ok_or(CliError::NoCommand)?;
        args.cmd.command = chosen.cached.config.default_command();
        if args.cmd.command.is_empty() {
            return Err(CliError::NoDefaultCommand(chosen.record.reference.clone()));
        }
    }
    let (request, tty) = exec_request(args.cmd)?;
    // capsem-process appends the guest's audit records there at teardown.
    let audit_log = args
        .audit_log
        .as_deref()
        .map(prepare_audit_log)
        .transpose()?;
    let mut vm = match tempvm::start(
        home,
        vmm,
        accel,
        true,
        audit_log.as_deref(),
        tempvm::NewVm {
            disk_size: args.new.disk_size,
            image,
            shares,
            net,
            publish,
        },
    )? {
        Started::Ready(vm) => vm,
        Started::Interrupted(code) => return Ok(code),
    };

    let mut session = match vm.attach(&request)? {
        Attached::Session(s) => s,
        Attached::Interrupted(code) => return Ok(code),
    };
    let raw = raw_if_tty(tty)?;
    let end = exec_loop::run(&mut session, &mut vm.signals, raw.is_some());
    drop(raw);
    drop(session);
    if let ExecEnd::Escaped = end {
        return Ok(vm.escaped());
    }
    drop(vm);
    match end {
        ExecEnd::Exited(code) => Ok(code),
        ExecEnd::Escaped => Ok(Exit::Lost),
        ExecEnd::Lost(reason) => Err(CliError::SessionLost(reason)),
    }
}
