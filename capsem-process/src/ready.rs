//! The ready fd: an inherited pipe that receives exactly one line,
//! `ready\n` or `error: <reason>\n`, and is then closed.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("--ready-fd {fd} is not an open file descriptor")]
    NotOpen {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
}

#[derive(Debug, Default)]
pub struct ReadyFd(Option<File>);

impl ReadyFd {
    /// Takes ownership of the inherited fd `fd` and marks it close-on-exec,
    /// so no child of ours inherits it (its EOF must mean we closed it).
    pub fn adopt(fd: RawFd) -> Result<Self, ReadyError> {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(|source| ReadyError::NotOpen { fd, source })?;
        // SAFETY: the fd is open (F_SETFD succeeded), was handed to us by our
        // parent for our exclusive use, and is adopted exactly once, here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self(Some(File::from(owned))))
    }

    /// Whether the line was not written yet.
    pub fn pending(&self) -> bool {
        self.0.is_some()
    }

    fn send(&mut self, line: &str) -> io::Result<()> {
        match self.0.take() {
            Some(mut f) => f.write_all(line.as_bytes()),
            None => Ok(()),
        }
    }

    /// Writes `ready\n` and closes the fd.
    pub fn ready(&mut self) -> io::Result<()> {
        self.send("ready\n")
    }

    /// Writes `error: <reason>\n` (on one line) and closes the fd.
    pub fn error(&mut self, reason: &str) -> io::Result<()> {
        let reason = reason.replace(['\n', '\r'], " ");
        self.send(&format!("error: {reason}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::IntoRawFd;

    #[test]
    fn writes_one_line_then_closes() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut ready = ReadyFd::adopt(w.into_raw_fd()).unwrap();
        assert!(ready.pending());
        ready.error("boom\nsecond").unwrap();
        ready.ready().unwrap();
        assert!(!ready.pending());
        let mut got = String::new();
        File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "error: boom second\n");
    }

    #[test]
    fn refuses_a_closed_fd() {
        assert!(ReadyFd::adopt(987_654).is_err());
    }
}
