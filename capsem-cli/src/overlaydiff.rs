//! What the guest changed on an `overlay` share, in Docker's spelling
//! (`A` added, `C` changed, `D` deleted), from three listings:
//!
//! * the overlay's upper directory, as the guest's `find -printf '%y %P\0'`
//!   prints it (bound read-only at `/run/capsem/shares/TAG` by capsem-init);
//! * the merged view at the guest path (`find -printf '%P\0'`);
//! * the host directory (the lower layer), walked here without following
//!   symlinks.
//!
//! An upper entry that the host has is `C`, one it lacks is `A`; a host
//! entry the merged view lacks is `D` (this covers whiteouts and opaque
//! directories alike without reading the guest's xattrs), listed only at
//! its top-most deleted directory. Whiteouts themselves (character devices
//! absent from the merged view) are not listed. The guest's listings are
//! untrusted: they are bounded by the caller and only ever compared.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;

/// Why a share's changes could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("cannot read the host directory {path}")]
    Host {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run capsem exec for the diff")]
    Spawn(#[source] std::io::Error),
    #[error("listing {what} in the guest failed (capsem exec exited {status})")]
    Guest { what: String, status: i32 },
    #[error("the guest's listing of {0} is over {MAX_LISTING} bytes")]
    TooLarge(String),
}

/// Largest listing read from the guest.
pub const MAX_LISTING: u64 = 256 << 20;

/// One change, as `capsem diff --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `A`, `C` or `D`.
    pub kind: char,
    /// The path as the guest sees it.
    pub path: String,
}

/// Parses `%y %P\0` records: a type letter, a space, a relative path.
/// Malformed records (and empty paths) are skipped.
pub fn parse_typed(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    out.split(|&b| b == 0)
        .filter_map(|rec| match rec {
            [t, b' ', path @ ..] if !path.is_empty() => Some((*t, path.to_vec())),
            _ => None,
        })
        .collect()
}

/// Parses `%P\0` records.
pub fn parse_paths(out: &[u8]) -> HashSet<Vec<u8>> {
    out.split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Every path under `dir`, relative, without following symlinks.
pub fn host_tree(dir: &Path) -> Result<HashSet<Vec<u8>>, DiffError> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let entries = std::fs::read_dir(&at).map_err(|source| DiffError::Host {
            path: at.display().to_string(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DiffError::Host {
                path: at.display().to_string(),
                source,
            })?;
            let path = entry.path();
            if let Ok(rel) = path.strip_prefix(dir) {
                out.insert(rel.as_os_str().as_bytes().to_vec());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    Ok(out)
}

/// The changes under guest path `guest`, sorted by path.
pub fn compute(
    guest: &str,
    upper: &[(u8, Vec<u8>)],
    merged: &HashSet<Vec<u8>>,
    host: &HashSet<Vec<u8>>,
) -> Vec<Change> {
    let mut out: BTreeMap<Vec<u8>, char> = BTreeMap::new();
    for (kind, path) in upper {
        if *kind == b'c' && !merged.contains(path) {
            continue; // a whiteout: counted below as the host path gone
        }
        out.insert(path.clone(), if host.contains(path) { 'C' } else { 'A' });
    }
    let mut gone: Vec<&Vec<u8>> = host.iter().filter(|p| !merged.contains(*p)).collect();
    gone.sort();
    let mut deleted: HashSet<&[u8]> = HashSet::new();
    for path in gone {
        let under_deleted = ancestors(path).any(|a| deleted.contains(a));
        if !under_deleted {
            deleted.insert(path);
            out.insert(path.clone(), 'D');
        }
    }
    out.into_iter()
        .map(|(path, kind)| Change {
            kind,
            path: format!("{guest}/{}", String::from_utf8_lossy(&path)),
        })
        .collect()
}

/// `a/b/c` -> `a/b`, `a`.
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .rev()
        .filter(|(_, &b)| b == b'/')
        .map(move |(i, _)| &path[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> HashSet<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn edit_create_delete_and_a_deleted_tree() {
        let host = set(&["edit", "del", "sub", "sub/f", "keep", "d2", "d2/old"]);
        // The guest edited `edit`, removed `del` and `sub/`, added `added`,
        // and replaced d2/ by a new directory holding `new` (opaque).
        let upper = parse_typed(b"f edit\0c del\0c sub\0f added\0d d2\0f d2/new\0bad\0x \0");
        let merged = set(&["edit", "keep", "added", "d2", "d2/new"]);
        let got = compute("/w", &upper, &merged, &host);
        let text: Vec<String> = got
            .iter()
            .map(|c| format!("{} {}", c.kind, c.path))
            .collect();
        assert_eq!(
            text,
            [
                "A /w/added",
                "C /w/d2",
                "A /w/d2/new",
                "D /w/d2/old",
                "D /w/del",
                "C /w/edit",
                "D /w/sub",
            ]
        );
    }

    #[test]
    fn nothing_changed_is_empty() {
        let host = set(&["a", "b/c"]);
        assert!(compute("/w", &[], &set(&["a", "b/c"]), &host).is_empty());
    }

    #[test]
    fn host_tree_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("l")).unwrap();
        assert_eq!(host_tree(dir.path()).unwrap(), set(&["d", "d/f", "l"]));
    }

    #[test]
    fn ancestors_are_listed_nearest_first() {
        let a: Vec<&[u8]> = ancestors(b"a/b/c").collect();
        assert_eq!(a, [&b"a/b"[..], b"a"]);
    }
}
