//! Paths inside an extraction root, resolved the way a chroot would see
//! them, so a hostile layer or archive can never reach outside the root.
//!
//! * [`clean`]: a tar entry's name as components, as if rooted at `/`:
//!   `.` dropped, `..` pops but never above the root, a leading `/` dropped.
//! * [`resolve`]: walks those components on the host, following each
//!   symlink met on the way *inside* the root (an absolute target starts
//!   again at the root, `..` stops at the root), at most [`MAX_LINKS`]
//!   times. The result is always a host path under the root.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed in one resolution before giving up (Linux's limit).
pub const MAX_LINKS: u32 = 40;

/// Why a path could not be resolved inside the root.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{0}: more than {MAX_LINKS} symbolic links")]
    TooManyLinks(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot resolve {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`resolve`] does with a component that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Create every missing component as a directory (for the parents of
    /// an entry).
    CreateDirs,
    /// Stop there: the path returned does not exist.
    Stop,
}

/// A tar entry's path as normal components, rooted: `../../etc/x` is `etc/x`.
pub fn clean(path: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn host_path(root: &Path, stack: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(stack);
    p
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PathError + '_ {
    move |source| PathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Resolves `comps` (from [`clean`], or a link target's) under `root`.
/// Every symlink met is followed inside the root, the last one included
/// when `follow_last`; a component that is neither a directory nor a
/// followed symlink must be the last.
pub fn resolve(
    root: &Path,
    comps: &[OsString],
    follow_last: bool,
    missing: Missing,
) -> Result<PathBuf, PathError> {
    let mut stack: Vec<OsString> = Vec::new();
    let mut queue: VecDeque<OsString> = comps.iter().cloned().collect();
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        if c.is_empty() || c == OsStr::new(".") {
            continue;
        }
        if c == OsStr::new("..") {
            stack.pop();
            continue;
        }
        let here = host_path(root, &stack).join(&c);
        let last = queue.is_empty();
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() && (!last || follow_last) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(PathError::TooManyLinks(here));
                }
                let target = fs::read_link(&here).map_err(io_err(&here))?;
                if target.is_absolute() {
                    stack.clear();
                }
                let mut next: VecDeque<OsString> = target
                    .components()
                    .filter_map(|t| match t {
                        Component::Normal(n) => Some(n.to_owned()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    })
                    .collect();
                next.extend(queue.drain(..));
                queue = next;
            }
            Ok(m) if m.is_dir() || last => stack.push(c),
            Ok(_) => return Err(PathError::NotADirectory(here)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if missing == Missing::Stop {
                    stack.push(c);
                    stack.extend(queue.drain(..));
                    break;
                }
                fs::create_dir(&here).map_err(io_err(&here))?;
                stack.push(c);
            }
            Err(e) => return Err(io_err(&here)(e)),
        }
    }
    Ok(host_path(root, &stack))
}

/// The directory that will hold `comps`'s last component (created if
/// missing), and that component's name; `None` for the root itself.
pub fn parent_and_name(
    root: &Path,
    comps: &[OsString],
) -> Result<Option<(PathBuf, OsString)>, PathError> {
    let Some((name, parents)) = comps.split_last() else {
        return Ok(None);
    };
    let dir = resolve(root, parents, true, Missing::CreateDirs)?;
    match fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(Some((dir, name.clone()))),
        Ok(_) => Err(PathError::NotADirectory(dir)),
        Err(e) => Err(io_err(&dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn clean_never_climbs_above_the_root() {
        assert_eq!(clean(Path::new("../../etc/passwd")), os(&["etc", "passwd"]));
        assert_eq!(clean(Path::new("/a/./b/../c")), os(&["a", "c"]));
        assert_eq!(clean(Path::new("./")), os(&[]));
        assert_eq!(clean(Path::new("a/../../..")), os(&[]));
    }

    #[test]
    fn symlinks_are_followed_inside_the_root_only() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        symlink(outside.path(), r.join("abs")).unwrap();
        symlink("../../../../..", r.join("up")).unwrap();

        // A relative link inside the root: followed.
        let p = resolve(r, &os(&["lib", "x"]), true, Missing::Stop).unwrap();
        assert_eq!(p, r.join("usr/lib/x"));
        // An absolute link to a host directory: taken from the root.
        let (dir, name) = parent_and_name(r, &os(&["abs", "evil"])).unwrap().unwrap();
        assert!(dir.starts_with(r), "{dir:?}");
        assert_eq!(
            dir.join(name),
            r.join(outside.path().strip_prefix("/").unwrap())
                .join("evil")
        );
        // `..` through a link stops at the root.
        let (dir, _) = parent_and_name(r, &os(&["up", "evil"])).unwrap().unwrap();
        assert_eq!(dir, r);
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_last_component_is_not_followed_unless_asked() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        symlink("/etc/passwd", r.join("pw")).unwrap();
        assert_eq!(
            resolve(r, &os(&["pw"]), false, Missing::Stop).unwrap(),
            r.join("pw")
        );
        assert_eq!(
            resolve(r, &os(&["pw"]), true, Missing::Stop).unwrap(),
            r.join("etc/passwd")
        );
    }

    #[test]
    fn loops_and_files_as_directories_are_errors() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        symlink("b", r.join("a")).unwrap();
        symlink("a", r.join("b")).unwrap();
        fs::write(r.join("f"), b"").unwrap();
        assert!(matches!(
            resolve(r, &os(&["a", "x"]), true, Missing::Stop),
            Err(PathError::TooManyLinks(_))
        ));
        assert!(matches!(
            parent_and_name(r, &os(&["f", "x"])),
            Err(PathError::NotADirectory(_))
        ));
    }

    #[test]
    fn missing_directories_are_created_only_when_asked() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let p = resolve(r, &os(&["a", "b", "c"]), true, Missing::Stop).unwrap();
        assert_eq!(p, r.join("a/b/c"));
        assert!(!r.join("a").exists());
        let p = resolve(r, &os(&["x", "y"]), true, Missing::CreateDirs).unwrap();
        assert!(p.is_dir());
        let (dir, name) = parent_and_name(r, &os(&["a", "b", "c"])).unwrap().unwrap();
        assert_eq!(
            (dir.as_path(), name.as_os_str()),
            (r.join("a/b").as_path(), OsStr::new("c"))
        );
        assert!(r.join("a/b").is_dir());
        assert!(parent_and_name(r, &[]).unwrap().is_none());
    }
}
