//! One connection generation: the PTY bridged to the host's control and
//! terminal connections by six named threads.
//!
//! | thread | does |
//! |---|---|
//! | `capsem-pty-out` | PTY master → `Output` frames on the terminal socket; on the shell's exit (pidfd) drains the PTY, reaps the shell and writes `Exit` last ([`terminal`]) |
//! | `capsem-pty-in` | `Input` frames from the terminal socket → PTY master ([`terminal`]) |
//! | `capsem-ctl-rx` | control frames: Ping → Pong (via the writer), Resize, Shutdown ([`control`]) |
//! | `capsem-ctl-tx` | the only writer of the control socket, fed by a bounded channel ([`control`]) |
//! | `capsem-heartbeat` | declares the transport lost when the host is silent too long; watches the termination signalfd ([`control`]) |
//! | `capsem-audit` | the audit port: `Hello{token, generation}`, unacknowledged then new execve records, acks (see [`crate::audit`]); with audit off, or after its connection failed, it waits for the stop |
//!
//! Ownership makes the join order structural: [`Bridge::run`] consumes the
//! bridge, runs the threads in a `std::thread::scope` that borrows the
//! sockets, and the sockets are dropped only when `run` returns, after the
//! scope has joined every thread. Every thread waits in a poll set holding the
//! stop eventfd or in a `select!` on the stop channel, and every socket write
//! is cancellable, so triggering the stop always lets the joins finish.
//! Sockets are read and written as whole frames through
//! `capsem_proto::conn` over [`crate::fdio::Blocking`] (a poll that also
//! watches the stop).
//!
//! Threads report through one channel; the coordinator (the caller's thread)
//! turns the reports into a typed [`BridgeEnd`].

mod control;
mod terminal;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use capsem_proto::frame::{Guest, TermGuest};
use capsem_proto::guest::GuestToHost;
use capsem_proto::Codec;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{debug, info};

use crate::audit;
use crate::pty::{Shell, ShellStatus};
use crate::stop::{StopError, StopOnDrop, StopSignal};

/// Threads one bridge starts.
pub const THREADS: usize = 6;
/// Bytes read from the PTY at once.
const CHUNK: usize = 16 * 1024;
/// Queue depth of the control writer.
const CONTROL_QUEUE: usize = 64;
/// After the shell status is written, how long to wait for the host to close
/// the control connection or send Shutdown.
pub const LINGER: Duration = Duration::from_secs(3);

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
    #[error("cannot reap the exited shell: {0}")]
    Reap(String),
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
    term_codec: Codec<TermGuest>,
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

/// What a thread reports: exactly one final event each (its return value,
/// or `Panicked` from its guard).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// Saw the stop signal.
    Stopped,
    /// Ended with nothing to report (the PTY refused input).
    Finished,
    TransportLost(String),
    /// pty-out: the shell is gone and reaped, every byte of its output and
    /// then its `Exit` frame were written to the terminal connection.
    ShellExited(ShellStatus),
    /// pty-out: the shell's pidfd fired but it could not be reaped.
    ReapFailed(String),
    ShutdownRequested,
    /// heartbeat: a termination signal is pending.
    Terminated,
    Panicked,
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
    /// The status is written: wait (bounded) for the host to close or to
    /// send Shutdown, which a persistent agent must not miss.
    Lingering {
        status: ShellStatus,
        deadline: Instant,
    },
}

impl Bridge {
    /// `control` and `terminal` are connected, nonblocking sockets (the
    /// terminal's hello already written); `codec` holds whatever the host
    /// sent after its HelloAck.
    pub fn new(generation: u64, control: OwnedFd, terminal: OwnedFd, codec: Codec<Guest>) -> Self {
        Self {
            generation,
            control,
            terminal,
            codec,
            term_codec: Codec::new(),
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
            codec,
            term_codec,
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
        let (out_tx, out_rx) = crossbeam_channel::bounded::<GuestToHost>(CONTROL_QUEUE);
        for msg in initial {
            // Fresh queue: the first CONTROL_QUEUE messages always fit.
            let _ = out_tx.try_send(msg);
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
                let h = spawn(s, Role::PtyOut, &ev_tx, move || {
                    terminal::pty_out(cx, output)
                })?;
                handles.push((Role::PtyOut, h));
                let h = spawn(s, Role::PtyIn, &ev_tx, move || {
                    terminal::pty_in(cx, term_codec, input)
                })?;
                handles.push((Role::PtyIn, h));
                let tx = out_tx.clone();
                let h = spawn(s, Role::CtlRx, &ev_tx, move || {
                    control::ctl_rx(cx, codec, &tx)
                })?;
                handles.push((Role::CtlRx, h));
                let h = spawn(s, Role::CtlTx, &ev_tx, move || control::ctl_tx(cx, &out_rx))?;
                handles.push((Role::CtlTx, h));
                let h = spawn(s, Role::Heartbeat, &ev_tx, move || control::heartbeat(cx))?;
                handles.push((Role::Heartbeat, h));
                let h = spawn(s, Role::Audit, &ev_tx, move || audit_thread(cx))?;
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
                    coordinate(&ev_rx, &stop)
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
    F: FnOnce() -> Event + Send + 'scope,
{
    let reporter = Reporter {
        role,
        tx: ev_tx.clone(),
        done: false,
    };
    std::thread::Builder::new()
        .name(role.name().to_owned())
        .spawn_scoped(s, move || {
            let end = f();
            reporter.finish(end);
        })
        .map_err(|source| BridgeError::Spawn {
            name: role.name(),
            source,
        })
}

/// Turns thread reports into the generation's end.
fn coordinate(
    ev_rx: &Receiver<(Role, Event)>,
    stop: &StopSignal,
) -> Result<BridgeEnd, BridgeError> {
    let mut phase = Phase::Running;
    loop {
        let got = match &phase {
            Phase::Running => ev_rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Phase::Lingering { deadline, .. } => ev_rx.recv_deadline(*deadline),
        };
        let (role, ev) = match got {
            Ok(x) => x,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                return Ok(match phase {
                    Phase::Lingering { status, .. } => shell_exited(status, None),
                    Phase::Running => BridgeEnd::TransportLost {
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
                Event::TransportLost(reason) if role == Role::PtyOut => {
                    return Ok(BridgeEnd::TransportLost { reason })
                }
                // pty-out may have written the status just before the host
                // closed: its own last word decides.
                Event::TransportLost(reason) => return pty_out_verdict(ev_rx, stop, reason),
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
                Event::ShellExited(status) => {
                    info!(
                        exit_code = ?status.exit_code,
                        signal = ?status.signal,
                        "shell status written after its output"
                    );
                    Phase::Lingering {
                        status,
                        deadline: Instant::now() + LINGER,
                    }
                }
                Event::ReapFailed(e) => return Err(BridgeError::Reap(e)),
                Event::Stopped | Event::Finished | Event::Panicked => Phase::Running,
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

/// After a transport loss seen by another thread: stops the threads and
/// waits for pty-out's final event. If it had written the shell's status,
/// the generation ended with the shell's exit, not with a loss (a persistent
/// agent then starts the next shell instead of resending the status).
fn pty_out_verdict(
    ev_rx: &Receiver<(Role, Event)>,
    stop: &StopSignal,
    reason: String,
) -> Result<BridgeEnd, BridgeError> {
    stop.trigger();
    while let Ok((role, ev)) = ev_rx.recv() {
        match (role, ev) {
            (_, Event::Panicked) => return Err(BridgeError::Panicked(role.name())),
            (Role::PtyOut, Event::ShellExited(status)) => return Ok(shell_exited(status, None)),
            (Role::PtyOut, _) => break,
            _ => {}
        }
    }
    Ok(BridgeEnd::TransportLost { reason })
}

fn shell_exited(status: ShellStatus, shutdown: Option<ShutdownBy>) -> BridgeEnd {
    BridgeEnd::ShellExited {
        exit_code: status.exit_code,
        signal: status.signal,
        shutdown,
    }
}

/// The audit port. It returns only at the stop: an audit connection failure
/// is logged there and never ends the generation.
fn audit_thread(cx: &Cx<'_>) -> Event {
    audit::run_generation(cx.audit, cx.generation, cx.stop);
    Event::Stopped
}
