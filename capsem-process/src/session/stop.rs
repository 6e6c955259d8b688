//! Why a session ended, and what that means for its client and its logs.

use std::fmt;

/// Why the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The shell exited; its status went to the client (if one was attached).
    ShellExited,
    /// The guest went away without the shell's status.
    AgentDied(String),
    ShutdownRequested,
    /// The attached client of a temporary VM went away.
    ClientGone,
    Signal(&'static str),
    /// The guest did not come up.
    BootFailed(String),
    /// A persistent VM's idle timeout or max duration: a clean stop.
    Lifetime(super::lifetime::Limit),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::ShellExited => f.write_str("the shell exited"),
            Stop::AgentDied(r) => write!(f, "session lost: {r}"),
            Stop::ShutdownRequested => f.write_str("shutdown requested"),
            Stop::ClientGone => f.write_str("the client of a temporary VM went away"),
            Stop::Signal(s) => write!(f, "received {s}"),
            Stop::BootFailed(r) => write!(f, "the guest did not come up: {r}"),
            Stop::Lifetime(limit) => write!(f, "stopped ({limit})"),
        }
    }
}

impl Stop {
    /// Whether the VM failed: its logs are then kept.
    pub(super) fn failed(&self) -> bool {
        matches!(self, Stop::AgentDied(_) | Stop::BootFailed(_))
    }

    /// The `SessionLost` reason for an attached client, if it gets one.
    pub(super) fn lost_reason(&self) -> Option<String> {
        match self {
            Stop::ShellExited | Stop::ClientGone => None,
            Stop::AgentDied(r) | Stop::BootFailed(r) => Some(r.clone()),
            Stop::ShutdownRequested => Some("the VM was shut down on request".into()),
            Stop::Signal(s) => Some(format!("capsem-process received {s}")),
            Stop::Lifetime(limit) => Some(format!("the VM stopped: {limit} reached")),
        }
    }
}
