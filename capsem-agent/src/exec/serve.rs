//! One command's poll loop ([`serve`]): its pipes or PTY, its pidfd, the
//! exec connection, (in exec mode) the control connection, the stop fd and
//! the timeout and kill deadlines. Used by exec mode ([`super::run`]) and by
//! each worker of the persistent VM's exec pool.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use capsem_proto::exec::{check_start, ExecStream, ExecToHost, HostToExec, MAX_EXEC_CHUNK};
use capsem_proto::frame::{ExecGuest, Guest};
use capsem_proto::guest::{GuestToHost, HostToGuest};
use capsem_proto::Codec;
use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::{
    ExecConfig, ExecError, ExecOutcome, DRAIN_WAIT, KILL_GRACE, LINGER, OUT_CAP, STDIN_CAP,
};
use crate::command::{CommandSpec, Running};
use crate::fdio;
use crate::pty::SHELL_PATH;
use crate::session::chain;

/// The base environment, then the request's variables (already checked).
fn command_env(
    home: &Path,
    image_env: &[(String, String)],
    env: &[(String, String)],
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut out: Vec<(std::ffi::OsString, std::ffi::OsString)> = vec![
        ("PATH".into(), SHELL_PATH.into()),
        ("HOME".into(), home.as_os_str().to_owned()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    crate::imageconfig::merge_env(&mut out, image_env);
    crate::imageconfig::merge_env(&mut out, env);
    out
}

/// Bytes waiting for a nonblocking socket, written as it accepts them.
#[derive(Default)]
struct OutBuf {
    buf: Vec<u8>,
}

impl OutBuf {
    fn push(&mut self, msg: &ExecToHost) -> Result<(), ExecError> {
        Codec::<ExecGuest>::encode_into(msg, &mut self.buf).map_err(ExecError::Encode)
    }

    /// Writes what the socket takes; `Err` on a broken connection.
    fn flush(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        while !self.buf.is_empty() {
            match fdio::write(fd, &self.buf) {
                Ok(n) => {
                    self.buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The state of the one command.
struct Exec {
    cmd: Option<Running>,
    out: OutBuf,
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    stdout_bytes: u64,
    stderr_bytes: u64,
    timed_out: bool,
    deadline: Option<Instant>,
    kill_at: Option<Instant>,
    drain_until: Option<Instant>,
    exit_queued: bool,
    /// On a PTY: stdin's EOF is a Ctrl-D, and EIO on the master is its EOF.
    tty: bool,
    /// The PTY master after its EIO, held until the command is reaped:
    /// closing the last master fd hangs the terminal up, and a command that
    /// closed its stdio but has not exited yet would die of that SIGHUP.
    tty_master: Option<OwnedFd>,
}

impl Exec {
    fn new() -> Self {
        Self {
            cmd: None,
            out: OutBuf::default(),
            stdin_buf: Vec::new(),
            stdin_eof: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            timed_out: false,
            deadline: None,
            kill_at: None,
            drain_until: None,
            exit_queued: false,
            tty: false,
            tty_master: None,
        }
    }

    /// Reports a command that never ran: its reason on stderr, then `Exit`.
    fn fail(&mut self, exit_code: i32, message: &str) -> Result<(), ExecError> {
        let data = message.as_bytes().to_vec();
        self.stderr_bytes += data.len() as u64;
        self.out.push(&ExecToHost::Output {
            stream: ExecStream::Stderr,
            data,
        })?;
        self.out.push(&ExecToHost::Exit {
            exit_code: Some(exit_code),
            signal: None,
            timed_out: false,
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
        })?;
        self.exit_queued = true;
        Ok(())
    }

    fn start(&mut self, cfg: &ExecConfig, msg: HostToExec) -> Result<(), ExecError> {
        let HostToExec::Start {
            argv,
            env,
            workdir,
            timeout_ms,
            tty,
        } = msg
        else {
            return Ok(());
        };
        if let Err(e) = check_start(&argv, &env, workdir.as_deref(), timeout_ms) {
            warn!("exec request refused: {e}");
            return self.fail(125, &format!("capsem: {e}\n"));
        }
        let cwd = match &workdir {
            Some(dir) => cfg.cwd.join(dir),
            None => cfg.cwd.clone(),
        };
        if !cwd.is_dir() {
            return self.fail(
                125,
                &format!(
                    "capsem: working directory {} is not a directory\n",
                    cwd.display()
                ),
            );
        }
        let mut env = command_env(&cfg.home, &cfg.image_env, &env);
        if tty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
            env.push(("TERM".into(), "xterm-256color".into()));
        }
        self.tty = tty.is_some();
        let spec = CommandSpec {
            argv,
            env,
            cwd,
            tty,
            creds: cfg.creds,
        };
        let cgroup = match cfg.cgroups.as_ref().map(|c| c.create("exec")).transpose() {
            Ok(g) => g,
            Err(e) => {
                warn!(
                    "cannot make the command's cgroup: {}",
                    crate::session::chain(&e)
                );
                return self.fail(126, "capsem: cannot contain the command (cgroup)\n");
            }
        };
        match Running::spawn(&spec, cgroup)? {
            Ok(running) => {
                info!(pid = running.pid(), program = %spec.argv[0], ?timeout_ms, "command started");
                self.deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
                self.cmd = Some(running);
                Ok(())
            }
            Err(failure) => {
                info!(program = %spec.argv[0], exit_code = failure.exit_code, "command did not start");
                self.fail(failure.exit_code, &failure.message)
            }
        }
    }

    /// Signals the group; a terminating signal arms the SIGKILL deadline.
    fn signal(&mut self, signal: i32) {
        let Some(cmd) = &self.cmd else { return };
        let Ok(sig) = Signal::try_from(signal) else {
            warn!(signal, "ignoring an invalid signal number");
            return;
        };
        cmd.signal_group(sig);
        if matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP) {
            cmd.signal_group(Signal::SIGCONT);
            self.kill_at.get_or_insert(Instant::now() + KILL_GRACE);
        }
    }

    fn pipes_open(&self) -> bool {
        self.cmd
            .as_ref()
            .is_some_and(|c| c.stdout.is_some() || c.stderr.is_some())
    }

    /// Reads one chunk from a pipe (or what the PTY has queued) into an
    /// `Output` frame.
    fn read_pipe(&mut self, stream: ExecStream) -> Result<(), ExecError> {
        let Some(cmd) = self.cmd.as_mut() else {
            return Ok(());
        };
        let slot = match stream {
            ExecStream::Stdout => &mut cmd.stdout,
            ExecStream::Stderr => &mut cmd.stderr,
        };
        let Some(fd) = slot else { return Ok(()) };
        let mut buf = vec![0u8; MAX_EXEC_CHUNK];
        // A PTY hands out 4 KiB per read: one frame, and one vsock write, of
        // all it has queued instead of one per 4 KiB (docs/benchmarks.md).
        let got = if self.tty {
            fdio::read_until_dry(fd.as_fd(), &mut buf)
        } else {
            fdio::read(fd.as_fd(), &mut buf)
        };
        match got {
            Ok(0) => *slot = None,
            Ok(n) => {
                buf.truncate(n);
                match stream {
                    ExecStream::Stdout => self.stdout_bytes += n as u64,
                    ExecStream::Stderr => self.stderr_bytes += n as u64,
                }
                self.out.push(&ExecToHost::Output { stream, data: buf })?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // A PTY master reads EIO once every slave fd is closed.
            Err(e) if self.tty && e.raw_os_error() == Some(libc::EIO) => {
                self.tty_master = slot.take();
            }
            Err(e) => {
                warn!(?stream, "reading the command's output failed: {e}");
                *slot = None;
            }
        }
        Ok(())
    }

    fn write_stdin(&mut self) {
        let Some(cmd) = self.cmd.as_mut() else { return };
        let Some(fd) = &cmd.stdin else {
            self.stdin_buf.clear();
            return;
        };
        while !self.stdin_buf.is_empty() {
            match fdio::write(fd.as_fd(), &self.stdin_buf) {
                Ok(n) => {
                    self.stdin_buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // EPIPE: the command closed its stdin; drop the rest.
                    self.stdin_buf.clear();
                    cmd.stdin = None;
                    return;
                }
            }
        }
        if self.stdin_eof {
            if self.tty {
                // The master stays open for output: end-of-input is the
                // terminal's EOF character, once.
                let _ = fdio::write(fd.as_fd(), b"\x04");
            }
            cmd.stdin = None;
        }
    }

    /// Once the command is reaped and its pipes are done, queue `Exit`.
    fn maybe_exit(&mut self) -> Result<(), ExecError> {
        if self.exit_queued {
            return Ok(());
        }
        let Some(cmd) = &self.cmd else { return Ok(()) };
        let Some(status) = cmd.status() else {
            return Ok(());
        };
        if self.pipes_open() {
            return Ok(());
        }
        info!(
            exit_code = ?status.exit_code,
            signal = ?status.signal,
            timed_out = self.timed_out,
            stdout_bytes = self.stdout_bytes,
            stderr_bytes = self.stderr_bytes,
            "command ended"
        );
        if let Some(hit) = cmd.limit_hit() {
            warn!(?hit, "the command's cgroup reached a limit");
            let line = format!("{}\n", hit.message("the command"));
            self.stderr_bytes += line.len() as u64;
            self.out.push(&ExecToHost::Output {
                stream: ExecStream::Stderr,
                data: line.into_bytes(),
            })?;
        }
        self.out.push(&ExecToHost::Exit {
            exit_code: status.exit_code,
            signal: status.signal,
            timed_out: self.timed_out,
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
        })?;
        self.exit_queued = true;
        // Reaped: the hang-up can reach no one now.
        self.tty_master = None;
        Ok(())
    }
}

fn next_deadline(ds: &[Option<Instant>]) -> Option<Instant> {
    ds.iter().flatten().min().copied()
}

/// Exec mode's control connection: answered (pings) and watched (Shutdown,
/// EOF) in the command's poll loop.
pub struct Ctl {
    pub fd: OwnedFd,
    pub codec: Codec<Guest>,
    pub out: Vec<u8>,
}

/// Serves one command on `exec_sock` (its `Start` already read when
/// `first` is given; its codec may hold bytes read after it) to its end: its `Exit` sent, or stopped (the command's group
/// terminated and reaped). `stop` is an fd that becomes readable when the
/// agent is stopping (`why_stopped` says why). With `ctl` (exec mode) the
/// control connection is served in the same loop and the agent lingers
/// after `Exit` for the host's Shutdown; without it (a persistent VM's
/// command) it returns once `Exit` is written.
pub fn serve(
    cfg: &ExecConfig,
    exec_sock: &OwnedFd,
    first: Option<HostToExec>,
    mut exec_codec: Codec<ExecGuest>,
    mut ctl: Option<Ctl>,
    stop_fd: BorrowedFd<'_>,
    why_stopped: &dyn Fn() -> String,
) -> Result<ExecOutcome, ExecError> {
    let mut ex = Exec::new();
    let mut exec_in_open = true;
    let mut started = false;
    let mut linger_until: Option<Instant> = None;
    if let Some(start) = first {
        started = true;
        ex.start(cfg, start)?;
    }
    let mut buf = vec![0u8; 64 * 1024];

    let stop = |ex: &mut Exec, why: String| -> Result<ExecOutcome, ExecError> {
        if let Some(cmd) = ex.cmd.as_mut() {
            let s = cmd.terminate(KILL_GRACE)?;
            info!(exit_code = ?s.exit_code, signal = ?s.signal, "command stopped and reaped: {why}");
        }
        Ok(ExecOutcome::Stopped(why))
    };

    loop {
        // Control messages already buffered.
        while let Some(c) = ctl.as_mut() {
            match c.codec.next_message() {
                Ok(Some(HostToGuest::Ping { seq })) => {
                    Codec::<Guest>::encode_into(&GuestToHost::Pong { seq }, &mut c.out)
                        .map_err(ExecError::Encode)?;
                }
                Ok(Some(HostToGuest::Shutdown)) => {
                    return if ex.exit_queued && ex.out.buf.is_empty() {
                        Ok(ExecOutcome::Reported)
                    } else {
                        stop(&mut ex, "the host sent Shutdown".into())
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return stop(&mut ex, format!("invalid control frame: {}", chain(&e))),
            }
        }
        // Exec messages already buffered.
        while ex.stdin_buf.len() < STDIN_CAP {
            match exec_codec.next_message() {
                Ok(Some(msg @ HostToExec::Start { .. })) => {
                    if started {
                        warn!("ignoring a second Start");
                    } else {
                        started = true;
                        ex.start(cfg, msg)?;
                    }
                }
                Ok(Some(HostToExec::Stdin { data })) => {
                    if !ex.stdin_eof {
                        ex.stdin_buf.extend_from_slice(&data);
                    }
                }
                Ok(Some(HostToExec::StdinEof)) => ex.stdin_eof = true,
                Ok(Some(HostToExec::Signal { signal })) => {
                    info!(signal, "signal from the host");
                    ex.signal(signal);
                }
                Ok(None) => break,
                Err(e) => return stop(&mut ex, format!("invalid exec frame: {}", chain(&e))),
            }
        }
        ex.write_stdin();
        ex.maybe_exit()?;
        if let Err(e) = ex.out.flush(exec_sock.as_fd()) {
            return stop(&mut ex, format!("exec connection broken: {e}"));
        }
        if let Some(c) = ctl.as_mut().filter(|c| !c.out.is_empty()) {
            // Tiny pongs; a host that stops reading its control connection
            // is a lost transport soon enough.
            match fdio::write(c.fd.as_fd(), &c.out) {
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return stop(&mut ex, format!("control connection broken: {e}")),
            }
        }
        if ex.exit_queued && ex.out.buf.is_empty() {
            if ctl.is_none() {
                return Ok(ExecOutcome::Reported);
            }
            if linger_until.is_none() {
                linger_until = Some(Instant::now() + LINGER);
            }
        }

        let now = Instant::now();
        if linger_until.is_some_and(|t| now >= t) {
            info!("no shutdown from the host after the exit status; exiting");
            return Ok(ExecOutcome::Reported);
        }
        let running = ex.cmd.as_ref().is_some_and(|c| c.status().is_none());
        if running {
            if ex.deadline.is_some_and(|t| now >= t) {
                info!("timeout expired; terminating the command's process group");
                ex.deadline = None;
                ex.timed_out = true;
                ex.signal(libc::SIGTERM);
            }
            if ex.kill_at.is_some_and(|t| now >= t) {
                info!("grace period over; killing the command's process group");
                ex.kill_at = None;
                if let Some(cmd) = &ex.cmd {
                    cmd.signal_group(Signal::SIGKILL);
                }
            }
        }
        if ex.drain_until.is_some_and(|t| now >= t) {
            if let Some(cmd) = ex.cmd.as_mut() {
                if cmd.stdout.is_some() || cmd.stderr.is_some() {
                    warn!("the command's pipes are still held open after it exited; closing them");
                }
                cmd.stdout = None;
                cmd.stderr = None;
            }
            ex.drain_until = None;
            continue;
        }

        // One poll over everything.
        let out_room = ex.out.buf.len() < OUT_CAP;
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(8);
        let mut idx = [usize::MAX; 8];
        let mut add = |slot: usize, fd: BorrowedFd<'_>, ev: i16, fds: &mut Vec<libc::pollfd>| {
            idx[slot] = fds.len();
            fds.push(fdio::pollfd(fd, ev));
        };
        add(0, stop_fd, fdio::IN, &mut fds);
        if let Some(c) = &ctl {
            let ctl_ev = if c.out.is_empty() {
                fdio::IN
            } else {
                fdio::IN | fdio::OUT
            };
            add(1, c.fd.as_fd(), ctl_ev, &mut fds);
        }
        let mut exec_ev = 0;
        if exec_in_open && ex.stdin_buf.len() < STDIN_CAP {
            exec_ev |= fdio::IN;
        }
        if !ex.out.buf.is_empty() {
            exec_ev |= fdio::OUT;
        }
        if exec_ev != 0 {
            add(2, exec_sock.as_fd(), exec_ev, &mut fds);
        }
        if let Some(cmd) = &ex.cmd {
            if out_room {
                if let Some(fd) = &cmd.stdout {
                    add(3, fd.as_fd(), fdio::IN, &mut fds);
                }
                if let Some(fd) = &cmd.stderr {
                    add(4, fd.as_fd(), fdio::IN, &mut fds);
                }
            }
            if let (Some(fd), false) = (&cmd.stdin, ex.stdin_buf.is_empty()) {
                add(5, fd.as_fd(), fdio::OUT, &mut fds);
            }
            if cmd.status().is_none() {
                add(6, cmd.pidfd(), fdio::IN, &mut fds);
            }
        }
        let deadline = next_deadline(&[ex.deadline, ex.kill_at, ex.drain_until, linger_until]);
        fdio::poll(&mut fds, deadline).map_err(ExecError::Poll)?;
        let hit = |slot: usize| idx[slot] != usize::MAX && fdio::ready(&fds[idx[slot]]);
        let (sig, ctl_ready, exe, so, se, pid) = (hit(0), hit(1), hit(2), hit(3), hit(4), hit(6));
        drop(fds);

        if sig {
            return stop(&mut ex, why_stopped());
        }
        if let (true, Some(c)) = (ctl_ready, ctl.as_mut()) {
            match fdio::read(c.fd.as_fd(), &mut buf) {
                Ok(0) => {
                    if ex.exit_queued && ex.out.buf.is_empty() {
                        return Ok(ExecOutcome::Reported);
                    }
                    return stop(&mut ex, "the host closed the control connection".into());
                }
                Ok(n) => {
                    if let Err(e) = c.codec.feed(&buf[..n]) {
                        return stop(&mut ex, format!("invalid control frame: {}", chain(&e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return stop(&mut ex, format!("control connection broken: {e}")),
            }
        }
        if exe && exec_in_open {
            match fdio::read(exec_sock.as_fd(), &mut buf) {
                Ok(0) => {
                    exec_in_open = false;
                    if !ex.exit_queued {
                        return stop(&mut ex, "the host closed the exec connection".into());
                    }
                }
                Ok(n) => {
                    if let Err(e) = exec_codec.feed(&buf[..n]) {
                        return stop(&mut ex, format!("invalid exec frame: {}", chain(&e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return stop(&mut ex, format!("exec connection broken: {e}")),
            }
        }
        if so {
            ex.read_pipe(ExecStream::Stdout)?;
        }
        if se {
            ex.read_pipe(ExecStream::Stderr)?;
        }
        if pid {
            if let Some(cmd) = ex.cmd.as_mut() {
                let s = cmd.reap()?;
                info!(exit_code = ?s.exit_code, signal = ?s.signal, "command exited; draining its output");
                ex.deadline = None;
                ex.kill_at = None;
                ex.drain_until = Some(Instant::now() + DRAIN_WAIT);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_env_overrides_the_base() {
        let env = command_env(
            Path::new("/root"),
            &[("PATH".into(), "/image".into()), ("B".into(), "2".into())],
            &[("PATH".into(), "/x".into()), ("A".into(), "1".into())],
        );
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(get("PATH").as_deref(), Some("/x"));
        assert_eq!(get("A").as_deref(), Some("1"));
        assert_eq!(get("B").as_deref(), Some("2"), "the image's Env");
        assert_eq!(get("HOME").as_deref(), Some("/root"));
        assert_eq!(env.iter().filter(|(n, _)| n == "PATH").count(), 1);
    }
}
