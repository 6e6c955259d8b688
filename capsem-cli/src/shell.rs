//! `capsem shell`: a temporary VM from start to teardown.
//!
//! Order of events: home and VM directory, capsem-process started and its
//! ready line awaited, attach on `ctl.sock`, raw mode, the session, then on
//! every path: terminal restored, connection closed, capsem-process reaped
//! (killed by process group after a grace period), VM directory removed.
//! Locals are declared so that Rust's reverse drop order does exactly that.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use capsem_proto::ipc::ClientToProcess;

use crate::attach::{AttachError, SessionEnd};
use crate::cli::{AccelChoice, Vmm};
use crate::exit;
use crate::tempvm::{self, Attached, Started, TempVmError};
use crate::terminal::{self, RawGuard, TerminalError};

/// Why `capsem shell` failed.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    Start(#[from] TempVmError),
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
    let mut vm = match tempvm::start(home_flag, vmm, accel, false, None)? {
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
    drop(vm);
    match end {
        SessionEnd::Exited(code) => Ok(code),
        SessionEnd::Signalled(sig) => Ok(exit::from_signal(sig as i32)),
        SessionEnd::Lost(reason) => Err(ShellError::SessionLost(reason)),
        // Only a persistent VM's session detaches.
        SessionEnd::Detached => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_exit_codes() {
        assert_eq!(ShellError::SessionLost("x".into()).exit_code(), 255);
        assert_eq!(
            ShellError::Start(TempVmError::Startup {
                reason: "r".into(),
                log: None
            })
            .exit_code(),
            125
        );
        assert_eq!(ShellError::Attach(AttachError::Closed).exit_code(), 125);
    }

    #[test]
    fn startup_message_names_the_log() {
        let e = ShellError::Start(TempVmError::Startup {
            reason: "the qemu backend is not available yet".into(),
            log: Some("/h/logs/tmp-1.process.log".into()),
        });
        assert_eq!(
            e.to_string(),
            "the qemu backend is not available yet (see /h/logs/tmp-1.process.log)"
        );
        let e = ShellError::Start(TempVmError::Startup {
            reason: "r".into(),
            log: None,
        });
        assert_eq!(e.to_string(), "r");
    }
}
