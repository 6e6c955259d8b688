//! The audit port (`vsock.sock_5006`): the guest's execve records, stored
//! in `<vm-dir>/audit.jsonl` and acknowledged (see `capsem_proto::audit`).
//!
//! Connections. The first message must be `Hello` with the session token
//! (the control hello's constant-time check) within [`HELLO_WAIT`], else
//! the connection is closed with one log line. Its `generation` must have
//! been given to a control connection (1 up to the current one) and must
//! not be older than the newest audit generation seen; one that is the
//! same or newer replaces (closes) the active audit connection, so exactly
//! one is served. The guest is hostile: an invalid or oversized frame
//! (the codec's [`capsem_proto::audit::MAX_AUDIT_FRAME`]), a record over
//! the bounds of [`check_record`], or a second hello closes that
//! connection with the reason logged; the VM goes on. Memory stays flat
//! under a flood: one served connection, a bounded read buffer, the
//! frame limit, and acks written before the next read (a guest that does
//! not read its acks stops being read).
//!
//! Records. One whose `serial` is not above the last stored one is a
//! re-send: dropped, and acknowledged again. Any other is appended to
//! `audit.jsonl` with a single `write(2)` of its whole line, then acked
//! (`Ack{serial}`). Lines are not fsynced: they survive a crash of
//! capsem-process, not one of the host.
//!
//! # `audit.jsonl`
//!
//! UTF-8, one JSON object per line (`\n`-terminated), one per stored
//! record, in increasing `serial` order. The fields are exactly those of
//! [`AuditRecord`], nothing else: `serial` (u64), `time_ms` (u64, ms since
//! the Unix epoch, guest clock), `pid`, `ppid`, `uid` (u32), `exe`
//! (string), `argv` (array of strings), `argv_truncated` (bool), `cwd`,
//! `tty` (strings), `success` (bool), `audit_id` (string). Example:
//!
//! ```text
//! {"serial":7,"time_ms":1700000000123,"pid":42,"ppid":1,"uid":0,"exe":"/bin/true","argv":["/bin/true","x"],"argv_truncated":false,"cwd":"/root","tty":"pts0","success":true,"audit_id":"1700000000.123:7"}
//! ```
//!
//! Rotation: before a line would take `audit.jsonl` over 8 MiB
//! ([`DEFAULT_MAX_BYTES`], `$CAPSEM_AUDIT_MAX_BYTES` for tests), the file
//! becomes `audit.jsonl.1` (replacing an older one) and a new empty
//! `audit.jsonl` takes its name atomically (hard link, then rename over),
//! so the name never goes missing for a reader following it. Readers
//! print `audit.jsonl.1` then `audit.jsonl`. The last stored serial is
//! kept across rotations, and across capsem-process restarts that adopt
//! the running guest (read back from the last line); a fresh start boots
//! a fresh guest kernel, whose serials start again, so it starts from
//! none. A line cut by an interrupted write is dropped at the next start.
//!
//! `capsem-process --audit-log FILE` appends `audit.jsonl.1` and
//! `audit.jsonl` to FILE at teardown ([`finish`], one of its listed steps),
//! after the audit server was stopped and joined and before a temporary
//! VM's directory is removed; teardown then appends `net.jsonl.1` and
//! `net.jsonl` (`crate::jsonl` does both).
//!
//! Files: this module holds the port (handshake, generation rule, serving);
//! [`log`] the file (`AuditLog`: append, rotation, resume, export).

mod log;

pub use self::log::{AuditLog, Stored};

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsem_proto::audit::{AuditRecord, AuditToHost, HostToAudit, MAX_AUDIT_ARGS, MAX_AUDIT_FIELD};
use capsem_proto::conn::{AsyncFrameReader, ConnError};
use capsem_proto::frame::AuditHost;
use capsem_proto::{Codec, FrameError};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::accept::{self, Limits};
use crate::conntrace::ConnTrace;
use crate::log::chain;
use crate::state::Shared;

/// How long a new audit connection may take to send its hello.
pub const HELLO_WAIT: Duration = crate::guest::HELLO_WAIT;
/// `audit.jsonl` is rotated before it would grow past this.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Overrides [`DEFAULT_MAX_BYTES`] (tests), at least [`MIN_MAX_BYTES`].
pub const MAX_BYTES_ENV: &str = "CAPSEM_AUDIT_MAX_BYTES";
/// The smallest rotation size accepted from [`MAX_BYTES_ENV`].
pub const MIN_MAX_BYTES: u64 = 1024;
/// Handshakes in progress at once; more connections are refused.
const MAX_PENDING_HANDSHAKES: usize = 4;
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    First(#[from] crate::guest::FirstMessageError),
    #[error("connection closed inside a frame")]
    Truncated(#[source] FrameError),
    #[error("invalid frame")]
    Frame(#[source] FrameError),
    #[error("the first message is a record, not a hello")]
    NotHello,
    #[error("a second hello on the connection")]
    SecondHello,
    #[error(transparent)]
    Token(#[from] capsem_proto::guest::HelloError),
    #[error("generation {got} is older than generation {newest}")]
    Stale { got: u64, newest: u64 },
    #[error("generation {got} was never given (the current one is {current})")]
    UnknownGeneration { got: u64, current: u64 },
    #[error("invalid record (serial {serial}): {reason}")]
    Invalid { serial: u64, reason: String },
    #[error("read failed")]
    Read(#[source] io::Error),
    #[error("cannot send the ack")]
    Ack(#[source] io::Error),
    #[error("cannot encode the ack")]
    Encode(#[source] FrameError),
    #[error("cannot encode the record")]
    Json(#[source] serde_json::Error),
    #[error("the audit log is closed (teardown)")]
    LogClosed,
    #[error(transparent)]
    Jsonl(#[from] crate::jsonl::JsonlError),
    #[error("cannot {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn file_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AuditError {
    let path = path.to_path_buf();
    move |source| AuditError::File { what, path, source }
}

/// Checks a record against the protocol's bounds (the agent truncates;
/// anything over them is a hostile or broken guest).
pub fn check_record(r: &AuditRecord) -> Result<(), AuditError> {
    let invalid = |reason: String| AuditError::Invalid {
        serial: r.serial,
        reason,
    };
    if r.argv.len() > MAX_AUDIT_ARGS {
        return Err(invalid(format!(
            "{} argv elements, more than {MAX_AUDIT_ARGS}",
            r.argv.len()
        )));
    }
    if let Some((i, a)) = r
        .argv
        .iter()
        .enumerate()
        .find(|(_, a)| a.len() > MAX_AUDIT_FIELD)
    {
        return Err(invalid(format!(
            "argv[{i}] has {} bytes, more than {MAX_AUDIT_FIELD}",
            a.len()
        )));
    }
    for (name, value) in [
        ("exe", &r.exe),
        ("cwd", &r.cwd),
        ("tty", &r.tty),
        ("audit_id", &r.audit_id),
    ] {
        if value.len() > MAX_AUDIT_FIELD {
            return Err(invalid(format!(
                "{name} has {} bytes, more than {MAX_AUDIT_FIELD}",
                value.len()
            )));
        }
    }
    Ok(())
}

fn lock(log: &Mutex<AuditLog>) -> MutexGuard<'_, AuditLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads and checks the first message of an audit connection: the codec
/// (holding any bytes after the hello) and the claimed generation.
pub async fn handshake(
    stream: &mut UnixStream,
    token: &str,
    wait: Duration,
) -> Result<(Codec<AuditHost>, u64), AuditError> {
    let (codec, msg) = crate::guest::first_message::<AuditHost>(stream, wait).await?;
    let AuditToHost::Hello {
        token: got,
        generation,
    } = msg
    else {
        return Err(AuditError::NotHello);
    };
    // As the control hello: length bound, constant-time compare.
    capsem_proto::guest::check_token(&got, token)?;
    Ok((codec, generation))
}

/// Stores the records of one accepted audit connection and acks them,
/// until EOF or the first invalid thing. The acks for every record one
/// read brought go out in one write, before the next read.
async fn serve_records(
    stream: &mut UnixStream,
    codec: Codec<AuditHost>,
    log: &Mutex<AuditLog>,
) -> Result<(), AuditError> {
    let (rd, mut wr) = stream.split();
    let mut frames = AsyncFrameReader::with_codec(rd, codec);
    let mut acks = Vec::new();
    loop {
        let mut next = frames.read_frame().await.map_err(conn_error)?;
        if next.is_none() {
            return Ok(());
        }
        while let Some(msg) = next {
            let record = match msg {
                AuditToHost::Record(r) => r,
                AuditToHost::Hello { .. } => return Err(AuditError::SecondHello),
            };
            check_record(&record)?;
            // store() is synchronous: an abort (only ever at an await)
            // never cuts a line.
            if lock(log).store(&record)? == Stored::Resent {
                debug!("audit record {} was stored before; dropped", record.serial);
            }
            Codec::<AuditHost>::encode_into(
                &HostToAudit::Ack {
                    serial: record.serial,
                },
                &mut acks,
            )
            .map_err(AuditError::Encode)?;
            next = frames.buffered_frame().map_err(conn_error)?;
        }
        wr.write_all(&acks).await.map_err(AuditError::Ack)?;
        acks.clear();
    }
}

fn conn_error(e: ConnError) -> AuditError {
    match e {
        ConnError::Frame(e @ FrameError::TruncatedAtEof { .. }) => AuditError::Truncated(e),
        ConnError::Frame(e) => AuditError::Frame(e),
        ConnError::Io(e) => AuditError::Read(e),
    }
}

async fn serve(
    mut stream: UnixStream,
    trace: ConnTrace,
    codec: Codec<AuditHost>,
    generation: u64,
    log: Arc<Mutex<AuditLog>>,
) {
    match serve_records(&mut stream, codec, &log).await {
        Ok(()) => info!("audit connection of generation {generation} ended"),
        Err(e) => warn!(
            "audit connection of generation {generation} closed: {}",
            chain(&e)
        ),
    }
    drop(stream);
    drop(trace);
}

/// A handshaken audit connection, on its way to the server loop.
type Greeted = (UnixStream, ConnTrace, Codec<AuditHost>, u64);

/// The audit port until `stop`: accepts and handshakes connections (through
/// [`accept::serve`]), applies the generation rule, serves one at a time.
/// Returns the log once every task that could store a record was joined;
/// the caller closes and exports it with [`finish`].
pub async fn accept_audit(
    listener: UnixListener,
    shared: Arc<Shared>,
    log: AuditLog,
    stop: watch::Receiver<bool>,
) -> Arc<Mutex<AuditLog>> {
    let log = Arc::new(Mutex::new(log));
    let (greeted_tx, greeted) = mpsc::channel::<Greeted>(MAX_PENDING_HANDSHAKES);
    let limits = Limits {
        name: "audit",
        max_conns: MAX_PENDING_HANDSHAKES,
    };
    let token_shared = shared.clone();
    let acceptor = accept::serve(listener, limits, stop.clone(), move |mut stream| {
        let (shared, greeted_tx) = (token_shared.clone(), greeted_tx.clone());
        async move {
            let trace = ConnTrace::accepted("audit");
            match handshake(&mut stream, &shared.token, HELLO_WAIT).await {
                Ok((codec, generation)) => {
                    let _ = greeted_tx.send((stream, trace, codec, generation)).await;
                }
                Err(e) => warn!("audit connection rejected: {}", chain(&e)),
            }
        }
    });
    tokio::join!(acceptor, serve_greeted(greeted, &shared, &log, stop));
    log
}

/// Serves handshaken connections, one at a time, until `stop`.
async fn serve_greeted(
    mut greeted: mpsc::Receiver<Greeted>,
    shared: &Shared,
    log: &Arc<Mutex<AuditLog>>,
    mut stop: watch::Receiver<bool>,
) {
    // At most one task; a JoinSet so that replacing it is abort-and-join.
    let mut active = JoinSet::new();
    let mut active_generation: Option<u64> = None;
    let mut newest = 0u64;
    loop {
        tokio::select! {
            () = accept::stopped(&mut stop) => break,
            Some((stream, trace, codec, generation)) = greeted.recv() => {
                let current = shared.status().generation;
                let refused = if generation == 0 || generation > current {
                    Some(AuditError::UnknownGeneration { got: generation, current })
                } else if generation < newest {
                    Some(AuditError::Stale { got: generation, newest })
                } else {
                    None
                };
                if let Some(e) = refused {
                    warn!("audit connection rejected: {}", chain(&e));
                    continue;
                }
                newest = generation;
                if let Some(old) = active_generation.take() {
                    active.shutdown().await;
                    info!("audit connection of generation {old} replaced by one of generation {generation}");
                }
                info!("audit connection accepted: generation {generation}");
                active_generation = Some(generation);
                active.spawn(serve(stream, trace, codec, generation, log.clone()));
            }
            Some(_) = active.join_next(), if !active.is_empty() => {
                active_generation = None;
            }
        }
    }
    // store() is synchronous, so aborting at an await never cuts a line.
    active.shutdown().await;
}

/// Teardown's audit step: no record is stored after this; with
/// `--audit-log`, the stored records are appended to `export`.
pub fn finish(log: &Mutex<AuditLog>, export: Option<&Path>) {
    let mut log = lock(log);
    log.close();
    if let Some(dest) = export {
        match log.export(dest) {
            Ok(n) => info!("audit: appended {n} bytes of records to {}", dest.display()),
            Err(e) => warn!("audit: {}", chain(&e)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vmdir::VmDir;
    use std::fs;

    pub(crate) fn record(serial: u64) -> AuditRecord {
        AuditRecord {
            serial,
            time_ms: 1_700_000_000_000 + serial,
            pid: 100 + serial as u32,
            ppid: 1,
            uid: 0,
            exe: "/bin/echo".into(),
            argv: vec!["echo".into(), format!("r{serial}")],
            argv_truncated: false,
            cwd: "/root".into(),
            tty: "(none)".into(),
            success: true,
            audit_id: format!("1700000000.000:{serial}"),
        }
    }

    pub(crate) fn lines(path: &Path) -> Vec<AuditRecord> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub(crate) fn serials(dir: &VmDir) -> Vec<u64> {
        let mut all = lines(&dir.audit_log_rotated());
        all.extend(lines(&dir.audit_log()));
        all.iter().map(|r| r.serial).collect()
    }

    #[test]
    fn the_line_is_exactly_the_record() {
        let line = serde_json::to_string(&record(7)).unwrap();
        assert_eq!(
            line,
            r#"{"serial":7,"time_ms":1700000000007,"pid":107,"ppid":1,"uid":0,"exe":"/bin/echo","argv":["echo","r7"],"argv_truncated":false,"cwd":"/root","tty":"(none)","success":true,"audit_id":"1700000000.000:7"}"#
        );
    }

    #[test]
    fn bounds() {
        assert!(check_record(&record(1)).is_ok());
        let mut r = record(1);
        r.argv = vec!["a".into(); MAX_AUDIT_ARGS];
        r.argv[3] = "x".repeat(MAX_AUDIT_FIELD);
        assert!(check_record(&r).is_ok());
        r.argv.push("b".into());
        let e = check_record(&r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid record (serial 1): 257 argv elements, more than 256"
        );
        let mut r = record(2);
        r.argv[1] = "x".repeat(MAX_AUDIT_FIELD + 1);
        assert!(check_record(&r)
            .unwrap_err()
            .to_string()
            .contains("argv[1] has 1025 bytes"));
        for field in 0..4 {
            let mut r = record(3);
            let long = "y".repeat(MAX_AUDIT_FIELD + 1);
            match field {
                0 => r.exe = long,
                1 => r.cwd = long,
                2 => r.tty = long,
                _ => r.audit_id = long,
            }
            assert!(check_record(&r).is_err(), "field {field}");
        }
    }

    async fn try_handshake(bytes: Vec<u8>) -> Result<u64, AuditError> {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        guest.write_all(&bytes).await.unwrap();
        let r = handshake(&mut host, "tok", Duration::from_millis(200)).await;
        drop(guest);
        r.map(|(_, g)| g)
    }

    #[tokio::test]
    async fn handshake_checks() {
        use crate::guest::FirstMessageError;
        use capsem_proto::frame::AuditGuest;
        use capsem_proto::guest::HelloError;
        let hello = |token: &str| {
            Codec::<AuditGuest>::encode(&AuditToHost::Hello {
                token: token.into(),
                generation: 4,
            })
            .unwrap()
        };
        assert_eq!(try_handshake(hello("tok")).await.unwrap(), 4);
        assert!(matches!(
            try_handshake(hello("bad")).await,
            Err(AuditError::Token(HelloError::WrongToken))
        ));
        assert!(matches!(
            try_handshake(hello(&"t".repeat(1000))).await,
            Err(AuditError::Token(HelloError::TokenTooLong { .. }))
        ));
        let rec = Codec::<AuditGuest>::encode(&AuditToHost::Record(record(1))).unwrap();
        assert!(matches!(
            try_handshake(rec).await,
            Err(AuditError::NotHello)
        ));
        assert!(matches!(
            try_handshake(vec![0xff, 0xff, 0xff, 0xff]).await,
            Err(AuditError::First(FirstMessageError::Frame(
                FrameError::TooLong { .. }
            )))
        ));
        assert!(matches!(
            try_handshake(vec![]).await,
            Err(AuditError::First(FirstMessageError::Timeout(_)))
        ));
    }
}
