//! What each wake-up does to the session's phases.

use std::time::Duration;

use capsem_proto::ipc::ProcessToClient;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::attach::AttachRequest;
use super::exec::{WaitingExec, EXEC_CONNECT_WAIT};
use super::{Mode, Session, ShellPhase, Stop, Wake};
use crate::log::chain;
use crate::state::{Event, GenEvent, Outgoing};

/// After the agent died, how long its last frames (the shell's status) may
/// take to be read before calling it a loss.
const STATUS_GRACE: Duration = Duration::from_secs(2);

/// Why a boot that never connected failed, with where the guest's console
/// got to when it has one.
fn boot_timeout(waited: Duration, console: Option<String>) -> String {
    let mut reason = format!("the guest did not connect within {} ms", waited.as_millis());
    if let Some(line) = console {
        reason.push_str(&format!("; its console's last line: {line}"));
    }
    reason
}

impl Session {
    pub(super) async fn on_wake(&mut self, wake: Wake) -> Option<Stop> {
        match wake {
            Wake::Signal(s) => {
                info!("received {s}");
                Some(Stop::Signal(s))
            }
            Wake::Event(ev) => self.on_event(ev).await,
            Wake::BootTimeout => Some(Stop::BootFailed(boot_timeout(
                self.cfg.boot_timeout(),
                self.guest.console().and_then(|c| c.last_line()),
            ))),
            Wake::BootFault(line) => self
                .reboot_guest(&format!("the guest's kernel said \"{line}\""))
                .await
                .err()
                .map(Stop::BootFailed),
            Wake::AttemptWaitOver => self
                .on_attempt_wait_over()
                .await
                .err()
                .map(Stop::BootFailed),
            Wake::TerminalTimeout => {
                self.link.terminal_timeout();
                None
            }
            Wake::StatusGraceOver => {
                let gone = self.guest.gone().unwrap_or("the guest").to_owned();
                Some(Stop::AgentDied(format!(
                    "{gone} without reporting the shell's exit"
                )))
            }
            Wake::ExecConnectTimeout => Some(Stop::AgentDied(format!(
                "the guest did not open the exec port within {} s",
                EXEC_CONNECT_WAIT.as_secs()
            ))),
            Wake::ExecRelayJoined(failure) => {
                if let Some(e) = failure {
                    warn!("an exec relay failed: {e}");
                }
                None
            }
            Wake::ExitQueued => None,
            Wake::Lifetime(limit) => {
                info!("{limit} reached; stopping the VM");
                Some(Stop::Lifetime(limit))
            }
            Wake::GuestExited(exit) => {
                let reason = self.guest.mark_exited(exit);
                if self.ready.pending() {
                    return Some(Stop::BootFailed(format!(
                        "{reason} before the guest connected"
                    )));
                }
                if self.mode.finished() {
                    None
                } else if self.link.bridged().is_some() {
                    // Its last frames may still be in flight: the shell's
                    // status wins over the loss if it is read in time.
                    self.guest.set_grace(Some(Instant::now() + STATUS_GRACE));
                    None
                } else {
                    Some(Stop::AgentDied(format!(
                        "{reason} without reporting the shell's exit"
                    )))
                }
            }
        }
    }

    async fn on_event(&mut self, ev: Event) -> Option<Stop> {
        match ev {
            Event::Hello(hello) => {
                if self.mode.finished() {
                    warn!("control connection rejected: the shell has already exited");
                    return None;
                }
                self.records
                    .hello(self.link.next_generation(), hello.connects, hello.shell_pid);
                let exec = matches!(self.mode, Mode::Exec(_));
                match self.link.on_hello(*hello, exec).await {
                    Ok(true) => self.bridged(),
                    Ok(false) => {}
                    Err(e) => return Some(Stop::AgentDied(chain(&e))),
                }
                None
            }
            Event::Terminal(terminal) => {
                if self.link.on_terminal(*terminal) {
                    self.bridged();
                }
                None
            }
            Event::Gen { generation, event } => {
                if self.link.bridged() != Some(generation) {
                    debug!("ignoring {event:?} from stale generation {generation}");
                    return None;
                }
                self.on_gen_event(event).await
            }
            Event::Attach {
                conn,
                notices,
                reply,
            } => {
                let refused = match &self.mode {
                    Mode::Shell(ShellPhase::Exited) => Some("the shell has exited"),
                    Mode::Exec(_) => Some("this VM runs a command, not a shell"),
                    _ => None,
                };
                match refused {
                    Some(why) => {
                        let _ = reply.send(Err(why.to_owned()));
                    }
                    None => {
                        let req = AttachRequest {
                            conn,
                            notices,
                            reply,
                        };
                        self.client.attach(req, &self.cfg.vm_id);
                    }
                }
                None
            }
            Event::Closed { conn, output } => {
                if !self.client.closed(conn, output, &self.cfg.vm_id) {
                    return None;
                }
                if self.mode.finished() {
                    Some(Stop::ShellExited)
                } else if self.cfg.temporary {
                    Some(Stop::ClientGone)
                } else {
                    None
                }
            }
            Event::Shutdown => Some(Stop::ShutdownRequested),
            Event::DropGuest => {
                match self.link.down().await {
                    Ok(Some(g)) => {
                        info!("generation {g}: dropped the guest connections on request")
                    }
                    Ok(None) => {}
                    Err(e) => return Some(Stop::AgentDied(chain(&e))),
                }
                None
            }
            Event::FinalDelivered => self.mode.finished().then_some(Stop::ShellExited),
            Event::ExecConn(stream, codec) => {
                match &mut self.mode {
                    Mode::Persistent(pool) => pool.connection((stream, codec), &self.events_tx),
                    Mode::Exec(one) => one.connection((stream, codec), &self.events_tx),
                    Mode::Shell(_) => warn!("exec connection rejected: this VM runs a shell"),
                }
                None
            }
            Event::ExecAttach {
                conn,
                notices,
                reply,
                start,
                stdin,
            } => {
                let attached = Outgoing::Msg(ProcessToClient::Attached {
                    vm_id: self.cfg.vm_id.clone(),
                });
                let answer = match &mut self.mode {
                    Mode::Persistent(pool) => {
                        let _ = notices.try_send(attached);
                        info!("client {conn}: a command, waiting for an exec connection");
                        let waiting = WaitingExec {
                            notices,
                            start,
                            stdin,
                        };
                        pool.command(waiting, &self.events_tx);
                        Ok(())
                    }
                    Mode::Shell(_) => Err("this VM runs a shell, not a command".to_owned()),
                    Mode::Exec(one) if self.client.is_attached() || one.has_command() => {
                        Err("a client is already attached".to_owned())
                    }
                    Mode::Exec(one) => {
                        let _ = notices.try_send(attached);
                        self.client.attach_exec(conn, notices.clone());
                        let waiting = WaitingExec {
                            notices,
                            start,
                            stdin,
                        };
                        one.command(waiting, &self.events_tx);
                        Ok(())
                    }
                };
                let _ = reply.send(answer);
                None
            }
            Event::ExecEnded { id, result } => match &mut self.mode {
                Mode::Exec(one) => one.ended(result).map(Stop::AgentDied),
                _ => {
                    debug!("exec {id} ended: {result:?}");
                    None
                }
            },
        }
    }

    /// A generation was bridged: the first one makes the VM ready.
    fn bridged(&mut self) {
        if self.ready.pending() {
            match self.ready.ready() {
                Ok(()) => info!("ready"),
                Err(e) => warn!("cannot write to the ready fd: {e}"),
            }
        }
    }

    async fn on_gen_event(&mut self, event: GenEvent) -> Option<Stop> {
        match event {
            GenEvent::TransportLost(reason) => {
                if self.mode.finished() {
                    debug!("after the shell's exit: {reason}");
                    return None;
                }
                match self.link.down().await {
                    Ok(Some(g)) => warn!("generation {g}: transport lost: {reason}"),
                    Ok(None) => {}
                    Err(e) => return Some(Stop::AgentDied(chain(&e))),
                }
                if let Some(gone) = self.guest.gone() {
                    return Some(Stop::AgentDied(format!(
                        "{gone} without reporting the shell's exit ({reason})"
                    )));
                }
                info!("waiting for the agent to reconnect");
                None
            }
            GenEvent::ShellExited { exit_code, signal } => {
                info!("shell exited: exit_code={exit_code:?} signal={signal:?}");
                self.guest.set_grace(None);
                self.shell_exited(exit_code, signal).await
            }
        }
    }

    /// The status arrived after the last output chunk, which the terminal
    /// reader already queued: the status goes to the client behind them.
    async fn shell_exited(&mut self, exit_code: Option<i32>, signal: Option<i32>) -> Option<Stop> {
        match &mut self.mode {
            Mode::Shell(phase) => {
                if !self.client.is_attached() {
                    return Some(Stop::ShellExited);
                }
                *phase = ShellPhase::Exited;
                self.client.queue_exit(exit_code, signal);
                // The client's writer reports FinalDelivered (or the client
                // leaves).
                None
            }
            Mode::Persistent(_) => {
                // Before the client can see the status, so a command it
                // runs next (`capsem inspect`) finds the exit recorded.
                self.records.shell_exited(exit_code, signal);
                self.client.queue_exit(exit_code, signal);
                // The VM stays; the agent's next shell (its next hello)
                // starts from a clean slate. The client, which leaves after
                // the status, gets no more output.
                info!("persistent VM: waiting for the agent's next shell");
                if let Some(conn) = self.client.detach() {
                    debug!("client {conn} gets no more output");
                }
                if let Err(e) = self.link.down().await {
                    return Some(Stop::AgentDied(chain(&e)));
                }
                self.shared.with_scrollback(|s| s.clear());
                None
            }
            Mode::Exec(_) => {
                warn!("ignoring a shell status in exec mode");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_timeout_says_where_the_console_got_to() {
        let waited = Duration::from_millis(300);
        assert_eq!(
            boot_timeout(waited, None),
            "the guest did not connect within 300 ms"
        );
        assert_eq!(
            boot_timeout(
                waited,
                Some("[ 2.5] capsem-init: filesystems mounted".into())
            ),
            "the guest did not connect within 300 ms; its console's last line: \
             [ 2.5] capsem-init: filesystems mounted"
        );
    }
}
