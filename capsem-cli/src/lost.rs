//! Why a session ended without an exit status ([`Lost`]): capsem exits
//! 255 and prints `capsem: session lost: <reason>[: <cause>]`. Each cause
//! is kept as a `#[source]`.

use std::io;

use capsem_proto::FrameError;

use crate::signals::SignalsError;
use crate::terminal::TerminalError;

/// Why the session was lost.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// capsem-process's own words (a `SessionLost` or `Error` message),
    /// made one line.
    #[error("{0}")]
    Reported(String),
    #[error("the shell ended without an exit status")]
    NoShellStatus,
    #[error("the command ended without an exit status")]
    NoCommandStatus,
    #[error("poll failed")]
    Poll(#[source] nix::Error),
    #[error("cannot encode a message")]
    Encode(#[source] FrameError),
    #[error("cannot encode input")]
    EncodeInput(#[source] FrameError),
    #[error("invalid message from capsem-process")]
    Invalid(#[source] FrameError),
    #[error("capsem-process closed the connection")]
    Closed,
    #[error("capsem-process closed the connection")]
    ClosedMidFrame(#[source] FrameError),
    #[error("cannot read from capsem-process")]
    Read(#[source] io::Error),
    #[error("capsem-process stopped reading")]
    StoppedReading,
    #[error("cannot send to capsem-process")]
    Send(#[source] io::Error),
    #[error("cannot write to stdout")]
    Stdout(#[source] io::Error),
    #[error("cannot set the terminal to raw mode")]
    RawMode(#[source] TerminalError),
    #[error(transparent)]
    Signals(#[from] SignalsError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{one_line_chain, CliError};

    #[test]
    fn a_lost_session_reads_as_one_line_with_its_cause() {
        let e = CliError::SessionLost(Lost::Read(io::Error::from_raw_os_error(libc::EIO)));
        let line = one_line_chain(&e);
        assert!(
            line.starts_with("session lost: cannot read from capsem-process: "),
            "{line}"
        );
        assert!(std::error::Error::source(&e).is_some());
        let e = CliError::SessionLost(Lost::Reported("agent died".into()));
        assert_eq!(one_line_chain(&e), "session lost: agent died");
    }
}
