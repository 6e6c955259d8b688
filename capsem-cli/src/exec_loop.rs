//! The `capsem run` poll loop: stdin → `ExecStdin`/`ExecStdinEof`,
//! `ExecOutput` → stdout or stderr byte for byte, `ExecExit` → exit code.
//!
//! [`run`] bridges capsem's own stdin, stdout and stderr; [`run_with`]
//! any [`Streams`] (`capsem cp` feeds and drains tar streams through it).
//! With `-t` on a terminal the ssh escapes of [`crate::escape`] are read
//! from stdin: `~.` ends the loop at once with [`ExecEnd::Escaped`],
//! nothing more sent and nothing awaited.
//!
//! One thread, one poll set (the ctl socket, the signalfd, stdin until its
//! EOF). Output is written with blocking writes, so a slow reader of
//! capsem's stdout pushes back on the guest. The first SIGINT, SIGTERM or
//! SIGHUP asks the guest to SIGTERM the command's process group (SIGKILL
//! follows after a grace period there) and the status is still awaited; a
//! second one gives up and shuts the VM down.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use capsem_proto::exec::{ExecStream, MAX_EXEC_CHUNK};
use capsem_proto::ipc::{ClientToProcess, ProcessToClient};
use nix::errno::Errno;
use nix::sys::signal::Signal;

use crate::attach::{one_line, Events, Session};
use crate::escape::{self, Escape, Scanner};
use crate::exit::{self, Exit};
use crate::lost::Lost;
use crate::signals::Signals;

/// Queued stdin above which stdin is not read.
const OUT_HIGH_WATER: usize = 4 * MAX_EXEC_CHUNK;

/// How the command ended for capsem.
#[derive(Debug)]
pub enum ExecEnd {
    /// capsem's exit code.
    Exited(Exit),
    /// The session ended without a status.
    Lost(Lost),
    /// `~.` typed at the start of a line: leave now (`run -t` destroys
    /// the VM, `exec -t` leaves it running).
    Escaped,
}

/// The exit for an `ExecExit`; `None` when it carries no usable status.
pub fn exit_code(exit_code: Option<i32>, signal: Option<i32>, timed_out: bool) -> Option<Exit> {
    if timed_out {
        return Some(Exit::TimedOut);
    }
    exit::from_shell(exit_code, signal)
}

/// Writes one output chunk; a closed stdout or stderr (EPIPE) only discards
/// what follows on that stream, the status is still awaited.
fn write_stream(open: &mut bool, w: &mut dyn Write, data: &[u8]) {
    if !*open {
        return;
    }
    if w.write_all(data).and_then(|()| w.flush()).is_err() {
        *open = false;
    }
}

/// Where a command's input comes from and its output goes.
pub struct Streams<'a> {
    /// Read (after poll reports it readable) until EOF, then `ExecStdinEof`.
    pub stdin: BorrowedFd<'a>,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
    /// stdin is the user's terminal (`-t`): look for `~.` and `~?`.
    pub escapes: bool,
}

/// Runs the command's session to its status on capsem's own streams;
/// `escapes` when stdin is a terminal in raw mode (`-t`).
pub fn run(session: &mut Session, signals: &mut Signals, escapes: bool) -> ExecEnd {
    let stdin = io::stdin();
    let mut stdout = io::stdout().lock();
    let mut stderr = io::stderr().lock();
    let streams = Streams {
        stdin: stdin.as_fd(),
        stdout: &mut stdout,
        stderr: &mut stderr,
        escapes,
    };
    run_with(session, signals, streams)
}

/// Runs the command's session to its status on `streams`.
pub fn run_with(session: &mut Session, signals: &mut Signals, streams: Streams<'_>) -> ExecEnd {
    match run_inner(session, signals, streams) {
        Ok(end) => end,
        Err(reason) => {
            session.shutdown();
            ExecEnd::Lost(reason)
        }
    }
}

fn run_inner(
    session: &mut Session,
    signals: &mut Signals,
    streams: Streams<'_>,
) -> Result<ExecEnd, Lost> {
    let Streams {
        stdin,
        stdout,
        stderr,
        escapes,
    } = streams;
    let mut scanner = escapes.then(|| Scanner::new(false));
    let (mut out_open, mut err_open) = (true, true);
    let mut reading_stdin = true;
    let mut stopping: Option<Signal> = None;
    let mut buf = vec![0u8; MAX_EXEC_CHUNK];
    loop {
        while let Some(msg) = session.codec.next_message().map_err(Lost::Invalid)? {
            match msg {
                ProcessToClient::ExecOutput {
                    stream: ExecStream::Stdout,
                    data,
                } => write_stream(&mut out_open, stdout, &data),
                ProcessToClient::ExecOutput {
                    stream: ExecStream::Stderr,
                    data,
                } => write_stream(&mut err_open, stderr, &data),
                ProcessToClient::ExecExit {
                    exit_code: code,
                    signal,
                    timed_out,
                } => {
                    if let Some(sig) = stopping {
                        return Ok(ExecEnd::Exited(exit::from_signal(sig as i32)));
                    }
                    return Ok(match exit_code(code, signal, timed_out) {
                        Some(code) => ExecEnd::Exited(code),
                        None => ExecEnd::Lost(Lost::NoCommandStatus),
                    });
                }
                ProcessToClient::SessionLost { reason } => {
                    return Ok(ExecEnd::Lost(Lost::Reported(one_line(&reason))));
                }
                ProcessToClient::Error { message } => {
                    return Ok(ExecEnd::Lost(Lost::Reported(one_line(&message))));
                }
                // Heartbeat notes would corrupt the command's stderr.
                ProcessToClient::GuestUnresponsive { .. }
                | ProcessToClient::GuestResponsive
                | ProcessToClient::Attached { .. }
                | ProcessToClient::Status(_)
                | ProcessToClient::Output { .. }
                | ProcessToClient::ShellExited { .. } => {}
            }
        }

        let want_stdin =
            reading_stdin && !session.send_closed && session.out.len() < OUT_HIGH_WATER;
        let Some(Events {
            stdin: stdin_ready,
            sock_in,
            sock_out,
            signal,
        }) = session.wait(signals, stdin, want_stdin)?
        else {
            continue;
        };

        if signal {
            for sig in signals.drain()? {
                if sig == Signal::SIGWINCH {
                    continue;
                }
                if stopping.is_some() {
                    // Asked twice: stop waiting; the VM goes with us.
                    session.shutdown();
                    return Ok(ExecEnd::Exited(exit::from_signal(sig as i32)));
                }
                stopping = Some(sig);
                session.queue(&ClientToProcess::ExecSignal {
                    signal: libc::SIGTERM,
                })?;
            }
        }

        if stdin_ready {
            // Straight from the fd: a buffered reader could hold bytes that
            // poll would never report.
            let n = match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                Ok(n) => Some(n),
                Err(Errno::EAGAIN | Errno::EINTR) => None,
                Err(_) => Some(0),
            };
            match n {
                Some(0) => {
                    reading_stdin = false;
                    session.queue(&ClientToProcess::ExecStdinEof)?;
                }
                Some(n) => {
                    let data = match scanner.as_mut() {
                        None => buf[..n].to_vec(),
                        Some(scanner) => match scan(scanner, &buf[..n]) {
                            Scanned::Send(data) => data,
                            Scanned::Disconnect => {
                                // Nothing more is sent: a wedged peer must
                                // not hold us.
                                session.out.clear();
                                return Ok(ExecEnd::Escaped);
                            }
                        },
                    };
                    if !data.is_empty() {
                        session.queue(&ClientToProcess::ExecStdin { data })?;
                    }
                }
                None => {}
            }
        }

        if sock_in {
            if let Some(reason) = session.read_from_process(&mut buf)? {
                return Ok(ExecEnd::Lost(reason));
            }
        }

        if sock_out || !session.out.is_empty() {
            session.flush_nonblocking()?;
        }
    }
}

/// Terminal input after the escapes were taken out.
#[derive(Debug, PartialEq, Eq)]
enum Scanned {
    /// The keys to send (`~?` printed the help).
    Send(Vec<u8>),
    /// `~.`: what came before it is dropped with the session.
    Disconnect,
}

fn scan(scanner: &mut Scanner, mut rest: &[u8]) -> Scanned {
    let mut send = Vec::with_capacity(rest.len() + 1);
    while !rest.is_empty() {
        let (used, found) = scanner.scan(rest, &mut send);
        rest = &rest[used..];
        match found {
            None | Some(Escape::Detach) => {}
            Some(Escape::Help) => escape::print_help(),
            Some(Escape::Disconnect) => return Scanned::Disconnect,
        }
    }
    Scanned::Send(send)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_taken_out_of_terminal_input() {
        let mut s = Scanner::new(false);
        assert_eq!(
            scan(&mut s, b"ls\r~~x\r"),
            Scanned::Send(b"ls\r~x\r".to_vec())
        );
        assert_eq!(scan(&mut s, b"a~.b\r"), Scanned::Send(b"a~.b\r".to_vec()));
        assert_eq!(scan(&mut s, b"~"), Scanned::Send(Vec::new()));
        assert_eq!(scan(&mut s, b"."), Scanned::Disconnect);
        // Ctrl-] is an ordinary key for a command.
        let mut s = Scanner::new(false);
        assert_eq!(scan(&mut s, b"\x1d"), Scanned::Send(b"\x1d".to_vec()));
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let code = |c, s, t| exit_code(c, s, t).map(Exit::code);
        assert_eq!(code(Some(0), None, false), Some(0));
        assert_eq!(code(Some(5), None, false), Some(5));
        assert_eq!(code(None, Some(9), false), Some(137));
        assert_eq!(code(None, Some(15), true), Some(124));
        assert_eq!(code(Some(127), None, false), Some(127));
        assert_eq!(code(None, None, false), None);
    }
}
