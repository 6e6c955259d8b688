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

use super::limit::Kind;
use super::{NetCtx, NetRecord, DIAL_WAIT, HEADER_WAIT, MAX_LOOKUPS, RELAY_BUF, RESOLVE_WAIT};

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
    if !ctx.limiter.admit(kind(&question), start) {
        ctx.report(start);
        return refuse(&mut stream, &question).await;
    }
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
                    count: None,
                    proto: None,
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
                count: None,
                proto: None,
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
        NetToHost::Dropped {
            proto,
            ip,
            port,
            count,
            ..
        } => {
            let record =
                super::dropped::record(&proto, &ip, port, count).ok_or(ConnError::Bounds)?;
            let verdict = HostToNet::Verdict {
                allowed: false,
                reason: record.reason.clone(),
            };
            ctx.record(&record);
            answer(&mut stream, &verdict).await
        }
    }
}

fn kind(q: &NetToHost) -> Kind {
    match q {
        NetToHost::Resolve { .. } => Kind::Resolve,
        NetToHost::Connect { .. } => Kind::Connect,
        NetToHost::Dropped { .. } => Kind::Dropped,
    }
}

/// The quick answer to a question over the rate: a `Resolve` is closed
/// unanswered (the agent's SERVFAIL, which it does not remember as a
/// refusal), a `Connect` denied before any lookup or dial, a `Dropped`
/// denied unrecorded.
async fn refuse(stream: &mut UnixStream, q: &NetToHost) -> Result<(), ConnError> {
    let reason = match q {
        NetToHost::Resolve { .. } => return Ok(()),
        NetToHost::Connect { .. } => "rate limit: too many connections a second",
        NetToHost::Dropped { .. } => "rate limit: too many records of dropped packets a second",
    };
    let verdict = HostToNet::Verdict {
        allowed: false,
        reason: reason.into(),
    };
    answer(stream, &verdict).await
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

/// The name's addresses: the test override, else the system resolver on
/// a blocking thread that holds one of [`super::MAX_LOOKUPS`] permits
/// until the resolver returns (a timeout here ends the wait, not the
/// lookup).
async fn resolve(ctx: &NetCtx, name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    if let Some(listed) = ctx.hosts.lookup(name) {
        return Ok(listed.to_vec());
    }
    let permit = ctx
        .lookups
        .clone()
        .try_acquire_owned()
        .map_err(|_| format!("{MAX_LOOKUPS} names are being resolved already"))?;
    let owned = name.to_owned();
    let lookup = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&(owned.as_str(), port))
            .map(|found| found.map(|a| a.ip()).collect::<Vec<_>>())
    });
    tokio::time::timeout(RESOLVE_WAIT, lookup)
        .await
        .map_err(|_| format!("resolving {name} timed out"))?
        .map_err(|e| format!("cannot resolve {name}: {e}"))?
        .map_err(|e| format!("cannot resolve {name}: {e}"))
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
    let copy = tokio::io::copy_bidirectional_with_sizes(stream, &mut server, RELAY_BUF, RELAY_BUF);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Hosts, NetLog};
    use capsem_proto::frame::NetGuest;
    use std::sync::Arc;

    fn ctx(dir: &std::path::Path, port: u16) -> Arc<NetCtx> {
        let allow = format!("allow=a.test:{port},127.0.0.1:{port}");
        Arc::new(NetCtx::new(
            "tok".into(),
            capsem_net::Policy::from_args(&[allow]).unwrap(),
            Hosts::parse(std::path::Path::new("h"), "127.0.0.1 a.test b.test\n").unwrap(),
            NetLog::open(dir).unwrap(),
        ))
    }

    /// Sends `q` over a socket pair to [`serve`]: the guest end, the
    /// answer, and the serving task.
    async fn ask(
        ctx: &Arc<NetCtx>,
        q: NetToHost,
    ) -> (UnixStream, HostToNet, tokio::task::JoinHandle<()>) {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let ctx = ctx.clone();
        let task = tokio::spawn(async move {
            let (_stop_tx, stop) = watch::channel(false);
            serve(host, &ctx, stop).await.unwrap();
        });
        guest
            .write_all(&Codec::<NetGuest>::encode(&q).unwrap())
            .await
            .unwrap();
        let mut prefix = [0u8; 4];
        guest.read_exact(&mut prefix).await.unwrap();
        let mut frame = prefix.to_vec();
        frame.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
        guest.read_exact(&mut frame[4..]).await.unwrap();
        let mut codec = Codec::<NetGuest>::new();
        codec.feed(&frame).unwrap();
        (guest, codec.next_message().unwrap().unwrap(), task)
    }

    /// [`serve`]'s result for a connection that sent `bytes` (the guest's
    /// end stays open meanwhile).
    async fn serve_bytes(c: &NetCtx, bytes: &[u8]) -> Result<(), ConnError> {
        let (mut guest, host) = UnixStream::pair().unwrap();
        guest.write_all(bytes).await.unwrap();
        let (_tx, stop) = watch::channel(false);
        serve(host, c, stop).await
    }

    /// A denying verdict whose reason says `needle`.
    fn assert_denied(v: &HostToNet, needle: &str) {
        match v {
            HostToNet::Verdict {
                allowed: false,
                reason,
            } => assert!(reason.contains(needle), "{reason}"),
            other => panic!("not a denial: {other:?}"),
        }
    }

    /// `net.jsonl`'s records and its text.
    fn records(dir: &std::path::Path) -> (Vec<serde_json::Value>, String) {
        let text = std::fs::read_to_string(dir.join("net.jsonl")).unwrap();
        let recs = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (recs, text)
    }

    fn connect(name: Option<&str>, seen: Option<&str>, port: u16) -> NetToHost {
        NetToHost::Connect {
            token: "tok".into(),
            name: name.map(str::to_owned),
            seen: seen.map(str::to_owned),
            ip: "198.18.0.1".into(),
            port,
        }
    }

    #[tokio::test]
    async fn allowed_relays_and_denied_are_refused_and_all_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let c = ctx(dir.path(), port);
        let echo = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let (mut guest, verdict, task) =
            ask(&c, connect(Some("a.test"), Some("a.test"), port)).await;
        assert!(
            matches!(verdict, HostToNet::Verdict { allowed: true, .. }),
            "{verdict:?}"
        );
        guest.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        guest.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        echo.await.unwrap();
        drop(guest);
        task.await.unwrap();

        for (q, why) in [
            (connect(Some("a.test"), Some("b.test"), port), "asked for"),
            (connect(Some("b.test"), None, port), "no rule"),
            (connect(Some("a.test"), None, port + 1), "no rule"),
            (connect(None, None, port), "no rule"),
        ] {
            let (_g, verdict, task) = ask(&c, q.clone()).await;
            assert_denied(&verdict, why);
            task.await.unwrap();
        }
        let resolve = |name: &str| NetToHost::Resolve {
            token: "tok".into(),
            name: name.into(),
        };
        let (_g, r, t) = ask(&c, resolve("b.test")).await;
        assert_eq!(r, HostToNet::Resolved { allowed: false });
        t.await.unwrap();
        let (_g, r, t) = ask(&c, resolve("A.test")).await;
        assert_eq!(r, HostToNet::Resolved { allowed: true });
        t.await.unwrap();

        let (recs, text) = records(dir.path());
        // One per connect, one per refused name; none for an allowed name.
        assert_eq!(recs.len(), 6, "{text}");
        assert_eq!(recs[0]["verdict"], "allow");
        assert_eq!(recs[0]["address"], format!("127.0.0.1:{port}"));
        assert_eq!(recs[0]["bytes_out"], 5);
        assert_eq!(recs[0]["bytes_in"], 5);
        assert!(recs[1..5].iter().all(|r| r["verdict"] == "deny"));
        assert_eq!(recs[5]["kind"], "resolve");
        assert_eq!(recs[5]["name"], "b.test");
    }

    #[tokio::test]
    async fn questions_over_the_rate_get_a_quick_refusal_and_one_summary_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = NetCtx::new(
            "tok".into(),
            capsem_net::Policy::from_args(&["allow=a.test:1,c.test:1"]).unwrap(),
            Hosts::parse(std::path::Path::new("h"), "").unwrap(),
            NetLog::open(dir.path()).unwrap(),
        );
        c.limiter = crate::net::limit::Limiter::with([(1, 2), (1, 1), (1, 1)], Instant::now());
        let c = Arc::new(c);
        let resolve = || NetToHost::Resolve {
            token: "tok".into(),
            name: "b.test".into(),
        };
        for _ in 0..2 {
            let (_g, r, t) = ask(&c, resolve()).await;
            assert_eq!(r, HostToNet::Resolved { allowed: false });
            t.await.unwrap();
        }
        // Over the bucket: closed unanswered, many times over.
        for _ in 0..50 {
            let (mut guest, host) = UnixStream::pair().unwrap();
            guest
                .write_all(&Codec::<NetGuest>::encode(&resolve()).unwrap())
                .await
                .unwrap();
            let (_tx, stop) = watch::channel(false);
            serve(host, &c, stop).await.unwrap();
            let mut buf = [0u8; 1];
            assert_eq!(guest.read(&mut buf).await.unwrap(), 0);
        }
        // The Connect bucket is its own; its one token goes to a lookup
        // that finds every permit taken (nothing is asked of the system
        // resolver); the next is over the rate.
        let held = c
            .lookups
            .clone()
            .acquire_many_owned(MAX_LOOKUPS as u32)
            .await;
        let (_g, v, t) = ask(&c, connect(Some("c.test"), None, 1)).await;
        t.await.unwrap();
        assert_denied(&v, "being resolved already");
        drop(held);
        let (_g, v, t) = ask(&c, connect(Some("a.test"), None, 1)).await;
        t.await.unwrap();
        assert_denied(&v, "rate limit");
        c.report(Instant::now() + crate::net::limit::SUMMARY_EVERY);
        let (recs, text) = records(dir.path());
        // Two refused names, the denied connect, the first summaries at
        // once (one resolve, one connect), then the rest of the resolves.
        let counted: Vec<(&str, u64)> = recs
            .iter()
            .filter_map(|r| Some((r["kind"].as_str()?, r.get("count")?.as_u64()?)))
            .collect();
        assert_eq!(
            counted,
            [("resolve", 1), ("connect", 1), ("resolve", 49)],
            "{text}"
        );
        assert_eq!(recs.len(), 6, "{text}");
        assert!(recs
            .iter()
            .filter(|r| r.get("count").is_some())
            .all(|r| r["verdict"] == "deny"
                && r["name"].is_null()
                && r["reason"].as_str().unwrap().starts_with("rate limit")));
    }

    #[tokio::test]
    async fn dropped_packets_are_one_record_each_and_a_denial() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), 1);
        let dropped = |proto: &str, ip: &str| NetToHost::Dropped {
            token: "tok".into(),
            proto: proto.into(),
            ip: ip.into(),
            port: Some(9),
            count: 4,
        };
        let (_g, v, t) = ask(&c, dropped("udp", "192.0.2.1")).await;
        t.await.unwrap();
        assert_denied(&v, "UDP other than DNS");
        // A field the agent never sends (over the protocol's bounds, or
        // not an address): refused, unrecorded.
        for bad in [dropped("sctp", "192.0.2.1"), dropped("udp", "nowhere")] {
            let bytes = Codec::<NetGuest>::encode(&bad).unwrap();
            assert!(matches!(
                serve_bytes(&c, &bytes).await,
                Err(ConnError::Bounds)
            ));
        }
        let (recs, text) = records(dir.path());
        assert_eq!(recs.len(), 1, "{text}");
        assert_eq!(recs[0]["kind"], "packet");
        assert_eq!(recs[0]["proto"], "udp");
        assert_eq!(recs[0]["guest_ip"], "192.0.2.1");
        assert_eq!(recs[0]["port"], 9);
        assert_eq!(recs[0]["count"], 4);
        assert_eq!(recs[0]["verdict"], "deny");
    }

    #[tokio::test]
    async fn a_wrong_token_or_oversized_question_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), 1);
        let q = NetToHost::Resolve {
            token: "bad".into(),
            name: "a.test".into(),
        };
        let bytes = Codec::<NetGuest>::encode(&q).unwrap();
        assert!(matches!(
            serve_bytes(&c, &bytes).await,
            Err(ConnError::Token(_))
        ));
        assert!(matches!(
            serve_bytes(&c, &100_000u32.to_be_bytes()).await,
            Err(ConnError::Length(100_000))
        ));
    }
}
