//! The terminal connection's two threads.
//!
//! * `pty_out`: PTY master → `Output` frames. When the shell's pidfd fires
//!   it drains the master (to EAGAIN or EIO), writes the rest, reaps the
//!   shell and writes `Exit`: the last frame, so all output precedes the
//!   status on the one stream.
//! * `pty_in`: `Input` frames → PTY master.
//!
//! Bytes leave `pending` only once their frame was written whole: a frame
//! cut short by a lost transport is discarded by the host, and its bytes go
//! out again on the next generation.
//!
//! Coalescing: a shell that prints line by line (a tty makes stdout line
//! buffered) would otherwise wake `pty_out` for every line, and each wake-up
//! costs a frame, a vsock packet and a virtqueue kick, which under TCG is
//! the whole cost of terminal output. So while output streams (the previous
//! frame went out less than [`STREAMING`] ago), `pty_out` first lets the
//! shell fill the PTY for [`HOLD`], then reads it empty into one frame. The
//! first read after a pause (a keystroke's echo) still goes out at once, and
//! a bulk writer (one whose last read found [`BULK`] bytes queued, or shows
//! it writes that much within a [`HOLD`]) is read without holds.

use std::io;
use std::time::{Duration, Instant};

use capsem_proto::conn::{ConnError, FrameReader, FrameWriter};
use capsem_proto::frame::TermGuest;
use capsem_proto::terminal::{HostToTerm, TermToHost, MAX_TERM_CHUNK};
use capsem_proto::Codec;
use tracing::{debug, warn};

use super::{Cx, Event, CHUNK};
use crate::fdio::{self, Blocking};
use crate::session::chain;

fn is_eio(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

/// A failed framed read or write as the thread's final event: the stop, or
/// a lost transport.
pub(super) fn conn_failed(what: &str, e: &ConnError) -> Event {
    match e.io() {
        Some(io) if fdio::is_cancelled(io) => Event::Stopped,
        _ => Event::TransportLost(format!("{what}: {}", chain(e))),
    }
}

/// How long a streaming read is held back so the shell can fill the PTY.
const HOLD: Duration = Duration::from_millis(2);
/// Output streams while frames go out closer together than this.
const STREAMING: Duration = Duration::from_millis(10);
/// A writer fast enough to write this much within one [`HOLD`], or a read
/// that finds this much queued, is read without holds: a PTY holds only
/// about 19 KiB, which such a writer fills in a fraction of the hold and
/// then waits on.
const BULK: usize = 8 * 1024;

/// Reads the nonblocking master into `pending` until it is empty or a frame
/// is full. `Ok(false)`: the master is done (EOF, EIO: no slave open).
fn read_available(
    master: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
) -> bool {
    while pending.len() < MAX_TERM_CHUNK {
        match fdio::read(master, buf) {
            Ok(0) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            // EIO: no slave fd is open. The shell may still run (it closed
            // its terminal); its pidfd says when it is gone.
            Err(e) if is_eio(&e) => return false,
            Err(e) => {
                warn!(error = %e, "PTY read failed");
                return false;
            }
        }
    }
    true
}

/// PTY master → terminal socket. Writes what earlier generations left in
/// `pending` first.
pub(super) fn pty_out(cx: &Cx<'_>, pending: &mut Vec<u8>) -> Event {
    let master = cx.shell.master();
    let pidfd = cx.shell.pidfd();
    let mut out = FrameWriter::<TermGuest, _>::new(Blocking::new(cx.terminal, cx.stop.fd()));
    let mut buf = vec![0u8; CHUNK];
    // Still reading the master.
    let mut master_open = true;
    let mut shell_dead = false;
    // When the last output frame went out.
    let mut last_frame: Option<Instant> = None;
    // The last read showed a writer that fills the PTY faster than a hold
    // could gather lines: holding reads back would only idle the stream
    // (the shell blocks on the full PTY meanwhile).
    let mut bulk = false;
    // When the last read of the master ended.
    let mut last_read: Option<Instant> = None;
    loop {
        if !pending.is_empty() {
            let n = pending.len().min(MAX_TERM_CHUNK);
            let frame = TermToHost::Output {
                data: pending[..n].to_vec(),
            };
            if let Err(e) = out.write_frame(&frame) {
                return conn_failed("terminal write failed", &e);
            }
            pending.drain(..n);
            last_frame = Some(Instant::now());
            continue;
        }
        if shell_dead && master_open {
            // The shell is gone: read what is left without waiting. A
            // nonblocking PTY read flushes the tty buffer work first, so
            // EAGAIN here means the shell's writes have all been read.
            match fdio::read(master, &mut buf) {
                Ok(0) => master_open = false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || is_eio(&e) => {
                    master_open = false
                }
                Err(e) => {
                    warn!(error = %e, "PTY read failed after the shell exited");
                    master_open = false;
                }
            }
            continue;
        }
        if shell_dead {
            let status = match cx.shell.reap() {
                Ok(s) => s,
                Err(e) => return Event::ReapFailed(chain(&e)),
            };
            if let Some(hit) = cx.shell.limit_hit() {
                warn!(?hit, "the shell's cgroup reached a limit");
                let line = format!("\r\n{}\r\n", hit.message("the shell"));
                let frame = TermToHost::Output {
                    data: line.into_bytes(),
                };
                if let Err(e) = out.write_frame(&frame) {
                    return conn_failed("terminal write failed", &e);
                }
            }
            let exit = TermToHost::Exit {
                exit_code: status.exit_code,
                signal: status.signal,
            };
            if let Err(e) = out.write_frame(&exit) {
                return conn_failed("terminal write of the status failed", &e);
            }
            return Event::ShellExited(status);
        }

        if master_open && !bulk && last_frame.is_some_and(|t| t.elapsed() < STREAMING) {
            // Streaming: hold the read back (the stop and the shell's exit
            // still end the wait at once).
            let mut fds = [
                fdio::pollfd(cx.stop.fd(), fdio::IN),
                fdio::pollfd(pidfd, fdio::IN),
            ];
            if let Err(e) = fdio::poll(&mut fds, Some(Instant::now() + HOLD)) {
                return Event::TransportLost(format!("pty-out poll failed: {e}"));
            }
            if fdio::ready(&fds[0]) {
                return Event::Stopped;
            }
        }

        let mut fds = Vec::with_capacity(3);
        fds.push(fdio::pollfd(cx.stop.fd(), fdio::IN));
        fds.push(fdio::pollfd(pidfd, fdio::IN));
        let master_at = master_open.then(|| {
            fds.push(fdio::pollfd(master, fdio::IN));
            fds.len() - 1
        });
        if let Err(e) = fdio::poll(&mut fds, None) {
            return Event::TransportLost(format!("pty-out poll failed: {e}"));
        }
        if fdio::ready(&fds[0]) {
            return Event::Stopped;
        }
        if master_at.is_some_and(|i| fdio::ready(&fds[i])) {
            master_open = read_available(master, &mut buf, pending);
            // A read that found BULK bytes queued saw a writer a hold would
            // only leave blocked on the full PTY (the reader was busy
            // sending meanwhile). Otherwise the writer's rate decides: would
            // one hold have given it time to write BULK bytes? (Right after
            // another read, a fast writer has written little, but in little
            // time.)
            let now = Instant::now();
            let took = last_read.map_or(HOLD, |t| now - t);
            bulk = pending.len() >= BULK
                || pending.len() as u128 * HOLD.as_nanos() >= BULK as u128 * took.as_nanos();
            last_read = Some(now);
        }
        if fdio::ready(&fds[1]) {
            shell_dead = true;
            // Drain from the start even if EIO was seen: data may have
            // arrived between the two.
            master_open = true;
        }
    }
}

/// Terminal socket → PTY master. `codec` holds bytes already read; input
/// read but not yet written stays in `pending` for the next generation.
pub(super) fn pty_in(cx: &Cx<'_>, codec: Codec<TermGuest>, pending: &mut Vec<u8>) -> Event {
    let master = cx.shell.master();
    let mut frames = FrameReader::with_codec(Blocking::new(cx.terminal, cx.stop.fd()), codec);
    loop {
        if !pending.is_empty() {
            let mut fds = [
                fdio::pollfd(cx.stop.fd(), fdio::IN),
                fdio::pollfd(master, fdio::OUT),
            ];
            if let Err(e) = fdio::poll(&mut fds, None) {
                return Event::TransportLost(format!("pty-in poll failed: {e}"));
            }
            if fdio::ready(&fds[0]) {
                return Event::Stopped;
            }
            match fdio::write(master, pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // The shell side is gone; its exit is pty-out's to report.
                    debug!(error = %e, "PTY write failed; input dropped");
                    pending.clear();
                    return Event::Finished;
                }
            }
            continue;
        }
        match frames.read_frame() {
            Ok(Some(HostToTerm::Input { data })) => pending.extend_from_slice(&data),
            Ok(None) => {
                return Event::TransportLost("terminal connection closed by the host".into())
            }
            Err(e) => return conn_failed("terminal read failed", &e),
        }
    }
}
