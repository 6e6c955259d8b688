//! Thin, checked wrappers over the fd syscalls the agent needs: `poll` with a
//! deadline, nonblocking `read`/`write` (and [`read_until_dry`]), a write
//! the stop signal cancels, and [`Blocking`], a nonblocking socket seen as a
//! blocking, cancellable stream (what `capsem_proto::conn`'s framed reader
//! and writer run on).
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

/// Reads a nonblocking `fd` into `buf` until it would block, ends, or `buf`
/// is full: what a PTY master has queued, which it hands out one line
/// discipline buffer (4 KiB) per read, as one chunk. The first read's error
/// is returned; a later one ends the chunk, and the next read reports it.
pub fn read_until_dry(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = read(fd, buf)?;
    while n > 0 && n < buf.len() {
        match read(fd, &mut buf[n..]) {
            Ok(m) if m > 0 => n += m,
            _ => break,
        }
    }
    Ok(n)
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

/// The error a [`Blocking`] read or write returns once its cancel fd is
/// readable (see [`is_cancelled`]).
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// Whether `e` is a [`Blocking`] stream's cancellation.
pub fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
}

/// A nonblocking fd as a blocking `Read + Write`: each call waits in a poll
/// that also watches `cancel` (then fails with [`Cancelled`]) and, when set,
/// `deadline` (then `TimedOut`). The cancel fd is checked before each call,
/// so a peer that floods data cannot keep a reader from seeing its stop.
#[derive(Debug, Clone, Copy)]
pub struct Blocking<'a> {
    fd: BorrowedFd<'a>,
    cancel: BorrowedFd<'a>,
    deadline: Option<Instant>,
}

impl<'a> Blocking<'a> {
    pub fn new(fd: BorrowedFd<'a>, cancel: BorrowedFd<'a>) -> Self {
        Self {
            fd,
            cancel,
            deadline: None,
        }
    }

    /// Calls fail with `TimedOut` once `deadline` passed.
    pub fn until(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Waits until the fd has `events`; errors if cancelled or overdue.
    fn wait(&self, events: i16) -> io::Result<()> {
        let mut fds = [pollfd(self.cancel, IN), pollfd(self.fd, events)];
        let n = poll(&mut fds, self.deadline)?;
        if ready(&fds[0]) {
            return Err(io::Error::other(Cancelled));
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        let mut fds = [pollfd(self.cancel, IN)];
        matches!(poll(&mut fds, Some(Instant::now())), Ok(n) if n > 0)
    }
}

impl io::Read for Blocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancelled() {
            return Err(io::Error::other(Cancelled));
        }
        loop {
            match read(self.fd, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(IN)?,
                other => return other,
            }
        }
    }
}

impl io::Write for Blocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cancelled() {
            return Err(io::Error::other(Cancelled));
        }
        loop {
            match write(self.fd, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(OUT)?,
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::time::Duration;

    /// A nonblocking socket with `parts` queued, one per read: a datagram
    /// socket hands out one datagram per read, as a PTY master hands out one
    /// line discipline buffer.
    fn queued(parts: &[&[u8]]) -> (UnixDatagram, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        set_nonblocking(a.as_fd()).unwrap();
        for part in parts {
            b.send(part).unwrap();
        }
        (a, b)
    }

    #[test]
    fn read_until_dry_gathers_every_queued_read() {
        let (a, _b) = queued(&[b"one ", b"two ", b"three"]);
        let mut buf = [0u8; 64];
        let n = read_until_dry(a.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"one two three");
        // Nothing queued: the first read's WouldBlock is the answer.
        let err = read_until_dry(a.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn read_until_dry_stops_at_a_full_buffer() {
        let (a, _b) = queued(&[b"abcd", b"efgh", b"ijkl"]);
        let mut buf = [0u8; 8];
        assert_eq!(read_until_dry(a.as_fd(), &mut buf).unwrap(), 8);
        assert_eq!(&buf, b"abcdefgh");
        assert_eq!(read_until_dry(a.as_fd(), &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"ijkl");
    }

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

    #[test]
    fn blocking_read_waits_for_data_and_sees_its_cancel() {
        use std::io::{Read, Write};
        let (a, b) = UnixStream::pair().unwrap();
        set_nonblocking(a.as_fd()).unwrap();
        let (cancel, cancel_peer) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            (&b).write_all(b"hi").unwrap();
            b
        });
        let mut buf = [0u8; 8];
        let mut io = Blocking::new(a.as_fd(), cancel.as_fd());
        assert_eq!(io.read(&mut buf).unwrap(), 2);
        let _b = writer.join().unwrap();
        let overdue = io.until(Some(Instant::now())).read(&mut buf).unwrap_err();
        assert_eq!(overdue.kind(), io::ErrorKind::TimedOut);
        (&cancel_peer).write_all(b"x").unwrap();
        let err = io.read(&mut buf).unwrap_err();
        assert!(is_cancelled(&err), "{err:?}");
        assert!(!is_cancelled(&overdue));
    }
}
