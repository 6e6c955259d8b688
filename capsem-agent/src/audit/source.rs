//! Where audit records come from: the kernel over netlink, or (for tests
//! and debugging, `CAPSEM_AUDIT=file:PATH`) a file or FIFO of auditd log
//! lines (`type=SYSCALL msg=audit(...): ...`). Both feed the same
//! [`Assembler`](super::parse::Assembler) with `(type, text)` pairs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::netlink::{Netlink, NetlinkError};
use super::parse;
use crate::fdio;

/// Longest line kept from a line source; a longer one is dropped.
const MAX_LINE: usize = 64 * 1024;
/// Reads per call, so that the reader sees its stop signal between them.
const READ_BATCH: usize = 64;

/// Errors of a record source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A file or FIFO of auditd log lines.
#[derive(Debug)]
pub struct Lines {
    path: PathBuf,
    file: File,
    partial: Vec<u8>,
    /// Dropping the rest of an over-long line.
    skipping: bool,
    /// A regular file was read to its end.
    done: bool,
}

impl Lines {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let mut opts = OpenOptions::new();
        opts.read(true).custom_flags(libc::O_NONBLOCK);
        // Opened read-write, a FIFO never reports EOF while writers come and
        // go, so the reader waits in poll instead of spinning on POLLHUP.
        if meta.file_type().is_fifo() {
            opts.write(true);
        }
        let file = opts.open(path).map_err(open_err)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            partial: Vec::new(),
            skipping: false,
            done: false,
        })
    }

    fn read_available(&mut self, f: &mut dyn FnMut(u16, &str)) -> Result<(), SourceError> {
        let mut buf = [0u8; 16 * 1024];
        for _ in 0..READ_BATCH {
            let n = match fdio::read(self.file.as_fd(), &mut buf) {
                Ok(0) => {
                    self.done = true;
                    let rest = std::mem::take(&mut self.partial);
                    self.line(&rest, f);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(source) => {
                    return Err(SourceError::Read {
                        path: self.path.clone(),
                        source,
                    })
                }
            };
            let mut chunk = &buf[..n];
            while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
                if self.skipping {
                    self.skipping = false;
                } else {
                    let mut line = std::mem::take(&mut self.partial);
                    line.extend_from_slice(&chunk[..nl]);
                    self.line(&line, f);
                }
                chunk = &chunk[nl + 1..];
            }
            if !self.skipping {
                self.partial.extend_from_slice(chunk);
                if self.partial.len() > MAX_LINE {
                    warn!(path = %self.path.display(), "audit line over {MAX_LINE} bytes dropped");
                    self.partial.clear();
                    self.skipping = true;
                }
            }
        }
        Ok(())
    }

    fn line(&self, line: &[u8], f: &mut dyn FnMut(u16, &str)) {
        let text = String::from_utf8_lossy(line);
        if let Some((kind, text)) = parse::log_line(&text) {
            f(kind, text);
        }
    }
}

/// A source of `(type, text)` audit records.
#[derive(Debug)]
pub enum Source {
    Netlink(Netlink),
    Lines(Lines),
}

impl Source {
    /// The fd to poll for more records; `None` once a regular file is read
    /// to its end.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Netlink(n) => Some(n.fd()),
            Self::Lines(l) => (!l.done).then(|| l.file.as_fd()),
        }
    }

    /// Hands every record available now to `f`, without blocking.
    pub fn read_available(&mut self, f: &mut dyn FnMut(u16, &str)) -> Result<(), SourceError> {
        match self {
            Self::Netlink(n) => Ok(n.read_available(f)?),
            Self::Lines(l) => l.read_available(f),
        }
    }

    /// Releases the source; the netlink one restores the kernel's audit
    /// configuration.
    pub fn close(self) {
        match self {
            Self::Netlink(n) => n.close(),
            Self::Lines(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn collect(src: &mut Source) -> Vec<(u16, String)> {
        let mut got = Vec::new();
        src.read_available(&mut |k, t| got.push((k, t.to_owned())))
            .unwrap();
        got
    }

    #[test]
    fn a_regular_file_is_read_to_its_end_then_not_polled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(
            &path,
            "type=SYSCALL msg=audit(1.000:1): arch=c000003e syscall=59\n\
             junk\n\
             type=EOE msg=audit(1.000:1): ",
        )
        .unwrap();
        let mut src = Source::Lines(Lines::open(&path).unwrap());
        assert!(src.fd().is_some());
        let got = collect(&mut src);
        assert_eq!(
            got,
            vec![
                (1300, "audit(1.000:1): arch=c000003e syscall=59".to_owned()),
                (1320, "audit(1.000:1): ".to_owned()),
            ]
        );
        assert!(src.fd().is_none());
    }

    #[test]
    fn a_fifo_delivers_lines_as_they_are_written_and_never_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut src = Source::Lines(Lines::open(&path).unwrap());
        let mut w = OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all(b"type=EOE msg=audit(1.000:1): \ntype=EOE msg=aud")
            .unwrap();
        assert_eq!(collect(&mut src).len(), 1);
        w.write_all(b"it(1.000:2): \n").unwrap();
        assert_eq!(
            collect(&mut src),
            vec![(1320, "audit(1.000:2): ".to_owned())]
        );
        // The writer leaving is not an end.
        drop(w);
        assert!(collect(&mut src).is_empty());
        assert!(src.fd().is_some());
    }

    #[test]
    fn an_over_long_line_is_dropped_and_the_next_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let long = format!(
            "type=EOE msg=audit(1.000:1): {}\n",
            "x".repeat(MAX_LINE * 2)
        );
        std::fs::write(&path, format!("{long}type=EOE msg=audit(1.000:2): \n")).unwrap();
        let mut src = Source::Lines(Lines::open(&path).unwrap());
        assert_eq!(
            collect(&mut src),
            vec![(1320, "audit(1.000:2): ".to_owned())]
        );
    }
}
