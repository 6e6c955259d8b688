//! The agent's life: start a shell, then connect, hello, bridge, and act on
//! how each generation ended.
//!
//! * `ShellExited`: the status was delivered. In shell mode the agent exits
//!   and never reconnects. In persistent mode (the VM outlives any one
//!   shell) it starts a fresh shell with the same [`ShellConfig`], drops the
//!   old shell's undelivered bytes, and connects the next generation at once;
//!   the hello's `connects` keeps counting and carries the new shell's pid.
//!   A shutdown that arrived after the status was delivered still stops it.
//! * `TransportLost`: one log line, a backoff wait, a new generation with the
//!   same shell and the bytes the last one could not deliver.
//! * `ShutdownRequested` (host `Shutdown` or SIGTERM/SIGINT/SIGHUP): the
//!   shell's process group is hung up, then killed, and the shell reaped.
//!
//! A shell's exit is never a transport loss: only `TransportLost` and a
//! failed attempt reconnect with the same shell.
//!
//! The final generation's control connection outlives the bridge in the
//! caller's [`Farewell`] (closed as the agent's last act); a lost or
//! finished generation's is closed at once.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use capsem_proto::conn::FrameWriter;
use capsem_proto::frame::TermGuest;
use capsem_proto::terminal::TermToHost;

use capsem_proto::guest::{BootStage, GuestToHost, PORT_CONTROL, PORT_TERMINAL, PROTOCOL_VERSION};
use tracing::info;

use crate::audit::{self, Auditor};
use crate::bridge::{Bridge, BridgeEnd, BridgeError, BridgeOptions, Pending, ShutdownBy};
use crate::control::{self, Handshake, HELLO_TIMEOUT};
use crate::farewell::Farewell;
use crate::fdio::{self, Blocking};
use crate::pty::{PtyError, Shell, ShellConfig, ShellStatus};
use crate::reconnect::{self, Backoff, ReconnectError, Waited};
use crate::signals::Signals;
use crate::transport::{Connected, Transport};

/// Time the shell's group gets between SIGHUP and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// Errors that end the agent with a runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot start the shell")]
    Shell(#[source] PtyError),
    #[error("cannot stop the shell")]
    Stop(#[source] PtyError),
    #[error(transparent)]
    Reconnect(#[from] ReconnectError),
    #[error("bridge failed")]
    Bridge(#[source] BridgeError),
    #[error("cannot make the shell's cgroup")]
    Cgroup(#[source] crate::cgroup::CgroupError),
}

/// Everything the session needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub transport: Transport,
    pub token: String,
    pub host_timeout: Duration,
    pub boot_stages: Vec<BootStage>,
    pub shell: ShellConfig,
    /// Persistent mode: start a fresh shell when one exits, instead of
    /// exiting.
    pub persistent: bool,
    /// Inside a VM: each shell runs in its own cgroup.
    pub cgroups: Option<std::sync::Arc<crate::cgroup::Cgroups>>,
}

/// How the session ended; `shells` counts the shells the agent started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The shell exited and its status reached the host (shell mode).
    ShellExited { status: ShellStatus, shells: u64 },
    /// The host or a signal asked for the end; the last shell was stopped
    /// (or had already exited, its status delivered).
    Shutdown {
        by: ShutdownBy,
        shell: ShellStatus,
        shells: u64,
    },
}

/// One connection attempt's result.
enum Attempt {
    Ended { generation: u64, end: BridgeEnd },
    Failed(String),
    Cancelled,
}

/// Runs the agent until the shell's status is delivered (shell mode) or a
/// shutdown. With an `auditor`, every generation also serves the audit port.
/// The final generation's control connection is left in `farewell` (see
/// [`crate::farewell`]); a lost or finished one's is released at once.
pub fn run(
    cfg: &Config,
    signals: &Signals,
    auditor: Option<&Auditor>,
    farewell: &mut Farewell,
) -> Result<Outcome, SessionError> {
    let mut shells = 1u64;
    let mut shell = spawn_shell(cfg, shells)?;
    let opts = BridgeOptions {
        host_timeout: cfg.host_timeout,
    };
    let mut backoff = Backoff::from_entropy()?;
    let mut pending = Pending::default();
    // Successful control connections over the agent's life, across shells.
    let mut connects = 0u64;
    let mut boot = (!cfg.boot_stages.is_empty()).then(|| GuestToHost::BootTimings {
        stages: cfg.boot_stages.clone(),
    });
    let mut failures = 0u64;
    loop {
        match attempt(
            cfg,
            &shell,
            signals,
            &opts,
            &mut backoff,
            &mut pending,
            &mut connects,
            &mut boot,
            auditor,
            farewell,
        )? {
            Attempt::Ended { generation, end } => {
                failures = 0;
                match end {
                    BridgeEnd::ShellExited {
                        exit_code,
                        signal,
                        shutdown,
                    } => {
                        let status = ShellStatus { exit_code, signal };
                        info!(
                            generation,
                            ?exit_code,
                            ?signal,
                            shells,
                            "generation ended: shell exited, status delivered"
                        );
                        if !cfg.persistent {
                            return Ok(Outcome::ShellExited { status, shells });
                        }
                        if let Some(by) = shutdown {
                            if by == ShutdownBy::Signal {
                                log_signal(signals);
                            }
                            info!(?by, "shutdown requested after the shell exited");
                            return Ok(Outcome::Shutdown {
                                by,
                                shell: status,
                                shells,
                            });
                        }
                        // The bridge reaped the old shell; its leftover input
                        // was meant for it, and its output was all written.
                        farewell.release();
                        shells += 1;
                        shell = spawn_shell(cfg, shells)?;
                        pending = Pending::default();
                        // A fresh shell, not a lost transport: no backoff.
                        continue;
                    }
                    BridgeEnd::TransportLost { reason } => {
                        farewell.release();
                        info!(
                            generation,
                            %reason,
                            pending_output = pending.output.len(),
                            pending_input = pending.input.len(),
                            "generation ended: transport lost; reconnecting"
                        );
                    }
                    BridgeEnd::ShutdownRequested { by } => {
                        if by == ShutdownBy::Signal {
                            log_signal(signals);
                        }
                        info!(generation, ?by, "generation ended: shutdown requested");
                        return stop_shell(&shell, by, shells);
                    }
                }
            }
            Attempt::Failed(reason) => {
                failures += 1;
                // Every failure is one line; a host that is down for long
                // logs at the backoff cap's rate (about one line every 2 s).
                info!(attempt = failures, %reason, "connection attempt failed");
            }
            Attempt::Cancelled => {
                log_signal(signals);
                return stop_shell(&shell, ShutdownBy::Signal, shells);
            }
        }
        if reconnect::wait(backoff.next_delay(), signals.fd())? == Waited::Cancelled {
            log_signal(signals);
            return stop_shell(&shell, ShutdownBy::Signal, shells);
        }
    }
}

/// Starts shell number `nth` (counting from 1).
fn spawn_shell(cfg: &Config, nth: u64) -> Result<Shell, SessionError> {
    let cgroup = cfg
        .cgroups
        .as_ref()
        .map(|c| c.create("shell"))
        .transpose()
        .map_err(SessionError::Cgroup)?;
    let shell = Shell::spawn(&cfg.shell, cgroup).map_err(SessionError::Shell)?;
    info!(
        pid = shell.pid(),
        shell = nth,
        program = %cfg.shell.program.display(),
        "shell started"
    );
    Ok(shell)
}

fn log_signal(signals: &Signals) {
    if let Some(sig) = signals.take() {
        info!(signal = sig, "termination signal received");
    }
}

fn stop_shell(shell: &Shell, by: ShutdownBy, shells: u64) -> Result<Outcome, SessionError> {
    let status = shell.terminate(KILL_GRACE).map_err(SessionError::Stop)?;
    info!(exit_code = ?status.exit_code, signal = ?status.signal, "shell stopped and reaped");
    Ok(Outcome::Shutdown {
        by,
        shell: status,
        shells,
    })
}

#[allow(clippy::too_many_arguments)]
fn attempt(
    cfg: &Config,
    shell: &Shell,
    signals: &Signals,
    opts: &BridgeOptions,
    backoff: &mut Backoff,
    pending: &mut Pending,
    connects: &mut u64,
    boot: &mut Option<GuestToHost>,
    auditor: Option<&Auditor>,
    farewell: &mut Farewell,
) -> Result<Attempt, SessionError> {
    let control = match cfg.transport.connect(PORT_CONTROL, signals.fd()) {
        Ok(Connected::Socket(fd)) => fd,
        Ok(Connected::Cancelled) => return Ok(Attempt::Cancelled),
        Err(e) => return Ok(Attempt::Failed(chain(&e))),
    };
    *connects += 1;
    let hello = GuestToHost::Hello {
        version: PROTOCOL_VERSION,
        token: cfg.token.clone(),
        connects: *connects,
        shell_pid: shell.pid(),
    };
    let (generation, codec) =
        match control::handshake(control.as_fd(), &hello, signals.fd(), HELLO_TIMEOUT) {
            Ok(Handshake::Acked { generation, codec }) => (generation, codec),
            Ok(Handshake::Cancelled) => return Ok(Attempt::Cancelled),
            Err(e) => return Ok(Attempt::Failed(format!("hello: {}", chain(&e)))),
        };
    backoff.reset();
    let terminal = match cfg.transport.connect(PORT_TERMINAL, signals.fd()) {
        Ok(Connected::Socket(fd)) => fd,
        Ok(Connected::Cancelled) => return Ok(Attempt::Cancelled),
        Err(e) => return Ok(Attempt::Failed(format!("terminal: {}", chain(&e)))),
    };
    // The terminal connection names the generation it belongs to; the
    // host pairs it only with that acknowledged hello.
    let term_hello = TermToHost::Hello {
        token: cfg.token.clone(),
        generation,
    };
    let io =
        Blocking::new(terminal.as_fd(), signals.fd()).until(Some(Instant::now() + HELLO_TIMEOUT));
    if let Err(e) = FrameWriter::<TermGuest, _>::new(io).write_frame(&term_hello) {
        return Ok(match e.io() {
            Some(io) if fdio::is_cancelled(io) => Attempt::Cancelled,
            _ => Attempt::Failed(format!("terminal hello: {}", chain(&e))),
        });
    }
    info!(
        generation,
        connects = *connects,
        transport = %cfg.transport,
        "connected"
    );
    let initial: Vec<GuestToHost> = boot.take().into_iter().collect();
    let audit = auditor.map(|a| audit::Link {
        transport: &cfg.transport,
        token: &cfg.token,
        shared: a.shared(),
    });
    farewell.hold(control.as_fd());
    let end = Bridge::new(generation, control, terminal, codec)
        .run(shell, pending, signals.fd(), opts, initial, audit)
        .map_err(SessionError::Bridge)?;
    Ok(Attempt::Ended { generation, end })
}

/// `err: cause: cause`, for one-line logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
