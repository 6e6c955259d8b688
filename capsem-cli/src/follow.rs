//! Following a file by name until a process exits: what `capsem logs
//! --follow` and `capsem audit --follow` share.
//!
//! One poll set holds an inotify fd (the file and its directory), the
//! process's pidfd, a [`StopSource`] (the signalfd) and the output (to
//! notice a reader that went away). A file that is replaced (renamed over,
//! or deleted and created again) is reopened, one that shrinks is read
//! again from its start. It also ends when the directory is removed.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::Signal;

use crate::exit::{self, Exit};
use crate::signals::{Signals, SignalsError};

/// Bytes read from the file per `pread`.
const CHUNK: usize = 64 * 1024;

/// Why following a file failed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
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
    #[error("cannot write to stdout")]
    Write(#[source] io::Error),
    #[error("cannot watch {path} (inotify)")]
    Watch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("poll failed")]
    Poll(#[source] io::Error),
    #[error(transparent)]
    Signals(#[from] SignalsError),
}

/// How `--follow` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// capsem-process exited; everything the log had then was printed.
    ProcessExited,
    /// The VM directory was removed or moved.
    DirGone,
    /// Stopped by a signal, with this exit code.
    Stopped(Exit),
    /// Nobody reads stdout any more.
    OutputClosed,
}

/// What else ends `--follow`: readable fd, then asked whether to stop.
pub trait StopSource: AsFd {
    /// Called when the fd is readable: how to exit when stopping, or
    /// `None` to go on.
    fn stopped(&mut self) -> Result<Option<Exit>, FollowError>;
}

impl StopSource for Signals {
    fn stopped(&mut self) -> Result<Option<Exit>, FollowError> {
        for sig in self.drain()? {
            match sig {
                // Ctrl-C is how one ends `logs --follow`: not a failure.
                Signal::SIGINT => return Ok(Some(Exit::OK)),
                Signal::SIGTERM | Signal::SIGHUP => return Ok(Some(exit::from_signal(sig as i32))),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The log file being followed.
#[derive(Debug)]
struct Current {
    file: File,
    dev: u64,
    ino: u64,
    /// How much of it was printed.
    offset: u64,
    wd: Option<WatchDescriptor>,
}

/// Follows `path` through replacements and truncations.
struct Follower<'a> {
    path: &'a Path,
    name: OsString,
    inotify: Inotify,
    dir_wd: WatchDescriptor,
    current: Option<Current>,
    buf: Vec<u8>,
}

impl<'a> Follower<'a> {
    /// Watches the directory first, then opens the file: a replacement
    /// between the two is still seen.
    fn new(path: &'a Path) -> Result<Self, FollowError> {
        let watch_err = |source: Errno| FollowError::Watch {
            path: path.into(),
            source: source.into(),
        };
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(watch_err)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let dir_wd = inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_ONLYDIR,
            )
            .map_err(|e| FollowError::Watch {
                path: dir.into(),
                source: e.into(),
            })?;
        let mut follower = Self {
            path,
            name: path.file_name().unwrap_or_default().to_owned(),
            inotify,
            dir_wd,
            current: None,
            buf: vec![0; CHUNK],
        };
        follower.current = follower.open()?;
        Ok(follower)
    }

    /// Opens the file at `path` and watches it; `None` when there is none.
    fn open(&self) -> Result<Option<Current>, FollowError> {
        let file = match File::open(self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FollowError::Open {
                    path: self.path.into(),
                    source,
                })
            }
        };
        let meta = file.metadata().map_err(|source| FollowError::Read {
            path: self.path.into(),
            source,
        })?;
        // By name: if it was replaced meanwhile, the directory watch has
        // reported that and the next sync switches to the new file.
        let wd = self
            .inotify
            .add_watch(
                self.path,
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_ATTRIB
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_DELETE_SELF,
            )
            .ok();
        Ok(Some(Current {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            offset: 0,
            wd,
        }))
    }

    /// Prints what the current file has beyond what was printed, then
    /// switches to a file that replaced it at `path` (printing that too).
    fn sync(&mut self, out: &mut impl Write) -> Result<(), FollowError> {
        self.drain(out)?;
        let meta = match std::fs::metadata(self.path) {
            Ok(m) => m,
            // Gone from the name (drained above): let it go, until a file
            // appears under the name again. Holding it would also pin the
            // directory, whose removal would then never be reported.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.close();
                return Ok(());
            }
            Err(source) => {
                return Err(FollowError::Read {
                    path: self.path.into(),
                    source,
                })
            }
        };
        let same = self
            .current
            .as_ref()
            .is_some_and(|c| c.dev == meta.dev() && c.ino == meta.ino());
        if !same {
            // Old watch first: the new file must get a watch of its own.
            self.close();
            self.current = self.open()?;
            self.drain(out)?;
        }
        Ok(())
    }

    /// Stops following the current file.
    fn close(&mut self) {
        if let Some(wd) = self.current.take().and_then(|c| c.wd) {
            // EINVAL when the kernel dropped the watch already.
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// Prints the current file from the offset to its end.
    fn drain(&mut self, out: &mut impl Write) -> Result<(), FollowError> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        let read_err = |source| FollowError::Read {
            path: self.path.into(),
            source,
        };
        let len = cur.file.metadata().map_err(read_err)?.len();
        if len < cur.offset {
            eprintln!(
                "capsem: {} was truncated; following it from its start",
                self.path.display()
            );
            cur.offset = 0;
        }
        loop {
            let n = match cur.file.read_at(&mut self.buf, cur.offset) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(e)),
            };
            out.write_all(&self.buf[..n]).map_err(FollowError::Write)?;
            cur.offset += n as u64;
        }
        out.flush().map_err(FollowError::Write)
    }

    /// Reads the pending inotify events: whether any concerns the log, and
    /// whether the directory itself went away.
    fn events(&self) -> Result<(bool, bool), FollowError> {
        let mut relevant = false;
        let mut dir_gone = false;
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(Errno::EAGAIN) => return Ok((relevant, dir_gone)),
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(FollowError::Watch {
                        path: self.path.into(),
                        source: e.into(),
                    })
                }
            };
            for ev in events {
                if ev.wd == self.dir_wd
                    && ev.mask.intersects(
                        AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_MOVE_SELF
                            | AddWatchFlags::IN_IGNORED
                            | AddWatchFlags::IN_UNMOUNT,
                    )
                {
                    dir_gone = true;
                }
                // Other files of the VM directory come and go all the time.
                if ev.name.as_ref().is_none_or(|n| *n == self.name) {
                    relevant = true;
                }
            }
        }
    }
}

/// Prints the log at `path` and then what is appended to it, until the
/// process behind `process` (a pidfd) exits, the directory goes away, `out`
/// loses its reader, or `stop` says so.
pub fn follow_log<W: Write + AsFd, S: StopSource>(
    path: &Path,
    out: &mut W,
    process: BorrowedFd<'_>,
    stop: &mut S,
) -> Result<End, FollowError> {
    match follow_inner(path, out, process, stop) {
        Err(FollowError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            Ok(End::OutputClosed)
        }
        other => other,
    }
}

fn follow_inner<W: Write + AsFd, S: StopSource>(
    path: &Path,
    out: &mut W,
    process: BorrowedFd<'_>,
    stop: &mut S,
) -> Result<End, FollowError> {
    let mut f = Follower::new(path)?;
    if f.current.is_none() {
        return Err(FollowError::Open {
            path: path.into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    f.drain(out)?;
    loop {
        let (watch, exited, stopping, closed) = {
            let mut fds = [
                PollFd::new(f.inotify.as_fd(), PollFlags::POLLIN),
                PollFd::new(process, PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                // No events asked: POLLERR/POLLHUP when the reader is gone.
                PollFd::new(out.as_fd(), PollFlags::empty()),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(FollowError::Poll(e.into())),
            }
            let ready = |i: usize| fds[i].any().unwrap_or(false);
            (ready(0), ready(1), ready(2), ready(3))
        };
        if stopping {
            if let Some(code) = stop.stopped()? {
                return Ok(End::Stopped(code));
            }
        }
        let (relevant, dir_gone) = if watch { f.events()? } else { (false, false) };
        if relevant || exited || dir_gone {
            f.sync(out)?;
        }
        if exited {
            return Ok(End::ProcessExited);
        }
        if dir_gone {
            return Ok(End::DirGone);
        }
        if closed {
            return Ok(End::OutputClosed);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::Marked;
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::time::{Duration, Instant};

    /// Stops when its pipe is readable, with exit code 0.
    pub(crate) struct PipeStop(pub(crate) OwnedFd);

    impl AsFd for PipeStop {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.0.as_fd()
        }
    }

    impl StopSource for PipeStop {
        fn stopped(&mut self) -> Result<Option<Exit>, FollowError> {
            Ok(Some(Exit::OK))
        }
    }

    /// Reads exactly `want` from `r`, failing after 10 s without it.
    pub(crate) fn expect(r: &mut File, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let n = nix::poll::poll(&mut fds, PollTimeout::from(ms)).unwrap();
            assert!(n > 0, "timed out waiting for {want:?}; got {got:?}");
            let mut buf = vec![0; want.len() - got.len()];
            let k = r.read(&mut buf).unwrap();
            assert!(k > 0, "EOF waiting for {want:?}; got {got:?}");
            got.extend_from_slice(&buf[..k]);
        }
        assert_eq!(String::from_utf8_lossy(&got), want);
    }

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (File::from(r), File::from(w))
    }

    /// A follower running in a thread.
    struct Running {
        handle: std::thread::JoinHandle<()>,
        result: std::sync::mpsc::Receiver<Result<End, FollowError>>,
    }

    impl Running {
        /// How it ended; fails the test if it runs on for 10 s.
        fn end(self) -> Result<End, FollowError> {
            let r = self
                .result
                .recv_timeout(Duration::from_secs(10))
                .expect("the follower did not end");
            self.handle.join().unwrap();
            r
        }
    }

    /// Starts following `path` in a thread, output to a pipe: the output's
    /// read end, the stop pipe's write end, the thread.
    fn start(path: &Path, process: &Marked) -> (File, File, Running) {
        let (out_r, mut out_w) = pipe();
        let (stop_r, stop_w) = pipe();
        let pidfd = capsem_host::pidfd::pidfd_open(process.child.id()).unwrap();
        let path = path.to_path_buf();
        let (tx, result) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("follow-test".into())
            .spawn(move || {
                let mut stop = PipeStop(stop_r.into());
                let _ = tx.send(follow_log(&path, &mut out_w, pidfd.as_fd(), &mut stop));
            })
            .unwrap();
        (out_r, stop_w, Running { handle, result })
    }

    fn append(path: &Path, data: &str) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(data.as_bytes()).unwrap();
    }

    #[test]
    fn follows_appends_truncation_and_replacement_until_the_process_exits() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("process.log");
        std::fs::write(&path, "one\n").unwrap();
        let mut process = Marked::spawn("capsem-process");
        let (mut out, _stop, handle) = start(&path, &process);
        expect(&mut out, "one\n");
        append(&path, "two\n");
        expect(&mut out, "two\n");
        // Truncated and rewritten shorter: read again from the start.
        std::fs::write(&path, "3\n").unwrap();
        expect(&mut out, "3\n");
        // Replaced by a rename.
        let tmp = d.path().join("process.log.tmp");
        std::fs::write(&tmp, "four\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        expect(&mut out, "four\n");
        // Deleted, then created again.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "five\n").unwrap();
        expect(&mut out, "five\n");
        // Unrelated files in the directory print nothing.
        std::fs::write(d.path().join("status.json"), "{}").unwrap();
        // Written just before the process ends: still printed.
        append(&path, "last\n");
        process.finish();
        assert_eq!(handle.end().unwrap(), End::ProcessExited);
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).unwrap();
        assert_eq!(String::from_utf8_lossy(&rest), "last\n");
    }

    #[test]
    fn a_stop_event_or_a_closed_output_ends_it() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("serial.log");
        std::fs::write(&path, "boot\n").unwrap();
        let mut process = Marked::spawn("capsem-process");

        let (mut out, mut stop, handle) = start(&path, &process);
        expect(&mut out, "boot\n");
        stop.write_all(b"x").unwrap();
        assert_eq!(handle.end().unwrap(), End::Stopped(Exit::OK));

        let (out, _stop, handle) = start(&path, &process);
        drop(out);
        assert_eq!(handle.end().unwrap(), End::OutputClosed);

        // The directory removed (`rm` of the VM).
        let (mut out, _stop, handle) = start(&path, &process);
        expect(&mut out, "boot\n");
        std::fs::remove_dir_all(d.path()).unwrap();
        assert_eq!(handle.end().unwrap(), End::DirGone);
        assert!(process.running());
        process.finish();
    }

    #[test]
    fn a_missing_file_is_an_open_error() {
        let d = tempfile::tempdir().unwrap();
        let process = Marked::spawn("capsem-process");
        let (_out, _stop, handle) = start(&d.path().join("nope.log"), &process);
        assert!(matches!(handle.end(), Err(FollowError::Open { .. })));
    }
}
