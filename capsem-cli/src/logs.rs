//! `capsem logs [--follow] [--source process|serial] NAME`: a VM's log on
//! stdout, byte for byte.
//!
//! `--source process` (the default) is `process.log`, capsem-process's own
//! events; `--source serial` is the guest console, `serial.log` for qemu
//! VMs or `agent.log` for `--vmm none` (from `vm.json`).
//!
//! `--follow` prints what is appended until the VM's capsem-process exits
//! (checked by identity, watched through a pidfd); when it is not running
//! the log is printed once, as without `--follow`. One poll set holds an
//! inotify fd (the log file and the VM directory), the pidfd, the signalfd
//! and stdout (to notice a reader that went away). The log is followed by
//! name: one that is replaced (renamed over, or deleted and created again)
//! is reopened, one that shrinks is read again from its start. It also
//! ends when the VM directory is removed. SIGINT ends it with exit 0,
//! SIGTERM and SIGHUP with 128 + N.

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

use crate::cli::LogSource;
use crate::persist::{Ctx, PersistError};
use crate::signals::{Signals, SignalsError};
use crate::vms::Vm;

/// Bytes read from the log per `pread`.
const CHUNK: usize = 64 * 1024;

/// Why printing a log failed.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("VM {name:?} has no {file} (yet): {path} does not exist")]
    Missing {
        name: String,
        file: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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

impl From<LogsError> for PersistError {
    fn from(e: LogsError) -> Self {
        let what = e.to_string();
        match e {
            LogsError::Signals(s) => PersistError::Signals(s),
            LogsError::Missing { source, .. }
            | LogsError::Open { source, .. }
            | LogsError::Read { source, .. }
            | LogsError::Write(source)
            | LogsError::Watch { source, .. }
            | LogsError::Poll(source) => PersistError::Io { what, source },
        }
    }
}

/// How `--follow` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// capsem-process exited; everything the log had then was printed.
    ProcessExited,
    /// The VM directory was removed or moved.
    DirGone,
    /// Stopped by a signal, with this exit code.
    Stopped(u8),
    /// Nobody reads stdout any more.
    OutputClosed,
}

/// What else ends `--follow`: readable fd, then asked whether to stop.
pub trait StopSource: AsFd {
    /// Called when the fd is readable: the exit code to stop with, or
    /// `None` to go on.
    fn stopped(&mut self) -> Result<Option<u8>, LogsError>;
}

impl StopSource for Signals {
    fn stopped(&mut self) -> Result<Option<u8>, LogsError> {
        for sig in self.drain()? {
            match sig {
                // Ctrl-C is how one ends `logs --follow`: not a failure.
                Signal::SIGINT => return Ok(Some(0)),
                Signal::SIGTERM | Signal::SIGHUP => {
                    return Ok(Some(crate::exit::from_signal(sig as i32)))
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The log file `source` names for `vm`.
pub fn log_file(vm: &Vm, source: LogSource) -> &'static str {
    match source {
        LogSource::Process => "process.log",
        LogSource::Serial => {
            let none = match &vm.config {
                Some(c) => c.vmm == "none",
                // No vm.json: whichever console log exists.
                None => vm.dir.join("agent.log").exists(),
            };
            if none {
                "agent.log"
            } else {
                "serial.log"
            }
        }
    }
}

/// Prints VM `name`'s log; exit code 0 (or 128 + N after signal N).
pub fn run(ctx: &Ctx, name: &str, follow: bool, source: LogSource) -> Result<u8, PersistError> {
    let vm = ctx.load(name)?;
    let file = log_file(&vm, source);
    let path = vm.dir.join(file);
    let missing = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            LogsError::Missing {
                name: name.into(),
                file,
                path: path.clone(),
                source,
            }
        } else {
            LogsError::Open {
                path: path.clone(),
                source,
            }
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let process = if follow {
        vm.process
            .as_ref()
            .filter(|p| p.alive())
            .and_then(|p| p.record.open_verified().ok())
    } else {
        None
    };
    let Some(pidfd) = process else {
        let mut log = File::open(&path).map_err(missing)?;
        return match io::copy(&mut log, &mut out).and_then(|_| out.flush()) {
            Ok(()) => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(0),
            Err(e) => Err(PersistError::Io {
                what: format!("cannot copy {} to stdout", path.display()),
                source: e,
            }),
        };
    };
    if !path.exists() {
        return Err(missing(io::Error::from(io::ErrorKind::NotFound)).into());
    }
    let mut signals = Signals::install()?;
    match follow_log(&path, &mut out, pidfd.as_fd(), &mut signals)? {
        End::Stopped(code) => Ok(code),
        End::ProcessExited | End::DirGone | End::OutputClosed => Ok(0),
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
    fn new(path: &'a Path) -> Result<Self, LogsError> {
        let watch_err = |source: Errno| LogsError::Watch {
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
            .map_err(|e| LogsError::Watch {
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
    fn open(&self) -> Result<Option<Current>, LogsError> {
        let file = match File::open(self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LogsError::Open {
                    path: self.path.into(),
                    source,
                })
            }
        };
        let meta = file.metadata().map_err(|source| LogsError::Read {
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
    fn sync(&mut self, out: &mut impl Write) -> Result<(), LogsError> {
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
                return Err(LogsError::Read {
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
    fn drain(&mut self, out: &mut impl Write) -> Result<(), LogsError> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        let read_err = |source| LogsError::Read {
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
            out.write_all(&self.buf[..n]).map_err(LogsError::Write)?;
            cur.offset += n as u64;
        }
        out.flush().map_err(LogsError::Write)
    }

    /// Reads the pending inotify events: whether any concerns the log, and
    /// whether the directory itself went away.
    fn events(&self) -> Result<(bool, bool), LogsError> {
        let mut relevant = false;
        let mut dir_gone = false;
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(Errno::EAGAIN) => return Ok((relevant, dir_gone)),
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(LogsError::Watch {
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
) -> Result<End, LogsError> {
    match follow_inner(path, out, process, stop) {
        Err(LogsError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(End::OutputClosed),
        other => other,
    }
}

fn follow_inner<W: Write + AsFd, S: StopSource>(
    path: &Path,
    out: &mut W,
    process: BorrowedFd<'_>,
    stop: &mut S,
) -> Result<End, LogsError> {
    let mut f = Follower::new(path)?;
    if f.current.is_none() {
        return Err(LogsError::Open {
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
                Err(e) => return Err(LogsError::Poll(e.into())),
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
    use crate::sweep::tests::{config, ctx, make_vm, Marked};
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
        fn stopped(&mut self) -> Result<Option<u8>, LogsError> {
            Ok(Some(0))
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
        result: std::sync::mpsc::Receiver<Result<End, LogsError>>,
    }

    impl Running {
        /// How it ended; fails the test if it runs on for 10 s.
        fn end(self) -> Result<End, LogsError> {
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
        assert_eq!(handle.end().unwrap(), End::Stopped(0));

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
    fn a_missing_log_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let process = Marked::spawn("capsem-process");
        let (_out, _stop, handle) = start(&d.path().join("nope.log"), &process);
        assert!(matches!(handle.end(), Err(LogsError::Open { .. })));

        let home = tempfile::tempdir().unwrap();
        make_vm(home.path(), "dev", Some(&config("dev", false, None)), None);
        let err = run(&ctx(home.path()), "dev", false, LogSource::Serial).unwrap_err();
        let text = crate::sweep::error_chain(&err);
        assert!(
            text.starts_with("VM \"dev\" has no agent.log (yet): ")
                && text.contains("agent.log does not exist"),
            "{text}"
        );
    }

    #[test]
    fn which_file() {
        let home = tempfile::tempdir().unwrap();
        let mut qemu = config("q", false, None);
        qemu.vmm = "qemu".into();
        make_vm(home.path(), "q", Some(&qemu), None);
        make_vm(home.path(), "n", Some(&config("n", false, None)), None);
        let bare = make_vm(home.path(), "tmp-00000000000000aa", None, None);
        let ctx = ctx(home.path());
        let load = |n: &str| ctx.load(n).unwrap();
        assert_eq!(log_file(&load("q"), LogSource::Serial), "serial.log");
        assert_eq!(log_file(&load("q"), LogSource::Process), "process.log");
        assert_eq!(log_file(&load("n"), LogSource::Serial), "agent.log");
        let id = "tmp-00000000000000aa";
        assert_eq!(log_file(&load(id), LogSource::Serial), "serial.log");
        std::fs::write(bare.join("agent.log"), b"").unwrap();
        assert_eq!(log_file(&load(id), LogSource::Serial), "agent.log");
    }

    #[test]
    fn prints_a_whole_log_without_follow() {
        let home = tempfile::tempdir().unwrap();
        let dir = make_vm(home.path(), "dev", Some(&config("dev", false, None)), None);
        std::fs::write(dir.join("process.log"), b"a\x00b\xff\n").unwrap();
        // Goes to the test's stdout; what matters is that it succeeds
        // without a running process, with or without --follow.
        assert_eq!(
            run(&ctx(home.path()), "dev", false, LogSource::Process).unwrap(),
            0
        );
        assert_eq!(
            run(&ctx(home.path()), "dev", true, LogSource::Process).unwrap(),
            0
        );
    }
}
