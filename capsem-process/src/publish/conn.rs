//! One connection to a published port: the guest side opened (the
//! hybrid-vsock `CONNECT`, `Open`, `Opened`, all within [`OPEN_WAIT`]),
//! then the relay, then one log line with what it carried.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use capsem_host::publish::Publish;
use capsem_proto::frame::{PublishHost, LEN_PREFIX};
use capsem_proto::guest::PORT_PUBLISH;
use capsem_proto::publish::{
    connect_line, parse_ok_line, HostToPublish, PublishToHost, MAX_OK_LINE, MAX_PUBLISH_FRAME,
};
use capsem_proto::{Codec, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tracing::info;

use super::{PublishCtx, IDLE_AFTER_EOF, OPEN_WAIT, RELAY_BUF};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot reach vhost-device-vsock at {path}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the guest did not accept on vsock port {PORT_PUBLISH} (is the VM up?)")]
    NotAccepted,
    #[error("vhost-device-vsock answered {0:?}, not OK")]
    Handshake(String),
    #[error("the guest side failed")]
    Io(#[source] io::Error),
    #[error("an answer of {0} bytes (1 to {MAX_PUBLISH_FRAME})")]
    Length(usize),
    #[error("invalid answer")]
    Frame(#[source] FrameError),
    #[error("an answer over the protocol's bounds")]
    Bounds,
    #[error("the guest refused: {0}")]
    Refused(String),
    #[error("the guest did not answer within {OPEN_WAIT:?}")]
    Timeout,
}

/// Serves one client until the relay ends; never fails: the outcome is
/// its log line.
pub async fn serve(
    client: TcpStream,
    port: Publish,
    ctx: &PublishCtx,
    stop: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let peer = client
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let what = format!(
        "publish: {peer} -> {} -> guest port {}",
        port.host_addr(),
        port.guest_port
    );
    let guest = match tokio::time::timeout(OPEN_WAIT, open(ctx, port.guest_port)).await {
        Ok(Ok(guest)) => guest,
        Ok(Err(e)) => return refuse(client, &what, &e),
        Err(_) => return refuse(client, &what, &ConnError::Timeout),
    };
    let (to_guest, from_guest) = relay(client, guest, stop).await;
    info!(
        "{what}: {to_guest} bytes in, {from_guest} out, {} ms",
        start.elapsed().as_millis()
    );
}

/// Resets the client's connection (SO_LINGER 0) and logs why.
fn refuse(client: TcpStream, what: &str, why: &ConnError) {
    info!("{what}: closed: {}", crate::log::chain(why));
    if let Ok(std) = client.into_std() {
        let _ = linger_zero(&std);
    }
}

/// `SO_LINGER {on, 0}`: the close is a RST, so the client sees a refusal,
/// not an empty answer.
fn linger_zero(stream: &std::net::TcpStream) -> io::Result<()> {
    nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(io::Error::from)
}

/// The guest side: hybrid-vsock `CONNECT`, then `Open`, then `Opened`.
async fn open(ctx: &PublishCtx, guest_port: u16) -> Result<UnixStream, ConnError> {
    let mut guest = UnixStream::connect(&ctx.uds)
        .await
        .map_err(|source| ConnError::Connect {
            path: ctx.uds.clone(),
            source,
        })?;
    guest
        .write_all(connect_line(PORT_PUBLISH).as_bytes())
        .await
        .map_err(ConnError::Io)?;
    read_ok(&mut guest).await?;
    let open = HostToPublish::Open {
        token: ctx.token.clone(),
        port: guest_port,
    };
    let frame = Codec::<PublishHost>::encode(&open).map_err(ConnError::Frame)?;
    guest.write_all(&frame).await.map_err(ConnError::Io)?;
    match read_answer(&mut guest).await? {
        PublishToHost::Opened {
            connected: true, ..
        } => Ok(guest),
        PublishToHost::Opened { reason, .. } => Err(ConnError::Refused(reason)),
    }
}

/// Reads vhost-device-vsock's `OK <port>\n` a byte at a time, so nothing
/// after it is consumed; EOF first is the guest not accepting.
async fn read_ok<S: AsyncRead + Unpin>(s: &mut S) -> Result<u32, ConnError> {
    let mut line = Vec::with_capacity(MAX_OK_LINE);
    loop {
        let b = match s.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && line.is_empty() => {
                return Err(ConnError::NotAccepted)
            }
            Err(e) => return Err(ConnError::Io(e)),
        };
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() >= MAX_OK_LINE {
            break;
        }
    }
    parse_ok_line(&line)
        .ok_or_else(|| ConnError::Handshake(String::from_utf8_lossy(&line).into_owned()))
}

/// Reads exactly one frame: nothing after it is consumed.
async fn read_answer<S: AsyncRead + Unpin>(s: &mut S) -> Result<PublishToHost, ConnError> {
    let mut prefix = [0u8; LEN_PREFIX];
    s.read_exact(&mut prefix).await.map_err(ConnError::Io)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > MAX_PUBLISH_FRAME {
        return Err(ConnError::Length(len));
    }
    let mut frame = vec![0u8; LEN_PREFIX + len];
    frame[..LEN_PREFIX].copy_from_slice(&prefix);
    s.read_exact(&mut frame[LEN_PREFIX..])
        .await
        .map_err(ConnError::Io)?;
    let mut codec = Codec::<PublishHost>::new();
    codec.feed(&frame).map_err(ConnError::Frame)?;
    let answer = codec
        .next_message()
        .map_err(ConnError::Frame)?
        .ok_or(ConnError::Length(len))?;
    if !answer.within_bounds() {
        return Err(ConnError::Bounds);
    }
    Ok(answer)
}

/// Copies `from` to `to` until EOF (or an error), counting into `bytes`
/// and stamping `last` (ms since `start`) after each chunk. The sink is
/// shut down at the end only when `shut`.
async fn copy<R, W>(
    mut from: R,
    mut to: W,
    shut: bool,
    bytes: &AtomicU64,
    last: (&AtomicU64, Instant),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        last.0
            .store(last.1.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    if shut {
        to.shutdown().await?;
    }
    Ok(())
}

/// Relays until the guest's side ends (its EOF passed on to the client),
/// an error, the idle bound after the client's EOF, or the stop. Returns
/// the bytes client -> guest and guest -> client.
pub async fn relay<C, G>(client: C, guest: G, mut stop: watch::Receiver<bool>) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    G: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (gr, gw) = tokio::io::split(guest);
    let start = Instant::now();
    let (to_guest, from_guest, last) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    // The client's EOF is not passed on (see IDLE_AFTER_EOF); the guest's is.
    let up = copy(cr, gw, false, &to_guest, (&last, start));
    let down = copy(gr, cw, true, &from_guest, (&last, start));
    tokio::pin!(up, down);
    let mut up_done = false;
    loop {
        let idle = async {
            if !up_done {
                return std::future::pending().await;
            }
            loop {
                let ms = last.load(Ordering::Relaxed);
                let due = start + std::time::Duration::from_millis(ms) + IDLE_AFTER_EOF;
                if Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due.into()).await;
            }
        };
        tokio::select! {
            _ = &mut down => break,
            done = &mut up, if !up_done => {
                if done.is_err() {
                    break;
                }
                up_done = true;
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            () = idle => break,
            () = crate::accept::stopped(&mut stop) => break,
        }
    }
    (
        to_guest.load(Ordering::Relaxed),
        from_guest.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_proto::frame::PublishGuest;
    use std::sync::Arc;

    /// A fake vhost-device-vsock socket and agent: answers the handshake
    /// with `ok_line`, reads the `Open`, answers `opened`, then echoes.
    async fn fake_guest(
        listener: tokio::net::UnixListener,
        ok_line: &'static [u8],
        opened: Option<PublishToHost>,
    ) -> Option<HostToPublish> {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut line = [0u8; 13];
        s.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"CONNECT 5008\n");
        s.write_all(ok_line).await.unwrap();
        if ok_line.is_empty() {
            return None;
        }
        let mut prefix = [0u8; 4];
        s.read_exact(&mut prefix).await.unwrap();
        let mut frame = prefix.to_vec();
        frame.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
        s.read_exact(&mut frame[4..]).await.unwrap();
        let mut codec = Codec::<PublishGuest>::new();
        codec.feed(&frame).unwrap();
        let open = codec.next_message().unwrap().unwrap();
        let opened = opened?;
        let connected = matches!(
            opened,
            PublishToHost::Opened {
                connected: true,
                ..
            }
        );
        s.write_all(&Codec::<PublishGuest>::encode(&opened).unwrap())
            .await
            .unwrap();
        if connected {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        }
        Some(open)
    }

    async fn setup() -> (
        tempfile::TempDir,
        Arc<PublishCtx>,
        Publish,
        tokio::net::TcpListener,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Arc::new(PublishCtx {
            token: "tok".into(),
            uds: dir.path().join("vsock.sock"),
        });
        // The listener is the test's own; the host port is only logged.
        let port = Publish::parse("1:8000").unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (dir, ctx, port, tcp)
    }

    /// One client through [`serve`]: its stream and the serving task.
    async fn client(
        tcp: &tokio::net::TcpListener,
        ctx: &Arc<PublishCtx>,
        port: Publish,
    ) -> (TcpStream, tokio::task::JoinHandle<()>) {
        let c = TcpStream::connect(tcp.local_addr().unwrap()).await.unwrap();
        let (s, _) = tcp.accept().await.unwrap();
        let ctx = ctx.clone();
        let task = tokio::spawn(async move {
            let (_tx, stop) = watch::channel(false);
            serve(s, port, &ctx, stop).await;
        });
        (c, task)
    }

    #[tokio::test]
    async fn opens_then_relays_until_the_guest_ends() {
        let (_dir, ctx, port, tcp) = setup().await;
        let uds = tokio::net::UnixListener::bind(&ctx.uds).unwrap();
        let ok = PublishToHost::Opened {
            connected: true,
            reason: String::new(),
        };
        let guest = tokio::spawn(fake_guest(uds, b"OK 1025\n", Some(ok)));
        let (mut c, task) = client(&tcp, &ctx, port).await;
        c.write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        // The echo, then EOF: the fake guest closed, and that reached us.
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
        let open = guest.await.unwrap().unwrap();
        assert_eq!(
            open,
            HostToPublish::Open {
                token: "tok".into(),
                port: 8000
            }
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_refusal_a_closed_guest_or_a_bad_handshake_resets_the_client() {
        for (line, opened) in [
            (
                &b"OK 1\n"[..],
                Some(PublishToHost::Opened {
                    connected: false,
                    reason: "connection refused".into(),
                }),
            ),
            (&b""[..], None),
            (&b"NOPE\n"[..], None),
            (&b"OK 1\n"[..], None),
        ] {
            let (_dir, ctx, port, tcp) = setup().await;
            let uds = tokio::net::UnixListener::bind(&ctx.uds).unwrap();
            let guest = tokio::spawn(fake_guest(uds, line, opened));
            let (mut c, task) = client(&tcp, &ctx, port).await;
            let mut buf = [0u8; 1];
            let got = c.read(&mut buf).await;
            assert!(matches!(&got, Ok(0)) || got.is_err(), "{line:?}: {got:?}");
            task.await.unwrap();
            let _ = guest.await;
        }
        // Nothing listening at all.
        let (_dir, ctx, port, tcp) = setup().await;
        let (mut c, task) = client(&tcp, &ctx, port).await;
        let mut buf = [0u8; 1];
        let got = c.read(&mut buf).await;
        assert!(got.is_err(), "a reset, not an empty answer: {got:?}");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_ok_line_and_the_answer_are_bounded() {
        let mut long: &[u8] = &[b'9'; 100];
        assert!(matches!(
            read_ok(&mut long).await,
            Err(ConnError::Handshake(_))
        ));
        let mut empty: &[u8] = b"";
        assert!(matches!(
            read_ok(&mut empty).await,
            Err(ConnError::NotAccepted)
        ));
        let mut ok: &[u8] = b"OK 7\nrest";
        assert_eq!(read_ok(&mut ok).await.unwrap(), 7);
        assert_eq!(ok, b"rest", "nothing after the line is consumed");
        let over = (MAX_PUBLISH_FRAME as u32 + 1).to_be_bytes();
        let mut over: &[u8] = &over;
        assert!(matches!(
            read_answer(&mut over).await,
            Err(ConnError::Length(_))
        ));
    }

    #[tokio::test]
    async fn the_clients_eof_waits_for_the_guest_and_the_stop_ends_it() {
        let (c_ours, mut c) = tokio::io::duplex(64);
        let (g_ours, mut g) = tokio::io::duplex(64);
        let (tx, stop) = watch::channel(false);
        let task = tokio::spawn(relay(c_ours, g_ours, stop));
        c.write_all(b"req").await.unwrap();
        c.shutdown().await.unwrap();
        let mut buf = [0u8; 3];
        g.read_exact(&mut buf).await.unwrap();
        // The client's EOF is not passed on; the answer still flows.
        g.write_all(b"answer").await.unwrap();
        let mut back = [0u8; 6];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"answer");
        tx.send_replace(true);
        assert_eq!(task.await.unwrap(), (3, 6));
    }
}
