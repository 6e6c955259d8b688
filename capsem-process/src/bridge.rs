//! One connection generation: four tasks (control reader, control writer
//! with the heartbeat, terminal reader, terminal writer; an exec-mode
//! generation has no terminal and only the first two), all stopped by one
//! signal and all joined by [`Generation::stop`] before its connections are
//! dropped. Every way a task ends is reported as a typed [`GenEvent`]. The
//! two writers own the long-lived receivers ([`Inputs`]) while they run and
//! return them when stopped, so the next generation gets them by move.
//!
//! The terminal carries frames (`capsem_proto::terminal`): the reader
//! forwards only `Output` payloads (to the scrollback ring and the attached
//! client) and reports `Exit`, the stream's last frame, as
//! [`GenEvent::ShellExited`], so every output chunk is queued to the client
//! before the status by construction.

use std::future::Future;
use std::sync::{Arc, Mutex};

use capsem_proto::conn::{AsyncFrameReader, AsyncFrameWriter};
use capsem_proto::frame::{Host, TermHost};
use capsem_proto::guest::{BootStage, GuestToHost, HostToGuest, MAX_BOOT_STAGES, MAX_STAGE_NAME};
use capsem_proto::ipc::{ProcessToClient, MAX_IPC_CHUNK};
use capsem_proto::terminal::{HostToTerm, TermToHost, MAX_TERM_CHUNK};
use capsem_proto::Codec;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::heartbeat::{Heartbeat, Transition};
use crate::log::chain;
use crate::state::{Event, GenEvent, Shared, ToClient};

/// The receivers a generation's writers own while it runs.
#[derive(Debug)]
pub struct Inputs {
    pub guest: mpsc::Receiver<HostToGuest>,
    pub keys: mpsc::Receiver<Vec<u8>>,
}

/// The keystroke receiver: owned by the terminal writer, or kept here when
/// the generation has no terminal (exec mode).
#[derive(Debug)]
enum Keys {
    Writer(JoinHandle<mpsc::Receiver<Vec<u8>>>),
    Unused(mpsc::Receiver<Vec<u8>>),
}

/// A generation's task died without giving its receiver back (a panic).
#[derive(Debug, thiserror::Error)]
#[error("generation {generation}: the {task} task failed")]
pub struct TaskFailed {
    generation: u64,
    task: &'static str,
    #[source]
    source: tokio::task::JoinError,
}

/// The running tasks of one generation.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    stop: watch::Sender<bool>,
    /// The readers.
    tasks: JoinSet<()>,
    control_writer: JoinHandle<mpsc::Receiver<HostToGuest>>,
    keys: Keys,
    /// Declared after `tasks`: the close is logged once the tasks, which
    /// own the streams, are gone.
    _traces: Vec<crate::conntrace::ConnTrace>,
}

/// What every task of a generation needs.
#[derive(Debug, Clone)]
struct Ctx {
    number: u64,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
}

impl Ctx {
    async fn report(&self, event: GenEvent) {
        let _ = self
            .events
            .send(Event::Gen {
                generation: self.number,
                event,
            })
            .await;
    }
}

impl Generation {
    /// Starts serving a control connection (hello already acknowledged) and
    /// its paired terminal connection (none in exec mode).
    pub fn start(
        number: u64,
        control: (UnixStream, Codec<Host>, crate::conntrace::ConnTrace),
        terminal: Option<(UnixStream, Codec<TermHost>, crate::conntrace::ConnTrace)>,
        inputs: Inputs,
        shared: Arc<Shared>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let (control, codec, ctl_trace) = control;
        let stop = watch::channel(false).0;
        let ctx = Ctx {
            number,
            shared: shared.clone(),
            events,
        };
        let heartbeat = Arc::new(Mutex::new(Heartbeat::new(shared.missed_pongs)));
        let (ctl_rd, ctl_wr) = control.into_split();
        let control_writer = tokio::spawn(control_writer(
            ctl_wr,
            heartbeat.clone(),
            inputs.guest,
            stop.subscribe(),
            ctx.clone(),
        ));
        let mut traces = vec![ctl_trace];
        let mut readers: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> =
            vec![Box::pin(control_reader(
                AsyncFrameReader::with_codec(ctl_rd, codec),
                heartbeat,
                ctx.clone(),
            ))];
        let keys = match terminal {
            Some((terminal, codec, trace)) => {
                traces.push(trace);
                let (term_rd, term_wr) = terminal.into_split();
                readers.push(Box::pin(terminal_reader(
                    AsyncFrameReader::with_codec(term_rd, codec),
                    ctx.clone(),
                )));
                Keys::Writer(tokio::spawn(terminal_writer(
                    term_wr,
                    inputs.keys,
                    stop.subscribe(),
                    ctx,
                )))
            }
            None => Keys::Unused(inputs.keys),
        };
        let mut generation = Self {
            number,
            stop,
            tasks: JoinSet::new(),
            control_writer,
            keys,
            _traces: traces,
        };
        for reader in readers {
            generation.spawn(reader);
        }
        generation
    }

    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop.subscribe();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                () = task => {}
            }
        });
    }

    /// Stops every task and waits for all of them; the connections are
    /// closed when this returns. Gives back the writers' receivers.
    pub async fn stop(mut self) -> Result<Inputs, TaskFailed> {
        self.stop.send_replace(true);
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                warn!("generation {}: a reader failed: {e}", self.number);
            }
        }
        let failed = |task, source| TaskFailed {
            generation: self.number,
            task,
            source,
        };
        let guest = self
            .control_writer
            .await
            .map_err(|e| failed("control writer", e))?;
        let keys = match self.keys {
            Keys::Writer(task) => task.await.map_err(|e| failed("terminal writer", e))?,
            Keys::Unused(keys) => keys,
        };
        debug!("generation {}: all tasks joined", self.number);
        Ok(Inputs { guest, keys })
    }
}

fn apply(transition: Option<Transition>, ctx: &Ctx) {
    match transition {
        Some(Transition::Unresponsive { missed }) => {
            warn!(
                "guest unresponsive: {missed} pings unanswered (generation {})",
                ctx.number
            );
            ctx.shared
                .notify_client(ProcessToClient::GuestUnresponsive {
                    missed_pongs: missed,
                });
        }
        Some(Transition::Responsive) => {
            info!("guest responsive again (generation {})", ctx.number);
            ctx.shared.notify_client(ProcessToClient::GuestResponsive);
        }
        None => {}
    }
}

/// Boot stages as one line: `name=micros` pairs, names made printable.
pub fn format_boot_timings(stages: &[BootStage]) -> String {
    stages
        .iter()
        .map(|s| {
            let name: String = s
                .name
                .chars()
                .take(MAX_STAGE_NAME)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "_-.".contains(c) {
                        c
                    } else {
                        '?'
                    }
                })
                .collect();
            format!("{name}={}us", s.micros)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn control_reader(
    mut frames: AsyncFrameReader<Host, OwnedReadHalf>,
    heartbeat: Arc<Mutex<Heartbeat>>,
    ctx: Ctx,
) {
    let mut timings_seen = false;
    let reason = loop {
        let msg = match frames.read_frame().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                let n = ctx.number;
                ctx.shared.control_closed.send_modify(|g| *g = (*g).max(n));
                break "control connection closed".to_owned();
            }
            Err(e) => break format!("control connection: {}", chain(&e)),
        };
        match msg {
            GuestToHost::Pong { seq } => {
                let result = heartbeat
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .on_pong(seq);
                match result {
                    Ok(t) => apply(t, &ctx),
                    Err(seq) => debug!("ignoring a pong for unsent ping {seq}"),
                }
            }
            GuestToHost::BootTimings { stages } => {
                if timings_seen || stages.len() > MAX_BOOT_STAGES {
                    warn!("ignoring boot timings ({} stages)", stages.len());
                } else {
                    timings_seen = true;
                    info!("boot timings: {}", format_boot_timings(&stages));
                }
            }
            GuestToHost::Hello { .. } => {
                break "unexpected hello on an established control connection".into();
            }
        }
    };
    ctx.report(GenEvent::TransportLost(reason)).await;
}

/// Pings on the heartbeat and writes the session's control messages; ends
/// at the stop (even inside a write) and returns its receiver.
async fn control_writer(
    wr: OwnedWriteHalf,
    heartbeat: Arc<Mutex<Heartbeat>>,
    mut guest_rx: mpsc::Receiver<HostToGuest>,
    mut stop: watch::Receiver<bool>,
    ctx: Ctx,
) -> mpsc::Receiver<HostToGuest> {
    let mut tick = tokio::time::interval(ctx.shared.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the first ping goes out one period later.
    tick.tick().await;
    let mut frames = AsyncFrameWriter::<Host, _>::new(wr);
    loop {
        let msg = tokio::select! {
            () = stopped(&mut stop) => return guest_rx,
            _ = tick.tick() => {
                let (seq, t) = heartbeat.lock().unwrap_or_else(|p| p.into_inner()).on_tick();
                apply(t, &ctx);
                HostToGuest::Ping { seq }
            }
            Some(msg) = guest_rx.recv() => msg,
        };
        let written = tokio::select! {
            () = stopped(&mut stop) => return guest_rx,
            r = frames.write_frame(&msg) => r,
        };
        if let Err(e) = written {
            let reason = format!("control write failed: {}", chain(&e));
            report_then_wait(&ctx, GenEvent::TransportLost(reason), &mut stop).await;
            return guest_rx;
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Reports `event`, then waits for the stop; the stop also cuts the report
/// short (the session may be joining this task with its queue full).
async fn report_then_wait(ctx: &Ctx, event: GenEvent, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = stopped(stop) => {}
        () = ctx.report(event) => stopped(stop).await,
    }
}

/// Reads the guest's terminal frames: `Output` payloads go into the
/// scrollback ring and, while a client is attached, to that client; a newly
/// attached client first gets the ring's contents, then live output, with no
/// byte lost or repeated. While a client is attached a slot in its bounded
/// queue is taken before each read, so a slow client leaves the bytes in the
/// guest (backpressure); while none is, output keeps flowing into the ring
/// (a detached shell never blocks) and the oldest bytes are dropped.
/// `Exit`, the last frame, becomes [`GenEvent::ShellExited`].
async fn terminal_reader(mut frames: AsyncFrameReader<TermHost, OwnedReadHalf>, ctx: Ctx) {
    let mut attached = ctx.shared.attached.subscribe();
    // The attach epoch whose client already got the ring.
    let mut replayed = 0u64;
    loop {
        let epoch = *attached.borrow_and_update();
        if epoch != 0 && epoch != replayed {
            replayed = epoch;
            let ring = ctx.shared.with_scrollback(|s| s.snapshot());
            for chunk in ring.chunks(MAX_IPC_CHUNK) {
                let item = ToClient::Output {
                    epoch,
                    data: chunk.to_vec(),
                };
                if ctx.shared.out_tx.send(item).await.is_err() {
                    return;
                }
            }
            continue;
        }
        let permit = if epoch != 0 {
            tokio::select! {
                p = ctx.shared.out_tx.reserve() => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                _ = attached.changed() => continue,
            }
        } else {
            None
        };
        let frame = tokio::select! {
            // Cancel-safe: a read that loses the race consumed nothing.
            r = frames.read_frame() => r,
            _ = attached.changed() => continue,
        };
        match frame {
            Ok(Some(TermToHost::Output { data })) => {
                ctx.shared.with_scrollback(|s| s.push(&data));
                if let Some(permit) = permit {
                    permit.send(ToClient::Output { epoch, data });
                }
            }
            Ok(Some(TermToHost::Exit { exit_code, signal })) => {
                ctx.report(GenEvent::ShellExited { exit_code, signal })
                    .await;
                // Nothing follows the status on this connection.
                return;
            }
            Ok(Some(TermToHost::Hello { .. })) => {
                let reason = "unexpected hello on an established terminal connection";
                ctx.report(GenEvent::TransportLost(reason.into())).await;
                return;
            }
            Ok(None) => {
                let reason = "terminal connection closed".into();
                ctx.report(GenEvent::TransportLost(reason)).await;
                return;
            }
            Err(e) => {
                let reason = format!("terminal connection: {}", chain(&e));
                ctx.report(GenEvent::TransportLost(reason)).await;
                return;
            }
        }
    }
}

/// The user's keystrokes as `Input` frames; ends at the stop (even inside
/// a write) and returns its receiver.
async fn terminal_writer(
    wr: OwnedWriteHalf,
    mut keys: mpsc::Receiver<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
    ctx: Ctx,
) -> mpsc::Receiver<Vec<u8>> {
    let mut frames = AsyncFrameWriter::<TermHost, _>::new(wr);
    loop {
        let data = tokio::select! {
            () = stopped(&mut stop) => return keys,
            d = keys.recv() => match d {
                Some(d) => d,
                // Shared holds a sender for the session's whole life.
                None => { stopped(&mut stop).await; return keys; }
            },
        };
        for chunk in data.chunks(MAX_TERM_CHUNK) {
            let input = HostToTerm::Input {
                data: chunk.to_vec(),
            };
            let written = tokio::select! {
                () = stopped(&mut stop) => return keys,
                r = frames.write_frame(&input) => r,
            };
            if let Err(e) = written {
                let reason = format!("terminal write failed: {}", chain(&e));
                report_then_wait(&ctx, GenEvent::TransportLost(reason), &mut stop).await;
                return keys;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_timings_line() {
        let stages = vec![
            BootStage {
                name: "init".into(),
                micros: 1000,
            },
            BootStage {
                name: "bad name\n".into(),
                micros: 2,
            },
        ];
        assert_eq!(format_boot_timings(&stages), "init=1000us bad?name?=2us");
    }
}
