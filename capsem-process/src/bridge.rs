//! One connection generation: four tasks (control reader, control writer
//! with the heartbeat, terminal reader, terminal writer), all stopped by one
//! signal and all joined by [`Generation::stop`] before its connections are
//! dropped. Every way a task ends is reported as a typed [`GenEvent`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsem_proto::frame::Host;
use capsem_proto::guest::{BootStage, GuestToHost, HostToGuest, MAX_BOOT_STAGES, MAX_STAGE_NAME};
use capsem_proto::ipc::{ProcessToClient, MAX_IPC_CHUNK};
use capsem_proto::Codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::heartbeat::{Heartbeat, Transition};
use crate::log::chain;
use crate::state::{Event, GenEvent, Shared, ToClient};

/// After the shell exited, how long the terminal may stay silent before we
/// stop waiting for its EOF.
pub const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// The running tasks of one generation.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    stop: watch::Sender<bool>,
    /// Set to the guest's terminal byte count once the shell exited.
    drain: watch::Sender<Option<u64>>,
    tasks: JoinSet<()>,
    /// Declared after `tasks`: the close is logged once the tasks, which
    /// own the streams, are gone.
    _traces: [crate::conntrace::ConnTrace; 2],
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
    /// its paired terminal connection.
    pub fn start(
        number: u64,
        control: UnixStream,
        codec: Codec<Host>,
        terminal: UnixStream,
        traces: [crate::conntrace::ConnTrace; 2],
        shared: Arc<Shared>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let mut generation = Self {
            number,
            stop: watch::channel(false).0,
            drain: watch::channel(None).0,
            tasks: JoinSet::new(),
            _traces: traces,
        };
        let ctx = Ctx {
            number,
            shared: shared.clone(),
            events,
        };
        let heartbeat = Arc::new(Mutex::new(Heartbeat::new(shared.missed_pongs)));
        let (ctl_rd, ctl_wr) = control.into_split();
        let (term_rd, term_wr) = terminal.into_split();
        let drain = generation.drain.subscribe();
        generation.spawn(control_reader(
            ctl_rd,
            codec,
            heartbeat.clone(),
            ctx.clone(),
        ));
        generation.spawn(control_writer(ctl_wr, heartbeat, ctx.clone()));
        generation.spawn(terminal_reader(term_rd, drain, ctx.clone()));
        generation.spawn(terminal_writer(term_wr, ctx));
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

    /// The shell exited after writing `terminal_bytes` to this generation's
    /// terminal: the reader forwards up to that count (or EOF), even with no
    /// client attached (then discarding it).
    pub fn drain(&self, terminal_bytes: u64) {
        self.drain.send_replace(Some(terminal_bytes));
    }

    /// Stops every task and waits for all of them; the connections are
    /// closed when this returns.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                warn!("generation {}: a task failed: {e}", self.number);
            }
        }
        debug!("generation {}: all tasks joined", self.number);
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
    mut rd: OwnedReadHalf,
    mut codec: Codec<Host>,
    heartbeat: Arc<Mutex<Heartbeat>>,
    ctx: Ctx,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut timings_seen = false;
    let reason = 'outer: loop {
        loop {
            let msg = match codec.next_message() {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(e) => break 'outer format!("invalid control frame: {}", chain(&e)),
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
                GuestToHost::ShellExited {
                    exit_code,
                    signal,
                    terminal_bytes,
                } => {
                    ctx.report(GenEvent::ShellExited {
                        exit_code,
                        signal,
                        terminal_bytes,
                    })
                    .await;
                    // Nothing follows a shell exit on this connection.
                    return;
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
                    break 'outer "unexpected hello on an established control connection".into();
                }
            }
        }
        match rd.read(&mut buf).await {
            Ok(0) => {
                break match codec.finish() {
                    Ok(()) => "control connection closed".into(),
                    Err(e) => format!("control connection closed: {}", chain(&e)),
                }
            }
            Ok(n) => {
                if let Err(e) = codec.feed(&buf[..n]) {
                    break format!("invalid control frame: {}", chain(&e));
                }
            }
            Err(e) => break format!("control connection read failed: {e}"),
        }
    };
    ctx.report(GenEvent::TransportLost(reason)).await;
}

async fn control_writer(mut wr: OwnedWriteHalf, heartbeat: Arc<Mutex<Heartbeat>>, ctx: Ctx) {
    let mut guest_rx = ctx.shared.guest_rx.lock().await;
    let mut tick = tokio::time::interval(ctx.shared.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the first ping goes out one period later.
    tick.tick().await;
    loop {
        let msg = tokio::select! {
            _ = tick.tick() => {
                let (seq, t) = heartbeat.lock().unwrap_or_else(|p| p.into_inner()).on_tick();
                apply(t, &ctx);
                HostToGuest::Ping { seq }
            }
            Some(msg) = guest_rx.recv() => msg,
        };
        let frame = match Codec::<Host>::encode(&msg) {
            Ok(f) => f,
            Err(e) => {
                warn!("cannot encode {msg:?}: {}", chain(&e));
                continue;
            }
        };
        if let Err(e) = wr.write_all(&frame).await {
            ctx.report(GenEvent::TransportLost(format!(
                "control write failed: {e}"
            )))
            .await;
            return;
        }
    }
}

/// Reads the guest's terminal into the scrollback ring and, while a client
/// is attached, to that client: a newly attached client first gets the
/// ring's contents, then live output, with no byte lost or repeated. While
/// a client is attached a slot in its bounded queue is taken before each
/// read, so a slow client leaves the bytes in the guest (backpressure);
/// while none is, output keeps flowing into the ring (a detached shell never
/// blocks) and the oldest bytes are dropped.
async fn terminal_reader(mut rd: OwnedReadHalf, mut drain: watch::Receiver<Option<u64>>, ctx: Ctx) {
    let mut attached = ctx.shared.attached.subscribe();
    let mut buf = vec![0u8; MAX_IPC_CHUNK];
    // Bytes received on this terminal connection.
    let mut received: u64 = 0;
    // The attach epoch whose client already got the ring.
    let mut replayed = 0u64;
    loop {
        // Once the shell exited, the guest said how many bytes it wrote:
        // all of them arrived, so the output is complete.
        let target = *drain.borrow_and_update();
        if target.is_some_and(|t| received >= t) {
            ctx.report(GenEvent::TerminalDone { eof: true }).await;
            return;
        }
        let draining = target.is_some();
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
                _ = drain.changed(), if !draining => continue,
                _ = attached.changed() => continue,
            }
        } else {
            None
        };
        let result = tokio::select! {
            // Cancel-safe: a read that loses the race consumed nothing.
            r = rd.read(&mut buf) => r,
            _ = drain.changed(), if !draining => continue,
            _ = attached.changed() => continue,
            () = tokio::time::sleep(DRAIN_IDLE), if draining => {
                warn!(
                    "terminal: {received} of {} bytes after the shell exited, then {DRAIN_IDLE:?} of silence",
                    target.unwrap_or_default()
                );
                ctx.report(GenEvent::TerminalDone { eof: false }).await;
                return;
            }
        };
        match result {
            Ok(0) => {
                ctx.report(GenEvent::TerminalDone { eof: true }).await;
                return;
            }
            Ok(n) => {
                received += n as u64;
                ctx.shared.with_scrollback(|s| s.push(&buf[..n]));
                if let Some(permit) = permit {
                    permit.send(ToClient::Output {
                        epoch,
                        data: buf[..n].to_vec(),
                    });
                }
            }
            Err(e) if draining => {
                warn!("terminal read failed while draining: {e}");
                ctx.report(GenEvent::TerminalDone { eof: false }).await;
                return;
            }
            Err(e) => {
                ctx.report(GenEvent::TransportLost(format!(
                    "terminal read failed: {e}"
                )))
                .await;
                return;
            }
        }
    }
}

async fn terminal_writer(mut wr: OwnedWriteHalf, ctx: Ctx) {
    let mut in_rx = ctx.shared.in_rx.lock().await;
    while let Some(data) = in_rx.recv().await {
        if let Err(e) = wr.write_all(&data).await {
            ctx.report(GenEvent::TransportLost(format!(
                "terminal write failed: {e}"
            )))
            .await;
            return;
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
