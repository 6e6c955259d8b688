//! The user's terminal: size, raw mode, and restoring it on every exit path.
//!
//! The original mode is kept in a process-wide slot so that both the
//! [`RawGuard`]'s `Drop` (normal return, error, unwinding) and the panic hook
//! can put it back. Signals never kill capsem while raw: they are read from a
//! signalfd (see `signals.rs`).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Mutex;

/// Errors switching the terminal mode.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("cannot read the terminal mode")]
    GetAttr(#[source] io::Error),
    #[error("cannot set the terminal to raw mode")]
    SetAttr(#[source] io::Error),
}

/// Size used when stdin is not a terminal.
pub const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// The terminal to restore: its fd and original mode.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    nix::unistd::isatty(fd.as_raw_fd()).unwrap_or(false)
}

/// `(cols, rows)` of the terminal on `fd`, `None` if it is not a terminal or
/// reports a zero size.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = MaybeUninit::<libc::winsize>::zeroed();
    // SAFETY: TIOCGWINSZ writes one winsize into the valid pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, ws.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised and, on success, filled by the kernel.
    let ws = unsafe { ws.assume_init() };
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The size to report for `fd`: its window size, else [`DEFAULT_SIZE`].
pub fn size_or_default(fd: BorrowedFd<'_>) -> (u16, u16) {
    window_size(fd).unwrap_or(DEFAULT_SIZE)
}

fn restore_saved() {
    // try_lock: the panic hook must not deadlock if a panic happened while
    // the slot was held (it never is for long).
    let Ok(mut slot) = SAVED.try_lock() else {
        return;
    };
    if let Some((fd, original)) = slot.take() {
        // SAFETY: `original` came from tcgetattr on this fd; a failure (the
        // terminal hung up) leaves nothing to restore.
        unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &original) };
    }
}

/// Installs a panic hook that restores the terminal before the default
/// hook prints the panic message.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_saved();
        previous(info);
    }));
}

/// Raw mode on a terminal until dropped.
#[derive(Debug)]
pub struct RawGuard {
    _private: (),
}

impl RawGuard {
    /// Switches `fd` (a terminal; stdin) to raw mode (`cfmakeraw`).
    pub fn enter(fd: BorrowedFd<'_>) -> Result<Self, TerminalError> {
        let raw_fd = fd.as_raw_fd();
        let mut original = MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: tcgetattr fills the termios we point to.
        if unsafe { libc::tcgetattr(raw_fd, original.as_mut_ptr()) } != 0 {
            return Err(TerminalError::GetAttr(io::Error::last_os_error()));
        }
        // SAFETY: filled by tcgetattr above.
        let original = unsafe { original.assume_init() };
        let mut raw = original;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Save before switching so no path can leave it raw unrecorded.
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((raw_fd, original));
        // SAFETY: valid fd and a termios derived from its own.
        if unsafe { libc::tcsetattr(raw_fd, libc::TCSADRAIN, &raw) } != 0 {
            let err = io::Error::last_os_error();
            restore_saved();
            return Err(TerminalError::SetAttr(err));
        }
        Ok(Self { _private: () })
    }
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        restore_saved();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_is_not_a_tty_and_gets_the_default_size() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(!is_tty(r.as_fd()));
        assert_eq!(window_size(r.as_fd()), None);
        assert_eq!(size_or_default(r.as_fd()), (80, 24));
    }

    #[test]
    fn raw_mode_on_a_pty_is_restored_on_drop() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let slave = pty.slave.as_fd();
        let before = nix::sys::termios::tcgetattr(slave).unwrap();
        {
            let _g = RawGuard::enter(slave).unwrap();
            let during = nix::sys::termios::tcgetattr(slave).unwrap();
            assert!(!during
                .local_flags
                .contains(nix::sys::termios::LocalFlags::ICANON));
        }
        let after = nix::sys::termios::tcgetattr(slave).unwrap();
        assert_eq!(before.local_flags, after.local_flags);
        assert_eq!(before.input_flags, after.input_flags);
        assert_eq!(before.output_flags, after.output_flags);
    }
}
