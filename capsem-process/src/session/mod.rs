//! The session: one `select!` over signals, task events, deadlines, the
//! guest's exit and the shell status's slot in the client's queue, driving
//! a state made of phase enums that own their data:
//!
//! * [`vm::Guest`]: not started, running, exited;
//! * [`link::Link`]: the agent's generation (down, acked, bridged);
//! * [`attach::Client`]: the attached client and the output receiver;
//! * [`Mode`]: a temporary shell ([`ShellPhase`]), one command
//!   ([`exec::One`]), or a persistent VM's exec pool ([`exec::Pool`]).
//!
//! Events are handled in [`events`]; [`teardown`] is the one ending, and
//! [`Stop`] (in `stop.rs`) says why it came. A persistent VM's lifetime
//! limits ([`lifetime`]) are one more deadline in the same `select!`.

mod attach;
mod events;
mod exec;
mod lifetime;
mod link;
mod stop;
mod teardown;
mod vm;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::audit::AuditLog;
use crate::bridge::Inputs;
use crate::config::Config;
use crate::ready::ReadyFd;
use crate::reaper::{Reaper, ReaperError};
use crate::state::{Event, Shared};
use crate::vmdir::VmDir;

pub use self::stop::Stop;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot generate the session token")]
    Token(#[source] getrandom::Error),
    #[error(transparent)]
    Reaper(#[from] ReaperError),
    #[error("cannot listen on {path}")]
    Listen {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install a signal handler")]
    Signal(#[source] io::Error),
    #[error(transparent)]
    Records(#[from] crate::records::RecordsError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("--net: {0}")]
    NetPolicy(String),
    #[error(transparent)]
    NetHosts(#[from] crate::net::hosts::HostsError),
    #[error(transparent)]
    NetLog(#[from] crate::net::log::NetLogError),
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishError),
}

/// A temporary shell's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellPhase {
    Live,
    /// The status arrived and is on its way to the client.
    Exited,
}

/// What the VM runs.
#[derive(Debug)]
pub enum Mode {
    /// `capsem shell`: one shell; the VM ends with it.
    Shell(ShellPhase),
    /// `capsem run` (`--exec`): one command.
    Exec(exec::One),
    /// A persistent VM: shell after shell, and `capsem exec` commands.
    Persistent(exec::Pool),
}

impl Mode {
    /// The session's work is done: only the status's delivery is left.
    fn finished(&self) -> bool {
        matches!(
            self,
            Mode::Shell(ShellPhase::Exited) | Mode::Exec(exec::One::Done)
        )
    }
}

#[derive(Debug)]
pub struct Session {
    cfg: Config,
    dir: VmDir,
    shared: Arc<Shared>,
    reaper: Reaper,
    reaper_task: JoinHandle<()>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    accept_stop: crate::accept::Stop,
    accept_tasks: Vec<JoinHandle<()>>,
    /// The published ports' listeners, stopped first at teardown.
    publish_stop: crate::accept::Stop,
    publish_tasks: Vec<JoinHandle<()>>,
    audit_task: JoinHandle<Arc<Mutex<AuditLog>>>,
    ready: ReadyFd,
    boot_deadline: Instant,
    records: crate::records::Records,
    /// `--adopt`: the processes to take over.
    adopt: Option<capsem_host::vmstate::Pids>,
    guest: vm::Guest,
    /// Boots of this guest started by this process (a boot fault reboots).
    boots: u32,
    /// Until when this boot may take to connect before it is started again
    /// (`vm::attempt_wait`); none for the last boot or an adopted guest.
    attempt_deadline: Option<Instant>,
    link: link::Link,
    client: attach::Client,
    mode: Mode,
    lifetime: lifetime::Lifetime,
}

/// What woke the loop.
#[derive(Debug)]
enum Wake {
    Signal(&'static str),
    Event(Event),
    BootTimeout,
    TerminalTimeout,
    StatusGraceOver,
    ExecConnectTimeout,
    /// A persistent VM's exec relay task was joined (a panic, if it failed).
    ExecRelayJoined(Option<String>),
    GuestExited(vm::Exit),
    /// The guest's console printed a line after which its boot cannot work.
    BootFault(String),
    /// This boot has not connected within `vm::attempt_wait`.
    AttemptWaitOver,
    /// The shell's status went into the client's queue.
    ExitQueued,
    /// A persistent VM reached its idle timeout or its max duration.
    Lifetime(lifetime::Limit),
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The session token: 32 hex characters from the OS RNG.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Binds a Unix listener with mode 0600, replacing a stale socket file.
/// The directory is 0700, so the window before the chmod exposes nothing.
fn listen(path: &Path) -> Result<UnixListener, SessionError> {
    let err = |source| SessionError::Listen {
        path: path.into(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok() {
        warn!("removing a stale {}", path.display());
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

impl Session {
    /// Binds the listeners and starts the reaper; the guest starts in [`Session::run`].
    pub fn new(cfg: Config, dir: VmDir) -> Result<Self, SessionError> {
        // First: a published port in use is the startup error, before
        // anything else is started or bound.
        let published = crate::publish::bind_all(&cfg.publish)?;
        let (token, adopt) = if cfg.adopt {
            let (token, pids) = crate::records::read_adoption(&dir)?;
            (token, Some(pids))
        } else {
            (new_token().map_err(SessionError::Token)?, None)
        };
        let records = crate::records::Records::load(&dir);
        let (reaper, reaper_task) = Reaper::start()?;
        let (shared, receivers) =
            Shared::new(cfg.vm_id.clone(), token, cfg.heartbeat(), cfg.missed_pongs);
        let (events_tx, events) = mpsc::channel(64);
        let audit_log = AuditLog::open(&dir, cfg.adopt)?;
        let stop = crate::accept::Stop::default();
        let (sh, ev) = (&shared, &events_tx);
        let mut accept_tasks = vec![
            tokio::spawn(crate::client::accept_clients(
                listen(&dir.ctl_sock())?,
                sh.clone(),
                ev.clone(),
                stop.subscribe(),
            )),
            tokio::spawn(crate::guest::accept_control(
                listen(&dir.control_sock())?,
                sh.clone(),
                ev.clone(),
                stop.subscribe(),
            )),
            tokio::spawn(crate::guest::accept_terminal(
                listen(&dir.terminal_sock())?,
                sh.clone(),
                ev.clone(),
                stop.subscribe(),
            )),
            tokio::spawn(crate::guest::accept_exec(
                listen(&dir.exec_sock())?,
                sh.clone(),
                ev.clone(),
                stop.subscribe(),
            )),
        ];
        let net = Arc::new(crate::net::NetCtx::new(
            shared.token.clone(),
            cfg.net_policy().map_err(SessionError::NetPolicy)?,
            crate::net::Hosts::from_env()?,
            crate::net::NetLog::open(dir.root())?,
        ));
        accept_tasks.push(tokio::spawn(crate::net::accept_net(
            listen(&dir.net_sock())?,
            net,
            stop.subscribe(),
        )));
        let publish_stop = crate::accept::Stop::default();
        let publish_ctx = Arc::new(crate::publish::PublishCtx {
            token: shared.token.clone(),
            uds: crate::vmm::jail::jail_dir(dir.root()).join(crate::vmm::qemu::VSOCK_BASE),
        });
        let publish_tasks = published
            .into_iter()
            .map(|(port, listener)| {
                tokio::spawn(crate::publish::accept_publish(
                    listener,
                    port,
                    publish_ctx.clone(),
                    publish_stop.subscribe(),
                ))
            })
            .collect();
        let audit_task = tokio::spawn(crate::audit::accept_audit(
            listen(&dir.audit_sock())?,
            sh.clone(),
            audit_log,
            stop.subscribe(),
        ));
        info!(
            "listening on {} and {}",
            dir.ctl_sock().display(),
            dir.vsock_base().display()
        );
        let inputs = Inputs {
            guest: receivers.guest,
            keys: receivers.keys,
        };
        let mode = if cfg.exec {
            Mode::Exec(exec::One::Idle)
        } else if cfg.persistent() {
            Mode::Persistent(exec::Pool::default())
        } else {
            Mode::Shell(ShellPhase::Live)
        };
        let ms = |v: Option<u64>| {
            v.filter(|_| cfg.persistent())
                .map(std::time::Duration::from_millis)
        };
        let lifetime = lifetime::Lifetime::new(
            ms(cfg.idle_timeout_ms),
            ms(cfg.max_duration_ms),
            Instant::now(),
        );
        Ok(Self {
            lifetime,
            boot_deadline: Instant::now() + cfg.boot_timeout(),
            link: link::Link::new(inputs, shared.clone(), events_tx.clone()),
            client: attach::Client::new(shared.clone(), receivers.output),
            cfg,
            dir,
            shared,
            reaper,
            reaper_task,
            events_tx,
            events,
            accept_stop: stop,
            accept_tasks,
            publish_stop,
            publish_tasks,
            audit_task,
            ready: ReadyFd::default(),
            records,
            adopt,
            guest: vm::Guest::NotStarted,
            boots: 0,
            attempt_deadline: None,
            mode,
        })
    }

    /// Starts the guest, serves until the session ends, tears down.
    pub async fn run(mut self, ready: ReadyFd) -> Result<Stop, SessionError> {
        self.ready = ready;
        let stop = match self.start_guest() {
            Ok(()) => match self.serve().await {
                Ok(stop) => stop,
                Err(e) => {
                    self.teardown(&Stop::Signal("an internal error")).await;
                    return Err(e);
                }
            },
            Err(reason) => Stop::BootFailed(reason),
        };
        if let Stop::BootFailed(reason) = &stop {
            error!("the guest did not come up: {reason}");
            let reason = self.with_log_hint(reason, &stop);
            if let Err(e) = self.ready.error(&reason) {
                warn!("cannot write to the ready fd: {e}");
            }
        }
        self.teardown(&stop).await;
        Ok(stop)
    }

    async fn serve(&mut self) -> Result<Stop, SessionError> {
        let sig = |kind| signal(kind).map_err(SessionError::Signal);
        let mut sigterm = sig(SignalKind::terminate())?;
        let mut sigint = sig(SignalKind::interrupt())?;
        let mut sighup = sig(SignalKind::hangup())?;
        loop {
            let boot = self.ready.pending().then_some(self.boot_deadline);
            let attempt = self.attempt_deadline.filter(|_| self.ready.pending());
            let terminal = self.link.terminal_deadline();
            let grace = self.guest.grace();
            let busy = self.client.is_attached()
                || matches!(&self.mode, Mode::Persistent(pool) if pool.busy());
            let life = self.lifetime.next(busy, Instant::now());
            let (exec_deadline, relays) = match &mut self.mode {
                Mode::Exec(one) => (one.deadline(), None),
                Mode::Persistent(pool) => (None, Some(&mut pool.relays)),
                Mode::Shell(_) => (None, None),
            };
            let console = self.ready.pending().then(|| self.guest.console()).flatten();
            let out_tx = self.shared.out_tx.clone();
            let exit_pending = self.client.exit.is_some();
            let wake = tokio::select! {
                _ = sigterm.recv() => Wake::Signal("SIGTERM"),
                _ = sigint.recv() => Wake::Signal("SIGINT"),
                _ = sighup.recv() => Wake::Signal("SIGHUP"),
                Some(ev) = self.events.recv() => Wake::Event(ev),
                () = sleep_until(boot) => Wake::BootTimeout,
                () = sleep_until(attempt) => Wake::AttemptWaitOver,
                () = sleep_until(terminal) => Wake::TerminalTimeout,
                () = sleep_until(grace) => Wake::StatusGraceOver,
                () = sleep_until(exec_deadline) => Wake::ExecConnectTimeout,
                limit = lifetime::reached(life) => Wake::Lifetime(limit),
                // A finished relay is joined at once, so a long-lived VM's
                // set holds only the commands still running.
                Some(joined) = join_relay(relays) => {
                    Wake::ExecRelayJoined(joined.err().map(|e| e.to_string()))
                }
                exit = self.guest.exited() => Wake::GuestExited(exit),
                line = vm::boot_fault(console) => Wake::BootFault(line),
                // After every output chunk the terminal reader queued.
                Ok(permit) = out_tx.reserve(), if exit_pending => {
                    if let Some(item) = self.client.exit.take() {
                        permit.send(item);
                    }
                    Wake::ExitQueued
                }
            };
            if let Some(stop) = self.on_wake(wake).await {
                return Ok(stop);
            }
        }
    }

    /// `reason`, plus where a failed temporary VM's logs will be kept.
    fn with_log_hint(&self, reason: &str, stop: &Stop) -> String {
        if !stop.failed() {
            return reason.to_owned();
        }
        let logs = if self.cfg.temporary {
            crate::logkeep::LogKeep::new(&self.cfg.home(), &self.cfg.vm_id).dest
        } else {
            self.dir.root().to_path_buf()
        };
        format!("{reason} (logs: {})", logs.display())
    }
}

/// The next finished relay of a persistent VM's pool; pending otherwise.
async fn join_relay(
    relays: Option<&mut tokio::task::JoinSet<()>>,
) -> Option<Result<(), tokio::task::JoinError>> {
    match relays {
        Some(set) if !set.is_empty() => set.join_next().await,
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_32_hex() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn lost_reasons() {
        assert_eq!(Stop::ShellExited.lost_reason(), None);
        assert_eq!(Stop::ClientGone.lost_reason(), None);
        assert!(Stop::Signal("SIGTERM")
            .lost_reason()
            .unwrap()
            .contains("SIGTERM"));
    }
}
