//! Runs the agent and reaps every process that ends up parented to PID 1.
//!
//! SIGCHLD and the shutdown signals are blocked and read from a signalfd, so
//! the loop sleeps in `poll` until something happens or the idle reclaim's
//! next sample is due (`reclaim`): no busy polling, no sleeps.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::reclaim::{self, IdleReclaim};

/// Errors supervising the agent.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot block signals")]
    Block(#[source] Errno),
    #[error("cannot create the signalfd")]
    SignalFd(#[source] Errno),
    #[error("cannot read the signalfd")]
    ReadSignal(#[source] Errno),
    #[error("cannot poll the signalfd")]
    Poll(#[source] Errno),
    #[error("cannot start {agent}")]
    Spawn {
        agent: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {0} does not fit a pid_t")]
    Pid(u32),
    #[error("waitpid failed")]
    Wait(#[source] Errno),
}

/// Why supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentEnd {
    /// The agent exited or was killed; its wait status.
    Exited(WaitStatus),
    /// Someone asked PID 1 to stop (SIGTERM, SIGINT, SIGPWR).
    Signalled(Signal),
}

/// Signals PID 1 reads from its signalfd.
fn watched() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
    ] {
        set.add(sig);
    }
    set
}

/// The agent's command: program, arguments, and its whole environment.
#[derive(Debug)]
pub struct AgentCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// Blocks the watched signals before anything is spawned, so a child that
/// exits at once still leaves its SIGCHLD pending for the signalfd.
#[derive(Debug)]
pub struct Supervisor {
    sfd: SignalFd,
}

impl Supervisor {
    pub fn new() -> Result<Self, SuperviseError> {
        let set = watched();
        set.thread_block().map_err(SuperviseError::Block)?;
        let sfd =
            SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC).map_err(SuperviseError::SignalFd)?;
        Ok(Self { sfd })
    }

    /// Starts the agent with stdin on /dev/null and stdout/stderr on the
    /// console. The standard library resets the signal mask in the child.
    pub fn spawn(&self, cmd: &AgentCommand) -> Result<Pid, SuperviseError> {
        let child = Command::new(&cmd.program)
            .args(&cmd.args)
            .env_clear()
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cmd.cwd)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| SuperviseError::Spawn {
                agent: cmd.program.clone(),
                source,
            })?;
        // The Child handle is dropped without waiting: `wait_agent` reaps it
        // with every other child through waitpid(-1).
        let raw = child.id();
        let pid = i32::try_from(raw).map_err(|_| SuperviseError::Pid(raw))?;
        Ok(Pid::from_raw(pid))
    }

    /// Reaps children as SIGCHLD arrives until `agent` is reaped or a
    /// shutdown signal comes; between signals, `reclaim` (PID 1's; tests
    /// pass none) samples the guest every [`reclaim::TICK`], the poll's
    /// timeout.
    pub fn wait_agent(
        &mut self,
        agent: Pid,
        mut reclaim: Option<&mut IdleReclaim>,
    ) -> Result<AgentEnd, SuperviseError> {
        let mut next_tick = Instant::now() + reclaim::TICK;
        loop {
            if let Some(status) = reap_ready(agent)? {
                return Ok(AgentEnd::Exited(status));
            }
            let timeout = match reclaim {
                Some(_) => {
                    let wait = next_tick.saturating_duration_since(Instant::now());
                    PollTimeout::from(u16::try_from(wait.as_millis()).unwrap_or(u16::MAX))
                }
                None => PollTimeout::NONE,
            };
            let mut fds = [PollFd::new(self.sfd.as_fd(), PollFlags::POLLIN)];
            let ready = match poll(&mut fds, timeout) {
                Ok(n) => n > 0,
                Err(Errno::EINTR) => false,
                Err(e) => return Err(SuperviseError::Poll(e)),
            };
            // Due whether or not a signal came with it: children that end
            // more often than the tick must not starve it.
            if let Some(r) = reclaim
                .as_deref_mut()
                .filter(|_| Instant::now() >= next_tick)
            {
                r.tick();
                next_tick = Instant::now() + reclaim::TICK;
            }
            if !ready {
                continue;
            }
            let Some(info) = self.sfd.read_signal().map_err(SuperviseError::ReadSignal)? else {
                continue;
            };
            let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
            match Signal::try_from(signo) {
                Ok(Signal::SIGCHLD) | Err(_) => {}
                Ok(sig) => return Ok(AgentEnd::Signalled(sig)),
            }
        }
    }
}

/// Reaps every child that has already ended; returns the agent's status if
/// it was among them. SIGCHLDs coalesce, so one signal may stand for many.
fn reap_ready(agent: Pid) -> Result<Option<WaitStatus>, SuperviseError> {
    let mut agent_status = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(agent_status),
            Ok(status) => {
                if status.pid() == Some(agent) {
                    agent_status = Some(status);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(SuperviseError::Wait(e)),
        }
    }
}

/// Reaps children until none is left (blocking); used after `kill(-1)`.
pub fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::pthread::{pthread_kill, pthread_self};
    use nix::sys::wait::{waitid, Id};

    #[test]
    fn watched_includes_sigchld_and_stops() {
        let set = watched();
        for sig in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGPWR] {
            assert!(set.contains(sig));
        }
        assert!(!set.contains(Signal::SIGKILL));
    }

    #[test]
    fn supervises_a_child_to_its_exit() {
        // Own thread: the signal mask is per thread, so the harness's other
        // threads stay as they were. The child's end is awaited without
        // reaping first (WNOWAIT), so the test does not depend on where a
        // process-directed SIGCHLD is delivered.
        let status = std::thread::spawn(|| {
            let mut sup = Supervisor::new().unwrap();
            let pid = sup
                .spawn(&AgentCommand {
                    program: PathBuf::from("/bin/sh"),
                    args: vec!["-c".into(), "exit 7".into()],
                    env: vec![],
                    cwd: PathBuf::from("/"),
                })
                .unwrap();
            waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT).unwrap();
            sup.wait_agent(pid, None).unwrap()
        })
        .join()
        .unwrap();
        assert!(matches!(status, AgentEnd::Exited(WaitStatus::Exited(_, 7))));
    }

    #[test]
    fn shutdown_signal_ends_supervision() {
        let end = std::thread::spawn(|| {
            let mut sup = Supervisor::new().unwrap();
            // A thread-directed SIGTERM stays pending on this thread, where
            // the signalfd reads it.
            pthread_kill(pthread_self(), Signal::SIGTERM).unwrap();
            sup.wait_agent(Pid::from_raw(i32::MAX), None).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(end, AgentEnd::Signalled(Signal::SIGTERM));
    }

    #[test]
    fn spawn_failure_is_typed() {
        let sup = Supervisor {
            sfd: SignalFd::new(&SigSet::empty()).unwrap(),
        };
        let err = sup
            .spawn(&AgentCommand {
                program: PathBuf::from("/nonexistent/agent"),
                args: vec![],
                env: vec![],
                cwd: PathBuf::from("/"),
            })
            .unwrap_err();
        assert!(matches!(err, SuperviseError::Spawn { .. }));
    }
}
