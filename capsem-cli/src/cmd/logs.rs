//! `capsem logs [--follow] [--source process|serial] NAME`: a VM's log on
//! stdout, byte for byte.
//!
//! `--source process` (the default) is `process.log`, capsem-process's own
//! events; `--source serial` is the guest console, `serial.log` for qemu
//! VMs or `agent.log` for `--vmm none` (from `vm.json`).
//!
//! `--follow` prints what is appended until the VM's capsem-process exits
//! (checked by identity, watched through a pidfd); when it is not running
//! the log is printed once, as without `--follow`. One poll set holds an
//! inotify fd (the log file and the VM directory), the pidfd, the signalfd
//! and stdout (to notice a reader that went away). The log is followed by
//! name: one that is replaced (renamed over, or deleted and created again)
//! is reopened, one that shrinks is read again from its start
//! ([`crate::follow`]). It also ends when the VM directory is removed. SIGINT ends it with exit 0,
//! SIGTERM and SIGHUP with 128 + N.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;

use crate::cli::LogSource;
use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;
use crate::follow::{follow_log, End, FollowError};
use crate::signals::Signals;
use crate::vms::Vm;

/// The log file `source` names for `vm`.
pub fn log_file(vm: &Vm, source: LogSource) -> &'static str {
    match source {
        LogSource::Process => "process.log",
        LogSource::Serial => {
            let none = match &vm.config {
                Some(c) => c.vmm == "none",
                // No vm.json: whichever console log exists.
                None => vm.dir.join("agent.log").exists(),
            };
            if none {
                "agent.log"
            } else {
                "serial.log"
            }
        }
    }
}

/// Prints VM `name`'s log; exit code 0 (or 128 + N after signal N).
pub fn run(ctx: &Ctx, name: &str, follow: bool, source: LogSource) -> Result<Exit, CliError> {
    let vm = ctx.load(name)?;
    let file = log_file(&vm, source);
    let path = vm.dir.join(file);
    let missing = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            CliError::LogMissing {
                name: name.into(),
                file,
                path: path.clone(),
                source,
            }
        } else {
            CliError::Follow(FollowError::Open {
                path: path.clone(),
                source,
            })
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let process = if follow {
        vm.process
            .as_ref()
            .filter(|p| p.alive())
            .and_then(|p| p.record.open_verified().ok())
    } else {
        None
    };
    let Some(pidfd) = process else {
        let mut log = File::open(&path).map_err(missing)?;
        return match io::copy(&mut log, &mut out).and_then(|_| out.flush()) {
            Ok(()) => Ok(Exit::OK),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Exit::OK),
            Err(e) => Err(CliError::Io {
                what: format!("cannot copy {} to stdout", path.display()),
                source: e,
            }),
        };
    };
    if !path.exists() {
        return Err(missing(io::Error::from(io::ErrorKind::NotFound)));
    }
    let mut signals = Signals::install()?;
    match follow_log(&path, &mut out, pidfd.as_fd(), &mut signals)? {
        End::Stopped(code) => Ok(code),
        End::ProcessExited | End::DirGone | End::OutputClosed => Ok(Exit::OK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{config, ctx, make_vm};

    #[test]
    fn a_missing_log_is_a_clear_error() {
        let home = tempfile::tempdir().unwrap();
        make_vm(home.path(), "dev", Some(&config("dev", false, None)), None);
        let err = run(&ctx(home.path()), "dev", false, LogSource::Serial).unwrap_err();
        let text = crate::error::one_line_chain(&err);
        assert!(
            text.starts_with("VM \"dev\" has no agent.log (yet): ")
                && text.contains("agent.log does not exist"),
            "{text}"
        );
    }

    #[test]
    fn which_file() {
        let home = tempfile::tempdir().unwrap();
        let mut qemu = config("q", false, None);
        qemu.vmm = "qemu".into();
        make_vm(home.path(), "q", Some(&qemu), None);
        make_vm(home.path(), "n", Some(&config("n", false, None)), None);
        let bare = make_vm(home.path(), "tmp-00000000000000aa", None, None);
        let ctx = ctx(home.path());
        let load = |n: &str| ctx.load(n).unwrap();
        assert_eq!(log_file(&load("q"), LogSource::Serial), "serial.log");
        assert_eq!(log_file(&load("q"), LogSource::Process), "process.log");
        assert_eq!(log_file(&load("n"), LogSource::Serial), "agent.log");
        let id = "tmp-00000000000000aa";
        assert_eq!(log_file(&load(id), LogSource::Serial), "serial.log");
        std::fs::write(bare.join("agent.log"), b"").unwrap();
        assert_eq!(log_file(&load(id), LogSource::Serial), "agent.log");
    }

    #[test]
    fn prints_a_whole_log_without_follow() {
        let home = tempfile::tempdir().unwrap();
        let dir = make_vm(home.path(), "dev", Some(&config("dev", false, None)), None);
        std::fs::write(dir.join("process.log"), b"a\x00b\xff\n").unwrap();
        // Goes to the test's stdout; what matters is that it succeeds
        // without a running process, with or without --follow.
        assert_eq!(
            run(&ctx(home.path()), "dev", false, LogSource::Process).unwrap(),
            Exit::OK
        );
        assert_eq!(
            run(&ctx(home.path()), "dev", true, LogSource::Process).unwrap(),
            Exit::OK
        );
    }
}
