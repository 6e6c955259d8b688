//! The guest side's listeners: accepting control connections and checking
//! their hello (bounded wait, one log line and a close on any failure), and
//! accepting terminal connections, which the session pairs with the latest
//! acknowledged generation.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use capsem_proto::exec::ExecToHost;
use capsem_proto::frame::{ExecHost, Host};
use capsem_proto::guest::{check_token, GuestToHost, HelloError};
use capsem_proto::{Codec, FrameError, Role};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::log::chain;
use crate::state::{Event, Hello, Shared};

/// How long a new control connection may take to send its hello.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; more connections are refused.
const MAX_PENDING_HANDSHAKES: usize = 8;

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

/// Reads the first message of a guest connection (control, exec or audit
/// port) within `wait`; the codec keeps any bytes that followed it.
pub async fn first_message<R: Role>(
    stream: &mut UnixStream,
    wait: Duration,
) -> Result<(Codec<R>, R::Inbound), FirstMessageError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut codec = Codec::<R>::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(msg) = codec.next_message().map_err(FirstMessageError::Frame)? {
            return Ok((codec, msg));
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .map_err(|_| FirstMessageError::Timeout(wait))?
            .map_err(FirstMessageError::Io)?;
        if n == 0 {
            return match codec.finish() {
                Ok(()) => Err(FirstMessageError::Closed),
                Err(e) => Err(FirstMessageError::Truncated(e)),
            };
        }
        codec.feed(&buf[..n]).map_err(FirstMessageError::Frame)?;
    }
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
) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let mut stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!("control port: accept failed: {e}");
                        // Do not spin on a persistent error (EMFILE).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if handshakes.len() >= MAX_PENDING_HANDSHAKES {
                    let _trace = crate::conntrace::ConnTrace::accepted("control");
                    warn!("control connection rejected: too many handshakes in progress");
                    continue;
                }
                let trace = crate::conntrace::ConnTrace::accepted("control");
                let shared = shared.clone();
                let events = events.clone();
                handshakes.spawn(async move {
                    match handshake(&mut stream, &shared.token, HELLO_WAIT).await {
                        Ok((codec, connects, shell_pid)) => {
                            debug!("control connection: hello accepted (connects={connects})");
                            let hello = Hello { stream, trace, codec, connects, shell_pid };
                            let _ = events.send(Event::Hello(Box::new(hello))).await;
                        }
                        Err(e) => warn!("control connection rejected: {}", chain(&e)),
                    }
                });
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
}

/// Accepts exec connections; each must open with `Hello{token}` within
/// [`HELLO_WAIT`] before it is handed to the session (with any bytes read
/// after the hello still in its codec).
pub async fn accept_exec(listener: UnixListener, shared: Arc<Shared>, events: mpsc::Sender<Event>) {
    let mut hellos = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let mut stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!("exec port: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if hellos.len() >= MAX_PENDING_HANDSHAKES {
                    warn!("exec connection rejected: too many handshakes in progress");
                    continue;
                }
                let (shared, events) = (shared.clone(), events.clone());
                hellos.spawn(async move {
                    match exec_hello(&mut stream, &shared.token).await {
                        Ok(codec) => {
                            debug!("exec connection: hello accepted");
                            let _ = events.send(Event::ExecConn(stream, Box::new(codec))).await;
                        }
                        Err(e) => warn!("exec connection rejected: {}", chain(&e)),
                    }
                });
            }
            Some(_) = hellos.join_next(), if !hellos.is_empty() => {}
        }
    }
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

/// Accepts terminal connections and hands them to the session to pair.
pub async fn accept_terminal(listener: UnixListener, events: mpsc::Sender<Event>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let trace = crate::conntrace::ConnTrace::accepted("terminal");
                if events.send(Event::Terminal(stream, trace)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!("terminal port: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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
