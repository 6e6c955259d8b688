//! One connection generation: the PTY bridged to the host's control and
//! terminal connections by six named threads.
//!
//! | thread | does |
//! |---|---|
//! | `capsem-pty-out` | PTY master → terminal socket; detects the shell's exit (pidfd, EIO) and drains |
//! | `capsem-pty-in` | terminal socket → PTY master |
//! | `capsem-ctl-rx` | control frames: Ping → Pong (via the writer), Resize, Shutdown |
//! | `capsem-ctl-tx` | the only writer of the control socket, fed by a bounded channel |
//! | `capsem-heartbeat` | declares the transport lost when the host is silent too long; watches the termination signalfd |
//! | `capsem-audit` | the audit port: `Hello{token, generation}`, unacknowledged then new execve records, acks (see [`crate::audit`]); with audit off, or after its connection failed, it waits for the stop |
//!
//! Ownership makes the join order structural: [`Bridge::run`] consumes the
//! bridge, runs the threads in a `std::thread::scope` that borrows the
//! sockets, and the sockets are dropped only when `run` returns, after the
//! scope has joined every thread. Every thread waits in a poll set holding the
//! stop eventfd or in a `select!` on the stop channel, and every socket write
//! is cancellable, so triggering the stop always lets the joins finish.
//!
//! Threads report through one channel; the coordinator (the caller's thread)
//! turns the reports into a typed [`BridgeEnd`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use capsem_proto::frame::Guest;
use capsem_proto::guest::{GuestToHost, HostToGuest};
use capsem_proto::Codec;
use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};
use tracing::{debug, info, warn};

use crate::audit;
use crate::fdio::{self, Written};
use crate::pty::{PtyError, Shell, ShellStatus};
use crate::stop::{StopError, StopOnDrop, StopSignal};

/// Threads one bridge starts.
pub const THREADS: usize = 6;
/// Shell output held while the terminal socket is not writable. The PTY is
/// not read beyond this, so a slow host blocks the shell instead of growing
/// memory.
pub const PENDING_CAP: usize = 64 * 1024;
const CHUNK: usize = 16 * 1024;
/// Queue depth of the control writer.
const CONTROL_QUEUE: usize = 64;
/// After the shell status is written, how long to wait for the host to close
/// the control connection or send Shutdown.
pub const LINGER: Duration = Duration::from_secs(3);
/// How long the shell status may take to be written.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors that end a bridge without a [`BridgeEnd`].
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot create the stop signal")]
    Stop(#[source] StopError),
    #[error("cannot start thread {name}")]
    Spawn {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("thread {0} panicked")]
    Panicked(&'static str),
    #[error("cannot reap the exited shell")]
    Reap(#[source] PtyError),
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeEnd {
    /// The shell ended, all its output and then its status were written.
    ShellExited {
        exit_code: Option<i32>,
        signal: Option<i32>,
        /// A shutdown that arrived after the status was written (while
        /// lingering). Only a persistent agent, which would otherwise start
        /// the next shell, acts on it.
        shutdown: Option<ShutdownBy>,
    },
    /// A connection closed or failed, or the host went silent. Reconnect.
    TransportLost { reason: String },
    /// The host sent Shutdown, or the agent got a termination signal.
    ShutdownRequested { by: ShutdownBy },
}

/// Who asked for a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownBy {
    Host,
    Signal,
}

/// Bytes carried from one generation to the next.
#[derive(Debug, Default)]
pub struct Pending {
    /// Read from the PTY, not yet written to a terminal socket.
    pub output: Vec<u8>,
    /// Read from a terminal socket, not yet written to the PTY.
    pub input: Vec<u8>,
}

/// Settings that do not change between generations.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// The host is declared gone after this long without a control message.
    pub host_timeout: Duration,
}

/// One generation's connections, not yet running.
#[derive(Debug)]
pub struct Bridge {
    generation: u64,
    control: OwnedFd,
    terminal: OwnedFd,
    codec: Codec<Guest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    PtyOut,
    PtyIn,
    CtlRx,
    CtlTx,
    Heartbeat,
    Audit,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::PtyOut => "capsem-pty-out",
            Self::PtyIn => "capsem-pty-in",
            Self::CtlRx => "capsem-ctl-rx",
            Self::CtlTx => "capsem-ctl-tx",
            Self::Heartbeat => "capsem-heartbeat",
            Self::Audit => "capsem-audit",
        }
    }
}

/// What a thread reports. Every thread reports exactly one final event (its
/// return value, or `Panicked` from its guard); `StatusSent` is the one
/// mid-life report.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// Saw the stop signal.
    Stopped,
    /// Ended with nothing to report (the PTY refused input).
    Finished,
    TransportLost(String),
    /// pty-out: the shell is gone, every byte of its output was written and
    /// the terminal socket was shut down for writing.
    /// Carries the bytes written to this generation's terminal connection,
    /// which the host counts to know it has all output before the status.
    ShellDrained {
        terminal_bytes: u64,
    },
    /// ctl-tx: the ShellExited frame was written.
    StatusSent,
    ShutdownRequested,
    /// heartbeat: a termination signal is pending.
    Terminated,
    Panicked,
}

/// What the control writer is fed.
#[derive(Debug)]
enum Outgoing {
    Message(GuestToHost),
    /// The shell status: reported back as `StatusSent` once written.
    Status(GuestToHost),
}

/// Shared, read-only state of the threads.
#[derive(Debug)]
struct Cx<'a> {
    generation: u64,
    shell: &'a Shell,
    control: BorrowedFd<'a>,
    terminal: BorrowedFd<'a>,
    signals: BorrowedFd<'a>,
    stop: &'a StopSignal,
    opts: &'a BridgeOptions,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last control message received.
    last_rx_ms: AtomicU64,
    /// The audit port's inputs; `None` with audit off.
    audit: Option<audit::Link<'a>>,
}

/// Sends `Panicked` if the thread unwinds before reporting.
struct Reporter {
    role: Role,
    tx: Sender<(Role, Event)>,
    done: bool,
}

impl Reporter {
    fn finish(mut self, end: Event) {
        debug!(thread = self.role.name(), ?end, "thread ended");
        let _ = self.tx.send((self.role, end));
        self.done = true;
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send((self.role, Event::Panicked));
        }
    }
}

/// Coordinator state.
#[derive(Debug)]
enum Phase {
    Running,
    SendingStatus {
        status: ShellStatus,
        deadline: Instant,
        host_gone: bool,
    },
    Lingering {
        status: ShellStatus,
        deadline: Instant,
    },
}

impl Bridge {
    /// `control` and `terminal` are connected, nonblocking sockets; `codec`
    /// holds whatever the host sent after its HelloAck.
    pub fn new(generation: u64, control: OwnedFd, terminal: OwnedFd, codec: Codec<Guest>) -> Self {
        Self {
            generation,
            control,
            terminal,
            codec,
        }
    }

    /// Runs the generation to its end. `initial` is queued on the control
    /// writer before anything else; `signals` is the termination signalfd;
    /// `audit` (when audit is on) is what the `capsem-audit` thread serves.
    pub fn run(
        self,
        shell: &Shell,
        pending: &mut Pending,
        signals: BorrowedFd<'_>,
        opts: &BridgeOptions,
        initial: Vec<GuestToHost>,
        audit: Option<audit::Link<'_>>,
    ) -> Result<BridgeEnd, BridgeError> {
        let Bridge {
            generation,
            control,
            terminal,
            mut codec,
        } = self;
        let stop = StopSignal::new().map_err(BridgeError::Stop)?;
        let cx = Cx {
            generation,
            shell,
            control: control.as_fd(),
            terminal: terminal.as_fd(),
            signals,
            stop: &stop,
            opts,
            epoch: Instant::now(),
            last_rx_ms: AtomicU64::new(0),
            audit,
        };
        let (out_tx, out_rx) = crossbeam_channel::bounded::<Outgoing>(CONTROL_QUEUE);
        for msg in initial {
            // Fresh queue: the first CONTROL_QUEUE messages always fit.
            let _ = out_tx.try_send(Outgoing::Message(msg));
        }
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<(Role, Event)>();
        let Pending { output, input } = pending;

        let result = std::thread::scope(|s| {
            // If anything below unwinds, the threads still stop and the
            // scope's implicit joins finish.
            let _stop_guard = StopOnDrop(&stop);
            let cx = &cx;
            let mut handles: Vec<(Role, ScopedJoinHandle<'_, ()>)> = Vec::with_capacity(THREADS);
            let spawned = (|| {
                let h = spawn(s, Role::PtyOut, &ev_tx, move |_| pty_out(cx, output))?;
                handles.push((Role::PtyOut, h));
                let h = spawn(s, Role::PtyIn, &ev_tx, move |_| pty_in(cx, input))?;
                handles.push((Role::PtyIn, h));
                let tx = out_tx.clone();
                let h = spawn(s, Role::CtlRx, &ev_tx, move |_| ctl_rx(cx, &mut codec, &tx))?;
                handles.push((Role::CtlRx, h));
                let h = spawn(s, Role::CtlTx, &ev_tx, move |ev| ctl_tx(cx, &out_rx, ev))?;
                handles.push((Role::CtlTx, h));
                let h = spawn(s, Role::Heartbeat, &ev_tx, move |_| heartbeat(cx))?;
                handles.push((Role::Heartbeat, h));
                let h = spawn(s, Role::Audit, &ev_tx, move |_| audit_thread(cx))?;
                handles.push((Role::Audit, h));
                Ok(())
            })();
            // Only the threads hold event senders now: a disconnect means
            // they have all ended.
            drop(ev_tx);
            let outcome = match spawned {
                Ok(()) => {
                    info!(
                        "bridge started generation={generation} threads={}",
                        handles.len()
                    );
                    coordinate(cx, &ev_rx, &out_tx)
                }
                Err(e) => Err(e),
            };
            stop.trigger();
            let mut joined = 0;
            let mut panicked = None;
            for (role, h) in handles {
                match h.join() {
                    Ok(()) => {}
                    Err(_) => panicked = Some(role.name()),
                }
                joined += 1;
            }
            info!("bridge joined generation={generation} threads={joined}");
            match panicked {
                Some(name) => Err(BridgeError::Panicked(name)),
                None => outcome,
            }
        });
        // The scope has joined every thread; only now do the sockets close.
        drop(terminal);
        drop(control);
        result
    }
}

fn spawn<'scope, 'env, F>(
    s: &'scope Scope<'scope, 'env>,
    role: Role,
    ev_tx: &Sender<(Role, Event)>,
    f: F,
) -> Result<ScopedJoinHandle<'scope, ()>, BridgeError>
where
    F: FnOnce(&Sender<(Role, Event)>) -> Event + Send + 'scope,
{
    let reporter = Reporter {
        role,
        tx: ev_tx.clone(),
        done: false,
    };
    std::thread::Builder::new()
        .name(role.name().to_owned())
        .spawn_scoped(s, move || {
            let end = f(&reporter.tx);
            reporter.finish(end);
        })
        .map_err(|source| BridgeError::Spawn {
            name: role.name(),
            source,
        })
}

/// Turns thread reports into the generation's end.
fn coordinate(
    cx: &Cx<'_>,
    ev_rx: &Receiver<(Role, Event)>,
    out_tx: &Sender<Outgoing>,
) -> Result<BridgeEnd, BridgeError> {
    let mut phase = Phase::Running;
    loop {
        let deadline = match &phase {
            Phase::Running => None,
            Phase::SendingStatus { deadline, .. } | Phase::Lingering { deadline, .. } => {
                Some(*deadline)
            }
        };
        let got = match deadline {
            None => ev_rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => ev_rx.recv_deadline(d),
        };
        let (role, ev) = match got {
            Ok(x) => x,
            Err(RecvTimeoutError::Timeout) => {
                return Ok(match phase {
                    Phase::Lingering { status, .. } => shell_exited(status, None),
                    _ => BridgeEnd::TransportLost {
                        reason: format!("shell status not written within {STATUS_TIMEOUT:?}"),
                    },
                })
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Ok(match phase {
                    Phase::Lingering { status, .. } => shell_exited(status, None),
                    _ => BridgeEnd::TransportLost {
                        reason: "every bridge thread ended".into(),
                    },
                })
            }
        };
        if ev == Event::Panicked {
            return Err(BridgeError::Panicked(role.name()));
        }
        phase = match phase {
            Phase::Running => match ev {
                Event::TransportLost(reason) => return Ok(BridgeEnd::TransportLost { reason }),
                Event::ShutdownRequested => {
                    return Ok(BridgeEnd::ShutdownRequested {
                        by: ShutdownBy::Host,
                    })
                }
                Event::Terminated => {
                    return Ok(BridgeEnd::ShutdownRequested {
                        by: ShutdownBy::Signal,
                    })
                }
                Event::ShellDrained { terminal_bytes } => {
                    let status = cx.shell.reap().map_err(BridgeError::Reap)?;
                    info!(
                        generation = cx.generation,
                        exit_code = ?status.exit_code,
                        signal = ?status.signal,
                        "shell output drained; sending its status"
                    );
                    let deadline = Instant::now() + STATUS_TIMEOUT;
                    let msg = GuestToHost::ShellExited {
                        exit_code: status.exit_code,
                        signal: status.signal,
                        terminal_bytes,
                    };
                    if out_tx
                        .send_deadline(Outgoing::Status(msg), deadline)
                        .is_err()
                    {
                        return Ok(BridgeEnd::TransportLost {
                            reason: "control writer stalled".into(),
                        });
                    }
                    Phase::SendingStatus {
                        status,
                        deadline,
                        host_gone: false,
                    }
                }
                Event::Stopped | Event::Finished | Event::StatusSent | Event::Panicked => {
                    Phase::Running
                }
            },
            Phase::SendingStatus {
                status,
                deadline,
                host_gone,
            } => match ev {
                Event::StatusSent if host_gone => return Ok(shell_exited(status, None)),
                Event::StatusSent => Phase::Lingering {
                    status,
                    deadline: Instant::now() + LINGER,
                },
                // The status may not have gone out: the next generation sends
                // it again.
                Event::TransportLost(reason) if role == Role::CtlTx => {
                    return Ok(BridgeEnd::TransportLost { reason })
                }
                // The writer may still get the status out; wait for its word.
                Event::TransportLost(_) => Phase::SendingStatus {
                    status,
                    deadline,
                    host_gone: true,
                },
                Event::ShutdownRequested => {
                    return Ok(BridgeEnd::ShutdownRequested {
                        by: ShutdownBy::Host,
                    })
                }
                Event::Terminated => {
                    return Ok(BridgeEnd::ShutdownRequested {
                        by: ShutdownBy::Signal,
                    })
                }
                _ => Phase::SendingStatus {
                    status,
                    deadline,
                    host_gone,
                },
            },
            // Status delivered: the host closing, a Shutdown or a signal all
            // end the generation; the shutdown is kept so that a persistent
            // agent stops instead of starting the next shell.
            Phase::Lingering { status, deadline } => match ev {
                Event::TransportLost(_) => return Ok(shell_exited(status, None)),
                Event::ShutdownRequested => {
                    return Ok(shell_exited(status, Some(ShutdownBy::Host)))
                }
                Event::Terminated => return Ok(shell_exited(status, Some(ShutdownBy::Signal))),
                _ => Phase::Lingering { status, deadline },
            },
        };
    }
}

fn shell_exited(status: ShellStatus, shutdown: Option<ShutdownBy>) -> BridgeEnd {
    BridgeEnd::ShellExited {
        exit_code: status.exit_code,
        signal: status.signal,
        shutdown,
    }
}

fn is_eio(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

/// PTY master → terminal socket. Writes what earlier generations left in
/// `pending` first. On the shell's exit (pidfd) it drains the master until
/// EAGAIN or EIO, writes everything, and shuts the socket down for writing.
fn pty_out(cx: &Cx<'_>, pending: &mut Vec<u8>) -> Event {
    let master = cx.shell.master();
    let pidfd = cx.shell.pidfd();
    let mut buf = vec![0u8; CHUNK];
    // Still reading the master.
    let mut master_open = true;
    let mut shell_dead = false;
    // Bytes written to this generation's terminal connection.
    let mut written: u64 = 0;
    loop {
        if shell_dead && master_open && pending.len() < PENDING_CAP {
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
        if shell_dead && !master_open && pending.is_empty() {
            if let Err(e) = nix::sys::socket::shutdown(
                cx.terminal.as_raw_fd(),
                nix::sys::socket::Shutdown::Write,
            ) {
                return Event::TransportLost(format!("terminal shutdown failed: {e}"));
            }
            return Event::ShellDrained {
                terminal_bytes: written,
            };
        }

        let mut fds = Vec::with_capacity(4);
        fds.push(fdio::pollfd(cx.stop.fd(), fdio::IN));
        let term_at = (!pending.is_empty()).then(|| {
            fds.push(fdio::pollfd(cx.terminal, fdio::OUT));
            fds.len() - 1
        });
        let master_at = (master_open && !shell_dead && pending.len() < PENDING_CAP).then(|| {
            fds.push(fdio::pollfd(master, fdio::IN));
            fds.len() - 1
        });
        let pid_at = (!shell_dead).then(|| {
            fds.push(fdio::pollfd(pidfd, fdio::IN));
            fds.len() - 1
        });
        if let Err(e) = fdio::poll(&mut fds, None) {
            return Event::TransportLost(format!("pty-out poll failed: {e}"));
        }
        if fdio::ready(&fds[0]) {
            return Event::Stopped;
        }
        if term_at.is_some_and(|i| fdio::ready(&fds[i])) {
            match fdio::write(cx.terminal, pending) {
                Ok(n) => {
                    written += n as u64;
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Event::TransportLost(format!("terminal write failed: {e}")),
            }
        }
        if master_at.is_some_and(|i| fdio::ready(&fds[i])) {
            match fdio::read(master, &mut buf) {
                Ok(0) => master_open = false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EIO: no slave fd is open. The shell may still run (it
                // closed its terminal); its pidfd says when it is gone.
                Err(e) if is_eio(&e) => master_open = false,
                Err(e) => {
                    warn!(error = %e, "PTY read failed");
                    master_open = false;
                }
            }
        }
        if pid_at.is_some_and(|i| fdio::ready(&fds[i])) {
            shell_dead = true;
            // Drain from the start even if EIO was seen: data may have
            // arrived between the two.
            master_open = true;
        }
    }
}

/// Terminal socket → PTY master. Input read but not yet written stays in
/// `pending` for the next generation.
fn pty_in(cx: &Cx<'_>, pending: &mut Vec<u8>) -> Event {
    let master = cx.shell.master();
    let mut buf = vec![0u8; CHUNK];
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
        let mut fds = [
            fdio::pollfd(cx.stop.fd(), fdio::IN),
            fdio::pollfd(cx.terminal, fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, None) {
            return Event::TransportLost(format!("pty-in poll failed: {e}"));
        }
        if fdio::ready(&fds[0]) {
            return Event::Stopped;
        }
        match fdio::read(cx.terminal, &mut buf) {
            Ok(0) => return Event::TransportLost("terminal connection closed by the host".into()),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Event::TransportLost(format!("terminal read failed: {e}")),
        }
    }
}

/// Control frames from the host.
fn ctl_rx(cx: &Cx<'_>, codec: &mut Codec<Guest>, out: &Sender<Outgoing>) -> Event {
    let mut buf = vec![0u8; CHUNK];
    loop {
        loop {
            let msg = match codec.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return Event::TransportLost(format!("invalid control frame: {e}")),
            };
            let ms = u64::try_from(cx.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            cx.last_rx_ms.store(ms, Ordering::SeqCst);
            match msg {
                HostToGuest::Ping { seq } => {
                    let pong = Outgoing::Message(GuestToHost::Pong { seq });
                    select! {
                        send(out, pong) -> r => if r.is_err() { return Event::Stopped },
                        recv(cx.stop.receiver()) -> _ => return Event::Stopped,
                    }
                }
                HostToGuest::Resize { cols, rows } => {
                    if let Err(e) = cx.shell.resize(cols, rows) {
                        warn!(error = %e, "resize failed");
                    }
                }
                HostToGuest::Shutdown => return Event::ShutdownRequested,
                HostToGuest::HelloAck { .. } => warn!("ignoring a second HelloAck"),
            }
        }
        let mut fds = [
            fdio::pollfd(cx.stop.fd(), fdio::IN),
            fdio::pollfd(cx.control, fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, None) {
            return Event::TransportLost(format!("ctl-rx poll failed: {e}"));
        }
        if fdio::ready(&fds[0]) {
            return Event::Stopped;
        }
        match fdio::read(cx.control, &mut buf) {
            Ok(0) => {
                return Event::TransportLost(match codec.finish() {
                    Ok(()) => "control connection closed by the host".into(),
                    Err(e) => format!("control connection closed: {e}"),
                })
            }
            Ok(n) => {
                if let Err(e) = codec.feed(&buf[..n]) {
                    return Event::TransportLost(format!("invalid control frame: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Event::TransportLost(format!("control read failed: {e}")),
        }
    }
}

/// The only writer of the control socket.
fn ctl_tx(cx: &Cx<'_>, rx: &Receiver<Outgoing>, ev: &Sender<(Role, Event)>) -> Event {
    loop {
        let out = select! {
            recv(rx) -> m => match m {
                Ok(m) => m,
                Err(_) => return Event::Stopped,
            },
            recv(cx.stop.receiver()) -> _ => return Event::Stopped,
        };
        let (msg, is_status) = match out {
            Outgoing::Message(m) => (m, false),
            Outgoing::Status(m) => (m, true),
        };
        let frame = match Codec::<Guest>::encode(&msg) {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, kind = msg.kind(), "cannot encode a control message; dropped");
                continue;
            }
        };
        match fdio::write_all(cx.control, &frame, cx.stop.fd()) {
            Ok(Written::All) => {
                if is_status {
                    let _ = ev.send((Role::CtlTx, Event::StatusSent));
                }
            }
            Ok(Written::Cancelled { .. }) => return Event::Stopped,
            Err(e) => return Event::TransportLost(format!("control write failed: {e}")),
        }
    }
}

/// Declares the host gone after `host_timeout` without a control message, and
/// turns a pending termination signal into an event.
fn heartbeat(cx: &Cx<'_>) -> Event {
    let timeout = cx.opts.host_timeout;
    loop {
        let last = cx.epoch + Duration::from_millis(cx.last_rx_ms.load(Ordering::SeqCst));
        let silent = last.elapsed();
        if silent >= timeout {
            return Event::TransportLost(format!(
                "host silent for {} ms (limit {} ms)",
                silent.as_millis(),
                timeout.as_millis()
            ));
        }
        let mut fds = [
            fdio::pollfd(cx.stop.fd(), fdio::IN),
            fdio::pollfd(cx.signals, fdio::IN),
        ];
        // Wakes at the moment the host would be overdue, then re-checks.
        if let Err(e) = fdio::poll(&mut fds, Some(last + timeout)) {
            return Event::TransportLost(format!("heartbeat poll failed: {e}"));
        }
        if fdio::ready(&fds[0]) {
            return Event::Stopped;
        }
        if fdio::ready(&fds[1]) {
            return Event::Terminated;
        }
    }
}

/// The audit port. It returns only at the stop: an audit connection failure
/// is logged there and never ends the generation.
fn audit_thread(cx: &Cx<'_>) -> Event {
    audit::run_generation(cx.audit, cx.generation, cx.stop);
    Event::Stopped
}
