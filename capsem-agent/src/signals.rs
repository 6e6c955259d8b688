//! Termination signals as an fd.
//!
//! SIGTERM, SIGINT and SIGHUP are blocked in the main thread before any other
//! thread exists (so every thread inherits the mask) and read from a
//! signalfd, which every wait outside a bridge and the bridge's heartbeat
//! thread keep in their poll sets. The shell starts with an empty mask
//! (`pty` resets it in the child before exec).

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Errors setting up signal delivery.
#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    #[error("cannot block the termination signals")]
    Block(#[source] nix::Error),
    #[error("cannot create the signalfd")]
    SignalFd(#[source] nix::Error),
}

/// The signals that end the agent.
pub const TERMINATING: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// The agent's termination signals, readable as an fd.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks [`TERMINATING`] in the calling thread and opens a signalfd for
    /// them. Call from `main` before starting any thread.
    pub fn block() -> Result<Self, SignalsError> {
        let mut mask = SigSet::empty();
        for sig in TERMINATING {
            mask.add(sig);
        }
        mask.thread_block().map_err(SignalsError::Block)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(SignalsError::SignalFd)?;
        Ok(Self { fd })
    }

    /// Readable while a termination signal is pending.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Consumes one pending signal, if any, and returns its number.
    pub fn take(&self) -> Option<i32> {
        match self.fd.read_signal() {
            Ok(Some(info)) => i32::try_from(info.ssi_signo).ok(),
            _ => None,
        }
    }
}
