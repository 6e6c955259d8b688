//! Guest backends: what starts the guest, how its exit is observed, and how
//! it is killed. `none` runs the agent as a host child; `qemu` starts
//! vhost-device-vsock and qemu, each in its own session.
//!
//! * [`none`]: the no-VM backend.
//! * [`adopted`]: the processes of a guest whose capsem-process crashed.
//! * [`qemu`]: the real VM; with [`accel`] (KVM or TCG), [`image`] (kernel,
//!   initramfs, root filesystem), [`disk`] (the VM's writable disk), [`cid`]
//!   (unique guest CIDs), [`serial`] (the console log), [`daemon`] (finding,
//!   logging and awaiting a daemon), [`virtiofs`] (one
//!   virtiofsd per `--share`), [`jail`] (the daemons' uid, capabilities and
//!   reachable files) and [`bootfiles`] (the image and disks, passed to
//!   QEMU as inherited fds).

pub mod accel;
pub mod adopted;
pub mod bootfiles;
pub mod cid;
pub mod daemon;
pub mod disk;
pub mod image;
pub mod jail;
pub mod none;
pub mod qemu;
pub mod serial;
pub mod virtiofs;

use std::fmt;
use std::path::PathBuf;

use nix::sys::signal::Signal;

use crate::config::VmmKind;
use crate::reaper::{Child, ExitStatus, Reaper};
use crate::vmdir::VmDir;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Backend(String),
    #[error("cannot locate the capsem-agent binary")]
    AgentBinary(#[source] std::io::Error),
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the agent's scratch directory")]
    Scratch(#[source] crate::vmdir::VmDirError),
    #[error(transparent)]
    Spawn(#[from] crate::reaper::ReaperError),
}

/// What a backend needs to start the guest.
#[derive(Debug)]
pub struct Launch<'a> {
    pub dir: &'a VmDir,
    pub vm_id: &'a str,
    /// The session token the agent must present in its hello.
    pub token: &'a str,
    pub reaper: &'a Reaper,
    pub cfg: &'a crate::config::Config,
}

/// A guest that was started: one or more host children, each the leader of
/// its own process group (or session).
pub trait GuestBackend: Send + Sync + fmt::Debug {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The children this backend started; the guest is gone when any exits.
    fn children(&self) -> &[Child];
    /// Host pid reported in `Status` (the agent, or the VMM).
    fn pid(&self) -> Option<u32> {
        self.children().first().map(|c| c.pid)
    }
    /// Why the guest stopped, in words, when the backend knows more than an
    /// exit status (a kernel panic line, say).
    fn describe_exit(&self) -> Option<String> {
        None
    }
    /// What the guest's console said (a boot that never connects quotes
    /// its last line; a boot fault line reboots it), if it has one.
    fn console(&self) -> Option<serial::ConsoleFacts> {
        None
    }
    /// Facts for the log line that says the backend started.
    fn details(&self) -> String {
        String::new()
    }
    /// The identities of its host processes, for `pids.json`.
    fn records(&self) -> Vec<capsem_host::identity::ProcRecord>;
    /// The accelerator in use (`kvm`, `tcg`), if any.
    fn accel(&self) -> Option<&'static str> {
        None
    }
    /// The backend's own tasks (QEMU's console copier), handed to teardown
    /// to be awaited once the children are gone.
    fn take_tasks(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        Vec::new()
    }
}

/// The first of the backend's children to exit, and how.
pub async fn wait_exit(children: Vec<Child>) -> (String, u32, ExitStatus) {
    if children.is_empty() {
        std::future::pending::<()>().await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(children.len());
    let mut waiters = tokio::task::JoinSet::new();
    for child in children {
        let tx = tx.clone();
        waiters.spawn(async move {
            let status = child.exited().await;
            let _ = tx.send((child.name.clone(), child.pid, status)).await;
        });
    }
    drop(tx);
    match rx.recv().await {
        Some(first) => first,
        // Unreachable: every waiter sends before ending.
        None => std::future::pending().await,
    }
}

/// Whether every child of the backend has been reaped.
pub fn all_exited(backend: &dyn GuestBackend) -> bool {
    backend.children().iter().all(Child::has_exited)
}

/// SIGKILLs the process group of every child not yet reaped.
pub fn kill_all(backend: &dyn GuestBackend, reaper: &Reaper) {
    for child in backend.children() {
        if reaper.kill_group(child, Signal::SIGKILL) {
            tracing::info!(
                "killed the process group of {} (pid {})",
                child.name,
                child.pid
            );
        }
    }
}

/// Starts the guest with the chosen backend.
pub fn start(kind: VmmKind, launch: &Launch<'_>) -> Result<Box<dyn GuestBackend>, VmmError> {
    match kind {
        VmmKind::None => Ok(Box::new(none::NoVm::start(launch)?)),
        VmmKind::Qemu => Ok(Box::new(qemu::Qemu::start(launch)?)),
    }
}
