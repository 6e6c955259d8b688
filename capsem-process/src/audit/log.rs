//! `audit.jsonl` and its rotation: append one line per record with a
//! single `write(2)`, rotate atomically, resume after the last stored serial
//! when adopting, repair a cut line, and export at teardown (the format and
//! rules are in [`super`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use capsem_proto::audit::AuditRecord;
use tracing::{info, warn};

use super::{file_err, AuditError, DEFAULT_MAX_BYTES, MAX_BYTES_ENV, MIN_MAX_BYTES};
use crate::vmdir::VmDir;

/// How far from its end a file is searched for its last line: a line is
/// at most a frame's strings JSON-escaped (6 bytes per byte, at worst).
const TAIL_WINDOW: u64 = 8 * capsem_proto::audit::MAX_AUDIT_FRAME as u64;

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
    Ok(crate::jsonl::identity(path)?)
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
    pub(super) fn close(&mut self) {
        self.file = None;
    }

    /// Appends the stored records (`audit.jsonl.1`, then `audit.jsonl`) to
    /// `dest` (created with mode 0600); the bytes copied.
    pub fn export(&self, dest: &Path) -> Result<u64, AuditError> {
        Ok(crate::jsonl::export(&self.rotated, &self.path, dest)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::{lines, record, serials};
    use std::os::unix::fs::MetadataExt;

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
}
