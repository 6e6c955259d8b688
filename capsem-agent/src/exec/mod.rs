//! Exec mode (`CAPSEM_MODE=exec`): no shell; one command, its streams on the
//! exec port.
//!
//! The agent says hello with `shell_pid: 0`, connects the exec port (no
//! terminal connection: protocol 3 pairs none in exec mode), waits for `Start`, runs the command ([`crate::command`]) and serves it in
//! one poll loop on the calling thread: control (Ping → Pong, Shutdown, EOF),
//! exec input (Stdin, StdinEof, Signal), the command's pipes, its pidfd, the
//! termination signalfd and the timeout/kill deadlines. No thread is started,
//! so nothing needs joining; every fd is owned by this function's locals.
//!
//! Ordering: `Output` frames are queued in the order the pipes are read and
//! `Exit` is queued after both pipes ended, on the same connection, so the
//! host receives every byte before the status. There is no reconnection: a
//! lost transport ends the command (the VM is going away).
//!
//! Files: this one connects and runs exec mode; [`serve()`] is the command's
//! poll loop (shared with the persistent VM's exec pool).

mod serve;

pub use self::serve::{serve, Ctl};

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsem_proto::exec::ExecToHost;
use capsem_proto::frame::{ExecGuest, Guest};
use capsem_proto::guest::{GuestToHost, PORT_CONTROL, PORT_EXEC, PROTOCOL_VERSION};
use capsem_proto::{Codec, FrameError};
use tracing::{info, warn};

use crate::command::CommandError;
use crate::control::{self, Handshake, HELLO_TIMEOUT};
use crate::fdio;
use crate::reconnect::{self, Backoff, ReconnectError, Waited};
use crate::session::chain;
use crate::signals::Signals;
use crate::transport::{Connected, Transport};

/// SIGTERM (timeout, host signal) to SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// After the command exited, how long its pipes may stay open (a process
/// that left its group can hold them) before they are given up on.
pub const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// After `Exit` is written, how long to wait for the host's Shutdown.
pub const LINGER: Duration = Duration::from_secs(5);
/// Connection attempts before the agent gives up.
const CONNECT_ATTEMPTS: u32 = 40;
/// Output encoded but not yet written to the exec socket: the pipes are not
/// read beyond this, so a slow host blocks the command instead of growing
/// memory.
const OUT_CAP: usize = 256 * 1024;
/// Stdin received but not yet written to the pipe: the exec socket is not
/// read beyond this.
const STDIN_CAP: usize = 256 * 1024;

/// Errors that end exec mode as a runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot connect to the host: {0}")]
    Connect(String),
    #[error(transparent)]
    Reconnect(#[from] ReconnectError),
    #[error("poll failed")]
    Poll(#[source] io::Error),
    #[error("cannot encode a message")]
    Encode(#[source] FrameError),
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// How exec mode ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The status was sent to the host.
    Reported,
    /// The host, a signal or a lost transport stopped the command first.
    Stopped(String),
}

/// What exec mode needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub transport: Transport,
    pub token: String,
    pub home: PathBuf,
    pub cwd: PathBuf,
    /// The OCI image's Env, under the client's `-e`.
    pub image_env: Vec<(String, String)>,
    /// The image's User, resolved; `None`: root.
    pub creds: Option<crate::imageconfig::Creds>,
    /// Inside a VM: each command runs in its own cgroup.
    pub cgroups: Option<std::sync::Arc<crate::cgroup::Cgroups>>,
}

struct Conns {
    generation: u64,
    control: OwnedFd,
    ctl_codec: Codec<Guest>,
    exec: OwnedFd,
}

fn connect_all(cfg: &ExecConfig, signals: &Signals) -> Result<Option<Conns>, ExecError> {
    let mut backoff = Backoff::from_entropy()?;
    let mut last = String::new();
    for attempt in 1..=CONNECT_ATTEMPTS {
        match connect_once(cfg, signals) {
            Ok(Some(c)) => return Ok(Some(c)),
            Ok(None) => return Ok(None),
            Err(reason) => {
                info!(attempt, %reason, "connection attempt failed");
                last = reason;
            }
        }
        if reconnect::wait(backoff.next_delay(), signals.fd())? == Waited::Cancelled {
            return Ok(None);
        }
    }
    Err(ExecError::Connect(last))
}

/// `Ok(None)`: cancelled by a termination signal.
fn connect_once(cfg: &ExecConfig, signals: &Signals) -> Result<Option<Conns>, String> {
    let connect = |port| match cfg.transport.connect(port, signals.fd()) {
        Ok(Connected::Socket(fd)) => Ok(Some(fd)),
        Ok(Connected::Cancelled) => Ok(None),
        Err(e) => Err(chain(&e)),
    };
    let Some(control) = connect(PORT_CONTROL)? else {
        return Ok(None);
    };
    let hello = GuestToHost::Hello {
        version: PROTOCOL_VERSION,
        token: cfg.token.clone(),
        connects: 1,
        shell_pid: 0,
    };
    let (generation, ctl_codec) =
        match control::handshake(control.as_fd(), &hello, signals.fd(), HELLO_TIMEOUT) {
            Ok(Handshake::Acked { generation, codec }) => (generation, codec),
            Ok(Handshake::Cancelled) => return Ok(None),
            Err(e) => return Err(format!("hello: {}", chain(&e))),
        };
    let Some(exec) = connect(PORT_EXEC)? else {
        return Ok(None);
    };
    if !send_hello(exec.as_fd(), &cfg.token, signals.fd())
        .map_err(|e| format!("exec hello: {e}"))?
    {
        return Ok(None);
    }
    info!(generation, transport = %cfg.transport, "connected for exec");
    Ok(Some(Conns {
        generation,
        control,
        ctl_codec,
        exec,
    }))
}

/// Writes `ExecToHost::Hello{token}` on a fresh exec connection; `false`
/// when `cancel` became readable first.
pub fn send_hello(fd: BorrowedFd<'_>, token: &str, cancel: BorrowedFd<'_>) -> io::Result<bool> {
    let frame = Codec::<ExecGuest>::encode(&ExecToHost::Hello {
        token: token.to_owned(),
    })
    .map_err(io::Error::other)?;
    Ok(fdio::write_all(fd, &frame, cancel)? == fdio::Written::All)
}

/// How long the records of the command's execs may take to be acknowledged
/// once the command is over, before the agent exits anyway.
const AUDIT_FLUSH: Duration = Duration::from_secs(1);

/// Runs exec mode to its end. With an `auditor`, one audit connection
/// streams the guest's execs beside the command (`capsem run --audit-log`);
/// after the command, the agent waits (at most [`AUDIT_FLUSH`]) until the
/// host acknowledged every record, then stops and joins that thread. The
/// control connection is also left in `farewell` ([`crate::farewell`]).
pub fn run(
    cfg: &ExecConfig,
    signals: &Signals,
    auditor: Option<&crate::audit::Auditor>,
    farewell: &mut crate::farewell::Farewell,
) -> Result<ExecOutcome, ExecError> {
    let Some(conns) = connect_all(cfg, signals)? else {
        return Ok(ExecOutcome::Stopped("termination signal".into()));
    };
    farewell.hold(conns.control.as_fd());
    let Some(auditor) = auditor else {
        return serve_conns(cfg, signals, conns);
    };
    let stop = crate::stop::StopSignal::new().map_err(|e| ExecError::Connect(e.to_string()))?;
    let generation = conns.generation;
    std::thread::scope(|scope| {
        let link = crate::audit::Link {
            transport: &cfg.transport,
            token: &cfg.token,
            shared: auditor.shared(),
        };
        let thread = std::thread::Builder::new()
            .name("capsem-audit".into())
            .spawn_scoped(scope, {
                let stop = &stop;
                move || crate::audit::run_generation(Some(link), generation, stop)
            });
        let outcome = serve_conns(cfg, signals, conns);
        let deadline = Instant::now() + AUDIT_FLUSH;
        while !auditor.shared().lock().is_empty() && Instant::now() < deadline {
            // Acks arrive on the audit thread; nothing to wait on here but
            // the (bounded) deadline.
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.trigger();
        match thread {
            Ok(t) => {
                if t.join().is_err() {
                    warn!("the audit thread panicked");
                }
            }
            Err(e) => warn!("cannot start the audit thread: {e}"),
        }
        outcome
    })
}

fn serve_conns(
    cfg: &ExecConfig,
    signals: &Signals,
    conns: Conns,
) -> Result<ExecOutcome, ExecError> {
    let Conns {
        generation: _,
        control,
        ctl_codec,
        exec: exec_sock,
    } = conns;
    let ctl = Ctl {
        fd: control,
        codec: ctl_codec,
        out: Vec::new(),
    };
    serve(
        cfg,
        &exec_sock,
        None,
        Codec::<ExecGuest>::new(),
        Some(ctl),
        signals.fd(),
        &|| format!("termination signal {:?}", signals.take()),
    )
}
