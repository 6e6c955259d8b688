//! Unpacking the guest's tar stream on the host (`capsem cp NAME:SRC DST`).
//!
//! The stream is hostile: the guest chose every name, link and size in it.
//! So:
//! * every entry must sit under the one name that was asked for (`tar -c
//!   NAME`, or `.`), and the rest of its path is plain names only (no
//!   `..`, no root, no prefix): nothing is joined outside the target;
//! * no write goes through a symlink: every directory below the target is
//!   checked with `symlink_metadata` (a real directory, or created), and an
//!   existing symlink or file at an entry's own path is removed first (a
//!   later `chmod` or `open` would follow it);
//! * hard links must point at a regular file already unpacked here;
//! * devices and fifos are refused; setuid and setgid bits are dropped;
//! * memory stays flat: file data streams to disk, and the headers read
//!   between two entries (GNU long names, pax records) are bounded by
//!   [`META_BUDGET`] ([`Budget`]), so a header cannot make capsem allocate
//!   what the stream claims;
//! * directories get their modes and mtimes last, deepest first, as `tar`
//!   does, so unpacking their contents does not undo them.
//!
//! Where the target is follows Docker's rules for DST ([`HostDst`]); the
//! source's kind (a directory or not) is the stream's first entry.

use std::cell::Cell;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use tar::{Archive, EntryType};

/// Bytes the archive may read between two entries (headers, long names,
/// pax records, padding).
pub const META_BUDGET: u64 = 1 << 20;

/// Permission bits kept: setuid and setgid never come from a guest.
const MODE_MASK: u32 = 0o1777;

/// Why unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cp: the guest sent no files")]
    Empty,
    #[error("cp: the guest's tar stream is invalid")]
    Stream(#[source] io::Error),
    #[error(
        "cp: the guest's stream names {0:?}, outside what was asked for; nothing of it was written"
    )]
    Outside(String),
    #[error("cp: the guest's stream has {kind} entry {path:?}, which cp does not copy")]
    Unsupported { kind: String, path: String },
    #[error("cp: {0}: no such directory")]
    NoParent(PathBuf),
    #[error("cp: cannot copy a directory to a file: {0}")]
    DirToFile(PathBuf),
    #[error("cp: {0} is not a directory")]
    NotADir(PathBuf),
    #[error("cp: {0}: a symlink or file is in the way of a directory")]
    NotDirInTree(PathBuf),
    #[error("cp: cannot overwrite directory {0} with a non-directory")]
    DirInTheWay(PathBuf),
    #[error("cp: {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// DST on the host, as it was before the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDst {
    /// An existing directory: the source goes into it.
    Dir(PathBuf),
    /// An existing non-directory: a file source replaces it.
    File(PathBuf),
    /// Nothing there; `slash` when DST was written with a trailing `/`.
    Missing { path: PathBuf, slash: bool },
}

impl HostDst {
    /// Looks at `dst` (following a symlink, as Docker does); a missing
    /// DST's parent must be a directory.
    pub fn probe(dst: &Path) -> Result<Self, UnpackError> {
        match fs::metadata(dst) {
            Ok(m) if m.is_dir() => Ok(HostDst::Dir(dst.into())),
            Ok(_) => Ok(HostDst::File(dst.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let parent = match dst.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                if !fs::metadata(parent).is_ok_and(|m| m.is_dir()) {
                    return Err(UnpackError::NoParent(parent.into()));
                }
                let slash = dst.as_os_str().as_encoded_bytes().ends_with(b"/");
                Ok(HostDst::Missing {
                    path: dst.into(),
                    slash,
                })
            }
            Err(e) => Err(UnpackError::Io {
                path: dst.into(),
                source: e,
            }),
        }
    }

    /// Where the top entry lands, given whether it is a directory.
    fn root(&self, name: &OsStr, top_is_dir: bool) -> Result<PathBuf, UnpackError> {
        match self {
            HostDst::Dir(d) if name == "." => Ok(d.clone()),
            HostDst::Dir(d) => Ok(d.join(name)),
            HostDst::File(f) if top_is_dir => Err(UnpackError::DirToFile(f.clone())),
            HostDst::File(f) => Ok(f.clone()),
            HostDst::Missing { path, slash: true } if !top_is_dir => {
                Err(UnpackError::NotADir(path.clone()))
            }
            HostDst::Missing { path, .. } => Ok(path.clone()),
        }
    }
}

/// The archive's reader, counting what is read while armed: between two
/// entries only [`META_BUDGET`] bytes may be read.
struct Budget<R> {
    inner: R,
    left: Rc<Cell<Option<u64>>>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.left.get() else {
            return self.inner.read(buf);
        };
        if left == 0 {
            return Err(io::Error::other(format!(
                "more than {META_BUDGET} bytes of headers before one entry"
            )));
        }
        let cap = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..cap])?;
        self.left.set(Some(left - n as u64));
        Ok(n)
    }
}

/// The part of an entry's path below the asked-for name: plain names
/// only. `None` for the top entry itself.
fn below_top(path: &Path, name: &OsStr) -> Result<Vec<PathBuf>, UnpackError> {
    let outside = || UnpackError::Outside(path.display().to_string());
    let mut comps = path.components();
    match comps.next() {
        Some(Component::CurDir) if name == "." => {}
        Some(Component::Normal(first)) if first == name => {}
        _ => return Err(outside()),
    }
    comps
        .map(|c| match c {
            Component::Normal(n) => Ok(PathBuf::from(n)),
            _ => Err(outside()),
        })
        .collect()
}

/// Every directory from `root` down to `rel`'s parent is a real directory
/// (created when missing); returns the full path of `rel`.
fn real_dirs_to(root: &Path, rel: &[PathBuf]) -> Result<PathBuf, UnpackError> {
    let mut at = root.to_path_buf();
    let Some((last, dirs)) = rel.split_last() else {
        return Ok(at);
    };
    for d in dirs {
        at.push(d);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(UnpackError::NotDirInTree(at)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).map_err(io_at(&at))?
            }
            Err(e) => {
                return Err(UnpackError::Io {
                    path: at,
                    source: e,
                })
            }
        }
    }
    at.push(last);
    Ok(at)
}

/// Makes room for a non-directory at `path`: a directory there is an
/// error, anything else is removed (so nothing follows an old symlink).
fn clear_for_file(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(UnpackError::DirInTheWay(path.into())),
        Ok(_) => fs::remove_file(path).map_err(io_at(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(UnpackError::Io {
            path: path.into(),
            source: e,
        }),
    }
}

/// A directory at `path`: an existing real one is kept, a missing one is
/// made; anything else (a symlink, a file) is in the way.
fn ensure_dir(path: &Path, follow: bool) -> Result<(), UnpackError> {
    let meta = if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    };
    match meta {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(UnpackError::NotDirInTree(path.into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(path).map_err(io_at(path)),
        Err(e) => Err(UnpackError::Io {
            path: path.into(),
            source: e,
        }),
    }
}

/// Where the stream is: before its top entry, or past it, which was a
/// directory (its real path: the root every later entry is under) or
/// not (then nothing may follow).
enum Top {
    Unseen,
    Dir(PathBuf),
    NonDir(PathBuf),
}

/// A directory's mode and mtime, applied at the end.
struct DirMeta {
    path: PathBuf,
    mode: u32,
    mtime: u64,
}

/// What was unpacked.
#[derive(Debug, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: u64,
    pub root: PathBuf,
}

/// Unpacks `reader` (the guest's `tar -c NAME`) at `dst`'s place for
/// `name` (the last component asked for, or `.`).
pub fn unpack(reader: impl Read, name: &OsStr, dst: &HostDst) -> Result<Unpacked, UnpackError> {
    let left = Rc::new(Cell::new(None));
    let mut archive = Archive::new(Budget {
        inner: reader,
        left: Rc::clone(&left),
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_mask(!MODE_MASK & 0o7777);
    let mut entries = archive.entries().map_err(UnpackError::Stream)?;
    let mut top = Top::Unseen;
    let mut dirs: Vec<DirMeta> = Vec::new();
    let mut count = 0u64;
    loop {
        left.set(Some(META_BUDGET));
        let next = entries.next();
        left.set(None);
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(UnpackError::Stream)?;
        let path = entry.path().map_err(UnpackError::Stream)?.into_owned();
        let rel = below_top(&path, name)?;
        let kind = entry.header().entry_type();
        let header_mode = entry.header().mode().unwrap_or(0o755);
        let mtime = entry.header().mtime().unwrap_or(0);
        let outside = || UnpackError::Outside(path.display().to_string());
        let (base, top_is_dir) = match (&top, rel.is_empty()) {
            (Top::Unseen, true) if kind.is_dir() => {
                // The top of a directory copy may be DST itself, reached
                // through the user's own symlink: that one is followed.
                let base = dst.root(name, true)?;
                ensure_dir(&base, true)?;
                let real = fs::canonicalize(&base).map_err(io_at(&base))?;
                dirs.push(DirMeta {
                    path: real.clone(),
                    mode: header_mode,
                    mtime,
                });
                top = Top::Dir(real);
                count += 1;
                continue;
            }
            (Top::Unseen, true) => {
                let base = dst.root(name, false)?;
                top = Top::NonDir(base.clone());
                (base, false)
            }
            (Top::Dir(base), false) => (base.clone(), true),
            // Below a file, before the top, or the top twice.
            _ => return Err(outside()),
        };
        let target = if top_is_dir {
            real_dirs_to(&base, &rel)?
        } else {
            base.clone()
        };
        match kind {
            EntryType::Directory => {
                ensure_dir(&target, false)?;
                dirs.push(DirMeta {
                    path: target,
                    mode: header_mode,
                    mtime,
                });
            }
            EntryType::Regular | EntryType::Continuous | EntryType::Symlink => {
                clear_for_file(&target)?;
                entry.unpack(&target).map_err(io_at(&target))?;
            }
            EntryType::Link if top_is_dir => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::Stream)?
                    .ok_or_else(outside)?
                    .into_owned();
                let link_rel = below_top(&link, name)?;
                if link_rel.is_empty() {
                    return Err(UnpackError::Outside(link.display().to_string()));
                }
                let source = real_dirs_to(&base, &link_rel)?;
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    return Err(UnpackError::Outside(link.display().to_string()));
                }
                clear_for_file(&target)?;
                fs::hard_link(&source, &target).map_err(io_at(&target))?;
            }
            other => {
                return Err(UnpackError::Unsupported {
                    kind: format!("{other:?}").to_lowercase(),
                    path: path.display().to_string(),
                })
            }
        }
        count += 1;
    }
    let root = match top {
        Top::Unseen => return Err(UnpackError::Empty),
        Top::Dir(root) | Top::NonDir(root) => root,
    };
    for d in dirs.iter().rev() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&d.path, fs::Permissions::from_mode(d.mode & MODE_MASK))
            .map_err(io_at(&d.path))?;
        let t = filetime::FileTime::from_unix_time(i64::try_from(d.mtime).unwrap_or(0), 0);
        filetime::set_file_mtime(&d.path, t).map_err(io_at(&d.path))?;
    }
    Ok(Unpacked {
        entries: count,
        root,
    })
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
