//! `pidfd_open(2)`: a process's exit as an fd to poll beside the others.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// An fd that becomes readable when process `pid` exits (reaped or not).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this fd (close-on-exec); we are its
    // only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_once_the_child_exits() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        child.wait().unwrap();
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, for the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
        assert_eq!(n, 1);
        assert!(pidfd_open(u32::MAX).is_err());
    }
}
