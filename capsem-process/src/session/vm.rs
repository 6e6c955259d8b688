//! The guest's host processes as phases: not started, running (with the
//! future that resolves when the first of them exits, polled in the
//! session's `select!`, not a detached task), exited. A boot the guest's
//! console says cannot work, or one that has not connected in time
//! ([`attempt_wait`]), is killed and started again, a bounded number of
//! times, while nothing has connected.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::Session;
use crate::config::VmmKind;
use crate::log::chain;
use crate::reaper::ExitStatus;
use crate::vmm::serial::ConsoleFacts;
use crate::vmm::{self, GuestBackend, Launch};

/// Boots one start may take when a boot faults (`vmm::serial::BOOT_FAULTS`)
/// or does not connect within [`attempt_wait`].
pub const MAX_BOOTS: u32 = 3;
/// How long a boot that is not the last of [`MAX_BOOTS`] may take to
/// connect before it is taken for hung and started again: a third of the
/// boot timeout, at least 20 s and at most 40 s (40 s of the default 120 s;
/// a good boot connects in 1.5-8 s under TCG, on a loaded host too). The
/// last boot gets the whole boot timeout, and a boot timeout under 20 s
/// ends the first boot before this does. The hangs this catches are silent:
/// the LAPIC timer's calibration gone wrong without the warning
/// `BOOT_FAULTS` catches, and a CPU spinning with interrupts off in the
/// page allocator while capsem-init loaded modules (docs/qemu-notes.md).
pub fn attempt_wait(boot_timeout: Duration) -> Duration {
    (boot_timeout / 3).clamp(Duration::from_secs(20), Duration::from_secs(40))
}
/// How long a faulted boot's killed processes get to be reaped.
const REBOOT_REAP_WAIT: Duration = Duration::from_secs(5);

/// The first of the backend's children to exit: name, pid, status.
pub type Exit = (String, u32, ExitStatus);
type ExitFuture = Pin<Box<dyn Future<Output = Exit> + Send>>;

pub enum Guest {
    NotStarted,
    Running {
        backend: Box<dyn GuestBackend>,
        exit: ExitFuture,
    },
    Exited {
        backend: Box<dyn GuestBackend>,
        /// `<name> exited (<status>)[: <words>]`.
        reason: String,
        /// Until when its last frames (the shell's status) may still be read.
        grace: Option<Instant>,
    },
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Guest::NotStarted => f.write_str("NotStarted"),
            Guest::Running { backend, .. } => write!(f, "Running({})", backend.name()),
            Guest::Exited { reason, .. } => write!(f, "Exited({reason})"),
        }
    }
}

impl Guest {
    /// Resolves when the running guest's first process exits; pending in
    /// any other phase.
    pub async fn exited(&mut self) -> Exit {
        match self {
            Guest::Running { exit, .. } => exit.as_mut().await,
            _ => std::future::pending().await,
        }
    }

    pub fn gone(&self) -> Option<&str> {
        match self {
            Guest::Exited { reason, .. } => Some(reason),
            _ => None,
        }
    }

    pub fn grace(&self) -> Option<Instant> {
        match self {
            Guest::Exited { grace, .. } => *grace,
            _ => None,
        }
    }

    pub fn backend(&self) -> Option<&dyn GuestBackend> {
        match self {
            Guest::NotStarted => None,
            Guest::Running { backend, .. } | Guest::Exited { backend, .. } => {
                Some(backend.as_ref())
            }
        }
    }

    /// What the started guest's console said, if its backend has one.
    pub fn console(&self) -> Option<ConsoleFacts> {
        self.backend().and_then(|b| b.console())
    }

    /// The backend's own tasks, for teardown to await.
    pub fn take_tasks(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        match self {
            Guest::NotStarted => Vec::new(),
            Guest::Running { backend, .. } | Guest::Exited { backend, .. } => backend.take_tasks(),
        }
    }

    /// Running → Exited, with the reason the backend gives.
    pub fn mark_exited(&mut self, (name, pid, status): Exit) -> String {
        let old = std::mem::replace(self, Guest::NotStarted);
        let backend = match old {
            Guest::Running { backend, .. } | Guest::Exited { backend, .. } => backend,
            Guest::NotStarted => return format!("{name} exited ({status})"),
        };
        info!("guest exited: {name} (pid {pid}) {status}");
        let reason = match backend.describe_exit() {
            Some(words) => format!("{name} exited ({status}): {words}"),
            None => format!("{name} exited ({status})"),
        };
        *self = Guest::Exited {
            backend,
            reason: reason.clone(),
            grace: None,
        };
        reason
    }

    pub fn set_grace(&mut self, until: Option<Instant>) {
        if let Guest::Exited { grace, .. } = self {
            *grace = until;
        }
    }
}

/// The first boot fault line of the console, if there is one to watch;
/// pending otherwise.
pub async fn boot_fault(console: Option<ConsoleFacts>) -> String {
    match console {
        Some(facts) => facts.boot_fault().await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// This boot cannot work (`fault` says why: a console boot fault, or no
    /// connection within [`attempt_wait`]), and nothing has connected: its
    /// processes are killed and reaped and the guest is started again, up
    /// to [`MAX_BOOTS`] boots; past that, or for an adopted guest, the
    /// reason the start failed.
    pub(super) async fn reboot_guest(&mut self, fault: &str) -> Result<(), String> {
        // Only before anything connected: nothing of the guest's session
        // exists yet that a new boot would strand.
        if self.adopt.is_some() || self.link.bridged().is_some() || self.boots >= MAX_BOOTS {
            return Err(format!("{fault} in each of {} boots", self.boots));
        }
        warn!(
            "{fault}: this boot cannot work; booting again ({} of {MAX_BOOTS})",
            self.boots + 1
        );
        let children = self
            .guest
            .backend()
            .map(|b| {
                vmm::kill_all(b, &self.reaper);
                b.children().to_vec()
            })
            .unwrap_or_default();
        for child in children {
            if tokio::time::timeout(REBOOT_REAP_WAIT, child.exited())
                .await
                .is_err()
            {
                return Err(format!(
                    "{fault}, and {} (pid {}) outlived SIGKILL",
                    child.name, child.pid
                ));
            }
        }
        super::teardown::join_backend_tasks(&mut self.guest).await;
        // Dropping the backend releases its CID, uid and cgroup for the
        // next boot.
        self.guest = Guest::NotStarted;
        self.boot_deadline = Instant::now() + self.cfg.boot_timeout();
        self.start_guest()
    }

    /// This boot did not connect within [`attempt_wait`]: it is taken for
    /// hung and started again.
    pub(super) async fn on_attempt_wait_over(&mut self) -> Result<(), String> {
        self.attempt_deadline = None;
        let last = self
            .guest
            .console()
            .and_then(|c| c.last_line())
            .map_or_else(|| "nothing".to_owned(), |l| format!("\"{l}\""));
        let waited = attempt_wait(self.cfg.boot_timeout());
        self.reboot_guest(&format!(
            "the guest did not connect within {} s (its console's last line: {last})",
            waited.as_secs()
        ))
        .await
    }

    /// Starts (or, with `--adopt`, takes over) the guest and records it.
    pub(super) fn start_guest(&mut self) -> Result<(), String> {
        let launch = Launch {
            dir: &self.dir,
            vm_id: &self.cfg.vm_id,
            token: &self.shared.token,
            reaper: &self.reaper,
            cfg: &self.cfg,
        };
        let backend: Box<dyn GuestBackend> = match &self.adopt {
            Some(pids) => {
                let name = match self.cfg.vmm {
                    VmmKind::None => "none",
                    VmmKind::Qemu => "qemu",
                };
                let mut adopted = vmm::adopted::Adopted::adopt(name, pids, &self.reaper)
                    .map_err(|e| format!("cannot adopt the running guest: {}", chain(&e)))?;
                if self.cfg.vmm == VmmKind::Qemu {
                    adopted.reclaim_cid(&self.cfg.run_dir());
                    adopted.reclaim_uid(self.dir.root());
                    // The running vhost-device-vsock connects to our new
                    // listeners by their names in its jail.
                    vmm::jail::link_listeners(self.dir.root())
                        .map_err(|e| format!("cannot adopt the running guest: {}", chain(&e)))?;
                }
                Box::new(adopted)
            }
            None => vmm::start(self.cfg.vmm, &launch).map_err(|e| chain(&e))?,
        };
        self.records.write_token(&self.shared.token);
        self.records
            .write_pids(&self.cfg.vm_id, backend.records(), None);
        let image =
            (self.cfg.vmm == VmmKind::Qemu).then(|| self.cfg.image_dir().display().to_string());
        self.records
            .started(self.adopt.is_some(), backend.accel(), image);
        info!(
            "guest backend {} started {}",
            backend.name(),
            backend.details()
        );
        self.shared.set_guest_pid(backend.pid());
        self.boots += 1;
        self.attempt_deadline =
            (self.adopt.is_none() && backend.console().is_some() && self.boots < MAX_BOOTS)
                .then(|| Instant::now() + attempt_wait(self.cfg.boot_timeout()));
        let exit = Box::pin(vmm::wait_exit(backend.children().to_vec()));
        self.guest = Guest::Running { backend, exit };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_attempt_gets_a_third_of_the_boot_timeout_within_20_to_40_s() {
        let s = Duration::from_secs;
        assert_eq!(attempt_wait(s(120)), s(40));
        assert_eq!(attempt_wait(s(600)), s(40));
        assert_eq!(attempt_wait(s(90)), s(30));
        assert_eq!(attempt_wait(s(45)), s(20));
        assert_eq!(attempt_wait(s(15)), s(20));
    }
}
