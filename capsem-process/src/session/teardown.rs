//! The one teardown, as a list of steps in one function. It consumes the
//! session, so it runs once; nothing is left to a `Drop`.

use std::time::Duration;

use capsem_proto::guest::HostToGuest;
use capsem_proto::ipc::ProcessToClient;
use tracing::{info, warn};

use super::vm::Guest;
use super::{Mode, Session, Stop};
use crate::config::VmmKind;
use crate::log::chain;
use crate::vmm;

/// How long a temporary guest gets to exit after `Shutdown`.
const GUEST_EXIT_WAIT: Duration = Duration::from_secs(2);
/// How long a persistent guest gets to stop the shell, sync and power off.
const PERSISTENT_EXIT_WAIT: Duration = Duration::from_secs(8);
/// How long the attached client gets to receive its final message.
const CLIENT_FLUSH_WAIT: Duration = Duration::from_secs(1);
/// How long killed descendants get to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// How long a backend task may take to end once the guest is gone.
const BACKEND_TASK_WAIT: Duration = Duration::from_secs(1);

impl Session {
    /// Stops everything: client, guest, tasks, descendants, files.
    pub(super) async fn teardown(mut self, stop: &Stop) {
        info!("tearing down: {stop}");
        // 0. The published ports stop answering at once: their listeners
        //    close and their connections are joined.
        self.publish_stop.stop();
        for task in self.publish_tasks.drain(..) {
            if let Err(e) = task.await {
                warn!("a publish task failed: {e}");
            }
        }
        // 1. An attached client learns why, if the session was lost.
        if let (true, Some(reason)) = (self.client.is_attached(), stop.lost_reason()) {
            let reason = self.with_log_hint(&reason, stop);
            if !*self.shared.client_finished.borrow()
                && self
                    .shared
                    .notify_client(ProcessToClient::SessionLost { reason })
            {
                let mut delivered = self.shared.client_finished.subscribe();
                let _ = tokio::time::timeout(CLIENT_FLUSH_WAIT, delivered.wait_for(|d| *d)).await;
            }
        }
        // 2. The agent is asked to stop, if it can still hear us.
        let asked = self.link.bridged().is_some()
            && self.guest.gone().is_none()
            && self.shared.guest_tx.try_send(HostToGuest::Shutdown).is_ok();
        if asked {
            info!("sent shutdown to the agent");
        }
        // 3. The guest gets a bounded time to exit, then every process
        //    group that is left is killed.
        self.stop_guest(stop, asked).await;
        // 4. The generation's tasks are stopped and joined.
        if let Err(e) = self.link.down().await {
            warn!("{}", chain(&e));
        }
        // 5. The exec relays are stopped and joined.
        match &mut self.mode {
            Mode::Exec(one) => one.stop().await,
            Mode::Persistent(pool) => pool.stop().await,
            Mode::Shell(_) => {}
        }
        // 6. The listeners' accept loops and their connections are joined.
        self.accept_stop.stop();
        for task in self.accept_tasks.drain(..) {
            if let Err(e) = task.await {
                warn!("an accept task failed: {e}");
            }
        }
        // 7. The audit log is closed, then exported (`--audit-log`), and
        //    the network records after it (no connection task is left to
        //    write one).
        match self.audit_task.await {
            Ok(log) => crate::audit::finish(&log, self.cfg.audit_log.as_deref()),
            Err(e) => warn!("the audit task failed: {e}"),
        }
        if let Some(dest) = self.cfg.audit_log.as_deref() {
            match crate::net::NetLog::export(self.dir.root(), dest) {
                Ok(n) => info!("net: appended {n} bytes of records to {}", dest.display()),
                Err(e) => warn!("net: {}", chain(&e)),
            }
        }
        // 8. Every descendant is killed by process group and reaped; then
        //    the backend's tasks (QEMU's console copier), the reaper and its
        //    pidfd watchers are joined.
        crate::teardown::reap_all(&self.reaper, REAP_WAIT).await;
        join_backend_tasks(&mut self.guest).await;
        self.reaper.stop(self.reaper_task).await;
        // 9. Sockets, records, and a temporary VM's directory (its logs
        //    kept first if it failed).
        // virtiofsd's files, and each socket's second name in the jail.
        let shares = (0..capsem_host::share::MAX_SHARES)
            .flat_map(capsem_host::share::runtime_files)
            .flat_map(|name| {
                let jailed = crate::vmm::jail::jail_dir(self.dir.root()).join(&name);
                [self.dir.file(&name), jailed]
            });
        for path in self.dir.sockets().into_iter().chain(shares) {
            if let Err(e) = crate::teardown::remove_file(&path) {
                warn!("{}", chain(&e));
            }
        }
        if self.cfg.temporary {
            let keep = crate::logkeep::LogKeep::new(&self.cfg.home(), &self.cfg.vm_id);
            if keep.wanted(stop.failed()) {
                info!("keeping the logs in {}", keep.dest.display());
                // Moved after this line so process.log has it.
                if let Err(e) = keep.keep(self.dir.root()) {
                    warn!("{}", chain(&e));
                }
            }
            if let Err(e) = crate::teardown::remove_dir(self.dir.root()) {
                warn!("{}", chain(&e));
            }
        } else {
            let reason = match stop {
                Stop::Lifetime(limit) => Some(limit.to_string()),
                _ => None,
            };
            self.records.stopped(reason);
        }
        info!("teardown complete");
    }

    async fn stop_guest(&mut self, stop: &Stop, asked: bool) {
        let Some(backend) = self.guest.backend() else {
            return;
        };
        if vmm::all_exited(backend) {
            return;
        }
        // A temporary VM that ended normally is killed as soon as the agent
        // is done: its disk is thrown away, and everything the host needs
        // (status, audit and network records) came before the agent's last
        // act, the close of its control connection (the agent's
        // `farewell`). A failed one still powers off, so that capsem-init's
        // last console lines reach the kept serial log.
        let generation = self
            .link
            .bridged()
            .filter(|_| self.cfg.temporary && self.cfg.vmm == VmmKind::Qemu && !stop.failed());
        let mut closed = self.shared.control_closed.subscribe();
        let agent_done = async move {
            match generation {
                Some(g) => {
                    let _ = closed.wait_for(|c| *c >= g).await;
                }
                None => std::future::pending().await,
            }
        };
        if let Guest::Running { exit, .. } = &mut self.guest {
            let wait = exit_wait(
                self.cfg.persistent() && self.cfg.vmm == VmmKind::Qemu,
                asked,
            );
            tokio::select! {
                _ = exit.as_mut() => {}
                () = agent_done => info!("the agent is done (its control connection closed): killing the temporary VM"),
                () = tokio::time::sleep(wait) => info!("the guest did not exit within {wait:?}; killing it"),
            }
        }
        if let Some(backend) = self.guest.backend() {
            vmm::kill_all(backend, &self.reaper);
        }
    }
}

/// How long the guest gets to exit on its own before it is killed: a
/// persistent guest that was asked to stop gets the time to sync its disk;
/// one nobody could ask (its boot never connected: it may be hung) only the
/// short wait, which keeps this teardown inside the CLI's grace for a
/// failed boot (`capsem-cli` spawn.rs `EXIT_GRACE`), so the CLI never has
/// to kill this process and orphan its QEMU.
fn exit_wait(persistent_vm: bool, asked: bool) -> Duration {
    if persistent_vm && asked {
        PERSISTENT_EXIT_WAIT
    } else {
        GUEST_EXIT_WAIT
    }
}

/// The backend's tasks end once its children are gone (the console pipe
/// reaches EOF); each gets a bounded wait, then is aborted.
pub(super) async fn join_backend_tasks(guest: &mut Guest) {
    for mut task in guest.take_tasks() {
        if tokio::time::timeout(BACKEND_TASK_WAIT, &mut task)
            .await
            .is_err()
        {
            warn!("a guest backend task did not end; aborting it");
            task.abort();
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_persistent_guest_that_was_asked_to_stop_gets_the_long_wait() {
        assert_eq!(exit_wait(true, true), PERSISTENT_EXIT_WAIT);
        assert_eq!(exit_wait(true, false), GUEST_EXIT_WAIT);
        assert_eq!(exit_wait(false, true), GUEST_EXIT_WAIT);
        assert_eq!(exit_wait(false, false), GUEST_EXIT_WAIT);
    }
}
