//! A guest adopted from a crashed capsem-process (`--adopt`): its host
//! processes (the agent, or vhost-device-vsock and qemu) are still running,
//! recorded in `pids.json`. Each is taken over only if its identity checks
//! out (start time and the exact argv element recorded for it), through a
//! pidfd opened before the check.

use capsem_host::identity::{Liveness, ProcRecord};
use capsem_host::vmstate::Pids;

use super::{GuestBackend, VmmError};
use crate::reaper::{Child, Reaper};

#[derive(Debug)]
pub struct Adopted {
    backend: &'static str,
    children: Vec<Child>,
    records: Vec<ProcRecord>,
    /// A qemu guest's CID and uid slot, leased again for as long as we
    /// hold the guest.
    cid: Option<super::cid::CidLease>,
    uid: Option<super::jail::UidLease>,
}

impl Adopted {
    /// Takes over every guest process in `pids`; fails (touching nothing)
    /// if any is gone or is not the recorded process any more.
    pub fn adopt(backend: &'static str, pids: &Pids, reaper: &Reaper) -> Result<Self, VmmError> {
        if pids.guest.is_empty() {
            return Err(VmmError::Backend("no guest process is recorded".into()));
        }
        let mut fds = Vec::new();
        for rec in &pids.guest {
            match rec.open_verified() {
                Ok(fd) => fds.push(fd),
                Err(Liveness::Gone) => {
                    return Err(VmmError::Backend(format!(
                        "{} (pid {}) is no longer running",
                        rec.role, rec.pid
                    )))
                }
                Err(Liveness::Reused(why)) => {
                    return Err(VmmError::Backend(format!(
                        "{} (pid {}) is not the recorded process: {why}",
                        rec.role, rec.pid
                    )))
                }
                Err(Liveness::Alive) => unreachable_alive(),
            }
        }
        let mut children = Vec::new();
        for (rec, fd) in pids.guest.iter().zip(fds) {
            children.push(reaper.adopt(&rec.role, rec.pid, fd)?);
            tracing::info!(
                "adopted {} (pid {}, started at tick {}, argv has {:?})",
                rec.role,
                rec.pid,
                rec.start_time,
                rec.marker
            );
        }
        Ok(Self {
            backend,
            children,
            records: pids.guest.clone(),
            cid: None,
            uid: None,
        })
    }

    /// Leases the running vhost-device-vsock's guest CID again, so no new
    /// VM takes it (nor, as root, the uid that derives from it).
    /// Leases the jail's uid slot again (as root), so no new VM, from any
    /// capsem home, runs as the adopted daemons' uid.
    pub fn reclaim_uid(&mut self, vm_dir: &std::path::Path) {
        let Some(slot) = super::jail::jail_slot(vm_dir) else {
            return;
        };
        let dir = std::path::Path::new(super::jail::UID_LOCK_DIR);
        match super::jail::take_uid(dir, slot) {
            Ok(Some(lease)) => self.uid = Some(lease),
            Ok(None) => tracing::warn!("VM uid slot {slot} was taken by another VM meanwhile"),
            Err(e) => tracing::warn!("cannot lease VM uid slot {slot} again: {e}"),
        }
    }

    pub fn reclaim_cid(&mut self, run_dir: &std::path::Path) {
        let vhost = self.records.iter().find(|r| r.role == "vhost-device-vsock");
        let cid = vhost
            .and_then(|r| capsem_host::identity::argv(r.pid).ok())
            .and_then(|argv| super::cid::from_argv(&argv));
        let Some(cid) = cid else {
            tracing::warn!("the adopted guest's CID is unknown; it is not leased again");
            return;
        };
        match super::cid::try_take(run_dir, cid) {
            Ok(Some(lease)) => self.cid = Some(lease),
            Ok(None) => tracing::warn!("guest CID {cid} was taken by another VM meanwhile"),
            Err(e) => tracing::warn!("cannot lease guest CID {cid} again: {e}"),
        }
    }
}

/// `open_verified` returns `Alive` only as `Ok`.
fn unreachable_alive() -> ! {
    unreachable!("open_verified reports Alive as Ok")
}

impl GuestBackend for Adopted {
    fn name(&self) -> &'static str {
        self.backend
    }
    fn children(&self) -> &[Child] {
        &self.children
    }
    fn records(&self) -> Vec<ProcRecord> {
        self.records.clone()
    }
    fn details(&self) -> String {
        "adopted".into()
    }
}
