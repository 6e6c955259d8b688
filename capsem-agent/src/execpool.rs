//! A persistent VM's commands (`capsem exec NAME`): many at once, each on
//! its own exec connection, in its own process group.
//!
//! Connections are guest-initiated, so the agent keeps one idle exec
//! connection open (after its `Hello{token}`); when the host sends a
//! `Start` on it, a named worker thread (`capsem-exec-N`) serves that
//! command ([`crate::exec::serve`]) and the pool thread (`capsem-exec-pool`)
//! opens the next idle connection at once. A connection that fails before
//! its `Start` (capsem-process restarting, say) is retried with capped,
//! jittered backoff. One [`StopSignal`] stops the pool and every worker:
//! each terminates its command's process group and is joined before
//! [`ExecPool`] is dropped.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use capsem_proto::conn::{ConnError, FrameReader};
use capsem_proto::exec::HostToExec;
use capsem_proto::frame::ExecGuest;
use capsem_proto::guest::PORT_EXEC;
use capsem_proto::Codec;
use tracing::{info, warn};

use crate::exec::{self, ExecConfig};
use crate::fdio::{self, Blocking};
use crate::reconnect::{self, Backoff, Waited};
use crate::session::chain;
use crate::stop::{StopError, StopSignal};
use crate::transport::Connected;

#[derive(Debug, thiserror::Error)]
pub enum ExecPoolError {
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error("cannot start the exec pool thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Backoff(#[from] reconnect::ReconnectError),
}

/// The running pool; stopped and joined on drop.
#[derive(Debug)]
pub struct ExecPool {
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
}

impl ExecPool {
    pub fn start(cfg: ExecConfig) -> Result<Self, ExecPoolError> {
        let stop = Arc::new(StopSignal::new()?);
        let backoff = Backoff::from_entropy()?;
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("capsem-exec-pool".into())
            .spawn(move || pool(&cfg, &thread_stop, backoff))
            .map_err(ExecPoolError::Thread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ExecPool {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the exec pool thread panicked");
            }
        }
    }
}

/// What waiting on an idle connection gave.
enum Idle {
    Start(OwnedFd, HostToExec, Codec<ExecGuest>),
    Failed(String),
    Stopped,
}

fn pool(cfg: &ExecConfig, stop: &Arc<StopSignal>, mut backoff: Backoff) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut served = 0u64;
    loop {
        workers.retain(|w| !w.is_finished());
        match idle_connection(cfg, stop) {
            Idle::Start(conn, start, codec) => {
                backoff.reset();
                served += 1;
                let (cfg, stop) = (cfg.clone(), stop.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("capsem-exec-{served}"))
                    .spawn(move || {
                        let why = || "the agent is stopping".to_owned();
                        match exec::serve(&cfg, &conn, Some(start), codec, None, stop.fd(), &why) {
                            Ok(outcome) => info!(command = served, ?outcome, "exec ended"),
                            Err(e) => warn!(command = served, "exec failed: {}", chain(&e)),
                        }
                    });
                match spawned {
                    Ok(handle) => workers.push(handle),
                    Err(e) => warn!("cannot start an exec worker: {e}"),
                }
            }
            Idle::Failed(reason) => {
                info!(%reason, "exec connection failed; retrying");
                match reconnect::wait(backoff.next_delay(), stop.fd()) {
                    Ok(Waited::Elapsed) => {}
                    Ok(Waited::Cancelled) | Err(_) => break,
                }
            }
            Idle::Stopped => break,
        }
    }
    for w in workers {
        if w.join().is_err() {
            warn!("an exec worker panicked");
        }
    }
    info!(commands = served, "exec pool stopped");
}

/// Opens an exec connection, says hello and waits for its `Start`.
fn idle_connection(cfg: &ExecConfig, stop: &StopSignal) -> Idle {
    let conn = match cfg.transport.connect(PORT_EXEC, stop.fd()) {
        Ok(Connected::Socket(fd)) => fd,
        Ok(Connected::Cancelled) => return Idle::Stopped,
        Err(e) => return Idle::Failed(chain(&e)),
    };
    match exec::send_hello(conn.as_fd(), &cfg.token, stop.fd()) {
        Ok(true) => {}
        Ok(false) => return Idle::Stopped,
        Err(e) => return Idle::Failed(format!("hello: {e}")),
    }
    let mut frames = FrameReader::<ExecGuest, _>::new(Blocking::new(conn.as_fd(), stop.fd()));
    let first = frames.read_frame();
    let codec = frames.into_parts().1;
    match first {
        Ok(Some(start @ HostToExec::Start { .. })) => Idle::Start(conn, start, codec),
        Ok(Some(other)) => Idle::Failed(format!("{other:?} before Start")),
        Ok(None) => Idle::Failed("the host closed the idle exec connection".into()),
        Err(ConnError::Io(e)) if fdio::is_cancelled(&e) => Idle::Stopped,
        Err(e) => Idle::Failed(format!("exec connection: {}", chain(&e))),
    }
}
