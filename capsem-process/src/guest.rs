//! The guest side's listeners (each through [`accept::serve`]): control,
//! terminal and exec connections, each checked by its first frame, a hello
//! with the session token (bounded wait, one log line and a close on any
//! failure). A terminal hello also names the generation it belongs to; the
//! session pairs it only with that acknowledged control connection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use capsem_proto::conn::{AsyncFrameReader, ConnError};
use capsem_proto::exec::ExecToHost;
use capsem_proto::frame::{ExecHost, Host, TermHost};
use capsem_proto::guest::{check_token, GuestToHost, HelloError};
use capsem_proto::{Codec, FrameError, Role};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::accept::{self, Limits};
use crate::conntrace::ConnTrace;
use crate::log::chain;
use crate::state::{Event, Hello, Shared, Terminal};

/// How long a new control connection may take to send its hello.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once on one port; more connections are refused.
pub const MAX_PENDING_HANDSHAKES: usize = 8;

/// Why a guest connection's first message (its hello) did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum FirstMessageError {
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the hello")]
    Closed,
    #[error("connection closed inside the hello frame")]
    Truncated(#[source] FrameError),
    #[error("invalid frame")]
    Frame(#[source] FrameError),
    #[error("read failed")]
    Io(#[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    First(#[from] FirstMessageError),
    #[error(transparent)]
    Rejected(#[from] HelloError),
}

/// Reads the first message of a guest connection (control, terminal, exec
/// or audit port) within `wait`; the codec keeps any bytes that followed it.
pub async fn first_message<R: Role>(
    stream: &mut UnixStream,
    wait: Duration,
) -> Result<(Codec<R>, R::Inbound), FirstMessageError> {
    let mut frames = AsyncFrameReader::<R, _>::new(&mut *stream);
    let read = tokio::time::timeout(wait, frames.read_frame())
        .await
        .map_err(|_| FirstMessageError::Timeout(wait))?;
    let msg = match read {
        Ok(Some(msg)) => msg,
        Ok(None) => return Err(FirstMessageError::Closed),
        Err(ConnError::Frame(e @ FrameError::TruncatedAtEof { .. })) => {
            return Err(FirstMessageError::Truncated(e))
        }
        Err(ConnError::Frame(e)) => return Err(FirstMessageError::Frame(e)),
        Err(ConnError::Io(e)) => return Err(FirstMessageError::Io(e)),
    };
    Ok((frames.into_parts().1, msg))
}

/// Reads and checks the first message of a control connection.
pub async fn handshake(
    stream: &mut UnixStream,
    token: &str,
    wait: Duration,
) -> Result<(Codec<Host>, u64, u32), GuestError> {
    let (codec, msg) = first_message::<Host>(stream, wait).await?;
    msg.check_hello(token)?;
    let GuestToHost::Hello {
        connects,
        shell_pid,
        ..
    } = msg
    else {
        // check_hello accepted it, so it is a hello.
        return Err(GuestError::Rejected(HelloError::NotHello(msg.kind())));
    };
    Ok((codec, connects, shell_pid))
}

/// Accepts control connections; each valid hello becomes an [`Event::Hello`].
pub async fn accept_control(
    listener: UnixListener,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    stop: watch::Receiver<bool>,
) {
    let limits = Limits {
        name: "control",
        max_conns: MAX_PENDING_HANDSHAKES,
    };
    accept::serve(listener, limits, stop, move |mut stream| {
        let (shared, events) = (shared.clone(), events.clone());
        async move {
            let trace = ConnTrace::accepted("control");
            match handshake(&mut stream, &shared.token, HELLO_WAIT).await {
                Ok((codec, connects, shell_pid)) => {
                    debug!("control connection: hello accepted (connects={connects})");
                    let hello = Hello {
                        stream,
                        trace,
                        codec,
                        connects,
                        shell_pid,
                    };
                    let _ = events.send(Event::Hello(Box::new(hello))).await;
                }
                Err(e) => warn!("control connection rejected: {}", chain(&e)),
            }
        }
    })
    .await;
}

/// Accepts exec connections; each must open with `Hello{token}` within
/// [`HELLO_WAIT`] before it is handed to the session (with any bytes read
/// after the hello still in its codec).
pub async fn accept_exec(
    listener: UnixListener,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    stop: watch::Receiver<bool>,
) {
    let limits = Limits {
        name: "exec",
        max_conns: MAX_PENDING_HANDSHAKES,
    };
    accept::serve(listener, limits, stop, move |mut stream| {
        let (shared, events) = (shared.clone(), events.clone());
        async move {
            match exec_hello(&mut stream, &shared.token).await {
                Ok(codec) => {
                    debug!("exec connection: hello accepted");
                    let _ = events.send(Event::ExecConn(stream, Box::new(codec))).await;
                }
                Err(e) => warn!("exec connection rejected: {}", chain(&e)),
            }
        }
    })
    .await;
}

/// Reads the exec connection's first message, which must be a hello with
/// our token.
async fn exec_hello(stream: &mut UnixStream, token: &str) -> Result<Codec<ExecHost>, GuestError> {
    let (codec, msg) = first_message::<ExecHost>(stream, HELLO_WAIT).await?;
    match msg {
        ExecToHost::Hello { token: got } => {
            check_token(&got, token)?;
            Ok(codec)
        }
        other => Err(GuestError::Rejected(HelloError::NotHello(other.kind()))),
    }
}

/// Reads the terminal connection's first message, which must be a hello
/// with our token; returns the generation it names.
async fn terminal_hello(
    stream: &mut UnixStream,
    token: &str,
) -> Result<(Codec<TermHost>, u64), GuestError> {
    let (codec, msg) = first_message::<TermHost>(stream, HELLO_WAIT).await?;
    let generation = msg.check_hello(token)?;
    Ok((codec, generation))
}

/// Accepts terminal connections; each valid hello goes to the session,
/// which pairs it with the acknowledged generation it names.
pub async fn accept_terminal(
    listener: UnixListener,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    stop: watch::Receiver<bool>,
) {
    let limits = Limits {
        name: "terminal",
        max_conns: MAX_PENDING_HANDSHAKES,
    };
    accept::serve(listener, limits, stop, move |mut stream| {
        let (shared, events) = (shared.clone(), events.clone());
        async move {
            let trace = ConnTrace::accepted("terminal");
            match terminal_hello(&mut stream, &shared.token).await {
                Ok((codec, generation)) => {
                    let terminal = Terminal {
                        stream,
                        trace,
                        codec,
                        generation,
                    };
                    let _ = events.send(Event::Terminal(Box::new(terminal))).await;
                }
                Err(e) => warn!("terminal connection rejected: {}", chain(&e)),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_proto::frame::Guest;
    use capsem_proto::guest::PROTOCOL_VERSION;
    use tokio::io::AsyncWriteExt;

    fn hello(token: &str) -> Vec<u8> {
        Codec::<Guest>::encode(&GuestToHost::Hello {
            version: PROTOCOL_VERSION,
            token: token.into(),
            connects: 2,
            shell_pid: 9,
        })
        .unwrap()
    }

    async fn run(bytes: Vec<u8>, close: bool) -> Result<(u64, u32), GuestError> {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        guest.write_all(&bytes).await.unwrap();
        if close {
            guest.shutdown().await.unwrap();
        }
        let r = handshake(&mut host, "tok", Duration::from_millis(200)).await;
        drop(guest);
        r.map(|(_, c, p)| (c, p))
    }

    #[tokio::test]
    async fn accepts_a_valid_hello_byte_split() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let frame = hello("tok");
        let writer = tokio::spawn(async move {
            for b in frame {
                guest.write_all(&[b]).await.unwrap();
            }
            guest
        });
        let (_, connects, pid) = handshake(&mut host, "tok", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((connects, pid), (2, 9));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn rejections_are_typed() {
        assert!(matches!(
            run(hello("bad"), false).await,
            Err(GuestError::Rejected(HelloError::WrongToken))
        ));
        assert!(matches!(
            run(vec![0, 0, 0, 3, 0xc1, 0xc1, 0xc1], false).await,
            Err(GuestError::First(FirstMessageError::Frame(
                FrameError::Invalid(_)
            )))
        ));
        assert!(matches!(
            run(vec![0xff, 0xff, 0xff, 0xff], false).await,
            Err(GuestError::First(FirstMessageError::Frame(
                FrameError::TooLong { .. }
            )))
        ));
        assert!(matches!(
            run(vec![0, 0, 0, 10, 1, 2], true).await,
            Err(GuestError::First(FirstMessageError::Truncated(_)))
        ));
        assert!(matches!(
            run(vec![], true).await,
            Err(GuestError::First(FirstMessageError::Closed))
        ));
        assert!(matches!(
            run(vec![], false).await,
            Err(GuestError::First(FirstMessageError::Timeout(_)))
        ));
        let pong = Codec::<Guest>::encode(&GuestToHost::Pong { seq: 1 }).unwrap();
        assert!(matches!(
            run(pong, false).await,
            Err(GuestError::Rejected(HelloError::NotHello("pong")))
        ));
        let e = run(hello("bad"), false).await.unwrap_err();
        assert_eq!(chain(&e), "wrong session token");
    }

    #[tokio::test]
    async fn exec_hello_needs_our_token_first() {
        use capsem_proto::frame::ExecGuest;
        let exec = |msg: ExecToHost| async move {
            let (mut host, mut guest) = UnixStream::pair().unwrap();
            let mut bytes = Codec::<ExecGuest>::encode(&msg).unwrap();
            // A frame after the hello stays in the returned codec.
            bytes.extend(
                Codec::<ExecGuest>::encode(&ExecToHost::Output {
                    stream: capsem_proto::exec::ExecStream::Stdout,
                    data: b"x".to_vec(),
                })
                .unwrap(),
            );
            guest.write_all(&bytes).await.unwrap();
            exec_hello(&mut host, "tok").await
        };
        let mut codec = exec(ExecToHost::Hello {
            token: "tok".into(),
        })
        .await
        .unwrap();
        assert!(matches!(
            codec.next_message().unwrap(),
            Some(ExecToHost::Output { .. })
        ));
        assert!(matches!(
            exec(ExecToHost::Hello {
                token: "bad".into()
            })
            .await,
            Err(GuestError::Rejected(HelloError::WrongToken))
        ));
        assert!(matches!(
            exec(ExecToHost::Output {
                stream: capsem_proto::exec::ExecStream::Stdout,
                data: Vec::new(),
            })
            .await,
            Err(GuestError::Rejected(HelloError::NotHello("output")))
        ));
    }
}
