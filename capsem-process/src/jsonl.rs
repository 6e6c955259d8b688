//! What `audit.jsonl` and `net.jsonl` share: a log that rotates to
//! `NAME.1` through a hard link (so both names may briefly be one file),
//! and its export at teardown (`--audit-log`): the rotated file, then the
//! current one, appended to the destination.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {path}")]
pub struct JsonlError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JsonlError {
    let path = path.to_path_buf();
    move |source| JsonlError { what, path, source }
}

/// The file's (device, inode), or `None` when there is none.
pub fn identity(path: &Path) -> Result<Option<(u64, u64)>, JsonlError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err("inspect", path)(e)),
    }
}

/// Appends `rotated` then `current` (once, if both names are one file: a
/// rotation cut short) to `dest`, created with mode 0600 and synced: the
/// VM directory may go next. Missing files are skipped. The bytes copied.
pub fn export(rotated: &Path, current: &Path, dest: &Path) -> Result<u64, JsonlError> {
    let mut out = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(dest)
        .map_err(err("open", dest))?;
    let first = identity(rotated)?;
    let same = first.is_some() && first == identity(current)?;
    let sources: &[&Path] = if same {
        &[current]
    } else {
        &[rotated, current]
    };
    let mut copied = 0;
    for src in sources {
        let mut f = match File::open(src) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err("open", src)(e)),
        };
        copied += io::copy(&mut f, &mut out).map_err(err("append to", dest))?;
    }
    out.sync_all().map_err(err("sync", dest))?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn exports_rotated_then_current_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (r, c, d) = (
            dir.path().join("x.1"),
            dir.path().join("x"),
            dir.path().join("out"),
        );
        fs::write(&r, "one\n").unwrap();
        fs::write(&c, "two\n").unwrap();
        fs::write(&d, "zero\n").unwrap();
        assert_eq!(export(&r, &c, &d).unwrap(), 8);
        assert_eq!(fs::read_to_string(&d).unwrap(), "zero\none\ntwo\n");
    }

    #[test]
    fn one_file_under_both_names_is_copied_once_and_missing_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (r, c, d) = (
            dir.path().join("x.1"),
            dir.path().join("x"),
            dir.path().join("out"),
        );
        assert_eq!(export(&r, &c, &d).unwrap(), 0);
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(&c, "only\n").unwrap();
        fs::hard_link(&c, &r).unwrap();
        assert_eq!(export(&r, &c, &d).unwrap(), 5);
        assert_eq!(fs::read_to_string(&d).unwrap(), "only\n");
    }
}
