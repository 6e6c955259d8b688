//! Test helpers shared by the unit tests: marked child processes whose
//! records are real, VM directories, a context.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use capsem_host::identity::{capture, Liveness, ProcRecord};
use capsem_host::vmstate::{self, Pids, VmConfig, PIDS_FILE, VM_FILE};

use crate::cli::{AccelChoice, Vmm};
use crate::context::Ctx;

/// A live child process with a unique argv element, for records. It
/// exits when its stdin closes, so even a crashed test leaves nothing;
/// dropping it kills and reaps it.
pub(crate) struct Marked {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub record: ProcRecord,
}

impl Marked {
    pub(crate) fn spawn(role: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let marker = format!(
            "capsem-sweep-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut child = Command::new("sh")
            .args(["-c", "echo ready; read x", &marker])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Its first line means it runs `sh` with our argv, not ours.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        let record = capture(role, child.id(), &marker).unwrap();
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            record,
        }
    }

    /// The same pid under another start time: a recycled pid's record.
    pub(crate) fn wrong_start_time(&self) -> ProcRecord {
        ProcRecord {
            start_time: self.record.start_time + 1,
            ..self.record.clone()
        }
    }

    pub(crate) fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Lets it exit on its own (stdin closed) and reaps it.
    pub(crate) fn finish(&mut self) {
        self.stdin.take();
        self.child.wait().unwrap();
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn ctx(home: &Path) -> Ctx {
    Ctx {
        home: home.to_path_buf(),
        vmm: Vmm::None,
        accel: AccelChoice::Auto,
    }
}

pub(crate) fn config(name: &str, temporary: bool, owner: Option<ProcRecord>) -> VmConfig {
    VmConfig {
        name: name.into(),
        temporary,
        created: "2026-01-02T03:04:05Z".into(),
        vmm: "none".into(),
        accel: "auto".into(),
        cpus: 2,
        memory_mib: 1024,
        owner,
        disk_size: None,
        image: None,
        idle_timeout_ms: None,
        max_duration_ms: None,
        net: Vec::new(),
        shares: Vec::new(),
        publish: Vec::new(),
    }
}

/// `<home>/vms/<name>/` with `vm.json` (when `config`) and `pids.json`
/// (when `pids`).
pub(crate) fn make_vm(
    home: &Path,
    name: &str,
    config: Option<&VmConfig>,
    pids: Option<&Pids>,
) -> PathBuf {
    let dir = crate::vms::vm_dir(home, name);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(c) = config {
        vmstate::write_json(&dir.join(VM_FILE), c).unwrap();
    }
    if let Some(p) = pids {
        vmstate::write_json(&dir.join(PIDS_FILE), p).unwrap();
    }
    dir
}

/// Our own process: an owner that is alive.
pub(crate) fn live_owner() -> ProcRecord {
    capture(
        "owner",
        std::process::id(),
        &std::env::args().next().unwrap(),
    )
    .unwrap()
}

/// A record of a process that has exited.
pub(crate) fn gone_record(role: &str) -> ProcRecord {
    let mut p = Marked::spawn(role);
    p.finish();
    assert_eq!(p.record.liveness(), Liveness::Gone);
    p.record.clone()
}
