//! Signals as events: SIGWINCH, SIGHUP, SIGTERM and SIGINT are blocked and
//! read from a signalfd that sits in every poll set, so no signal can kill
//! capsem while the terminal is raw.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Errors setting up or reading the signalfd.
#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    #[error("cannot block signals")]
    Block(#[source] nix::Error),
    #[error("cannot create a signalfd")]
    Create(#[source] nix::Error),
    #[error("cannot read the signalfd")]
    Read(#[source] nix::Error),
}

/// The signals capsem handles.
pub const HANDLED: [Signal; 4] = [
    Signal::SIGWINCH,
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
];

/// The signalfd. Create it before any thread starts: the mask is per thread
/// and inherited. Children get an empty mask (std resets it on spawn; the
/// spawner clears it again in `pre_exec`).
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    pub fn install() -> Result<Self, SignalsError> {
        let mut set = SigSet::empty();
        for sig in HANDLED {
            set.add(sig);
        }
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
            .map_err(SignalsError::Block)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(SignalsError::Create)?;
        Ok(Self { fd })
    }

    /// Every pending signal, in arrival order (standard signals coalesce).
    pub fn drain(&mut self) -> Result<Vec<Signal>, SignalsError> {
        let mut out = Vec::new();
        while let Some(info) = self.fd.read_signal().map_err(SignalsError::Read)? {
            if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                out.push(sig);
            }
        }
        Ok(out)
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
