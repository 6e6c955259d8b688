//! `capsem cp`'s transport: one guest command over the exec channel
//! ([`guest_command`], what `capsem exec` uses) with its stdin read from an
//! fd and its stdout written to any writer, and the host's tar stream built
//! on a thread of its own ([`Packer`]) into a pipe that command reads.
//!
//! The guest's stderr is kept, bounded ([`STDERR_KEEP`]), for the one line
//! an error becomes; the rest is dropped.

use std::fs::File;
use std::io::{self, PipeReader, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use capsem_proto::ipc::ClientToProcess;

use crate::attach::Session;
use crate::cpplan::{CpError, SrcKind};
use crate::error::CliError;
use crate::exec_loop::{self, ExecEnd, Streams};
use crate::exit::{self, Exit};
use crate::signals::Signals;

/// Bytes of the guest command's stderr kept for its error line.
pub const STDERR_KEEP: usize = 4096;

/// A writer that keeps the first [`STDERR_KEEP`] bytes and drops the rest.
#[derive(Debug, Default)]
pub struct Kept(pub Vec<u8>);

impl Write for Kept {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = STDERR_KEEP.saturating_sub(self.0.len());
        self.0.extend_from_slice(&data[..data.len().min(room)]);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Kept {
    /// The first line that says something, without `tar: `'s prefix.
    pub fn line(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0);
        let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
        let line = line.strip_prefix("tar: ").unwrap_or(line);
        Some(crate::attach::one_line(line))
    }
}

/// How a guest command ended.
#[derive(Debug)]
pub struct Finished {
    pub exit: Exit,
    pub stderr: Kept,
}

/// Runs `argv` in the VM whose ctl.sock is `ctl` to its status.
pub fn guest_command(
    ctl: &Path,
    signals: &mut Signals,
    argv: Vec<String>,
    stdin: BorrowedFd<'_>,
    stdout: &mut dyn Write,
) -> Result<Finished, CliError> {
    capsem_proto::exec::check_start(&argv, &[], None, None)?;
    let request = ClientToProcess::Exec {
        argv,
        env: Vec::new(),
        workdir: None,
        timeout_ms: None,
        tty: None,
    };
    let mut session = Session::connect_with(ctl, &request)?;
    session.set_persistent();
    if let Some(sig) = session.await_attached(signals)? {
        return Ok(Finished {
            exit: exit::from_signal(sig as i32),
            stderr: Kept::default(),
        });
    }
    let mut stderr = Kept::default();
    let streams = Streams {
        stdin,
        stdout,
        stderr: &mut stderr,
        escapes: false,
    };
    match exec_loop::run_with(&mut session, signals, streams) {
        ExecEnd::Exited(exit) => Ok(Finished { exit, stderr }),
        ExecEnd::Lost(reason) => Err(CliError::SessionLost(reason)),
        // Not a terminal: no escapes are read.
        ExecEnd::Escaped => Err(CliError::SessionLost(crate::lost::Lost::Closed)),
    }
}

/// `/dev/null`, the stdin of a guest command that reads none.
pub fn null() -> Result<File, CliError> {
    File::open("/dev/null").map_err(|source| CliError::Io {
        what: "cannot open /dev/null".into(),
        source,
    })
}

/// The host's tar stream of one path, written by a named thread into a
/// pipe; [`Packer::reader`] is the guest command's stdin.
pub struct Packer {
    reader: Option<PipeReader>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Packer {
    /// Starts archiving `src` (a `kind` as its `symlink_metadata` says)
    /// under `name` (`.` for a directory's contents). Symlinks are archived
    /// as themselves, never followed.
    pub fn start(src: PathBuf, kind: SrcKind, name: String) -> Result<Self, CpError> {
        let (reader, writer) = io::pipe().map_err(CpError::Pack)?;
        let thread = std::thread::Builder::new()
            .name("cp-pack".into())
            .spawn(move || {
                let mut b = tar::Builder::new(writer);
                b.follow_symlinks(false);
                match kind {
                    SrcKind::Dir => b.append_dir_all(&name, &src)?,
                    SrcKind::NonDir => b.append_path_with_name(&src, &name)?,
                }
                b.into_inner()?.flush()
            })
            .map_err(CpError::Pack)?;
        Ok(Self {
            reader: Some(reader),
            thread: Some(thread),
        })
    }

    /// The stream's read end.
    pub fn reader(&self) -> Option<&PipeReader> {
        self.reader.as_ref()
    }

    /// Closes the read end (a writer still blocked on a full pipe gets
    /// EPIPE) and joins the thread: its result.
    pub fn finish(mut self) -> io::Result<()> {
        self.reader = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the tar writer panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        self.reader = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stderr_is_kept_bounded_and_read_as_one_line() {
        let mut k = Kept::default();
        k.write_all(b"\ntar: /x: Cannot stat: No such file or directory\ntar: Exiting\n")
            .unwrap();
        assert_eq!(
            k.line().unwrap(),
            "/x: Cannot stat: No such file or directory"
        );
        k.write_all(&vec![b'z'; 3 * STDERR_KEEP]).unwrap();
        assert_eq!(k.0.len(), STDERR_KEEP);
        assert_eq!(Kept::default().line(), None);
    }

    #[test]
    fn the_packer_archives_a_tree_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("x.sh"), b"echo").unwrap();
        std::fs::set_permissions(src.join("x.sh"), std::fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("l")).unwrap();
        let p = Packer::start(src, SrcKind::Dir, "top".into()).unwrap();
        let mut bytes = Vec::new();
        p.reader().unwrap().read_to_end(&mut bytes).unwrap();
        p.finish().unwrap();
        let mut names = Vec::new();
        for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            names.push((
                e.path().unwrap().display().to_string(),
                h.entry_type(),
                h.mode().unwrap() & 0o7777,
            ));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(names[0].0.trim_end_matches('/'), "top");
        assert!(names.contains(&("top/l".into(), tar::EntryType::Symlink, 0o777)));
        assert!(names.contains(&("top/x.sh".into(), tar::EntryType::Regular, 0o751)));
    }

    #[test]
    fn a_packer_whose_reader_goes_away_ends_with_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![1u8; 1 << 20]).unwrap();
        let p = Packer::start(big, SrcKind::NonDir, "big".into()).unwrap();
        assert!(p.finish().is_err());
    }
}
