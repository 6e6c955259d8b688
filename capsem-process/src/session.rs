//! The session loop: one `select!` over signals, task events, deadlines and
//! the guest's exit. It owns the generations (re-keyed on each valid hello,
//! the old one joined before the new one is acknowledged), the ready fd, the
//! attached client, and the one teardown path.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use capsem_proto::frame::Host;
use capsem_proto::guest::{HostToGuest, PROTOCOL_VERSION};
use capsem_proto::ipc::ProcessToClient;
use capsem_proto::Codec;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::bridge::Generation;
use crate::config::Config;
use crate::log::chain;
use crate::ready::ReadyFd;
use crate::reaper::{ExitStatus, Reaper, ReaperError};
use crate::state::{Event, GenEvent, Hello, Outgoing, Shared, ToClient};
use crate::vmdir::VmDir;
use crate::vmm::{self, GuestBackend, Launch};

/// How long an acknowledged generation may wait for its terminal connection.
const TERMINAL_WAIT: Duration = Duration::from_secs(5);
/// After the agent died, how long its last frames (the shell's status) may
/// take to be read before calling it a loss; also bounds the hello ack.
const STATUS_GRACE: Duration = Duration::from_secs(2);
/// How long a temporary guest gets to exit after `Shutdown`.
const GUEST_EXIT_WAIT: Duration = Duration::from_secs(2);
/// How long a persistent guest gets to stop the shell, sync and power off.
const PERSISTENT_EXIT_WAIT: Duration = Duration::from_secs(8);
/// How long the attached client gets to receive its final message.
const CLIENT_FLUSH_WAIT: Duration = Duration::from_secs(1);
/// How long the guest may take to open the exec port once the client's
/// command is here (it opens it right after the terminal, which made us
/// ready).
const EXEC_CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long killed descendants get to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

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
}

/// Why the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The shell exited; its status went to the client (if one was attached).
    ShellExited,
    /// The guest went away without the shell's status.
    AgentDied(String),
    ShutdownRequested,
    /// The attached client of a temporary VM went away.
    ClientGone,
    Signal(&'static str),
    /// The guest did not come up.
    BootFailed(String),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::ShellExited => f.write_str("the shell exited"),
            Stop::AgentDied(r) => write!(f, "session lost: {r}"),
            Stop::ShutdownRequested => f.write_str("shutdown requested"),
            Stop::ClientGone => f.write_str("the client of a temporary VM went away"),
            Stop::Signal(s) => write!(f, "received {s}"),
            Stop::BootFailed(r) => write!(f, "the guest did not come up: {r}"),
        }
    }
}

impl Stop {
    /// Whether the VM failed: its logs are then kept.
    fn failed(&self) -> bool {
        matches!(self, Stop::AgentDied(_) | Stop::BootFailed(_))
    }

    /// The `SessionLost` reason for an attached client, if it gets one.
    fn lost_reason(&self) -> Option<String> {
        match self {
            Stop::ShellExited | Stop::ClientGone => None,
            Stop::AgentDied(r) | Stop::BootFailed(r) => Some(r.clone()),
            Stop::ShutdownRequested => Some("the VM was shut down on request".into()),
            Stop::Signal(s) => Some(format!("capsem-process received {s}")),
        }
    }
}

/// A generation whose hello was acknowledged, waiting for its terminal.
#[derive(Debug)]
struct Pending {
    generation: u64,
    control: UnixStream,
    trace: crate::conntrace::ConnTrace,
    codec: Codec<Host>,
    deadline: Instant,
}

/// A guest exec connection whose hello was accepted.
type IdleExec = (UnixStream, Box<Codec<capsem_proto::frame::ExecHost>>);

/// A client's command, waiting for a guest exec connection.
#[derive(Debug)]
struct WaitingExec {
    notices: mpsc::Sender<Outgoing>,
    start: capsem_proto::exec::HostToExec,
    stdin: mpsc::Receiver<capsem_proto::exec::HostToExec>,
}

/// Idle exec connections kept beyond this are closed (the agent keeps one).
const MAX_IDLE_EXEC: usize = 4;

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
    GuestExited(String, u32, ExitStatus),
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One generation number per hello: 32 hex characters from the OS RNG.
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

#[derive(Debug)]
pub struct Session {
    cfg: Config,
    dir: VmDir,
    shared: Arc<Shared>,
    reaper: Reaper,
    reaper_task: JoinHandle<()>,
    backend: Option<Box<dyn GuestBackend>>,
    guest_exit: watch::Receiver<Option<(String, u32, ExitStatus)>>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    accept_tasks: Vec<JoinHandle<()>>,
    accept_stop: crate::accept::Stop,
    audit_task: Option<JoinHandle<Arc<std::sync::Mutex<crate::audit::AuditLog>>>>,
    ready: ReadyFd,
    boot_deadline: Instant,
    next_generation: u64,
    current: Option<Generation>,
    pending: Option<Pending>,
    /// The shell's status, once the guest reported it.
    shell_status: Option<(Option<i32>, Option<i32>)>,
    /// The shell's status was queued to the attached client.
    exit_queued: bool,
    status_grace: Option<Instant>,
    /// `<name> exited (<status>)` once the guest is gone.
    guest_gone: Option<String>,
    attached: Option<u64>,
    torn_down: bool,
    /// `status.json`, `pids.json`, `token`.
    records: crate::records::Records,
    /// `--adopt`: the processes to take over.
    adopt: Option<capsem_host::vmstate::Pids>,
    /// A persistent VM's next shell said hello before the last one's exit
    /// was finished: served once it is.
    deferred_hello: Option<Hello>,
    /// The last attach epoch handed out.
    epoch: u64,
    /// `--exec`: the client's command, until the guest's exec connection.
    exec_start: Option<WaitingExec>,
    /// `--exec`: the guest's exec connection, until the client's `Start`.
    exec_conn: Option<IdleExec>,
    /// A persistent VM's idle guest exec connections (the agent keeps one).
    exec_idle: std::collections::VecDeque<IdleExec>,
    /// A persistent VM's commands waiting for an idle exec connection.
    exec_waiting: std::collections::VecDeque<WaitingExec>,
    /// A persistent VM's running command relays.
    exec_relays: tokio::task::JoinSet<()>,
    next_exec_id: u64,
    exec_task: Option<JoinHandle<()>>,
    /// The command's status was queued to the client.
    exec_exited: bool,
    /// Until when the guest may open the exec port.
    exec_deadline: Option<Instant>,
}

impl Session {
    /// Binds the listeners and starts the reaper; the guest starts in [`Session::run`].
    pub fn new(cfg: Config, dir: VmDir) -> Result<Self, SessionError> {
        let (token, adopt) = if cfg.adopt {
            let (token, pids) = crate::records::read_adoption(&dir)?;
            (token, Some(pids))
        } else {
            (new_token().map_err(SessionError::Token)?, None)
        };
        let records = crate::records::Records::load(&dir);
        let (reaper, reaper_task) = Reaper::start()?;
        let shared = Shared::new(cfg.vm_id.clone(), token, cfg.heartbeat(), cfg.missed_pongs);
        let (events_tx, events) = mpsc::channel(64);
        let ctl = listen(&dir.ctl_sock())?;
        let control = listen(&dir.control_sock())?;
        let terminal = listen(&dir.terminal_sock())?;
        let exec = listen(&dir.exec_sock())?;
        let audit = listen(&dir.audit_sock())?;
        let audit_log = crate::audit::AuditLog::open(&dir, cfg.adopt)?;
        let accept_stop = crate::accept::Stop::default();
        let accept_tasks = vec![
            tokio::spawn(crate::client::accept_clients(
                ctl,
                shared.clone(),
                events_tx.clone(),
                accept_stop.subscribe(),
            )),
            tokio::spawn(crate::guest::accept_control(
                control,
                shared.clone(),
                events_tx.clone(),
                accept_stop.subscribe(),
            )),
            tokio::spawn(crate::guest::accept_terminal(
                terminal,
                shared.clone(),
                events_tx.clone(),
                accept_stop.subscribe(),
            )),
            tokio::spawn(crate::guest::accept_exec(
                exec,
                shared.clone(),
                events_tx.clone(),
                accept_stop.subscribe(),
            )),
        ];
        let audit_task = tokio::spawn(crate::audit::accept_audit(
            audit,
            shared.clone(),
            audit_log,
            accept_stop.subscribe(),
        ));
        info!(
            "listening on {} and {}",
            dir.ctl_sock().display(),
            dir.vsock_base().display()
        );
        let boot_deadline = Instant::now() + cfg.boot_timeout();
        Ok(Self {
            cfg,
            dir,
            shared,
            reaper,
            reaper_task,
            backend: None,
            guest_exit: watch::channel(None).1,
            events_tx,
            events,
            accept_tasks,
            accept_stop,
            audit_task: Some(audit_task),
            ready: ReadyFd::default(),
            boot_deadline,
            next_generation: 0,
            current: None,
            pending: None,
            shell_status: None,
            exit_queued: false,
            status_grace: None,
            guest_gone: None,
            attached: None,
            torn_down: false,
            records,
            adopt,
            deferred_hello: None,
            epoch: 0,
            exec_start: None,
            exec_conn: None,
            exec_idle: std::collections::VecDeque::new(),
            exec_waiting: std::collections::VecDeque::new(),
            exec_relays: tokio::task::JoinSet::new(),
            next_exec_id: 0,
            exec_task: None,
            exec_exited: false,
            exec_deadline: None,
        })
    }

    /// Starts the guest, serves until the session ends, tears down.
    pub async fn run(mut self, ready: ReadyFd) -> Result<Stop, SessionError> {
        self.ready = ready;
        let stop = match self.start_guest() {
            Ok(()) => self.serve().await?,
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

    fn start_guest(&mut self) -> Result<(), String> {
        let launch = Launch {
            dir: &self.dir,
            vm_id: &self.cfg.vm_id,
            token: &self.shared.token,
            reaper: &self.reaper,
            cfg: &self.cfg,
        };
        let backend: Box<dyn GuestBackend> = match &self.adopt {
            Some(pids) => {
                let name = match self.cfg.vmm {
                    crate::config::VmmKind::None => "none",
                    crate::config::VmmKind::Qemu => "qemu",
                };
                Box::new(
                    vmm::adopted::Adopted::adopt(name, pids, &self.reaper)
                        .map_err(|e| format!("cannot adopt the running guest: {}", chain(&e)))?,
                )
            }
            None => vmm::start(self.cfg.vmm, &launch).map_err(|e| chain(&e))?,
        };
        self.records.write_token(&self.shared.token);
        self.records
            .write_pids(&self.cfg.vm_id, backend.records(), None);
        let image = (self.cfg.vmm == crate::config::VmmKind::Qemu)
            .then(|| self.cfg.image_dir().display().to_string());
        self.records
            .started(self.adopt.is_some(), backend.accel(), image);
        info!(
            "guest backend {} started {}",
            backend.name(),
            backend.details()
        );
        self.shared.set_guest_pid(backend.pid());
        let (tx, rx) = watch::channel(None);
        let children = backend.children().to_vec();
        tokio::spawn(async move {
            let exit = vmm::wait_exit(children).await;
            tx.send_replace(Some(exit));
        });
        self.guest_exit = rx;
        self.backend = Some(backend);
        Ok(())
    }

    async fn serve(&mut self) -> Result<Stop, SessionError> {
        let sig = |kind| signal(kind).map_err(SessionError::Signal);
        let mut sigterm = sig(SignalKind::terminate())?;
        let mut sigint = sig(SignalKind::interrupt())?;
        let mut sighup = sig(SignalKind::hangup())?;
        loop {
            let boot = self.ready.pending().then_some(self.boot_deadline);
            let terminal = self.pending.as_ref().map(|p| p.deadline);
            let mut guest_exit = self.guest_exit.clone();
            let wake = tokio::select! {
                _ = sigterm.recv() => Wake::Signal("SIGTERM"),
                _ = sigint.recv() => Wake::Signal("SIGINT"),
                _ = sighup.recv() => Wake::Signal("SIGHUP"),
                Some(ev) = self.events.recv() => Wake::Event(ev),
                () = sleep_until(boot) => Wake::BootTimeout,
                () = sleep_until(terminal) => Wake::TerminalTimeout,
                () = sleep_until(self.status_grace) => Wake::StatusGraceOver,
                () = sleep_until(self.exec_deadline) => Wake::ExecConnectTimeout,
                // A finished relay is joined at once, so a long-lived VM's
                // set holds only the commands still running.
                Some(joined) = self.exec_relays.join_next(), if !self.exec_relays.is_empty() => {
                    Wake::ExecRelayJoined(joined.err().map(|e| e.to_string()))
                }
                Ok(exit) = guest_exit.wait_for(Option::is_some), if self.guest_gone.is_none() => {
                    let (name, pid, status) = exit.clone().unwrap_or_default();
                    Wake::GuestExited(name, pid, status)
                }
            };
            if let Some(stop) = self.on_wake(wake).await {
                return Ok(stop);
            }
        }
    }

    async fn on_wake(&mut self, wake: Wake) -> Option<Stop> {
        match wake {
            Wake::Signal(s) => {
                info!("received {s}");
                Some(Stop::Signal(s))
            }
            Wake::Event(ev) => self.on_event(ev).await,
            Wake::BootTimeout => Some(Stop::BootFailed(format!(
                "the guest did not connect within {} ms",
                self.cfg.boot_timeout().as_millis()
            ))),
            Wake::TerminalTimeout => {
                if let Some(p) = self.pending.take() {
                    warn!(
                        "generation {}: no terminal connection within {TERMINAL_WAIT:?}; dropping it",
                        p.generation
                    );
                }
                None
            }
            Wake::StatusGraceOver => {
                self.status_grace = None;
                let gone = self.guest_gone.as_deref().unwrap_or("the guest");
                Some(Stop::AgentDied(format!(
                    "{gone} without reporting the shell's exit"
                )))
            }
            Wake::ExecConnectTimeout => {
                self.exec_deadline = None;
                Some(Stop::AgentDied(format!(
                    "the guest did not open the exec port within {} s",
                    EXEC_CONNECT_WAIT.as_secs()
                )))
            }
            Wake::ExecRelayJoined(failure) => {
                if let Some(e) = failure {
                    warn!("an exec relay failed: {e}");
                }
                None
            }
            Wake::GuestExited(name, pid, status) => {
                info!("guest exited: {name} (pid {pid}) {status}");
                let described = self.backend.as_ref().and_then(|b| b.describe_exit());
                let reason = match described {
                    Some(words) => format!("{name} exited ({status}): {words}"),
                    None => format!("{name} exited ({status})"),
                };
                self.guest_gone = Some(reason.clone());
                if self.ready.pending() {
                    return Some(Stop::BootFailed(format!(
                        "{reason} before the guest connected"
                    )));
                }
                if self.shell_status.is_some() {
                    None
                } else if self.current.is_some() {
                    // Its last frames may still be in flight: a ShellExited
                    // wins over the loss if it arrives in time.
                    self.status_grace = Some(Instant::now() + STATUS_GRACE);
                    None
                } else {
                    Some(Stop::AgentDied(format!(
                        "{reason} without reporting the shell's exit"
                    )))
                }
            }
        }
    }

    async fn on_event(&mut self, ev: Event) -> Option<Stop> {
        match ev {
            Event::Hello(hello) => {
                self.on_hello(*hello).await;
                None
            }
            Event::Terminal(terminal) => {
                self.on_terminal(*terminal);
                None
            }
            Event::Gen { generation, event } => {
                if self.current.as_ref().map(|g| g.number) != Some(generation) {
                    debug!("ignoring {event:?} from stale generation {generation}");
                    return None;
                }
                self.on_gen_event(event).await
            }
            Event::Attach {
                conn,
                notices,
                reply,
            } => {
                let answer = if self.attached.is_some() {
                    Err(format!(
                        "a client is already attached to {} (detach it with Ctrl-] first)",
                        self.cfg.vm_id
                    ))
                } else if self.shell_status.is_some() && !self.cfg.persistent() {
                    Err("the shell has exited".to_owned())
                } else if self.cfg.exec {
                    Err("this VM runs a command, not a shell".to_owned())
                } else {
                    // Queued before the registration, so `Attached` is the
                    // first message this client gets.
                    let attached = ProcessToClient::Attached {
                        vm_id: self.cfg.vm_id.clone(),
                    };
                    self.epoch += 1;
                    let epoch = self.epoch;
                    let _ = notices.try_send(Outgoing::Msg(attached));
                    let _ = notices.try_send(Outgoing::StartOutput { epoch });
                    self.shared.set_notices(Some(notices));
                    self.shared.client_finished.send_replace(false);
                    self.shared.attached.send_replace(epoch);
                    self.attached = Some(conn);
                    Ok(())
                };
                let _ = reply.send(answer);
                None
            }
            Event::Closed { conn } => {
                if self.attached != Some(conn) {
                    return None;
                }
                info!("client {conn} detached");
                self.attached = None;
                self.shared.set_notices(None);
                self.shared.attached.send_replace(0);
                if self.shell_status.is_some() || self.exec_exited {
                    Some(Stop::ShellExited)
                } else if self.cfg.temporary {
                    Some(Stop::ClientGone)
                } else {
                    None
                }
            }
            Event::Shutdown => Some(Stop::ShutdownRequested),
            Event::DropGuest => {
                if let Some(p) = self.pending.take() {
                    info!(
                        "generation {}: dropped before its terminal connected",
                        p.generation
                    );
                }
                if let Some(g) = self.current.take() {
                    info!(
                        "generation {}: dropping the guest connections on request",
                        g.number
                    );
                    g.stop().await;
                    self.shared.set_bridged(false);
                }
                None
            }
            Event::FinalDelivered if self.exec_exited => Some(Stop::ShellExited),
            Event::FinalDelivered => self.shell_status.map(|_| Stop::ShellExited),
            Event::ExecConn(stream, codec) => {
                if self.cfg.persistent() {
                    if self.exec_idle.len() >= MAX_IDLE_EXEC {
                        warn!("exec connection closed: {MAX_IDLE_EXEC} idle ones already");
                    } else {
                        self.exec_idle.push_back((stream, codec));
                        self.match_execs();
                    }
                } else if !self.cfg.exec {
                    warn!("exec connection rejected: this VM runs a shell");
                } else if self.exec_conn.is_some() || self.exec_task.is_some() {
                    warn!("exec connection rejected: one is already being served");
                } else {
                    self.exec_conn = Some((stream, codec));
                    self.start_exec();
                }
                None
            }
            Event::ExecAttach {
                conn,
                notices,
                reply,
                start,
                stdin,
            } if self.cfg.persistent() => {
                let attached = ProcessToClient::Attached {
                    vm_id: self.cfg.vm_id.clone(),
                };
                let _ = notices.try_send(Outgoing::Msg(attached));
                info!("client {conn}: a command, waiting for an exec connection");
                self.exec_waiting.push_back(WaitingExec {
                    notices,
                    start,
                    stdin,
                });
                self.match_execs();
                let _ = reply.send(Ok(()));
                None
            }
            Event::ExecAttach {
                conn,
                notices,
                reply,
                start,
                stdin,
            } => {
                let answer = if !self.cfg.exec {
                    Err("this VM runs a shell, not a command".to_owned())
                } else if self.attached.is_some()
                    || self.exec_start.is_some()
                    || self.exec_task.is_some()
                {
                    Err("a client is already attached".to_owned())
                } else {
                    let attached = ProcessToClient::Attached {
                        vm_id: self.cfg.vm_id.clone(),
                    };
                    let _ = notices.try_send(Outgoing::Msg(attached));
                    let notices_for_start = notices.clone();
                    self.shared.set_notices(Some(notices));
                    self.epoch += 1;
                    self.shared.attached.send_replace(self.epoch);
                    self.attached = Some(conn);
                    self.exec_start = Some(WaitingExec {
                        notices: notices_for_start,
                        start,
                        stdin,
                    });
                    self.exec_deadline = Some(Instant::now() + EXEC_CONNECT_WAIT);
                    self.start_exec();
                    Ok(())
                };
                let _ = reply.send(answer);
                None
            }
            Event::ExecEnded { id, result } if self.cfg.persistent() => {
                debug!("exec {id} ended: {result:?}");
                None
            }
            Event::ExecEnded { result: Ok(()), .. } => {
                self.exec_task = None;
                self.exec_exited = true;
                // The client's writer reports FinalDelivered.
                None
            }
            Event::ExecEnded {
                result: Err(reason),
                ..
            } => {
                self.exec_task = None;
                if self.exec_exited {
                    None
                } else {
                    Some(Stop::AgentDied(reason))
                }
            }
        }
    }

    /// Starts the exec relay once both the client's command and the guest's
    /// exec connection are here.
    fn start_exec(&mut self) {
        if self.exec_conn.is_none() || self.exec_start.is_none() {
            return;
        }
        let (Some((stream, codec)), Some(waiting)) =
            (self.exec_conn.take(), self.exec_start.take())
        else {
            return;
        };
        info!("exec: relaying the command");
        self.exec_deadline = None;
        self.next_exec_id += 1;
        let relay = crate::exec::Relay {
            id: self.next_exec_id,
            stream,
            codec: *codec,
            start: waiting.start,
            notices: waiting.notices,
            stdin: waiting.stdin,
        };
        self.exec_task = Some(tokio::spawn(crate::exec::relay(
            relay,
            self.events_tx.clone(),
        )));
    }

    /// A persistent VM: pairs waiting commands with idle guest connections,
    /// oldest first; each pair gets its own relay.
    fn match_execs(&mut self) {
        while !self.exec_idle.is_empty() && !self.exec_waiting.is_empty() {
            let (Some((stream, codec)), Some(waiting)) =
                (self.exec_idle.pop_front(), self.exec_waiting.pop_front())
            else {
                return;
            };
            self.next_exec_id += 1;
            let id = self.next_exec_id;
            info!("exec {id}: relaying a command");
            let relay = crate::exec::Relay {
                id,
                stream,
                codec: *codec,
                start: waiting.start,
                notices: waiting.notices,
                stdin: waiting.stdin,
            };
            self.exec_relays
                .spawn(crate::exec::relay(relay, self.events_tx.clone()));
        }
    }

    async fn on_hello(&mut self, hello: Hello) {
        if self.shell_status.is_some() {
            if self.cfg.persistent() {
                debug!(
                    "the next shell said hello; serving it once the last one's exit is finished"
                );
                self.deferred_hello = Some(hello);
            } else {
                warn!("control connection rejected: the shell has already exited");
            }
            return;
        }
        if let Some(p) = self.pending.take() {
            info!(
                "generation {}: superseded before its terminal connected",
                p.generation
            );
        }
        if let Some(g) = self.current.take() {
            info!(
                "generation {}: closing, the agent connected again",
                g.number
            );
            g.stop().await;
            self.shared.set_bridged(false);
        }
        self.status_grace = None;
        self.next_generation += 1;
        let generation = self.next_generation;
        self.shared
            .set_generation(generation, hello.connects, hello.shell_pid);
        self.records
            .hello(generation, hello.connects, hello.shell_pid);
        info!(
            "guest connected generation={generation} agent_connects={} shell_pid={}",
            hello.connects, hello.shell_pid
        );
        let mut control = hello.stream;
        let trace = hello.trace;
        let mut frames = Vec::new();
        let ack = HostToGuest::HelloAck {
            version: PROTOCOL_VERSION,
            generation,
        };
        let mut encoded = Codec::<Host>::encode_into(&ack, &mut frames);
        if let Some((cols, rows)) = self.shared.size() {
            encoded = encoded.and_then(|()| {
                Codec::<Host>::encode_into(&HostToGuest::Resize { cols, rows }, &mut frames)
            });
        }
        if let Err(e) = encoded {
            warn!(
                "generation {generation}: cannot encode the ack: {}",
                chain(&e)
            );
            return;
        }
        match tokio::time::timeout(STATUS_GRACE, control.write_all(&frames)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!("generation {generation}: cannot send the hello ack: {e}");
                return;
            }
            Err(_) => {
                warn!("generation {generation}: the hello ack could not be sent in time");
                return;
            }
        }
        let pending = Pending {
            generation,
            control,
            trace,
            codec: hello.codec,
            deadline: Instant::now() + TERMINAL_WAIT,
        };
        if self.cfg.exec {
            // A command runs on the exec port: no terminal to pair.
            self.bridge(pending, None);
        } else {
            self.pending = Some(pending);
        }
    }

    fn on_terminal(&mut self, t: crate::state::Terminal) {
        match &self.pending {
            Some(p) if p.generation == t.generation => {}
            Some(p) => {
                warn!(
                    "terminal connection rejected: it names generation {}, generation {} is waiting",
                    t.generation, p.generation
                );
                return;
            }
            None => {
                warn!(
                    "terminal connection rejected: generation {} is not waiting for one",
                    t.generation
                );
                return;
            }
        }
        if let Some(p) = self.pending.take() {
            self.bridge(p, Some((t.stream, t.codec, t.trace)));
        }
    }

    fn bridge(
        &mut self,
        p: Pending,
        terminal: Option<(
            UnixStream,
            Codec<capsem_proto::frame::TermHost>,
            crate::conntrace::ConnTrace,
        )>,
    ) {
        let generation = Generation::start(
            p.generation,
            (p.control, p.codec, p.trace),
            terminal,
            self.shared.clone(),
            self.events_tx.clone(),
        );
        self.current = Some(generation);
        self.shared.set_bridged(true);
        info!("generation {} bridged", p.generation);
        if self.ready.pending() {
            match self.ready.ready() {
                Ok(()) => info!("ready"),
                Err(e) => warn!("cannot write to the ready fd: {e}"),
            }
        }
    }

    async fn on_gen_event(&mut self, event: GenEvent) -> Option<Stop> {
        match event {
            GenEvent::TransportLost(reason) => {
                if self.shell_status.is_some() {
                    debug!("after the shell's exit: {reason}");
                    return None;
                }
                self.transport_lost(&reason).await
            }
            GenEvent::ShellExited { exit_code, signal } => {
                info!("shell exited: exit_code={exit_code:?} signal={signal:?}");
                self.shell_status = Some((exit_code, signal));
                self.status_grace = None;
                self.finish_shell().await
            }
        }
    }

    async fn transport_lost(&mut self, reason: &str) -> Option<Stop> {
        if let Some(g) = self.current.take() {
            warn!("generation {}: transport lost: {reason}", g.number);
            g.stop().await;
            self.shared.set_bridged(false);
        }
        self.status_grace = None;
        if let Some(gone) = &self.guest_gone {
            return Some(Stop::AgentDied(format!(
                "{gone} without reporting the shell's exit ({reason})"
            )));
        }
        info!("waiting for the agent to reconnect");
        None
    }

    /// The status arrived after the last output chunk, which the terminal
    /// reader already queued: the status goes to the client behind them.
    async fn finish_shell(&mut self) -> Option<Stop> {
        let (exit_code, signal) = self.shell_status?;
        if self.attached.is_none() && !self.cfg.persistent() {
            return Some(Stop::ShellExited);
        }
        if self.cfg.persistent() && !self.exit_queued {
            // Before the client can see the status, so a command it runs
            // next (`capsem inspect`) finds the exit recorded.
            self.records.shell_exited(exit_code, signal);
        }
        if self.attached.is_some() && !self.exit_queued {
            self.exit_queued = true;
            let out = self.shared.out_tx.clone();
            let epoch = *self.shared.attached.borrow();
            tokio::spawn(async move {
                let _ = out
                    .send(ToClient::Exited {
                        epoch,
                        exit_code,
                        signal,
                    })
                    .await;
            });
        }
        if self.cfg.persistent() {
            self.next_shell().await;
        }
        // The client's writer reports FinalDelivered (or the client leaves).
        None
    }

    /// A persistent VM's shell ended and its status is on its way to the
    /// client: the VM stays, and the agent's next shell (its next hello)
    /// starts from a clean slate. The client, which leaves after the status,
    /// no longer gets output.
    async fn next_shell(&mut self) {
        info!("persistent VM: waiting for the agent's next shell");
        if let Some(conn) = self.attached.take() {
            debug!("client {conn} gets no more output");
            self.shared.set_notices(None);
            self.shared.attached.send_replace(0);
        }
        if let Some(g) = self.current.take() {
            g.stop().await;
            self.shared.set_bridged(false);
        }
        self.shared.with_scrollback(|s| s.clear());
        self.shell_status = None;
        self.exit_queued = false;
        self.status_grace = None;
        if let Some(hello) = self.deferred_hello.take() {
            Box::pin(self.on_hello(hello)).await;
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

    /// Stops everything, once: guest, descendants, listeners, files.
    pub async fn teardown(&mut self, stop: &Stop) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        info!("tearing down: {stop}");
        if let (Some(_), Some(reason)) = (self.attached, stop.lost_reason()) {
            let reason = self.with_log_hint(&reason, stop);
            if !*self.shared.client_finished.borrow()
                && self
                    .shared
                    .notify_client(ProcessToClient::SessionLost { reason })
            {
                let mut delivered = self.shared.client_finished.subscribe();
                let _ = tokio::time::timeout(CLIENT_FLUSH_WAIT, delivered.wait_for(|d| *d)).await;
            }
        }
        if self.current.is_some()
            && self.guest_gone.is_none()
            && self.shared.guest_tx.try_send(HostToGuest::Shutdown).is_ok()
        {
            info!("sent shutdown to the agent");
        }
        if let Some(backend) = &self.backend {
            if !vmm::all_exited(backend.as_ref()) {
                let mut exit = self.guest_exit.clone();
                let wait = if self.cfg.persistent() && self.cfg.vmm == crate::config::VmmKind::Qemu
                {
                    PERSISTENT_EXIT_WAIT
                } else {
                    GUEST_EXIT_WAIT
                };
                if tokio::time::timeout(wait, exit.wait_for(Option::is_some))
                    .await
                    .is_err()
                {
                    info!("the guest did not exit within {wait:?}; killing it");
                }
                vmm::kill_all(backend.as_ref(), &self.reaper);
            }
        }
        if let Some(g) = self.current.take() {
            g.stop().await;
        }
        if let Some(task) = self.exec_task.take() {
            task.abort();
            let _ = task.await;
        }
        self.exec_relays.shutdown().await;
        self.exec_idle.clear();
        self.exec_waiting.clear();
        self.exec_conn = None;
        self.pending = None;
        self.shared.set_bridged(false);
        self.accept_stop.stop();
        for task in self.accept_tasks.drain(..) {
            if let Err(e) = task.await {
                warn!("an accept task failed: {e}");
            }
        }
        if let Some(task) = self.audit_task.take() {
            match task.await {
                Ok(log) => crate::audit::finish(&log, self.cfg.audit_log.as_deref()),
                Err(e) => warn!("the audit task failed: {e}"),
            }
        }
        crate::teardown::reap_all(&self.reaper, REAP_WAIT).await;
        self.reaper_task.abort();
        for path in self.dir.sockets() {
            if let Err(e) = crate::teardown::remove_file(&path) {
                warn!("{}", chain(&e));
            }
        }
        if !self.cfg.temporary {
            self.records.stopped();
        }
        if self.cfg.temporary {
            let keep = crate::logkeep::LogKeep::new(&self.cfg.home(), &self.cfg.vm_id);
            if keep.wanted(stop.failed()) {
                info!("keeping the logs in {}", keep.dest.display());
                // Moved after this line so process.log has it.
                if let Err(e) = keep.keep(self.dir.root()) {
                    warn!("{}", chain(&e));
                }
            }
            if let Err(e) = crate::teardown::remove_dir(self.dir.root()) {
                warn!("{}", chain(&e));
            }
        }
        info!("teardown complete");
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
