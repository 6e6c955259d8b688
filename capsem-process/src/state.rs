//! State shared by the session's tasks: the VM's status, the senders of the
//! long-lived channels between the client and the current generation (their
//! receivers, [`Receivers`], are owned by one task at a time and handed over
//! by move, never claimed through a lock), and the event type every task
//! reports to the session loop with.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsem_proto::exec::HostToExec;
use capsem_proto::frame::Host;
use capsem_proto::guest::HostToGuest;
use capsem_proto::ipc::{ProcessToClient, VmStatus};
use capsem_proto::Codec;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

/// Terminal output chunks buffered towards the client (each at most
/// `MAX_IPC_CHUNK`): 16 x 64 KiB bounds the memory a slow client can cost.
pub const OUTPUT_CHUNKS: usize = 16;
/// Input chunks buffered towards the guest.
pub const INPUT_CHUNKS: usize = 16;
/// The shell's most recent output, replayed to a client when it attaches.
pub const SCROLLBACK_BYTES: usize = 256 * 1024;

/// What the terminal path hands the attached client, in order. Each item
/// carries the epoch of the attach it was meant for: a client's writer
/// drops items of another attach (queued before it came, or for the client
/// before it), so a reattached client never sees bytes twice.
#[derive(Debug)]
pub enum ToClient {
    Output {
        epoch: u64,
        data: Vec<u8>,
    },
    /// Queued only after every `Output` of the shell.
    Exited {
        epoch: u64,
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
}

impl ToClient {
    pub fn epoch(&self) -> u64 {
        match self {
            ToClient::Output { epoch, .. } | ToClient::Exited { epoch, .. } => *epoch,
        }
    }
}

/// What a client connection's writer sends, besides terminal output.
#[derive(Debug)]
pub enum Outgoing {
    Msg(ProcessToClient),
    /// The attach was accepted: forward terminal output of this attach
    /// epoch from `output`, which the client's writer owns until its
    /// connection ends and then hands back in [`Event::Closed`].
    StartOutput {
        epoch: u64,
        output: mpsc::Receiver<ToClient>,
    },
}

/// The last [`SCROLLBACK_BYTES`] of terminal output: a ring, oldest bytes
/// dropped first.
#[derive(Debug, Default)]
pub struct Scrollback {
    buf: std::collections::VecDeque<u8>,
}

impl Scrollback {
    pub fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(SCROLLBACK_BYTES)..];
        let excess = (self.buf.len() + data.len()).saturating_sub(SCROLLBACK_BYTES);
        self.buf.drain(..excess);
        self.buf.extend(data);
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

/// How a generation's tasks report to the session loop.
#[derive(Debug)]
pub enum GenEvent {
    /// EOF or error on a guest connection, or an invalid frame.
    TransportLost(String),
    /// The guest's last terminal frame, the shell's status: every output
    /// chunk before it was already forwarded.
    ShellExited {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
}

/// A control connection whose hello was accepted.
#[derive(Debug)]
pub struct Hello {
    pub stream: UnixStream,
    pub trace: crate::conntrace::ConnTrace,
    /// Holds any bytes the guest sent after the hello.
    pub codec: Codec<Host>,
    pub connects: u64,
    pub shell_pid: u32,
}

/// A terminal connection whose hello (token and generation) was accepted.
#[derive(Debug)]
pub struct Terminal {
    pub stream: UnixStream,
    pub trace: crate::conntrace::ConnTrace,
    /// Holds any bytes the guest sent after the hello.
    pub codec: Codec<capsem_proto::frame::TermHost>,
    /// The generation the hello names.
    pub generation: u64,
}

/// Everything the session loop reacts to.
#[derive(Debug)]
pub enum Event {
    Hello(Box<Hello>),
    Terminal(Box<Terminal>),
    Gen {
        generation: u64,
        event: GenEvent,
    },
    Attach {
        conn: u64,
        notices: mpsc::Sender<Outgoing>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A ctl.sock connection ended; `output` is the terminal output
    /// receiver, if its writer held it.
    Closed {
        conn: u64,
        output: Option<mpsc::Receiver<ToClient>>,
    },
    Shutdown,
    DropGuest,
    /// The attached client's writer wrote `ShellExited`, `ExecExit` or
    /// `SessionLost`.
    FinalDelivered,
    /// A guest connection on the exec port whose hello was accepted (its
    /// codec holds any bytes after the hello).
    ExecConn(UnixStream, Box<Codec<capsem_proto::frame::ExecHost>>),
    /// A client asked to run a command (`Exec`): attach it like `Attach`
    /// and keep `start` for the guest.
    ExecAttach {
        conn: u64,
        notices: mpsc::Sender<Outgoing>,
        reply: oneshot::Sender<Result<(), String>>,
        start: HostToExec,
        /// This client's stdin, EOF and signals for its command.
        stdin: mpsc::Receiver<HostToExec>,
    },
    /// The exec relay of command `id` ended: the status was queued to the
    /// client (`Ok`), or the exec connection ended without one.
    ExecEnded {
        id: u64,
        result: Result<(), String>,
    },
}

#[derive(Debug, Default)]
struct Status {
    generation: u64,
    agent_connects: u64,
    shell_pid: Option<u32>,
    guest_pid: Option<u32>,
    bridged: bool,
    size: Option<(u16, u16)>,
}

/// Shared by every task of the session.
#[derive(Debug)]
pub struct Shared {
    pub vm_id: String,
    pub token: String,
    pub heartbeat: Duration,
    pub missed_pongs: u32,
    status: Mutex<Status>,
    /// Terminal output towards the attached client (its receiver:
    /// [`Receivers::output`]).
    pub out_tx: mpsc::Sender<ToClient>,
    /// The client's keystrokes towards the guest ([`Receivers::keys`]).
    pub in_tx: mpsc::Sender<Vec<u8>>,
    /// Control messages towards the guest ([`Receivers::guest`]).
    pub guest_tx: mpsc::Sender<HostToGuest>,
    /// The attached client's epoch (each attach gets the next number), or 0
    /// while none is attached. Output is forwarded only while it is set.
    pub attached: watch::Sender<u64>,
    /// The shell's recent output (see [`Scrollback`]); only the terminal
    /// reader of the current generation writes it.
    pub scrollback: Mutex<Scrollback>,
    notices: Mutex<Option<mpsc::Sender<Outgoing>>>,
    /// Set once the attached client's writer is finished: its final message
    /// was delivered, or the client is gone and it never can be.
    pub client_finished: watch::Sender<bool>,
    /// The newest generation whose control connection the agent closed (0:
    /// none yet). The agent holds its last one open until its very last
    /// act, so a temporary VM's teardown kills the guest at this close
    /// instead of waiting for its power-off (`session::teardown`).
    pub control_closed: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The receivers of [`Shared`]'s channels. The session owns them and moves
/// them: `output` to the attached client's writer, `guest` and `keys` to the
/// current generation's writers, which give them back when stopped.
#[derive(Debug)]
pub struct Receivers {
    pub output: mpsc::Receiver<ToClient>,
    pub keys: mpsc::Receiver<Vec<u8>>,
    pub guest: mpsc::Receiver<HostToGuest>,
}

impl Shared {
    pub fn new(
        vm_id: String,
        token: String,
        heartbeat: Duration,
        missed_pongs: u32,
    ) -> (Arc<Self>, Receivers) {
        let (out_tx, output) = mpsc::channel(OUTPUT_CHUNKS);
        let (in_tx, keys) = mpsc::channel(INPUT_CHUNKS);
        let (guest_tx, guest) = mpsc::channel(32);
        let receivers = Receivers {
            output,
            keys,
            guest,
        };
        let shared = Arc::new(Self {
            vm_id,
            token,
            heartbeat,
            missed_pongs,
            status: Mutex::default(),
            out_tx,
            in_tx,
            guest_tx,
            attached: watch::channel(0).0,
            scrollback: Mutex::default(),
            notices: Mutex::new(None),
            client_finished: watch::channel(false).0,
            control_closed: watch::channel(0).0,
        });
        (shared, receivers)
    }

    pub fn status(&self) -> VmStatus {
        let s = lock(&self.status);
        VmStatus {
            vm_id: self.vm_id.clone(),
            generation: s.generation,
            agent_connects: s.agent_connects,
            guest_pid: s.guest_pid,
            shell_pid: s.shell_pid,
            attached: *self.attached.borrow() != 0,
            bridged: s.bridged,
        }
    }

    pub fn set_guest_pid(&self, pid: Option<u32>) {
        lock(&self.status).guest_pid = pid;
    }

    pub fn set_generation(&self, generation: u64, agent_connects: u64, shell_pid: u32) {
        let mut s = lock(&self.status);
        s.generation = generation;
        s.agent_connects = agent_connects;
        s.shell_pid = Some(shell_pid);
    }

    pub fn set_bridged(&self, bridged: bool) {
        lock(&self.status).bridged = bridged;
    }

    pub fn size(&self) -> Option<(u16, u16)> {
        lock(&self.status).size
    }

    /// Remembers the client's terminal size and forwards it to the guest.
    pub fn resize(&self, cols: u16, rows: u16) {
        lock(&self.status).size = Some((cols, rows));
        if self
            .guest_tx
            .try_send(HostToGuest::Resize { cols, rows })
            .is_err()
        {
            // Sent again after the next hello ack anyway.
            tracing::debug!("resize not queued: the guest channel is full");
        }
    }

    /// Runs `f` on the scrollback ring.
    pub fn with_scrollback<R>(&self, f: impl FnOnce(&mut Scrollback) -> R) -> R {
        f(&mut lock(&self.scrollback))
    }

    /// The attached client's message sender, or none.
    pub fn set_notices(&self, tx: Option<mpsc::Sender<Outgoing>>) {
        *lock(&self.notices) = tx;
    }

    /// Sends a message to the attached client, if any, without waiting.
    pub fn notify_client(&self, msg: ProcessToClient) -> bool {
        match &*lock(&self.notices) {
            Some(tx) => tx.try_send(Outgoing::Msg(msg)).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrollback_keeps_the_newest_bytes() {
        let mut s = Scrollback::default();
        s.push(b"abc");
        assert_eq!(s.snapshot(), b"abc");
        let big: Vec<u8> = (0..SCROLLBACK_BYTES + 10)
            .map(|i| (i % 251) as u8)
            .collect();
        s.push(&big);
        assert_eq!(s.snapshot().len(), SCROLLBACK_BYTES);
        assert_eq!(s.snapshot(), big[10..]);
        s.push(b"xy");
        assert_eq!(s.snapshot().len(), SCROLLBACK_BYTES);
        assert!(s.snapshot().ends_with(b"xy"));
        assert_eq!(s.snapshot()[0], big[12]);
        s.clear();
        assert!(s.snapshot().is_empty());
    }
}
