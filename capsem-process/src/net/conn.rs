//! One network-port connection: the question, the decision, the record,
//! and for an allowed connect the relay.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use capsem_net::policy::{Denied, Grant};
use capsem_net::Verdict;
use capsem_proto::frame::{NetHost, LEN_PREFIX};
use capsem_proto::net::{HostToNet, NetToHost, MAX_NET_FRAME, MAX_NET_REASON};
use capsem_proto::{Codec, FrameError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;

use super::{NetCtx, NetRecord, DIAL_WAIT, HEADER_WAIT, RELAY_BUF, RESOLVE_WAIT};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("no question within {HEADER_WAIT:?}")]
    Timeout,
    #[error("cannot read the question")]
    Read(#[source] io::Error),
    #[error("a question of {0} bytes (1 to {MAX_NET_FRAME})")]
    Length(usize),
    #[error("invalid question")]
    Frame(#[source] FrameError),
    #[error(transparent)]
    Token(#[from] capsem_proto::guest::HelloError),
    #[error("a question over the protocol's bounds")]
    Bounds,
    #[error("cannot send the answer")]
    Write(#[source] io::Error),
}

/// Reads exactly one frame: nothing after it is consumed.
async fn read_question(stream: &mut UnixStream) -> Result<NetToHost, ConnError> {
    let read = async {
        let mut prefix = [0u8; LEN_PREFIX];
        stream
            .read_exact(&mut prefix)
            .await
            .map_err(ConnError::Read)?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len == 0 || len > MAX_NET_FRAME {
            return Err(ConnError::Length(len));
        }
        let mut frame = vec![0u8; LEN_PREFIX + len];
        frame[..LEN_PREFIX].copy_from_slice(&prefix);
        stream
            .read_exact(&mut frame[LEN_PREFIX..])
            .await
            .map_err(ConnError::Read)?;
        let mut codec = Codec::<NetHost>::new();
        codec.feed(&frame).map_err(ConnError::Frame)?;
        codec
            .next_message()
            .map_err(ConnError::Frame)?
            .ok_or(ConnError::Length(len))
    };
    tokio::time::timeout(HEADER_WAIT, read)
        .await
        .map_err(|_| ConnError::Timeout)?
}

async fn answer(stream: &mut UnixStream, msg: &HostToNet) -> Result<(), ConnError> {
    let frame = Codec::<NetHost>::encode(msg).map_err(ConnError::Frame)?;
    stream.write_all(&frame).await.map_err(ConnError::Write)
}

fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_NET_REASON {
        let mut end = MAX_NET_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// Serves one connection.
pub async fn serve(
    mut stream: UnixStream,
    ctx: &NetCtx,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let question = read_question(&mut stream).await?;
    capsem_proto::guest::check_token(question.token(), &ctx.token)?;
    if !question.within_bounds() {
        return Err(ConnError::Bounds);
    }
    let start = Instant::now();
    let time = capsem_host::vmstate::now_rfc3339();
    match question {
        NetToHost::Resolve { name, .. } => {
            let allowed = ctx.policy.may_resolve(&name);
            if !allowed {
                let reason = if ctx.policy.is_none() {
                    Denied::NoNetwork
                } else {
                    Denied::NoRule
                };
                ctx.record(&NetRecord {
                    time,
                    kind: "resolve",
                    name: Some(name),
                    seen: None,
                    guest_ip: None,
                    address: None,
                    port: None,
                    verdict: "deny",
                    reason: reason.to_string(),
                    bytes_out: 0,
                    bytes_in: 0,
                    duration_ms: 0,
                });
            }
            answer(&mut stream, &HostToNet::Resolved { allowed }).await
        }
        NetToHost::Connect {
            name,
            seen,
            ip,
            port,
            ..
        } => {
            let mut record = NetRecord {
                time,
                kind: "connect",
                name,
                seen,
                guest_ip: Some(ip),
                address: None,
                port: Some(port),
                verdict: "deny",
                reason: String::new(),
                bytes_out: 0,
                bytes_in: 0,
                duration_ms: 0,
            };
            let result = match decide(ctx, &record).await {
                Ok((server, because)) => {
                    record.address = server.peer_addr().ok().map(|a| a.to_string());
                    record.verdict = "allow";
                    record.reason = because;
                    relay(&mut stream, server, &mut record, stop).await
                }
                Err(reason) => {
                    record.reason = bounded(reason);
                    let verdict = HostToNet::Verdict {
                        allowed: false,
                        reason: record.reason.clone(),
                    };
                    answer(&mut stream, &verdict).await
                }
            };
            record.duration_ms = start.elapsed().as_millis() as u64;
            ctx.record(&record);
            result
        }
    }
}

/// Both steps of the policy, the host-side resolution and the dial: the
/// connected server and the rule that allowed it, or why not.
async fn decide(ctx: &NetCtx, r: &NetRecord) -> Result<(TcpStream, String), String> {
    let port = r.port.unwrap_or(0);
    let grant: Grant = ctx
        .policy
        .check_connection(r.name.as_deref(), r.seen.as_deref(), port)
        .map_err(|d| d.to_string())?;
    let addresses: Vec<IpAddr> = match &r.name {
        Some(name) => resolve(ctx, name, port).await?,
        None => {
            let ip = r.guest_ip.as_deref().unwrap_or("");
            vec![ip.parse().map_err(|_| format!("bad address {ip:?}"))?]
        }
    };
    let mut first_denial = None;
    let mut last_error = None;
    for ip in addresses {
        match ctx.policy.check_address(&grant, ip) {
            Verdict::Allow(because) => {
                let addr = SocketAddr::new(ip, port);
                match tokio::time::timeout(DIAL_WAIT, TcpStream::connect(addr)).await {
                    Ok(Ok(server)) => return Ok((server, because.to_string())),
                    Ok(Err(e)) => last_error = Some(format!("cannot connect to {addr}: {e}")),
                    Err(_) => last_error = Some(format!("connecting to {addr} timed out")),
                }
            }
            Verdict::Deny(d) => {
                first_denial.get_or_insert(d.to_string());
            }
        }
    }
    Err(last_error
        .or(first_denial)
        .unwrap_or_else(|| "the name has no address".into()))
}

/// The name's addresses: the test override, else the system resolver.
async fn resolve(ctx: &NetCtx, name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    if let Some(listed) = ctx.hosts.lookup(name) {
        return Ok(listed.to_vec());
    }
    let found = tokio::time::timeout(RESOLVE_WAIT, tokio::net::lookup_host((name, port)))
        .await
        .map_err(|_| format!("resolving {name} timed out"))?
        .map_err(|e| format!("cannot resolve {name}: {e}"))?;
    Ok(found.map(|a| a.ip()).collect())
}

/// Sends the allowing verdict and relays until either side closes or the
/// VM stops; counts the bytes into `record`.
async fn relay(
    stream: &mut UnixStream,
    mut server: TcpStream,
    record: &mut NetRecord,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let verdict = HostToNet::Verdict {
        allowed: true,
        reason: bounded(record.reason.clone()),
    };
    answer(stream, &verdict).await?;
    let copy =
        tokio::io::copy_bidirectional_with_sizes(stream, &mut server, RELAY_BUF, RELAY_BUF);
    tokio::select! {
        done = copy => match done {
            Ok((out, back)) => {
                record.bytes_out = out;
                record.bytes_in = back;
            }
            Err(e) => tracing::debug!("net relay ended: {e}"),
        },
        () = crate::accept::stopped(&mut stop) => {}
    }
    Ok(())
}
