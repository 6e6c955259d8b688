//! The execve audit stream: one record per `execve` in the guest, from the
//! kernel audit subsystem, delivered to the host on the audit port
//! ([`capsem_proto::guest::PORT_AUDIT`]; see [`capsem_proto::audit`]).
//!
//! Two parts with different lives:
//!
//! * [`Auditor`], for the agent's whole life (shell and persistent modes):
//!   the record [`source`] (the [`netlink`] socket, opened once; its wire
//!   format in [`nlwire`]) and the `capsem-audit-rx` thread that reads it,
//!   parses records ([`parse`]), groups them into exec events ([`event`])
//!   and appends them to the shared, bounded [`buffer`] of
//!   unacknowledged records (4096 records, 16 MiB). Reading never depends on a host connection, so
//!   the kernel's queue is drained even between generations (a full audit
//!   socket would make the kernel drop records or stall exec'ing processes);
//!   the bounded buffer is the only place records can be lost, oldest first,
//!   with a log line saying how many.
//! * The per-generation `capsem-audit` bridge thread ([`run_generation`]):
//!   connects to the audit port through the generation's transport after
//!   the control hello was acknowledged, sends `Hello{token, generation}`,
//!   then every unacknowledged record in serial order and new ones as they
//!   come ([`stream`]), applying the host's acks. It stops with the
//!   generation's stop signal.
//!
//! An audit connection that fails (refused, closed by the host, invalid
//! frame) is logged and the thread then waits for the stop: it does not end
//! the generation. The control and terminal connections decide transport
//! loss; an audit-only fault must not cut the user's shell, and the records
//! stay buffered and go out on the next generation's audit connection.
//!
//! `$CAPSEM_AUDIT` selects the source ([`AuditMode`]): unset or empty:
//! netlink with the vsock transport (inside a VM), off with a Unix transport
//! (`--vmm none`: the agent runs on the host, whose audit configuration is
//! never touched); `1`: netlink; `0`: off; `file:PATH`: auditd log lines
//! from a file or FIFO (tests). Exec mode has no audit. When audit is off
//! or cannot be enabled (not root, no `CONFIG_AUDIT`, another audit daemon),
//! one line is logged, no audit connection is ever opened, and the
//! `capsem-audit` thread just waits for its generation's stop.

pub mod buffer;
pub mod event;
pub mod netlink;
pub mod nlwire;
pub mod parse;
pub mod source;
pub mod stream;

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsem_proto::guest::PORT_AUDIT;
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, info, warn};

use self::buffer::{Pushed, Unacked, UNACKED_BYTES, UNACKED_CAP};
use self::parse::Assembler;
use self::source::{Lines, Source};
use crate::fdio;
use crate::session::chain;
use crate::stop::StopSignal;
use crate::transport::{Connected, Transport};

/// The lifetime reader's thread name.
pub const READER_THREAD: &str = "capsem-audit-rx";
/// At most one "records dropped" line per this long.
const DROP_LOG_EVERY: Duration = Duration::from_secs(1);

/// Errors of the audit configuration and of starting the reader.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("CAPSEM_AUDIT must be empty, 0, 1 or file:PATH, got {0:?}")]
    Config(String),
    #[error("cannot create the audit wake eventfd")]
    EventFd(#[source] nix::Error),
    #[error("cannot create the audit reader's stop signal")]
    Stop(#[source] crate::stop::StopError),
    #[error("cannot start thread {READER_THREAD}")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Source(#[from] source::SourceError),
}

/// What `$CAPSEM_AUDIT` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditMode {
    /// No audit; the reason is logged.
    Off(&'static str),
    /// The kernel audit subsystem over netlink; restored at the end only
    /// outside a VM (a Unix transport).
    Netlink(netlink::OnClose),
    /// auditd log lines from a file or FIFO.
    Lines(PathBuf),
}

impl AuditMode {
    /// `value` is `$CAPSEM_AUDIT` (`None`: unset).
    pub fn parse(value: Option<&str>, transport: &Transport) -> Result<Self, AuditError> {
        let on_close = match transport {
            Transport::Vsock => netlink::OnClose::Leave,
            Transport::Unix(_) => netlink::OnClose::Restore,
        };
        match value {
            None | Some("") => Ok(match transport {
                Transport::Vsock => Self::Netlink(on_close),
                Transport::Unix(_) => {
                    Self::Off("not inside a VM (unix transport); CAPSEM_AUDIT=1 would enable it")
                }
            }),
            Some("0") => Ok(Self::Off("CAPSEM_AUDIT=0")),
            Some("1") => Ok(Self::Netlink(on_close)),
            Some(v) => match v.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::Lines(PathBuf::from(path))),
                _ => Err(AuditError::Config(v.chars().take(64).collect())),
            },
        }
    }

    pub fn from_env(transport: &Transport) -> Result<Self, AuditError> {
        match std::env::var("CAPSEM_AUDIT") {
            Ok(v) => Self::parse(Some(&v), transport),
            Err(std::env::VarError::NotPresent) => Self::parse(None, transport),
            Err(std::env::VarError::NotUnicode(_)) => Err(AuditError::Config("<not UTF-8>".into())),
        }
    }
}

/// State shared by the reader and the generation threads.
#[derive(Debug)]
pub struct Shared {
    unacked: Mutex<Unacked>,
    /// Readable after the reader added records.
    wake: EventFd,
}

impl Shared {
    fn new(cap: usize, max_bytes: usize) -> Result<Self, AuditError> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(AuditError::EventFd)?;
        Ok(Self {
            unacked: Mutex::new(Unacked::new(cap, max_bytes)),
            wake,
        })
    }

    /// The buffer; a panic elsewhere while it was held leaves it usable.
    pub fn lock(&self) -> MutexGuard<'_, Unacked> {
        self.unacked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn notify(&self) {
        // Only an overflow of the counter fails, which leaves it readable.
        let _ = self.wake.write(1);
    }

    /// Consumes the wake-up (EAGAIN when there was none).
    pub fn clear_wake(&self) {
        let _ = self.wake.read();
    }
}

/// The agent-lifetime audit source and its reader thread. Dropping it stops
/// and joins the thread and restores the kernel's audit configuration.
#[derive(Debug)]
pub struct Auditor {
    shared: Arc<Shared>,
    stop: Arc<StopSignal>,
    reader: Option<JoinHandle<Source>>,
}

impl Auditor {
    /// Opens the source `mode` selects and starts the reader. Logs one line
    /// saying whether audit is on; `None` when it is off or cannot be
    /// enabled. Call it after the termination signals are blocked: the
    /// thread inherits the mask.
    pub fn start(mode: &AuditMode) -> Option<Self> {
        match Self::try_start(mode) {
            Ok(Some(a)) => Some(a),
            Ok(None) => None,
            Err(e) => {
                info!("audit off: {}", chain(&e));
                None
            }
        }
    }

    fn try_start(mode: &AuditMode) -> Result<Option<Self>, AuditError> {
        let source = match mode {
            AuditMode::Off(why) => {
                info!("audit off: {why}");
                return Ok(None);
            }
            AuditMode::Netlink(on_close) => {
                let nl = netlink::Netlink::open(*on_close).map_err(source::SourceError::from)?;
                let prev = nl.previous();
                info!(
                    source = "netlink",
                    pid = std::process::id(),
                    previously_enabled = prev.enabled,
                    "audit enabled"
                );
                Source::Netlink(nl)
            }
            AuditMode::Lines(path) => {
                let src = Source::Lines(Lines::open(path)?);
                info!(source = %path.display(), "audit enabled");
                src
            }
        };
        let shared = Arc::new(Shared::new(UNACKED_CAP, UNACKED_BYTES)?);
        let stop = Arc::new(StopSignal::new().map_err(AuditError::Stop)?);
        let (s, t) = (Arc::clone(&shared), Arc::clone(&stop));
        // The source moves into the thread and comes back at the join, so
        // that it is closed (the kernel's configuration restored) after the
        // last read.
        let spawned = std::thread::Builder::new()
            .name(READER_THREAD.to_owned())
            .spawn(move || {
                let mut source = source;
                read_loop(&mut source, &s, &t);
                source
            });
        let reader = match spawned {
            Ok(h) => h,
            Err(e) => return Err(AuditError::Spawn(e)),
        };
        Ok(Some(Self {
            shared,
            stop,
            reader: Some(reader),
        }))
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for Auditor {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(h) = self.reader.take() {
            match h.join() {
                Ok(source) => source.close(),
                Err(_) => warn!("thread {READER_THREAD} panicked"),
            }
        }
        let unacked = self.shared.lock();
        if !unacked.is_empty() {
            info!(
                unacknowledged = unacked.len(),
                "audit stopped with records the host did not acknowledge"
            );
        }
    }
}

/// The reader: source → assembler → shared buffer, until the stop.
fn read_loop(source: &mut Source, shared: &Shared, stop: &StopSignal) {
    let mut asm = Assembler::new();
    let mut out = Vec::new();
    let mut alive = true;
    let mut dropped = 0u64;
    let mut last_drop_log: Option<Instant> = None;
    loop {
        let src_fd = if alive { source.fd() } else { None };
        let mut fds = vec![fdio::pollfd(stop.fd(), fdio::IN)];
        if let Some(fd) = src_fd {
            fds.push(fdio::pollfd(fd, fdio::IN));
        }
        if let Err(e) = fdio::poll(&mut fds, None) {
            warn!(error = %e, "audit reader poll failed; no more records");
            let _ = stop.receiver().recv();
            return;
        }
        if fdio::ready(&fds[0]) {
            debug!(stats = ?asm.stats(), "audit reader stopping");
            if dropped > 0 {
                warn!(
                    dropped,
                    "audit buffer full: oldest unacknowledged records dropped"
                );
            }
            return;
        }
        let res = source.read_available(&mut |kind, text| asm.feed(kind, text, &mut out));
        if let Err(e) = res {
            warn!("audit source failed; no more records: {}", chain(&e));
            alive = false;
        }
        if alive && source.fd().is_none() {
            // A file read to its end: nothing more will complete the rest.
            asm.finish(&mut out);
        }
        if !out.is_empty() {
            let mut unacked = shared.lock();
            for rec in out.drain(..) {
                let serial = rec.serial;
                if unacked.push(rec) == Pushed::OutOfOrder {
                    debug!(serial, "audit record out of serial order dropped");
                }
            }
            dropped += unacked.take_dropped();
            drop(unacked);
            shared.notify();
        }
        let log_due = match last_drop_log {
            None => true,
            Some(t) => t.elapsed() >= DROP_LOG_EVERY,
        };
        if dropped > 0 && log_due {
            warn!(
                dropped,
                cap = UNACKED_CAP,
                max_bytes = UNACKED_BYTES,
                "audit buffer full: oldest unacknowledged records dropped"
            );
            dropped = 0;
            last_drop_log = Some(Instant::now());
        }
    }
}

/// What one generation's `capsem-audit` thread needs.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    pub transport: &'a Transport,
    pub token: &'a str,
    pub shared: &'a Shared,
}

/// The `capsem-audit` thread of generation `generation`: with no `link`
/// (audit off) it only waits for the stop; otherwise it connects to the
/// audit port and serves it until the stop. Failures are logged, never
/// reported: they do not end the generation.
pub fn run_generation(link: Option<Link<'_>>, generation: u64, stop: &StopSignal) {
    let Some(link) = link else {
        let _ = stop.receiver().recv();
        return;
    };
    let conn = match link.transport.connect(PORT_AUDIT, stop.fd()) {
        Ok(Connected::Socket(fd)) => fd,
        Ok(Connected::Cancelled) => return,
        Err(e) => {
            warn!(
                generation,
                unacknowledged = link.shared.lock().len(),
                "audit connection failed; records kept for the next generation: {}",
                chain(&e)
            );
            let _ = stop.receiver().recv();
            return;
        }
    };
    info!(
        generation,
        unacknowledged = link.shared.lock().len(),
        "audit connected"
    );
    match stream::serve(conn.as_fd(), link.token, generation, link.shared, stop.fd()) {
        Ok(s) => info!(
            generation,
            sent = s.sent,
            acked = s.acked,
            "audit connection stopped"
        ),
        Err(e) => {
            warn!(
                generation,
                unacknowledged = link.shared.lock().len(),
                "audit connection ended; records kept for the next generation: {}",
                chain(&e)
            );
            let _ = stop.receiver().recv();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_values() {
        let vsock = Transport::Vsock;
        let unix = Transport::Unix(PathBuf::from("/tmp/x"));
        let leave = AuditMode::Netlink(netlink::OnClose::Leave);
        assert_eq!(AuditMode::parse(None, &vsock).unwrap(), leave);
        assert_eq!(AuditMode::parse(Some(""), &vsock).unwrap(), leave);
        assert_eq!(AuditMode::parse(Some("1"), &vsock).unwrap(), leave);
        assert!(matches!(
            AuditMode::parse(None, &unix).unwrap(),
            AuditMode::Off(_)
        ));
        assert!(matches!(
            AuditMode::parse(Some("0"), &vsock).unwrap(),
            AuditMode::Off(_)
        ));
        assert_eq!(
            AuditMode::parse(Some("1"), &unix).unwrap(),
            AuditMode::Netlink(netlink::OnClose::Restore)
        );
        assert_eq!(
            AuditMode::parse(Some("file:/a b"), &unix).unwrap(),
            AuditMode::Lines(PathBuf::from("/a b"))
        );
        for bad in ["file:", "yes", "2", "netlink"] {
            assert!(AuditMode::parse(Some(bad), &vsock).is_err(), "{bad}");
        }
    }
}
