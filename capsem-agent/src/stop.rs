//! The one stop signal of a bridge generation.
//!
//! Threads that wait in `poll` see it as an eventfd in their poll set; threads
//! that wait in a crossbeam `select!` see it as a channel whose only sender is
//! dropped. Triggering is idempotent and never blocks.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Errors creating a stop signal.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("cannot create the stop eventfd")]
    EventFd(#[source] nix::Error),
}

/// A level-triggered stop: once triggered, it stays triggered.
#[derive(Debug)]
pub struct StopSignal {
    efd: EventFd,
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
    triggered: AtomicBool,
}

impl StopSignal {
    pub fn new() -> Result<Self, StopError> {
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(StopError::EventFd)?;
        let (tx, rx) = crossbeam_channel::bounded(0);
        Ok(Self {
            efd,
            tx: Mutex::new(Some(tx)),
            rx,
            triggered: AtomicBool::new(false),
        })
    }

    /// Wakes every waiter, now and later.
    pub fn trigger(&self) {
        if self.triggered.swap(true, Ordering::SeqCst) {
            return;
        }
        // The eventfd is never read, so it stays readable; a failed write can
        // only be a counter overflow, which also leaves it readable.
        let _ = self.efd.write(1);
        let sender = match self.tx.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(sender);
    }

    /// The eventfd to put in a poll set (readable once triggered).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    /// A channel that disconnects once triggered, for `select!`.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.rx
    }
}

/// Triggers the stop when dropped, so an unwinding coordinator still lets the
/// threads it started finish and be joined.
#[derive(Debug)]
pub struct StopOnDrop<'a>(pub &'a StopSignal);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdio;
    use std::time::{Duration, Instant};

    #[test]
    fn trigger_wakes_poll_and_select_and_is_idempotent() {
        let stop = StopSignal::new().unwrap();
        let mut fds = [fdio::pollfd(stop.fd(), fdio::IN)];
        let soon = Instant::now() + Duration::from_millis(1);
        assert_eq!(fdio::poll(&mut fds, Some(soon)).unwrap(), 0);
        std::thread::scope(|s| {
            let h = s.spawn(|| stop.receiver().recv().is_err());
            stop.trigger();
            stop.trigger();
            assert!(h.join().unwrap(), "select waiter sees a disconnect");
        });
        let mut fds = [fdio::pollfd(stop.fd(), fdio::IN)];
        assert_eq!(fdio::poll(&mut fds, None).unwrap(), 1);
    }
}
