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
//! `audit.jsonl` to FILE when the accept task is stopped at teardown,
//! before a temporary VM's directory is removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsem_proto::audit::{AuditRecord, AuditToHost, HostToAudit, MAX_AUDIT_ARGS, MAX_AUDIT_FIELD};
use capsem_proto::frame::AuditHost;
use capsem_proto::{Codec, FrameError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::conntrace::ConnTrace;
use crate::log::chain;
use crate::state::Shared;
use crate::vmdir::VmDir;

/// How long a new audit connection may take to send its hello.
pub const HELLO_WAIT: Duration = crate::guest::HELLO_WAIT;
/// `audit.jsonl` is rotated before it would grow past this.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Overrides [`DEFAULT_MAX_BYTES`] (tests), at least [`MIN_MAX_BYTES`].
pub const MAX_BYTES_ENV: &str = "CAPSEM_AUDIT_MAX_BYTES";
/// The smallest rotation size accepted from [`MAX_BYTES_ENV`].
pub const MIN_MAX_BYTES: u64 = 1024;
/// Bytes read from an audit connection at a time.
const READ_BUF: usize = 16 * 1024;
/// Handshakes in progress at once; more connections are refused.
const MAX_PENDING_HANDSHAKES: usize = 4;
/// How far from its end a file is searched for its last line: a line is
/// at most a frame's strings JSON-escaped (6 bytes per byte, at worst).
const TAIL_WINDOW: u64 = 8 * capsem_proto::audit::MAX_AUDIT_FRAME as u64;

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
    #[error("cannot {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AuditError {
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

/// The rotation size: [`MAX_BYTES_ENV`] if valid, else the default.
fn max_bytes_from_env() -> u64 {
    let Ok(value) = std::env::var(MAX_BYTES_ENV) else {
        return DEFAULT_MAX_BYTES;
    };
    match value.parse::<u64>() {
        Ok(n) if n >= MIN_MAX_BYTES => n,
        _ => {
            warn!("ignoring {MAX_BYTES_ENV}={value:?}: not a number of bytes >= {MIN_MAX_BYTES}");
            DEFAULT_MAX_BYTES
        }
    }
}

/// What [`AuditLog::store`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Appended,
    /// Its serial was stored before: dropped.
    Resent,
}

/// `audit.jsonl` (and its rotation), opened for appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    rotated: PathBuf,
    tmp: PathBuf,
    /// `None` once closed at teardown.
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    last_serial: Option<u64>,
}

/// Opens `path` for appending (and reading), creating it with mode 0600;
/// never through a symlink.
fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(file_err("open", path))
}

/// Creates an empty `tmp` and renames it over `path`: the name always
/// exists for a reader. Returns the new file.
fn replace_with_empty(tmp: &Path, path: &Path) -> Result<File, AuditError> {
    remove_if_exists(tmp)?;
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(file_err("create", tmp))?;
    fs::rename(tmp, path).map_err(file_err("rename to audit.jsonl", tmp))?;
    Ok(file)
}

fn remove_if_exists(path: &Path) -> Result<(), AuditError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(file_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// `(dev, ino)` of `path`, `None` when it does not exist.
fn identity(path: &Path) -> Result<Option<(u64, u64)>, AuditError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err("inspect", path)(e)),
    }
}

/// The last `min(size, TAIL_WINDOW)` bytes of `file` and where they start.
fn read_tail(file: &File, size: u64, path: &Path) -> Result<(u64, Vec<u8>), AuditError> {
    let start = size.saturating_sub(TAIL_WINDOW);
    let mut buf = vec![0u8; (size - start) as usize];
    file.read_exact_at(&mut buf, start)
        .map_err(file_err("read", path))?;
    Ok((start, buf))
}

/// The serial of the last line of `file` (`size` bytes, ending with a
/// newline), if it parses.
fn last_serial_in(file: &File, size: u64, path: &Path) -> Result<Option<u64>, AuditError> {
    if size == 0 {
        return Ok(None);
    }
    let (_, tail) = read_tail(file, size, path)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => &body[i + 1..],
        None => body,
    };
    match serde_json::from_slice::<AuditRecord>(line) {
        Ok(r) => Ok(Some(r.serial)),
        Err(e) => {
            warn!(
                "cannot read the last serial from {}: {e}; re-sent records may be stored twice",
                path.display()
            );
            Ok(None)
        }
    }
}

impl AuditLog {
    /// Opens (creating) `audit.jsonl`. With `resume` (an adopted guest) the
    /// last stored serial is read back, so its re-sends are dropped.
    pub fn open(dir: &VmDir, resume: bool) -> Result<Self, AuditError> {
        Self::open_with(dir, resume, max_bytes_from_env())
    }

    fn open_with(dir: &VmDir, resume: bool, max_bytes: u64) -> Result<Self, AuditError> {
        let path = dir.audit_log();
        let rotated = dir.audit_log_rotated();
        let tmp = dir.file("audit.jsonl.tmp");
        remove_if_exists(&tmp)?;
        let current = identity(&path)?;
        if current.is_some() && current == identity(&rotated)? {
            info!("finishing an interrupted rotation of {}", path.display());
            drop(replace_with_empty(&tmp, &path)?);
        }
        let file = open_append(&path)?;
        let size = Self::trim_partial_line(&file, &path)?;
        let mut last_serial = None;
        if resume {
            last_serial = last_serial_in(&file, size, &path)?;
            if size == 0 {
                match File::open(&rotated) {
                    Ok(old) => {
                        let len = old.metadata().map_err(file_err("inspect", &rotated))?.len();
                        last_serial = last_serial_in(&old, len, &rotated)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(file_err("open", &rotated)(e)),
                }
            }
            info!("audit: resuming after serial {last_serial:?}");
        }
        Ok(Self {
            path,
            rotated,
            tmp,
            file: Some(file),
            size,
            max_bytes,
            last_serial,
        })
    }

    /// Drops a last line without its newline (a write cut short); the
    /// file's size after that.
    fn trim_partial_line(file: &File, path: &Path) -> Result<u64, AuditError> {
        let size = file.metadata().map_err(file_err("inspect", path))?.len();
        if size == 0 {
            return Ok(0);
        }
        let (start, tail) = read_tail(file, size, path)?;
        if tail.ends_with(b"\n") {
            return Ok(size);
        }
        let keep = match tail.iter().rposition(|&b| b == b'\n') {
            Some(i) => start + i as u64 + 1,
            None if start == 0 => 0,
            None => {
                // No line end within reach: end the damaged line so the
                // next record starts on a line of its own.
                warn!("{} ends in an overlong damaged line", path.display());
                (&*file).write_all(b"\n").map_err(file_err("write", path))?;
                return Ok(size + 1);
            }
        };
        warn!(
            "{} ended inside a line (an interrupted write): dropping its last {} bytes",
            path.display(),
            size - keep
        );
        file.set_len(keep).map_err(file_err("truncate", path))?;
        Ok(keep)
    }

    /// The last stored serial, if any.
    #[cfg(test)]
    fn last_serial(&self) -> Option<u64> {
        self.last_serial
    }

    /// Appends `record` as one line (rotating first if needed), unless its
    /// serial was stored before.
    pub fn store(&mut self, record: &AuditRecord) -> Result<Stored, AuditError> {
        if self.file.is_none() {
            return Err(AuditError::LogClosed);
        }
        if self.last_serial.is_some_and(|last| record.serial <= last) {
            return Ok(Stored::Resent);
        }
        let mut line = serde_json::to_vec(record).map_err(AuditError::Json)?;
        line.push(b'\n');
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(AuditError::LogClosed);
        };
        if let Err(e) = file.write_all(&line) {
            // No half line left behind: the record is not acked and the
            // guest sends it again.
            let _ = file.set_len(self.size);
            return Err(file_err("write", &self.path)(e));
        }
        self.size += len;
        self.last_serial = Some(record.serial);
        Ok(Stored::Appended)
    }

    /// `audit.jsonl` becomes `audit.jsonl.1`; a new empty one takes its
    /// name. A failure leaves the current file in place (nothing lost).
    fn rotate(&mut self) -> Result<(), AuditError> {
        remove_if_exists(&self.rotated)?;
        fs::hard_link(&self.path, &self.rotated).map_err(file_err("link", &self.rotated))?;
        let file = replace_with_empty(&self.tmp, &self.path)?;
        info!(
            "audit: rotated {} ({} bytes) to {}",
            self.path.display(),
            self.size,
            self.rotated.display()
        );
        self.file = Some(file);
        self.size = 0;
        Ok(())
    }

    /// No more records are stored after this.
    fn close(&mut self) {
        self.file = None;
    }

    /// Appends the stored records (`audit.jsonl.1`, then `audit.jsonl`) to
    /// `dest` (created with mode 0600); the bytes copied.
    pub fn export(&self, dest: &Path) -> Result<u64, AuditError> {
        let mut out = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(dest)
            .map_err(file_err("open", dest))?;
        // Both names on one file: a rotation cut short.
        let rotated = identity(&self.rotated)?;
        let same = rotated.is_some() && rotated == identity(&self.path)?;
        let sources: &[&Path] = if same {
            &[&self.path]
        } else {
            &[&self.rotated, &self.path]
        };
        let mut copied = 0;
        for src in sources {
            let mut f = match File::open(src) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(file_err("open", src)(e)),
            };
            copied += io::copy(&mut f, &mut out).map_err(file_err("append to", dest))?;
        }
        // The VM directory goes next: this copy is all that will be left.
        out.sync_all().map_err(file_err("sync", dest))?;
        Ok(copied)
    }
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
/// until EOF or the first invalid thing.
async fn serve_records(
    stream: &mut UnixStream,
    codec: &mut Codec<AuditHost>,
    log: &Mutex<AuditLog>,
) -> Result<(), AuditError> {
    let mut buf = vec![0u8; READ_BUF];
    let mut acks = Vec::new();
    loop {
        while let Some(msg) = codec.next_message().map_err(AuditError::Frame)? {
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
        }
        if !acks.is_empty() {
            stream.write_all(&acks).await.map_err(AuditError::Ack)?;
            acks.clear();
        }
        let n = stream.read(&mut buf).await.map_err(AuditError::Read)?;
        if n == 0 {
            return codec.finish().map_err(AuditError::Truncated);
        }
        codec.feed(&buf[..n]).map_err(AuditError::Frame)?;
    }
}

async fn serve(
    mut stream: UnixStream,
    trace: ConnTrace,
    mut codec: Codec<AuditHost>,
    generation: u64,
    log: Arc<Mutex<AuditLog>>,
) {
    match serve_records(&mut stream, &mut codec, &log).await {
        Ok(()) => info!("audit connection of generation {generation} ended"),
        Err(e) => warn!(
            "audit connection of generation {generation} closed: {}",
            chain(&e)
        ),
    }
    drop(stream);
    drop(trace);
}

/// Closes the log when the accept task is stopped (teardown aborts it and
/// waits for it before removing any file), then exports it if asked.
#[derive(Debug)]
struct CloseOnDrop {
    log: Arc<Mutex<AuditLog>>,
    export: Option<PathBuf>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // Waits for a store in progress on another worker; none starts after.
        let mut log = lock(&self.log);
        log.close();
        if let Some(dest) = &self.export {
            match log.export(dest) {
                Ok(n) => info!("audit: appended {n} bytes of records to {}", dest.display()),
                Err(e) => warn!("audit: {}", chain(&e)),
            }
        }
    }
}

/// Accepts audit connections: handshakes, the generation rule, one served
/// connection at a time. `export`: where the records go at teardown
/// (`--audit-log`).
pub async fn accept_audit(
    listener: UnixListener,
    shared: Arc<Shared>,
    log: AuditLog,
    export: Option<PathBuf>,
) {
    let log = Arc::new(Mutex::new(log));
    // Declared first, dropped last: after the connection tasks are aborted.
    let _close = CloseOnDrop {
        log: log.clone(),
        export,
    };
    let mut handshakes = JoinSet::new();
    // At most one task; a JoinSet so that dropping it aborts the task.
    let mut active = JoinSet::new();
    let mut active_generation: Option<u64> = None;
    let mut newest = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let mut stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!("audit port: accept failed: {e}");
                        // Do not spin on a persistent error (EMFILE).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let trace = ConnTrace::accepted("audit");
                if handshakes.len() >= MAX_PENDING_HANDSHAKES {
                    warn!("audit connection rejected: too many handshakes in progress");
                    continue;
                }
                let shared = shared.clone();
                handshakes.spawn(async move {
                    match handshake(&mut stream, &shared.token, HELLO_WAIT).await {
                        Ok((codec, generation)) => Some((stream, trace, codec, generation)),
                        Err(e) => {
                            warn!("audit connection rejected: {}", chain(&e));
                            None
                        }
                    }
                });
            }
            Some(joined) = handshakes.join_next(), if !handshakes.is_empty() => {
                let Ok(Some((stream, trace, codec, generation))) = joined else {
                    continue;
                };
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
                    active.abort_all();
                    while active.join_next().await.is_some() {}
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(serial: u64) -> AuditRecord {
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

    fn lines(path: &Path) -> Vec<AuditRecord> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn serials(dir: &VmDir) -> Vec<u64> {
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

    #[test]
    fn stores_drops_resends_and_rotates_keeping_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path());
        let line_len = serde_json::to_vec(&record(10)).unwrap().len() as u64 + 1;
        let mut log = AuditLog::open_with(&dir, false, 3 * line_len).unwrap();
        assert_eq!(fs::metadata(dir.audit_log()).unwrap().mode() & 0o777, 0o600);
        for s in 10..=12 {
            assert_eq!(log.store(&record(s)).unwrap(), Stored::Appended);
        }
        assert_eq!(log.store(&record(11)).unwrap(), Stored::Resent);
        assert_eq!(log.store(&record(12)).unwrap(), Stored::Resent);
        assert_eq!(serials(&dir), [10, 11, 12]);
        assert!(!dir.audit_log_rotated().exists());
        // The fourth would pass the limit: rotation first.
        for s in 13..=17 {
            log.store(&record(s)).unwrap();
        }
        assert_eq!(lines(&dir.audit_log_rotated()).len(), 3);
        assert_eq!(serials(&dir), [13, 14, 15, 16, 17]);
        assert!(fs::metadata(dir.audit_log()).unwrap().len() <= 3 * line_len);
        assert_eq!(log.store(&record(13)).unwrap(), Stored::Resent);
        assert!(!dir.file("audit.jsonl.tmp").exists());

        let out = tmp.path().join("export.jsonl");
        fs::write(&out, b"earlier\n").unwrap();
        log.close();
        assert!(matches!(log.store(&record(18)), Err(AuditError::LogClosed)));
        log.export(&out).unwrap();
        let text = fs::read_to_string(&out).unwrap();
        let mut it = text.lines();
        assert_eq!(it.next(), Some("earlier"));
        let got: Vec<u64> = it
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().serial)
            .collect();
        assert_eq!(got, [13, 14, 15, 16, 17]);
    }

    #[test]
    fn resumes_after_the_last_serial_only_when_adopting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path());
        let mut log = AuditLog::open_with(&dir, false, 1 << 20).unwrap();
        for s in [5, 6, 9] {
            log.store(&record(s)).unwrap();
        }
        drop(log);
        let mut log = AuditLog::open_with(&dir, true, 1 << 20).unwrap();
        assert_eq!(log.last_serial(), Some(9));
        assert_eq!(log.store(&record(9)).unwrap(), Stored::Resent);
        drop(log);
        // A fresh guest's serials start again.
        let mut log = AuditLog::open_with(&dir, false, 1 << 20).unwrap();
        assert_eq!(log.last_serial(), None);
        assert_eq!(log.store(&record(1)).unwrap(), Stored::Appended);
        drop(log);
        // Right after a rotation the last serial is in audit.jsonl.1.
        fs::rename(dir.audit_log(), dir.audit_log_rotated()).unwrap();
        let log = AuditLog::open_with(&dir, true, 1 << 20).unwrap();
        assert_eq!(log.last_serial(), Some(1));
    }

    #[test]
    fn repairs_a_cut_line_and_an_interrupted_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path());
        let whole = format!("{}\n", serde_json::to_string(&record(3)).unwrap());
        fs::write(dir.audit_log(), format!("{whole}{{\"serial\":4,\"ti")).unwrap();
        let mut log = AuditLog::open_with(&dir, true, 1 << 20).unwrap();
        assert_eq!(log.last_serial(), Some(3));
        assert_eq!(fs::read_to_string(dir.audit_log()).unwrap(), whole);
        log.store(&record(4)).unwrap();
        assert_eq!(serials(&dir), [3, 4]);
        drop(log);

        // Cut between the link and the rename: both names, one file.
        fs::hard_link(dir.audit_log(), dir.audit_log_rotated()).unwrap();
        fs::write(dir.file("audit.jsonl.tmp"), b"").unwrap();
        let log = AuditLog::open_with(&dir, true, 1 << 20).unwrap();
        assert_eq!(log.last_serial(), Some(4));
        assert_eq!(serials(&dir), [3, 4]);
        assert_eq!(fs::metadata(dir.audit_log()).unwrap().len(), 0);
        assert!(!dir.file("audit.jsonl.tmp").exists());
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
