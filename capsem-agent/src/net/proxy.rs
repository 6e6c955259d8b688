//! The guest's TCP side: nftables redirects every guest TCP connection
//! (except to loopback) to the listener here. For each one, on its own
//! named thread (at most [`MAX_CONNS`]; more are reset): the original
//! destination (`SO_ORIGINAL_DST`), the name its synthetic address stands
//! for, the first bytes peeked for a SNI or Host within [`PEEK_WAIT`], the
//! host's verdict on the network port, then a relay between the guest's
//! socket and that connection (the peeked bytes first) through one
//! bounded buffer per direction, in one poll loop that also watches the
//! stop signal (and, once one side ended, an idle bound,
//! [`IDLE_AFTER_EOF`]). A denied connection is reset at once.
//!
//! A flood logs no line per connection: the verdicts are debug lines, and
//! the resets over [`MAX_CONNS`] and the failed questions to the host are
//! counted ([`Trouble`]) and logged at most once per
//! [`gate::SUMMARY_EVERY`](super::gate::SUMMARY_EVERY) each.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsem_net::rate::{Failures, Summary};
use capsem_proto::net::{HostToNet, NetToHost};
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tracing::{debug, warn};

use super::ask::Host;
use super::dns::Table;
use super::gate::SUMMARY_EVERY;
use super::peek::{self, Peek, MAX_PEEK};
use crate::fdio;
use crate::relay::Ends;
use crate::stop::StopSignal;

/// Connections relayed at once.
pub const MAX_CONNS: usize = 128;
/// How long the first bytes are waited for (server-first protocols send none).
pub const PEEK_WAIT: Duration = Duration::from_millis(300);
/// How long the host may take to decide (it resolves and dials first).
const VERDICT_WAIT: Duration = Duration::from_secs(15);
/// Once one direction has ended, the relay ends after this long without a
/// byte: the half-close is sent on, but vhost-device-vsock does not pass a
/// vsock half-close to the host's socket, so a server waiting for the
/// client's EOF would otherwise hold both ends forever.
const IDLE_AFTER_EOF: Duration = Duration::from_secs(10);

/// What went wrong with connections, counted between log lines.
#[derive(Debug)]
pub struct Trouble {
    full: Summary,
    failed: Failures,
}

impl Default for Trouble {
    fn default() -> Self {
        Self {
            full: Summary::new(SUMMARY_EVERY),
            failed: Failures::new(SUMMARY_EVERY),
        }
    }
}

impl Trouble {
    /// A connection reset because [`MAX_CONNS`] were in progress.
    pub fn full(&mut self) {
        self.full.add(1);
    }

    /// A question to the host that got no verdict.
    pub fn failed(&mut self, why: String) {
        self.failed.add(why);
    }

    /// The lines due now (also logged).
    pub fn report(&mut self, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(n) = self.full.due(now) {
            lines.push(format!(
                "net: {n} connections reset: {MAX_CONNS} already in progress"
            ));
        }
        if let Some((n, last)) = self.failed.due(now) {
            lines.push(format!(
                "net: {n} connections reset: no verdict from the host; the last: {last}"
            ));
        }
        for l in &lines {
            warn!("{l}");
        }
        lines
    }

    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        self.full
            .deadline(now)
            .into_iter()
            .chain(self.failed.deadline(now))
            .min()
    }
}

fn lock(t: &Mutex<Trouble>) -> std::sync::MutexGuard<'_, Trouble> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts until `stop`; every connection thread is joined before it returns.
pub fn serve(
    listener: &TcpListener,
    table: &Arc<Mutex<Table>>,
    host: &Host,
    stop: &Arc<StopSignal>,
) {
    let own = listener.local_addr().ok();
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let trouble = Arc::new(Mutex::new(Trouble::default()));
    loop {
        let now = Instant::now();
        let deadline = {
            let mut t = lock(&trouble);
            t.report(now);
            // Connection threads count too: look again within the interval.
            Some(t.deadline(now).unwrap_or(now + SUMMARY_EVERY))
        };
        let mut fds = [
            fdio::pollfd(stop.fd(), fdio::IN),
            fdio::pollfd(listener.as_fd(), fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, deadline) {
            warn!("net: poll failed: {e}");
            break;
        }
        if fdio::ready(&fds[0]) {
            break;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("net: accept failed: {e}");
                continue;
            }
        };
        conns.retain(|h| !h.is_finished());
        if conns.len() >= MAX_CONNS {
            lock(&trouble).full();
            reset(stream);
            continue;
        }
        let (table, host, stop) = (table.clone(), host.clone(), stop.clone());
        let t = trouble.clone();
        let spawned = std::thread::Builder::new()
            .name("net-conn".into())
            .spawn(move || {
                if let Err(e) = connection(stream, own, &table, &host, &stop, &t) {
                    debug!("net: connection ended: {e}");
                }
            });
        match spawned {
            Ok(h) => conns.push(h),
            Err(e) => warn!("net: cannot start a connection thread: {e}"),
        }
    }
    // The stop is triggered (or the loop failed): every relay sees it.
    stop.trigger();
    for h in conns {
        let _ = h.join();
    }
    lock(&trouble).report(Instant::now() + SUMMARY_EVERY);
}

/// Closes with a RST (SO_LINGER 0) instead of a FIN: refused at once.
fn reset(stream: TcpStream) {
    let _ = setsockopt(
        &stream,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    drop(stream);
}

/// The destination the guest dialled before nftables redirected it.
fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sin = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
}

fn connection(
    stream: TcpStream,
    own: Option<SocketAddr>,
    table: &Mutex<Table>,
    host: &Host,
    stop: &StopSignal,
    trouble: &Mutex<Trouble>,
) -> io::Result<()> {
    let dst = original_dst(&stream)?;
    if Some(dst) == own {
        // Dialled the listener itself: nothing to relay.
        return Ok(());
    }
    let name = match dst {
        SocketAddr::V4(v4) => table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .name_of(*v4.ip())
            .map(str::to_owned),
        SocketAddr::V6(_) => None,
    };
    stream.set_nonblocking(true)?;
    let (peeked, seen) = peek_name(stream.as_fd(), stop.fd())?;
    let question = NetToHost::Connect {
        token: host.token.clone(),
        name: name.clone(),
        seen: seen.clone(),
        ip: dst.ip().to_string(),
        port: dst.port(),
    };
    let (vsock, answer) = match host.ask(&question, stop.fd(), VERDICT_WAIT) {
        Ok(got) => got,
        Err(e) => {
            let why = format!("{dst}: {}", crate::session::chain(&e));
            debug!("net: no verdict for {why}");
            lock(trouble).failed(why);
            reset(stream);
            return Ok(());
        }
    };
    let what = name
        .as_deref()
        .map_or_else(|| dst.to_string(), |n| format!("{n}:{}", dst.port()));
    match answer {
        HostToNet::Verdict { allowed: true, .. } => {
            debug!("net: {what} allowed");
            let mut out = fdio::Blocking::new(vsock.as_fd(), stop.fd());
            out.write_all(&peeked)?;
            let ends = Ends::Both {
                idle: IDLE_AFTER_EOF,
            };
            crate::relay::relay(stream.as_fd(), vsock.as_fd(), stop.fd(), ends)
        }
        HostToNet::Verdict { reason, .. } => {
            debug!("net: {what} denied: {reason}");
            reset(stream);
            Ok(())
        }
        HostToNet::Resolved { .. } => {
            reset(stream);
            Err(io::Error::other("a Resolved answer to a Connect"))
        }
    }
}

/// Reads what the client sends first, until a name is found, the bound is
/// reached, or [`PEEK_WAIT`] passes.
fn peek_name(fd: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Option<String>)> {
    let deadline = Instant::now() + PEEK_WAIT;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 4096];
    while buf.len() < MAX_PEEK {
        let mut fds = [fdio::pollfd(stop, fdio::IN), fdio::pollfd(fd, fdio::IN)];
        if fdio::poll(&mut fds, Some(deadline))? == 0 || fdio::ready(&fds[0]) {
            break;
        }
        let room = (MAX_PEEK - buf.len()).min(chunk.len());
        match fdio::read(fd, &mut chunk[..room]) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        if let Peek::Done(name) = peek::inspect(&buf) {
            return Ok((buf, name));
        }
    }
    Ok((buf, None))
}
