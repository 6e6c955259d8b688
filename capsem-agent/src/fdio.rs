//! Thin, checked wrappers over the fd syscalls the agent needs: `poll` with a
//! deadline, nonblocking `read`/`write`, and a write the stop signal cancels.
//!
//! Every fd reaches these functions as a `BorrowedFd`; the raw number only
//! appears at the syscall.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Instant;

/// Readable, or the peer hung up (which a read then reports).
pub const IN: i16 = libc::POLLIN;
/// Writable.
pub const OUT: i16 = libc::POLLOUT;

/// A `pollfd` entry for `fd`.
pub fn pollfd(fd: BorrowedFd<'_>, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// `poll(2)` until an entry is ready or `deadline` passes (`None`: no
/// deadline). Returns the number of ready entries (0 on timeout). An
/// interrupted poll is restarted with the time that is left.
pub fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so a wait never ends just before its deadline.
                let ms = left.as_micros().div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        };
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: `fds` is a valid, exclusively borrowed slice of `nfds`
        // pollfd entries for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// True when `revents` of an entry reports anything (ready, hangup, error).
pub fn ready(p: &libc::pollfd) -> bool {
    p.revents != 0
}

/// One `read(2)`; `WouldBlock` on a nonblocking fd with nothing to read.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes and
        // `fd` is open for the duration of the borrow.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One `write(2)`; `WouldBlock` on a nonblocking fd that is full.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable buffer of `buf.len()` bytes and
        // `fd` is open for the duration of the borrow.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sets `O_NONBLOCK`, so every wait happens in a `poll` that also watches the
/// stop signal.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on an open fd has no memory effects.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with integer flags on an open fd has no memory effects.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a cancellable write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Every byte was written.
    All,
    /// `cancel` became readable first; `written` bytes had gone out.
    Cancelled { written: usize },
}

/// Writes all of `buf` to the nonblocking `fd`, waiting for writability in a
/// poll that also watches `cancel`, so a peer that stops reading can never
/// hold the caller (and therefore a join) forever.
pub fn write_all(fd: BorrowedFd<'_>, buf: &[u8], cancel: BorrowedFd<'_>) -> io::Result<Written> {
    let mut written = 0;
    while written < buf.len() {
        match write(fd, &buf[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [pollfd(cancel, IN), pollfd(fd, OUT)];
                poll(&mut fds, None)?;
                if ready(&fds[0]) {
                    return Ok(Written::Cancelled { written });
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Written::All)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn poll_times_out_at_the_deadline() {
        let (a, _b) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let mut fds = [pollfd(a.as_fd(), IN)];
        let n = poll(&mut fds, Some(start + Duration::from_millis(30))).unwrap();
        assert_eq!(n, 0);
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn write_to_a_full_socket_is_cancelled_by_the_cancel_fd() {
        let (a, _b) = UnixStream::pair().unwrap();
        set_nonblocking(a.as_fd()).unwrap();
        let (cancel, cancel_peer) = UnixStream::pair().unwrap();
        // Make the cancel fd readable before writing: the write must return
        // once the socket fills instead of blocking.
        std::io::Write::write_all(&mut &cancel_peer, b"x").unwrap();
        let big = vec![0u8; 16 * 1024 * 1024];
        let got = write_all(a.as_fd(), &big, cancel.as_fd()).unwrap();
        match got {
            Written::Cancelled { written } => assert!(written < big.len()),
            Written::All => panic!("a 16 MiB write cannot fit in a socket buffer"),
        }
    }

    #[test]
    fn write_all_writes_everything_when_there_is_room() {
        let (a, b) = UnixStream::pair().unwrap();
        set_nonblocking(a.as_fd()).unwrap();
        let (cancel, _peer) = UnixStream::pair().unwrap();
        assert_eq!(
            write_all(a.as_fd(), b"hello", cancel.as_fd()).unwrap(),
            Written::All
        );
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut &b, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }
}
