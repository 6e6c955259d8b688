//! Guest CIDs: each running VM holds an exclusive `flock` on
//! `<home>/run/cid-<N>.lock` for as long as its capsem-process lives, so two
//! VMs never share a CID, and a crashed process frees its CID with its fds.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The first CID a guest may use (0-2 are reserved).
pub const FIRST_CID: u32 = 3;
/// How many CIDs to try before giving up.
pub const MAX_VMS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CidError {
    #[error("cannot create {0}")]
    Dir(String, #[source] std::io::Error),
    #[error("cannot open {0}")]
    Open(String, #[source] std::io::Error),
    #[error("all {MAX_VMS} guest CIDs are in use")]
    Exhausted,
}

/// A CID held for this VM until dropped.
#[derive(Debug)]
pub struct CidLease {
    pub cid: u32,
    _lock: File,
}

/// Takes the lowest free CID.
pub fn allocate(run_dir: &Path) -> Result<CidLease, CidError> {
    std::fs::create_dir_all(run_dir)
        .map_err(|e| CidError::Dir(run_dir.display().to_string(), e))?;
    for cid in FIRST_CID..FIRST_CID + MAX_VMS {
        if let Some(lease) = try_take(run_dir, cid)? {
            return Ok(lease);
        }
    }
    Err(CidError::Exhausted)
}

/// Takes `cid` if it is free: an adopted guest's CID, whose lease died
/// with the crashed capsem-process (its VM uid derives from it).
pub fn try_take(run_dir: &Path, cid: u32) -> Result<Option<CidLease>, CidError> {
    let path = run_dir.join(format!("cid-{cid}.lock"));
    Ok(try_lock(&path)?.map(|file| CidLease { cid, _lock: file }))
}

/// An exclusive `flock` on `path` (created 0600), if no one holds it.
pub fn try_lock(path: &Path) -> Result<Option<File>, CidError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| CidError::Open(path.display().to_string(), e))?;
    // SAFETY: flock on an fd we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    Ok((rc == 0).then_some(file))
}

/// The `--guest-cid` value in vhost-device-vsock's argv.
pub fn from_argv(argv: &[Vec<u8>]) -> Option<u32> {
    let at = argv.iter().position(|a| a.as_slice() == b"--guest-cid")?;
    std::str::from_utf8(argv.get(at + 1)?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unique_and_freed_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let a = allocate(d.path()).unwrap();
        let b = allocate(d.path()).unwrap();
        assert_eq!(a.cid, FIRST_CID);
        assert_eq!(b.cid, FIRST_CID + 1);
        drop(a);
        let c = allocate(d.path()).unwrap();
        assert_eq!(c.cid, FIRST_CID);
        assert!(
            try_take(d.path(), FIRST_CID + 1).unwrap().is_none(),
            "b holds it"
        );
        drop(b);
        let again = try_take(d.path(), FIRST_CID + 1).unwrap().unwrap();
        assert_eq!(again.cid, FIRST_CID + 1);
    }

    #[test]
    fn the_guest_cid_is_read_from_vhosts_argv() {
        let argv = |s: &[&str]| s.iter().map(|a| a.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            from_argv(&argv(&["vhost", "--guest-cid", "7", "--socket", "x"])),
            Some(7)
        );
        assert_eq!(from_argv(&argv(&["vhost", "--guest-cid"])), None);
        assert_eq!(from_argv(&argv(&["vhost", "--guest-cid", "x"])), None);
    }
}
