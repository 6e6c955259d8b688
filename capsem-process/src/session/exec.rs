//! The exec broker: pairs clients' commands with the guest's exec
//! connections and owns their relays.
//!
//! * [`One`] (`--exec`, `capsem run`): one command per VM, as phases that
//!   own their data: waiting for the command and/or the connection, the
//!   running relay, done.
//! * [`Pool`] (a persistent VM, `capsem exec`): idle connections and
//!   waiting commands, paired oldest first, one relay each in a `JoinSet`
//!   that the session loop joins as they finish.

use std::collections::VecDeque;
use std::time::Duration;

use capsem_proto::exec::HostToExec;
use capsem_proto::frame::ExecHost;
use capsem_proto::Codec;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::exec::Relay;
use crate::state::{Event, Outgoing};

/// How long the guest may take to open the exec port once the client's
/// command is here (it opens it right after its hello was acknowledged).
pub const EXEC_CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Idle exec connections kept beyond this are closed (the agent keeps one).
const MAX_IDLE_EXEC: usize = 4;

/// A guest exec connection whose hello was accepted.
pub type IdleExec = (UnixStream, Box<Codec<ExecHost>>);

/// A client's command, waiting for a guest exec connection.
#[derive(Debug)]
pub struct WaitingExec {
    pub notices: mpsc::Sender<Outgoing>,
    pub start: HostToExec,
    pub stdin: mpsc::Receiver<HostToExec>,
}

fn relay(id: u64, (stream, codec): IdleExec, w: WaitingExec) -> Relay {
    Relay {
        id,
        stream,
        codec: *codec,
        start: w.start,
        notices: w.notices,
        stdin: w.stdin,
    }
}

/// `--exec`: the one command's life.
#[derive(Debug, Default)]
pub enum One {
    #[default]
    Idle,
    /// The client's command is here; the guest must connect by `deadline`.
    Command {
        waiting: WaitingExec,
        deadline: Instant,
    },
    /// The guest's connection is here; no command yet.
    Connection(IdleExec),
    Running(JoinHandle<()>),
    /// The status was queued to the client (or the relay failed).
    Done,
}

impl One {
    /// Until when the guest may still open the exec port.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            One::Command { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// Whether a client's command was taken (one per VM).
    pub fn has_command(&self) -> bool {
        matches!(self, One::Command { .. } | One::Running(_) | One::Done)
    }

    /// The client's command arrived.
    pub fn command(&mut self, waiting: WaitingExec, events: &mpsc::Sender<Event>) {
        *self = match std::mem::take(self) {
            One::Connection(conn) => start(conn, waiting, events),
            _ => One::Command {
                waiting,
                deadline: Instant::now() + EXEC_CONNECT_WAIT,
            },
        };
    }

    /// The guest's exec connection arrived.
    pub fn connection(&mut self, conn: IdleExec, events: &mpsc::Sender<Event>) {
        *self = match std::mem::take(self) {
            One::Idle => One::Connection(conn),
            One::Command { waiting, .. } => start(conn, waiting, events),
            other => {
                warn!("exec connection rejected: one is already being served");
                other
            }
        };
    }

    /// The relay ended: `Ok` once the status was queued to the client.
    /// Returns the failure if the command had not finished.
    pub fn ended(&mut self, result: Result<(), String>) -> Option<String> {
        let was_done = matches!(self, One::Done);
        *self = One::Done;
        match result {
            Ok(()) => None,
            Err(reason) if !was_done => Some(reason),
            Err(_) => None,
        }
    }

    /// Teardown: stops the relay, if one runs, and waits for it.
    pub async fn stop(&mut self) {
        if let One::Running(task) = std::mem::take(self) {
            task.abort();
            let _ = task.await;
        }
    }
}

fn start(conn: IdleExec, waiting: WaitingExec, events: &mpsc::Sender<Event>) -> One {
    info!("exec: relaying the command");
    let task = tokio::spawn(crate::exec::relay(relay(1, conn, waiting), events.clone()));
    One::Running(task)
}

/// A persistent VM's exec pool.
#[derive(Debug, Default)]
pub struct Pool {
    idle: VecDeque<IdleExec>,
    waiting: VecDeque<WaitingExec>,
    pub relays: JoinSet<()>,
    next_id: u64,
}

impl Pool {
    pub fn connection(&mut self, conn: IdleExec, events: &mpsc::Sender<Event>) {
        if self.idle.len() >= MAX_IDLE_EXEC {
            warn!("exec connection closed: {MAX_IDLE_EXEC} idle ones already");
            return;
        }
        self.idle.push_back(conn);
        self.pair(events);
    }

    /// A command is waiting or running: the VM is not idle.
    pub fn busy(&self) -> bool {
        !self.waiting.is_empty() || !self.relays.is_empty()
    }

    pub fn command(&mut self, waiting: WaitingExec, events: &mpsc::Sender<Event>) {
        self.waiting.push_back(waiting);
        self.pair(events);
    }

    /// Pairs waiting commands with idle connections, oldest first.
    fn pair(&mut self, events: &mpsc::Sender<Event>) {
        while !self.idle.is_empty() && !self.waiting.is_empty() {
            let (Some(conn), Some(waiting)) = (self.idle.pop_front(), self.waiting.pop_front())
            else {
                return;
            };
            self.next_id += 1;
            let id = self.next_id;
            info!("exec {id}: relaying a command");
            self.relays
                .spawn(crate::exec::relay(relay(id, conn, waiting), events.clone()));
        }
    }

    /// Teardown: stops every relay and waits for them.
    pub async fn stop(&mut self) {
        self.relays.shutdown().await;
        self.idle.clear();
        self.waiting.clear();
    }
}
