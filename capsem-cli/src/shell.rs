//! `capsem shell`: a temporary VM from start to teardown.
//!
//! Order of events: home and VM directory, capsem-process started and its
//! ready line awaited, attach on `ctl.sock`, raw mode, the session, then on
//! every path: terminal restored, connection closed, capsem-process reaped
//! (killed by process group after a grace period), VM directory removed.
//! Locals are declared so that Rust's reverse drop order does exactly that.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use crate::attach::{AttachError, Session, SessionEnd};
use crate::cli::{AccelChoice, Vmm};
use crate::exit;
use crate::home::{self, HomeError, VmDir};
use crate::progress::Progress;
use crate::signals::{Signals, SignalsError};
use crate::spawn::{self, ReadyOutcome, SpawnError, EXIT_GRACE};
use crate::terminal::{self, RawGuard, TerminalError};

/// The warning `--vmm none` prints, once, on stderr.
pub const NO_ISOLATION_WARNING: &str =
    "capsem: warning: --vmm none runs the shell on this host with no isolation";

/// Why `capsem shell` failed.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Signals(#[from] SignalsError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// capsem-process reported that it could not start the VM.
    #[error("{reason}{}", .log.as_ref().map(|l| format!(" (see {})", l.display())).unwrap_or_default())]
    Startup {
        reason: String,
        log: Option<PathBuf>,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    #[error("session lost: {0}")]
    SessionLost(String),
}

impl ShellError {
    /// The documented exit code (see `exit.rs`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ShellError::SessionLost(_) => exit::SESSION_LOST,
            _ => exit::CAPSEM_FAILED,
        }
    }
}

/// Runs a shell in a temporary VM and returns capsem's exit code.
pub fn run(home_flag: Option<&Path>, vmm: Vmm, accel: AccelChoice) -> Result<u8, ShellError> {
    let home = home::resolve_home(
        home_flag,
        std::env::var_os("CAPSEM_HOME").as_deref(),
        home::user_home().as_deref(),
    )?;
    if vmm == Vmm::None {
        eprintln!("{NO_ISOLATION_WARNING}");
    }
    let mut signals = Signals::install()?;
    let bin = spawn::find_process_bin(
        std::env::var_os(spawn::PROCESS_BIN_ENV),
        std::env::current_exe(),
    )?;
    let id = home::new_temp_id()?;
    // Declared before the child: dropped (removed) after it is reaped.
    let vm_dir = VmDir::create(&home, &id)?;
    let (mut child, mut ready) = spawn::spawn(&bin, vm_dir.path(), &id, vmm, accel, false)?;

    let outcome = {
        let mut progress = Progress::new(match vmm {
            Vmm::Qemu => "starting VM",
            Vmm::None => "starting shell",
        });
        ready.wait(&child, &mut signals, &mut progress)
    };
    match outcome {
        Ok(ReadyOutcome::Ready) => {}
        Ok(ReadyOutcome::Failed(reason)) => {
            child.teardown(EXIT_GRACE);
            let log = vm_dir.keep_log(&home, &id);
            return Err(ShellError::Startup { reason, log });
        }
        Ok(ReadyOutcome::Interrupted(sig)) => {
            child.signal_group(Signal::SIGTERM);
            return Ok(exit::from_signal(sig as i32));
        }
        Err(e) => {
            child.signal_group(Signal::SIGTERM);
            return Err(e.into());
        }
    }

    let stdin = io::stdin();
    let stdin_tty = terminal::is_tty(stdin.as_fd());
    let size = terminal::size_or_default(stdin.as_fd());
    let mut session = match Session::connect(&vm_dir.path().join("ctl.sock"), size) {
        Ok(s) => s,
        Err(e) => {
            child.signal_group(Signal::SIGTERM);
            return Err(e.into());
        }
    };
    match session.await_attached(&mut signals) {
        Ok(None) => {}
        Ok(Some(sig)) => {
            session.shutdown();
            return Ok(exit::from_signal(sig as i32));
        }
        Err(e) => {
            session.shutdown();
            return Err(e.into());
        }
    }
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

    let end = session.run(stdin_tty, &mut signals);
    drop(raw);
    drop(session);
    drop(child);
    drop(vm_dir);
    match end {
        SessionEnd::Exited(code) => Ok(code),
        SessionEnd::Signalled(sig) => Ok(exit::from_signal(sig as i32)),
        SessionEnd::Lost(reason) => Err(ShellError::SessionLost(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_exit_codes() {
        assert_eq!(ShellError::SessionLost("x".into()).exit_code(), 255);
        assert_eq!(
            ShellError::Startup {
                reason: "r".into(),
                log: None
            }
            .exit_code(),
            125
        );
        assert_eq!(ShellError::Attach(AttachError::Closed).exit_code(), 125);
    }

    #[test]
    fn startup_message_names_the_log() {
        let e = ShellError::Startup {
            reason: "the qemu backend is not available yet".into(),
            log: Some("/h/logs/tmp-1.process.log".into()),
        };
        assert_eq!(
            e.to_string(),
            "the qemu backend is not available yet (see /h/logs/tmp-1.process.log)"
        );
        let e = ShellError::Startup {
            reason: "r".into(),
            log: None,
        };
        assert_eq!(e.to_string(), "r");
    }
}
