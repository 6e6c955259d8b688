//! The attached client: who it is, its attach epoch, and the terminal
//! output receiver, which is moved to the client's writer with
//! `StartOutput` and comes back in `Event::Closed`. An attach that arrives
//! while the previous client's writer still holds the receiver waits for it.

use std::sync::Arc;

use capsem_proto::ipc::ProcessToClient;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use crate::state::{Outgoing, Shared, ToClient};

/// A client's request to attach to the terminal.
#[derive(Debug)]
pub struct AttachRequest {
    pub conn: u64,
    pub notices: mpsc::Sender<Outgoing>,
    pub reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, Clone, Copy)]
struct Attached {
    conn: u64,
    epoch: u64,
}

#[derive(Debug)]
pub struct Client {
    shared: Arc<Shared>,
    attached: Option<Attached>,
    last_epoch: u64,
    /// The terminal output receiver, while no client's writer holds it.
    output: Option<mpsc::Receiver<ToClient>>,
    /// An attach waiting for the previous writer to give `output` back.
    deferred: Option<AttachRequest>,
    /// The shell's status, waiting for a slot in the output queue behind
    /// every output chunk already there.
    pub exit: Option<ToClient>,
}

impl Client {
    pub fn new(shared: Arc<Shared>, output: mpsc::Receiver<ToClient>) -> Self {
        Self {
            shared,
            attached: None,
            last_epoch: 0,
            output: Some(output),
            deferred: None,
            exit: None,
        }
    }

    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    /// A shell attach (the caller already checked the mode allows one).
    pub fn attach(&mut self, req: AttachRequest, vm_id: &str) {
        if self.attached.is_some() || self.deferred.is_some() {
            let _ = req.reply.send(Err(format!(
                "a client is already attached to {vm_id} (detach it with Ctrl-] first)"
            )));
            return;
        }
        match self.output.take() {
            Some(output) => self.grant(req, output, vm_id),
            None => {
                debug!("client {}: waiting for the last client to leave", req.conn);
                self.deferred = Some(req);
            }
        }
    }

    fn grant(&mut self, req: AttachRequest, output: mpsc::Receiver<ToClient>, vm_id: &str) {
        self.last_epoch += 1;
        let epoch = self.last_epoch;
        // Queued before the registration, so `Attached` is the first
        // message this client gets; the connection's queue is fresh.
        let attached = ProcessToClient::Attached {
            vm_id: vm_id.to_owned(),
        };
        let _ = req.notices.try_send(Outgoing::Msg(attached));
        match req
            .notices
            .try_send(Outgoing::StartOutput { epoch, output })
        {
            Ok(()) => {}
            Err(TrySendError::Full(Outgoing::StartOutput { output, .. }))
            | Err(TrySendError::Closed(Outgoing::StartOutput { output, .. })) => {
                self.output = Some(output);
                let _ = req.reply.send(Err("the connection is not usable".into()));
                return;
            }
            Err(_) => {}
        }
        self.shared.set_notices(Some(req.notices));
        self.shared.client_finished.send_replace(false);
        self.shared.attached.send_replace(epoch);
        self.attached = Some(Attached {
            conn: req.conn,
            epoch,
        });
        let _ = req.reply.send(Ok(()));
    }

    /// `capsem run`'s client: attached for its notices (no terminal output).
    pub fn attach_exec(&mut self, conn: u64, notices: mpsc::Sender<Outgoing>) {
        self.shared.set_notices(Some(notices));
        self.last_epoch += 1;
        self.shared.attached.send_replace(self.last_epoch);
        self.attached = Some(Attached {
            conn,
            epoch: self.last_epoch,
        });
    }

    /// Queues the shell's status for the attached client.
    pub fn queue_exit(&mut self, exit_code: Option<i32>, signal: Option<i32>) {
        if let Some(a) = self.attached {
            self.exit = Some(ToClient::Exited {
                epoch: a.epoch,
                exit_code,
                signal,
            });
        }
    }

    /// The attached client gets nothing more (its writer still delivers
    /// what is queued for its epoch).
    pub fn detach(&mut self) -> Option<u64> {
        let a = self.attached.take()?;
        self.shared.set_notices(None);
        self.shared.attached.send_replace(0);
        Some(a.conn)
    }

    /// A ctl.sock connection ended, giving `output` back if it held it.
    /// Returns whether it was the attached client.
    pub fn closed(
        &mut self,
        conn: u64,
        output: Option<mpsc::Receiver<ToClient>>,
        vm_id: &str,
    ) -> bool {
        let was_attached = self.attached.is_some_and(|a| a.conn == conn);
        if was_attached {
            info!("client {conn} detached");
            self.detach();
        }
        if let Some(output) = output {
            match self.deferred.take() {
                Some(req) => self.grant(req, output, vm_id),
                None => self.output = Some(output),
            }
        }
        was_attached
    }
}
