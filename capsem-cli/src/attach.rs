//! The attached session on `<vm-dir>/ctl.sock`: the handshake and the poll
//! loop that bridges the user's terminal to the shell.
//!
//! One thread, one poll set: stdin, the ctl socket and the signalfd. Input
//! is queued in `out` and written as the socket accepts it; stdin is not read
//! while too much is queued, so a paste cannot deadlock against output.
//! Output is written to stdout with blocking writes, so a slow terminal
//! pushes back on capsem-process and from there on the shell.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsem_proto::frame::Client;
use capsem_proto::ipc::{ClientToProcess, ProcessToClient, MAX_IPC_CHUNK};
use capsem_proto::{Codec, FrameError};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::escape::{self, Escape, Scanner};
use crate::exit::{self, Exit};
use crate::lost::Lost;
use crate::signals::{Signals, SignalsError};
use crate::terminal;

/// Queued input above which stdin is not read.
const OUT_HIGH_WATER: usize = 4 * MAX_IPC_CHUNK;
/// How long a final `Shutdown` may take to send.
const SHUTDOWN_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Ctrl-C, sent when capsem receives SIGINT.
const CTRL_C: u8 = 0x03;
/// Ctrl-D, sent when a non-terminal stdin reaches EOF, then every
/// `CTRL_D_AGAIN` until the session ends (a pipe at EOF stays at EOF): one
/// that reaches the guest's tty while bash is still starting (canonical
/// mode) becomes an EOF marker that readline, in raw mode, reads as a NUL.
const CTRL_D: u8 = 0x04;
const CTRL_D_AGAIN: Duration = Duration::from_millis(500);

/// Errors before the session is attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot talk to capsem-process")]
    Io(#[source] io::Error),
    #[error("invalid message from capsem-process")]
    Frame(#[source] FrameError),
    #[error("capsem-process refused the attach: {0}")]
    Refused(String),
    #[error("capsem-process closed the connection before the attach was accepted")]
    Closed,
    #[error("capsem-process sent {0} before the attach was accepted")]
    Unexpected(&'static str),
    #[error("poll failed")]
    Poll(#[source] nix::Error),
    #[error(transparent)]
    Signals(#[from] SignalsError),
}

/// How an attached session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The shell exited; this is capsem's exit code.
    Exited(Exit),
    /// The session ended without an exit status.
    Lost(Lost),
    /// capsem received SIGHUP or SIGTERM; `Shutdown` was sent (a temporary
    /// VM) or the session was left (a persistent VM, which keeps running).
    Signalled(Signal),
    /// The user pressed the detach key (a persistent VM keeps running).
    Detached,
    /// The user typed `~.` at the start of a line: leave at once, nothing
    /// sent and nothing awaited (the guest may be wedged).
    Escaped,
}

/// Peer text made safe to print as part of one line.
pub(crate) fn one_line(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Appends `Input` frames for `data`, each at most [`MAX_IPC_CHUNK`] bytes.
pub fn encode_input(data: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    for chunk in data.chunks(MAX_IPC_CHUNK) {
        Codec::<Client>::encode_into(
            &ClientToProcess::Input {
                data: chunk.to_vec(),
            },
            out,
        )?;
    }
    Ok(())
}

/// A connection to capsem-process.
#[derive(Debug)]
pub struct Session {
    pub(crate) sock: UnixStream,
    pub(crate) codec: Codec<Client>,
    /// Encoded frames not yet written (whole frames, a prefix possibly sent).
    pub(crate) out: Vec<u8>,
    /// capsem-process stopped reading (EPIPE/ECONNRESET on a send): nothing
    /// more is sent, but what it sent before closing is still read, so its
    /// last word (an exit status, a reason) is not lost to the race.
    pub(crate) send_closed: bool,
    /// Attached to a persistent VM: Ctrl-] detaches, and nothing this side
    /// does (a signal, an error) shuts the VM down.
    pub(crate) persistent: bool,
}

/// What one poll round reported.
pub(crate) struct Events {
    pub stdin: bool,
    pub sock_in: bool,
    pub sock_out: bool,
    pub signal: bool,
}

impl Session {
    /// One poll round of a session loop (shell or exec): the socket (and
    /// its writability while output is queued), the signalfd, and stdin when
    /// `want_stdin`. `None` when interrupted: poll again.
    pub(crate) fn wait(
        &self,
        signals: &Signals,
        stdin: BorrowedFd<'_>,
        want_stdin: bool,
    ) -> Result<Option<Events>, Lost> {
        self.wait_until(signals, stdin, want_stdin, None)
    }

    /// [`Session::wait`] that also returns `Ok(None)` at `deadline`.
    pub(crate) fn wait_until(
        &self,
        signals: &Signals,
        stdin: BorrowedFd<'_>,
        want_stdin: bool,
        deadline: Option<Instant>,
    ) -> Result<Option<Events>, Lost> {
        let mut sock_events = PollFlags::POLLIN;
        if !self.out.is_empty() {
            sock_events |= PollFlags::POLLOUT;
        }
        let mut fds = vec![
            PollFd::new(self.sock.as_fd(), sock_events),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        if want_stdin {
            fds.push(PollFd::new(stdin, PollFlags::POLLIN));
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(at) => {
                let ms = at.saturating_duration_since(Instant::now()).as_millis();
                // Rounded up: waking a millisecond early would spin.
                PollTimeout::from((ms.min(60_000) as u16).saturating_add(1))
            }
        };
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(None),
            Err(e) => return Err(Lost::Poll(e)),
        }
        let rev = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .unwrap_or(PollFlags::empty())
        };
        let sock = rev(0);
        Ok(Some(Events {
            sock_in: sock.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR),
            sock_out: sock.contains(PollFlags::POLLOUT),
            signal: !rev(1).is_empty(),
            stdin: !rev(2).is_empty(),
        }))
    }

    /// Connects and sends `first` (`Attach`, or `Exec` for `capsem run`).
    pub fn connect_with(path: &Path, first: &ClientToProcess) -> Result<Self, AttachError> {
        let sock = UnixStream::connect(path).map_err(|source| AttachError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut session = Self {
            sock,
            codec: Codec::new(),
            out: Vec::new(),
            send_closed: false,
            persistent: false,
        };
        Codec::<Client>::encode_into(first, &mut session.out).map_err(AttachError::Frame)?;
        session
            .sock
            .write_all(&session.out)
            .map_err(AttachError::Io)?;
        session.out.clear();
        session
            .sock
            .set_nonblocking(true)
            .map_err(AttachError::Io)?;
        Ok(session)
    }

    /// Waits for `Attached`; `Some(signal)` if SIGHUP, SIGTERM or SIGINT
    /// came first.
    pub fn await_attached(&mut self, signals: &mut Signals) -> Result<Option<Signal>, AttachError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(msg) = self.codec.next_message().map_err(AttachError::Frame)? {
                return match msg {
                    ProcessToClient::Attached { .. } => Ok(None),
                    ProcessToClient::Error { message } => {
                        Err(AttachError::Refused(one_line(&message)))
                    }
                    ProcessToClient::SessionLost { reason } => {
                        Err(AttachError::Refused(one_line(&reason)))
                    }
                    ProcessToClient::Output { .. } | ProcessToClient::ExecOutput { .. } => {
                        Err(AttachError::Unexpected("output"))
                    }
                    ProcessToClient::ShellExited { .. } | ProcessToClient::ExecExit { .. } => {
                        Err(AttachError::Unexpected("an exit status"))
                    }
                    ProcessToClient::GuestUnresponsive { .. }
                    | ProcessToClient::GuestResponsive
                    | ProcessToClient::Status(_) => continue,
                };
            }
            let (sock_in, signal) = {
                let mut fds = [
                    PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
                    PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                ];
                match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(AttachError::Poll(e)),
                }
                let hit = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (hit(&fds[0]), hit(&fds[1]))
            };
            if signal {
                if let Some(sig) = signals
                    .drain()?
                    .into_iter()
                    .find(|s| *s != Signal::SIGWINCH)
                {
                    return Ok(Some(sig));
                }
            }
            if sock_in {
                match self.sock.read(&mut buf) {
                    Ok(0) => return Err(AttachError::Closed),
                    Ok(n) => self.codec.feed(&buf[..n]).map_err(AttachError::Frame)?,
                    Err(e) if is_transient(&e) => {}
                    Err(e) => return Err(AttachError::Io(e)),
                }
            }
        }
    }

    pub(crate) fn queue(&mut self, msg: &ClientToProcess) -> Result<(), Lost> {
        Codec::<Client>::encode_into(msg, &mut self.out).map_err(Lost::Encode)
    }

    fn queue_input(&mut self, data: &[u8]) -> Result<(), Lost> {
        encode_input(data, &mut self.out).map_err(Lost::EncodeInput)
    }

    /// Writes queued frames until the socket would block.
    /// Reads what capsem-process sent into the codec. `Ok(Some(reason))`:
    /// the connection ended (EOF, or ECONNRESET: it closed with our bytes
    /// unread, and everything it sent was read first) or broke; the
    /// session is lost. `Err`: it sent an invalid frame.
    pub(crate) fn read_from_process(&mut self, buf: &mut [u8]) -> Result<Option<Lost>, Lost> {
        let read = match self.sock.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(0),
            other => other,
        };
        match read {
            Ok(0) => Ok(Some(match self.codec.finish() {
                Ok(()) => Lost::Closed,
                Err(e) => Lost::ClosedMidFrame(e),
            })),
            Ok(n) => {
                self.codec.feed(&buf[..n]).map_err(Lost::Invalid)?;
                Ok(None)
            }
            Err(e) if is_transient(&e) => Ok(None),
            Err(e) => Ok(Some(Lost::Read(e))),
        }
    }

    pub(crate) fn flush_nonblocking(&mut self) -> Result<(), Lost> {
        if self.send_closed {
            self.out.clear();
        }
        while !self.out.is_empty() {
            match self.sock.write(&self.out) {
                Ok(0) => return Err(Lost::StoppedReading),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if is_transient(&e) => return Ok(()),
                Err(e) if peer_closed(&e) => {
                    self.send_closed = true;
                    self.out.clear();
                }
                Err(e) => return Err(Lost::Send(e)),
            }
        }
        Ok(())
    }

    /// Best effort: finishes queued frames and sends `Shutdown`, bounded by
    /// a send timeout (capsem-process is killed later if it never reads).
    pub fn shutdown(&mut self) {
        if self.persistent {
            // Leaving is enough: the VM outlives its clients.
            self.flush_before_leaving();
            return;
        }
        let _ = self.queue(&ClientToProcess::Shutdown);
        let _ = self.sock.set_nonblocking(false);
        let _ = self.sock.set_write_timeout(Some(SHUTDOWN_SEND_TIMEOUT));
        let _ = self.sock.write_all(&self.out);
        self.out.clear();
    }

    /// Marks this session as attached to a persistent VM (see the field).
    pub fn set_persistent(&mut self) {
        self.persistent = true;
    }

    /// Writes what is queued (keystrokes typed before a detach), bounded by
    /// the send timeout.
    fn flush_before_leaving(&mut self) {
        let _ = self.sock.set_nonblocking(false);
        let _ = self.sock.set_write_timeout(Some(SHUTDOWN_SEND_TIMEOUT));
        let _ = self.sock.write_all(&self.out);
        self.out.clear();
    }

    /// Bridges stdin/stdout to the shell until it exits, the session is
    /// lost, or capsem is told to stop.
    pub fn run(&mut self, stdin_tty: bool, signals: &mut Signals) -> SessionEnd {
        match self.run_inner(stdin_tty, signals) {
            Ok(end) => end,
            Err(reason) => {
                // A failure on our side: the VM must not outlive us.
                self.shutdown();
                SessionEnd::Lost(reason)
            }
        }
    }

    fn run_inner(&mut self, stdin_tty: bool, signals: &mut Signals) -> Result<SessionEnd, Lost> {
        let stdin = io::stdin();
        let mut stdout = io::stdout().lock();
        let mut reading_stdin = true;
        // When to send a non-terminal stdin's Ctrl-D again (CTRL_D_AGAIN).
        let mut ctrl_d_again: Option<Instant> = None;
        let mut unresponsive = false;
        let mut size = terminal::window_size(stdin.as_fd());
        let mut buf = vec![0u8; MAX_IPC_CHUNK];
        // Escapes only from a person at a terminal, as ssh does.
        let mut escapes = stdin_tty.then(|| Scanner::new(self.persistent));
        loop {
            // Messages already decoded come first: output before status.
            let mut wrote = false;
            while let Some(msg) = self.codec.next_message().map_err(Lost::Invalid)? {
                match msg {
                    ProcessToClient::Output { data } => {
                        stdout.write_all(&data).map_err(Lost::Stdout)?;
                        wrote = true;
                    }
                    ProcessToClient::ShellExited { exit_code, signal } => {
                        stdout.flush().map_err(Lost::Stdout)?;
                        return Ok(match exit::from_shell(exit_code, signal) {
                            Some(code) => SessionEnd::Exited(code),
                            None => SessionEnd::Lost(Lost::NoShellStatus),
                        });
                    }
                    ProcessToClient::SessionLost { reason } => {
                        let _ = stdout.flush();
                        return Ok(SessionEnd::Lost(Lost::Reported(one_line(&reason))));
                    }
                    ProcessToClient::GuestUnresponsive { .. } => {
                        if !unresponsive {
                            let _ = stdout.flush();
                            note("guest not responding");
                            unresponsive = true;
                        }
                    }
                    ProcessToClient::GuestResponsive => {
                        if unresponsive {
                            let _ = stdout.flush();
                            note("guest responding again");
                            unresponsive = false;
                        }
                    }
                    ProcessToClient::Error { message } => {
                        let _ = stdout.flush();
                        note(&one_line(&message));
                    }
                    // Exec messages belong to `capsem run`, never to a shell.
                    ProcessToClient::Attached { .. }
                    | ProcessToClient::Status(_)
                    | ProcessToClient::ExecOutput { .. }
                    | ProcessToClient::ExecExit { .. } => {}
                }
            }
            if wrote {
                stdout.flush().map_err(Lost::Stdout)?;
            }

            if let Some(at) = ctrl_d_again.filter(|at| Instant::now() >= *at) {
                self.queue_input(&[CTRL_D])?;
                ctrl_d_again = Some(at + CTRL_D_AGAIN);
            }
            let want_stdin = reading_stdin && !self.send_closed && self.out.len() < OUT_HIGH_WATER;
            let Some(Events {
                stdin: stdin_ready,
                sock_in,
                sock_out,
                signal,
            }) = self.wait_until(signals, stdin.as_fd(), want_stdin, ctrl_d_again)?
            else {
                continue;
            };

            if signal {
                for sig in signals.drain()? {
                    match sig {
                        Signal::SIGWINCH => {
                            let now = terminal::window_size(stdin.as_fd());
                            if let (true, Some((cols, rows))) = (now != size, now) {
                                size = now;
                                self.queue(&ClientToProcess::Resize { cols, rows })?;
                            }
                        }
                        // Not generated by a raw terminal; from `kill -INT`
                        // or a cooked terminal: the shell gets its Ctrl-C.
                        Signal::SIGINT => self.queue_input(&[CTRL_C])?,
                        other => {
                            self.shutdown();
                            return Ok(SessionEnd::Signalled(other));
                        }
                    }
                }
            }

            if stdin_ready {
                // Straight from the fd: a buffered reader could hold bytes
                // that poll would never report.
                let n = match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                    Ok(n) => Some(n),
                    Err(Errno::EAGAIN | Errno::EINTR) => None,
                    // An unreadable stdin ends like a closed one.
                    Err(_) => Some(0),
                };
                match n {
                    Some(0) => {
                        reading_stdin = false;
                        if !stdin_tty {
                            self.queue_input(&[CTRL_D])?;
                            ctrl_d_again = Some(Instant::now() + CTRL_D_AGAIN);
                        }
                    }
                    Some(n) => {
                        if let Some(end) = self.take_input(&buf[..n], escapes.as_mut())? {
                            return Ok(end);
                        }
                    }
                    None => {}
                }
            }

            if sock_in {
                if let Some(reason) = self.read_from_process(&mut buf)? {
                    let _ = stdout.flush();
                    return Ok(SessionEnd::Lost(reason));
                }
            }

            if sock_out || !self.out.is_empty() {
                self.flush_nonblocking()?;
            }
        }
    }
}

impl Session {
    /// Queues keystrokes from stdin, acting on the escapes `escapes` finds
    /// (none when stdin is not a terminal). `Some` ends the session.
    fn take_input(
        &mut self,
        data: &[u8],
        escapes: Option<&mut Scanner>,
    ) -> Result<Option<SessionEnd>, Lost> {
        let Some(scanner) = escapes else {
            self.queue_input(data)?;
            return Ok(None);
        };
        let mut send = Vec::with_capacity(data.len() + 1);
        let mut rest = data;
        while !rest.is_empty() {
            let (used, found) = scanner.scan(rest, &mut send);
            rest = &rest[used..];
            match found {
                None => {}
                Some(Escape::Help) => escape::print_help(),
                Some(Escape::Detach) => {
                    self.queue_input(&send)?;
                    self.flush_before_leaving();
                    return Ok(Some(SessionEnd::Detached));
                }
                // Nothing more is sent: a wedged peer must not hold us.
                Some(Escape::Disconnect) => {
                    self.out.clear();
                    return Ok(Some(SessionEnd::Escaped));
                }
            }
        }
        self.queue_input(&send)?;
        Ok(None)
    }
}

/// The peer closed its end (a send got EPIPE or ECONNRESET).
pub(crate) fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// A note on stderr that reads well in a raw terminal too.
fn note(text: &str) {
    let mut err = io::stderr().lock();
    let _ = write!(err, "\r\ncapsem: {text}\r\n");
    let _ = err.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_proto::frame::Process;

    #[test]
    fn input_is_chunked() {
        let data: Vec<u8> = (0..(MAX_IPC_CHUNK * 2 + 17)).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode_input(&data, &mut out).unwrap();
        let mut process = Codec::<Process>::new();
        process.feed(&out).unwrap();
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(msg) = process.next_message().unwrap() {
            let ClientToProcess::Input { data } = msg else {
                panic!("not input: {msg:?}");
            };
            assert!(!data.is_empty() && data.len() <= MAX_IPC_CHUNK);
            got.extend_from_slice(&data);
            chunks += 1;
        }
        assert_eq!(chunks, 3);
        assert_eq!(got, data);
    }

    #[test]
    fn peer_text_is_one_line() {
        assert_eq!(one_line(" agent\ndied\x1b \n"), "agent died ");
    }
}
