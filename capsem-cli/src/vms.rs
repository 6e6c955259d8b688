//! The VMs under `<home>/vms/`: what each one is (`vm.json`), which host
//! processes it has (`pids.json`, each checked by identity), and what state
//! that makes it in.
//!
//! | state | meaning |
//! |---|---|
//! | `running` | its capsem-process is alive |
//! | `orphaned` | capsem-process is gone but a guest process lives: the next command for it adopts it (persistent) or sweeps it (temporary) |
//! | `stopped` | no process of it lives |
//!
//! A pid counts only when its start time and an exact argv element match
//! the record ([`capsem_host::identity`]); a recycled pid is never taken for
//! the VM's process, never signalled.

use std::fmt;
use std::path::{Path, PathBuf};

use capsem_host::identity::{Liveness, ProcRecord};
use capsem_host::vmstate::{
    self, Pids, VmConfig, VmStateError, VmStatusFile, PIDS_FILE, STATUS_FILE, VM_FILE,
};
use serde::Serialize;

/// A VM's lifecycle state, derived from its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Orphaned,
    Stopped,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Orphaned => "orphaned",
            VmState::Stopped => "stopped",
        })
    }
}

/// One recorded process and what it is now.
#[derive(Debug, Clone)]
pub struct ProcCheck {
    pub record: ProcRecord,
    pub liveness: Liveness,
}

impl ProcCheck {
    fn new(record: ProcRecord) -> Self {
        let liveness = record.liveness();
        Self { record, liveness }
    }

    pub fn alive(&self) -> bool {
        self.liveness == Liveness::Alive
    }
}

/// One VM directory, read and checked.
#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    pub dir: PathBuf,
    /// `None` for a directory without `vm.json` (a temporary VM of an older
    /// capsem, or one whose creation was interrupted).
    pub config: Option<VmConfig>,
    pub pids: Option<Pids>,
    pub status: Option<VmStatusFile>,
    pub process: Option<ProcCheck>,
    pub guest: Vec<ProcCheck>,
    pub owner: Option<ProcCheck>,
}

impl Vm {
    /// Why capsem-process stopped the VM itself (a lifetime limit), while it
    /// is stopped.
    pub fn stop_reason(&self) -> Option<String> {
        (self.state() == VmState::Stopped)
            .then(|| self.status.as_ref()?.stop_reason.clone())
            .flatten()
    }
}

impl Vm {
    /// Reads `<vms>/<name>/` and checks every recorded pid.
    pub fn load(dir: &Path) -> Result<Self, VmStateError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let config: Option<VmConfig> = vmstate::read_json(&dir.join(VM_FILE))?;
        let pids: Option<Pids> = vmstate::read_json(&dir.join(PIDS_FILE))?;
        let status = vmstate::read_json(&dir.join(STATUS_FILE))?;
        let process = pids.as_ref().map(|p| ProcCheck::new(p.process.clone()));
        let guest = pids
            .as_ref()
            .map(|p| p.guest.iter().cloned().map(ProcCheck::new).collect())
            .unwrap_or_default();
        let owner = config
            .as_ref()
            .and_then(|c| c.owner.clone())
            .map(ProcCheck::new);
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            config,
            pids,
            status,
            process,
            guest,
            owner,
        })
    }

    pub fn state(&self) -> VmState {
        if self.process.as_ref().is_some_and(ProcCheck::alive) {
            VmState::Running
        } else if self.guest.iter().any(ProcCheck::alive) {
            VmState::Orphaned
        } else {
            VmState::Stopped
        }
    }

    /// Temporary: named `tmp-*` or marked so in `vm.json`.
    pub fn temporary(&self) -> bool {
        self.config.as_ref().is_none_or(|c| c.temporary) || self.name.starts_with("tmp-")
    }

    /// A temporary VM whose CLI is gone (or was never recorded).
    pub fn owner_gone(&self) -> bool {
        self.owner.as_ref().is_none_or(|o| !o.alive())
    }

    pub fn ctl_sock(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    /// Every recorded process that is alive, capsem-process first.
    pub fn live_processes(&self) -> impl Iterator<Item = &ProcCheck> {
        self.process
            .iter()
            .chain(self.guest.iter())
            .filter(|p| p.alive())
    }
}

/// `<home>/vms/<name>`.
pub fn vm_dir(home: &Path, name: &str) -> PathBuf {
    crate::home::vms_dir(home).join(name)
}

/// Every VM directory under `<home>/vms/`, sorted by name. Entries that
/// are not directories are skipped; unreadable ones are returned as errors
/// beside the rest.
pub fn list(home: &Path) -> (Vec<Vm>, Vec<VmStateError>) {
    let mut vms = Vec::new();
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(crate::home::vms_dir(home)) else {
        return (vms, errors);
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        match Vm::load(&dir) {
            Ok(vm) => vms.push(vm),
            Err(e) => errors.push(e),
        }
    }
    (vms, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_host::identity::capture;

    fn record(role: &str, pid: u32, start_time: u64) -> ProcRecord {
        ProcRecord {
            role: role.into(),
            pid,
            start_time,
            marker: "m".into(),
        }
    }

    fn config(temporary: bool) -> VmConfig {
        VmConfig {
            name: "a".into(),
            temporary,
            created: "2026-01-01T00:00:00Z".into(),
            vmm: "none".into(),
            accel: "auto".into(),
            cpus: 1,
            memory_mib: 512,
            owner: None,
            disk_size: None,
            image: None,
            idle_timeout_ms: None,
            max_duration_ms: None,
            net: Vec::new(),
            shares: Vec::new(),
            publish: Vec::new(),
        }
    }

    #[test]
    fn states_follow_the_recorded_processes() {
        let home = tempfile::tempdir().unwrap();
        let dir = vm_dir(home.path(), "a");
        std::fs::create_dir_all(&dir).unwrap();
        vmstate::write_json(&dir.join(VM_FILE), &config(false)).unwrap();
        let vm = Vm::load(&dir).unwrap();
        assert_eq!(vm.state(), VmState::Stopped);
        assert!(!vm.temporary());

        // Our own pid under a wrong start time is a recycled pid: not alive.
        let me = capture("t", std::process::id(), &std::env::args().next().unwrap()).unwrap();
        let pids = Pids {
            process: record("capsem-process", me.pid, me.start_time + 1),
            guest: vec![me.clone()],
            cid: None,
        };
        vmstate::write_json(&dir.join(PIDS_FILE), &pids).unwrap();
        let vm = Vm::load(&dir).unwrap();
        assert_eq!(vm.state(), VmState::Orphaned);
        assert_eq!(vm.live_processes().count(), 1);

        let pids = Pids {
            process: me.clone(),
            ..pids
        };
        vmstate::write_json(&dir.join(PIDS_FILE), &pids).unwrap();
        assert_eq!(Vm::load(&dir).unwrap().state(), VmState::Running);

        let (vms, errors) = list(home.path());
        assert!(errors.is_empty());
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].name, "a");
    }

    #[test]
    fn temporary_vms_and_owners() {
        let home = tempfile::tempdir().unwrap();
        let dir = vm_dir(home.path(), "tmp-1");
        std::fs::create_dir_all(&dir).unwrap();
        let vm = Vm::load(&dir).unwrap();
        assert!(vm.temporary());
        assert!(vm.owner_gone());
        let mut c = config(true);
        c.owner = Some(
            capture(
                "owner",
                std::process::id(),
                &std::env::args().next().unwrap(),
            )
            .unwrap(),
        );
        vmstate::write_json(&dir.join(VM_FILE), &c).unwrap();
        assert!(!Vm::load(&dir).unwrap().owner_gone());
    }
}
