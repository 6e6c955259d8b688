//! `ctl.sock`: the CLI's connections. Peers must have our uid
//! (`SO_PEERCRED`). A connection may ask one-shot questions (`Status`,
//! `Shutdown`, `DropGuestConnections`) or attach to the terminal; at most
//! one connection is attached at a time.

use std::sync::Arc;

use capsem_proto::conn::AsyncFrameReader;
use capsem_proto::exec::HostToExec;
use capsem_proto::frame::Process;
use capsem_proto::ipc::{ClientToProcess, ProcessToClient};
use capsem_proto::Codec;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::accept::{self, Limits};
use crate::log::chain;
use crate::state::{Event, Outgoing, Shared, ToClient};

/// Whether a peer with uid `peer` may use ctl.sock owned by uid `us`.
pub fn peer_allowed(peer: u32, us: u32) -> bool {
    peer == us
}

/// ctl.sock connections served at once.
const MAX_CLIENTS: usize = 64;

/// Accepts ctl.sock connections, checking each peer's uid.
pub async fn accept_clients(
    listener: UnixListener,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    stop: watch::Receiver<bool>,
) {
    let us = nix::unistd::geteuid().as_raw();
    let mut next_id = 0u64;
    let limits = Limits {
        name: "ctl.sock",
        max_conns: MAX_CLIENTS,
    };
    accept::serve(listener, limits, stop, move |stream| {
        next_id += 1;
        let conn = next_id;
        let (shared, events) = (shared.clone(), events.clone());
        async move {
            match stream.peer_cred() {
                Ok(cred) if peer_allowed(cred.uid(), us) => {}
                Ok(cred) => {
                    warn!(
                        "ctl connection rejected: peer uid {} is not ours ({us})",
                        cred.uid()
                    );
                    return;
                }
                Err(e) => {
                    warn!("ctl connection rejected: cannot read its credentials: {e}");
                    return;
                }
            }
            debug!("client {conn} connected");
            serve(conn, stream, shared, events).await;
        }
    })
    .await;
}

async fn serve(conn: u64, stream: UnixStream, shared: Arc<Shared>, events: mpsc::Sender<Event>) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(32);
    // Owned here, lent to the writer: whichever side ends first, the
    // terminal output receiver goes back to the session.
    let mut output = None;
    tokio::select! {
        () = read_requests(conn, rd, tx, &shared, &events) => {}
        () = write_responses(conn, wr, rx, &mut output, &shared, &events) => {}
    }
    let _ = events.send(Event::Closed { conn, output }).await;
}

async fn read_requests(
    conn: u64,
    rd: OwnedReadHalf,
    tx: mpsc::Sender<Outgoing>,
    shared: &Shared,
    events: &mpsc::Sender<Event>,
) {
    let mut frames = AsyncFrameReader::<Process, _>::new(rd);
    let mut attached = false;
    // Attached with `Exec` (a command), not `Attach` (a shell): its stdin.
    let mut exec_stdin: Option<mpsc::Sender<HostToExec>> = None;
    loop {
        let msg = match frames.read_frame().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                info!("client {conn} disconnected");
                return;
            }
            Err(e) => {
                warn!("client {conn}: {}", chain(&e));
                return;
            }
        };
        let reply = |message: &str| {
            Outgoing::Msg(ProcessToClient::Error {
                message: message.into(),
            })
        };
        let answer = match msg {
            ClientToProcess::Attach { .. } if attached => {
                Some(reply("a client is already attached"))
            }
            ClientToProcess::Attach { cols, rows } => {
                let (reply_tx, reply_rx) = oneshot::channel();
                let ev = Event::Attach {
                    conn,
                    notices: tx.clone(),
                    reply: reply_tx,
                };
                if events.send(ev).await.is_err() {
                    return;
                }
                match reply_rx.await {
                    Ok(Ok(())) => {
                        attached = true;
                        info!("client {conn} attached ({cols}x{rows})");
                        shared.resize(cols, rows);
                        None
                    }
                    Ok(Err(message)) => Some(reply(&message)),
                    Err(_) => return,
                }
            }
            ClientToProcess::Input { .. } | ClientToProcess::Resize { .. }
                if !attached || exec_stdin.is_some() =>
            {
                Some(reply("not attached to a shell"))
            }
            ClientToProcess::Input { data } => {
                if shared.in_tx.send(data).await.is_err() {
                    return;
                }
                None
            }
            ClientToProcess::Resize { cols, rows } => {
                shared.resize(cols, rows);
                None
            }
            ClientToProcess::Status => {
                Some(Outgoing::Msg(ProcessToClient::Status(shared.status())))
            }
            ClientToProcess::Shutdown => {
                info!("client {conn} requested shutdown");
                let _ = events.send(Event::Shutdown).await;
                None
            }
            ClientToProcess::DropGuestConnections => {
                info!("client {conn} asked to drop the guest connections");
                let _ = events.send(Event::DropGuest).await;
                None
            }
            ClientToProcess::Exec { .. } if attached => Some(reply("a client is already attached")),
            ClientToProcess::Exec {
                argv,
                env,
                workdir,
                timeout_ms,
                tty,
            } => {
                let (reply_tx, reply_rx) = oneshot::channel();
                let (stdin_tx, stdin_rx) = mpsc::channel(crate::state::INPUT_CHUNKS);
                let ev = Event::ExecAttach {
                    conn,
                    notices: tx.clone(),
                    reply: reply_tx,
                    start: HostToExec::Start {
                        argv,
                        env,
                        workdir,
                        timeout_ms,
                        tty,
                    },
                    stdin: stdin_rx,
                };
                if events.send(ev).await.is_err() {
                    return;
                }
                match reply_rx.await {
                    Ok(Ok(())) => {
                        attached = true;
                        exec_stdin = Some(stdin_tx);
                        info!("client {conn} attached to run a command");
                        None
                    }
                    Ok(Err(message)) => Some(reply(&message)),
                    Err(_) => return,
                }
            }
            ClientToProcess::ExecStdin { .. }
            | ClientToProcess::ExecStdinEof
            | ClientToProcess::ExecSignal { .. }
                if exec_stdin.is_none() =>
            {
                Some(reply("not attached to a command"))
            }
            ClientToProcess::ExecStdin { data } => {
                forward(&exec_stdin, HostToExec::Stdin { data }).await;
                None
            }
            ClientToProcess::ExecStdinEof => {
                forward(&exec_stdin, HostToExec::StdinEof).await;
                None
            }
            ClientToProcess::ExecSignal { signal } => {
                info!("client {conn}: signal {signal} for the command");
                forward(&exec_stdin, HostToExec::Signal { signal }).await;
                None
            }
        };
        if let Some(answer) = answer {
            if tx.send(answer).await.is_err() {
                return;
            }
        }
    }
}

/// Hands a message to this client's command; a relay that already ended
/// (the command exited) drops it.
async fn forward(stdin: &Option<mpsc::Sender<HostToExec>>, msg: HostToExec) {
    if let Some(tx) = stdin {
        let _ = tx.send(msg).await;
    }
}

/// The terminal output channel's receiver while this client is attached.
async fn next_output(output: &mut Option<mpsc::Receiver<ToClient>>) -> ToClient {
    match output {
        Some(rx) => match rx.recv().await {
            Some(item) => item,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Marks the attached client's writer finished however it ends, so teardown
/// never waits for a delivery that cannot happen.
struct FinishOnDrop<'a> {
    shared: &'a Shared,
    attached: bool,
}

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        if self.attached {
            self.shared.client_finished.send_replace(true);
        }
    }
}

async fn write_responses(
    conn: u64,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
    output: &mut Option<mpsc::Receiver<ToClient>>,
    shared: &Shared,
    events: &mpsc::Sender<Event>,
) {
    let mut finish = FinishOnDrop {
        shared,
        attached: false,
    };
    let mut my_epoch = 0;
    loop {
        let msg = tokio::select! {
            biased;
            m = rx.recv() => match m {
                None => return,
                Some(Outgoing::StartOutput { epoch, output: rx }) => {
                    finish.attached = true;
                    my_epoch = epoch;
                    *output = Some(rx);
                    continue;
                }
                Some(Outgoing::Msg(m)) => m,
            },
            item = next_output(output) => match item {
                item if item.epoch() != my_epoch => continue,
                ToClient::Output { data, .. } => ProcessToClient::Output { data },
                ToClient::Exited { exit_code, signal, .. } => {
                    ProcessToClient::ShellExited { exit_code, signal }
                }
            },
        };
        let last = matches!(
            msg,
            ProcessToClient::ShellExited { .. }
                | ProcessToClient::ExecExit { .. }
                | ProcessToClient::SessionLost { .. }
        );
        let frame = match Codec::<Process>::encode(&msg) {
            Ok(f) => f,
            Err(e) => {
                warn!("client {conn}: cannot encode a message: {}", chain(&e));
                continue;
            }
        };
        if let Err(e) = wr.write_all(&frame).await {
            warn!("client {conn}: write failed: {e}");
            return;
        }
        if last {
            let _ = wr.flush().await;
            info!("client {conn}: final message delivered");
            drop(finish);
            let _ = events.send(Event::FinalDelivered).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_uid() {
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
    }
}
