//! `capsem audit NAME [--follow] [--json]`: the guest's execve records,
//! (`--net`: its connection records, [`crate::netaudit`]),
//! printed safely ([`crate::auditfmt`]). `--follow` keeps printing until
//! the VM's capsem-process exits; SIGINT ends it with exit 0, SIGTERM and
//! SIGHUP with 128 + N.

use std::io;
use std::os::fd::AsFd;

use crate::auditfmt::{follow_records, print_records, AuditError, Printer};
use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;
use crate::follow::End;
use crate::signals::Signals;

/// Prints VM `name`'s audit records; exit code 0 (or 128 + N after
/// signal N while following).
pub fn run(ctx: &Ctx, name: &str, follow: bool, json: bool) -> Result<Exit, CliError> {
    let vm = ctx.load(name)?;
    let stdout = io::stdout();
    let mut printer = Printer::new(stdout.lock(), json);
    let pidfd = if follow {
        vm.process
            .as_ref()
            .filter(|p| p.alive())
            .and_then(|p| p.record.open_verified().ok())
    } else {
        None
    };
    let result = match pidfd {
        Some(pidfd) => {
            let mut signals = Signals::install()?;
            follow_records(&vm.dir, &mut printer, pidfd.as_fd(), &mut signals)
        }
        None => print_records(&vm.dir, &mut printer).map(|()| End::ProcessExited),
    };
    match result {
        Ok(End::Stopped(code)) => Ok(code),
        Ok(_) => Ok(Exit::OK),
        // Nobody reads any more (`capsem audit dev | head`): not a failure.
        Err(AuditError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Exit::OK),
        Err(e) => Err(e.into()),
    }
}

/// `capsem audit NAME --net`: VM `name`'s connection records; exit 0.
pub fn run_net(ctx: &Ctx, name: &str, json: bool) -> Result<Exit, CliError> {
    let vm = ctx.load(name)?;
    let stdout = io::stdout();
    match crate::netaudit::print(&vm.dir, json, &mut stdout.lock()) {
        Ok(()) => Ok(Exit::OK),
        Err(AuditError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Exit::OK),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auditfmt::AUDIT_FILE;
    use crate::testutil::{config, ctx, make_vm};

    #[test]
    fn prints_a_vms_records_or_says_there_is_no_vm() {
        let home = tempfile::tempdir().unwrap();
        let dir = make_vm(home.path(), "dev", Some(&config("dev", false, None)), None);
        std::fs::write(dir.join(AUDIT_FILE), "").unwrap();
        // No process: printed once, with or without --follow.
        assert_eq!(
            run(&ctx(home.path()), "dev", false, false).unwrap(),
            Exit::OK
        );
        assert_eq!(run(&ctx(home.path()), "dev", true, true).unwrap(), Exit::OK);
        assert!(matches!(
            run(&ctx(home.path()), "nope", false, false),
            Err(CliError::NoSuchVm(_))
        ));
    }
}
