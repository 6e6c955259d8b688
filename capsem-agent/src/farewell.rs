//! The agent's last word: the control connection of its final generation,
//! held (as a duplicate fd) past the bridge's end until everything else the
//! agent owns is stopped and joined, and closed as its very last act.
//!
//! Why: for a temporary VM the host has nothing left to wait for once the
//! agent is done (the shell's status, the audit records and the network
//! records have all been delivered, and the VM's disk is thrown away), so
//! it kills the VM at this close instead of waiting for capsem-init's
//! sync and power-off and for QEMU's own exit (docs/protocol.md, "The
//! end"). A lost generation's connection is released at once, so the host
//! sees that loss as before.
//!
//! The kill skips capsem-init's `sync`, which loses nothing of the shares:
//! virtiofs runs without a writeback cache (a `write` returns once it is on
//! the host) and FUSE writes a shared mapping's dirty pages back when the
//! mapping closes, at the latest when its process exits (tests/share_qemu).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tracing::debug;

/// The held connection, if any.
#[derive(Debug, Default)]
pub struct Farewell {
    held: Option<OwnedFd>,
}

impl Farewell {
    /// Holds a duplicate of `control`, replacing (closing) any held before.
    /// Without a free fd nothing is held: the host then waits for the
    /// guest's power-off, which is slower but loses nothing.
    pub fn hold(&mut self, control: BorrowedFd<'_>) {
        self.held = match control.try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                debug!("cannot keep the control connection for the farewell: {e}");
                None
            }
        };
    }

    /// Closes the held connection now: its generation ended and another
    /// may follow.
    pub fn release(&mut self) {
        self.held = None;
    }

    /// Whether a connection is held.
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// The agent's last act: what it logged is drained to the console first
    /// (the host may kill the VM as soon as the connection closes, and the
    /// serial log is how the agent's last lines reach it), then the held
    /// connection closes.
    pub fn close(self) {
        if self.holds() {
            let stderr = std::io::stderr();
            // ENOTTY when stderr is a file or a pipe (outside a VM): nothing
            // to drain there, the write already completed.
            let _ = nix::sys::termios::tcdrain(stderr.as_fd());
        }
        drop(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn eof(peer: &mut UnixStream) -> bool {
        peer.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        matches!(peer.read(&mut b), Ok(0))
    }

    #[test]
    fn the_peer_sees_eof_only_when_the_farewell_closes() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut f = Farewell::default();
        f.hold(ours.as_fd());
        assert!(f.holds());
        // The bridge's own fd closes at the generation's end...
        drop(ours);
        assert!(!eof(&mut peer), "the held duplicate keeps it open");
        // ...and the peer sees the end only at the agent's last act.
        f.close();
        assert!(eof(&mut peer));
    }

    #[test]
    fn release_and_replace_close_the_previous_connection() {
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        let mut f = Farewell::default();
        f.hold(a.as_fd());
        drop(a);
        f.hold(b.as_fd());
        drop(b);
        assert!(eof(&mut a_peer), "replacing closes the old one");
        assert!(!eof(&mut b_peer));
        f.release();
        assert!(!f.holds());
        assert!(eof(&mut b_peer));
    }
}
