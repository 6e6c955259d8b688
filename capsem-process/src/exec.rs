//! The exec relay: one task per `capsem run` command, between the guest's
//! exec connection and the attached client.
//!
//! It writes the client's `Start`, then forwards the client's stdin, EOF and
//! signals (that client's own channel) to the guest, and the guest's `Output`
//! and `Exit` to the client through the client's one bounded queue, in
//! order: the `Exit` is queued after every `Output`, so the client gets all
//! output before the status. A slow client blocks the queue, the relay stops
//! reading, and backpressure reaches the command. The reader and the writer
//! run concurrently, so a command that does not read its stdin never stops
//! its output.

use capsem_proto::conn::AsyncFrameReader;
use capsem_proto::exec::{ExecStream, ExecToHost, HostToExec};
use capsem_proto::frame::ExecHost;
use capsem_proto::ipc::ProcessToClient;
use capsem_proto::Codec;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::log::chain;
use crate::state::{Event, Outgoing};

/// One command to relay: the guest's exec connection (after its hello,
/// with any bytes read past it in `codec`) and the client's side.
#[derive(Debug)]
pub struct Relay {
    pub id: u64,
    pub stream: UnixStream,
    pub codec: Codec<ExecHost>,
    pub start: HostToExec,
    pub notices: mpsc::Sender<Outgoing>,
    pub stdin: mpsc::Receiver<HostToExec>,
}

/// Relays one command; reports [`Event::ExecEnded`] when it ends.
pub async fn relay(r: Relay, events: mpsc::Sender<Event>) {
    let (rd, mut wr) = r.stream.into_split();
    let result = match send_start(&mut wr, &r.start).await {
        Err(reason) => Err(reason),
        Ok(()) => relay_io(rd, r.codec, wr, r.notices, r.stdin).await,
    };
    if let Err(reason) = &result {
        warn!("exec {}: {reason}", r.id);
    }
    let _ = events.send(Event::ExecEnded { id: r.id, result }).await;
}

async fn send_start(wr: &mut OwnedWriteHalf, start: &HostToExec) -> Result<(), String> {
    let frame = Codec::<ExecHost>::encode(start)
        .map_err(|e| format!("cannot encode the command: {}", chain(&e)))?;
    wr.write_all(&frame)
        .await
        .map_err(|e| format!("cannot send the command: {e}"))
}

async fn relay_io(
    rd: OwnedReadHalf,
    codec: Codec<ExecHost>,
    wr: OwnedWriteHalf,
    notices: mpsc::Sender<Outgoing>,
    stdin: mpsc::Receiver<HostToExec>,
) -> Result<(), String> {
    tokio::select! {
        r = read_guest(rd, codec, notices) => r,
        () = async {
            if let Err(reason) = write_guest(wr, stdin).await {
                warn!("exec: {reason}");
            }
            // The reader decides the end: the guest's status may still come.
            std::future::pending::<()>().await
        } => Ok(()),
    }
}

async fn write_guest(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<HostToExec>,
) -> Result<(), String> {
    while let Some(msg) = rx.recv().await {
        let frame = Codec::<ExecHost>::encode(&msg)
            .map_err(|e| format!("cannot encode {msg:?}: {}", chain(&e)))?;
        wr.write_all(&frame)
            .await
            .map_err(|e| format!("cannot write to the exec connection: {e}"))?;
    }
    Ok(())
}

/// Reads the guest's frames to its `Exit`; `Err` when the connection ends
/// without one.
async fn read_guest(
    rd: OwnedReadHalf,
    codec: Codec<ExecHost>,
    notices: mpsc::Sender<Outgoing>,
) -> Result<(), String> {
    let mut frames = AsyncFrameReader::with_codec(rd, codec);
    let (mut stdout_bytes, mut stderr_bytes) = (0u64, 0u64);
    loop {
        let msg = match frames.read_frame().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err("the exec connection closed without an exit status".into()),
            Err(e) => return Err(format!("exec connection: {}", chain(&e))),
        };
        {
            let out = match msg {
                ExecToHost::Hello { .. } => return Err("a second hello".into()),
                ExecToHost::Output { stream, data } => {
                    match stream {
                        ExecStream::Stdout => stdout_bytes += data.len() as u64,
                        ExecStream::Stderr => stderr_bytes += data.len() as u64,
                    }
                    ProcessToClient::ExecOutput { stream, data }
                }
                ExecToHost::Exit {
                    exit_code,
                    signal,
                    timed_out,
                    stdout_bytes: want_out,
                    stderr_bytes: want_err,
                } => {
                    info!(
                        "command exited: exit_code={exit_code:?} signal={signal:?} timed_out={timed_out} stdout_bytes={stdout_bytes} stderr_bytes={stderr_bytes}"
                    );
                    if (want_out, want_err) != (stdout_bytes, stderr_bytes) {
                        warn!("exec: the guest counted {want_out}/{want_err} output bytes, {stdout_bytes}/{stderr_bytes} arrived");
                    }
                    let exit = ProcessToClient::ExecExit {
                        exit_code,
                        signal,
                        timed_out,
                    };
                    notices
                        .send(Outgoing::Msg(exit))
                        .await
                        .map_err(|_| "the client went away".to_owned())?;
                    return Ok(());
                }
            };
            notices
                .send(Outgoing::Msg(out))
                .await
                .map_err(|_| "the client went away".to_owned())?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_proto::frame::ExecGuest;

    #[tokio::test]
    async fn output_then_exit_in_order_and_eof_without_exit_is_an_error() {
        let (guest, host) = UnixStream::pair().unwrap();
        let (rd, _wr) = host.into_split();
        let (tx, mut rx) = mpsc::channel(8);
        let mut bytes = Vec::new();
        for (stream, data) in [
            (ExecStream::Stdout, b"a".to_vec()),
            (ExecStream::Stderr, b"b".to_vec()),
        ] {
            Codec::<ExecGuest>::encode_into(&ExecToHost::Output { stream, data }, &mut bytes)
                .unwrap();
        }
        let exit = ExecToHost::Exit {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            stdout_bytes: 1,
            stderr_bytes: 1,
        };
        Codec::<ExecGuest>::encode_into(&exit, &mut bytes).unwrap();
        let (_, mut gw) = guest.into_split();
        gw.write_all(&bytes).await.unwrap();
        read_guest(rd, Codec::new(), tx).await.unwrap();
        let mut got = Vec::new();
        while let Ok(Outgoing::Msg(m)) = rx.try_recv() {
            got.push(m);
        }
        assert_eq!(
            got,
            vec![
                ProcessToClient::ExecOutput {
                    stream: ExecStream::Stdout,
                    data: b"a".to_vec()
                },
                ProcessToClient::ExecOutput {
                    stream: ExecStream::Stderr,
                    data: b"b".to_vec()
                },
                ProcessToClient::ExecExit {
                    exit_code: Some(3),
                    signal: None,
                    timed_out: false
                },
            ]
        );

        let (guest, host) = UnixStream::pair().unwrap();
        let (rd, _wr) = host.into_split();
        drop(guest);
        let (tx, _rx) = mpsc::channel(8);
        assert!(read_guest(rd, Codec::new(), tx).await.is_err());
    }
}
