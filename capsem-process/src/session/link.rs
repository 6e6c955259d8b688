//! The link to the guest agent: which generation is acknowledged, paired or
//! bridged, as one enum whose phases own their connections and the writers'
//! receivers ([`Inputs`]). Transitions: a valid hello acks a new generation
//! (the previous one is stopped and joined first); its terminal hello pairs
//! it (`Acked` → `Bridged`); a loss or a drop request stops it (`Down`).

use std::sync::Arc;
use std::time::Duration;

use capsem_proto::frame::{Host, TermHost};
use capsem_proto::guest::{HostToGuest, PROTOCOL_VERSION};
use capsem_proto::Codec;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::bridge::{Generation, Inputs, TaskFailed};
use crate::conntrace::ConnTrace;
use crate::log::chain;
use crate::state::{Event, Hello, Shared, Terminal};

/// How long an acknowledged generation may wait for its terminal connection.
pub const TERMINAL_WAIT: Duration = Duration::from_secs(5);
/// How long the hello ack may take to be written.
const ACK_WAIT: Duration = Duration::from_secs(2);

/// A generation whose hello was acknowledged, waiting for its terminal.
#[derive(Debug)]
pub struct Acked {
    pub generation: u64,
    control: UnixStream,
    trace: ConnTrace,
    codec: Codec<Host>,
    pub deadline: Instant,
    inputs: Inputs,
}

/// The link's phase.
#[derive(Debug)]
pub enum Phase {
    /// No generation: before the first hello, or after a loss.
    Down(Inputs),
    Acked(Acked),
    Bridged(Generation),
    /// While a transition is in flight, or after a generation's task failed
    /// and lost the receivers (the session then ends).
    Moving,
}

/// The link and the generation counter.
#[derive(Debug)]
pub struct Link {
    pub phase: Phase,
    next_generation: u64,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
}

impl Link {
    pub fn new(inputs: Inputs, shared: Arc<Shared>, events: mpsc::Sender<Event>) -> Self {
        Self {
            phase: Phase::Down(inputs),
            next_generation: 0,
            shared,
            events,
        }
    }

    /// The number the next acknowledged generation gets.
    pub fn next_generation(&self) -> u64 {
        self.next_generation + 1
    }

    /// The bridged generation's number.
    pub fn bridged(&self) -> Option<u64> {
        match &self.phase {
            Phase::Bridged(g) => Some(g.number),
            _ => None,
        }
    }

    /// When the acknowledged generation stops waiting for its terminal.
    pub fn terminal_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Acked(a) => Some(a.deadline),
            _ => None,
        }
    }

    /// Stops whatever generation there is (joining its tasks) and goes
    /// `Down`; returns the number of the generation that was stopped.
    pub async fn down(&mut self) -> Result<Option<u64>, TaskFailed> {
        let (inputs, number) = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Down(inputs) => (inputs, None),
            Phase::Acked(a) => (a.inputs, Some(a.generation)),
            Phase::Bridged(g) => {
                let number = g.number;
                let inputs = g.stop().await?;
                self.shared.set_bridged(false);
                (inputs, Some(number))
            }
            // A generation whose task failed: the session is ending.
            Phase::Moving => return Ok(None),
        };
        self.phase = Phase::Down(inputs);
        Ok(number)
    }

    /// A valid hello: the previous generation is stopped, the next is
    /// acknowledged (with the remembered terminal size). `exec`: no terminal
    /// will come, so it is bridged at once. Returns whether it was bridged.
    pub async fn on_hello(&mut self, hello: Hello, exec: bool) -> Result<bool, TaskFailed> {
        if let Some(old) = self.down().await? {
            info!("generation {old}: closing, the agent connected again");
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        self.shared
            .set_generation(generation, hello.connects, hello.shell_pid);
        info!(
            "guest connected generation={generation} agent_connects={} shell_pid={}",
            hello.connects, hello.shell_pid
        );
        let mut control = hello.stream;
        if let Err(reason) = self.ack(&mut control, generation).await {
            warn!("generation {generation}: {reason}");
            return Ok(false);
        }
        let inputs = match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Down(inputs) => inputs,
            _ => unreachable_moving(),
        };
        let acked = Acked {
            generation,
            control,
            trace: hello.trace,
            codec: hello.codec,
            deadline: Instant::now() + TERMINAL_WAIT,
            inputs,
        };
        if exec {
            self.bridge(acked, None);
            return Ok(true);
        }
        self.phase = Phase::Acked(acked);
        Ok(false)
    }

    async fn ack(&self, control: &mut UnixStream, generation: u64) -> Result<(), String> {
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
        encoded.map_err(|e| format!("cannot encode the ack: {}", chain(&e)))?;
        match tokio::time::timeout(ACK_WAIT, control.write_all(&frames)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot send the hello ack: {e}")),
            Err(_) => Err("the hello ack could not be sent in time".into()),
        }
    }

    /// A terminal connection whose hello named `t.generation`: paired only
    /// with that acknowledged generation. Returns whether it was bridged.
    pub fn on_terminal(&mut self, t: Terminal) -> bool {
        let waiting = match &self.phase {
            Phase::Acked(a) => Some(a.generation),
            _ => None,
        };
        if waiting != Some(t.generation) {
            match waiting {
                Some(w) => warn!(
                    "terminal connection rejected: it names generation {}, generation {w} is waiting",
                    t.generation
                ),
                None => warn!(
                    "terminal connection rejected: generation {} is not waiting for one",
                    t.generation
                ),
            }
            return false;
        }
        let Phase::Acked(acked) = std::mem::replace(&mut self.phase, Phase::Moving) else {
            unreachable_moving()
        };
        self.bridge(acked, Some((t.stream, t.codec, t.trace)));
        true
    }

    fn bridge(&mut self, a: Acked, terminal: Option<(UnixStream, Codec<TermHost>, ConnTrace)>) {
        let generation = Generation::start(
            a.generation,
            (a.control, a.codec, a.trace),
            terminal,
            a.inputs,
            self.shared.clone(),
            self.events.clone(),
        );
        self.phase = Phase::Bridged(generation);
        self.shared.set_bridged(true);
        info!("generation {} bridged", a.generation);
    }

    /// The acknowledged generation's terminal did not come in time.
    pub fn terminal_timeout(&mut self) {
        if let Phase::Acked(a) = std::mem::replace(&mut self.phase, Phase::Moving) {
            warn!(
                "generation {}: no terminal connection within {TERMINAL_WAIT:?}; dropping it",
                a.generation
            );
            self.phase = Phase::Down(a.inputs);
        }
    }
}

/// A synchronous transition found the phase it had just checked changed:
/// impossible, no await separates the check from the take.
fn unreachable_moving() -> ! {
    unreachable!("the link was observed between two phases")
}
